"""Stage timers of a GRPO step (pure)."""

from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def timed(times: dict[str, float], name: str):
    """Add the seconds spent inside the block to ``times[name]`` (a stage may run several times
    in one step: dynamic sampling's extra rounds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
