"""Models: the families rlsys knows, the tiny random-weight models built here, real checkpoints.

- ``family.py``, ``families.py``: what differs between model families (:class:`Family`), one
  file per family (``qwen2_5_vl.py``, ``qwen3_vl.py``), read from a checkpoint's ``model_type``.
- ``tiny.py``, ``tokenizers.py``: :func:`build_tiny_model` writes a complete Hugging Face
  directory (config, safetensors weights, tokenizer, processors, chat template) of a family,
  small enough to train and sample on 2 CPU cores; nothing is downloaded.
- ``checkpoints.py``: real checkpoints' token layout (checked, repaired, the coordinate tokens
  added or mapped: :func:`prepare_checkpoint`) and the one loader of processors and models.

``python -m rlsys.models tiny|prepare`` runs the two builders.
"""

from rlsys.models.checkpoints import (
    CONFIG_TOKEN_KEYS,
    TokenLayoutError,
    check_token_layout,
    coordinate_token_ids,
    declared_token_ids,
    load_model,
    load_processor,
    map_last_ids,
    param_part,
    place_added_tokens,
    prepare_checkpoint,
    processor_for,
    repair_declared_ids,
    token_ids,
    token_layout_problems,
)
from rlsys.models.families import FAMILIES, check_vocabulary_frame, family_named, family_of
from rlsys.models.family import Family
from rlsys.models.tiny import TinySpec, build_tiny_model, ensure_tiny_model, qwen2_5_vl_3b_shaped, qwen3_vl_4b_shaped
from rlsys.models.tokenizers import (
    CHAT_TEMPLATE,
    QWEN2_5_VL_ADDED_TOKENS,
    QWEN2_5_VL_BPE_ENTRIES,
    QWEN2_5_VL_VOCAB_ROWS,
    QWEN3_VL_ADDED_TOKENS,
    QWEN_SPECIAL_TOKENS,
    build_qwen_layout_tokenizer,
    build_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "CONFIG_TOKEN_KEYS",
    "FAMILIES",
    "QWEN2_5_VL_ADDED_TOKENS",
    "QWEN2_5_VL_BPE_ENTRIES",
    "QWEN2_5_VL_VOCAB_ROWS",
    "QWEN3_VL_ADDED_TOKENS",
    "QWEN_SPECIAL_TOKENS",
    "Family",
    "TinySpec",
    "TokenLayoutError",
    "build_qwen_layout_tokenizer",
    "build_tiny_model",
    "build_tokenizer",
    "check_token_layout",
    "check_vocabulary_frame",
    "coordinate_token_ids",
    "declared_token_ids",
    "ensure_tiny_model",
    "family_named",
    "family_of",
    "load_model",
    "load_processor",
    "map_last_ids",
    "param_part",
    "place_added_tokens",
    "prepare_checkpoint",
    "processor_for",
    "qwen2_5_vl_3b_shaped",
    "qwen3_vl_4b_shaped",
    "repair_declared_ids",
    "token_ids",
    "token_layout_problems",
]
