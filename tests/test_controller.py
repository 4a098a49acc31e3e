"""The GRPO controller's logic with in-process fakes of its groups (tests/controller_fakes.py):
dynamic sampling, the staleness bound, pending batches after a resume, refused requests and
failed rewards. Milliseconds each; the same logic runs against real Ray actors in
test_grpo_faults.py and test_distributed_grpo.py."""

from __future__ import annotations

import pytest

from rlsys.config import load_config
from rlsys.grpo.trainer import Groups, Trainer
from rlsys.lang.vocab import REX_BINS
from tests.controller_fakes import (
    FakeLearners,
    FakeProcessor,
    FakeRewards,
    FakeRollouts,
    FakeWeights,
    image_index,
    samples,
    version_of_ids,
)

G = 4


def _cfg(tmp_path, *overrides):
    return load_config(
        overrides=[
            f"run.out_dir={tmp_path}",
            "run.prompts_per_step=4",
            f"rollout.samples_per_prompt={G}",
            "run.dynamic_sampling=false",
            "run.max_staleness_steps=0",
            "run.steps=6",
            *overrides,
        ]
    )


def _trainer(cfg, reward, n_samples=16, refuse=frozenset(), learners=None, unreadable=frozenset()):
    rollouts = FakeRollouts(G, refuse, unreadable)
    learners = learners or FakeLearners()
    groups = Groups(rollouts, FakeRewards(reward), learners, FakeWeights(learners, rollouts))
    return Trainer(cfg, groups, samples(n_samples), FakeProcessor(), REX_BINS)


def spread(i, k):
    return k / (G - 1)  # 0, 1/3, 2/3, 1: a group with signal


def test_dynamic_sampling_draws_more_prompts_until_every_group_has_a_reward_spread(tmp_path):
    # even samples: every answer scores 0.5 (no signal); odd samples: a spread
    reward = lambda i, k: 0.5 if i % 2 == 0 else spread(i, k)
    t = _trainer(_cfg(tmp_path, "run.dynamic_sampling=true", "run.max_resample_rounds=3"), reward)
    m = t.step()
    _, items = t.groups.learners.trained[0]
    learnt = {image_index(it.image) for it in items}
    assert len(learnt) == 4 and all(i % 2 == 1 for i in learnt)  # four groups, all with signal
    assert len(items) == 4 * G
    # the first draw of 4 had some flat groups: more prompts were drawn to replace them
    assert t.order.position > 4
    assert m["groups/zero_std_fraction"] > 0
    assert len(t.groups.rollouts.submitted) >= 2


def test_without_dynamic_sampling_flat_groups_are_learnt_with_zero_advantage(tmp_path):
    t = _trainer(_cfg(tmp_path), lambda i, k: 0.5)
    t.step()
    _, items = t.groups.learners.trained[0]
    assert len(items) == 4 * G and all(it.advantage == 0.0 for it in items)
    assert t.order.position == 4


@pytest.mark.parametrize("bound,sync_every", [(0, 1), (1, 1), (2, 1), (1, 2), (2, 2)])
def test_no_answer_is_learnt_past_the_staleness_bound_and_the_pipeline_runs_ahead(tmp_path, bound, sync_every):
    # with a push every 2 updates the engines lag the learner, and the pipeline must stop
    # drawing ahead where a batch would be learnt past the bound
    cfg = _cfg(tmp_path, f"run.max_staleness_steps={bound}", f"run.sync_every_steps={sync_every}")
    t = _trainer(cfg, spread)
    for _ in range(6):
        t.step()
    stale = []
    for updates, items in t.groups.learners.trained:
        stale.extend(updates - version_of_ids(it.response_ids) for it in items)
    assert max(stale) <= bound
    # with a bound the engines generate ahead: some answers are exactly that many versions old
    assert max(stale) == bound
    assert sum(t.staleness.values()) == 6 * 4 * G
    # and nothing was drawn ahead only to be generated again past the bound: one batch per step
    assert [step for step, _ in t.groups.rollouts.submitted] == [1, 2, 3, 4, 5, 6]


def test_a_resumed_run_generates_the_pending_batches_first_and_learns_every_prompt_once(tmp_path):
    def run(out, stop_after=None):
        cfg = _cfg(out, "run.max_staleness_steps=1", "run.steps=4")
        t = _trainer(cfg, spread)
        while t.step_no < (stop_after or cfg.run.steps):
            t.step()
        return t

    whole = run(tmp_path / "whole")
    learnt_whole = [sorted(it.image for it in items) for _, items in whole.groups.learners.trained]

    first = run(tmp_path / "cut", stop_after=2)
    assert len(first.inflight) == 1  # one batch drawn ahead, not yet learnt from
    pending_images = first.groups.rollouts.submitted[-1][1]
    first.save()
    second = run(tmp_path / "cut")  # resumes from step 2's checkpoint
    assert second.groups.learners.loaded and second.step_no == 4
    # the pending batch is regenerated first, with the same prompts, for the same step
    assert second.groups.rollouts.submitted[0] == (3, pending_images)
    learnt_cut = [sorted(it.image for it in items) for _, items in first.groups.learners.trained]
    learnt_cut += [sorted(it.image for it in items) for _, items in second.groups.learners.trained]
    assert learnt_cut == learnt_whole  # none lost, none drawn twice


def test_a_refused_request_is_left_out_of_the_step_and_counted(tmp_path):
    t = _trainer(_cfg(tmp_path, "run.steps=1"), spread, n_samples=4, refuse={"img2.png"})
    m = t.step()
    _, items = t.groups.learners.trained[0]
    assert {it.image for it in items} == {"img0.png", "img1.png", "img3.png"}
    assert m["rollout/refused_requests"] == 1 and t.refused_requests == 1


def test_a_failed_reward_is_left_out_of_its_group_statistics_and_the_loss(tmp_path):
    # sample 0's answers: [failed, 1, 0, 1]; the others: a spread
    reward = lambda i, k: [None, 1.0, 0.0, 1.0][k] if i == 0 else spread(i, k)
    t = _trainer(_cfg(tmp_path, "run.steps=1", "learner.advantage_scaling=group_std"), reward, n_samples=4)
    m = t.step()
    _, items = t.groups.learners.trained[0]
    mine = [it for it in items if it.image == "img0.png"]
    assert len(mine) == 3 and 10 not in [it.response_ids[0] for it in mine]  # answer 0 (ids [10, ...]) left out
    # normalised over the three scored answers: mean 2/3, so the advantages are
    # (1/3, -2/3, 1/3) / std and add up to 0. Had the failure counted as a 0, the mean would be
    # 1/2 and these three would add up to (1/2 - 1/2 + 1/2) / std > 0.
    assert sum(it.advantage for it in mine) == pytest.approx(0.0, abs=1e-6)
    assert mine[0].advantage > 0 > mine[1].advantage
    assert m["reward/failures"] == 1
    assert m["reward/mean"] == pytest.approx((2.0 + 3 * sum(spread(0, k) for k in range(G))) / 15)


def test_images_that_fail_to_decode_in_a_worker_are_reported_and_stop_the_run_past_the_limit(tmp_path):
    # samples 1 and 2's images passed the check at start but do not decode in the rollout worker
    cfg = _cfg(tmp_path, "run.steps=1", "run.prompts_per_step=4", "data.max_bad_images=1")
    t = _trainer(cfg, spread, n_samples=4, unreadable={"img1.png"})
    m = t.step()
    assert m["rollout/bad_images"] == 1 and m["rollout/refused_requests"] == 1
    assert t.bad_images == ["<memory>, id 's1': img1.png: OSError: image file is truncated"]
    t = _trainer(
        _cfg(tmp_path / "b", "run.steps=1", "data.max_bad_images=1"),
        spread,
        n_samples=4,
        unreadable={"img1.png", "img2.png"},
    )
    with pytest.raises(
        RuntimeError, match=r"2 images failed to decode .* past data.max_bad_images 1[\s\S]*id 's1'[\s\S]*id 's2'"
    ):
        t.step()
