"""GRPO distributed for real, on one machine: a Ray cluster of two nodes started in the test
(Ray's own ``ray.cluster_utils.Cluster``: two raylets, each with its own resources), 2 learner
ranks on one node, 2 vLLM engines and 3 reward workers on the other, learner rank 0 away from the
driver's node. The real geometric scorer on the SFT'd tiny model's box answers, one engine killed
mid-run, the weights moved by vLLM's weight-transfer protocol (rlsys_gloo) and checked at the end.

A step's 5 prompts x 5 answers = 25 samples are shards of 13 and 12 with micro-batch 6 (3 and 2
micro-batches): uneven counts, which hung ZeRO-2 before every rank ran the same number. (The
issue's 3 x 3 with micro-batch 4 is the same case. The short SFT localises poorly: with 3 x 3,
one run in two had no group with reward spread in 3 steps; so 5 x 5, and more steps, up to 9,
until one has.)"""

import pytest

pytestmark = pytest.mark.slow


def test_two_nodes_two_ranks_two_engines_three_reward_workers(cluster, sft_run, tmp_path):
    import ray

    from rlsys.config import load_config
    from rlsys.grpo.run import prepare_data, prepare_model, start_trainer

    sft_out, _ = sft_run
    cfg = load_config(
        overrides=[
            f"run.out_dir={tmp_path}",
            f"run.init_checkpoint={sft_out / 'final'}",
            "run.resume=false",
            "tracking.mode=disabled",
            "data.tasks=[referring,visual_prompt]",
            "data.synthetic_train_images=60",
            "run.prompts_per_step=5",
            "rollout.samples_per_prompt=5",
            "rollout.max_new_tokens=32",
            "learner.num_ranks=2",
            "learner.micro_batch_size=6",
            "learner.lr=5e-4",
            "learner.cpus_per_rank=0.5",
            "learner.resources_per_rank={learner_node: 1}",
            "rollout.num_engines=2",
            "rollout.cpus_per_engine=0.5",
            "rollout.resources_per_engine={rollout_node: 1}",
            "reward.num_workers=3",
            "reward.cpus_per_worker=0.25",
            "reward.resources_per_worker={rollout_node: 1}",
            "reward.scorer=rewards.scorer:score",
        ]
    )
    t = start_trainer(cfg, prepare_model(cfg), prepare_data(cfg))
    try:  # the suite's two-node cluster goes on (test_node_loss): the groups must not
        driver = ray.get_runtime_context().get_node_id()
        learner_nodes, engine_nodes = t.groups.learners.node_ids(), t.groups.rollouts.node_ids()
        # learner ranks packed on one node, rank 0 not the driver's; engines on the other node
        assert len(set(learner_nodes)) == 1 and learner_nodes[0] != driver
        assert set(engine_nodes) == {driver}
        assert t.groups.weights.backend == "rlsys_gloo" and t.groups.weights.connects == 1

        from actors.group import micro_batch_plan

        def check_plan(m):
            # every rank ran the micro-batches of the larger shard; the smaller padded the difference
            n = m["learner/answers"]  # non-empty answers (empty ones are not learnt from)
            shards = [(n + 1) // 2, n // 2]
            assert m["learner/micro_batches_per_rank"] == micro_batch_plan(shards, 6)
            assert m["learner/padded_micro_batches"] == sum(micro_batch_plan(shards, 6) - -(-s // 6) for s in shards)

        m1 = t.step()
        check_plan(m1)
        if m1["learner/answers"] == 25:  # shards of 13 and 12: 3 micro-batches each, rank 1 pads one
            assert m1["learner/micro_batches_per_rank"] == 3 and m1["learner/padded_micro_batches"] == 1

        # kill engine 1 mid-run: step 2 restarts it, syncs it and retries its prompts only
        ray.kill(t.groups.rollouts.engines[1], no_restart=True)
        m2 = t.step()
        assert t.groups.rollouts.restarts == 1 and m2["rollout/engine_restarts"] == 1
        # prompts 0, 2, 4 went to engine 0 and were kept; prompts 1 and 3 were engine 1's and retried (in step 2)
        assert t.groups.rollouts.retried == [(2, 1, [1, 3])]
        assert t.groups.weights.connects == 2  # the transfer group reopened with the new engine's worker

        steps = [m1, m2, t.step()]
        # the real geometric scorer must have given groups with reward spread (an update with signal)
        while all(m["groups/zero_std_fraction"] == 1.0 for m in steps) and len(steps) < 9:
            steps.append(t.step())
        for m in steps[1:]:
            check_plan(m)
        # the real geometric scorer gave groups with reward spread: the update had signal
        assert any(m["groups/zero_std_fraction"] < 1.0 for m in steps), [
            {
                k: m[k]
                for k in (
                    "groups/zero_std_fraction",
                    "reward/mean",
                    "reward/unreadable_per_answer",
                    "answer/length_tokens",
                )
            }
            for m in steps
        ]
        assert all(m["reward/failures"] == 0 for m in steps)
        # both engines hold the learner's tensors name by name and compute its log-probs
        learner, engines = t.checksums()
        from actors.weight_sync import compare_digests

        assert [compare_digests(learner, e) for e in engines] == [[], []]
        assert t.weights_in_sync()
        # the policy moved: the learner's weights are not the SFT start's
        from safetensors.torch import load_file

        start = load_file(sft_out / "final" / "model.safetensors")
        now = t.groups.learners.parameters()[0]
        assert any(not bool((now[k] == start[k]).all()) for k in now if k in start)
    finally:
        t.shutdown()
