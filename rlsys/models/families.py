"""The model families rlsys knows, read from a checkpoint's ``config.json``; a new family is one
file beside this one and one row in :data:`FAMILIES`."""

from __future__ import annotations

import json
from pathlib import Path

from rlsys.lang.vocab import FRAMES
from rlsys.models import qwen2_5_vl, qwen3_vl
from rlsys.models.family import Family

FAMILIES: dict[str, Family] = {f.model_type: f for f in (qwen2_5_vl.FAMILY, qwen3_vl.FAMILY)}


def family_named(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"unknown model family {model_type!r}; rlsys knows {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def family_of(path) -> Family:
    """The family of the checkpoint at ``path`` (its ``config.json``'s ``model_type``); an unknown
    one is refused with the known ones."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    model_type = json.loads(cfg.read_text()).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{cfg}: model_type {model_type!r} is not a model family rlsys knows ({', '.join(FAMILIES)}); "
            "a family is one file in rlsys/models/"
        )
    return FAMILIES[model_type]


def check_vocabulary_frame(vocabulary: str, family: Family, force: bool = False) -> None:
    """Refuse a JSON vocabulary whose coordinate frame is not the family's own (Qwen2.5-VL's
    resized pixels read on Qwen3-VL, whose answers are on a 0..1000 grid, or the reverse): every
    answer would be read in the wrong frame and the IoU reward would sit near zero. Token
    vocabularies (bins, grid, indices) are learnt in SFT and fit every family. ``force``:
    ``model.force_vocabulary_frame``, for a checkpoint fine-tuned to the other frame."""
    frame = FRAMES.get(vocabulary)
    own = FRAMES[family.json_vocabulary]
    if force or frame in (None, "tokens", own):
        return
    raise ValueError(
        f"model.vocabulary {vocabulary} writes coordinates as {frame}, but a {family.title} checkpoint answers "
        f"in {own} ({family.json_vocabulary}): use model.vocabulary={family.json_vocabulary}, a token vocabulary "
        "(rex_bins), or model.force_vocabulary_frame=true for a checkpoint trained to the other frame"
    )
