"""SFT answer-token loss: plain cross-entropy and Gaussian soft targets on coordinate tokens."""

import math

import pytest
import torch

from rlsys.sft.losses import answer_token_loss, coordinate_target_distribution


def test_target_distribution_hand_worked():
    # 5 bins, centre 2, sigma 1: weights exp(-2), exp(-0.5), 1, exp(-0.5), exp(-2)
    q = coordinate_target_distribution(torch.tensor([2]), 5, 1.0)[0]
    w = torch.tensor([math.exp(-2), math.exp(-0.5), 1.0, math.exp(-0.5), math.exp(-2)])
    assert torch.allclose(q, w / w.sum(), atol=1e-7)
    # at the edge the mass stays inside: centre 0 -> weights 1, e^-0.5, e^-2, e^-4.5, e^-8
    q0 = coordinate_target_distribution(torch.tensor([0]), 5, 1.0)[0]
    w0 = torch.tensor([1.0, math.exp(-0.5), math.exp(-2), math.exp(-4.5), math.exp(-8)])
    assert torch.allclose(q0, w0 / w0.sum(), atol=1e-7)
    assert q0.sum().item() == pytest.approx(1.0)


def test_plain_cross_entropy_matches_torch_and_ignores_masked_nan():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    logits[0, 2] = float("nan")  # a padded position: must not reach the loss
    per_tok, n = answer_token_loss(logits, targets, mask)
    ref = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="none")
    assert n.item() == 4
    assert torch.allclose(per_tok[mask], ref)
    assert torch.all(per_tok[~mask] == 0)


def test_soft_targets_hand_worked():
    # vocabulary of 6: ids 0,1 are text; ids 2..5 are the coordinate bins <0>..<3>
    coord_ids = torch.tensor([2, 3, 4, 5])
    logits = torch.tensor([[[0.0, 0.0, 1.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    targets = torch.tensor([[3, 0]])  # a coordinate token (bin 1), then a text token
    mask = torch.tensor([[True, True]])
    per_tok, _ = answer_token_loss(logits, targets, mask, coord_ids, sigma_bins=1.0)
    logp = torch.log_softmax(logits[0, 0], -1)
    w = torch.tensor([math.exp(-0.5), 1.0, math.exp(-0.5), math.exp(-2)])
    q = w / w.sum()
    expect = -(q * logp[2:]).sum()
    assert per_tok[0, 0].item() == pytest.approx(expect.item(), rel=1e-6)
    # the text token keeps its one-hot cross-entropy
    assert per_tok[0, 1].item() == pytest.approx(-torch.log_softmax(logits[0, 1], -1)[0].item(), rel=1e-6)


def test_soft_targets_tend_to_one_hot_and_match_a_loop():
    torch.manual_seed(1)
    V, coord_ids = 30, torch.arange(10, 30)  # 20 bins
    logits = torch.randn(3, 5, V, requires_grad=True)
    targets = torch.randint(0, V, (3, 5))
    mask = torch.rand(3, 5) > 0.3
    tiny, _ = answer_token_loss(logits, targets, mask, coord_ids, sigma_bins=1e-3)
    hard, _ = answer_token_loss(logits, targets, mask, None, 0.0)
    assert torch.allclose(tiny, hard, atol=1e-5)
    soft, _ = answer_token_loss(logits, targets, mask, coord_ids, sigma_bins=2.5)
    for b in range(3):
        for t in range(5):
            if not mask[b, t]:
                assert soft[b, t].item() == 0
                continue
            lp = torch.log_softmax(logits[b, t], -1)
            tok = int(targets[b, t])
            if tok >= 10:
                k = tok - 10
                w = torch.tensor([math.exp(-0.5 * ((j - k) / 2.5) ** 2) for j in range(20)])
                ref = -((w / w.sum()) * lp[10:]).sum()
            else:
                ref = -lp[tok]
            assert soft[b, t].item() == pytest.approx(ref.item(), rel=1e-5)
    soft.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_soft_targets_reward_near_misses():
    """The point of soft targets: a prediction one bin off costs less than one far off."""
    coord_ids = torch.arange(100)
    targets = torch.tensor([[50]])
    mask = torch.tensor([[True]])
    near = torch.full((1, 1, 100), -10.0)
    near[0, 0, 51] = 10.0
    far = torch.full((1, 1, 100), -10.0)
    far[0, 0, 90] = 10.0
    ln, _ = answer_token_loss(near, targets, mask, coord_ids, sigma_bins=3.0)
    lf, _ = answer_token_loss(far, targets, mask, coord_ids, sigma_bins=3.0)
    assert ln.item() < lf.item()
    hn, _ = answer_token_loss(near, targets, mask)
    hf, _ = answer_token_loss(far, targets, mask)
    assert hn.item() == pytest.approx(hf.item())  # one-hot CE cannot tell them apart


def test_bad_arguments_are_named():
    x = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        answer_token_loss(x, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="coord_token_ids"):
        answer_token_loss(x, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), None, 1.0)
    with pytest.raises(ValueError, match="sigma_bins"):
        answer_token_loss(x, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), None, -1.0)
