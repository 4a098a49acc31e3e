"""The GRPO controller: :class:`Trainer` holds the three actor groups and :meth:`Trainer.step` is
one step of the paper's section 4.2.

It takes its groups as arguments (:class:`Groups`), so its logic (dynamic sampling, the staleness
bound, pending batches after a resume, refused requests, failed rewards) is tested with
in-process fakes (``tests/test_controller.py``) as well as with real Ray actors. The groups own
placement, sharding, timeouts and what a dead member costs (``actors/``); the controller never
touches a single actor.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from actors.weight_digest import compare_digests
from rlsys.config import GRPOConfig
from rlsys.data.samples import Sample
from rlsys.grpo.algorithm import group_advantages, group_reward_std
from rlsys.grpo.checkpoints import Checkpoints
from rlsys.grpo.metrics import rewards_and_valid, step_metrics
from rlsys.grpo.pipeline import PromptOrder, RolloutPipeline
from rlsys.grpo.records import LearnerItem, LearnerStats, Refusal, ScoredGroup
from rlsys.grpo.timing import timed
from rlsys.lang.prompts import chat_prompt, question_for_sample

log = logging.getLogger("rlsys.grpo")


@dataclass
class Groups:
    """What the controller drives. Real ones are built by :func:`rlsys.grpo.run.start_groups`
    (Ray actors); tests pass in-process fakes with the same methods:

    - ``rollouts``: ``submit(requests, step=) -> job``, ``collect(job) -> [list[Answer] | Refusal]``,
      ``restarts``, ``on_restart``, ``checksums()``, ``prompt_logprobs(prompt, image)``, ``shutdown()``;
    - ``rewards``: ``score([(text, sample dict)], group_size=) -> [Score]``, ``replaced`` (workers
      replaced so far), ``shutdown()``;
    - ``learners``: ``reference(items) -> items with ref_logp``, ``train(items) -> LearnerStats``,
      ``save(path)``, ``load(path)``, ``checksum()``, ``prompt_logprobs(prompt, image)``, ``shutdown()``;
    - ``weights``: ``push() -> seconds`` (the learner's weights into every engine).
    """

    rollouts: object
    rewards: object
    learners: object
    weights: object

    def shutdown(self) -> None:
        """Kill the groups' actors and free their placement groups, so another run can place its
        own in the same Ray session. Each group is torn down even if another fails."""
        for name in ("rollouts", "rewards", "learners"):
            group = getattr(self, name)
            if group is None:
                continue
            try:
                group.shutdown()
            except Exception as exc:  # an actor already dead; the others still go
                log.warning("shutting down the %s group: %s: %s", name, type(exc).__name__, exc)
            setattr(self, name, None)


class Trainer:
    """One GRPO run's state (learner version, prompt position, batches generating ahead) over
    its :class:`Groups`. Resumes from the last checkpoint when ``run.resume`` is set."""

    def __init__(self, cfg: GRPOConfig, groups: Groups, samples: list[Sample], processor, vocabulary):
        self.cfg, self.groups, self.samples = cfg, groups, samples
        self.processor, self.vocabulary = processor, vocabulary  # questions and rewards speak the vocabulary
        self.out = Path(cfg.run.out_dir)
        self.ckpt = Checkpoints(self.out, keep=cfg.run.keep_checkpoints)
        self.step_no = 0  # learner updates so far: the learner's policy version
        self.refused_requests = 0  # prompts the engines would not take, over the run
        self.bad_images: list[str] = []  # images that did not decode in a worker, with their samples
        self.staleness = Counter()  # answers learnt from, by staleness, over the run
        self.last_examples: list = []
        self._last_step_end: float | None = None
        # a restarted engine gets the current weights before its prompts are retried
        groups.rollouts.on_restart = lambda engines: groups.weights.push()

        last = self.ckpt.latest() if cfg.run.resume else None
        order, pending = PromptOrder(len(samples), cfg.run.seed), []
        if last is not None:
            state = json.loads((last / "trainer_state.json").read_text())
            groups.learners.load(str(last))
            self.step_no = state["step"]
            order = PromptOrder(len(samples), cfg.run.seed, state["data_position"])
            pending = state.get("pending_batches", [])
            log.info("resumed from %s at step %d", last, self.step_no)
        self.pipeline = RolloutPipeline(groups.rollouts, order, self._requests, cfg.run)
        # Engines start from the model directory; the first push also opens the transfer group,
        # so its cost is paid here rather than inside step 1's timing.
        self.sync_weights()
        # prompts drawn ahead before the checkpoint (asynchronous rollouts) are generated again,
        # with the same questions: none is lost, none is drawn twice
        self.pipeline.resubmit(pending)

    @property
    def order(self) -> PromptOrder:
        return self.pipeline.order

    @property
    def inflight(self):
        return self.pipeline.inflight

    def shutdown(self) -> None:
        """Batches still generating are dropped; the groups are torn down."""
        self.pipeline.inflight.clear()
        self.groups.shutdown()

    def _requests(self, step: int, idx: list[int]) -> list[dict]:
        """The chat prompts of samples ``idx`` drawn for ``step`` (a question is drawn per step)."""
        out = []
        for i in idx:
            q = question_for_sample(
                self.samples[i],
                random.Random(f"{self.cfg.run.seed}-{step - 1}-{i}"),
                self.vocabulary,
                self.cfg.model.prompt_set,
            )
            out.append(
                {"prompt": chat_prompt(self.processor, q, self.cfg.model.prompt_set), "image": self.samples[i].image}
            )
        return out

    def _bad_image(self, sample: Sample, reason: str) -> None:
        """An image that passed the check at start but did not decode in a worker: counted,
        reported with its sample; past ``data.max_bad_images`` the run stops with the list."""
        self.bad_images.append(f"{sample.source}, id {sample.id!r}: {reason}")
        if len(self.bad_images) > self.cfg.data.max_bad_images:
            raise RuntimeError(
                f"{len(self.bad_images)} images failed to decode in the rollout workers, past data.max_bad_images "
                f"{self.cfg.data.max_bad_images}; fix or remove them and resume:\n  " + "\n  ".join(self.bad_images)
            )

    def sync_weights(self) -> float:
        """The learner's weights into every engine (vLLM's weight-transfer protocol), between
        requests: generation already submitted finishes on the old weights first."""
        self.pipeline.finish({})
        t = self.groups.weights.push()
        self.pipeline.engine_version = self.step_no
        return t

    def step(self) -> dict:
        """One GRPO step (the paper's section 4.2), each stage timed."""
        times: dict[str, float] = {}
        t_start = time.perf_counter()
        G = self.cfg.rollout.samples_per_prompt
        # 1-2. prompts -> G answers each (generated ahead when asynchronous) -> rewards against
        #      each image's ground truth
        groups, drawn, zero_std = self._sample_groups(times)
        # 3. group-normalised advantages; failed scores are out of the group statistics
        rewards, valid = rewards_and_valid([s for g in groups for s in g.scores])
        adv = group_advantages(rewards, G, valid=valid, scale=self.cfg.learner.advantage_scaling)
        items = self._learner_items(groups, adv.tolist(), valid.tolist())
        # 4. reference log-probs of the sampled tokens (the only extra forward; none without KL).
        #    The "old" policy is the learner's weights before this update: its training forward gives them.
        if self.cfg.learner.kl_coef > 0:
            with timed(times, "reference"):
                items = self.groups.learners.reference(items)
        # 5. the clipped-ratio update with the KL penalty, one optimizer step over all ranks;
        #    answers from older weights are importance-weighted by the engines' log-probs
        with timed(times, "learn"):
            learn: LearnerStats = self.groups.learners.train(items)
        self.step_no += 1
        # 6. weight sync to the generators
        if self.step_no % self.cfg.run.sync_every_steps == 0:
            self.pipeline.finish(times)  # counted as generate: the wait for the batch generating ahead
            with timed(times, "sync"):
                self.sync_weights()
        now = time.perf_counter()
        # idle: this step's time outside its stages; step: wall time between consecutive step ends
        # (checkpoints and logging included), so the synchronous and the asynchronous loop compare
        times["idle"] = max(0.0, (now - t_start) - sum(times.values()))
        times["step"] = now - (self._last_step_end if self._last_step_end is not None else t_start)
        self._last_step_end = now
        for g in groups:
            self.staleness[g.staleness] += len(g.answers)
        self.last_examples = [(self.samples[g.idx], g.answers[0].text, g.scores[0].reward) for g in groups[:4]]
        metrics = step_metrics(
            step=self.step_no,
            groups=groups,
            tasks=[self.samples[g.idx].task for g in groups],
            group_size=G,
            drawn_groups=drawn,
            zero_std_groups=zero_std,
            learn=learn,
            times=times,
            engine_restarts=self.groups.rollouts.restarts,
            reward_worker_replacements=self.groups.rewards.replaced,
            refused_requests=self.refused_requests,
            bad_images=len(self.bad_images),
            inflight_batches=len(self.pipeline.inflight),
        )
        metrics["prompt_ids"] = [self.samples[g.idx].id for g in groups]
        return metrics

    def _sample_groups(self, times: dict) -> tuple[list[ScoredGroup], int, int]:
        """This step's groups with their answers and rewards, the groups drawn and those with no
        reward spread. With dynamic sampling (DAPO), groups whose rewards have no spread carry no
        signal: they are dropped and more prompts drawn, up to ``run.max_resample_rounds`` extra
        rounds; past the last round they are kept. Filtered on std, not mean: rewards are continuous."""
        cfg, G = self.cfg, self.cfg.rollout.samples_per_prompt
        want = cfg.run.prompts_per_step
        groups: list[ScoredGroup] = []
        zero_std_groups, drawn_groups = 0, 0
        rounds = 1 + (cfg.run.max_resample_rounds if cfg.run.dynamic_sampling else 0)
        for round_ in range(rounds):
            need = want - len(groups)
            if need <= 0:
                break
            if round_ == 0:
                b = self.pipeline.next_batch(self.step_no, times)
            else:
                b = self.pipeline.submit(self.step_no + 1, self.pipeline.order.take(need))
            staleness = self.step_no - b.version
            if staleness > cfg.run.max_staleness_steps:  # the pipeline's invariant; never expected
                raise RuntimeError(
                    f"step {self.step_no + 1}: a batch from learner version {b.version} is {staleness} versions "
                    f"old, past run.max_staleness_steps {cfg.run.max_staleness_steps}"
                )
            answers = self.pipeline.answers(b, times)
            # a request the engine refused (e.g. longer than its context) fails alone: its group
            # is left out of this step and counted, the engine and the other groups go on
            new = []
            for i, p, a in zip(b.idx, b.prompts, answers):
                if isinstance(a, Refusal):
                    log.error(
                        "step %d: the engine refused sample %r (%s), left out of the step: %s",
                        self.step_no + 1,
                        self.samples[i].id,
                        self.samples[i].source,
                        a.reason,
                    )
                    self.refused_requests += 1
                    if a.image_unreadable:
                        self._bad_image(self.samples[i], a.reason)
                else:
                    new.append((i, p, a))
            if not new:
                continue
            with timed(times, "reward"):
                batch = [(a.text, self.samples[i].to_dict()) for i, _, ans in new for a in ans]
                scores = self.groups.rewards.score(batch, group_size=G)
            r, v = rewards_and_valid(scores)
            std = group_reward_std(r, G, valid=v)
            drawn_groups += len(new)
            zero_std_groups += int((std == 0).sum())
            last_round = round_ == rounds - 1
            for k, (i, p, ans) in enumerate(new):
                if cfg.run.dynamic_sampling and std[k] == 0 and not last_round:
                    continue
                if len(groups) < want:
                    groups.append(ScoredGroup(i, p, ans, scores[k * G : (k + 1) * G], staleness))
        return groups, drawn_groups, zero_std_groups

    def _learner_items(self, groups: list[ScoredGroup], adv: list[float], valid: list[bool]) -> list[LearnerItem]:
        """One learner item per non-empty answer with a reward: the prompt as sent to the engine
        (not rendered again) with the engine's token ids for it, the sampled token ids (never
        re-tokenised), their behaviour log-probs and the answer's advantage."""
        G = self.cfg.rollout.samples_per_prompt
        mode = self.cfg.learner.off_policy_correction
        items = []
        for g, grp in enumerate(groups):
            correct = mode == "always" or (mode == "stale" and grp.staleness > 0)
            for k, a in enumerate(grp.answers):
                if not a.token_ids:
                    continue  # an empty answer has no tokens to learn from; its group still normalised it
                if not valid[g * G + k]:
                    continue  # its reward failed (counted in reward/failures): no advantage to learn
                items.append(
                    LearnerItem(
                        prompt=grp.prompt,
                        image=self.samples[grp.idx].image,
                        response_ids=a.token_ids,
                        prompt_ids=a.prompt_ids,
                        advantage=float(adv[g * G + k]),
                        engine_logp=a.logprobs,
                        correct=correct,
                    )
                )
        return items

    # -- checks of the weight sync ---------------------------------------------------------------
    def checksums(self) -> tuple[dict, list[dict | None]]:
        """The learner's digest of what a sync sends, and per engine the digest of what it received."""
        return self.groups.learners.checksum(), self.groups.rollouts.checksums()

    def logprob_gap(self, sample_index: int = 0) -> list[float]:
        """Per engine, the largest |engine - learner| log-prob over one prompt's tokens: ~0 when
        the engine computes with the learner's weights."""
        s = self.samples[sample_index]
        ps = self.cfg.model.prompt_set
        prompt = chat_prompt(self.processor, question_for_sample(s, vocabulary=self.vocabulary, prompt_set=ps), ps)
        ids, lp = self.groups.learners.prompt_logprobs(prompt, s.image)
        gaps = []
        for eids, elp in self.groups.rollouts.prompt_logprobs(prompt, s.image):
            if eids != ids:
                raise RuntimeError("engine and learner tokenise the prompt differently: cannot compare log-probs")
            gaps.append(max(abs(a - b) for a, b in zip(lp, elp)))
        return gaps

    def weights_in_sync(self, tol: float = 1e-3) -> bool:
        """Every engine received exactly the tensors the learner holds (name by name) and computes
        the learner's log-probs; differences are logged."""
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
        """An atomic checkpoint: the learner's state, the prompt position and the batches drawn
        ahead (a resumed run generates those first)."""
        part = self.ckpt.partial(self.step_no)
        self.groups.learners.save(str(part))
        state = {
            "step": self.step_no,
            "data_position": self.pipeline.order.position,
            "config": self.cfg.model_dump(),
            "final": final,
            "pending_batches": self.pipeline.pending(),
        }
        path = self.ckpt.commit(part, self.step_no, state)
        log.info("checkpoint written: %s", path)
        return path
