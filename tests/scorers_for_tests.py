"""A scorer that misbehaves on purpose, for the reward group's fault tests: it hangs on samples
whose id contains "hang" and raises on "boom"; with "once" in the id, only on the first attempt
in any worker (attempts are recorded as marker files, since a retry may run in another process).
Otherwise it defers to the real scorer."""

import os
import tempfile
import time
from pathlib import Path

from rewards.scorer import score as real_score

MARKERS = Path(tempfile.gettempdir()) / "rlsys-test-scorer-markers"


def score(text, sample, **kw):
    MARKERS.mkdir(exist_ok=True)
    marker = MARKERS / sample.id
    first = not marker.exists()
    marker.touch()
    misbehave = first or "once" not in sample.id
    if "hang" in sample.id and misbehave:
        time.sleep(3600)
    if "boom" in sample.id and misbehave:
        raise RuntimeError(f"scorer exploded on {sample.id} in pid {os.getpid()}")
    return real_score(text, sample, **kw)


def coordinate_count_reward(text, sample, **kw):
    """A dense, text-only reward for the end-to-end test: the number of coordinate tokens in the
    answer, over 8, capped at 1. After a short SFT the policy's answers differ in it, so every
    group carries signal whatever the model's localisation; the geometric rewards are tested on
    their own."""
    import re

    from rewards.scorer import RewardResult

    n = len(re.findall(r"<\d+>", text.split("<|im_end|>")[0]))
    return RewardResult(
        reward=min(1.0, n / 8),
        kind="coordinate_count",
        precision=0.0,
        recall=0.0,
        num_pred=n,
        num_gt=len(sample.instances),
        unreadable=0,
        duplicate=False,
        large_box=False,
    )
