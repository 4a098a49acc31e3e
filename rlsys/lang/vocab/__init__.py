"""Spatial vocabularies: the languages a model can write geometry in, behind one interface.

A vocabulary says how geometry becomes text and back. Everything else (the F1 rewards, the
metrics, Serve's JSON) works in the sample image's pixels, so a vocabulary only converts:

- ``render(preds, width, height)``: SFT targets. ``preds`` are :class:`rlsys.lang.format.Prediction`
  with coordinates in pixels of a ``width`` x ``height`` image; raises on a bad target.
- ``parse(text, width, height)``: a model answer -> :class:`rlsys.lang.format.Parsed` of
  predictions in pixels. Never raises; counts what it cannot read (``unreadable``) and says why
  (``errors``). ``answered`` is False when nothing readable was written at all (an empty answer
  is a format failure, not "nothing here").
  ``written`` holds each instance's coordinates as the model wrote them (bins, or the resized
  image's pixels), in reading order: the paper's duplicate test reads runs of written values.
- ``render_keypoints`` / ``parse_keypoints``: the same for keypoint instances (the list has
  ``written`` too: each instance's box as written).
- ``parse_masks(text, width, height)``: an answer to a mask question, each instance read as a
  mask written as a set of points (kind ``"mask"``; ``render`` writes such predictions). Only
  ``getok`` writes masks (:data:`MASK_VOCABULARIES`); the others refuse to render them and
  read every mask answer as unreadable.
- ``prompt_boxes(boxes, width, height, floor=False)``: visual-prompt boxes written in the
  vocabulary, so the model reads boxes in the language it writes them (``floor``: bins by floor,
  as the released Rex-Omni encodes them; vocabularies without bins ignore it).
- ``question_hint(output)``: wording appended to the task's question ("" for none).
- ``added_tokens()``: the tokens the vocabulary needs in the tokenizer (added to a base
  checkpoint by ``rlsys.data.prepare``; none for ``qwen_json``).
- ``for_sample(sample)`` / ``for_proposals(boxes, width, height)``: the vocabulary as it reads
  one sample (every caller binds it first). Only ``chatrex`` needs this, for its proposals; the
  others return themselves.

Chosen by ``model.vocabulary`` (:func:`make_vocabulary`):

``rex_bins`` (default): Rex-Omni's 1,000 quantised bins ``<0>``..``<999>`` in
:mod:`rlsys.lang.format`'s markup; bins are relative to the image, so the pixel budget does not enter.

``qwen_json``: what a base Qwen2.5-VL already answers for grounding: JSON in a code fence,
``[{"bbox_2d": [x0, y0, x1, y1], "label": "cat"}]`` (``point_2d`` for points; ``polygon`` as a
list of ``[x, y]`` for OCR outlines; keypoint instances add ``"keypoints": {"nose": [x, y] or
"unvisible"}``), integer coordinates in the pixels of the image *as the processor resized it*
(Qwen2.5-VL's grounding convention). The processor's resize is needed to map back:
:func:`resized_size` is its rule (sides rounded to multiples of 28, area kept in [min_pixels,
max_pixels]). A phrase absent from the image has no entry; ``[]`` is a readable answer (no
object). Parsing takes fenced or bare JSON, a single object for a list, and a list cut short
by the token limit (the objects before the cut are kept, the cut counts as unreadable).

``qwen3_json``: what a base Qwen3-VL answers: the same JSON, with integer coordinates on a
0..1000 grid relative to the image (``round(x * 1000 / width)``), so no pixel budget enters.

``getok``: GETok's grid tokens ``<gridX_Y>`` with offsets ``<OFFdx_dy>`` and ``<DELETE>`` in the
markup of the bins (:class:`GETok`).

``chatrex``: ChatRex's indices ``<objK>`` into candidate boxes listed in the question
(:class:`ChatRex`).

Pure Python, no Ray, vLLM or torch; tested in ``tests/test_vocab.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rlsys.lang import coords
from rlsys.lang.vocab.base import MASK_VOCABULARIES, check_writes_masks, resized_size
from rlsys.lang.vocab.chatrex import ChatRex, chatrex_tokens, synthetic_proposals, tokenizer_proposals
from rlsys.lang.vocab.getok import GETok, getok_tokens, tokenizer_grid
from rlsys.lang.vocab.qwen_json import QWEN3_JSON, RELATIVE_1000, RESIZED_PIXELS, QwenJson
from rlsys.lang.vocab.rex_bins import REX_BINS, RexBins

__all__ = [
    "FRAMES",
    "MASK_VOCABULARIES",
    "QWEN3_JSON",
    "REX_BINS",
    "VOCABULARIES",
    "ChatRex",
    "GETok",
    "QwenJson",
    "RexBins",
    "Vocabulary",
    "chatrex_tokens",
    "check_writes_masks",
    "getok_tokens",
    "make_vocabulary",
    "model_tokens",
    "required_tokens",
    "resized_size",
    "synthetic_proposals",
    "tokenizer_grid",
    "tokenizer_proposals",
    "vocabulary_for",
]

Vocabulary = RexBins | QwenJson | GETok | ChatRex


@dataclass(frozen=True)
class _Entry:
    """One row of the table: how to build vocabulary ``name`` from its settings, and the tokens
    a checkpoint's tokenizer must hold for it."""

    build: Callable[..., Vocabulary]
    tokens: Callable[..., tuple[str, ...]]


def _qwen_json(min_pixels=None, max_pixels=None, factor=28, **_):
    if min_pixels is None or max_pixels is None:
        raise ValueError("vocabulary qwen_json needs the processor's min_pixels and max_pixels")
    return QwenJson(int(min_pixels), int(max_pixels), int(factor))


# The one table every lookup reads (the config's Literal of names included): a new vocabulary is
# one file in this folder and one row here.
TABLE: dict[str, _Entry] = {
    "rex_bins": _Entry(build=lambda **_: REX_BINS, tokens=lambda **_: coords.COORD_TOKENS),
    "qwen_json": _Entry(build=_qwen_json, tokens=lambda **_: ()),
    "qwen3_json": _Entry(build=lambda **_: QWEN3_JSON, tokens=lambda **_: ()),
    "getok": _Entry(
        build=lambda getok_grid=32, getok_offsets=True, **_: GETok(int(getok_grid), bool(getok_offsets)),
        tokens=lambda getok_grid=32, **_: getok_tokens(getok_grid),
    ),
    "chatrex": _Entry(
        build=lambda chatrex_max_proposals=100, chatrex_proposals="record", chatrex_distractors=5, **_: ChatRex(
            int(chatrex_max_proposals), chatrex_proposals, int(chatrex_distractors)
        ),
        tokens=lambda chatrex_max_proposals=100, **_: coords.COORD_TOKENS + chatrex_tokens(chatrex_max_proposals),
    ),
}
VOCABULARIES = tuple(TABLE)

# The coordinate frame each vocabulary writes. The two JSON ones are a model family's native
# answers (pixels of the resized image for Qwen2.5-VL, the 0..1000 grid for Qwen3-VL); the token
# vocabularies are new tokens any family learns in SFT ("tokens": they fit every family).
FRAMES = {
    "rex_bins": "tokens",
    "qwen_json": RESIZED_PIXELS,
    "qwen3_json": RELATIVE_1000,
    "getok": "tokens",
    "chatrex": "tokens",
}


def _entry(name: str) -> _Entry:
    if name not in TABLE:
        raise ValueError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABULARIES)}")
    return TABLE[name]


def required_tokens(name: str, getok_grid: int = 32, chatrex_max_proposals: int = 100) -> tuple[str, ...]:
    """The tokens a checkpoint's tokenizer must hold for vocabulary ``name`` (a base checkpoint
    gets them from :func:`rlsys.models.prepare_checkpoint`): the bins for ``rex_bins``, the grid,
    offset and delete tokens for ``getok``, none for ``qwen_json`` (it uses the checkpoint as it is)."""
    return _entry(name).tokens(getok_grid=getok_grid, chatrex_max_proposals=chatrex_max_proposals)


def model_tokens(model_cfg) -> tuple[str, ...]:
    """:func:`required_tokens` of a config's model section (training's or Serve's). Serve's has
    no ``getok_grid``: there the grid is whatever the checkpoint holds (:func:`vocabulary_for`
    refuses a tokenizer without a complete one), so nothing is required up front."""
    grid = getattr(model_cfg, "getok_grid", None)
    if model_cfg.vocabulary == "getok" and grid is None:
        return ()
    if model_cfg.vocabulary == "chatrex":
        k = getattr(model_cfg, "chatrex_max_proposals", None)
        return coords.COORD_TOKENS if k is None else required_tokens("chatrex", chatrex_max_proposals=k)
    return required_tokens(model_cfg.vocabulary, grid or 32)


def make_vocabulary(
    name: str, min_pixels: int | None = None, max_pixels: int | None = None, factor: int = 28, **settings
) -> Vocabulary:
    """The vocabulary ``name`` (``model.vocabulary``). ``qwen_json`` needs the processor's pixel
    budget and patch factor (its coordinates are pixels of the resized image); ``getok`` its grid
    size and whether targets carry offsets (``getok_grid``, ``getok_offsets``); ``chatrex`` its
    ``chatrex_max_proposals``, ``chatrex_proposals`` and ``chatrex_distractors``."""
    return _entry(name).build(min_pixels=min_pixels, max_pixels=max_pixels, factor=factor, **settings)


def vocabulary_for(model_cfg, processor) -> Vocabulary:
    """The vocabulary of a config's model section (``model.vocabulary``, training's or Serve's;
    a bare name works too) with what it needs from ``processor``: the pixel budget for
    ``qwen_json`` (its image processor's ``size`` holds ``shortest_edge``/``longest_edge`` =
    min/max pixels), the grid size for ``getok`` (read from the tokenizer's grid tokens, so a
    checkpoint is always read in the grid it was trained on)."""
    name = model_cfg if isinstance(model_cfg, str) else model_cfg.vocabulary
    offsets = bool(getattr(model_cfg, "getok_offsets", True))
    if name == "getok":
        tok = getattr(processor, "tokenizer", processor)
        grid = tokenizer_grid(tok)
        want = getattr(model_cfg, "getok_grid", None)
        if want is not None and want != grid:
            raise ValueError(f"model.getok_grid is {want} but the checkpoint's tokenizer has a {grid}x{grid} grid")
        return make_vocabulary(name, getok_grid=grid, getok_offsets=offsets)
    if name == "chatrex":
        tok = getattr(processor, "tokenizer", processor)
        k = tokenizer_proposals(tok)
        want = getattr(model_cfg, "chatrex_max_proposals", None)
        if want is not None and want != k:
            raise ValueError(
                f"model.chatrex_max_proposals is {want} but the checkpoint's tokenizer has {k} <objK> tokens"
            )
        return make_vocabulary(
            name,
            chatrex_max_proposals=k,
            chatrex_proposals=getattr(model_cfg, "chatrex_proposals", "record"),
            chatrex_distractors=getattr(model_cfg, "chatrex_distractors", 5),
        )
    if name != "qwen_json":  # qwen3_json's grid is relative: no pixel budget enters
        return make_vocabulary(name)
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None) or {}
    lo = size.get("shortest_edge", getattr(ip, "min_pixels", None))
    hi = size.get("longest_edge", getattr(ip, "max_pixels", None))
    return make_vocabulary(name, lo, hi, getattr(ip, "patch_size", 14) * getattr(ip, "merge_size", 2))
