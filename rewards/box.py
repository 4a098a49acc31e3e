"""Box IoU reward (paper section 4.2.3, equations 3-4) and its polygon twin for OCR.

Both return :class:`rewards.f1.F1Result`; ``.f1`` is the reward.
"""

from __future__ import annotations

import numpy as np

from rewards import geometry as geo
from rewards.f1 import F1Result, f1_from_matrix

# The IoU thresholds of COCO's AP and of the paper's F1@mIoU (section 5.1): 0.50, 0.55, ..., 0.95.
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def threshold_credit(iou, thresholds=COCO_IOU_THRESHOLDS):
    """The fraction of ``thresholds`` each IoU reaches: what a pair contributes to F1@mIoU.

    A step function of IoU, so a box that grows to cover more of an uncertain position earns
    nothing until it crosses the next threshold (the plain IoU pays it a little at once).
    """
    ts = np.asarray(thresholds, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0 or np.any((ts <= 0) | (ts > 1)):
        raise ValueError(f"IoU thresholds must be a non-empty list in (0, 1], got {thresholds!r}")
    iou = np.asarray(iou, dtype=np.float64)
    return (iou[..., None] >= ts).mean(axis=-1)


def box_iou_f1(pred_boxes, pred_labels, gt_boxes, gt_labels, matching: str = "paper", iou_thresholds=None) -> F1Result:
    """Box IoU F1 of one answer.

    ``pred_boxes`` ``[N, 4]`` and ``gt_boxes`` ``[M, 4]`` are pixels ``(x0, y0, x1, y1)``;
    labels are sequences of hashables of the same lengths (``None``: one class). For each GT
    the best-IoU prediction counts its IoU if the labels agree (eq. 3), then
    ``P = sum / N``, ``R = sum / M``, ``F1 = 2PR / (P + R)`` (eq. 4).

    With ``iou_thresholds`` (e.g. :data:`COCO_IOU_THRESHOLDS`) a pair counts
    :func:`threshold_credit` of its IoU instead of the IoU itself: the reward then pays what
    F1@mIoU measures, tight boxes, and no longer pays an uncertain policy for enlarging its boxes.

    Raises ``ValueError`` for caller mistakes: shapes, label counts, a GT box that is NaN or has
    no area. A bad *predicted* box (NaN, zero area, inverted) has IoU 0 and still counts in N.
    """
    pb = geo.as_array(pred_boxes, 4, "pred_boxes")
    gb = geo.check_gt_boxes(gt_boxes)
    pl = geo.check_labels(pred_labels, len(pb), "pred_labels")
    gl = geo.check_labels(gt_labels, len(gb), "gt_labels")
    sim = geo.box_iou(pb, gb)
    if iou_thresholds is not None:
        sim = threshold_credit(sim, iou_thresholds)
    return f1_from_matrix(sim, geo.same_label(pl, gl), matching)


def corner_similarity(pred_boxes, gt_boxes) -> np.ndarray:
    """``[N, M]`` L1 corner term in [0, 1]: ``1 - (|dx0| + |dy0| + |dx1| + |dy1|) / (2 (w + h))``
    with ``w``, ``h`` the GT box's sides, floored at 0. 1 for the same box; corners each half a
    side off give 0.5. Unlike IoU it still grades boxes that do not overlap, by how far off they
    are (GETok's box reward pairs IoU with such an L1 corner distance, appendix C.3)."""
    pb = geo.as_array(pred_boxes, 4, "pred_boxes")
    gb = geo.check_gt_boxes(gt_boxes)
    if len(pb) == 0 or len(gb) == 0:
        return np.zeros((len(pb), len(gb)))
    l1 = np.abs(pb[:, None, :] - gb[None, :, :]).sum(-1)
    scale = 2.0 * ((gb[:, 2] - gb[:, 0]) + (gb[:, 3] - gb[:, 1]))
    out = 1.0 - l1 / scale[None, :]
    return np.where(np.isfinite(out), np.clip(out, 0.0, 1.0), 0.0)


def box_iou_l1_f1(pred_boxes, pred_labels, gt_boxes, gt_labels, matching: str = "paper") -> F1Result:
    """Equations 3-4 with the pair similarity ``(IoU + corner) / 2`` (:func:`corner_similarity`)
    in place of the IoU: the box part of GETok's grid-stage reward."""
    pb = geo.as_array(pred_boxes, 4, "pred_boxes")
    gb = geo.check_gt_boxes(gt_boxes)
    pl = geo.check_labels(pred_labels, len(pb), "pred_labels")
    gl = geo.check_labels(gt_labels, len(gb), "gt_labels")
    sim = 0.5 * (geo.box_iou(pb, gb) + corner_similarity(pb, gb))
    return f1_from_matrix(sim, geo.same_label(pl, gl), matching)


def polygon_iou_f1(
    pred_polygons, pred_labels, gt_polygons, gt_labels, *, height: int, width: int, matching: str = "paper"
) -> F1Result:
    """Polygon IoU F1 (OCR polygons): equations 3-4 with mask IoU of rasterised polygons.

    Polygons are flat pixel sequences ``[x0, y0, x1, y1, ...]`` (>= 3 vertices); ``height`` and
    ``width`` are the image's, the raster the IoU is measured on. A malformed predicted polygon
    scores 0 and counts; a malformed GT polygon raises ``ValueError``.
    """
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"height and width must be positive ints, got {height!r}, {width!r}")
    pred_polygons, gt_polygons = list(pred_polygons), list(gt_polygons)
    pl = geo.check_labels(pred_labels, len(pred_polygons), "pred_labels")
    gl = geo.check_labels(gt_labels, len(gt_polygons), "gt_labels")
    sim = geo.polygon_iou(pred_polygons, gt_polygons, height, width)
    return f1_from_matrix(sim, geo.same_label(pl, gl), matching)
