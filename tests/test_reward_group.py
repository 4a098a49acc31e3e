"""The reward worker group with real Ray actors: retries, timeouts and zero scores for failures."""

import time
import uuid

import pytest

from rlsys.config import RewardConfig

pytestmark = pytest.mark.slow


# ray_local: the suite's one Ray instance (conftest.py)


def _sample(sid):
    # unique ids: the misbehaving scorer remembers attempts across runs by id
    return {
        "id": f"{sid}-{uuid.uuid4().hex[:8]}",
        "image": "x.png",
        "width": 100,
        "height": 100,
        "task": "detection",
        "phrases": ["cat"],
        "instances": [{"phrase": "cat", "box": [10, 10, 50, 50]}],
    }


GOOD = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><100><100><500><500><|box_end|>"


def test_scores_in_order_and_match_the_scorer(ray_local):
    from actors.rewards import RewardGroup

    g = RewardGroup(RewardConfig(num_workers=2, matching="paper", sample_timeout_s=30))
    res = g.score([(GOOD, _sample("a")), ("garbage", _sample("b")), (GOOD, _sample("c"))])
    # box bins 100..500 of 999 on a 100 px image -> (10.01, 10.01, 50.05, 50.05): IoU ~0.997 with the GT
    assert res[0].reward > 0.99 and res[2].reward > 0.99
    assert res[1].reward == 0.0 and res[1].unreadable == 1 and not res[1].failed
    assert g.failures == 0
    g.shutdown()


def test_error_is_retried_once_then_zero_and_counted(ray_local):
    from actors.rewards import RewardGroup

    g = RewardGroup(
        RewardConfig(num_workers=2, matching="paper", sample_timeout_s=20, scorer="tests.scorers_for_tests:score")
    )
    res = g.score([(GOOD, _sample("boom-always")), (GOOD, _sample("boom-once")), (GOOD, _sample("fine"))])
    assert res[0].reward == 0.0 and res[0].failed and "exploded" in res[0].error
    assert res[1].reward > 0.99 and not res[1].failed  # the retry succeeded
    assert res[2].reward > 0.99
    assert g.failures == 1
    g.shutdown()


def test_a_hanging_sample_times_out_and_the_step_goes_on(ray_local):
    from actors.rewards import RewardGroup

    g = RewardGroup(
        RewardConfig(num_workers=1, matching="paper", sample_timeout_s=3, scorer="tests.scorers_for_tests:score")
    )
    t0 = time.monotonic()
    res = g.score([(GOOD, _sample("hang-always")), (GOOD, _sample("fine2"))])
    took = time.monotonic() - t0
    assert res[0].reward == 0.0 and res[0].failed
    # the stuck worker was replaced; the other sample was rescored on the fresh one
    assert res[1].reward > 0.99
    assert g.failures == 1
    # chunk deadline (2 x 3 s) + one retry per sample (3 s each) + worker restarts: bounded, no hang
    assert took < 120
    g.shutdown()


def test_a_prompts_answers_go_to_one_worker(ray_local):
    # 3 prompt groups of 4 answers over 2 workers: groups 0 and 2 on worker 0, group 1 on worker
    # 1; never one group split (round-robin over answers would send each group to both)
    from actors.rewards import RewardGroup

    g = RewardGroup(RewardConfig(num_workers=2, matching="paper", sample_timeout_s=30))
    items = [(GOOD, _sample(f"g{k // 4}")) for k in range(12)]
    res = g.score(items, group_size=4)
    assert g.last_shards == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7]]
    assert [r.reward > 0.99 for r in res] == [True] * 12
    g.shutdown()


def test_the_one_deadline_wait_names_the_late_and_the_dead_member(ray_local):
    # actors/group.py's wait, which every group uses: one answer, one member past the deadline,
    # one dead; each failure names its member, and the answer is kept
    import ray

    from actors.group import MemberFailed, call_each, wait_members

    @ray.remote(num_cpus=0)
    class Member:
        def work(self, s: float) -> float:
            time.sleep(s)
            return s

    fast, slow, dead = Member.remote(), Member.remote(), Member.remote()
    ray.get(dead.work.remote(0))
    ray.kill(dead, no_restart=True)
    t0 = time.monotonic()
    res = wait_members(
        "toy", {0: fast.work.remote(0.0), 1: slow.work.remote(30.0), 2: dead.work.remote(0.0)}, 3, "work"
    )
    assert time.monotonic() - t0 < 15  # one deadline for all, not one per member
    assert res[0] == 0.0
    assert isinstance(res[1], MemberFailed) and res[1].member == 1 and "no answer within 3 s" in str(res[1])
    assert isinstance(res[2], MemberFailed) and res[2].member == 2 and "toy member 2 failed during work" in str(res[2])
    with pytest.raises(MemberFailed, match="toy member 1 failed during work.*Restart it"):
        call_each("toy", [fast.work.remote(0.0), slow.work.remote(30.0)], 2, "work", advice="Restart it")
    for a in (fast, slow):
        ray.kill(a, no_restart=True)
