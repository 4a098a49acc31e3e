"""Who may attend to whom in a shared-prefix row, and the two attention paths that apply it.

A shared-prefix row (:func:`rlsys.grpo.sequences.build_shared_batch`) is a prompt followed by the
answers of its group. Each token carries a segment: ``PROMPT`` (0) for the prompt, ``k >= 1`` for
the k-th answer, ``PAD`` (-1) for padding. One rule, :func:`may_attend`, says what a query may see:
keys at or before it that are in the prompt or in its own segment. So the prompt is causal, every
answer sees the whole prompt and its own earlier tokens and never another answer, and padding sees
the prompt and earlier padding (never read; no row is empty, so no softmax of nothing).

Two paths apply the rule (``learner.shared_prefix_attention``):

- ``dense_mask``: SDPA with an additive ``[S, 1, L, L]`` mask. Runs everywhere (the CPU path);
  its cost is the mask itself, ``L^2`` per row, and attention computed over masked-out blocks.
- ``flex``: torch's FlexAttention with a block mask built from the same rule. Blocks wholly
  masked out (an answer's queries against another answer's keys, the prompt's queries against
  any answer) are skipped, and the mask is ``(L / 128)^2`` block entries per row, so the cost
  follows the tokens that attend, not the row's square. The GPU path: torch 2.13's FlexAttention
  has no CPU backward (the forward runs on CPU, unfused, which the tests use to check it).

Transformers 5.19 refuses ``flex_attention`` for Qwen2.5-VL's text model, so the flex path is a
registered attention function (``ATTENTION_NAME``) set on the language model only (the vision
tower keeps its own). It takes a :class:`BlockMask` to FlexAttention and any other mask to SDPA,
so a model switched to it still runs the one-sequence-per-answer path unchanged.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PROMPT = 0
PAD = -1
ATTENTION_NAME = "rlsys_shared_prefix"
PATHS = ("dense_mask", "flex")


def may_attend(seg_q, seg_kv, q, kv):
    """The rule, elementwise (tensors or FlexAttention's index scalars): key ``kv`` is visible to
    query ``q`` when it is not after it and lies in the prompt or in the query's own segment."""
    return (kv <= q) & ((seg_kv == PROMPT) | (seg_kv == seg_q))


def dense_allowed(segments: torch.Tensor) -> torch.Tensor:
    """``[S, L, L]`` bool: query i of row r may attend to key j (the rule over every pair)."""
    L = segments.shape[-1]
    idx = torch.arange(L, device=segments.device)
    return may_attend(segments[:, :, None], segments[:, None, :], idx[:, None], idx[None, :])


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[S, 1, L, L]`` additive mask for SDPA: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def block_mask(segments: torch.Tensor, device) -> BlockMask:
    """FlexAttention's block mask of the rule over ``segments`` ``[S, L]``."""
    seg = segments.to(device)
    S, L = seg.shape

    def mask_mod(b, h, q, kv):
        return may_attend(seg[b, q], seg[b, kv], q, kv)

    return create_block_mask(mask_mod, S, None, L, L, device=device)


_compiled = None


def _flex(query, key, value, **kwargs):
    """FlexAttention, compiled on GPUs (its fused kernel; compiled once per process), eager
    elsewhere (unfused, forward only: enough to check the path on CPU)."""
    global _compiled
    if query.device.type != "cuda":
        return flex_attention(query, key, value, **kwargs)
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled(query, key, value, **kwargs)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: FlexAttention for a block mask, SDPA for anything else.
    ``query`` ``[B, H, L, D]``, ``key``/``value`` ``[B, H_kv, L, D]``; returns ``[B, L, H, D]``."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if dropout and module.training:
        raise ValueError(f"shared_prefix_attention flex: attention dropout {dropout} is not applied by this path")
    out = _flex(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _attention)


def use_block_masks(model) -> None:
    """Switch ``model``'s language model to the registered function (its vision tower unchanged)."""
    model.set_attn_implementation({"text_config": ATTENTION_NAME})


def resolve(choice: str, cuda: bool) -> str:
    """The path for ``learner.shared_prefix_attention``: ``auto`` is flex on CUDA, the dense mask
    elsewhere; flex without CUDA is refused (no CPU backward)."""
    if choice == "auto":
        return "flex" if cuda else "dense_mask"
    if choice not in PATHS:
        raise ValueError(f"shared_prefix_attention must be auto or one of {PATHS}, got {choice!r}")
    if choice == "flex" and not cuda:
        raise ValueError(
            "learner.shared_prefix_attention flex needs the learner on CUDA GPUs (torch's FlexAttention "
            "has no CPU backward); use auto or dense_mask"
        )
    return choice
