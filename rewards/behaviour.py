"""The two failure behaviours of paper section 6.1.2, as predicates on one answer.

- Duplicate (repeated) prediction: "a coordinate sequence where the same value appeared
  consecutively at least 10 times, with the total number of predicted boxes exceeding twice the
  ground-truth count". Repeated boxes do not repeat a value *token after token*
  (``<12><42><512><612>,<12><42>...``), so we read "consecutively" two ways and take the
  longer run: (a) along the flat token stream, (b) slot by slot across consecutive instances
  (``x0`` of instance k against ``x0`` of instance k+1, ...; instances of equal length), which
  also catches "slightly shifted" copies that keep one coordinate. Runs are counted in tokens
  for (a) and in instances for (b).
- Large box: "only one bounding box was predicted in the image, and its area exceeded 95% of
  the total image size".

Used by :mod:`rewards.scorer` (flags on each reward) and :mod:`rewards.metrics` (rates).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DUPLICATE_MIN_RUN = 10
DUPLICATE_GT_FACTOR = 2
LARGE_BOX_FRACTION = 0.95


def longest_repeat_run(instances: Sequence[Sequence[float]]) -> int:
    """Longest run of one coordinate value, per the module docstring (0 for no instance)."""
    best = 0
    flat = [v for inst in instances for v in inst]
    run = 0
    for k, v in enumerate(flat):
        run = run + 1 if k and v == flat[k - 1] else 1
        best = max(best, run)
    runs: list[int] = []
    for k, inst in enumerate(instances):
        if k and len(inst) == len(instances[k - 1]):
            runs = [r + 1 if v == u else 1 for r, v, u in zip(runs, inst, instances[k - 1])]
        else:
            runs = [1] * len(inst)
        best = max(best, *runs) if runs else best
    return best


def is_duplicate(instances: Sequence[Sequence[float]], num_gt: int, *, min_run: int = DUPLICATE_MIN_RUN) -> bool:
    """Paper 6.1.2: a run of ``>= min_run`` and more than ``2 * num_gt`` predicted instances.

    ``instances``: the answer's instances in the order written (bins or pixels; each a flat
    coordinate tuple); ``num_gt``: the image's GT instance count (all phrases together).
    """
    return len(instances) > DUPLICATE_GT_FACTOR * num_gt and longest_repeat_run(instances) >= min_run


def is_large_box(
    boxes: Sequence[Sequence[float]], width: float, height: float, *, fraction: float = LARGE_BOX_FRACTION
) -> bool:
    """Paper 6.1.2: exactly one box predicted and its area exceeds ``fraction`` of the image.

    ``boxes`` ``[N, 4]`` pixels; an invalid (NaN, inverted) box has area 0.
    """
    if len(boxes) != 1:
        return False
    x0, y0, x1, y1 = (float(v) for v in boxes[0])
    area = (x1 - x0) * (y1 - y0) if x1 > x0 and y1 > y0 else 0.0
    return bool(np.isfinite(area) and area > fraction * width * height)
