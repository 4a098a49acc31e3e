"""The GRPO math: group-relative advantages, the clipped surrogate with a k3 KL penalty, and the
statistics that dynamic sampling filters on.

Pure torch, tensor in and tensor out, so that it is tested on CPU in milliseconds and the
trainer (DeepSpeed ranks under Ray) only gathers log-probs and calls it.

Layout conventions used throughout:

* rewards ``[B]`` come as consecutive groups of ``group_size`` completions of one prompt
  (``B = num_groups * group_size``), the order the rollout workers emit them in;
* token tensors ``[B, T]`` are per-token log-probs of the sampled completion tokens, with a
  ``mask`` ``[B, T]`` (bool or 0/1) marking the completion tokens that count.

Masked positions must never reach the loss or its gradient, even when they hold padding garbage
(inf or nan log-probs): they are replaced with ``torch.where`` *before* any arithmetic, because
``0 * nan`` is nan and ``torch.where`` on the output alone still lets nan into the backward pass.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "group_advantages",
    "group_reward_std",
    "kl_k3",
    "policy_loss",
    "behaviour_weights",
    "masked_mean",
]


# ----------------------------------------------------------------------------- group statistics


def _grouped(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate ``rewards`` ``[B]`` and return ``(r [n, G], mean [n, 1], std [n, 1], valid [n, G])``.

    ``std`` is ``torch.std`` (unbiased), except that a group whose rewards are all equal gets
    exactly 0: the float mean of equal values can differ from them by an ulp, which would leave
    a tiny non-zero std and let such a group slip past a ``std > 0`` filter.

    ``valid`` ``[B]`` (bool, default all True) leaves samples out of their group's statistics:
    a sample whose reward could not be computed (the scorer failed twice) would otherwise
    enter the mean and std as a 0 and shift every advantage of its group. The mean and std
    are then over the valid members only (std 0 with fewer than 2 of them).
    """
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        # The unbiased std divides by n - 1; a group of one has no spread to compare against.
        raise ValueError(f"group_size must be >= 2 (unbiased std needs 2 samples), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"number of rewards ({rewards.numel()}) is not divisible by group_size ({group_size})")
    if valid is None:
        valid = torch.ones(rewards.shape, dtype=torch.bool)
    elif valid.shape != rewards.shape:
        raise ValueError(f"valid must have the rewards' shape {tuple(rewards.shape)}, got {tuple(valid.shape)}")
    v = valid.bool().reshape(-1, group_size)
    r = rewards if rewards.is_floating_point() else rewards.float()
    # an invalid sample's reward is never read (it may be anything, nan included)
    r = torch.where(valid.bool(), r, torch.zeros_like(r))
    if not bool(torch.isfinite(r).all()):
        # One nan reward would silently poison its whole group's advantages.
        raise ValueError("rewards must be finite (got nan or inf)")
    r = r.reshape(-1, group_size)
    if bool(v.all()):
        mean = r.mean(dim=1, keepdim=True)
        std = r.std(dim=1, keepdim=True)  # correction=1
        constant = (r == r[:, :1]).all(dim=1, keepdim=True)
    else:
        n = v.sum(dim=1, keepdim=True)
        mean = torch.where(v, r, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)
        var = torch.where(v, (r - mean) ** 2, 0.0).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        std = var.sqrt()
        # equal valid rewards (or fewer than 2): exactly 0, as above
        first = torch.where(v, r, float("inf")).min(dim=1, keepdim=True).values
        constant = (torch.where(v, r == first, True)).all(dim=1, keepdim=True) | (n < 2)
    std = torch.where(constant, torch.zeros_like(std), std)
    return r, mean, std, v


def group_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-6, valid: Tensor | None = None, scale: str = "group_std"
) -> Tensor:
    """GRPO advantages ``(r - group mean) / (group std + eps)``, shape ``[B]``.

    ``rewards`` ``[B]``: consecutive groups of ``group_size`` samples of one prompt. The std is
    unbiased (``torch.std``, correction=1), as in DeepSeekMath's GRPO. ``eps`` only guards the
    division for near-constant groups; a group whose rewards are all equal gets advantage
    exactly 0 (not ``0 / eps`` noise), so it contributes no policy gradient, only KL.
    ``valid`` (see :func:`_grouped`): invalid samples get advantage 0 and are not in the group
    statistics; the caller also leaves them out of the loss.

    ``scale="none"`` (Dr. GRPO, Liu et al. 2025): ``r - group mean`` without the division. With
    continuous rewards the division is what turns a near-constant group (eight answers whose IoUs
    differ in the third decimal) into advantages of +-1, as large as a group where half the
    answers found the object: noise gets the weight of signal.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if scale not in ("group_std", "none"):
        raise ValueError(f"scale must be 'group_std' or 'none', got {scale!r}")
    r, mean, std, v = _grouped(rewards, group_size, valid)
    centred = (r - mean) / (std + eps) if scale == "group_std" else r - mean
    adv = torch.where((std > 0) & v, centred, torch.zeros_like(r))
    return adv.reshape(-1)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based) under a linear warm-up of
    ``warmup_steps`` steps, then constant: ``(step + 1) / warmup_steps`` up to 1. The first
    update of a GRPO run moves the SFT model with Adam's full first step (its normalised update
    is ~lr per weight whatever the gradient's size); the warm-up lets the moment estimates settle first."""
    if warmup_steps < 0 or step < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step}, {warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def group_reward_std(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """Unbiased std of each group's rewards, shape ``[num_groups]``; exactly 0 for equal rewards.

    This is the quantity dynamic sampling looks at: a group's policy gradient is proportional
    to its spread, not its level.
    """
    return _grouped(rewards, group_size, valid)[2].reshape(-1)


# ----------------------------------------------------------------------------- token-level terms


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || ref): ``exp(d) - d - 1`` with ``d = ref - logp``.

    Schulman's k3 (http://joschu.net/blog/kl-approx.html) is unbiased for samples drawn from
    the policy, has low variance and is >= 0 for every token, unlike ``-d`` (k1). Written as
    ``expm1(d) - d`` so that it keeps precision when ``d`` is small, which it almost always is;
    clamped at 0 so rounding can never make it negative. Same shape in and out.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"logp and ref_logp must have the same shape, got {tuple(logp.shape)} and {tuple(ref_logp.shape)}"
        )
    d = ref_logp - logp
    return (torch.expm1(d) - d).clamp_min(0.0)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is true (bool or 0/1, same shape as ``x``).

    Masked entries are dropped with ``torch.where`` so nan/inf there cannot leak; an empty mask
    gives 0 rather than nan (the denominator is clamped at 1).
    """
    if x.shape != mask.shape:
        raise ValueError(f"x and mask must have the same shape, got {tuple(x.shape)} and {tuple(mask.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    total = torch.where(m, x, torch.zeros_like(x))
    count = m.sum() if dim is None else m.sum(dim=dim)
    total = total.sum() if dim is None else total.sum(dim=dim)
    return total / count.clamp_min(1).to(total.dtype)


# ----------------------------------------------------------------------------- the loss


def _check_token_shapes(logp, old_logp, ref_logp, advantages, mask, behaviour_logp=None) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("behaviour_logp", behaviour_logp)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of logp {shape}, got {tuple(t.shape)}")
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"advantages must be [B] = ({shape[0]},), got {tuple(advantages.shape)}")


def behaviour_weights(old_logp: Tensor, behaviour_logp: Tensor, mask: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """Truncated importance weights ``min(exp(old - behaviour), cap)`` per token, and whether
    each was truncated; both ``[B, T]``, detached.

    ``behaviour_logp`` are the log-probs the rollout engine reported for the tokens it sampled
    (the behaviour policy, possibly some weight versions behind), ``old_logp`` the proximal
    policy's (here: the learner's weights before this update). A token whose behaviour log-prob
    is missing (nan) or masked gets weight 1. Truncation at ``cap`` bounds the variance a token
    the behaviour policy found unlikely would otherwise bring (AReaL caps these weights, verl and
    slime's truncated importance sampling uses the same ``min(w, C)``).
    """
    if not cap >= 1.0:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    m = (mask if mask.dtype == torch.bool else mask != 0) & torch.isfinite(behaviour_logp)
    dtype = torch.promote_types(old_logp.dtype, torch.float32)
    d = torch.where(
        m,
        old_logp.detach().to(dtype) - behaviour_logp.detach().to(dtype),
        torch.zeros((), dtype=dtype, device=old_logp.device),
    )
    w = torch.exp(d)
    return w.clamp(max=cap), w > cap


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.01,
    num_tokens: Union[int, float, Tensor, None] = None,
    behaviour_logp: Optional[Tensor] = None,
    is_cap: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss: clipped surrogate plus ``kl_coef`` * k3, averaged over tokens.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask`` ``[B, T]``; ``advantages`` ``[B]``
    (one per completion, shared by its tokens). Per unmasked token::

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clamp(ratio, 1 - clip_low, 1 + clip_high) * A)
                + kl_coef * k3(logp, ref_logp)

    Only ``logp`` carries gradient: ``old_logp``, ``ref_logp`` and ``advantages`` are detached,
    they are constants of the objective. Separate ``clip_low``/``clip_high`` allow DAPO's
    clip-higher. ``ref_logp`` may be None when ``kl_coef == 0`` (no reference model).

    Off-policy correction (``behaviour_logp`` given): the decoupled objective of AReaL
    (Fu et al., 2025). The answers were sampled by a behaviour policy (the engines' weights, up
    to ``run.max_staleness_steps`` versions behind, or numerically different from the learner);
    ``old_logp`` is the proximal policy the update is clipped around. Per token::

        w    = min(exp(old_logp - behaviour_logp), is_cap)      (detached)
        loss = -w * min(ratio * A, clamp(ratio, 1 - clip_low, 1 + clip_high) * A) + kl term

    so the clip keeps the step near the proximal policy and ``w`` corrects for where the samples
    came from; the KL term is not weighted (it is a penalty on the current policy, not an
    expectation over the samples). Why this and not plain truncated IS (``ratio`` taken against
    the behaviour policy directly, as verl's and slime's TIS): with stale samples that ratio is
    far from 1 before the update starts and the clip would zero the gradient of most tokens,
    while here the clip only acts on how far this update moves. With one optimizer step per
    batch the proximal policy is the learner's weights before the step, i.e. the training
    forward's own detached log-probs, so the correction costs no extra forward. Without
    ``behaviour_logp`` the loss is exactly the on-policy one above.

    The token sum is divided by ``num_tokens``, the GLOBAL count of unmasked tokens across all
    micro-batches and data-parallel ranks (token-level averaging, as DAPO, rather than a mean of
    per-sequence means that would up-weight short completions). With it, the micro-batch losses
    sum to the full-batch loss and gradient accumulation needs no rescaling. ``None`` means this
    call's ``mask.sum()``. The denominator is clamped at 1, so a batch with no unmasked tokens
    gives loss 0 with its graph intact instead of nan.

    Computation is in at least float32 (bf16 log-prob differences lose the ratio's precision).

    Returns ``(loss, metrics)``; metrics are detached 0-d tensors (no host sync here):

    * ``pg_loss``: the surrogate part of ``loss``, same normalisation, so it sums over
      micro-batches like ``loss``;
    * ``kl``: mean k3 over this call's unmasked tokens (computed whenever ``ref_logp`` is
      given, even with ``kl_coef == 0``; 0 without it);
    * ``clip_fraction``: fraction of unmasked tokens where the clipped term was strictly
      smaller, i.e. the clip changed the objective (and zeroed the token's gradient);
    * ``ratio_mean``, ``ratio_max``: over unmasked tokens (0 when there are none);
    * ``num_tokens``: this call's unmasked token count, the weight for averaging the
      per-call means above across micro-batches;
    * with ``behaviour_logp``: ``behaviour_ratio_mean`` / ``behaviour_ratio_max`` (the
      importance weights before truncation) and ``is_truncated_fraction``.
    """
    _check_token_shapes(logp, old_logp, ref_logp, advantages, mask, behaviour_logp)
    if not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low must be in [0, 1], got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if kl_coef < 0.0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp is None but kl_coef = {kl_coef}; pass ref_logp or set kl_coef=0")

    m = mask if mask.dtype == torch.bool else mask != 0
    dtype = torch.promote_types(logp.dtype, torch.float32)

    def clean(t: Tensor) -> Tensor:
        # Masked garbage -> 0 before any arithmetic: every masked term is then exactly 0 and
        # its backward never multiplies by inf/nan.
        return torch.where(m, t.to(dtype), torch.zeros((), dtype=dtype, device=t.device))

    lp = clean(logp)
    old = clean(old_logp.detach())
    adv = clean(advantages.detach()[:, None].expand_as(logp))

    ratio = torch.exp(lp - old)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    pg_tok = -torch.minimum(unclipped, clipped)
    if behaviour_logp is not None:
        w, truncated = behaviour_weights(old, behaviour_logp, m, is_cap)
        pg_tok = w * pg_tok

    k3 = kl_k3(lp, clean(ref_logp.detach())) if ref_logp is not None else None
    tok = pg_tok + kl_coef * k3 if (k3 is not None and kl_coef != 0.0) else pg_tok

    local_count = m.sum()
    if num_tokens is None:
        denom = local_count.clamp_min(1).to(dtype)
    elif isinstance(num_tokens, Tensor):
        denom = num_tokens.detach().to(dtype=dtype, device=logp.device).clamp_min(1)
    else:
        if not math.isfinite(num_tokens) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a finite count >= 0, got {num_tokens}")
        denom = torch.tensor(max(float(num_tokens), 1.0), dtype=dtype, device=logp.device)

    zero = torch.zeros((), dtype=dtype, device=logp.device)
    loss = torch.where(m, tok, zero).sum() / denom

    with torch.no_grad():
        r = ratio.detach()
        metrics = {
            "pg_loss": torch.where(m, pg_tok.detach(), zero).sum() / denom,
            "kl": masked_mean(k3.detach(), m) if k3 is not None else zero.clone(),
            "clip_fraction": masked_mean((clipped < unclipped).to(dtype), m),
            "ratio_mean": masked_mean(r, m),
            # Ratios are > 0, so a 0 fill never wins the max and an empty mask gives 0.
            "ratio_max": torch.where(m, r, zero).max() if r.numel() else zero.clone(),
            "num_tokens": local_count.to(dtype),
        }
        if behaviour_logp is not None:
            raw = torch.exp(
                torch.where(m & torch.isfinite(behaviour_logp), old - behaviour_logp.detach().to(dtype), zero)
            )
            metrics["behaviour_ratio_mean"] = masked_mean(raw, m)
            metrics["behaviour_ratio_max"] = torch.where(m, raw, zero).max() if raw.numel() else zero.clone()
            metrics["is_truncated_fraction"] = masked_mean(truncated.to(dtype), m)
    return loss, metrics
