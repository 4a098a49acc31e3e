"""GRPO controller with real actors: a dead rollout engine is restarted and its step retried;
dynamic sampling draws more prompts when groups carry no signal; answers whose reward failed are
left out of the group statistics and the loss."""

import os
import re
from dataclasses import replace

import pytest

from rlsys.grpo.records import Refusal

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, ray_local):

    from rlsys.config import load_config
    from rlsys.grpo.run import prepare_data, prepare_model, start_trainer

    out = tmp_path_factory.mktemp("faults")
    os.environ["DS_ACCELERATOR"] = "cpu"
    cfg = load_config(
        overrides=[
            f"run.out_dir={out}",
            "run.resume=false",
            "tracking.mode=disabled",
            "data.synthetic_train_images=40",
            "rollout.max_new_tokens=16",
            # 224 px images (64 tokens each) whatever the default: the prefill test needs long prompts
            "data.synthetic_image_size_px=224",
            f"model.tiny_max_pixels={224 * 224}",
            "run.dynamic_sampling=true",
            "run.max_resample_rounds=1",
            # tied embeddings, as Qwen2.5-VL-3B: one tensor under two names in sync and checks
            "model.tiny_tie_word_embeddings=true",
            # the real scorer, except on samples whose id says "boom" (it raises there)
            "reward.scorer=tests.scorers_for_tests:score",
        ]
    )
    t = start_trainer(cfg, prepare_model(cfg), prepare_data(cfg))
    yield t
    t.shutdown()  # the suite's Ray instance goes on: its groups and placement groups must not


def test_dead_rollout_engine_is_restarted_and_the_step_retried(trainer):
    import ray

    ray.kill(trainer.groups.rollouts.engines[0], no_restart=True)
    m = trainer.step()
    assert m["step"] == 1 and trainer.step_no == 1
    # the new engine got the learner's weights before it retried the prompts
    assert trainer.weights_in_sync()
    # tied embeddings: the learner sends the shared tensor once, under the embedding's name;
    # the engine received exactly those names (no lm_head.weight) and ties it itself
    from actors.weight_sync import compare_digests

    learner, engines = trainer.checksums()
    names = set(learner["per_name"])
    assert not any(n.endswith("lm_head.weight") for n in names) and any("embed_tokens" in n for n in names)
    assert [compare_digests(learner, e) for e in engines] == [[]]


def test_dynamic_sampling_draws_more_prompts_for_zero_std_groups(trainer):
    # The random tiny model never writes the format: every reward is 0, every group has std 0.
    # With one resample round, a step draws prompts_per_step twice, then keeps what it has.
    before = trainer.order.position
    m = trainer.step()
    assert m["groups/zero_std_fraction"] == 1.0
    assert trainer.order.position - before == 2 * trainer.cfg.run.prompts_per_step
    assert len(m["prompt_ids"]) == trainer.cfg.run.prompts_per_step


def test_rollout_batch_larger_than_one_prefill_chunk(trainer):
    # 16 prompts x 4 samples with images: more prompt tokens than one prefill chunk, so vLLM
    # splits prefills and discards the partial steps' samples. With a per-request seed on CPU
    # that killed the engine ("CPU Generator does not use offset"; found by the benchmark).
    import ray

    from rlsys.lang.prompts import chat_prompt, question_for_sample

    reqs = [
        {"prompt": chat_prompt(trainer.processor, question_for_sample(s)), "image": s.image}
        for s in trainer.samples[:16]
    ]
    out = ray.get(
        trainer.groups.rollouts.engines[0].generate.remote(
            reqs, n=4, temperature=1.0, top_p=1.0, max_new_tokens=8, min_new_tokens=8, seed=0
        ),
        timeout=600,
    )
    assert len(out) == 16 and all(len(o) == 4 for o in out)
    assert all(len(a.token_ids) == 8 and len(a.logprobs) == 8 for o in out for a in o)
    # vision placeholders are never sampled (the learner would read one as an image slot)
    vision = {trainer.processor.image_token_id, trainer.processor.video_token_id}
    assert not any(set(a.token_ids) & vision for o in out for a in o)


def test_failed_rewards_are_left_out_of_the_loss_and_counted(trainer):
    import dataclasses

    # every other training sample makes the scorer raise (twice: the retry fails too)
    trainer.samples[:] = [
        dataclasses.replace(s, id=f"boom-{s.id}") if k % 2 == 0 else s for k, s in enumerate(trainer.samples)
    ]
    trainer.cfg.run.dynamic_sampling = False  # one draw, so what was drawn is what was learnt from
    try:
        m = trainer.step()
    finally:
        trainer.cfg.run.dynamic_sampling = True
    G = trainer.cfg.rollout.samples_per_prompt
    drawn = m["prompt_ids"]
    boom = sum(1 for i in drawn if i.startswith("boom-"))
    assert 0 < boom < len(drawn), drawn  # the test needs both kinds in the step
    assert m["reward/failures"] == boom * G
    # only the answers of the prompts whose rewards were computed reach the learner
    assert 0 < m["learner/answers"] <= (len(drawn) - boom) * G


def test_a_request_the_engine_refuses_fails_alone(trainer):
    # A prompt longer than the engine's context (the data check at load keeps such samples out
    # of a run; this is what happens if one gets through): that request comes back refused,
    # the other requests of the batch are answered, the engine stays up.
    import ray

    from rlsys.lang.prompts import chat_prompt, question_for_sample

    s = trainer.samples[1]
    good = {"prompt": chat_prompt(trainer.processor, question_for_sample(s)), "image": s.image}
    too_long = {"prompt": chat_prompt(trainer.processor, "circle " * 1500), "image": s.image}
    engine = trainer.groups.rollouts.engines[0]
    kw = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0)
    out = ray.get(engine.generate.remote([good, too_long, good], **kw), timeout=600)
    assert isinstance(out[1], Refusal) and re.search(r"maximum (model|context) length", out[1].reason), out[1]
    assert [len(out[0]), len(out[2])] == [2, 2] and all(len(a.token_ids) == 4 for a in out[0] + out[2])
    assert len(ray.get(engine.generate.remote([good], **kw), timeout=600)[0]) == 2


def test_asynchronous_rollouts_respect_the_staleness_bound_and_weight_stale_answers(trainer):
    # max_staleness_steps 1: after the first step, each step learns from answers generated
    # while the previous step trained, i.e. by weights one update behind. Their importance
    # weights exp(learner - engine) are then not 1, while on-policy answers (step 1, and every
    # step of the synchronous loop) match the engine to float32 rounding.
    cfg = trainer.cfg.run
    cfg.max_staleness_steps, cfg.dynamic_sampling = 1, False
    cfg.steps = trainer.step_no + 4
    P, G = cfg.prompts_per_step, trainer.cfg.rollout.samples_per_prompt
    # The random model scores 0 everywhere, so no advantage and no update: the answers' lengths
    # (which vary) stand in for the reward, so each step moves the policy.
    score = trainer.groups.rewards.score
    trainer.groups.rewards.score = lambda batch, group_size: [
        replace(r, reward=min(1.0, len(text) / 60)) for r, (text, _) in zip(score(batch, group_size=group_size), batch)
    ]
    # the items each step hands the learner (answers with a failed reward or no tokens are not among them)
    made, learner_items = [], trainer._learner_items
    trainer._learner_items = lambda *a: made.append(learner_items(*a)) or made[-1]
    try:
        start = trainer.order.position
        recs = [trainer.step() for _ in range(3)]
    finally:
        cfg.max_staleness_steps, cfg.dynamic_sampling = 0, True
        trainer.groups.rewards.score = score
        del trainer._learner_items
    assert [r["rollout/staleness_max"] for r in recs] == [0, 1, 1]
    assert recs[0]["rollout/staleness/0"] == P * G and recs[1]["rollout/staleness/1"] == P * G
    # one batch generating ahead while a step learns (none past run.steps)
    assert [r["rollout/inflight_batches"] for r in recs] == [1, 1, 1]
    assert trainer.order.position - start == 4 * P
    # the processor ran once per prompt per step (one learner rank here): the reference pass's
    # encodings served the update
    assert trainer.cfg.learner.num_ranks == 1 and trainer.cfg.learner.kl_coef > 0
    prompts = [len({(it.prompt, it.image) for it in items}) for items in made]
    assert all(0 < n <= P for n in prompts), prompts
    assert [r["learner/encoded_prompts"] for r in recs] == prompts
    # the stale steps were corrected, the on-policy one was not
    assert recs[0]["learner/corrected_tokens"] == 0 and recs[1]["learner/corrected_tokens"] > 0
    on_policy_gap = recs[0]["rollout/logprob_gap"]
    assert on_policy_gap < 1e-4, recs[0]
    assert recs[1]["learner/behaviour_abs_log_ratio"] > 20 * on_policy_gap, recs[1]
    assert recs[1]["learner/behaviour_ratio_mean"] != 1.0
    # the pending batch is in the checkpoint state; the synchronous loop resumes cleanly after it
    assert len(trainer.inflight) == 1
    pending = trainer.inflight[0]
    cfg.dynamic_sampling = False  # one draw: what was pending is what is learnt
    try:
        m = trainer.step()  # staleness 0 again: the pending batch is past the bound, so its prompts are generated again
    finally:
        cfg.dynamic_sampling = True
    assert m["rollout/staleness_max"] == 0 and m["prompt_ids"] == [trainer.samples[i].id for i in pending.idx]
    assert not trainer.inflight
