"""Point rewards (paper section 4.2.3): point-in-mask (eq. 5) and point-in-box (GUI).

Both score each GT instance 0 or 1 and aggregate like the box reward (eq. 4), so a single
target with a single point is the paper's binary reward. Return :class:`rewards.f1.F1Result`.
"""

from __future__ import annotations

import numpy as np

from rewards import geometry as geo
from rewards.f1 import F1Result, f1_from_matrix


def point_in_mask_f1(
    pred_points,
    pred_labels,
    gt_masks,
    gt_labels,
    *,
    height: int | None = None,
    width: int | None = None,
    matching: str = "paper",
) -> F1Result:
    """Point-in-mask F1: GT ``j`` scores 1 if a point with its label lies inside its mask (eq. 5).

    ``pred_points`` ``[N, 2]`` pixels ``(x, y)``. ``gt_masks``: ``[M, H, W]`` bool array, or a
    list of ``H x W`` arrays / COCO RLE dicts; ``height``/``width`` (the image's) are required
    for a list and checked against an array. A mask of another size raises ``ValueError``; a
    NaN point or one outside the image hits nothing and counts as a prediction.
    """
    pp = geo.as_array(pred_points, 2, "pred_points")
    if isinstance(gt_masks, np.ndarray) and gt_masks.ndim == 3:
        h, w = gt_masks.shape[1:]
        if (height, width) not in ((None, None), (h, w)):
            raise ValueError(f"gt_masks are {h}x{w} (HxW) but the image is {height}x{width}")
        height, width = h, w
    elif height is None or width is None:
        if len(gt_masks):
            raise ValueError("point_in_mask_f1: pass height and width with a list of masks")
        height = width = 1
    masks = geo.decode_masks(gt_masks, height, width, "gt_masks")
    pl = geo.check_labels(pred_labels, len(pp), "pred_labels")
    gl = geo.check_labels(gt_labels, len(masks), "gt_labels")
    hits = geo.points_in_masks(pp, masks).astype(np.float64)
    return f1_from_matrix(hits, geo.same_label(pl, gl), matching)


def point_in_box_f1(pred_points, pred_labels, gt_boxes, gt_labels, matching: str = "paper") -> F1Result:
    """Point-in-box F1 (GUI grounding): GT box ``j`` scores 1 if a same-label point lies in it
    (borders included). ``pred_points`` ``[N, 2]``, ``gt_boxes`` ``[M, 4]``, pixels."""
    pp = geo.as_array(pred_points, 2, "pred_points")
    gb = geo.check_gt_boxes(gt_boxes)
    pl = geo.check_labels(pred_labels, len(pp), "pred_labels")
    gl = geo.check_labels(gt_labels, len(gb), "gt_labels")
    hits = geo.points_in_boxes(pp, gb).astype(np.float64)
    return f1_from_matrix(hits, geo.same_label(pl, gl), matching)


point_in_box = point_in_box_f1  # the name the paper's "point-in-box reward" suggests
