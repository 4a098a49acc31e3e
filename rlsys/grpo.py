"""GRPO on Ray: ``python -m rlsys.grpo [--config FILE] [key=value ...]``.

One step, as in the paper's section 4.2: sample prompts -> the rollout group samples G answers
each -> the reward group scores them against the image's ground truth -> group-normalised
advantages -> reference log-probs -> learner update -> weight sync to the generators. Each stage
is timed and logged. With ``run.max_staleness_steps`` N > 0 the next batches are generated while
the learner trains on this one (asynchronous rollouts), never more than N policy versions behind
the learner, and the loss importance-weights them by the engines' log-probs. With no arguments it runs ``configs/tiny_cpu.yaml``: the tiny
model on synthetic data, on this machine; under ``ray job submit`` it joins that cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlsys.checkpoints import Checkpoints
from rlsys.config import ConfigError, GRPOConfig, describe, load_config
from rlsys.tracking import example_table, start_tracking, wandb_init_args

log = logging.getLogger("rlsys.grpo")


# ----------------------------------------------------------------------------------------------
# Preparation (no Ray): model directory, data, prompt order
# ----------------------------------------------------------------------------------------------
def prepare_model(cfg: GRPOConfig) -> str:
    from rlsys.prepare import prepare_model_dir

    return prepare_model_dir(cfg.model, cfg.run.out_dir, cfg.run.init_checkpoint)


def prepare_data(cfg: GRPOConfig):
    from rlsys.prepare import load_samples

    return load_samples(cfg.data, cfg.run.out_dir, "train")


class PromptOrder:
    """A reproducible, resumable prompt stream: a fresh permutation per epoch; the position is
    saved in checkpoints so a resumed run draws the same prompts."""

    def __init__(self, n: int, seed: int, position: int = 0):
        self.n, self.seed, self.position = n, seed, position

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.position, self.n)
            perm = list(range(self.n))
            random.Random(f"{self.seed}-{epoch}").shuffle(perm)
            out.append(perm[i])
            self.position += 1
        return out


@dataclass
class Batch:
    """Prompts drawn for one step and, once generated, their answers. ``version`` is the number
    of learner updates in the weights the engines held when it was submitted: it is learnt from
    ``learner updates then - version`` versions later (its staleness)."""

    step: int  # the step it was drawn for (its questions are drawn with this step's seed)
    idx: list[int]
    prompts: list[str]
    version: int
    job: dict | None = None  # the rollout group's job while generating
    answers: list | None = None


def torch_tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float32)


def keep_step_records(path: Path, last_step: int) -> int:
    """Rewrite ``steps.jsonl`` (atomically) with only the records of steps ``<= last_step``: a
    resumed run redoes the steps after its checkpoint, and each step appears once. Returns the
    number of records dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(path)
        log.info("%s: dropped %d records of steps after %d (redone after the resume)", path, len(lines) - len(kept), last_step)
    return len(lines) - len(kept)


def _rewards_and_valid(scores: list[list[dict]]):
    """Rewards ``[B]`` and whether each was computed (False: the scorer failed twice)."""
    import torch

    flat = [s for grp in scores for s in grp]
    return torch_tensor([s["reward"] for s in flat]), torch.tensor([not s.get("failed") for s in flat])


# A group reward spread below this is noise in the IoU, not a better answer (groups/small_std_fraction).
SMALL_GROUP_STD = 0.02


@contextmanager
def timed(times: dict, name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def _chat_prompt(processor, question: str) -> str:
    from rlsys.prompts import chat_prompt

    return chat_prompt(processor, question)


class Trainer:
    """Holds the three actor groups; :meth:`step` is one GRPO step. The groups own placement,
    sharding, timeouts and what a dead member costs (actors/); the controller never touches a
    single actor."""

    def __init__(self, cfg: GRPOConfig, model_dir: str, samples, processor=None):
        import ray

        from actors.group import call
        from actors.learner import LearnerGroup
        from actors.rewards import RewardGroup
        from actors.rollout import RolloutGroup
        from actors.weight_sync import WeightSync
        from rlsys.models import processor_for
        from rlsys.vocab import vocabulary_for

        self.cfg, self.model_dir, self.samples = cfg, model_dir, samples
        self.out = Path(cfg.run.out_dir)
        self.processor = processor or processor_for(cfg.model, model_dir)
        self.vocabulary = vocabulary_for(cfg.model, self.processor)  # questions and rewards speak it
        self.ckpt = Checkpoints(self.out, keep=cfg.run.keep_checkpoints)
        self.step_no = 0  # learner updates so far: the learner's policy version
        self.engine_version = 0  # the learner version the engines hold (set by every push)
        self.refused_requests = 0  # prompts the engines would not take, over the run
        self.order = PromptOrder(len(samples), cfg.run.seed)
        # batches generating ahead of the learner (run.max_staleness_steps > 0), oldest first
        self.inflight: deque[Batch] = deque()
        self.staleness = Counter()  # answers learnt from, by staleness, over the run
        self._last_step_end: float | None = None
        have = ray.cluster_resources().get("CPU", 0)
        if cfg.cpus_requested() > have:
            log.warning("the actor groups ask for %.1f CPUs but the cluster has %.1f now: they start only if an "
                        "autoscaler adds nodes (lower rollout.cpus_per_engine / learner.cpus_per_rank / "
                        "reward.cpus_per_worker on a small machine)", cfg.cpus_requested(), have)
        start = cfg.run.actor_start_timeout_s
        t0 = time.perf_counter()
        self.learners = self.rollouts = self.rewards = None
        try:  # a group that cannot start frees the ones started before it
            self.learners = LearnerGroup(cfg, model_dir, start)
            self.rollouts = RolloutGroup(cfg, model_dir, start)
            self.rewards = RewardGroup(cfg.reward.num_workers, cfg.reward.matching, cfg.reward.sample_timeout_s,
                                       cfg.reward.sam_checkpoint, cfg.reward.cpus_per_worker, cfg.reward.scorer,
                                       cfg.reward.resources_per_worker, start, vocabulary=self.vocabulary)
            call(self.learners.ready_refs() + self.rollouts.ready_refs(), start, "actor start-up")
        except BaseException:
            self.shutdown()
            raise
        log.info("actors ready in %.1f s", time.perf_counter() - t0)
        self.weights = WeightSync(self.learners, self.rollouts, cfg.weight_transfer_backend,
                                  cfg.rollout.weight_bucket_mib << 20, cfg.rollout.timeout_s)
        # a restarted engine gets the current weights before its prompts are retried
        self.rollouts.on_restart = lambda engines: self.weights.push()

        last = self.ckpt.latest() if cfg.run.resume else None
        pending: list = []
        if last is not None:
            state = json.loads((last / "trainer_state.json").read_text())
            self.learners.load(str(last))
            self.step_no = state["step"]
            self.order = PromptOrder(len(samples), cfg.run.seed, state["data_position"])
            pending = state.get("pending_batches", [])
            log.info("resumed from %s at step %d", last, self.step_no)
        # Engines start from model_dir; the first push also opens the transfer group, so its
        # cost is paid here rather than inside step 1's timing.
        self.sync_weights()
        # prompts drawn ahead before the checkpoint (asynchronous rollouts) are generated again,
        # with the same questions: none is lost, none is drawn twice
        for b in pending:
            self.inflight.append(self._submit(b["step"], b["idx"]))

    def shutdown(self) -> None:
        """Kill the three groups' actors and free their placement groups, so that another run can
        place its own in the same Ray session (the demo runs GRPO once per seed in one process).
        Batches still generating are dropped. Each group is torn down even if another fails."""
        self.inflight.clear()
        for name in ("rollouts", "rewards", "learners"):
            group = getattr(self, name, None)
            if group is None:
                continue
            try:
                group.shutdown()
            except Exception as exc:  # an actor already dead; the others still go
                log.warning("shutting down the %s group: %s: %s", name, type(exc).__name__, exc)
            setattr(self, name, None)

    def _prompt(self, i: int, step: int) -> str:
        """The chat prompt of sample ``i`` drawn for ``step`` (its question is drawn per step)."""
        from rlsys.prompts import question_for_sample

        q = question_for_sample(self.samples[i], random.Random(f"{self.cfg.run.seed}-{step - 1}-{i}"), self.vocabulary)
        return _chat_prompt(self.processor, q)

    # -- stages ------------------------------------------------------------------------------
    def _submit(self, step: int, idx: list[int]) -> Batch:
        """Start generating G answers for each of ``idx`` (returns at once)."""
        prompts = [self._prompt(i, step) for i in idx]
        reqs = [{"prompt": p, "image": self.samples[i].image} for i, p in zip(idx, prompts)]
        return Batch(step, list(idx), prompts, self.engine_version, job=self.rollouts.submit(reqs, step=step))

    def _answers(self, b: Batch, times: dict) -> list:
        """The batch's answers, waiting for them if they are still being generated."""
        if b.answers is None:
            with timed(times, "generate"):
                b.answers = self.rollouts.collect(b.job)
            b.job = None
        return b.answers

    def _next_batch(self, times: dict) -> Batch:
        """This step's batch: the oldest one generating ahead, or one drawn now. Then the pipeline
        is topped up so the engines work on the next batches while this one is scored and learnt."""
        want = self.cfg.run.prompts_per_step
        N = self.cfg.run.max_staleness_steps
        b = self.inflight.popleft() if self.inflight else self._submit(self.step_no + 1, self.order.take(want))
        if self.step_no - b.version > N:
            # drawn under a looser bound (max_staleness_steps lowered since): the same prompts
            # are generated again with the current weights, not dropped
            log.warning("step %d: the batch drawn ahead is %d versions old, past run.max_staleness_steps %d: "
                        "generating its prompts again", self.step_no + 1, self.step_no - b.version, N)
            self._answers(b, {})
            b = self._submit(b.step, b.idx)
        while len(self.inflight) < N:
            step = self.step_no + 2 + len(self.inflight)
            # it will be learnt at learner version step - 1; past the bound (or the run) it waits
            if step > self.cfg.run.steps or (step - 1) - self.engine_version > N:
                break
            self.inflight.append(self._submit(step, self.order.take(want)))
        return b

    def _finish_inflight(self, times: dict) -> None:
        """Wait for the batches generating ahead: they were submitted on the engines' current
        weights and finish on them, so a push lands between requests."""
        for b in self.inflight:
            self._answers(b, times)

    def sync_weights(self) -> float:
        """The learner's weights into every engine (vLLM's weight-transfer protocol), between
        requests: generation already submitted finishes on the old weights first."""
        self._finish_inflight({})
        t = self.weights.push()
        self.engine_version = self.step_no
        return t

    def step(self) -> dict:
        """One GRPO step (the paper's section 4.2), each stage timed."""
        from rlsys.algorithm import group_advantages

        times: dict[str, float] = {}
        t_step = time.perf_counter()
        G = self.cfg.rollout.samples_per_prompt
        # 1-2. prompts -> G answers each (generated ahead when asynchronous) -> rewards against
        #      each image's ground truth
        groups, signal = self._sample_groups(times)
        # 3. group-normalised advantages
        scores = [g["scores"] for g in groups]
        rewards, valid = _rewards_and_valid(scores)
        # failed scores are out of the group statistics
        adv = group_advantages(rewards, G, valid=valid, scale=self.cfg.learner.advantage_scaling)
        items = self._learner_items(groups, adv, valid)
        # 4. reference log-probs of the sampled tokens (the only extra forward; none without KL).
        #    The "old" policy is the learner's weights before this update: its training forward gives them.
        if self.cfg.learner.kl_coef > 0:
            with timed(times, "reference"):
                self.learners.reference(items)
        # 5. the clipped-ratio update with the KL penalty, one optimizer step over all ranks;
        #    answers from older weights are importance-weighted by the engines' log-probs
        with timed(times, "learn"):
            learn = self.learners.train(items)
        self.step_no += 1
        # 6. weight sync to the generators
        if self.step_no % self.cfg.run.sync_every_steps == 0:
            self._finish_inflight(times)  # counted as generate: the wait for the batch generating ahead
            with timed(times, "sync"):
                self.sync_weights()
        now = time.perf_counter()
        times["step"] = now - t_step
        times["idle"] = max(0.0, times["step"] - sum(v for k, v in times.items() if k != "step"))
        # wall time between consecutive step ends (checkpoints and logging included), so the
        # synchronous and the asynchronous loop compare
        times["step"] = now - (self._last_step_end if self._last_step_end is not None else t_step)
        self._last_step_end = now
        return self._metrics(groups, rewards, valid, signal, learn, times)

    def _sample_groups(self, times: dict):
        """This step's groups with their answers and rewards. With dynamic sampling (DAPO), groups
        whose rewards have no spread carry no signal: they are dropped and more prompts drawn,
        up to ``run.max_resample_rounds`` extra rounds; past the last round they are kept.
        Filtered on std, not mean: rewards are continuous."""
        from rlsys.algorithm import group_reward_std

        cfg, G = self.cfg, self.cfg.rollout.samples_per_prompt
        want = cfg.run.prompts_per_step
        groups: list[dict] = []
        zero_std_groups, drawn_groups = 0, 0
        rounds = 1 + (cfg.run.max_resample_rounds if cfg.run.dynamic_sampling else 0)
        for round_ in range(rounds):
            need = want - len(groups)
            if need <= 0:
                break
            b = self._next_batch(times) if round_ == 0 else self._submit(self.step_no + 1, self.order.take(need))
            staleness = self.step_no - b.version
            if staleness > cfg.run.max_staleness_steps:  # the pipeline's invariant; never expected
                raise RuntimeError(f"step {self.step_no + 1}: a batch from learner version {b.version} is {staleness} versions "
                                   f"old, past run.max_staleness_steps {cfg.run.max_staleness_steps}")
            answers = self._answers(b, times)
            # a request the engine refused (e.g. longer than its context) fails alone: its group
            # is left out of this step and counted, the engine and the other groups go on
            new = []
            for i, p, a in zip(b.idx, b.prompts, answers):
                if isinstance(a, dict):
                    log.error("step %d: the engine refused sample %r (%s), left out of the step: %s",
                              self.step_no + 1, self.samples[i].id, self.samples[i].source, a["refused"])
                    self.refused_requests += 1
                else:
                    new.append({"idx": i, "prompt": p, "answers": a, "staleness": staleness})
            if not new:
                continue
            with timed(times, "reward"):
                batch = [(a["text"], self.samples[g["idx"]].to_dict()) for g in new for a in g["answers"]]
                new_scores = self.rewards.score(batch, group_size=G)
            new_rewards, new_valid = _rewards_and_valid([new_scores])
            std = group_reward_std(new_rewards, G, valid=new_valid)
            drawn_groups += len(new)
            zero_std_groups += int((std == 0).sum())
            last_round = round_ == rounds - 1
            for k, g in enumerate(new):
                if cfg.run.dynamic_sampling and std[k] == 0 and not last_round:
                    continue
                if len(groups) < want:
                    groups.append({**g, "scores": new_scores[k * G : (k + 1) * G]})
        return groups, {"zero_std_groups": zero_std_groups, "drawn_groups": drawn_groups}

    def _learner_items(self, groups, adv, valid) -> list[dict]:
        """One learner item per non-empty answer with a reward: the prompt as sent to the engine
        (not rendered again) with the engine's token ids for it, the sampled token ids (never
        re-tokenised), their behaviour log-probs and the answer's advantage."""
        G = self.cfg.rollout.samples_per_prompt
        mode = self.cfg.learner.off_policy_correction
        items = []
        for g, grp in enumerate(groups):
            correct = mode == "always" or (mode == "stale" and grp["staleness"] > 0)
            for k, a in enumerate(grp["answers"]):
                if not a["token_ids"]:
                    continue  # an empty answer has no tokens to learn from; its group still normalised it
                if not valid[g * G + k]:
                    continue  # its reward failed (counted in reward/failures): no advantage to learn
                items.append({"prompt": grp["prompt"], "image": self.samples[grp["idx"]].image, "response_ids": a["token_ids"],
                              "prompt_ids": a.get("prompt_ids"), "advantage": float(adv[g * G + k]),
                              "engine_logp": a.get("logprobs"), "correct": correct})
        return items

    def _metrics(self, groups, group_r, group_valid, signal, learn, times) -> dict:
        """The step's figures; ``group_r``/``group_valid`` are the rewards and validity the
        advantages were computed from (``[B]``, group-major)."""
        scores = [g["scores"] for g in groups]
        answers = [g["answers"] for g in groups]
        idx = [g["idx"] for g in groups]
        # reward statistics over the answers that were scored (a failed score is not a 0)
        flat = [s for grp in scores for s in grp if not s.get("failed")] or [s for grp in scores for s in grp]
        rewards = torch_tensor([s["reward"] for s in flat])
        lens = [len(a["token_ids"]) for grp in answers for a in grp]
        tokens = max(sum(m["tokens"] for m in learn), 1)
        from rlsys.algorithm import group_reward_std

        G = self.cfg.rollout.samples_per_prompt
        std = group_reward_std(group_r, G, valid=group_valid)
        stale = Counter()
        for g in groups:
            stale[g["staleness"]] += len(g["answers"])
        self.staleness.update(stale)
        beh_tokens = sum(m["behaviour_tokens"] for m in learn)
        gap_tokens = sum(m["gap_tokens"] for m in learn)
        metrics = {
            "step": self.step_no,
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()),
            "reward/precision": sum(s["precision"] for s in flat) / len(flat),
            "reward/recall": sum(s["recall"] for s in flat) / len(flat),
            "reward/duplicate_rate": sum(bool(s["duplicate"]) for s in flat) / len(flat),
            "reward/large_box_rate": sum(bool(s["large_box"]) for s in flat) / len(flat),
            "reward/unreadable_per_answer": sum(s["unreadable"] for s in flat) / len(flat),
            "reward/failures": sum(bool(s.get("failed")) for grp in scores for s in grp),
            # which reward scored each answer (box_iou, point_in_mask, point_in_box_fallback, ...)
            **{f"reward/kind/{k}": n for k, n in sorted(Counter(s["kind"] for s in flat).items())},
            "groups/zero_std_fraction": signal["zero_std_groups"] / max(signal["drawn_groups"], 1),
            # groups with a spread below 0.02 (IoU noise): with advantage_scaling group_std their
            # answers still get advantages of +-1, the size of a real difference
            "groups/small_std_fraction": float(((std > 0) & (std < SMALL_GROUP_STD)).float().mean()) if len(std) else 0.0,
            "groups/reward_std_mean": float(std.mean()) if len(std) else 0.0,
            "learner/grad_norm": learn[0].get("grad_norm", 0.0),
            "learner/lr": learn[0].get("lr", 0.0),
            "answer/length_tokens": sum(lens) / len(lens),
            # The engine's and the learner's log-probs of the same sampled tokens, on answers made
            # by the learner's current weights, should agree; a growing gap means the learner
            # optimises another policy than the one that sampled (another image resolution, a
            # temperature mismatch; with top_p < 1 it also holds the nucleus renormalisation).
            "rollout/logprob_gap": sum(m["gap_sum"] for m in learn) / gap_tokens if gap_tokens else float("nan"),
            "rollout/engine_restarts": self.rollouts.restarts,
            "rollout/refused_requests": self.refused_requests,
            # how many learner versions behind the weights that made each answer were
            "rollout/staleness_mean": sum(k * n for k, n in stale.items()) / max(sum(stale.values()), 1),
            "rollout/staleness_max": max(stale) if stale else 0,
            **{f"rollout/staleness/{k}": n for k, n in sorted(stale.items())},
            "rollout/inflight_batches": len(self.inflight),
            "learner/kl": sum(m["kl"] * m["tokens"] for m in learn) / tokens,
            "learner/clip_fraction": sum(m["clip_fraction"] * m["tokens"] for m in learn) / tokens,
            "learner/entropy": sum(m["entropy"] * m["tokens"] for m in learn) / tokens,
            "learner/loss": sum(m["loss"] for m in learn),
            "learner/answers": sum(m["answers"] for m in learn),
            "learner/micro_batches_per_rank": learn[0]["micro_batches"],
            "learner/padded_micro_batches": sum(m["padded_micro_batches"] for m in learn),
            "learner/encoded_prompts": sum(m["encoded_prompts"] for m in learn),
            # off-policy correction over the answers it applied to (exp(learner - engine) per token)
            "learner/corrected_tokens": beh_tokens,
            "learner/behaviour_ratio_mean": sum(m["behaviour_w_sum"] for m in learn) / beh_tokens if beh_tokens else 1.0,
            "learner/behaviour_ratio_max": max(m["behaviour_w_max"] for m in learn) if beh_tokens else 1.0,
            "learner/behaviour_abs_log_ratio": sum(m["behaviour_abs_log_sum"] for m in learn) / beh_tokens if beh_tokens else 0.0,
            "learner/is_truncated_fraction": sum(m["behaviour_truncated"] for m in learn) / beh_tokens if beh_tokens else 0.0,
            "throughput/generated_tokens_per_s": sum(lens) / max(times.get("generate", 1e-9), 1e-9),
        }
        by_task: dict[str, list[float]] = {}
        for g, i in enumerate(idx):
            by_task.setdefault(self.samples[i].task, []).extend(s["reward"] for s in scores[g])
        metrics.update({f"reward/{t}": sum(v) / len(v) for t, v in by_task.items()})
        metrics.update({f"time/{k}_s": v for k, v in times.items()})
        metrics["prompt_ids"] = [self.samples[i].id for i in idx]
        self.last_examples = [(self.samples[idx[g]], answers[g][0]["text"], scores[g][0]["reward"]) for g in range(min(4, len(idx)))]
        return metrics

    def checksums(self) -> tuple[dict, list[dict | None]]:
        """The learner's digest of what a sync sends, and per engine the digest of what it received."""
        return self.learners.checksum(), self.rollouts.checksums()

    def logprob_gap(self, sample_index: int = 0) -> list[float]:
        """Per engine, the largest |engine - learner| log-prob over one prompt's tokens: ~0 when
        the engine computes with the learner's weights."""
        from rlsys.prompts import question_for_sample

        s = self.samples[sample_index]
        prompt = _chat_prompt(self.processor, question_for_sample(s, vocabulary=self.vocabulary))
        ids, lp = self.learners.prompt_logprobs(prompt, s.image)
        gaps = []
        for eids, elp in self.rollouts.prompt_logprobs(prompt, s.image):
            if eids != ids:
                raise RuntimeError("engine and learner tokenise the prompt differently: cannot compare log-probs")
            gaps.append(max(abs(a - b) for a, b in zip(lp, elp)))
        return gaps

    def weights_in_sync(self, tol: float = 1e-3) -> bool:
        """Every engine received exactly the tensors the learner holds (name by name) and computes
        the learner's log-probs; differences are logged."""
        from actors.weight_sync import compare_digests

        learner, engines = self.checksums()
        ok = True
        for k, e in enumerate(engines):
            diff = compare_digests(learner, e)
            if diff:
                ok = False
                log.warning("engine %d differs from the learner in %d tensor(s): %s", k, len(diff), "; ".join(diff[:5]))
        gaps = self.logprob_gap()
        if max(gaps) > tol:
            log.warning("engine log-probs differ from the learner's by up to %s (tolerance %g)", gaps, tol)
        return ok and max(gaps) <= tol

    def save(self, final: bool = False) -> Path:
        part = self.ckpt.partial(self.step_no)
        self.learners.save(str(part))
        state = {"step": self.step_no, "data_position": self.order.position, "config": self.cfg.model_dump(), "final": final,
                 # drawn ahead, not yet learnt from: a resumed run generates these first
                 "pending_batches": [{"step": b.step, "idx": b.idx} for b in self.inflight]}
        path = self.ckpt.commit(part, self.step_no, state)
        log.info("checkpoint written: %s", path)
        return path


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m rlsys.grpo", description=__doc__.split("\n\n")[0],
                                epilog="Overrides are dotted keys, e.g. run.steps=10 rollout.samples_per_prompt=8.")
    p.add_argument("--config", help="YAML values for the schema in rlsys/config.py (default: configs/tiny_cpu.yaml)")
    p.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    p.add_argument("overrides", nargs="*", help="key=value")
    return p.parse_args(argv)


def actor_env(cpu_only: bool) -> dict:
    """Environment the actors need that the driver's does not already carry (a local cluster's
    workers inherit the driver's; under `ray job submit` the job's runtime env provides its own,
    and Ray refuses a driver that sets a variable the job already sets): the repository on
    PYTHONPATH, and DeepSpeed's CPU accelerator when no GPU is used."""
    wanted = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    if cpu_only:
        wanted["DS_ACCELERATOR"] = "cpu"
    return {k: v for k, v in wanted.items() if k not in os.environ}


def run(cfg: GRPOConfig) -> dict:
    """Run GRPO to ``cfg.run.steps``; returns the last step's metrics and the final checkpoint."""
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(cfg)
    if cfg.model.path is None and cfg.run.init_checkpoint is None:
        log.warning("starting GRPO from the random-weight tiny model: it cannot write the output format yet, so "
                    "rewards stay near 0. Run SFT first (python -m rlsys.sft) and pass "
                    "run.init_checkpoint=runs/sft-tiny/final, or run the whole demo: python -m rlsys.demo")
    samples = prepare_data(cfg)
    from rlsys.models import processor_for
    from rlsys.prepare import check_fit, check_phrases, check_point_masks, check_targets
    from rlsys.vocab import vocabulary_for

    processor = processor_for(cfg.model, model_dir)
    vocabulary = vocabulary_for(cfg.model, processor)
    check_phrases(samples, processor.tokenizer)
    check_point_masks(samples, cfg.reward)
    check_targets(samples, vocabulary)  # chatrex: proposals for every sample
    # every prompt fits the engines' context under the pixel budget (else refused here, by name)
    samples, too_long = check_fit(samples, processor, cfg.rollout.max_model_len_tokens, cfg.rollout.max_new_tokens,
                                  cfg.data.too_long, vocabulary)
    if not samples:
        raise ConfigError(f"no training sample fits rollout.max_model_len_tokens {cfg.rollout.max_model_len_tokens} "
                          f"({too_long} skipped)")
    import ray

    if not ray.is_initialized():
        # Joins the cluster when there is one (RAY_ADDRESS is set under `ray job submit`), else
        # starts one here. Only variables the job has not set itself go into the runtime env: Ray
        # refuses a driver that sets one the job's runtime env already sets.
        ray.init(runtime_env={"env_vars": actor_env(cpu_only=cfg.learner.gpus_per_rank == 0)}, log_to_driver=True)
    trainer = Trainer(cfg, model_dir, samples, processor)
    resumed = trainer.step_no > 0
    # steps after the checkpoint resumed from are redone: their old records go
    keep_step_records(out / "steps.jsonl", trainer.step_no)
    tracker = start_tracking(wandb_init_args(cfg.tracking, out, out.name, cfg.model_dump(), continue_run=resumed))
    wandb_last = int(getattr(tracker, "step", 0) or 0) if resumed else 0
    if wandb_last > trainer.step_no:
        log.warning("the W&B run already holds steps up to %d, logged before the checkpoint of step %d this run resumed "
                    "from; W&B keeps those first values for steps %d..%d (it refuses earlier steps), steps.jsonl holds "
                    "the redone ones", wandb_last, trainer.step_no, trainer.step_no + 1, wandb_last)
    metrics: dict = {}
    recent: deque[float] = deque(maxlen=5)  # step times, for the time left
    label = f"{cfg.run.progress_label} " if cfg.run.progress_label else ""
    try:
        while trainer.step_no < cfg.run.steps:
            metrics = trainer.step()
            s = metrics["step"]
            # A plain per-step record beside W&B: greppable, and what resume tests compare.
            with (out / "steps.jsonl").open("a") as f:
                f.write(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list))}) + "\n")
            t = {k[5:-2]: v for k, v in metrics.items() if k.startswith("time/")}
            recent.append(t["step"])
            left_s = (cfg.run.steps - s) * sum(recent) / len(recent)
            stale = f" staleness {metrics['rollout/staleness_mean']:.2f}" if cfg.run.max_staleness_steps else ""
            print(f"{label}step {s}/{cfg.run.steps} reward {metrics['reward/mean']:.3f} kl {metrics['learner/kl']:.4f} "
                  f"len {metrics['answer/length_tokens']:.1f}{stale} | {t['step']:.1f} s/step, {left_s / 60:.1f} min left | "
                  + " ".join(f"{k} {v:.1f}s" for k, v in t.items() if k != "step"), flush=True)
            log_payload = dict(metrics)
            every = cfg.tracking.image_table_every_steps
            if every and s % every == 0:
                log_payload["examples"] = example_table(trainer.last_examples, trainer.vocabulary)
            log_payload.pop("prompt_ids")
            if s > wandb_last:
                tracker.log(log_payload, step=s)
            if s % cfg.run.checkpoint_every_steps == 0 or s == cfg.run.steps:
                metrics["checkpoint"] = str(trainer.save(final=s == cfg.run.steps))
        if trainer.step_no % cfg.run.sync_every_steps:
            trainer.sync_weights()
        metrics["weights_in_sync"] = trainer.weights_in_sync()
    finally:
        tracker.finish()
        trainer.shutdown()  # its placement groups freed: a next run in this Ray session can place its own
    return metrics


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print("\n".join(describe()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print("rlsys GRPO:", json.dumps(cfg.totals()), flush=True)
    try:
        m = run(cfg)
    except ConfigError as exc:  # the data or model did not fit the config (named in the message)
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print("final:", json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float, str, bool))}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
