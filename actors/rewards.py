"""Reward worker group: CPU Ray actors that score answers against their images' ground truth.

The rules are in :mod:`rewards` (pure functions). Here: spreading a batch over the workers, a
timeout on every call, one retry per failed sample, then a zero reward that is logged and
counted. A step never waits on a reward without a limit.
"""

from __future__ import annotations

import logging
import time

import ray

import rewards.scorer  # noqa: F401
import rlsys.data.samples  # noqa: F401
from actors.group import bundle, by_group, in_bundle, placement_group, round_robin, tear_down
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
    """Driver-side handle over ``num_workers`` reward actors (one placement group, SPREAD).

    Sharding: by prompt group: a group's G answers go to one worker (per-image state such as a
    SAM embedding is computed once), groups dealt to the workers in turn. Each worker's share has
    ``sample_timeout_s`` per answer; a dead or stuck worker is replaced in its bundle and its
    answers retried one by one; an answer that fails twice scores 0, is flagged ``failed`` and
    counted."""

    name = "reward"

    def __init__(self, cfg: RewardConfig, start_timeout_s: float = 300.0, vocabulary=None):
        num_workers, matching, sam_checkpoint, scorer = cfg.num_workers, cfg.matching, cfg.sam_checkpoint, cfg.scorer
        cpus_per_worker, resources_per_worker, sample_timeout_s = (
            cfg.cpus_per_worker,
            cfg.resources_per_worker,
            cfg.sample_timeout_s,
        )

        self.matching, self.sam, self.cpus, self.scorer = matching, sam_checkpoint, cpus_per_worker, scorer
        self.vocabulary = scorer_vocabulary(scorer, vocabulary)
        self.start_timeout_s = start_timeout_s
        self.pg = placement_group(
            "reward", [bundle(cpus_per_worker, 0, resources_per_worker)] * num_workers, "SPREAD", start_timeout_s
        )
        self.workers = [self._create(k) for k in range(num_workers)]
        self._wait_ready(list(range(num_workers)))
        self.sample_timeout_s = sample_timeout_s
        self.failures = 0
        self.replaced = 0
        self.last_shards: list[list[int]] = []

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
        refs = {
            k: (idx, self.workers[k].score_batch.remote([items[i] for i in idx])) for k, idx in enumerate(chunks) if idx
        }
        deadline = time.monotonic() + self.sample_timeout_s * max((len(c) for c in chunks), default=1)
        for k, (idx, ref) in refs.items():
            ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            try:
                if not ready:
                    raise TimeoutError("chunk timed out")
                for i, r in zip(idx, ray.get(ref)):
                    results[i] = r
            except Exception as exc:  # a dead or stuck worker: its samples are retried below
                log.warning(
                    "reward worker %d failed on %d samples (%s); replacing it and retrying them one by one",
                    k,
                    len(idx),
                    str(exc).splitlines()[0],
                )
                self._replace(k)
        for i, r in enumerate(results):
            if r is None or r.failed:
                results[i] = self._retry(items[i], first_error=r.error if r else "worker failed")
        return results  # type: ignore[return-value]

    def _call(self, worker, items, timeout_s):
        ref = worker.score_batch.remote(items)
        ready, _ = ray.wait([ref], timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"reward worker gave no answer for {len(items)} samples in {timeout_s:.0f} s")
        return ray.get(ref)

    def _retry(self, item, first_error: str) -> Score:
        try:
            r = self._call(self.workers[0], [item], self.sample_timeout_s)[0]
        except Exception as exc:
            self._replace(0)
            r = Score.failure(f"{first_error}; retry: {exc}")
        if r.failed:
            self.failures += 1
            log.error("reward for sample %s failed twice, scored 0: %s", item[1].get("id"), r.error)
        return r

    def _create(self, k: int):

        return RewardWorker.options(num_cpus=self.cpus, scheduling_strategy=in_bundle(self.pg, k)).remote(
            self.matching, self.sam, self.scorer, self.vocabulary
        )

    def _wait_ready(self, ks: list[int]) -> None:
        refs = [self.workers[k].ready.remote() for k in ks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s)
        if len(ready) < len(refs):
            raise TimeoutError(
                f"reward worker(s) {[k for k, r in zip(ks, refs) if r not in ready]} did not start "
                f"within {self.start_timeout_s:.0f} s"
            )

    def _replace(self, k: int) -> None:
        """Kill a stuck or dead worker (its running task dies with it) and start a fresh one in its bundle."""
        ray.kill(self.workers[k], no_restart=True)
        self.workers[k] = self._create(k)
        self._wait_ready([k])
        self.replaced += 1

    def shutdown(self) -> None:
        """Kill the members and free the placement group."""

        tear_down(self.workers, self.pg)
