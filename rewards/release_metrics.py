"""Evaluation metrics as the public Rex-Omni release computes them ("rex_release" protocol).

:mod:`rewards.metrics` follows the paper's wording (section 5.1). The release's evaluation code
(``IDEA-Research/Rex-Omni``, ``evaluation/``) computes figures of the same names differently;
this module reproduces its rules so a report can show both side by side. Inputs are the image
dicts of :mod:`rewards.metrics` (``{"gt": [(label, box), ...], "pred": [(label, box), ...]}``,
pixels), masks and points for pointing, per-sample points/boxes for GUI. Every figure is a
fraction in ``[0, 1]``.

Rules, each with the release file it follows:

- Averaging (``evaluation/metrics/other_metric.py``, the printed table): recall and precision
  are computed per *sample* (image and question), averaged over the samples with equal weight,
  and F1 is the harmonic mean of the two averages. No category average.
- Matching (``other_metric.py``, detection metrics): per sample and threshold ``t``, the GT boxes
  are visited in order (grouped by category in order of first appearance, then as listed); each
  takes the unused candidate prediction with the highest IoU, provided that IoU is ``>= t`` (ties:
  the earlier candidate). Candidates are the predictions whose label is one of the sample's GT
  labels, and any of them may match any GT box (class-agnostic among the GT categories).
  Predictions of a label absent from the sample's GT match nothing but count in the precision
  denominator. The comparison with ``t`` is exact (no tolerance), with the thresholds written
  as decimals (0.5, 0.55, ..., 0.95).
- Empty cases (same function): no GT and no predictions gives R = P = 1 for that sample; no GT
  but predictions, or GT but no predictions, gives R = P = 0.
- Labels (``other_metric.py``, per-sample dispatch and category normalisation): lower-cased
  for every task; for common, long-tailed and dense object detection (this project's
  ``detection``) only letters are kept; for the other box tasks spaces and underscores are
  removed; referring detection ignores labels altogether (every prediction is a candidate).
- "mIoU" (printed table): the thresholds 0.50:0.05:0.95; the mIoU F1 is the *mean of the
  per-threshold F1s*, and the mIoU R and P are the means of the per-threshold R and P (so F1@mIoU
  is not their harmonic mean). The table's column headed "IoU=0.9" holds the 0.95 figures.
- COCO / LVIS (``evaluation/utils/convert_coco_lvis_to_standard_format.py``,
  ``evaluation/metrics/coco_lvis_metric.py``): scored by a COCO AP evaluator, after dropping
  predictions of categories absent from the image's annotations (:func:`drop_absent_categories`);
  the AP itself is not reproduced here.
- Pointing (``other_metric.py``, pointing metrics): labels lower-cased only; GT masks visited in
  order (grouped by category as above), each takes the first unused prediction of its label
  whose point is in the mask. The point reads pixel ``(int(y), int(x))``: truncation towards
  zero, so ``-1 < x < 0`` reads column 0, and ``x >= W`` or ``y >= H`` (the far border) misses.
  Empty cases as for boxes; averaging per sample as for boxes.
- GUI (``other_metric.py``, GUI metrics): a query is right if *any* predicted point, or the
  centre of any predicted box, lies in the GT box (borders included, corners put in order);
  no prediction is wrong. Accuracy is the mean over queries.

Where the release's code would fail on input this module accepts (an unreadable or NaN point,
which raises there and drops the whole sample from its set), this module scores a miss. Where
two labels of one sample normalise to the same name, the release keeps only the later one's
boxes (a dict key overwritten); this module keeps both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rewards import geometry as geo

# The release's default thresholds, as written there (decimals, compared exactly).
RELEASE_IOU_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)

# How a task's labels are compared (:func:`normalise_label`).
LABEL_MODES = ("letters", "compact", "lower", "ignore")
_LETTERS_TASKS = frozenset(
    {"detection", "common_object_detection", "long_tailed_object_detection", "dense_object_detection"}
)
_IGNORE_TASKS = frozenset({"referring", "referring_object_detection"})
_LOWER_TASKS = frozenset({"pointing"})


def label_mode(task: str) -> str:
    """The label rule of ``task`` (this project's or the release's task name, or a mode itself):
    ``"letters"`` (lower-cased, letters only: common, long-tailed and dense detection),
    ``"ignore"`` (referring: labels play no part), ``"lower"`` (pointing: lower-cased only) or
    ``"compact"`` (every other task: lower-cased, spaces and underscores removed)."""
    if task in LABEL_MODES:
        return task
    if task in _LETTERS_TASKS:
        return "letters"
    if task in _IGNORE_TASKS:
        return "ignore"
    if task in _LOWER_TASKS:
        return "lower"
    return "compact"


def normalise_label(label, task: str) -> str:
    """``label`` as the release compares it for ``task`` (see :func:`label_mode`): two labels
    name the same category iff their normalised forms are equal."""
    mode = label_mode(task)
    s = str(label).lower()
    if mode == "ignore":
        return ""
    if mode == "letters":
        return "".join(c for c in s if c.isalpha())
    if mode == "compact":
        return s.replace("_", "").replace(" ", "")
    return s


def _images(images, keys=("gt", "pred")) -> list[dict]:
    images = list(images)
    if not images:
        raise ValueError("metrics need at least one image")
    for k, im in enumerate(images):
        if not isinstance(im, dict) or any(key not in im for key in keys):
            raise ValueError(f"images[{k}]: expected a dict with keys {keys}")
    return images


def _modes(label_mode_arg, n: int) -> list[str]:
    if isinstance(label_mode_arg, str):
        modes = [label_mode_arg] * n
    else:
        modes = list(label_mode_arg)
        if len(modes) != n:
            raise ValueError(f"label_mode: {len(modes)} modes for {n} images")
    out = [label_mode(m) for m in modes]
    return out


def _split(pairs, k: int, side: str, mode: str):
    labels, items = [], []
    for n, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"images[{k}]['{side}'][{n}]: expected (label, geometry), got {pair!r}")
        labels.append(normalise_label(pair[0], mode))
        items.append(pair[1])
    return labels, items


def _gt_order(labels: list[str]) -> list[int]:
    """GT indices grouped by category (first appearance), each category's in the order given: the
    order in which the release's per-category dict hands them to the matching."""
    cats = list(dict.fromkeys(labels))
    return [n for c in cats for n, lab in enumerate(labels) if lab == c]


def _thresholds(iou_thresholds) -> np.ndarray:
    th = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if th.size == 0 or not ((th > 0) & (th <= 1)).all():
        raise ValueError(f"iou_thresholds must be non-empty and in (0, 1], got {th.tolist()}")
    return th


def _f1(r, p):
    r, p = np.asarray(r, dtype=np.float64), np.asarray(p, dtype=np.float64)
    s = r + p
    return np.where(s > 0, 2 * r * p / np.where(s > 0, s, 1.0), 0.0)


def detection_samples(
    images, iou_thresholds=RELEASE_IOU_THRESHOLDS, label_mode: str | Sequence[str] = "compact"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample recall and precision ``[I, T]`` of :func:`detection_f1` (see there)."""
    th = _thresholds(iou_thresholds)
    images = _images(images)
    modes = _modes(label_mode, len(images))
    rec = np.zeros((len(images), th.size))
    prec = np.zeros_like(rec)
    for k, (im, mode) in enumerate(zip(images, modes)):
        gl, gb = _split(im["gt"], k, "gt", mode)
        pl, pb = _split(im["pred"], k, "pred", mode)
        n_gt, n_pred = len(gb), len(pb)
        if n_gt == 0 or n_pred == 0:
            rec[k] = prec[k] = 1.0 if n_gt == n_pred else 0.0
            continue
        order = _gt_order(gl)
        gt = geo.check_gt_boxes([gb[n] for n in order], f"images[{k}] gt boxes")
        # candidates: the predictions of the GT categories, grouped in the GT's category order
        cand = [n for c in dict.fromkeys(gl) for n, lab in enumerate(pl) if lab == c]
        if not cand:
            continue  # every prediction is of an absent category: R = P = 0
        iou = geo.box_iou(gt, geo.as_array([pb[n] for n in cand], 4, f"images[{k}] pred boxes"))  # [G, C]
        for t_idx, t in enumerate(th):
            used = np.zeros(len(cand), dtype=bool)
            matches = 0
            for row in iou:
                ok = ~used & (row >= t) & (row > 0)
                if ok.any():
                    used[int(np.argmax(np.where(ok, row, -1.0)))] = True  # first of the best: ties to the earlier
                    matches += 1
            rec[k, t_idx] = matches / n_gt
            prec[k, t_idx] = matches / n_pred
    return rec, prec


def detection_f1(
    images, iou_thresholds=RELEASE_IOU_THRESHOLDS, label_mode: str | Sequence[str] = "compact"
) -> dict[str, float]:
    """Box recall, precision and F1 per IoU threshold and over their mean, as the release computes
    them (module docstring: per-sample averaging, class-agnostic greedy matching in GT order,
    normalised labels, mean of F1s).

    ``label_mode``: one task name or mode for all images, or one per image (:func:`label_mode`;
    the release's default rule is ``"compact"``, detection's ``"letters"``, referring's
    ``"ignore"``). Returns the keys of :func:`rewards.metrics.detection_f1`:
    ``R@t``, ``P@t``, ``F1@t`` (F1 = harmonic mean of the sample-averaged R and P at ``t``) and
    ``R@mIoU``, ``P@mIoU`` (means over thresholds), ``F1@mIoU`` = the mean of the ``F1@t``.
    """
    th = _thresholds(iou_thresholds)
    rec, prec = detection_samples(images, th, label_mode)
    r, p = rec.mean(0), prec.mean(0)
    f = _f1(r, p)
    out: dict[str, float] = {}
    for k, t in enumerate(th):
        out[f"R@{t:.2f}"], out[f"P@{t:.2f}"], out[f"F1@{t:.2f}"] = float(r[k]), float(p[k]), float(f[k])
    out["R@mIoU"], out["P@mIoU"], out["F1@mIoU"] = float(r.mean()), float(p.mean()), float(f.mean())
    return out


def _pixel_hit(point, mask: np.ndarray) -> bool:
    """The release's point-in-mask test: ``int()`` of each coordinate (truncation towards zero),
    inside ``0 <= x < W``, ``0 <= y < H``. A missing or non-finite point misses."""
    if point is None:
        return False
    try:
        x, y = float(point[0]), float(point[1])
    except (TypeError, ValueError, IndexError):
        return False
    if not (np.isfinite(x) and np.isfinite(y)):
        return False
    xi, yi = int(x), int(y)
    h, w = mask.shape
    return 0 <= xi < w and 0 <= yi < h and bool(mask[yi, xi])


def pointing_samples(images, label_mode: str | Sequence[str] = "lower") -> tuple[np.ndarray, np.ndarray]:
    """Per-sample recall and precision ``[I]`` of :func:`pointing_f1` (see there)."""
    images = _images(images)
    modes = _modes(label_mode, len(images))
    rec, prec = np.zeros(len(images)), np.zeros(len(images))
    for k, (im, mode) in enumerate(zip(images, modes)):
        gl, gm = _split(im["gt"], k, "gt", mode)
        pl, pp = _split(im["pred"], k, "pred", mode)
        n_gt, n_pred = len(gm), len(pp)
        if n_gt == 0 or n_pred == 0:
            rec[k] = prec[k] = 1.0 if n_gt == n_pred else 0.0
            continue
        first = gm[0]
        h, w = list(first["size"]) if isinstance(first, dict) else np.shape(first)
        masks = geo.decode_masks(gm, int(h), int(w), f"images[{k}] gt masks")
        used = [False] * n_pred
        matches = 0
        for g in _gt_order(gl):
            for j in range(n_pred):
                if not used[j] and pl[j] == gl[g] and _pixel_hit(pp[j], masks[g]):
                    used[j] = True
                    matches += 1
                    break
        rec[k], prec[k] = matches / n_gt, matches / n_pred
    return rec, prec


def pointing_f1(images, label_mode: str | Sequence[str] = "lower") -> dict[str, float]:
    """Pointing recall, precision and F1 as the release computes them: per GT mask (in order), the
    first unused point of its (lower-cased) label inside the mask, the point read at pixel
    ``(int(y), int(x))`` so the far border misses; R and P per sample, averaged over samples,
    F1 their harmonic mean.

    ``images``: ``{"gt": [(label, mask), ...], "pred": [(label, (x, y)), ...]}``, masks as
    ``H x W`` bool arrays or COCO RLE (one size per image), points in pixels.
    Returns ``{"R", "P", "F1"}``."""
    rec, prec = pointing_samples(images, label_mode)
    r, p = float(rec.mean()), float(prec.mean())
    return {"R": r, "P": p, "F1": float(_f1(r, p))}


def gui_hits(points_or_boxes_per_sample: Sequence, gt_boxes: Sequence) -> list[bool]:
    """Per query: is any predicted point, or any predicted box's centre, in its GT box? See
    :func:`gui_accuracy`."""
    if len(points_or_boxes_per_sample) != len(gt_boxes):
        raise ValueError(f"gui_accuracy: {len(points_or_boxes_per_sample)} predictions for {len(gt_boxes)} boxes")
    out = []
    for k, (preds, gt) in enumerate(zip(points_or_boxes_per_sample, gt_boxes)):
        g = geo.as_array([gt], 4, f"gt_boxes[{k}]")[0]
        if not np.isfinite(g).all():
            raise ValueError(f"gt_boxes[{k}] = {g.tolist()} is not a finite box")
        x0, x1 = min(g[0], g[2]), max(g[0], g[2])
        y0, y1 = min(g[1], g[3]), max(g[1], g[3])
        hit = False
        for c in preds or ():
            if c is None or len(c) not in (2, 4):
                continue
            c = [float(v) for v in c]
            if len(c) == 4:  # a box: its centre, corners put in order first
                c = [(min(c[0], c[2]) + max(c[0], c[2])) / 2, (min(c[1], c[3]) + max(c[1], c[3])) / 2]
            if x0 <= c[0] <= x1 and y0 <= c[1] <= y1:
                hit = True
                break
        out.append(hit)
    return out


def gui_accuracy(points_or_boxes_per_sample: Sequence, gt_boxes: Sequence) -> float:
    """GUI grounding accuracy as the release computes it: a query is right if ANY of its predicted
    points ``(x, y)``, or the centre of any of its predicted boxes ``(x0, y0, x1, y1)``, lies in
    its GT box (pixels, borders included). ``points_or_boxes_per_sample``: per query, a sequence of
    coordinate tuples (length 2 or 4; other lengths are ignored); an empty one or ``None`` is wrong.
    """
    if not len(gt_boxes):
        raise ValueError("gui_accuracy needs at least one query")
    return float(np.mean(gui_hits(points_or_boxes_per_sample, gt_boxes)))


def drop_absent_categories(images) -> list[dict]:
    """COCO / LVIS before the release's AP: each image's predictions whose category (lower-cased,
    underscores as spaces) is not among the image's GT categories are dropped; an image without
    GT keeps all. The release also drops names outside the dataset's category list, which needs
    the dataset and is left to the caller."""

    def key(label) -> str:
        return str(label).lower().replace("_", " ")

    out = []
    for im in _images(images):
        gt = {key(lab) for lab, _ in im["gt"]}
        pred = [(lab, c) for lab, c in im["pred"] if not gt or key(lab) in gt]
        out.append({**im, "pred": pred})
    return out
