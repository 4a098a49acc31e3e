"""A run that loses its learner node, on a real two-node Ray cluster (Ray's own
``ray.cluster_utils.Cluster``: two raylets on this machine): the learner's node is removed after
step 3 is recorded, a replacement node with the same resources joins a few seconds later, and the
run (run.max_restarts) tears its groups down, waits for the resources, rebuilds them, resumes from
its last checkpoint and finishes: every step recorded once, each redone step drawing the prompts
it drew before. With run.max_restarts=0 (the behaviour before restarts) the same loss ends the
run with the learner's MemberFailed.

The controller's restart logic is tested in milliseconds in test_lifecycle.py; this is the same
path through real Ray, vLLM and DeepSpeed actors."""

import json
import threading
import time

import pytest

pytestmark = pytest.mark.slow


def test_losing_the_learner_node_restarts_from_the_checkpoint_and_finishes(cluster, sft_run, tmp_path):
    from rlsys.config import load_config
    from rlsys.grpo import run as grpo

    sft_out, _ = sft_run
    out = tmp_path / "run"
    cfg = load_config(
        overrides=[
            f"run.out_dir={out}",
            f"run.init_checkpoint={sft_out / 'final'}",
            "run.steps=6",
            "run.checkpoint_every_steps=2",
            "run.max_restarts=1",
            "run.actor_start_timeout_s=300",
            "run.dynamic_sampling=false",
            "tracking.mode=disabled",
            "tracking.image_table_every_steps=0",
            "rollout.max_new_tokens=32",
            "learner.num_ranks=2",
            "learner.cpus_per_rank=0.5",
            "learner.resources_per_rank={learner_node: 1}",
            "rollout.cpus_per_engine=0.5",
            "rollout.resources_per_engine={rollout_node: 1}",
            "reward.num_workers=1",
            "reward.cpus_per_worker=0.25",
            "reward.resources_per_worker={rollout_node: 1}",
            "reward.scorer=tests.scorers_for_tests:coordinate_count_reward",
        ]
    )
    steps = out / "steps.jsonl"
    result: dict = {}

    def train():
        try:
            result["metrics"] = grpo.run(cfg)
        except BaseException as exc:  # raised in the test below
            result["error"] = exc

    # the run in a thread, the faults from the test's main thread (Ray's Cluster.add_node sets a
    # signal handler, which only the main thread may); the run's SIGTERM stop is off in a thread
    t = threading.Thread(target=train, daemon=True)
    t.start()
    deadline = time.monotonic() + 900
    recs: list = []
    while len(recs) < 3 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
        recs = [json.loads(line) for line in steps.read_text().splitlines()] if steps.is_file() else []
    assert len(recs) >= 3, f"the run did not reach step 3: {result}"
    before = {r["step"]: r["prompt_ids"] for r in recs}
    # after step 3 is recorded (the last checkpoint is step 2's; a step takes ~0.4 s here, so the
    # loss may surface a step or two later) the learners' node goes, and a replacement joins 5 s
    # later, as an autoscaler would bring one
    cluster.remove_node(next(iter(cluster.worker_nodes)))
    time.sleep(5)
    cluster.add_node(num_cpus=2, resources={"learner_node": 8})
    t.join(timeout=900)
    assert not t.is_alive(), "the run did not finish within 900 s of the fault"
    if "error" in result:
        raise result["error"]
    m = result["metrics"]

    assert m["step"] == 6 and m["run/restarts"] == 1 and m["weights_in_sync"] is True
    recs = [json.loads(line) for line in steps.read_text().splitlines()]
    # each step once: the steps after the last checkpoint were dropped and redone
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    # a redone step drew the prompts it drew before the loss
    assert all(recs[s - 1]["prompt_ids"] == ids for s, ids in before.items()), (before, recs)
    (restart,) = [json.loads(line) for line in (out / "restarts.jsonl").read_text().splitlines()]
    assert restart["group"] == "learner", restart  # the rank's call failed: its node was gone
    after = restart["after_step"]
    assert after >= 3 and restart["resumed_at_step"] == after // 2 * 2, restart  # the last checkpoint
    assert restart["step_records_dropped"] == after - restart["resumed_at_step"], restart
