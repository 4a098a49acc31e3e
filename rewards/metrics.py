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


def _f1_array(r: np.ndarray, p: np.ndarray) -> np.ndarray:
    s = r + p
    return np.where(s > 0, 2 * r * p / np.where(s > 0, s, 1.0), 0.0)


class CountTable:
    """Per-image, per-category counts behind a category-averaged R / P / F1 (paper 5.1).

    ``ngt[i, c]``, ``npred[i, c]``: GT objects and predictions of category ``c`` in image ``i``;
    ``tp[i, c, t]``: matches of similarity ``>= thresholds[t]``. The matching is done once, per
    image; a set's metric is then a weighted sum over images followed by the category average.
    That is what makes a bootstrap over images cheap (:func:`paired_bootstrap`): a resample is a
    vector of image multiplicities, and all resamples are one matrix product. With weights of
    one, :meth:`scores` is exactly :func:`detection_f1` / :func:`pointing_f1` (they call it).
    """

    def __init__(self, categories: list, ngt: np.ndarray, npred: np.ndarray, tp: np.ndarray, thresholds):
        self.categories, self.ngt, self.npred, self.tp = categories, ngt, npred, tp
        self.thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)

    @property
    def num_images(self) -> int:
        return self.ngt.shape[0]

    @classmethod
    def build(cls, per_image: list[dict], thresholds) -> "CountTable":
        """``per_image``: for each image ``{category: (ngt, npred, tp per threshold)}``."""
        cats = sorted({c for im in per_image for c in im}, key=repr)
        col = {c: k for k, c in enumerate(cats)}
        n_t = len(np.asarray(thresholds).reshape(-1))
        ngt = np.zeros((len(per_image), len(cats)), dtype=np.float64)
        npred = np.zeros_like(ngt)
        tp = np.zeros((len(per_image), len(cats), n_t), dtype=np.float64)
        for i, im in enumerate(per_image):
            for c, (g, p, t) in im.items():
                ngt[i, col[c]], npred[i, col[c]], tp[i, col[c]] = g, p, t
        return cls(cats, ngt, npred, tp, thresholds)

    def scores(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Category-averaged ``(R, P)``, each ``[B, T]``, for image weights ``[B, I]`` (default:
        one row of ones, the set itself). Conventions as the module docstring's: recall over the
        categories with GT in the weighted set, precision over those predicted in it; neither
        anywhere gives R = P = 1."""
        w = np.ones((1, self.num_images)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != self.num_images:
            raise ValueError(f"weights must be [B, {self.num_images}], got {w.shape}")
        g, p = w @ self.ngt, w @ self.npred  # [B, C]
        t = np.einsum("bi,ict->bct", w, self.tp)  # [B, C, T]
        has_g, has_p = g > 0, p > 0
        r = (
            np.where(has_g[..., None], t / np.where(has_g, g, 1.0)[..., None], 0.0).sum(1)
            / np.maximum(has_g.sum(1), 1)[:, None]
        )
        pr = (
            np.where(has_p[..., None], t / np.where(has_p, p, 1.0)[..., None], 0.0).sum(1)
            / np.maximum(has_p.sum(1), 1)[:, None]
        )
        empty = ~(has_g.any(1) | has_p.any(1))
        r[empty], pr[empty] = 1.0, 1.0
        return r, pr


def _iou_table(images, iou_thresholds, read, iou) -> CountTable:
    """Per-image counts of a matching that is one to one per image and category, greedy by IoU
    descending (:func:`_greedy`), a pair counting at threshold ``t`` if its IoU ``>= t``.
    ``read(k, gt_items, pred_items)`` -> arrays indexable by lists; ``iou(pred, gt)`` -> ``[N, M]``."""
    th = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if th.size == 0 or not ((th > 0) & (th <= 1)).all():
        raise ValueError(f"iou_thresholds must be non-empty and in (0, 1], got {th.tolist()}")
    per_image = []
    for k, im in enumerate(_images(images)):
        gl, g = _split(im["gt"], k, "gt")
        pl, p = _split(im["pred"], k, "pred")
        g, p = read(k, g, p)
        counts = {}
        for c in set(gl) | set(pl):
            gi = [n for n, lab in enumerate(gl) if lab == c]
            pi = [n for n, lab in enumerate(pl) if lab == c]
            ious = _greedy(iou(p[pi], g[gi])) if gi and pi else np.zeros(0)
            counts[c] = (len(gi), len(pi), (ious[:, None] >= th[None, :] - _TOL).sum(0))
        per_image.append(counts)
    return CountTable.build(per_image, th)


def detection_table(images, iou_thresholds=DEFAULT_IOU_THRESHOLDS) -> CountTable:
    """The per-image counts of :func:`detection_f1` (see there for the matching)."""

    def read(k, gb, pb):
        return geo.check_gt_boxes(gb, f"images[{k}] gt boxes"), geo.as_array(pb, 4, f"images[{k}] pred boxes")

    return _iou_table(images, iou_thresholds, read, geo.box_iou)


def _detection_dict(r: np.ndarray, p: np.ndarray, th: np.ndarray) -> dict[str, np.ndarray]:
    """``[B, T]`` recalls and precisions -> the named figures of :func:`detection_f1`, each ``[B]``."""
    out: dict[str, np.ndarray] = {}
    for k, t in enumerate(th):
        out[f"R@{t:.2f}"], out[f"P@{t:.2f}"], out[f"F1@{t:.2f}"] = r[:, k], p[:, k], _f1_array(r[:, k], p[:, k])
    rm, pm = r.mean(1), p.mean(1)
    out["R@mIoU"], out["P@mIoU"], out["F1@mIoU"] = rm, pm, _f1_array(rm, pm)
    return out


def detection_f1(images, iou_thresholds=DEFAULT_IOU_THRESHOLDS) -> dict[str, float]:
    """Recall, precision and F1 at each IoU threshold and over the mean (paper section 5.1).

    Matching is one-to-one within an image and category, greedy by IoU descending (see
    :func:`_greedy`); a pair counts at threshold ``t`` if its IoU ``>= t``. Invalid predicted
    boxes (NaN, inverted, empty) match nothing; an invalid GT box raises ``ValueError``.

    Returns ``{"R@0.50", "P@0.50", "F1@0.50", ..., "F1@0.95", "R@mIoU", "P@mIoU", "F1@mIoU"}``;
    the mIoU recall/precision are means over thresholds, and ``F1@mIoU`` is their harmonic mean
    (not the mean of the per-threshold F1).
    """
    table = detection_table(images, iou_thresholds)
    r, p = table.scores()
    return {k: float(v[0]) for k, v in _detection_dict(r, p, table.thresholds).items()}


def pointing_table(images) -> CountTable:
    """The per-image counts of :func:`pointing_f1` (one "threshold": the point is in the mask)."""
    from scipy.optimize import linear_sum_assignment

    per_image = []
    for k, im in enumerate(_images(images)):
        gl, gm = _split(im["gt"], k, "gt")
        pl, pp = _split(im["pred"], k, "pred")
        pts = geo.as_array([[np.nan, np.nan] if p is None else p for p in pp], 2, f"images[{k}] points")
        tp: dict = defaultdict(int)
        if gm and pp:
            first = gm[0]
            h, w = list(first["size"]) if isinstance(first, dict) else np.shape(first)
            masks = geo.decode_masks(gm, int(h), int(w), f"images[{k}] gt masks")
            hits = geo.points_in_masks(pts, masks) & geo.same_label(pl, gl)
            rows, cols = linear_sum_assignment(hits.astype(np.float64), maximize=True)
            for i, j in zip(rows, cols):
                if hits[i, j]:
                    tp[gl[j]] += 1
        per_image.append({c: (gl.count(c), pl.count(c), np.array([tp[c]])) for c in set(gl) | set(pl)})
    return CountTable.build(per_image, [1.0])


def _pointing_dict(r: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    return {"R": r[:, 0], "P": p[:, 0], "F1": _f1_array(r[:, 0], p[:, 0])}


def pointing_f1(images) -> dict[str, float]:
    """Pointing F1 (paper section 5.6): a point is correct if it falls in a GT mask.

    ``images``: ``{"gt": [(label, mask), ...], "pred": [(label, (x, y)), ...]}``, masks as
    ``H x W`` bool arrays or COCO RLE dicts (all of one image the same size), points in pixels.
    Matching is one-to-one per image and category with the most matches
    (``linear_sum_assignment`` on the hit matrix), so two points in one mask count once.
    Returns ``{"R", "P", "F1"}`` averaged over categories as in :func:`detection_f1`.
    """
    r, p = pointing_table(images).scores()
    return {k: float(v[0]) for k, v in _pointing_dict(r, p).items()}


def mask_table(images, iou_thresholds=DEFAULT_IOU_THRESHOLDS) -> CountTable:
    """The per-image counts of :func:`mask_f1`: :func:`detection_table`'s matching (one to one
    per image and category, greedy by IoU descending) on mask IoU."""

    def read(k, gm, pm):
        first = (gm or pm or [None])[0]
        h, w = (0, 0) if first is None else (list(first["size"]) if isinstance(first, dict) else np.shape(first))
        return (
            geo.decode_masks(gm, int(h), int(w), f"images[{k}] gt masks"),
            geo.decode_masks(pm, int(h), int(w), f"images[{k}] pred masks"),
        )

    return _iou_table(images, iou_thresholds, read, geo.mask_iou)


def mask_f1(images, iou_thresholds=DEFAULT_IOU_THRESHOLDS) -> dict[str, float]:
    """:func:`detection_f1` for masks: R, P and F1 at each mask-IoU threshold and over their mean
    (``F1@0.50``, ..., ``F1@mIoU``), categories averaged as there.

    ``images``: ``{"gt": [(label, mask), ...], "pred": [(label, mask), ...]}``, masks as ``H x W``
    bool arrays or COCO RLE, all of one image the same size (GETok's answers decoded into masks
    by SAM or the grid-cell stand-in, :mod:`rewards.mask`). An empty predicted mask matches
    nothing and counts as a prediction."""
    table = mask_table(images, iou_thresholds)
    r, p = table.scores()
    return {k: float(v[0]) for k, v in _detection_dict(r, p, table.thresholds).items()}


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


def count_table(images) -> np.ndarray:
    """Per image ``[exact, over, under]``: its (label) pairs whose answer wrote as many boxes as
    GT objects, more, fewer (see :func:`count_rates`); ``[I, 3]``."""
    rows = []
    for k, im in enumerate(_images(images)):
        gl, _ = _split(im["gt"], k, "gt")
        pl, _ = _split(im["pred"], k, "pred")
        d = [pl.count(c) - gl.count(c) for c in set(gl) | set(pl)]
        rows.append([sum(x == 0 for x in d), sum(x > 0 for x in d), sum(x < 0 for x in d)])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def count_rates_weighted(table: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`count_rates` of a :func:`count_table` under image weights ``[B, I]``, each ``[B]``."""
    w = np.ones((1, len(table))) if weights is None else np.asarray(weights, dtype=np.float64)
    s = w @ table  # [B, 3]
    n = s.sum(1)
    # no GT and no prediction anywhere: every answer was right to be empty
    rates = np.where(n[:, None] > 0, s / np.where(n > 0, n, 1.0)[:, None], np.array([1.0, 0.0, 0.0]))
    return {"exact_count_rate": rates[:, 0], "over_count_rate": rates[:, 1], "under_count_rate": rates[:, 2]}


def count_rates(images) -> dict[str, float]:
    """How often an answer writes the right number of boxes for a phrase.

    Over every (image, label) pair with GT or predictions: ``exact_count_rate`` (as many boxes
    as GT objects), ``over_count_rate`` (more: duplicates, boxes on nothing) and
    ``under_count_rate`` (fewer: missed objects, or one box over several); they sum to 1. The
    failures the paper's GRPO stage targets (section 6.1) show up here before their strict
    definitions (:func:`duplicate_rate`, :func:`large_box_rate`) fire; whether the boxes are
    in the right place is F1's business, not this.
    """
    return {k: float(v[0]) for k, v in count_rates_weighted(count_table(images)).items()}


def paired_bootstrap(
    base, others, num_images: int, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95, chunk: int = 250
) -> dict:
    """How sure is a change of a set metric from one model (``base``) to others, over images?

    ``base`` and each of ``others`` map image weights ``[B, num_images]`` to the metric ``[B]``
    on the same images in the same order (the :class:`CountTable` and :func:`count_table`
    figures do). Each resample draws ``num_images`` images with replacement (multinomial
    multiplicities) and evaluates every model on the SAME draw, so the change is paired: the
    images' own difficulty cancels. The change is ``mean(others) - base``: with several seeds of
    one recipe, the interval covers the image sampling of the held-out set for the seed-averaged
    model; the spread between seeds is reported beside it (``per_run``), not folded in.

    Returns ``{"base", "others", "change", "lo", "hi", "per_run": [{"change", "lo", "hi"}],
    "excludes_zero"}``: point values on the set itself, percentile interval at ``level``.
    """
    if num_images < 1:
        raise ValueError("paired_bootstrap needs at least one image")
    if not others:
        raise ValueError("paired_bootstrap needs at least one model to compare with the base")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    ones = np.ones((1, num_images))
    b0 = float(base(ones)[0])
    o0 = [float(f(ones)[0]) for f in others]
    diffs = []  # [n_resamples, len(others)]
    left = n_resamples
    while left > 0:
        w = rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=min(chunk, left)).astype(np.float64)
        b = base(w)
        diffs.append(np.stack([f(w) - b for f in others], axis=1))
        left -= len(w)
    d = np.concatenate(diffs)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = np.percentile(d.mean(1), q)
    per = [dict(zip(("lo", "hi"), np.percentile(d[:, k], q).tolist()), change=o0[k] - b0) for k in range(len(others))]
    return {
        "base": b0,
        "others": o0,
        "change": float(np.mean(o0) - b0),
        "lo": float(lo),
        "hi": float(hi),
        "per_run": per,
        "excludes_zero": bool(lo > 0 or hi < 0),
        "level": level,
        "n_resamples": n_resamples,
    }


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
