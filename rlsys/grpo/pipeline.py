"""Prompts into the rollout group, generated ahead of the learner within a staleness bound.

:class:`PromptOrder` is the resumable prompt stream. :class:`RolloutPipeline` owns the batches
generating ahead (``run.max_staleness_steps`` N > 0): the engines work on the next batches while
the learner trains on this one, and an answer is never learnt more than N learner versions after
the weights that made it. With N = 0 it is the synchronous loop.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rlsys.grpo.records import Answer, Refusal
from rlsys.grpo.timing import timed

log = logging.getLogger("rlsys.grpo")


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
    job: object | None = None  # the rollout group's job while generating
    answers: list[list[Answer] | Refusal] | None = None


class RolloutPipeline:
    """The batches submitted to the rollout group and not yet learnt from, oldest first.

    ``requests(step, idx)`` renders the prompts of samples ``idx`` drawn for ``step``: a list of
    ``{"prompt", "image"}``. ``version`` is the learner's update count, ``engine_version`` the
    update count of the weights the engines hold (set by the controller after each push). The
    run section (:class:`rlsys.config.RunConfig`) is read at each call: prompts per step, the
    staleness bound and the run's length may change between steps."""

    def __init__(self, rollouts, order: PromptOrder, requests: Callable[[int, list[int]], list[dict]], run_cfg):
        self.rollouts, self.order, self.requests, self.run = rollouts, order, requests, run_cfg
        self.engine_version = 0
        self.inflight: deque[Batch] = deque()

    def submit(self, step: int, idx: list[int]) -> Batch:
        """Start generating G answers for each of ``idx`` (returns at once)."""
        reqs = self.requests(step, idx)
        job = self.rollouts.submit(reqs, step=step)
        return Batch(step, list(idx), [r["prompt"] for r in reqs], self.engine_version, job=job)

    def answers(self, b: Batch, times: dict) -> list:
        """The batch's answers, waiting for them if they are still being generated."""
        if b.answers is None:
            with timed(times, "generate"):
                b.answers = self.rollouts.collect(b.job)
            b.job = None
        return b.answers

    def next_batch(self, version: int, times: dict) -> Batch:
        """The batch for learner ``version``'s step: the oldest one generating ahead, or one drawn
        now. Then the pipeline is topped up so the engines work on the next batches while this
        one is scored and learnt."""
        N, want = self.run.max_staleness_steps, self.run.prompts_per_step
        b = self.inflight.popleft() if self.inflight else self.submit(version + 1, self.order.take(want))
        if version - b.version > N:
            # drawn under a looser bound (max_staleness_steps lowered since): the same prompts
            # are generated again with the current weights, not dropped
            log.warning(
                "step %d: the batch drawn ahead is %d versions old, past run.max_staleness_steps %d: "
                "generating its prompts again",
                version + 1,
                version - b.version,
                N,
            )
            self.answers(b, {})
            b = self.submit(b.step, b.idx)
        while len(self.inflight) < N:
            step = version + 2 + len(self.inflight)
            # it will be learnt at learner version step - 1; past the bound (or the run) it waits
            if step > self.run.steps or (step - 1) - self.engine_version > N:
                break
            self.inflight.append(self.submit(step, self.order.take(want)))
        return b

    def finish(self, times: dict) -> None:
        """Wait for the batches generating ahead: they were submitted on the engines' current
        weights and finish on them, so a weight push lands between requests."""
        for b in self.inflight:
            self.answers(b, times)

    def pending(self) -> list[dict]:
        """Drawn ahead, not yet learnt from: a checkpoint keeps them so a resumed run generates
        these first (none lost, none drawn twice)."""
        return [{"step": b.step, "idx": b.idx} for b in self.inflight]

    def resubmit(self, pending: list[dict]) -> None:
        for b in pending:
            self.inflight.append(self.submit(b["step"], b["idx"]))
