"""Geometry-aware rewards and evaluation metrics (Rex-Omni paper, sections 4.2.3, 5.1, 6.1.2).

Pure functions on numpy arrays in pixels: nothing here imports Ray, vLLM or DeepSpeed (a test
checks), so reward workers, evaluation and notebooks share one implementation.

- ``rewards.scorer`` (import it by name: it reads answers in :mod:`rlsys.lang`, which itself uses
  the geometry here): :func:`score`, model text + :class:`rlsys.data.samples.Sample` -> :class:`RewardResult`;
  :func:`score_coco_thresholds` credits boxes at IoU 0.50:0.95 instead of by IoU.
- Rewards, each -> :class:`F1Result` (``.f1`` is the reward): :func:`box_iou_f1`,
  :func:`polygon_iou_f1`, :func:`point_in_mask_f1`, :func:`point_in_box_f1`, :func:`keypoint_oks_f1`,
  and GETok's masks (``rewards.mask``): :func:`mask_iou_f1`, :func:`mask_points_f1`.
- Metrics over a set (``rewards.metrics``): :func:`detection_f1`, :func:`pointing_f1`,
  :func:`gui_accuracy`, :func:`duplicate_rate`, :func:`large_box_rate`, :func:`count_rates`.
- ``rewards.geometry``: the vectorised IoU / point / mask / polygon / OKS primitives;
  ``rewards.reference``: slow loop references for tests and the bench;
  ``rewards.sam``: a SAM mask source (``mask_source(sample)``) for point-in-mask, which also
  decodes GETok's point sets into masks (``masks_from_points``);
  ``rewards.mask``: masks as sets of grid points (:func:`mask_to_grid_points`), the SAM-free
  decoder :func:`grid_cell_masks`.
"""

from rewards.behaviour import is_duplicate, is_large_box
from rewards.box import COCO_IOU_THRESHOLDS, box_iou_f1, polygon_iou_f1, threshold_credit
from rewards.f1 import F1Result, f1_from_sum
from rewards.keypoint import keypoint_oks_f1
from rewards.mask import grid_cell_masks, mask_iou_f1, mask_points_f1, mask_to_grid_points
from rewards.metrics import (
    count_rates,  # noqa: F401
    detection_f1,
    duplicate_flags,
    duplicate_rate,
    gui_accuracy,
    large_box_flags,
    large_box_rate,
    pointing_f1,
)
from rewards.point import point_in_box, point_in_box_f1, point_in_mask_f1

__all__ = [
    "F1Result",
    "box_iou_f1",
    "detection_f1",
    "duplicate_flags",
    "duplicate_rate",
    "f1_from_sum",
    "grid_cell_masks",
    "gui_accuracy",
    "is_duplicate",
    "is_large_box",
    "keypoint_oks_f1",
    "large_box_flags",
    "large_box_rate",
    "mask_iou_f1",
    "mask_points_f1",
    "mask_to_grid_points",
    "point_in_box",
    "point_in_box_f1",
    "point_in_mask_f1",
    "pointing_f1",
    "polygon_iou_f1",
    "threshold_credit",
    "COCO_IOU_THRESHOLDS",
]
