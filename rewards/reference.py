"""Slow, obvious references for the vectorised rewards: plain Python loops, one box at a time.

Tests check :func:`rewards.box_iou_f1` against :func:`box_iou_f1_reference` on random inputs,
and ``python -m rlsys.bench.rewards`` times the two on the same input. Keep these dumb.
"""

from __future__ import annotations

import math

from rewards.f1 import F1Result, f1_from_sum


def iou_one(a, b) -> float:
    """IoU of two pixel boxes ``(x0, y0, x1, y1)``; 0 if either is NaN, empty or inverted."""
    for box in (a, b):
        if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter)


def box_iou_f1_reference(pred_boxes, pred_labels, gt_boxes, gt_labels, matching: str = "paper") -> F1Result:
    """Equations 3-4 written out: for each GT, loop over all predictions.

    ``"paper"``: keep the best IoU (ties go to a same-label prediction), score it if labels
    agree. ``"hungarian"``: build the label-masked IoU matrix by loops, then let scipy find the
    one-to-one assignment (a brute-force check of that lives in the tests).
    """
    pred_boxes = [[float(v) for v in b] for b in pred_boxes]
    gt_boxes = [[float(v) for v in b] for b in gt_boxes]
    total = 0.0
    if matching == "paper":
        for g, gl in zip(gt_boxes, gt_labels):
            best, best_same = -1.0, False
            for p, pl in zip(pred_boxes, pred_labels):
                v = iou_one(p, g)
                if v > best or (v == best and pl == gl and not best_same):
                    best, best_same = v, pl == gl
            if best_same:
                total += best
    elif matching == "hungarian":
        if pred_boxes and gt_boxes:
            from scipy.optimize import linear_sum_assignment

            w = [
                [iou_one(p, g) if pl == gl else 0.0 for g, gl in zip(gt_boxes, gt_labels)]
                for p, pl in zip(pred_boxes, pred_labels)
            ]
            rows, cols = linear_sum_assignment(w, maximize=True)
            for i, j in zip(rows, cols):
                total += w[i][j]
    else:
        raise ValueError(f"unknown matching {matching!r}")
    return f1_from_sum(total, len(pred_boxes), len(gt_boxes))
