"""The built random-weight models: small enough to train and sample on 2 CPU cores, in a model
family's real architecture (:mod:`rlsys.models.families`), so the code paths that run here are
the ones that run on a real checkpoint. transformers and vLLM load the directory unchanged."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from rlsys.models.families import family_named
from rlsys.models.tokenizers import (
    CHAT_TEMPLATE,
    QWEN2_5_VL_VOCAB_ROWS,
    QWEN_LAYOUTS,
    QWEN_SPECIAL_TOKENS,
    build_qwen_layout_tokenizer,
    build_tokenizer,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a built random-weight model. head_dim = hidden_size / num_heads must be at least
    64: vLLM's CPU attention rejects smaller heads (GUIDE section 2).

    ``tokenizer_layout="tiny"``: a small BPE trained here with Qwen's special tokens and the
    coordinate tokens after it. ``"qwen2_5_vl"``: Qwen2.5-VL's real id layout (151,643 BPE
    entries, its 22 added tokens at their ids, ``vocab_rows`` embedding rows) and no coordinate
    tokens, as a base checkpoint has none: :func:`prepare_checkpoint` adds or maps them.
    """

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 384
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 1
    vision_intermediate_size: int = 128
    bpe_vocab_size: int = 1024
    # Image budget: 28 px per merged token, so 224x224 -> 8x8 = 64 image tokens.
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224
    max_position_embeddings: int = 4096
    rope_theta: float = 1000000.0
    # Qwen2.5-VL-3B ties lm_head to the input embedding (7B does not); a tied tiny model checks
    # that weight sync and checkpoints handle one tensor under two names
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size / num_heads (Qwen3-VL-4B: 128 x 32 heads over 2560)
    tokenizer_layout: str = "tiny"
    # the architecture (rlsys.models.families): qwen2_5_vl or qwen3_vl
    family: str = "qwen2_5_vl"
    vocab_rows: int | None = None  # None: the tokenizer's length rounded up to 64
    seed: int = 0

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


def qwen3_vl_4b_shaped(num_layers: int = 1, vision_depth: int = 2, **kw) -> TinySpec:
    """Qwen3-VL-4B-Instruct's shapes (its public config: LLM 2560 wide, 32 heads of 128 over 8 KV
    heads, MLP 9728, 151,936 vocabulary rows, tied embeddings, rope theta 5e6; vision 1024 wide,
    16 heads, MLP 4096, patch 16, merger to 2560) and Qwen3's tokenizer layout (26 added tokens),
    with the layer counts cut (36 LLM layers and 24 vision blocks in the real model, DeepStack from
    blocks 5, 11, 17 here from the first ones) so it loads on a CPU."""
    return TinySpec(
        family="qwen3_vl",
        hidden_size=2560,
        num_layers=num_layers,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=9728,
        vision_hidden_size=1024,
        vision_depth=vision_depth,
        vision_heads=16,
        vision_intermediate_size=4096,
        tie_word_embeddings=True,
        tokenizer_layout="qwen3_vl",
        vocab_rows=QWEN2_5_VL_VOCAB_ROWS,
        max_position_embeddings=262144,
        rope_theta=5000000.0,
        **kw,
    )


def qwen2_5_vl_3b_shaped(num_layers: int = 2, vision_depth: int = 2, **kw) -> TinySpec:
    """Qwen2.5-VL-3B-Instruct's shapes (GUIDE section 2: LLM 2048 wide, 16 heads, 2 KV heads,
    MLP 11008, 151,936 vocabulary rows, tied embeddings; vision 1280 wide, 16 heads, MLP 3420,
    window attention with the last block full, merger to 2048) and its tokenizer layout, with
    the layer counts cut (36 and 32 in the real model) so it trains on a CPU."""
    return TinySpec(
        hidden_size=2048,
        num_layers=num_layers,
        num_heads=16,
        num_kv_heads=2,
        intermediate_size=11008,
        vision_hidden_size=1280,
        vision_depth=vision_depth,
        vision_heads=16,
        vision_intermediate_size=3420,
        tie_word_embeddings=True,
        tokenizer_layout="qwen2_5_vl",
        vocab_rows=QWEN2_5_VL_VOCAB_ROWS,
        max_position_embeddings=128000,
        **kw,
    )


def build_tiny_model(out_dir, spec: TinySpec = TinySpec(), *, overwrite: bool = False) -> Path:
    """Write a random-weight model of ``spec.family`` to ``out_dir`` and return its path.

    The directory is written to a temporary sibling and renamed into place, so a crash never
    leaves a half-written model that a later run would try to load.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    family = family_named(spec.family)
    out = Path(out_dir)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
        shutil.rmtree(out)
    if spec.head_dim is None and spec.hidden_size % spec.num_heads:
        raise ValueError(f"hidden_size {spec.hidden_size} is not a multiple of num_heads {spec.num_heads}")
    if spec.attention_head_dim < 64:
        raise ValueError(f"head_dim must be at least 64 for vLLM's CPU attention, got {spec.attention_head_dim}")
    if spec.tokenizer_layout not in ("tiny", *QWEN_LAYOUTS):
        raise ValueError(
            f"tokenizer_layout must be one of tiny, {', '.join(QWEN_LAYOUTS)}; got {spec.tokenizer_layout!r}"
        )

    tokenizer = build_tokenizer(spec) if spec.tokenizer_layout == "tiny" else build_qwen_layout_tokenizer(spec)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = spec.vocab_rows or (len(tokenizer) + 63) // 64 * 64  # padded, as real checkpoints are
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_rows {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    config = family.tiny_config(spec, ids, vocab_size)
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    torch.manual_seed(spec.seed)
    model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
    processor = family.tiny_processor(spec, tokenizer, CHAT_TEMPLATE)

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    (tmp / "rlsys_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    tmp.rename(out)
    log.info("wrote tiny %s (%d parameters) to %s", family.title, sum(p.numel() for p in model.parameters()), out)
    return out


def ensure_tiny_model(out_dir, spec: TinySpec = TinySpec()) -> Path:
    """Build the tiny model once; later calls reuse the directory if it is complete."""
    out = Path(out_dir)
    spec_file = out / "rlsys_tiny_spec.json"
    if (out / "config.json").is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == asdict(spec):
        return out
    return build_tiny_model(out, spec, overwrite=True)


# ---------------------------------------------------------------------------------------------
# Real checkpoints
