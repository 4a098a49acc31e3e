"""What rlsys needs to know of a model family, one :class:`Family` per file beside this one
(``qwen2_5_vl.py``, ``qwen3_vl.py``); :mod:`rlsys.models.families` is the table of them.

A family is read from a checkpoint's ``config.json`` (``model_type``); everything else in rlsys
goes through the family's checkpoint with transformers' and vLLM's own classes (Auto*), so a
family adds only what differs: how to build a random tiny model of it, its image-token
arithmetic, its native grounding language, and which of rlsys's shortcuts hold for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    title: str
    # image side per image token: the ViT patch times the merge (a square of it per token)
    pixels_per_token: int
    # the grounding JSON a base checkpoint of the family writes (rlsys.lang.vocab): its frame
    # is the only JSON frame the family may be trained in without forcing it
    json_vocabulary: str
    # (spec, token ids by name, vocabulary rows) -> a transformers config of the tiny model
    tiny_config: Callable
    # (spec, tokenizer, chat template) -> the processor written beside the tiny model
    tiny_processor: Callable
    # learner.freeze_vision's one encoding per image (rlsys.grpo.sequences.vision_tower_features)
    # is written for this family's tower (its window order, a single merger)
    reuses_frozen_tower: bool
    # what a real checkpoint of it would exercise that the tiny one does not (for the docs)
    notes: str = ""
