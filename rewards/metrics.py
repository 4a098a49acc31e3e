"""Evaluation metrics of the Rex-Omni paper (section 5.1, 5.6, 5.7, 6.1.2), over a whole set.

Input is a list of images, each a dict::

    {"gt": [(label, box), ...], "pred": [(label, box), ...]}     # boxes in pixels (x0, y0, x1, y1)

(:func:`pointing_f1` takes masks and points instead; :func:`large_box_rate` also needs
``"width"`` and ``"height"``). Every rate and score is a fraction in ``[0, 1]``, not a percent.

Averaging (section 5.1: "Recall and Precision are computed per category and then averaged,
while F1 is taken as their harmonic mean"). Counts are summed over all images per category
first. A category's recall is defined only if it has GT somewhere in the set and its precision
only if it was predicted somewhere, so:

- recall is averaged over the categories with GT (one never predicted contributes 0);
- precision is averaged over the categories that were predicted (one with no GT contributes 0);
- if no category was predicted, P = 0; if no category has GT, R = 0; if the set has neither GT
  nor predictions, R = P = F1 = 1 (the same convention as the reward).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from rewards import behaviour
from rewards import geometry as geo
from rewards.box import COCO_IOU_THRESHOLDS

# 0.50, 0.55, ..., 0.95: the same thresholds the box reward can credit (rewards.box).
DEFAULT_IOU_THRESHOLDS = np.asarray(COCO_IOU_THRESHOLDS)
# An IoU that is 0.7 up to floating-point rounding (0.6999999999999999 from the areas) must still
# count at 0.7.
_TOL = 1e-9


def _images(images, keys=("gt", "pred")) -> list[dict]:
    images = list(images)
    if not images:
        raise ValueError("metrics need at least one image")
    for k, im in enumerate(images):
        if not isinstance(im, dict) or any(key not in im for key in keys):
            raise ValueError(f"images[{k}]: expected a dict with keys {keys}")
    return images


def _split(pairs, k: int, side: str):
    labels, items = [], []
    for n, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"images[{k}]['{side}'][{n}]: expected (label, geometry), got {pair!r}")
        labels.append(pair[0])
        items.append(pair[1])
    return labels, items


def _greedy(sim: np.ndarray) -> np.ndarray:
    """One-to-one greedy matching, highest similarity first (COCO-style, without scores):
    returns the similarities of the matched pairs (> 0). Because the pairs are taken in
    descending order, the matches at threshold ``t`` are exactly those with similarity
    ``>= t``, so one pass serves every threshold."""
    w = sim.astype(np.float64, copy=True)
    out = []
    while w.size:
        k = int(np.argmax(w))
        i, j = divmod(k, w.shape[1])
        if w[i, j] <= 0:
            break
        out.append(w[i, j])
        w[i, :] = -1.0
        w[:, j] = -1.0
    return np.asarray(out)


def _average(tp: dict, ngt: dict, npred: dict) -> tuple[float, float]:
    """Category-averaged (recall, precision) given per-category counts (see module docstring)."""
    if not ngt and not npred:
        return 1.0, 1.0
    r = float(np.mean([tp.get(c, 0) / n for c, n in ngt.items()])) if ngt else 0.0
    p = float(np.mean([tp.get(c, 0) / n for c, n in npred.items()])) if npred else 0.0
    return r, p


def _f1(r: float, p: float) -> float:
    return 2 * r * p / (r + p) if r + p > 0 else 0.0


def detection_f1(images, iou_thresholds=DEFAULT_IOU_THRESHOLDS) -> dict[str, float]:
    """Recall, precision and F1 at each IoU threshold and over the mean (paper section 5.1).

    Matching is one-to-one within an image and category, greedy by IoU descending (see
    :func:`_greedy`); a pair counts at threshold ``t`` if its IoU ``>= t``. Invalid predicted
    boxes (NaN, inverted, empty) match nothing; an invalid GT box raises ``ValueError``.

    Returns ``{"R@0.50", "P@0.50", "F1@0.50", ..., "F1@0.95", "R@mIoU", "P@mIoU", "F1@mIoU"}``;
    the mIoU recall/precision are means over thresholds, and ``F1@mIoU`` is their harmonic mean
    (not the mean of the per-threshold F1).
    """
    th = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if th.size == 0 or not ((th > 0) & (th <= 1)).all():
        raise ValueError(f"iou_thresholds must be non-empty and in (0, 1], got {th.tolist()}")
    matched: dict = defaultdict(list)
    ngt: dict = defaultdict(int)
    npred: dict = defaultdict(int)
    for k, im in enumerate(_images(images)):
        gl, gb = _split(im["gt"], k, "gt")
        pl, pb = _split(im["pred"], k, "pred")
        gb = geo.check_gt_boxes(gb, f"images[{k}] gt boxes")
        pb = geo.as_array(pb, 4, f"images[{k}] pred boxes")
        for c in gl:
            ngt[c] += 1
        for c in pl:
            npred[c] += 1
        for c in set(gl) & set(pl):
            gi = [n for n, lab in enumerate(gl) if lab == c]
            pi = [n for n, lab in enumerate(pl) if lab == c]
            matched[c].append(_greedy(geo.box_iou(pb[pi], gb[gi])))
    ious = {c: np.concatenate(v) for c, v in matched.items()}
    out: dict[str, float] = {}
    rs, ps = [], []
    for t in th:
        tp = {c: int((v >= t - _TOL).sum()) for c, v in ious.items()}
        r, p = _average(tp, ngt, npred)
        rs.append(r)
        ps.append(p)
        out[f"R@{t:.2f}"], out[f"P@{t:.2f}"], out[f"F1@{t:.2f}"] = r, p, _f1(r, p)
    r, p = float(np.mean(rs)), float(np.mean(ps))
    out["R@mIoU"], out["P@mIoU"], out["F1@mIoU"] = r, p, _f1(r, p)
    return out


def pointing_f1(images) -> dict[str, float]:
    """Pointing F1 (paper section 5.6): a point is correct if it falls in a GT mask.

    ``images``: ``{"gt": [(label, mask), ...], "pred": [(label, (x, y)), ...]}``, masks as
    ``H x W`` bool arrays or COCO RLE dicts (all of one image the same size), points in pixels.
    Matching is one-to-one per image and category with the most matches
    (``linear_sum_assignment`` on the hit matrix), so two points in one mask count once.
    Returns ``{"R", "P", "F1"}`` averaged over categories as in :func:`detection_f1`.
    """
    from scipy.optimize import linear_sum_assignment

    tp: dict = defaultdict(int)
    ngt: dict = defaultdict(int)
    npred: dict = defaultdict(int)
    for k, im in enumerate(_images(images)):
        gl, gm = _split(im["gt"], k, "gt")
        pl, pp = _split(im["pred"], k, "pred")
        pts = geo.as_array([[np.nan, np.nan] if p is None else p for p in pp], 2, f"images[{k}] points")
        for c in gl:
            ngt[c] += 1
        for c in pl:
            npred[c] += 1
        if not gm or not pp:
            continue
        first = gm[0]
        h, w = list(first["size"]) if isinstance(first, dict) else np.shape(first)
        masks = geo.decode_masks(gm, int(h), int(w), f"images[{k}] gt masks")
        hits = geo.points_in_masks(pts, masks) & geo.same_label(pl, gl)
        rows, cols = linear_sum_assignment(hits.astype(np.float64), maximize=True)
        for i, j in zip(rows, cols):
            if hits[i, j]:
                tp[gl[j]] += 1
    r, p = _average(tp, ngt, npred)
    return {"R": r, "P": p, "F1": _f1(r, p)}


def gui_accuracy(points: Sequence, boxes: Sequence) -> float:
    """GUI grounding accuracy (paper section 5.7): fraction of queries whose predicted point
    ``(x, y)`` lies in the target box ``(x0, y0, x1, y1)`` (pixels, borders included).
    A ``None`` or NaN point is wrong."""
    if len(points) != len(boxes):
        raise ValueError(f"gui_accuracy: {len(points)} points for {len(boxes)} boxes")
    if not len(boxes):
        raise ValueError("gui_accuracy needs at least one query")
    pts = geo.as_array([[np.nan, np.nan] if p is None else p for p in points], 2, "points")
    bx = geo.check_gt_boxes(boxes, "boxes")
    return float(np.mean([geo.points_in_boxes(pts[k : k + 1], bx[k : k + 1])[0, 0] for k in range(len(bx))]))


def duplicate_flags(images) -> list[bool]:
    """Per image: is its answer a repeated prediction (paper 6.1.2, see
    :func:`rewards.behaviour.is_duplicate`)? The coordinate sequence is the image's predictions
    in the order given, all labels together; the GT count is the image's, all labels together."""
    out = []
    for k, im in enumerate(_images(images)):
        _, coords = _split(im["pred"], k, "pred")
        out.append(behaviour.is_duplicate([tuple(c) for c in coords], len(im["gt"])))
    return out


def duplicate_rate(images) -> float:
    """Fraction of images (answers) flagged by :func:`duplicate_flags`."""
    return float(np.mean(duplicate_flags(images)))


def count_rates(images) -> dict[str, float]:
    """How often an answer writes the right number of boxes for a phrase.

    Over every (image, label) pair with GT or predictions: ``exact_count_rate`` (as many boxes
    as GT objects), ``over_count_rate`` (more: duplicates, boxes on nothing) and
    ``under_count_rate`` (fewer: missed objects, or one box over several); they sum to 1. The
    failures the paper's GRPO stage targets (section 6.1) show up here before their strict
    definitions (:func:`duplicate_rate`, :func:`large_box_rate`) fire; whether the boxes are
    in the right place is F1's business, not this.
    """
    exact = over = under = 0
    for k, im in enumerate(_images(images)):
        gl, _ = _split(im["gt"], k, "gt")
        pl, _ = _split(im["pred"], k, "pred")
        for c in set(gl) | set(pl):
            d = pl.count(c) - gl.count(c)
            exact, over, under = exact + (d == 0), over + (d > 0), under + (d < 0)
    n = exact + over + under
    if n == 0:  # no GT and no prediction anywhere: every answer was right to be empty
        return {"exact_count_rate": 1.0, "over_count_rate": 0.0, "under_count_rate": 0.0}
    return {"exact_count_rate": exact / n, "over_count_rate": over / n, "under_count_rate": under / n}


def large_box_flags(images) -> list[bool]:
    """Per image (needs ``"width"``, ``"height"``): exactly one box predicted, covering more
    than 95% of the image (paper 6.1.2)."""
    out = []
    for k, im in enumerate(_images(images, ("gt", "pred", "width", "height"))):
        _, boxes = _split(im["pred"], k, "pred")
        out.append(behaviour.is_large_box(boxes, im["width"], im["height"]))
    return out


def large_box_rate(images) -> float:
    """Fraction of images (answers) flagged by :func:`large_box_flags`: table 14's "percentage
    of large box predictions removed from the total outputs", as a fraction of answers."""
    return float(np.mean(large_box_flags(images)))
