"""SFT loss on answer tokens, with optional soft targets for coordinate tokens.

Pure torch (no Ray, vLLM or DeepSpeed), so it is tested against hand-worked values and a loop.

Why soft targets: plain cross-entropy treats the 1,000 coordinate bins as unrelated classes, so
a prediction one bin off is punished as hard as one 900 bins off, and each bin learns only from
the examples that hit it exactly. A model that has seen billions of tokens (the paper's setting)
does not care; a small model trained on a few thousand images does: its coordinate output stays
close to uniform and greedy decoding returns noise. Spreading each coordinate target over its
neighbours with a Gaussian (as SimCC does for keypoint coordinates) makes every example teach its
neighbourhood and the output smooth in the bin index. ``sigma_bins = 0`` is plain cross-entropy.
"""

from __future__ import annotations

import torch


def coordinate_target_distribution(bins: torch.Tensor, num_bins: int, sigma_bins: float) -> torch.Tensor:
    """``(N, num_bins)`` rows: a Gaussian over bin indices centred on each of ``bins`` (N,),
    normalised to sum to 1 within the bins (the mass a Gaussian would put past either end is
    given to the bins inside, so an edge coordinate keeps all of its target mass)."""
    grid = torch.arange(num_bins, dtype=torch.float32, device=bins.device)
    q = torch.exp(-0.5 * ((grid[None, :] - bins.float()[:, None]) / sigma_bins) ** 2)
    return q / q.sum(-1, keepdim=True)


def answer_token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    coord_token_ids: torch.Tensor | None = None,
    sigma_bins: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss ``(B, T)`` (zero where ``mask`` is False) and the count of answer tokens.

    ``logits`` (B, T, V) predict ``targets`` (B, T). ``coord_token_ids`` (1000,) are the ids of
    ``<0>``..``<999>`` in bin order; with ``sigma_bins > 0`` a target that is a coordinate token
    gets the cross-entropy against a Gaussian over the coordinate bins instead of a one-hot.
    The softmax stays over the whole vocabulary, so probability on non-coordinate tokens at a
    coordinate position is still penalised.
    """
    if logits.shape[:2] != targets.shape or targets.shape != mask.shape:
        raise ValueError(
            f"shapes differ: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, mask {tuple(mask.shape)}"
        )
    if sigma_bins < 0:
        raise ValueError(f"sigma_bins must be >= 0, got {sigma_bins}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if sigma_bins > 0:
        if coord_token_ids is None:
            raise ValueError("sigma_bins > 0 needs coord_token_ids")
        coord_ids = coord_token_ids.to(targets.device)
        # bin index of each target, -1 where the target is not a coordinate token
        lookup = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=targets.device)
        lookup[coord_ids] = torch.arange(coord_ids.numel(), device=targets.device)
        bins = lookup[targets]
        is_coord = (bins >= 0) & mask
        if is_coord.any():
            q = coordinate_target_distribution(bins[is_coord], coord_ids.numel(), sigma_bins)
            soft = -(q * logp[is_coord][:, coord_ids]).sum(-1)
            nll = nll.masked_scatter(is_coord, soft)
    n_tokens = mask.sum()
    # torch.where, not multiplication: a NaN or inf in a padded position must not leak
    return torch.where(mask, nll, torch.zeros_like(nll)), n_tokens
