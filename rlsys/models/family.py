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


def tiny_text_config(spec, ids: dict[str, int], vocab_rows: int, rope_parameters: dict) -> dict:
    """The LLM half of a tiny Qwen-VL config, the same fields in every family (each passes its
    own M-RoPE sections in ``rope_parameters``)."""
    return dict(
        vocab_size=vocab_rows,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, **rope_parameters},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def tiny_special_token_ids(ids: dict[str, int]) -> dict:
    """The vision special tokens' ids a Qwen-VL config names at its top level."""
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
