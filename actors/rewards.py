"""Reward worker group: CPU Ray actors that score answers against their images' ground truth.

The rules are in :mod:`rewards` (pure functions). Here: spreading a batch over the workers, a
timeout on every call, one retry per failed sample, then a zero reward that is logged and
counted. A step never waits on a reward without a limit.
"""

from __future__ import annotations

import logging

import ray

import rewards.scorer  # noqa: F401
import rlsys.data.samples  # noqa: F401
from actors.group import MemberFailed, Members, bundle, by_group, round_robin
from rewards.sam import SamMaskSource
from rewards.scorer import load_scorer, takes_vocabulary
from rlsys.config import RewardConfig
from rlsys.data.samples import Sample
from rlsys.grpo.records import Score

log = logging.getLogger(__name__)


@ray.remote
class RewardWorker:
    def __init__(
        self, matching: str, sam_checkpoint: str | None = None, scorer: str = "rewards.scorer:score", vocabulary=None
    ):

        self.score_fn = load_scorer(scorer)
        self.matching = matching
        # the model's vocabulary reaches the scorer as ``vocabulary=``; a custom scorer without
        # that argument reads the default bins only
        self.extra = {"vocabulary": vocabulary} if vocabulary is not None else {}
        self.mask_source = None
        if sam_checkpoint:
            self.mask_source = SamMaskSource(sam_checkpoint)

    def ready(self) -> bool:
        # Import the scoring stack now, so the first batch's timeout measures scoring only.

        return True

    def score_batch(self, items: list[tuple[str, dict]]) -> list[Score]:
        """``items``: (answer text, sample dict). A sample that raises comes back with ``failed``."""

        out = []
        for text, sd in items:
            try:
                r = Score.of(
                    self.score_fn(
                        text, Sample.from_dict(sd), mask_source=self.mask_source, matching=self.matching, **self.extra
                    )
                )
            except Exception as exc:  # reported to the controller, which retries once
                r = Score.failure(f"{type(exc).__name__}: {exc}")
            out.append(r)
        return out


def scorer_vocabulary(scorer: str, vocabulary):
    """What to hand ``scorer`` as ``vocabulary=``: ``vocabulary`` when the scorer takes it (or
    ``**kwargs``); None (not passed) for one that does not, which is refused unless the
    vocabulary is the default bins: such a scorer would read another language than the model's."""

    if vocabulary is None:
        return None
    if takes_vocabulary(load_scorer(scorer)):
        return vocabulary
    if vocabulary.name != "rex_bins":
        raise ValueError(
            f"reward.scorer {scorer} takes no vocabulary= argument, so it cannot read model.vocabulary "
            f"{vocabulary.name}; add the argument (see rewards.scorer.score)"
        )
    return None


class RewardGroup:
    """Driver-side handle over ``num_workers`` reward actors (:class:`actors.group.Members`, one
    placement group, SPREAD).

    Sharding: by prompt group: a group's G answers go to one worker (per-image state such as a
    SAM embedding is computed once), groups dealt to the workers in turn. One deadline for the
    batch: ``sample_timeout_s`` per answer of the largest share. Failure policy: a dead or stuck
    worker is replaced in its bundle and its answers retried one by one; an answer that fails
    twice scores 0, is flagged ``failed`` (left out of its group's statistics) and counted."""

    name = "reward"

    def __init__(self, cfg: RewardConfig, start_timeout_s: float = 300.0, vocabulary=None):
        self.cfg = cfg
        voc = scorer_vocabulary(cfg.scorer, vocabulary)

        def start(k: int, strategy):
            return RewardWorker.options(num_cpus=cfg.cpus_per_worker, scheduling_strategy=strategy).remote(
                cfg.matching, cfg.sam_checkpoint, cfg.scorer, voc
            )

        bundles = [bundle(cfg.cpus_per_worker, 0, cfg.resources_per_worker)] * cfg.num_workers
        self.members = Members(self.name, bundles, "SPREAD", start_timeout_s, start)
        self.members.each([w.ready.remote() for w in self.workers], start_timeout_s, "start-up")
        self.failures = 0
        self.last_shards: list[list[int]] = []

    @property
    def workers(self) -> list:
        return self.members.handles

    @property
    def replaced(self) -> int:
        return self.members.restarts

    def score(self, items: list[tuple[str, dict]], group_size: int = 1) -> list[Score]:
        """Score ``items`` (answer text, sample dict), consecutive runs of ``group_size`` being one
        prompt's answers; results in the same order."""
        n = len(self.workers)
        if group_size > 1 and len(items) % group_size == 0:
            chunks = by_group(len(items) // group_size, group_size, n)
        else:
            chunks = round_robin(len(items), n)
        self.last_shards = chunks
        results: list[Score | None] = [None] * len(items)
        refs = {k: self.workers[k].score_batch.remote([items[i] for i in idx]) for k, idx in enumerate(chunks) if idx}
        limit = self.cfg.sample_timeout_s * max((len(c) for c in chunks), default=1)
        for k, r in self.members.wait(refs, limit, f"scoring {len(items)} answers").items():
            if isinstance(r, MemberFailed):  # a dead or stuck worker: its answers are retried below
                log.warning(
                    "%s; replacing it and retrying its %d answers one by one", str(r).splitlines()[0], len(chunks[k])
                )
                self.members.restart(k, ready="ready")
                continue
            for i, score in zip(chunks[k], r):
                results[i] = score
        for i, r in enumerate(results):
            if r is None or r.failed:
                results[i] = self._retry(items[i], first_error=r.error if r else "worker failed")
        return results  # type: ignore[return-value]

    def _retry(self, item, first_error: str) -> Score:
        r = self.members.wait({0: self.workers[0].score_batch.remote([item])}, self.cfg.sample_timeout_s, "a retry")[0]
        if isinstance(r, MemberFailed):
            self.members.restart(0, ready="ready")
            r = Score.failure(f"{first_error}; retry: {r}")
        else:
            r = r[0]
        if r.failed:
            self.failures += 1
            log.error("reward for sample %s failed twice, scored 0: %s", item[1].get("id"), r.error)
        return r

    def shutdown(self) -> None:
        self.members.shutdown()
