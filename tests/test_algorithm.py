"""Tests for rlsys.grpo.algorithm: hand-worked values (arithmetic in the comments), a slow loop
reference on random inputs, micro-batch additivity, masking and input validation."""

import math

import pytest
import torch

from rlsys.grpo.algorithm import (
    group_advantages,
    group_reward_std,
    kl_k3,
    masked_mean,
    policy_loss,
    warmup_factor,
)

E = math.e


# ----------------------------------------------------------------------------- slow reference


def ref_advantages(rewards, group_size, eps=1e-6):
    out = []
    for g in range(0, len(rewards), group_size):
        grp = [float(x) for x in rewards[g : g + group_size]]
        mean = sum(grp) / len(grp)
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (len(grp) - 1))
        out += [0.0 if std == 0 else (x - mean) / (std + eps) for x in grp]
    return out


def ref_policy_loss(logp, old, ref, adv, mask, clip_low, clip_high, kl_coef, num_tokens=None):
    """Token-by-token loop; returns (loss, pg_loss, kl mean, clip fraction)."""
    total = pg = kl = 0.0
    n = clipped = 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            a = adv[b]
            unclipped_obj = ratio * a
            clipped_obj = min(max(ratio, 1 - clip_low), 1 + clip_high) * a
            surrogate = -min(unclipped_obj, clipped_obj)
            d = ref[b][t] - logp[b][t]
            k3 = math.exp(d) - d - 1
            total += surrogate + kl_coef * k3
            pg += surrogate
            kl += k3
            n += 1
            clipped += clipped_obj < unclipped_obj
    denom = max(num_tokens if num_tokens is not None else n, 1)
    return total / denom, pg / denom, kl / max(n, 1), clipped / max(n, 1)


def random_batch(seed, B=6, T=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    # Spread log-ratios over +-0.5 so that both clip bounds are hit.
    logp = (old + (torch.rand(B, T, generator=g, dtype=dtype) - 0.5)).requires_grad_()
    ref = old + (torch.rand(B, T, generator=g, dtype=dtype) - 0.5) * 0.4
    adv = torch.randn(B, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = True  # every completion has at least one token
    return logp, old, ref, adv, mask


# ----------------------------------------------------------------------------- advantages


def test_equal_rewards_give_exactly_zero_advantage():
    # Second group is constant: its mean is 0.7 up to an ulp, std is defined as exactly 0,
    # and the advantage is exactly 0 rather than (ulp noise) / eps.
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.7, 0.7, 0.7, 0.7])
    adv = group_advantages(r, 4)
    assert torch.equal(adv[4:], torch.zeros(4))
    assert group_reward_std(r, 4)[1].item() == 0.0


def test_failed_samples_are_out_of_their_groups_statistics():
    # Group [1, 0, 0.5, (failed)]: the valid three have mean 0.5, deviations +0.5, -0.5, 0,
    # unbiased var (0.25 + 0.25 + 0) / 2 = 0.25, std 0.5; A = +1, -1, 0 and 0 for the failed one.
    # Scored as a 0 instead, the failed sample would have made the mean 0.375 and shifted all.
    # Group [0.3, (failed), 0.3, 0.9]: mean 0.5, var (0.04 + 0.04 + 0.16) / 2 = 0.12.
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.3, float("nan"), 0.3, 0.9], dtype=torch.float64)
    valid = torch.tensor([True, True, True, False, True, False, True, True])
    s2 = math.sqrt(0.12)
    want = torch.tensor([1.0, -1.0, 0.0, 0.0, -0.2 / s2, 0.0, -0.2 / s2, 0.4 / s2], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(r, 4, eps=0.0, valid=valid), want)
    torch.testing.assert_close(group_reward_std(r, 4, valid=valid), torch.tensor([0.5, s2], dtype=torch.float64))
    # one valid member, or equal valid members: no spread, advantage exactly 0
    r3 = torch.tensor([0.2, 0.0, 0.7, 0.7, 0.1])
    v3 = torch.tensor([True, False, True, True, False])
    assert torch.equal(group_advantages(r3[:2], 2, valid=v3[:2]), torch.zeros(2))
    assert group_reward_std(torch.tensor([0.7, 0.0, 0.7]), 3, valid=torch.tensor([True, False, True])).item() == 0.0
    # all valid: exactly the unmasked result
    r4 = torch.rand(24)
    assert torch.equal(group_advantages(r4, 8, valid=torch.ones(24, dtype=torch.bool)), group_advantages(r4, 8))
    with pytest.raises(ValueError, match="valid must have the rewards' shape"):
        group_advantages(r4, 8, valid=torch.ones(8, dtype=torch.bool))


def test_hand_worked_advantages():
    # Group [1, 0, 0, 1]: mean 0.5, deviations +-0.5, sum of squares 4 * 0.25 = 1,
    # unbiased var 1 / (4 - 1) = 1/3, std = sqrt(1/3) = 0.57735;
    # A = +-0.5 / 0.57735 = +-sqrt(3)/2 = +-0.866025.
    # Group [2, 0]: mean 1, std sqrt((1 + 1) / 1) = sqrt(2); A = +-1/sqrt(2) = +-0.707107.
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    h = math.sqrt(3) / 2
    want = torch.tensor([h, -h, -h, h], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(r, 4, eps=0.0), want)
    # With the default eps the denominator is sqrt(1/3) + 1e-6.
    a = group_advantages(r, 4)
    assert a[0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-6), rel=1e-12)
    r2 = torch.tensor([2.0, 0.0, 5.0, 5.0])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(group_advantages(r2, 2, eps=0.0), torch.tensor([s, -s, 0.0, 0.0]))


def test_advantages_accept_integer_rewards():
    # [1, 0] as int64: mean 0.5, std sqrt(0.5), A = +-0.5 / sqrt(0.5) = +-0.707107.
    a = group_advantages(torch.tensor([1, 0]), 2, eps=0.0)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)]))


def test_std_filters_on_spread_not_mean():
    # Groups of 3: all-0.7 (mean 0.7, no signal), [0, 0, 1] (signal), all-1 (no signal),
    # [0.7, 0.7, 0.9] (signal despite a high mean).
    r = torch.tensor([0.7, 0.7, 0.7, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.7, 0.9])
    # the controller drops groups whose std is 0 (dynamic sampling), whatever their mean
    assert (group_reward_std(r, 3) == 0).tolist() == [True, False, True, False]
    # [0, 0, 1]: mean 1/3, squares 1/9 + 1/9 + 4/9 = 2/3, var (2/3)/2 = 1/3, std 0.57735.
    assert group_reward_std(r, 3)[1].item() == pytest.approx(math.sqrt(1 / 3), rel=1e-6)
    # [0.7, 0.7, 0.9]: std = sqrt(((0.2/3)^2 * 2 + (0.4/3)^2) / 2) = 0.11547, below tol 0.2.
    assert (group_reward_std(r, 3) <= 0.2).tolist() == [True, False, True, True]
    assert (group_reward_std(torch.full((4,), 0.3), 2) == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_advantages_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(24, generator=g, dtype=torch.float64).round(decimals=1)
    r[:6] = 0.4  # one constant group
    got = group_advantages(r, 6)
    want = torch.tensor(ref_advantages(r.tolist(), 6), dtype=torch.float64)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "rewards, group_size, match",
    [
        (torch.zeros(2, 4), 4, "1-D"),
        (torch.zeros(6), 4, "not divisible"),
        (torch.zeros(4), 1, ">= 2"),
        (torch.zeros(4), 2.0, "int"),
        (torch.tensor([0.0, float("nan")]), 2, "finite"),
    ],
)
def test_group_validation(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size)


# ----------------------------------------------------------------------------- k3


def test_k3_hand_worked():
    # d = ref - logp.  d = 1: e^1 - 1 - 1 = 0.718282;  d = -1: e^-1 + 1 - 1 = 0.367879;
    # d = ln 2: 2 - ln 2 - 1 = 0.306853;  d = 0: 1 - 0 - 1 = 0.
    logp = torch.tensor([0.0, 1.0, 0.0, -0.3], dtype=torch.float64)
    ref = torch.tensor([1.0, 0.0, math.log(2), -0.3], dtype=torch.float64)
    expected = torch.tensor([E - 2, 1 / E, 1 - math.log(2), 0.0], dtype=torch.float64)
    torch.testing.assert_close(kl_k3(logp, ref), expected)


def test_k3_nonnegative_and_precise_near_zero():
    d = torch.linspace(-5, 5, 1001)
    assert (kl_k3(torch.zeros_like(d), d) >= 0).all()
    # d = 1e-4: k3 = d^2/2 + d^3/6 = 5.0001667e-9. The naive exp(d) - d - 1 in float32 gives 0
    # (exp(1e-4) rounds to within 6e-8 of 1.0001); expm1(d) - d keeps ~3 digits.
    k = kl_k3(torch.tensor([0.0]), torch.tensor([1e-4]))
    assert k.item() == pytest.approx(5.0001667e-9, rel=1e-3)


# ----------------------------------------------------------------------------- policy loss


def test_clip_boundaries_and_gradient():
    # clip_low = clip_high = 0.2, no KL, one row of 4 tokens with old_logp 0:
    #   tok 0: ratio 1.5, A +1: min(1.5, 1.2) = 1.2  -> clipped,  loss -1.2, grad 0
    #   tok 1: ratio 0.5, A +1: min(0.5, 0.8) = 0.5  -> unclipped, loss -0.5, dloss/dlogp = -0.5
    #   tok 2: ratio 0.5, A -1: min(-0.5, -0.8) = -0.8 -> clipped, loss 0.8,  grad 0
    #   tok 3: ratio 1.5, A -1: min(-1.5, -1.2) = -1.5 -> unclipped, loss 1.5, dloss/dlogp = +1.5
    # Advantages are per row, so put each token in its own row (B = 4, T = 1).
    # loss = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.6 / 4 = 0.15; clip_fraction = 2/4.
    ratios = torch.tensor([[1.5], [0.5], [0.5], [1.5]], dtype=torch.float64)
    logp = ratios.log().requires_grad_()
    old = torch.zeros(4, 1, dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss, m = policy_loss(logp, old, None, adv, mask, kl_coef=0.0)
    assert loss.item() == pytest.approx(0.15, abs=1e-12)
    assert m["pg_loss"].item() == pytest.approx(0.15, abs=1e-12)
    assert m["clip_fraction"].item() == 0.5
    assert m["ratio_mean"].item() == pytest.approx(1.0)  # (1.5 + 0.5 + 0.5 + 1.5) / 4
    assert m["ratio_max"].item() == pytest.approx(1.5)
    assert m["num_tokens"].item() == 4
    assert m["kl"].item() == 0.0
    loss.backward()
    # d/dlogp of -ratio * A = -ratio * A, divided by 4 tokens: [0, -0.5/4, 0, 1.5/4].
    want = torch.tensor([[0.0], [-0.125], [0.0], [0.375]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want)


def test_asymmetric_clip_higher():
    # clip_high 0.28 (DAPO): ratio 1.25, A +1 is inside [0.8, 1.28] -> not clipped, loss -1.25.
    # ratio 1.3 -> clipped at 1.28, loss -1.28. Mean: (-1.25 - 1.28) / 2 = -1.265.
    logp = torch.tensor([[math.log(1.25), math.log(1.3)]], dtype=torch.float64)
    adv = torch.tensor([1.0], dtype=torch.float64)
    loss, m = policy_loss(logp, torch.zeros_like(logp), None, adv, torch.ones(1, 2), clip_high=0.28, kl_coef=0.0)
    assert loss.item() == pytest.approx(-1.265, abs=1e-12)
    assert m["clip_fraction"].item() == 0.5


def test_kl_term_hand_worked():
    # One token: logp = old = 0 -> ratio 1, A = 0 -> surrogate 0.
    # ref - logp = 1 -> k3 = e - 2 = 0.718282; kl_coef 0.5 -> loss 0.359141.
    # dloss/dlogp = 0.5 * d/dlogp[exp(ref - logp) - (ref - logp) - 1] = 0.5 * (1 - e) = -0.859141.
    f64 = dict(dtype=torch.float64)
    logp = torch.zeros(1, 1, **f64, requires_grad=True)
    old, ref, adv = torch.zeros(1, 1, **f64), torch.ones(1, 1, **f64), torch.zeros(1, **f64)
    loss, m = policy_loss(logp, old, ref, adv, torch.ones(1, 1), kl_coef=0.5)
    assert loss.item() == pytest.approx(0.5 * (E - 2), abs=1e-12)
    assert m["kl"].item() == pytest.approx(E - 2, abs=1e-12)
    assert m["pg_loss"].item() == 0.0
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.5 * (1 - E), abs=1e-12)


def test_masked_positions_contribute_nothing_even_nan():
    logp, old, ref, adv, mask = random_batch(0)
    mask[2] = False  # a fully masked row
    clean_loss, clean_m = policy_loss(logp, old, ref, adv, mask)
    # Poison every masked position (and the masked row's advantage) with nan / inf.
    poisoned = torch.where(mask, logp.detach(), float("nan")).requires_grad_()
    old_p = torch.where(mask, old, float("inf"))
    ref_p = torch.where(mask, ref, -float("inf"))
    adv_p = adv.clone()
    adv_p[2] = float("nan")
    loss, m = policy_loss(poisoned, old_p, ref_p, adv_p, mask)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, clean_loss.detach(), rtol=0, atol=1e-12)
    for k in clean_m:
        torch.testing.assert_close(m[k], clean_m[k], rtol=0, atol=1e-12)
    loss.backward()
    assert torch.isfinite(poisoned.grad).all()
    assert (poisoned.grad[~mask] == 0).all()
    # The same data with the masked row removed gives the same loss (same token count).
    keep = [0, 1, 3, 4, 5]
    sub_loss, _ = policy_loss(logp[keep], old[keep], ref[keep], adv[keep], mask[keep])
    torch.testing.assert_close(sub_loss, clean_loss, rtol=0, atol=1e-12)


def test_empty_batch_gives_zero_loss_with_graph():
    logp = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, m = policy_loss(logp, logp.detach(), logp.detach(), torch.ones(2), mask)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(math.isfinite(float(v)) for v in m.values())
    assert m["ratio_max"].item() == 0.0 and m["num_tokens"].item() == 0


def test_integer_mask_and_float32_inputs():
    logp, old, ref, adv, mask = random_batch(1, dtype=torch.float32)
    a, _ = policy_loss(logp, old, ref, adv, mask)
    b, _ = policy_loss(logp, old, ref, adv, mask.long())
    assert a.dtype == torch.float32
    assert torch.equal(a, b)


def test_micro_batches_sum_to_full_batch():
    # Rows [0:1], [1:3], [3:6] of a batch with a random mask: unequal token counts.
    logp, old, ref, adv, mask = random_batch(7, dtype=torch.float32)
    full, full_m = policy_loss(logp, old, ref, adv, mask)
    (full_grad,) = torch.autograd.grad(full, logp)
    n = int(mask.sum())
    parts, counts, pg = [], [], 0.0
    for sl in (slice(0, 1), slice(1, 3), slice(3, 6)):
        loss, m = policy_loss(logp[sl], old[sl], ref[sl], adv[sl], mask[sl], num_tokens=n)
        loss.backward()  # accumulates into logp.grad like gradient accumulation does
        parts.append(loss.detach())
        counts.append(int(m["num_tokens"]))
        pg += m["pg_loss"].item()
    assert len(set(counts)) == 3 and sum(counts) == n
    assert abs(sum(parts).item() - full.item()) < 1e-6
    assert abs(pg - full_m["pg_loss"].item()) < 1e-6
    torch.testing.assert_close(logp.grad, full_grad, rtol=0, atol=1e-6)
    # num_tokens as a tensor (an all-reduced count) behaves the same.
    t_loss, _ = policy_loss(logp[:1], old[:1], ref[:1], adv[:1], mask[:1], num_tokens=torch.tensor(n))
    torch.testing.assert_close(t_loss.detach(), parts[0])


@pytest.mark.parametrize("seed", range(5))
def test_policy_loss_matches_reference(seed):
    logp, old, ref, adv, mask = random_batch(seed)
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05)
    n = int(mask.sum()) + 3 * seed  # also a num_tokens larger than the local count
    loss, m = policy_loss(logp, old, ref, adv, mask, num_tokens=n, **kw)
    lists = [t.tolist() for t in (logp, old, ref, adv, mask)]
    want = ref_policy_loss(*lists, kw["clip_low"], kw["clip_high"], kw["kl_coef"], n)
    assert loss.item() == pytest.approx(want[0], abs=1e-12)
    assert m["pg_loss"].item() == pytest.approx(want[1], abs=1e-12)
    assert m["kl"].item() == pytest.approx(want[2], abs=1e-12)
    assert m["clip_fraction"].item() == pytest.approx(want[3], abs=1e-12)
    assert 0 < want[3] < 1  # the random batch exercises both branches


def test_policy_loss_validation():
    x = torch.zeros(2, 3)
    a = torch.zeros(2)
    mask = torch.ones(2, 3)
    cases = [
        (dict(logp=torch.zeros(6)), "logp must be \\[B, T\\]"),
        (dict(old_logp=torch.zeros(2, 4)), "old_logp must have the shape"),
        (dict(ref_logp=torch.zeros(3, 3)), "ref_logp must have the shape"),
        (dict(mask=torch.ones(2, 2)), "mask must have the shape"),
        (dict(advantages=torch.zeros(2, 1)), "advantages must be \\[B\\]"),
        (dict(ref_logp=None), "ref_logp is None"),
        (dict(clip_low=1.5), "clip_low"),
        (dict(clip_high=-0.1), "clip_high"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(num_tokens=-1), "num_tokens"),
    ]
    for override, match in cases:
        kw = dict(logp=x, old_logp=x, ref_logp=x, advantages=a, mask=mask)
        kw.update(override)
        args = [kw.pop(k) for k in ("logp", "old_logp", "ref_logp", "advantages", "mask")]
        with pytest.raises(ValueError, match=match):
            policy_loss(*args, **kw)
    # ref_logp None is fine without KL.
    policy_loss(x, x, None, a, mask, kl_coef=0.0)
    with pytest.raises(ValueError, match="same shape"):
        kl_k3(torch.zeros(2), torch.zeros(3))


# ----------------------------------------------------------------------------- helpers


def test_masked_mean():
    # (1 + 3) / 2 = 2; the nan sits under the mask.
    x = torch.tensor([[1.0, float("nan")], [3.0, 5.0]])
    mask = torch.tensor([[1, 0], [1, 0]])
    assert masked_mean(x, mask).item() == 2.0
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.0, 3.0]))
    assert masked_mean(x, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        masked_mean(x, torch.ones(2))


def test_behaviour_weights_hand_worked():
    from rlsys.grpo.algorithm import behaviour_weights

    old = torch.tensor([[-1.0, -2.0, -0.5, -1.0]])
    beh = torch.tensor([[-1.5, -2.0, -3.0, float("nan")]])
    mask = torch.tensor([[True, True, True, True]])
    w, truncated = behaviour_weights(old, beh, mask, cap=2.0)
    # exp(0.5) = 1.6487 (kept), exp(0) = 1, exp(2.5) = 12.18 -> cap 2, nan (not reported) -> 1
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), 1.0, 2.0, 1.0]]))
    assert truncated.tolist() == [[False, False, True, False]]
    with pytest.raises(ValueError, match="cap must be >= 1"):
        behaviour_weights(old, beh, mask, cap=0.5)


def test_off_policy_loss_equals_the_on_policy_loss_when_the_behaviour_is_the_proximal_policy():
    # staleness 0: behaviour == old gives weights exp(0) = 1, the loss and gradient bit for bit
    torch.manual_seed(0)
    lp0 = torch.randn(3, 5) - 2
    old = lp0.detach() + 0.1 * torch.randn(3, 5)
    ref = lp0.detach() + 0.05 * torch.randn(3, 5)
    adv = torch.tensor([1.0, -0.5, 0.25])
    mask = torch.rand(3, 5) > 0.3
    grads = []
    for beh in (None, old.clone()):
        lp = lp0.clone().requires_grad_(True)
        loss, m = policy_loss(lp, old, ref, adv, mask, kl_coef=0.01, behaviour_logp=beh)
        loss.backward()
        grads.append((loss.detach(), lp.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_off_policy_loss_hand_worked():
    # one token, advantage 1, proximal = current (ratio 1, the clip inactive): loss = -w,
    # w = exp(old - behaviour) = exp(-1.0 - -1.2) = exp(0.2) = 1.2214; d loss / d logp = -w * ratio = -1.2214
    lp = torch.tensor([[-1.0]], requires_grad=True)
    old = torch.tensor([[-1.0]])
    beh = torch.tensor([[-1.2]])
    loss, m = policy_loss(
        lp, old, None, torch.tensor([1.0]), torch.tensor([[True]]), kl_coef=0.0, behaviour_logp=beh, is_cap=2.0
    )
    loss.backward()
    assert loss.item() == pytest.approx(-math.exp(0.2))
    assert lp.grad.item() == pytest.approx(-math.exp(0.2))
    assert m["behaviour_ratio_mean"].item() == pytest.approx(math.exp(0.2))
    assert m["is_truncated_fraction"].item() == 0.0
    # a token the behaviour policy found far less likely: the weight is truncated at the cap
    loss, m = policy_loss(
        lp,
        old,
        None,
        torch.tensor([1.0]),
        torch.tensor([[True]]),
        kl_coef=0.0,
        behaviour_logp=torch.tensor([[-4.0]]),
        is_cap=2.0,
    )
    assert loss.item() == pytest.approx(-2.0) and m["is_truncated_fraction"].item() == 1.0
    assert m["behaviour_ratio_max"].item() == pytest.approx(math.exp(3.0))
    # the KL term is not weighted: with advantage 0 the loss is the KL penalty alone, whatever w
    ref = torch.tensor([[-1.5]])
    a, _ = policy_loss(lp, old, ref, torch.tensor([0.0]), torch.tensor([[True]]), kl_coef=0.1, behaviour_logp=beh)
    b, _ = policy_loss(lp, old, ref, torch.tensor([0.0]), torch.tensor([[True]]), kl_coef=0.1)
    assert a.item() == pytest.approx(b.item()) and a.item() == pytest.approx(0.1 * (math.exp(-0.5) + 0.5 - 1))


def test_off_policy_loss_with_the_clip_active():
    # ratio exp(-0.3 - -1.0) = 2.0138 > 1.2 with A = 2: the clipped term 1.2 * 2 = 2.4 wins,
    # weighted by w = exp(-1.0 - -0.9) = 0.9048: loss -2.4 * 0.9048, no gradient through the clip
    lp = torch.tensor([[-0.3]], requires_grad=True)
    loss, m = policy_loss(
        lp,
        torch.tensor([[-1.0]]),
        None,
        torch.tensor([2.0]),
        torch.tensor([[True]]),
        kl_coef=0.0,
        behaviour_logp=torch.tensor([[-0.9]]),
    )
    loss.backward()
    assert loss.item() == pytest.approx(-2.4 * math.exp(-0.1))
    assert lp.grad.item() == 0.0 and m["clip_fraction"].item() == 1.0


def test_group_advantages_without_std_scaling_dr_grpo():
    # group [0.50, 0.51, 0.49, 0.50]: mean 0.5, unbiased std sqrt(0.0002 / 3) = 0.008165.
    # Scaled: (0.51 - 0.5) / 0.008165 = +1.2247 -- IoU noise of 0.01 becomes a full-size advantage.
    # Dr. GRPO: r - mean = +0.01. A constant group is 0 either way.
    r = torch.tensor([0.50, 0.51, 0.49, 0.50, 0.7, 0.7, 0.7, 0.7])
    scaled = group_advantages(r, 4)
    plain = group_advantages(r, 4, scale="none")
    assert scaled[:4].tolist() == pytest.approx([0.0, 1.2247, -1.2247, 0.0], abs=1e-3)
    assert plain.tolist() == pytest.approx([0.0, 0.01, -0.01, 0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    # invalid members stay out of the statistics and get 0, as with scaling
    v = torch.tensor([True, True, True, False] * 2)
    assert group_advantages(r, 4, valid=v, scale="none")[:4].tolist() == pytest.approx(
        [0.0, 0.01, -0.01, 0.0], abs=1e-6
    )
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 4, scale="batch")


def test_warmup_factor_is_linear_then_constant():
    # 4 warm-up steps: updates 0..3 at 1/4, 2/4, 3/4, 4/4 of the lr; then 1.
    assert [warmup_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    with pytest.raises(ValueError):
        warmup_factor(-1, 4)
