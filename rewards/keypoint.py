"""Keypoint reward: equations 3-4 with OKS (COCO) in place of box IoU.

The paper evaluates keypoints by F1 at OKS thresholds (section 5.11) but states no keypoint
reward; using OKS as the per-instance similarity of the box reward is the direct analogue.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from rewards import geometry as geo
from rewards.f1 import F1Result, f1_from_matrix


def keypoint_oks_f1(
    pred_keypoints: Sequence[Mapping],
    pred_labels,
    gt_keypoints: Sequence[Mapping],
    gt_labels,
    gt_areas,
    *,
    pred_boxes=None,
    gt_boxes=None,
    sigmas: Mapping | None = None,
    matching: str = "paper",
) -> F1Result:
    """OKS F1 of one answer.

    ``pred_keypoints[i]``: keypoint name -> ``(x, y)`` pixels or ``None`` (said invisible);
    ``gt_keypoints[j]``: name -> ``(x, y, v)``, ``v`` 0 unlabelled, 1/2 labelled (COCO);
    ``gt_areas`` ``[M]`` pixels² (COCO: the segment area). Names match up to case, spaces,
    ``_`` and ``-`` ("left eye" is "left_eye"); a predicted name the GT does not have is ignored, a labelled GT keypoint the prediction lacks
    contributes 0. ``sigmas``: per-name overrides of :func:`rewards.geometry.keypoint_sigmas`.

    A GT instance with no labelled keypoint has no OKS (COCO ignores it); it is scored by box
    IoU of ``pred_boxes`` ``[N, 4]`` and ``gt_boxes`` ``[M, 4]`` when given, else ``ValueError``.
    """
    pred_keypoints, gt_keypoints = list(pred_keypoints), list(gt_keypoints)
    n, m = len(pred_keypoints), len(gt_keypoints)
    pl = geo.check_labels(pred_labels, n, "pred_labels")
    gl = geo.check_labels(gt_labels, m, "gt_labels")
    areas = np.asarray(gt_areas, dtype=np.float64).reshape(-1)
    if areas.shape != (m,) or not (np.isfinite(areas).all() and (areas > 0).all()):
        raise ValueError(f"gt_areas: expected {m} positive finite areas, got {np.asarray(gt_areas).tolist()}")
    names: list[str] = []
    index: dict[str, int] = {}  # normalised name -> column
    for j, g in enumerate(gt_keypoints):
        for name, xyv in g.items():
            if not _finite_triple(xyv):
                raise ValueError(f"gt_keypoints[{j}][{name!r}]: expected finite (x, y, v), got {xyv!r}")
            if geo.norm_keypoint_name(name) not in index:
                index[geo.norm_keypoint_name(name)] = len(names)
                names.append(name)
    g_arr = np.zeros((m, len(names), 3))
    for j, g in enumerate(gt_keypoints):
        for name, xyv in g.items():
            g_arr[j, index[geo.norm_keypoint_name(name)]] = [float(v) for v in xyv]
    p_arr = np.full((n, len(names), 2), np.nan)
    for i, p in enumerate(pred_keypoints):
        for name, xy in (p or {}).items():
            name = geo.norm_keypoint_name(name)
            if name in index and xy is not None:
                try:
                    p_arr[i, index[name]] = np.asarray(xy, dtype=np.float64).reshape(2)
                except (TypeError, ValueError):
                    pass  # a malformed predicted keypoint counts as missing (a model mistake)
    sim = geo.oks(p_arr, g_arr, areas, geo.keypoint_sigmas(names, sigmas)) if n and m else np.zeros((n, m))
    no_kp = np.isnan(sim).any(axis=0) if n else np.array([not (g_arr[j, :, 2] > 0).any() for j in range(m)])
    if no_kp.any():
        if pred_boxes is None or gt_boxes is None:
            raise ValueError(
                f"gt_keypoints[{int(np.argmax(no_kp))}] has no labelled keypoint: pass pred_boxes "
                "and gt_boxes to score such instances by box IoU"
            )
        pb = geo.as_array(pred_boxes, 4, "pred_boxes")
        gb = geo.check_gt_boxes(gt_boxes)
        if len(pb) != n or len(gb) != m:
            raise ValueError(f"pred_boxes/gt_boxes: {len(pb)}/{len(gb)} boxes for {n}/{m} instances")
        if n:
            sim[:, no_kp] = geo.box_iou(pb, gb[no_kp])
    return f1_from_matrix(sim, geo.same_label(pl, gl), matching)


def _finite_triple(xyv) -> bool:
    try:
        return len(xyv) == 3 and all(math.isfinite(float(v)) for v in xyv)
    except (TypeError, ValueError):
        return False
