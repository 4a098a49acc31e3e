"""GETok masks: a mask written as a set of grid points, decoded back into a mask, and the two
grid-stage rewards that read masks (GETok paper, sections 3.2.1 and 3.3.1, appendix C.3).

- :func:`mask_to_grid_points`: a GT mask -> the grid points that write it (the SFT target),
  by the paper's greedy cover.
- Decoding a predicted set of points into a mask (:func:`decode_point_sets`): ``"sam"``, the
  paper's way, SAM prompted with the points (:meth:`rewards.sam.SamMaskSource.masks_from_points`);
  or ``"grid_cells"``, :func:`grid_cell_masks`, SAM-free: the union of the grid cells the points
  fall in. The second is a stand-in for CPU tests and tiny runs, chosen by name, never as a
  silent fallback; it cannot draw finer than a cell, so even the target scores below 1 on any
  mask that is not a union of cells.
- :func:`mask_iou_f1`: the mask reward, F1 with mask IoU as the pair similarity.
- :func:`point_set_scores` / :func:`mask_points_f1`: the semantic-critical points reward.

The grid is GETok's (:class:`rlsys.lang.vocab.GETok`): ``grid`` x ``grid`` cells over the image; the
point at pixel ``(x, y)`` lies in cell ``(floor(x / W * grid), floor(y / H * grid))`` (clamped
to the grid), cell ``(i, j)``'s grid point is its centre ``((i + 0.5) W / grid, (j + 0.5) H /
grid)``, and a pixel belongs to the cell its centre lies in. A point is inside a mask when the
pixel ``(floor(y), floor(x))`` is set (:func:`rewards.geometry.points_in_masks`).

Pure numpy; ``import rewards`` stays free of torch (SAM is imported by its mask source only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from rewards import geometry as geo
from rewards.f1 import F1Result, f1_from_matrix

MASK_DECODERS = ("sam", "grid_cells")


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
def _check_grid(grid) -> int:
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive integer (cells per image side), got {grid!r}")
    return int(grid)


def _pixel_cells(size: int, grid: int) -> np.ndarray:
    """``[size]``: the cell each pixel row (or column) belongs to, by its centre."""
    return np.minimum(np.floor((np.arange(size) + 0.5) * grid / size).astype(np.intp), grid - 1)


def grid_centres(grid: int, size: int) -> np.ndarray:
    """``[grid]`` pixel coordinates of the cell centres along an axis of ``size`` pixels."""
    return (np.arange(_check_grid(grid)) + 0.5) * size / grid


def _centres_inside(m: np.ndarray, grid: int) -> np.ndarray:
    """``[grid rows j, grid cols i]`` bool: is cell (i, j)'s centre inside mask ``m``?"""
    h, w = m.shape
    rows = np.minimum(np.floor(grid_centres(grid, h)).astype(np.intp), h - 1)
    cols = np.minimum(np.floor(grid_centres(grid, w)).astype(np.intp), w - 1)
    return m[np.ix_(rows, cols)]


def _as_mask(mask, name: str = "mask") -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"{name}: expected an H x W mask, got shape {list(m.shape)}")
    return m.astype(bool)


# ---------------------------------------------------------------------------------------------
# Mask -> grid points (the SFT target)
# ---------------------------------------------------------------------------------------------
def mask_to_grid_points(
    mask, grid: int, *, footprints: Callable | None = None, target_iou: float = 1.0
) -> list[tuple[float, float]]:
    """The grid points that write ``mask`` (``H x W``, bool or 0/1): GETok's greedy
    mask-to-token conversion (section 3.2.1), as pixel ``(x, y)`` points in reading order.

    The paper pairs every grid point with the mask a decoder draws from it (SAM in its
    segment-anything mode) and looks for the fewest points whose masks' union reaches the GT
    mask. The rule implemented:

    1. Candidates: the grid points whose centre lies inside the mask (a point outside the object
       would prompt another object).
    2. Each candidate's *footprint* is the mask its point decodes to: by default its own grid
       cell (what :func:`grid_cell_masks` draws); ``footprints(i, j)`` may give another, e.g.
       SAM's mask for that single point, which makes this exactly the paper's algorithm.
    3. Candidates are visited in descending IoU of their footprint with the mask (ties in
       reading order: row ``j``, then column ``i``). Start with nothing chosen, IoU 0; a
       candidate is taken when adding its footprint to the union *raises* the union's IoU with
       the mask (the paper's ``IoU(U + M_k, G) > IoU(U, G)``); stop once the IoU reaches
       ``target_iou`` (the paper's quality threshold; 1.0: go through every candidate).

    With cell footprints this keeps every cell lying wholly inside the mask and a boundary cell
    when the share ``f`` of it inside the mask satisfies ``f / (1 - f) > IoU`` so far (adding it
    puts ``f`` of a cell into the intersection and ``1 - f`` into the union), so cells only
    nicked by the outline are left out.

    A mask that holds no grid centre (smaller or thinner than a cell) is written as one point:
    the centre of its pixel nearest to the centre of the cell it overlaps most, the one place a
    point is not a grid centre (a vocabulary with offsets may write it closer than the cell).
    Always returns at least one point; an empty mask raises ``ValueError``.
    """
    m = _as_mask(mask)
    grid = _check_grid(grid)
    if not 0 < target_iou <= 1:
        raise ValueError(f"target_iou must be in (0, 1], got {target_iou}")
    h, w = m.shape
    area = int(m.sum())
    if area == 0:
        raise ValueError("the mask has no pixel set: it cannot be written as grid points")
    xs, ys = grid_centres(grid, w), grid_centres(grid, h)
    prow, pcol = _pixel_cells(h, grid), _pixel_cells(w, grid)
    cells = np.arange(grid)
    r0, r1 = np.searchsorted(prow, cells, "left"), np.searchsorted(prow, cells, "right")
    c0, c1 = np.searchsorted(pcol, cells, "left"), np.searchsorted(pcol, cells, "right")
    cands = [tuple(int(v) for v in jc) for jc in np.argwhere(_centres_inside(m, grid))]  # (j, i), reading order
    if not cands:
        counts = np.bincount((prow[:, None] * grid + pcol[None, :]).ravel(), weights=m.ravel(), minlength=grid * grid)
        j, i = divmod(int(np.argmax(counts)), grid)  # the first cell of largest overlap, in reading order
        py, px = np.nonzero(m[r0[j] : r1[j], c0[i] : c1[i]])
        d2 = (px + c0[i] + 0.5 - xs[i]) ** 2 + (py + r0[j] + 0.5 - ys[j]) ** 2
        k = int(np.argmin(d2))
        return [(float(px[k] + c0[i] + 0.5), float(py[k] + r0[j] + 0.5))]

    given: dict[tuple[int, int], np.ndarray] = {}  # footprints(i, j), asked once each

    def footprint(j: int, i: int) -> tuple[tuple[slice, slice], np.ndarray | None]:
        """Where the footprint lies and its pixels there (None: the whole block, a cell)."""
        if footprints is None:
            return (slice(r0[j], r1[j]), slice(c0[i], c1[i])), None
        if (j, i) not in given:
            f = np.asarray(footprints(i, j))
            if f.shape != (h, w):
                raise ValueError(f"footprints({i}, {j}) has shape {list(f.shape)}, expected the mask's [{h}, {w}]")
            given[j, i] = f.astype(bool)
        return (slice(None), slice(None)), given[j, i]

    def single_iou(j, i) -> float:
        where, f = footprint(j, i)
        mm = m[where]
        inter = int(mm.sum()) if f is None else int((mm & f).sum())
        size = mm.size if f is None else int(f.sum())
        return inter / (size + area - inter)

    order = sorted(cands, key=lambda ji: (-single_iou(*ji), ji))
    covered = np.zeros((h, w), dtype=bool)
    inter, union, iou, chosen = 0, area, 0.0, []  # the union of footprints and the mask
    for j, i in order:
        where, f = footprint(j, i)
        block, mm = covered[where], m[where]
        new = ~block if f is None else f & ~block
        d_inter, d_out = int((new & mm).sum()), int((new & ~mm).sum())
        gained = (inter + d_inter) / (union + d_out)
        if gained > iou:
            covered[where] = True if f is None else block | f
            inter, union, iou = inter + d_inter, union + d_out, gained
            chosen.append((j, i))
            if iou >= target_iou:
                break
    if not chosen:  # footprints that add nothing (cells with no pixel: a grid finer than the image)
        chosen = [order[0]]
    return [(float(xs[i]), float(ys[j])) for j, i in sorted(chosen)]


def reference_points(mask, grid: int) -> int:
    """How many points the target writes for ``mask`` (:func:`mask_to_grid_points`, cell
    footprints): the count the point-set reward's size terms are measured against
    (:func:`point_set_scores`), so the target itself is never short of points nor too long."""
    return len(mask_to_grid_points(mask, grid))


# ---------------------------------------------------------------------------------------------
# Point sets -> masks
# ---------------------------------------------------------------------------------------------
def as_point_set(raw) -> np.ndarray:
    """A predicted point set (flat ``x0, y0, x1, y1, ...`` or ``[[x, y], ...]``) as ``[n, 2]``;
    anything that is not (x, y) pairs of numbers is an empty set."""
    try:
        a = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        return np.zeros((0, 2))
    if a.ndim == 1 and a.size % 2 == 0:
        return a.reshape(-1, 2)
    return a if a.ndim == 2 and a.shape[1] == 2 else np.zeros((0, 2))  # [n, 3] is not n points


def grid_cell_masks(point_sets: Sequence, grid: int, height: int, width: int) -> np.ndarray:
    """The SAM-free decoder: point set ``k`` -> the union of the grid cells its points fall in,
    ``[K, height, width]`` bool. A point that is not finite or lies outside ``[0, W] x [0, H]``
    paints nothing (a set of only such points is an empty mask); the far borders ``x == W``,
    ``y == H`` fall in the last cell, as the vocabulary's clamp puts them.

    Honest about what it is: a mask drawn at the grid's resolution, not an object's outline.
    A set that covers every cell of the object scores the cell-quantised IoU, not 1."""
    grid = _check_grid(grid)
    prow, pcol = _pixel_cells(int(height), grid), _pixel_cells(int(width), grid)
    out = np.zeros((len(point_sets), int(height), int(width)), dtype=bool)
    for k, raw in enumerate(point_sets):
        p = as_point_set(raw)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(p).all(1) & (p[:, 0] >= 0) & (p[:, 0] <= width) & (p[:, 1] >= 0) & (p[:, 1] <= height)
        if not ok.any():
            continue
        ci = np.clip(np.floor(p[ok, 0] / width * grid), 0, grid - 1).astype(np.intp)
        cj = np.clip(np.floor(p[ok, 1] / height * grid), 0, grid - 1).astype(np.intp)
        sel = np.zeros((grid, grid), dtype=bool)
        sel[cj, ci] = True
        out[k] = sel[np.ix_(prow, pcol)]
    return out


def decode_point_sets(
    point_sets: Sequence, sample, *, decoder: str, mask_source=None, grid: int | None = None
) -> np.ndarray:
    """Predicted point sets of ``sample`` -> ``[K, H, W]`` bool masks by ``decoder``:
    ``"sam"`` (``mask_source.masks_from_points``, :class:`rewards.sam.SamMaskSource`) or
    ``"grid_cells"`` (:func:`grid_cell_masks` on the vocabulary's ``grid``). A decoder that is
    not available raises ``ValueError`` saying what to configure; nothing falls back silently."""
    h, w = int(sample.height), int(sample.width)
    if decoder == "grid_cells":
        if grid is None:
            raise ValueError(
                "the grid_cells mask decoder needs the grid the points were written on (model.vocabulary=getok)"
            )
        return grid_cell_masks(point_sets, grid, h, w)
    if decoder == "sam":
        if not callable(getattr(mask_source, "masks_from_points", None)):
            raise ValueError(
                "mask answers are decoded by SAM, and no SAM mask source was given: set reward.sam_checkpoint "
                "to a local SAM checkpoint, or choose the SAM-free decoder by name "
                "(reward.scorer=rewards.scorer:score_cell_masks)"
            )
        if not point_sets:
            return np.zeros((0, h, w), dtype=bool)
        masks = list(mask_source.masks_from_points(sample, list(point_sets)))
        if len(masks) != len(point_sets):
            raise ValueError(f"masks_from_points returned {len(masks)} masks for {len(point_sets)} point sets")
        return geo.decode_masks(masks, h, w, "decoded masks")
    raise ValueError(f"mask decoder must be one of {MASK_DECODERS}, got {decoder!r}")


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------
def _gt_masks(gt_masks, height: int, width: int) -> np.ndarray:
    if isinstance(gt_masks, np.ndarray) and gt_masks.ndim == 3:
        if gt_masks.shape[1:] != (height, width):
            raise ValueError(
                f"gt_masks are {gt_masks.shape[1]}x{gt_masks.shape[2]} (HxW) but the image is {height}x{width}"
            )
        return gt_masks.astype(bool)
    return geo.decode_masks(list(gt_masks), height, width, "gt_masks")


def mask_iou_f1(pred_masks, pred_labels, gt_masks, gt_labels, *, height: int, width: int) -> F1Result:
    """The mask reward: equations 3-4's F1 with mask IoU as the pair similarity, matched one to
    one (Hungarian, as GETok's appendix C.3 assigns predictions to GT; ``rewards.f1``).

    ``pred_masks``: ``[N, H, W]`` bool (decoded answers); ``gt_masks``: ``[M, H, W]`` or a list
    of ``H x W`` arrays / COCO RLE. The paper's "piecewise function" of the IoU has no published
    breakpoints; the IoU itself is used, as the box reward does. An empty predicted mask
    matches nothing and still counts as a prediction."""
    gm = _gt_masks(gt_masks, height, width)
    pm = np.asarray(pred_masks, dtype=bool).reshape(-1, height, width)
    pl = geo.check_labels(pred_labels, len(pm), "pred_labels")
    gl = geo.check_labels(gt_labels, len(gm), "gt_labels")
    return f1_from_matrix(geo.mask_iou(pm, gm), geo.same_label(pl, gl), "hungarian")


# The semantic-critical points reward's constants (ours: appendix C.3 names the terms, eq. 10-12,
# but its text gives neither the formulas' constants nor their values).
POINT_SET_WEIGHTS = {
    "saturation_points": 2.0,  # n0 of the saturation 1 - exp(-n / n0): 1 point earns 39%, 4 earn 86%
    "excess_penalty": 0.5,  # lambda: each reference count of points beyond the reference costs 0.5
}


def point_set_scores(
    point_sets: Sequence,
    gt_masks,
    reference_counts: Sequence[int],
    *,
    weights: dict | None = None,
    min_spacing: float | None = None,
) -> np.ndarray:
    """``[N, M]`` quality of predicted point set ``k`` as the points of GT mask ``j``, in [0, 1]
    (GETok's semantic-critical points reward, appendix C.3, eq. 10-11)::

        q = clip(hit * spacing * saturation - penalty, 0, 1)

    - ``hit``: the share of the set's ``n`` points inside the mask.
    - ``spacing``: the mean over the points of ``min(1, d_i / d_ref)``, ``d_i`` a point's
      distance to its nearest other point and ``d_ref = 0.5 sqrt(A / n)`` the mean
      nearest-neighbour distance of ``n`` random points over the mask's area ``A`` (Clark and
      Evans' expectation): the "nearest-neighbour spacing normalised by object scale". Points
      spread like a lattice or at random over the object score ~1 and ~0.79; a repeated point
      scores 0 for both copies. A single point has spacing 1. ``min_spacing`` caps ``d_ref``:
      points that far apart are never clustered (one grid cell: distinct grid points are never
      closer, so a set of neighbouring grid points, the target, has spacing 1 on any grid).
    - ``saturation``: ``(1 - exp(-n / n0)) / (1 - exp(-n_ref / n0))``, at most 1: the paper's
      exponential saturation against "degenerate few-point outputs", normalised so a set of the
      reference size ``n_ref`` (``reference_counts[j]``: the target's point count,
      :func:`reference_points`; a small object's single point earns it in full) reaches 1.
    - ``penalty``: ``lambda * max(0, n - n_ref) / n_ref``: the paper's linear term against
      "overly long point lists".

    ``n0`` and ``lambda`` are :data:`POINT_SET_WEIGHTS` (ours; the paper's values are not in its
    text). A non-finite point is a miss with no spacing; an empty set or an empty GT mask scores 0.
    """
    wts = {**POINT_SET_WEIGHTS, **(weights or {})}
    n0, lam = float(wts["saturation_points"]), float(wts["excess_penalty"])
    gm = np.asarray(gt_masks, dtype=bool)
    if gm.ndim != 3:
        raise ValueError(f"gt_masks: expected [M, H, W] bool masks, got shape {list(gm.shape)}")
    ref = np.maximum(np.asarray(reference_counts, dtype=np.float64).reshape(-1), 1.0)
    if len(ref) != len(gm):
        raise ValueError(f"{len(ref)} reference counts for {len(gm)} GT masks")
    out = np.zeros((len(point_sets), len(gm)))
    if len(gm) == 0:
        return out
    areas = geo.mask_areas(gm)
    for k, raw in enumerate(point_sets):
        p = as_point_set(raw)
        n = len(p)
        if n == 0:
            continue
        hit = geo.points_in_masks(p, gm).mean(axis=0)  # [M]
        finite = np.isfinite(p).all(axis=1)
        if n == 1:
            nn = np.array([np.inf if finite[0] else 0.0])
        else:
            q = np.where(finite[:, None], p, 0.0)
            d = np.sqrt(((q[:, None, :] - q[None, :, :]) ** 2).sum(-1))
            np.fill_diagonal(d, np.inf)
            d[:, ~finite] = np.inf  # a non-finite point is nobody's neighbour
            nn = np.where(finite, d.min(axis=1), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            d_ref = 0.5 * np.sqrt(areas / n)  # [M]
            if min_spacing is not None:
                d_ref = np.minimum(d_ref, float(min_spacing))
            spacing = np.minimum(1.0, nn[:, None] / d_ref[None, :]).mean(axis=0)
        spacing = np.where(areas > 0, np.nan_to_num(spacing, nan=0.0), 0.0)
        saturation = np.minimum(1.0, (1 - math.exp(-n / n0)) / (1 - np.exp(-ref / n0)))
        penalty = lam * np.maximum(0.0, n - ref) / ref
        out[k] = np.clip(hit * spacing * saturation - penalty, 0.0, 1.0)
    return out


def mask_points_f1(
    pred_point_sets,
    pred_labels,
    gt_masks,
    gt_labels,
    *,
    grid: int,
    height: int,
    width: int,
    weights: dict | None = None,
    reference_counts: Sequence[int] | None = None,
) -> F1Result:
    """The semantic-critical points reward of one answer: equations 3-4's F1 with
    :func:`point_set_scores` as the pair similarity, matched one to one (Hungarian). The paper
    averages its matched pairs weighted by their point counts (eq. 12); here unmatched GT and
    predictions count through the F1, as in every rlsys reward. ``grid``: the vocabulary's, for
    each GT's reference point count (:func:`reference_points`, unless ``reference_counts`` gives
    them: a caller scoring many answers to one sample computes them once) and the spacing that
    is never clustered (a cell's shorter side)."""
    gm = _gt_masks(gt_masks, height, width)
    sets = list(pred_point_sets)
    pl = geo.check_labels(pred_labels, len(sets), "pred_labels")
    gl = geo.check_labels(gt_labels, len(gm), "gt_labels")
    refs = [reference_points(m, grid) for m in gm] if reference_counts is None else list(reference_counts)
    q = point_set_scores(
        sets, gm, refs, weights=weights, min_spacing=min(height, width) / grid
    )  # a cell's shorter side
    return f1_from_matrix(q, geo.same_label(pl, gl), "hungarian")
