"""Exact data parallelism of the learner group, with real Ray actors and real DeepSpeed (ZeRO-2,
gloo): N ranks on a batch give the one-rank update, whatever the shard sizes.

The batches are chosen so that the ranks' micro-batch counts differ: 9 answers with micro-batch 4
are shards of 5 and 4 (2 and 1 micro-batches), 1 answer leaves rank 1 with nothing, and a second
call of another size would push a drifting accumulation boundary into the next step. Before the
group padded every rank to the same count the first call hung in ZeRO-2's gradient reduce."""

import pytest
import torch

pytestmark = pytest.mark.slow


# ray_local: the suite's one Ray instance (conftest.py)


def _items(processor, synthetic_dir, n: int, seed: int, group: int = 1):
    import random

    from rlsys.data.samples import load_dataset
    from rlsys.grpo.records import LearnerItem
    from rlsys.lang.prompts import chat_prompt, question_for_sample

    samples = load_dataset(synthetic_dir / "train.jsonl")
    rng = random.Random(seed)
    out = []
    for k in range(n):
        s = samples[(k // group) % len(samples)]  # `group` answers per prompt
        # answers of 1-12 ordinary tokens (ids below the specials), advantages of both signs
        ids = [rng.randrange(20, 900) for _ in range(rng.randrange(1, 13))]
        out.append(
            LearnerItem(
                prompt=chat_prompt(processor, question_for_sample(s)),
                image=s.image,
                response_ids=ids,
                advantage=rng.uniform(-1.5, 1.5),
            )
        )
    return out


def _run(tiny_model_dir, synthetic_dir, num_ranks: int, batches, overrides=(), group: int = 1):
    import copy

    from actors.learner import LearnerGroup
    from rlsys.config import load_config
    from rlsys.models import load_processor

    cfg = load_config(
        overrides=[
            f"learner.num_ranks={num_ranks}",
            "learner.micro_batch_size=4",
            "learner.lr=1e-3",
            "learner.kl_coef=0.05",
            "learner.timeout_s=300",
            "learner.cpus_per_rank=0.5",
            "run.prompts_per_step=4",
            "rollout.samples_per_prompt=4",
            *overrides,
        ]
    )
    processor = load_processor(str(tiny_model_dir))
    g = LearnerGroup(cfg, str(tiny_model_dir), 300)
    try:  # the suite's Ray instance goes on: the group must not outlive a failed check
        g.ready(300)
        before = g.parameters()[0]
        params, metrics = [], []
        for n, seed in batches:
            items = _items(processor, synthetic_dir, n, seed, group)
            items = g.reference(items)
            g.train(copy.deepcopy(items))
            metrics.append(g.last_ranks)  # each rank's figures
            ps = g.parameters()
            # ZeRO-2 keeps whole parameters on every rank: all ranks agree after every step
            for other in ps[1:]:
                assert all(bool((other[k] == ps[0][k]).all()) for k in ps[0]), "ranks disagree after a step"
            params.append(ps[0])
    finally:
        g.shutdown()
    return before, params, metrics


def _assert_same_update(one, two, m1, m2, before):
    for k, (a, b, ma, mb) in enumerate(zip(one, two, m1, m2)):
        # the global gradient norm is the same: loss x world_size against DeepSpeed's average,
        # and no division by the accumulation steps (a factor 2 here would show at once)
        assert mb[0].grad_norm == pytest.approx(ma[0].grad_norm, rel=1e-4), (k, ma, mb)
        assert sum(m.tokens for m in mb) == sum(m.tokens for m in ma)
        # the parameters agree to float32 tolerance, measured against how far the step moved them
        ref = one[k - 1] if k else before
        moved = max(float((a[n] - ref[n]).abs().max()) for n in a)
        d = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
        assert moved > 1e-4, f"step {k} did not move the parameters"
        # Adam divides each gradient by its own magnitude, so an element whose gradient is a
        # cancellation (true value ~0, sign set by the summation order) may move by up to lr in
        # either run (see the test above); the bulk agrees to float32 rounding
        assert float((d > 1e-3 * moved).float().mean()) < 1e-3, (
            f"step {k}: {int((d > 1e-3 * moved).sum())} elements differ"
        )
        assert float(d.mean()) < 1e-3 * moved, f"step {k}: mean difference {float(d.mean()):.3g} (moved {moved:.3g})"


def test_shared_prefix_groups_over_two_ranks_give_the_per_answer_update(ray_local, tiny_model_dir, synthetic_dir):
    """learner.shared_prefix: groups of 4 answers to one prompt (and a group of 1), whole on one
    rank each; 2 ranks with shared prefixes give the 1-rank per-answer update (the reference
    pass runs shared too), every rank runs the same number of micro-batches."""
    batches = [(9, 0), (4, 1)]  # 9 answers: groups of 4, 4, 1; then one group of 4 (rank 1 empty)
    before, plain, mp = _run(tiny_model_dir, synthetic_dir, 1, batches, ["learner.shared_prefix=false"], group=4)
    _, shared, ms = _run(tiny_model_dir, synthetic_dir, 2, batches, ["learner.shared_prefix=true"], group=4)
    # balanced by tokens, each group whole on a rank: 9 -> one group of 4 on each rank and the
    # group of 1 with the lighter; 4 -> all on one rank, the other pads
    assert sorted(m.answers for m in ms[0]) in ([4, 5],) and sorted(m.answers for m in ms[1]) == [0, 4]
    assert [[m.micro_batches for m in step] for step in ms] == [[2, 2], [1, 1]]
    # the prompt is encoded once per group on its rank: 2 + 1 prompts, then 1
    assert sum(m.encoded_prompts for m in ms[0]) == 3 and sum(m.encoded_prompts for m in ms[1]) == 1
    _assert_same_update(plain, shared, mp, ms, before)

    # packed by tokens (learner.max_tokens_per_micro_batch): a budget of the longest prompt plus
    # 12 tokens holds one prompt and a few of the 1-12 token answers, so each group of 4 is split
    # into pieces that repeat its prompt; the update is still the per-answer one
    from rlsys.grpo.sequences import encode_prompts
    from rlsys.models import load_processor

    processor = load_processor(str(tiny_model_dir))
    longest = max(
        int(e["input_ids"].shape[1]) for e in encode_prompts(processor, _items(processor, synthetic_dir, 9, 0, 4)[::4])
    )
    budget = ["learner.shared_prefix=true", f"learner.max_tokens_per_micro_batch={longest + 12}"]
    _, packed, mk = _run(tiny_model_dir, synthetic_dir, 2, batches, budget, group=4)
    counts = [[m.micro_batches for m in step] for step in mk]
    assert all(len(set(c)) == 1 for c in counts), counts  # every rank runs the step's count
    assert counts[0][0] > 2 and counts[1][0] > 1, counts  # more, smaller micro-batches than by answers
    assert sum(m.answers for m in mk[0]) == 9 and sum(m.answers for m in mk[1]) == 4
    _assert_same_update(plain, packed, mp, mk, before)


def test_two_ranks_give_the_one_rank_update_on_uneven_shards(ray_local, tiny_model_dir, synthetic_dir):
    batches = [(9, 0), (1, 1), (6, 2)]
    # answers dealt in turn (the per-answer path; the shared-prefix path shards by group, above)
    before, one, m1 = _run(tiny_model_dir, synthetic_dir, 1, batches, ["learner.shared_prefix=false"])
    _, two, m2 = _run(tiny_model_dir, synthetic_dir, 2, batches, ["learner.shared_prefix=false"])
    # the plans: 9 -> shards 5 and 4 -> 2 micro-batches each, rank 1 pads one; 1 -> rank 1 has
    # none and runs one zero-weight micro-batch; 6 -> 3 and 3 -> 1 each
    assert [[m.micro_batches for m in step] for step in m2] == [[2, 2], [1, 1], [1, 1]]
    assert [[m.padded_micro_batches for m in step] for step in m2] == [[0, 1], [0, 1], [0, 0]]
    assert [[m.tokens > 0 for m in step] for step in m2] == [[True, True], [True, False], [True, True]]
    # exactly one optimizer step per call on every rank
    assert [[m.optimizer_steps for m in step] for step in m2] == [[1, 1], [2, 2], [3, 3]]
    assert [m[0].optimizer_steps for m in m1] == [1, 2, 3]
    for k, (a, b, ma, mb) in enumerate(zip(one, two, m1, m2)):
        # the global gradient norm is the same: loss x world_size against DeepSpeed's average,
        # and no division by the accumulation steps (a factor 2 here would show at once)
        assert mb[0].grad_norm == pytest.approx(ma[0].grad_norm, rel=1e-4), (k, ma, mb)
        assert sum(m.tokens for m in mb) == ma[0].tokens
        # the parameters agree to float32 tolerance, measured against how far the step moved them
        ref = one[k - 1] if k else before
        moved = max(float((a[n] - ref[n]).abs().max()) for n in a)
        d = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
        assert moved > 1e-4, f"step {k} did not move the parameters"
        # Adam divides each gradient by its own magnitude, so an element whose gradient is a
        # cancellation (true value ~0, sign set by the summation order) may move by up to lr in
        # either run: in the first step here 21 of 1.09M elements, all but one in the patch
        # embedding; 112 after the second, as the Adam moments diverge. The bulk agrees to float32 rounding (mean 1e-8 after three steps of 1e-3; a
        # lost shard or micro-batch moves most elements by ~lr and fails this by 100x).
        assert float((d > 1e-3 * moved).float().mean()) < 1e-3, (
            f"step {k}: {int((d > 1e-3 * moved).sum())} elements differ"
        )
        assert float(d.mean()) < 1e-3 * moved, (
            f"step {k}: mean difference {float(d.mean()):.3g} (the step moved {moved:.3g})"
        )


def test_learning_rate_warm_up_scales_the_first_updates(ray_local, tiny_model_dir, synthetic_dir):
    # learner.warmup_steps=3 at lr 1e-3: updates 1, 2, 3, 4 use 1/3, 2/3, 1, 1 of it. Adam's first
    # update moves each weight by ~lr whatever its gradient, so the first step moves the weights
    # about a third as far as without the warm-up, from the same start on the same batch.
    batches = [(4, 0), (4, 1), (4, 2), (4, 0)]  # seeds whose random answers hold no image placeholder id
    before, warm, mw = _run(tiny_model_dir, synthetic_dir, 1, batches, ["learner.warmup_steps=3"])
    _, cold, mc = _run(tiny_model_dir, synthetic_dir, 1, batches[:1])
    assert [m[0].lr for m in mw] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    assert mc[0][0].lr == pytest.approx(1e-3)
    moved = lambda p: max(float((p[n] - before[n]).abs().max()) for n in p)  # noqa: E731
    assert moved(warm[0]) / moved(cold[0]) == pytest.approx(1 / 3, rel=0.05)


def test_a_frozen_tower_runs_once_per_image_per_step_and_gives_the_same_update(
    ray_local, tiny_model_dir, synthetic_dir
):
    """learner.freeze_vision with the shared prefix: the tower's output is computed once per image
    per step and serves the reference and the training pass (each model's own merger on it); 2
    ranks give the 1-rank update of the path where every pass runs the tower itself."""
    batches = [(9, 0), (4, 1)]
    frozen = ["learner.freeze_vision=true"]
    before, plain, mp = _run(
        tiny_model_dir, synthetic_dir, 1, batches, [*frozen, "learner.shared_prefix=false"], group=4
    )
    _, reused, mr = _run(tiny_model_dir, synthetic_dir, 2, batches, [*frozen, "learner.shared_prefix=true"], group=4)
    # 3 images (groups of 4, 4, 1) then 1: one tower run each, over both passes
    assert [sum(m.vision_tower_runs for m in step) for step in mr] == [3, 1]
    assert all(m.vision_tower_runs == 0 for step in mp for m in step)  # the per-answer path runs it in each pass
    _assert_same_update(plain, reused, mp, mr, before)


def test_lora_over_two_ranks_gives_the_one_rank_update_and_leaves_the_base(ray_local, tiny_model_dir, synthetic_dir):
    """learner.lora: ZeRO-2 over 2 ranks gives the 1-rank update of the adapters (groups whole on a
    rank, one of them empty in the second step), the reference being the base with the adapters
    off (kl_coef 0.05, no second copy); the checkpoint's own weights never move."""
    batches = [(9, 0), (4, 1)]
    lora = ["learner.lora.rank=4", "learner.lora.alpha=8"]
    before, one, m1 = _run(tiny_model_dir, synthetic_dir, 1, batches, lora, group=4)
    _, two, m2 = _run(tiny_model_dir, synthetic_dir, 2, batches, lora, group=4)
    assert [[m.micro_batches for m in step] for step in m2] == [[2, 2], [1, 1]]
    _assert_same_update(one, two, m1, m2, before)
    moved = {n for n in before if not torch.equal(before[n], two[-1][n])}
    assert moved and all(".lora_" in n for n in moved), sorted(moved)[:5]
    assert any(".lora_B." in n for n in moved)  # B starts at 0: the update is in the adapters
