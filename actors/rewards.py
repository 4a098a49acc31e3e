"""Reward worker group: CPU Ray actors that score answers against their images' ground truth.

The rules are in :mod:`rewards` (pure functions). Here: spreading a batch over the workers, a
timeout on every call, one retry per failed sample, then a zero reward that is logged and
counted. A step never waits on a reward without a limit.
"""

from __future__ import annotations

import logging
import time

import ray

log = logging.getLogger(__name__)


def _zero(error: str) -> dict:
    return {"reward": 0.0, "kind": "error", "precision": 0.0, "recall": 0.0, "num_pred": 0, "num_gt": 0,
            "unreadable": 0, "duplicate": False, "large_box": False, "error": error, "failed": True}


@ray.remote
class RewardWorker:
    def __init__(self, matching: str, sam_checkpoint: str | None = None, scorer: str = "rewards.scorer:score"):
        import importlib

        module, _, fn = scorer.partition(":")
        self.score_fn = getattr(importlib.import_module(module), fn)
        self.matching = matching
        self.mask_source = None
        if sam_checkpoint:
            from rewards.sam import SamMaskSource

            self.mask_source = SamMaskSource(sam_checkpoint)

    def ready(self) -> bool:
        # Import the scoring stack now, so the first batch's timeout measures scoring only.
        import rewards.scorer  # noqa: F401
        import rlsys.data  # noqa: F401

        return True

    def score_batch(self, items: list[tuple[str, dict]]) -> list[dict]:
        """``items``: (answer text, sample dict). A sample that raises comes back with ``failed``."""
        from dataclasses import asdict

        from rlsys.data import Sample

        out = []
        for text, sd in items:
            try:
                r = asdict(self.score_fn(text, Sample.from_dict(sd), mask_source=self.mask_source, matching=self.matching))
                r["failed"] = False
            except Exception as exc:  # reported to the controller, which retries once
                r = _zero(f"{type(exc).__name__}: {exc}")
            out.append(r)
        return out


class RewardGroup:
    """Driver-side handle over ``num_workers`` reward actors."""

    def __init__(self, num_workers: int, matching: str, sample_timeout_s: float, sam_checkpoint=None,
                 cpus_per_worker: float = 0.5, scorer: str = "rewards.scorer:score"):
        self.matching, self.sam, self.cpus, self.scorer = matching, sam_checkpoint, cpus_per_worker, scorer
        self.workers = [self._start() for _ in range(num_workers)]
        self.sample_timeout_s = sample_timeout_s
        self.failures = 0

    def _call(self, worker, items, timeout_s):
        ref = worker.score_batch.remote(items)
        ready, _ = ray.wait([ref], timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"reward worker gave no answer for {len(items)} samples in {timeout_s:.0f} s")
        return ray.get(ref)

    def score(self, items: list[tuple[str, dict]]) -> list[dict]:
        n = len(self.workers)
        chunks = [list(range(i, len(items), n)) for i in range(n)]
        results: list[dict | None] = [None] * len(items)
        refs = {w: (idx, w.score_batch.remote([items[i] for i in idx])) for w, idx in zip(self.workers, chunks) if idx}
        deadline = time.monotonic() + self.sample_timeout_s * max(len(c) for c in chunks)
        for w, (idx, ref) in refs.items():
            ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            try:
                if not ready:
                    raise TimeoutError("chunk timed out")
                for i, r in zip(idx, ray.get(ref)):
                    results[i] = r
            except Exception as exc:  # a dead or stuck worker: its samples are retried below
                log.warning("reward worker failed on %d samples (%s); retrying them one by one", len(idx), exc)
                self._replace(w)
        for i, r in enumerate(results):
            if r is None or r.get("failed"):
                results[i] = self._retry(items[i], first_error=r["error"] if r else "worker failed")
        return results  # type: ignore[return-value]

    def _retry(self, item, first_error: str) -> dict:
        worker = self.workers[0]
        try:
            r = self._call(worker, [item], self.sample_timeout_s)[0]
        except Exception as exc:
            self._replace(worker)
            r = _zero(f"{first_error}; retry: {exc}")
        if r.get("failed"):
            self.failures += 1
            log.error("reward for sample %s failed twice, scored 0: %s", item[1].get("id"), r["error"])
        return r

    def _start(self, start_timeout_s: float = 300.0):
        w = RewardWorker.options(num_cpus=self.cpus).remote(self.matching, self.sam, self.scorer)
        ready, _ = ray.wait([w.ready.remote()], timeout=start_timeout_s)
        if not ready:
            raise TimeoutError(f"a reward worker did not start within {start_timeout_s:.0f} s")
        return w

    def _replace(self, worker) -> None:
        """Kill a stuck or dead worker (its running task dies with it) and start a fresh one."""
        k = self.workers.index(worker)
        ray.kill(worker, no_restart=True)
        self.workers[k] = self._start()
