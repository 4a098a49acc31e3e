"""Vectorised geometry for the rewards and metrics: box IoU, point-in-box, point-in-mask,
polygon IoU and OKS. All coordinates are pixels of one image, ``x`` right and ``y`` down.

Two kinds of input, two policies:

- *Ground truth* comes from our own data: a malformed array (wrong shape, NaN, a box with no
  area, a mask of the wrong size) is a caller's bug and raises ``ValueError`` (see the
  ``check_*`` helpers, which the reward functions call on their GT arguments).
- *Predictions* come from a policy under RL and may be anything the coordinate tokens can spell.
  An unusable prediction (NaN, zero area, inverted ``x1 < x0``) simply matches nothing: its
  IoU/hit is 0. Inverted boxes are not reordered, since a model that writes them has not
  written the box.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

# ------------------------------------------------------------------------------------------
# Shape checks
# ------------------------------------------------------------------------------------------


def as_array(x, width: int, name: str) -> np.ndarray:
    """``x`` as a float64 ``[N, width]`` array; an empty sequence becomes ``[0, width]``.

    Raises ``ValueError`` when the shape is wrong (a caller's mistake whatever the values).
    """
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected an [N, {width}] array of numbers ({exc})") from None
    if a.size == 0:
        return a.reshape(0, width)
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{name}: expected shape [N, {width}], got {list(a.shape)}")
    return a


def valid_boxes(boxes: np.ndarray) -> np.ndarray:
    """``[N]`` bool: finite and with positive width and height (``x0 < x1``, ``y0 < y1``)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def check_gt_boxes(boxes, name: str = "gt_boxes") -> np.ndarray:
    """Validate ground-truth boxes ``[M, 4]`` ``(x0, y0, x1, y1)``: finite, positive area."""
    b = as_array(boxes, 4, name)
    bad = ~valid_boxes(b)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"{name}[{k}] = {b[k].tolist()} is not a box with x0 < x1 and y0 < y1 (finite)")
    return b


def check_labels(labels, n: int, name: str) -> list:
    """Labels as a list of length ``n``; ``None`` means one class for all."""
    if labels is None:
        return [0] * n
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"{name}: expected a sequence of labels, got a single string {labels!r}")
    out = list(labels)
    if len(out) != n:
        raise ValueError(f"{name}: {len(out)} labels for {n} instances")
    return out


def same_label(pred_labels: Sequence, gt_labels: Sequence) -> np.ndarray:
    """``[N, M]`` bool: ``pred_labels[i] == gt_labels[j]`` (labels: any hashable)."""
    codes: dict = {}
    p = np.array([codes.setdefault(lab, len(codes)) for lab in pred_labels], dtype=np.int64)
    g = np.array([codes.setdefault(lab, len(codes)) for lab in gt_labels], dtype=np.int64)
    return p[:, None] == g[None, :]


# ------------------------------------------------------------------------------------------
# Boxes and points
# ------------------------------------------------------------------------------------------


def box_area(boxes) -> np.ndarray:
    """``[N, 4]`` -> ``[N]`` areas in pixels²; 0 for an invalid (NaN, empty, inverted) box."""
    b = as_array(boxes, 4, "boxes")
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.where(valid_boxes(b), area, 0.0)


def box_iou(a, b) -> np.ndarray:
    """Pairwise IoU of ``a`` ``[N, 4]`` and ``b`` ``[M, 4]`` (pixels, ``x0, y0, x1, y1``) -> ``[N, M]``.

    A box that is not finite or has no positive width and height has IoU 0 with everything
    (a model mistake is scored, not repaired). Arithmetic order matches
    :func:`rewards.reference.iou_one` so the two agree to the last bit.
    """
    a = as_array(a, 4, "boxes a")
    b = as_array(b, 4, "boxes b")
    va, vb = valid_boxes(a), valid_boxes(b)
    # In-place [N, M] arithmetic: this is the reward's hot loop (see rlsys.bench.rewards).
    with np.errstate(invalid="ignore", divide="ignore"):  # invalid rows/columns are zeroed below
        iw = np.minimum(a[:, None, 2], b[None, :, 2])
        iw -= np.maximum(a[:, None, 0], b[None, :, 0])
        ih = np.minimum(a[:, None, 3], b[None, :, 3])
        ih -= np.maximum(a[:, None, 1], b[None, :, 1])
        inter = np.maximum(iw, 0.0, out=iw)
        inter *= np.maximum(ih, 0.0, out=ih)
        area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
        area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        union = area_a[:, None] + area_b[None, :]
        union -= inter
        iou = np.divide(inter, union, out=inter)
    iou[~va] = 0.0
    iou[:, ~vb] = 0.0
    return iou


def points_in_boxes(points, boxes) -> np.ndarray:
    """``[N, 2]`` points x ``[M, 4]`` boxes -> ``[N, M]`` bool, borders inclusive.

    A NaN point lies in no box; a point outside the image lies outside every (in-image) box.
    """
    p = as_array(points, 2, "points")
    b = as_array(boxes, 4, "boxes")
    x, y = p[:, 0, None], p[:, 1, None]
    with np.errstate(invalid="ignore"):
        return (b[None, :, 0] <= x) & (x <= b[None, :, 2]) & (b[None, :, 1] <= y) & (y <= b[None, :, 3])


# ------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------


def decode_masks(masks, height: int, width: int, name: str = "masks") -> np.ndarray:
    """Masks -> ``[M, height, width]`` bool.

    ``masks`` is a ``[M, H, W]`` array or a sequence of ``H x W`` arrays (bool or 0/1) or COCO RLE
    dicts ``{"size": [H, W], "counts": str | bytes | list}``. A mask of another size raises: a
    pixel lookup in a mask of the wrong image would silently score garbage.
    """
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        masks = list(masks)
    out = np.zeros((len(masks), height, width), dtype=bool)
    for k, m in enumerate(masks):
        if isinstance(m, dict):
            size = list(m.get("size", []))
            if size != [height, width] or "counts" not in m:
                raise ValueError(f"{name}[{k}]: RLE of size {size}, expected [{height}, {width}] with 'counts'")
            from pycocotools import mask as mask_utils

            counts = m["counts"]
            rle = (
                mask_utils.frPyObjects(m, height, width)
                if isinstance(counts, list)
                else {"size": size, "counts": counts}
            )
            with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2 warns on every decode
                warnings.simplefilter("ignore", DeprecationWarning)
                out[k] = mask_utils.decode(rle).astype(bool)
        else:
            a = np.asarray(m)
            if a.shape != (height, width):
                raise ValueError(f"{name}[{k}]: mask of shape {list(a.shape)}, expected [{height}, {width}]")
            out[k] = a.astype(bool)
    return out


def points_in_masks(points, masks: np.ndarray) -> np.ndarray:
    """``[N, 2]`` pixel points x ``[M, H, W]`` bool masks -> ``[N, M]`` bool.

    Pixel ``(row i, col j)`` covers ``[j, j+1) x [i, i+1)``, so a point reads the pixel
    ``(floor(y), floor(x))``; the far borders ``x == W`` / ``y == H`` (where bin 999 decodes to)
    read the last pixel. A NaN point or one outside ``[0, W] x [0, H]`` hits nothing.
    """
    p = as_array(points, 2, "points")
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks: expected [M, H, W], got shape {list(masks.shape)}")
    m, h, w = masks.shape
    if len(p) == 0 or m == 0:
        return np.zeros((len(p), m), dtype=bool)
    x, y = p[:, 0], p[:, 1]
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (x <= w) & (y >= 0) & (y <= h)
    col = np.clip(np.floor(np.where(inside, x, 0.0)), 0, w - 1).astype(np.intp)
    row = np.clip(np.floor(np.where(inside, y, 0.0)), 0, h - 1).astype(np.intp)
    return masks[:, row, col].T & inside[:, None]


def mask_areas(masks: np.ndarray) -> np.ndarray:
    """``[M, H, W]`` -> ``[M]`` pixel counts."""
    m = np.asarray(masks, dtype=bool)
    return m.reshape(m.shape[0], -1).sum(axis=1).astype(np.float64)  # shape[0]: [0, H, W] has no rows


def mask_iou(a, b) -> np.ndarray:
    """Pairwise IoU of bool masks ``a`` ``[N, H, W]`` and ``b`` ``[M, H, W]`` -> ``[N, M]``.

    Pixel counts, exact. A pair whose union is empty (two empty masks) has IoU 0: an empty
    predicted mask matches nothing. Masks of different sizes raise ``ValueError``.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"mask_iou: expected [N, H, W] and [M, H, W] of one image size, got {list(a.shape)} and {list(b.shape)}"
        )
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    fa = a.reshape(len(a), -1).astype(np.float64)
    fb = b.reshape(len(b), -1).astype(np.float64)
    inter = fa @ fb.T  # exact: float64 counts up to 2**53 pixels
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# ------------------------------------------------------------------------------------------
# Polygons
# ------------------------------------------------------------------------------------------


def valid_polygon(poly) -> bool:
    """A flat ``[x0, y0, x1, y1, ...]`` with an even number >= 6 of finite values."""
    try:
        a = np.asarray(poly, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return a.ndim == 1 and a.size >= 6 and a.size % 2 == 0 and bool(np.isfinite(a).all())


# Polygons are rasterised on a grid whose longer side is at least this many cells (up to 16x
# the image): on a 224-pixel image a 6-pixel-high word loses or gains whole pixel rows at the
# image's own resolution, which made a perfect answer score 0.93; 8x finer costs ~2 ms per
# 20 x 20 polygons.
POLYGON_RASTER_MIN = 2048


def polygon_iou(pred_polys: Sequence, gt_polys: Sequence, height: int, width: int) -> np.ndarray:
    """Pairwise IoU of polygons (flat pixel sequences) -> ``[N, M]``, via pycocotools.

    Both sides are rasterised (``frPyObjects``) on the image's ``height x width`` grid refined
    ``k`` times (see :data:`POLYGON_RASTER_MIN`; IoU is scale-free) and compared as masks
    (``iou``): exact up to ``1/k`` pixel quantisation. An invalid predicted polygon (odd
    length, fewer than 3 vertices, NaN) has IoU 0; GT polygons must be valid.
    """
    for k, g in enumerate(gt_polys):
        if not valid_polygon(g):
            raise ValueError(f"gt_polygons[{k}]: expected an even number >= 6 of finite values, got {g!r}")
    n, m = len(pred_polys), len(gt_polys)
    out = np.zeros((n, m))
    ok = [i for i, p in enumerate(pred_polys) if valid_polygon(p)]
    if not ok or m == 0:
        return out
    from pycocotools import mask as mask_utils

    k = max(1, min(16, math.ceil(POLYGON_RASTER_MIN / max(height, width))))

    def rles(polys):
        return mask_utils.frPyObjects([[float(v) * k for v in p] for p in polys], height * k, width * k)

    iou = mask_utils.iou(rles([pred_polys[i] for i in ok]), rles(gt_polys), [0] * m)
    out[ok] = np.asarray(iou, dtype=np.float64).reshape(len(ok), m)
    return out


# ------------------------------------------------------------------------------------------
# Keypoints (OKS, COCO definition)
# ------------------------------------------------------------------------------------------

COCO_PERSON_KEYPOINTS = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
# COCO's per-keypoint falloffs (cocoeval.py: kpt_oks_sigmas = [.26, .25, ...] / 10).
COCO_PERSON_SIGMAS = dict(
    zip(
        COCO_PERSON_KEYPOINTS,
        np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
        / 10.0,
    )
)
# Names outside COCO's person set (animals, our triangles) get the mean COCO sigma, about 0.067:
# a mid-body tolerance, neither an eye's (0.025) nor a hip's (0.107).
DEFAULT_SIGMA = float(np.mean(list(COCO_PERSON_SIGMAS.values())))


def norm_keypoint_name(name: str) -> str:
    """``"Left Eye"``, ``"left-eye"`` and ``"left_eye"`` are one keypoint name."""
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def keypoint_sigmas(names: Sequence[str], sigmas: dict | None = None) -> np.ndarray:
    """``[K]`` sigmas for keypoint names: ``sigmas`` (if given) first, then COCO's person
    sigmas ("left eye", "left_eye" and "Left-Eye" are the same name), then :data:`DEFAULT_SIGMA`."""
    extra = {norm_keypoint_name(k): float(v) for k, v in (sigmas or {}).items()}
    return np.array(
        [extra.get(norm_keypoint_name(n), COCO_PERSON_SIGMAS.get(norm_keypoint_name(n), DEFAULT_SIGMA)) for n in names]
    )


def oks(pred_xy, gt_xyv, gt_areas, sigmas) -> np.ndarray:
    """Object keypoint similarity, COCO definition -> ``[N, M]``.

    ``pred_xy`` ``[N, K, 2]`` pixels (NaN = keypoint not predicted); ``gt_xyv`` ``[M, K, 3]``
    (x, y, visibility; ``v > 0`` is labelled); ``gt_areas`` ``[M]`` pixels² (COCO uses the
    segment area); ``sigmas`` ``[K]``. Per labelled keypoint ``e = d² / (2 s² (2σ)²)`` with
    ``s² = area``; OKS is the mean of ``exp(-e)`` over the GT's labelled keypoints, a missing
    prediction contributing 0. A GT with no labelled keypoint gives a NaN column (COCO ignores
    such instances; callers choose what to do).
    """
    p = np.asarray(pred_xy, dtype=np.float64).reshape(-1, *np.shape(gt_xyv)[1:2], 2)
    g = np.asarray(gt_xyv, dtype=np.float64)
    if g.ndim != 3 or g.shape[2] != 3 or p.shape[1] != g.shape[1]:
        raise ValueError(f"oks: expected pred [N, K, 2] and gt [M, K, 3], got {list(p.shape)} and {list(g.shape)}")
    areas = np.asarray(gt_areas, dtype=np.float64).reshape(-1)
    var = (2.0 * np.asarray(sigmas, dtype=np.float64)) ** 2
    vis = g[:, :, 2] > 0  # [M, K]
    d2 = ((p[:, None, :, :] - g[None, :, :, :2]) ** 2).sum(axis=-1)  # [N, M, K]
    e = d2 / var / (areas[None, :, None] + np.spacing(1)) / 2.0  # cocoeval.computeOks
    sim = np.where(np.isfinite(e), np.exp(-np.where(np.isfinite(e), e, 0.0)), 0.0)
    nvis = vis.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sim * vis[None]).sum(axis=-1) / np.where(nvis > 0, nvis, np.nan)[None, :]
