"""Score one model answer against one :class:`rlsys.data.samples.Sample`: the reward workers' entry point.

``score(text, sample)`` reads the text into geometry in the sample's pixels through the model's
vocabulary (``vocabulary``, :mod:`rlsys.lang.vocab`; Rex-Omni's bins by default; parsing never
raises) and picks the reward from the sample's output (paper section 4.2.3):

====================  ===========================================  =====================
output                reward                                       ``kind``
====================  ===========================================  =====================
box (any task)        box IoU F1 (eq. 3-4)                         ``box_iou``
                      ... ``box_corner_term``: (IoU + L1 corner)   ``box_iou_l1``
                      / 2 as the pair similarity (GETok)
polygon (OCR)         polygon IoU F1                               ``polygon_iou``
point, task ``gui``   point-in-box F1                              ``point_in_box``
point, other tasks    point-in-mask F1 (eq. 5), masks from the     ``point_in_mask``
                      sample or ``mask_source(sample)``
                      ... neither: point-in-box on the GT boxes    ``point_in_box_fallback``
keypoint              OKS F1 (:mod:`rewards.keypoint`)             ``keypoint_oks``
mask (GETok)          mask IoU F1, the answer's point sets          ``mask_iou``
                      decoded by SAM (``mask_source``)
                      ... ``mask_decoder="grid_cells"``: decoded    ``mask_iou_grid_cells``
                      as the union of their grid cells
                      ... ``mask_points_weight=1``: the semantic-   ``mask_points``
                      critical points reward (no decoding)
                      ... both, weighted                            ``mask_iou+points``
====================  ===========================================  =====================

Mask answers (:mod:`rewards.mask`) are read with ``vocabulary.parse_masks`` (each instance a set
of points) and matched one to one (Hungarian, GETok appendix C.3) whatever ``matching`` says.
The decoder is chosen by name, never by what happens to be configured: ``score`` decodes with
SAM and raises (naming the fix) without a SAM mask source; :func:`score_cell_masks` is the
SAM-free choice. Each scorer says which decoder it needs in its ``mask_decoder`` attribute
(None: none), which :func:`rlsys.data.prepare.check_point_masks` checks against the config at start.

How an answer's parts count (all predictions are per instance, labelled by their phrase):

- ``None`` for a phrase with no GT is right and adds nothing to either side; ``None`` (or no
  answer) for a phrase with GT leaves its GT unfound (recall).
- A prediction for a phrase the question did not ask matches no GT label: a false positive.
- An instance of the wrong kind (points when boxes were asked) scores 0 and counts in
  ``num_pred``; so does every unreadable fragment the parser skipped. An empty answer counts
  as one unreadable fragment: the format asks for ``None``, and garbage must not earn the 1.0
  of "no GT, no prediction".

Text never makes ``score`` raise; a malformed sample (or a ``mask_source`` returning masks of
the wrong number or size) raises ``ValueError`` naming the sample.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rewards import behaviour
from rewards import geometry as geo
from rewards.box import COCO_IOU_THRESHOLDS, box_iou_f1, box_iou_l1_f1, polygon_iou_f1
from rewards.f1 import MATCHINGS, F1Result, f1_from_sum, f_beta
from rewards.keypoint import keypoint_oks_f1
from rewards.mask import MASK_DECODERS, decode_point_sets, mask_iou_f1, mask_points_f1, reference_points
from rewards.point import point_in_box_f1, point_in_mask_f1
from rlsys.data.samples import OUTPUTS, TASKS
from rlsys.lang.format import Prediction
from rlsys.lang.vocab import REX_BINS, check_writes_masks

MaskSource = Callable[..., Sequence]  # mask_source(sample) -> one HxW mask or COCO RLE per instance


@dataclass(frozen=True)
class RewardResult:
    """The reward of one answer and its parts (for logging and the paper's behaviour analysis).

    ``num_pred`` includes wrong-kind instances and unreadable fragments; ``duplicate`` and
    ``large_box`` are the paper's section 6.1.2 flags for this answer
    (:mod:`rewards.behaviour`); ``error`` says what went wrong with the text, if anything.
    """

    reward: float
    kind: str
    precision: float
    recall: float
    num_pred: int
    num_gt: int
    unreadable: int
    duplicate: bool
    large_box: bool
    error: str | None = None


def load_scorer(spec: str) -> Callable:
    """The function ``reward.scorer`` names (``module:function``)."""
    import importlib

    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def takes_vocabulary(score_fn: Callable) -> bool:
    """Whether ``score_fn`` accepts ``vocabulary=`` (by name, or through ``**kwargs``)."""
    import inspect

    params = inspect.signature(score_fn).parameters
    return "vocabulary" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _needs_decoder(decoder: str | None):
    """Mark a scorer with the mask decoder its mask answers need (None: no decoding)."""

    def mark(fn):
        fn.mask_decoder = decoder
        return fn

    return mark


@_needs_decoder("sam")
def score(
    text: str,
    sample,
    *,
    mask_source: MaskSource | None = None,
    matching: str = "paper",
    box_iou_thresholds=None,
    vocabulary=REX_BINS,
    box_corner_term: bool = False,
    mask_decoder: str = "sam",
    mask_points_weight: float = 0.0,
) -> RewardResult:
    """Reward of ``text`` for ``sample``; see the module docstring for the rules. ``vocabulary``
    is the one the model writes in (:func:`rlsys.lang.vocab.make_vocabulary`).

    ``box_iou_thresholds``: score box answers by the fraction of these IoU thresholds each
    matched box reaches (:func:`rewards.box.threshold_credit`) instead of by its IoU.
    ``box_corner_term``: pair similarity ``(IoU + L1 corner term) / 2``
    (:func:`rewards.box.box_iou_l1_f1`, kind ``box_iou_l1``).
    ``mask_decoder``: how mask answers become masks, ``"sam"`` (``mask_source.masks_from_points``)
    or ``"grid_cells"`` (:func:`rewards.mask.grid_cell_masks`). ``mask_points_weight``: the
    share of the semantic-critical points reward (:func:`rewards.mask.mask_points_f1`) in a
    mask answer's reward, the rest being the mask IoU F1 (1: points only, nothing decoded)."""
    return _score(
        text,
        sample,
        mask_source=mask_source,
        matching=matching,
        box_iou_thresholds=box_iou_thresholds,
        vocabulary=vocabulary,
        box_corner_term=box_corner_term,
        mask_decoder=mask_decoder,
        mask_points_weight=mask_points_weight,
    )[0]


def _score(
    text,
    sample,
    *,
    mask_source=None,
    matching="paper",
    box_iou_thresholds=None,
    vocabulary=REX_BINS,
    box_corner_term=False,
    mask_decoder="sam",
    mask_points_weight=0.0,
) -> tuple[RewardResult, list]:
    """:func:`score` and the answer's instances as written (read once, for rewards that look at them)."""
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    if box_corner_term and box_iou_thresholds is not None:
        raise ValueError("box_corner_term and box_iou_thresholds are two box rewards; choose one")
    if mask_decoder not in MASK_DECODERS:
        raise ValueError(f"mask_decoder must be one of {MASK_DECODERS}, got {mask_decoder!r}")
    if not 0.0 <= mask_points_weight <= 1.0:
        raise ValueError(f"mask_points_weight must be in [0, 1], got {mask_points_weight}")
    _check_sample(sample)
    try:
        vocabulary = vocabulary.for_sample(sample)  # chatrex reads indices into the sample's proposals
        if sample.output == "keypoint":
            return _score_keypoints(text, sample, matching, vocabulary)
        if sample.output == "mask":
            return _score_masks(text, sample, mask_source, vocabulary, mask_decoder, mask_points_weight)
        return _score_parsed(text, sample, mask_source, matching, box_iou_thresholds, vocabulary, box_corner_term)
    except ValueError as exc:  # only the sample's (or mask source's) data can raise here
        raise ValueError(f"sample {sample.id!r} ({getattr(sample, 'source', '<memory>')}): {exc}") from exc


@_needs_decoder("sam")
def score_coco_thresholds(text: str, sample, **kw) -> RewardResult:
    """:func:`score` with box answers credited at COCO's IoU thresholds 0.50:0.95 (what F1@mIoU
    counts). For ``reward.scorer=rewards.scorer:score_coco_thresholds``; other kinds unchanged."""
    return score(text, sample, box_iou_thresholds=COCO_IOU_THRESHOLDS, **kw)


@_needs_decoder("grid_cells")
def score_cell_masks(text: str, sample, **kw) -> RewardResult:
    """:func:`score` with mask answers decoded without SAM, as the union of their points' grid
    cells (:func:`rewards.mask.grid_cell_masks`, kind ``mask_iou_grid_cells``): for CPU tests and
    tiny runs, ``reward.scorer=rewards.scorer:score_cell_masks``. Other kinds unchanged."""
    return score(text, sample, mask_decoder="grid_cells", **kw)


@_needs_decoder(None)
def score_getok_mask_points(text: str, sample, **kw) -> RewardResult:
    """:func:`score` with mask answers scored by GETok's semantic-critical points reward alone
    (:func:`rewards.mask.mask_points_f1`, kind ``mask_points``: hit ratio, spacing and point
    count of each set against its GT mask); nothing is decoded, so no SAM is needed.
    ``reward.scorer=rewards.scorer:score_getok_mask_points``. Other kinds unchanged."""
    return score(text, sample, mask_points_weight=1.0, **kw)


# Recall weight of score_recall_weighted: F2 (recall counts twice as much as precision).
RECALL_WEIGHT = 2.0


@_needs_decoder("sam")
def score_recall_weighted(text: str, sample, **kw) -> RewardResult:
    """:func:`score` with F-beta (beta :data:`RECALL_WEIGHT`) of its precision and recall in place
    of F1, for ``reward.scorer=rewards.scorer:score_recall_weighted``.

    Why (issue 19): under F1 an uncertain box is about break-even, so GRPO learns to leave it out.
    Three objects, two found at IoU 0.8; a third box that hits at IoU 0.7 half the time:
    two boxes give P 0.8, R 1.6/3 = 0.533, F1 0.640; three give F1 0.767 on a hit and
    0.533 on a miss, 0.650 on average. At IoU 0.6 on a hit it is 0.633: dropping the box wins.
    Under F2 two boxes give 0.571 and three 0.650 (0.633 at IoU 0.6): writing it wins. A perfect
    answer still scores 1, an empty answer to an absent phrase too (P = R = 1)."""
    r = score(text, sample, **kw)
    if r.num_pred == 0 and r.num_gt == 0:
        return r
    reward = f_beta(r.precision, r.recall, RECALL_WEIGHT)
    return RewardResult(
        reward, r.kind, r.precision, r.recall, r.num_pred, r.num_gt, r.unreadable, r.duplicate, r.large_box, r.error
    )


# Weight of score_missed_penalty's count term: the reward loses this much times the share of the
# GT objects the answer wrote no instance for.
MISSED_OBJECT_PENALTY = 0.2


@_needs_decoder("sam")
def score_missed_penalty(text: str, sample, **kw) -> RewardResult:
    """:func:`score` minus :data:`MISSED_OBJECT_PENALTY` x ``max(0, num_gt - num_pred) / num_gt``,
    for ``reward.scorer=rewards.scorer:score_missed_penalty``: F1 plus a one-sided count term.

    Why (issue 19): under F1 (and under any F-beta) a box that misses its object lowers the
    reward, so GRPO learns to leave out the box it is least sure of. On the demo's SFT answers to
    three-object detection questions with three boxes, dropping the weakest box raises F1 in 39
    of 75; F2 still in 26, since a box at IoU 0 costs precision whatever recall's weight. With
    this term at 0.2 dropping it wins in 10 of 75. Too many boxes are not counted here: precision
    already charges them. The reward ranges over ``[-0.2, 1]``; an answer with as many instances
    as objects (or more) scores exactly :func:`score`."""
    r = score(text, sample, **kw)
    if r.num_gt == 0 or r.num_pred >= r.num_gt:
        return r
    reward = r.reward - MISSED_OBJECT_PENALTY * (r.num_gt - r.num_pred) / r.num_gt
    return RewardResult(
        reward, r.kind, r.precision, r.recall, r.num_pred, r.num_gt, r.unreadable, r.duplicate, r.large_box, r.error
    )


# Weight of the two-sided count term (score_count_penalty, score_coco_count_penalty): the reward
# loses this much times min(1, |num_pred - num_gt| / num_gt). Chosen on the demo's validation split
# (issue 33, 3 seeds each, with COCO threshold credit): at 0.2 GRPO gained F1@mIoU +4.3 but wrote
# too few boxes +1.5 points [+0.1, +2.9] more often; at 0.3, +3.6 with too few +0.9 [-0.5, +2.3]
# and too many +0.7 [-0.7, +1.9].
COUNT_PENALTY = 0.3


def _with_count_term(r: RewardResult, weight: float) -> RewardResult:
    """``r`` less ``weight`` x ``min(1, |num_pred - num_gt| / num_gt)``; unchanged without GT
    (an instance written for an absent phrase already scores 0 precision)."""
    if r.num_gt == 0 or r.num_pred == r.num_gt:
        return r
    reward = r.reward - weight * min(1.0, abs(r.num_pred - r.num_gt) / r.num_gt)
    return RewardResult(
        reward, r.kind, r.precision, r.recall, r.num_pred, r.num_gt, r.unreadable, r.duplicate, r.large_box, r.error
    )


@_needs_decoder("sam")
def score_count_penalty(text: str, sample, **kw) -> RewardResult:
    """:func:`score` with a count term on both sides, for
    ``reward.scorer=rewards.scorer:score_count_penalty``: minus :data:`COUNT_PENALTY` x
    ``min(1, |num_pred - num_gt| / num_gt)``. Range ``[-0.3, 1]``.

    Why (issue 33): :func:`score_missed_penalty`'s one-sided term leaves a second box as the
    hedge whenever the model is unsure of one. A referring question (one object) where each box
    the model writes hits with probability 0.3: one box earns 0.30 on average; two earn 2/3 when
    either hits (precision 1/2), 2/3 x 0.51 = 0.34 on average, so the second box pays. On the
    demo's SFT model GRPO under that reward raised too-many-boxes from 6.0% to 15.9% of held-out
    answers (one seed to 28%). Here it costs 0.3: 0.04 against 0.30. The missed side charges
    0.3 / num_gt per object left without an instance, as :func:`score_missed_penalty` 0.2."""
    return _with_count_term(score(text, sample, **kw), COUNT_PENALTY)


@_needs_decoder("sam")
def score_coco_count_penalty(text: str, sample, **kw) -> RewardResult:
    """:func:`score_count_penalty` with box answers credited at COCO's IoU thresholds 0.50:0.95
    (:func:`score_coco_thresholds`), for ``reward.scorer=rewards.scorer:score_coco_count_penalty``.

    Why (issue 33): F1@mIoU, the demo's headline, averages F1 over the thresholds 0.50:0.95 (the
    demo's SFT model: F1@0.50 44.9, F1@0.95 0.5: its boxes are loose). The paper's reward pays a
    matched box its IoU, 0.05 for each 0.05 of IoU, and pays a box at IoU 0.3 as much as half a
    good one; here a box earns the share of the ten thresholds it reaches: nothing below 0.5,
    then 0.1 for each 0.05, twice the IoU's slope, as F1@mIoU counts it."""
    return _with_count_term(score(text, sample, box_iou_thresholds=COCO_IOU_THRESHOLDS, **kw), COUNT_PENALTY)


def leave_one_out_gain(text: str, sample, score_fn: Callable = score, vocabulary=REX_BINS, **kw) -> float | None:
    """What ``score_fn`` pays for leaving out one box: the best reward over the answers that drop
    one of its boxes, minus the reward of the whole answer (both rendered again from the parsed
    answer, so they differ in that box only). Measured where the answer has as many boxes as the
    sample has objects, two or more (None elsewhere): a positive gain is the reward's pull
    towards too few boxes (issue 19). ``kw`` goes to ``score_fn`` (``matching=``, ...)."""
    if sample.output != "box" or len(sample.instances) < 2:
        return None
    vocabulary = vocabulary.for_sample(sample)
    w, h = sample.width, sample.height
    parsed = vocabulary.parse(text, w, h)
    preds = list(parsed)  # phrases answered None stay in the text
    boxes = [(k, j) for k, p in enumerate(preds) if p.kind == "box" for j in range(len(p.coords))]
    if parsed.unreadable or len(boxes) != len(sample.instances) or len(boxes) != sum(len(p.coords) for p in preds):
        return None  # another count, unreadable parts or instances of another kind: not this question

    def reward(drop=None) -> float:
        kept = []
        for k, p in enumerate(preds):
            coords = tuple(c for j, c in enumerate(p.coords) if (k, j) != drop)
            kept.append(Prediction(p.phrase, p.kind, coords) if coords else Prediction(p.phrase, "none"))
        return score_fn(vocabulary.render(kept, w, h), sample, vocabulary=vocabulary, **kw).reward

    whole = reward()
    return max(reward(b) for b in boxes) - whole


# GETok's grid-stage reward (section 3.3.1): format, non-repeat and box terms. The paper gives no
# weights in its text; the geometric term carries the reward and the other two shape it.
GRID_STAGE_WEIGHTS = {"geometry": 0.8, "format": 0.1, "non_repeat": 0.1}
# Its geometry for a mask answer: the mask reward (IoU of the decoded masks) and the
# semantic-critical points reward, equally (ours too; the paper's answers also carry a box).
GRID_STAGE_MASK_POINTS_WEIGHT = 0.5


@_needs_decoder("sam")
def score_getok_grid_stage(text: str, sample, **kw) -> RewardResult:
    """GETok's first-stage reward for ``reward.scorer=rewards.scorer:score_getok_grid_stage``:
    ``0.8 * geometry + 0.1 * format + 0.1 * non_repeat``, where geometry is :func:`score` with the
    box IoU + L1 corner similarity (masks: half mask IoU F1 through SAM, half the
    semantic-critical points reward; other outputs: their usual reward), format is 1 when
    nothing in the answer was unreadable, and non-repeat is 0 when the answer writes one
    instance twice (the same tokens: the paper's "identical sentences"; for keypoints, the
    paper's duplicate test :func:`rewards.behaviour.is_duplicate`), else 1. Any vocabulary: it
    scores pixels."""
    kw.setdefault("mask_points_weight", GRID_STAGE_MASK_POINTS_WEIGHT)
    r, written = _score(text, sample, box_corner_term=True, **kw)
    repeated = r.duplicate if sample.output == "keypoint" else len(set(written)) < len(written)
    w = GRID_STAGE_WEIGHTS
    reward = w["geometry"] * r.reward + w["format"] * float(r.unreadable == 0) + w["non_repeat"] * float(not repeated)
    return RewardResult(
        reward, r.kind, r.precision, r.recall, r.num_pred, r.num_gt, r.unreadable, r.duplicate, r.large_box, r.error
    )


@_needs_decoder("grid_cells")
def score_getok_grid_stage_cell_masks(text: str, sample, **kw) -> RewardResult:
    """:func:`score_getok_grid_stage` with mask answers decoded without SAM (the union of their
    points' grid cells), for CPU tests and tiny runs."""
    return score_getok_grid_stage(text, sample, mask_decoder="grid_cells", **kw)


def _score_parsed(
    text, sample, mask_source, matching, box_iou_thresholds=None, vocabulary=REX_BINS, box_corner_term=False
) -> tuple[RewardResult, list]:
    w, h = sample.width, sample.height
    parsed = vocabulary.parse(text, w, h)  # predictions in the sample's pixels
    unreadable, notes = parsed.unreadable, list(parsed.errors[:3])
    if not parsed.answered and not unreadable:
        unreadable = 1
        notes.append("empty answer (a phrase absent from the image is answered None)")
    want = sample.output
    labels, coords, wrong, boxes = [], [], 0, []
    for p in parsed:
        if p.kind == "box":
            boxes.extend(p.coords)
        if p.kind == "none":
            continue
        if p.kind != want:
            wrong += len(p.coords)
            continue
        labels.extend([p.phrase] * len(p.coords))
        coords.extend(p.coords)
    if wrong:
        notes.append(f"{wrong} instance(s) of another kind than the {want} asked for")

    insts = sample.instances
    gt_labels = [i.phrase for i in insts]
    if want == "box" and box_corner_term:
        kind = "box_iou_l1"
        res = box_iou_l1_f1(coords, labels, [i.box for i in insts], gt_labels, matching)
    elif want == "box":
        kind = "box_iou"
        res = box_iou_f1(coords, labels, [i.box for i in insts], gt_labels, matching, box_iou_thresholds)
    elif want == "polygon":
        kind = "polygon_iou"
        res = polygon_iou_f1(
            coords, labels, [i.polygon for i in insts], gt_labels, height=h, width=w, matching=matching
        )
    elif sample.task == "gui":
        kind = "point_in_box"
        res = point_in_box_f1(coords, labels, _gt_boxes(insts), gt_labels, matching)
    else:
        masks = _masks(sample, mask_source)
        if masks is None:
            kind = "point_in_box_fallback"
            res = point_in_box_f1(coords, labels, _gt_boxes(insts), gt_labels, matching)
        else:
            kind = "point_in_mask"
            res = point_in_mask_f1(coords, labels, masks, gt_labels, height=h, width=w, matching=matching)
    # the duplicate test reads the values as written (bins, or the resized image's pixels)
    return _result(
        res,
        kind,
        wrong + unreadable,
        unreadable,
        behaviour.is_duplicate(parsed.written, len(insts)),
        behaviour.is_large_box(boxes, w, h),
        notes,
    ), parsed.written


def _score_masks(
    text, sample, mask_source, vocabulary, decoder: str, points_weight: float
) -> tuple[RewardResult, list]:
    """A mask answer: each instance a set of points (``vocabulary.parse_masks``), scored against
    the GT masks by mask IoU F1 after decoding, the point-set reward, or a weighted mix."""
    check_writes_masks(vocabulary)
    w, h = sample.width, sample.height
    parsed = vocabulary.parse_masks(text, w, h)  # point sets in the sample's pixels
    unreadable, notes = parsed.unreadable, list(parsed.errors[:3])
    if not parsed.answered and not unreadable:
        unreadable = 1
        notes.append("empty answer (a phrase absent from the image is answered None)")
    labels, sets = [], []
    for p in parsed:
        if p.kind == "mask":
            labels.extend([p.phrase] * len(p.coords))
            sets.extend(p.coords)
    insts = sample.instances
    gt_labels = [i.phrase for i in insts]
    gt = geo.decode_masks([i.mask for i in insts], h, w, "instance masks")
    parts, kinds = [], []
    if points_weight < 1.0:
        pred = decode_point_sets(
            sets, sample, decoder=decoder, mask_source=mask_source, grid=getattr(vocabulary, "grid", None)
        )
        parts.append((1.0 - points_weight, mask_iou_f1(pred, labels, gt, gt_labels, height=h, width=w)))
        kinds.append("mask_iou" if decoder == "sam" else "mask_iou_grid_cells")
    if points_weight > 0.0:
        refs = [_reference_points(i.mask, m, vocabulary.grid, k) for k, (i, m) in enumerate(zip(insts, gt))]
        parts.append(
            (
                points_weight,
                mask_points_f1(
                    sets, labels, gt, gt_labels, grid=vocabulary.grid, height=h, width=w, reference_counts=refs
                ),
            )
        )
        kinds.append("points" if kinds else "mask_points")
    return _result_parts(
        parts, "+".join(kinds), unreadable, unreadable, behaviour.is_duplicate(parsed.written, len(insts)), False, notes
    ), parsed.written


_REFERENCE_POINTS: dict[tuple, int] = {}


def _reference_points(rle, mask: np.ndarray, grid: int, k: int) -> int:
    """:func:`rewards.mask.reference_points` of a GT mask, remembered per COCO RLE: the G answers
    of a group, and later epochs, score against the same masks (the greedy cover costs more than
    the reward). ``mask`` is ``rle`` decoded; ``k`` only names it in errors."""
    key = (str(rle.get("counts")), mask.shape, grid) if isinstance(rle, dict) else None
    if key is None or key not in _REFERENCE_POINTS:
        if len(_REFERENCE_POINTS) >= 4096:
            _REFERENCE_POINTS.clear()
        try:
            n = reference_points(mask, grid)
        except ValueError as exc:
            raise ValueError(f"instances[{k}].mask: {exc}") from None
        if key is None:
            return n
        _REFERENCE_POINTS[key] = n
    return _REFERENCE_POINTS[key]


def _score_keypoints(text, sample, matching, vocabulary=REX_BINS) -> tuple[RewardResult, list]:
    w, h = sample.width, sample.height
    preds, unreadable = vocabulary.parse_keypoints(text, w, h)  # in the sample's pixels
    notes = [f"{unreadable} unreadable keypoint fragment(s)"] if unreadable else []
    # The paper's instance names are numbered phrases ("person1", "person2"): the label is the
    # name without its number.
    labels = [re.sub(r"\s*\d+$", "", p.name).strip() or p.name for p in preds]
    pred_boxes = [p.box for p in preds]
    pred_kps = [dict(p.keypoints) for p in preds]
    insts = sample.instances
    gt_boxes = [i.box for i in insts] if all(i.box is not None for i in insts) else None
    res = keypoint_oks_f1(
        pred_kps,
        labels,
        [i.keypoints for i in insts],
        [i.phrase for i in insts],
        [_instance_area(i, h, w) for i in insts],
        pred_boxes=pred_boxes,
        gt_boxes=gt_boxes,
        matching=matching,
    )
    return _result(
        res,
        "keypoint_oks",
        unreadable,
        unreadable,
        behaviour.is_duplicate(preds.written, len(insts)),
        behaviour.is_large_box(pred_boxes, w, h),
        notes,
    ), preds.written


def _result(res: F1Result, kind, extra_pred, unreadable, duplicate, large_box, notes) -> RewardResult:
    return _result_parts([(1.0, res)], kind, extra_pred, unreadable, duplicate, large_box, notes)


def _result_parts(parts, kind, extra_pred, unreadable, duplicate, large_box, notes) -> RewardResult:
    """``parts``: ``(weight, F1Result)`` of one answer's rewards (weights summing to 1); the
    reward, precision and recall are their weighted sums."""
    # Wrong-kind instances and unreadable fragments are predictions scoring 0 (eq. 4's m grows).
    if extra_pred:
        parts = [(wt, f1_from_sum(res.matched, res.num_pred + extra_pred, res.num_gt)) for wt, res in parts]
    f1, p, r = (sum(wt * getattr(res, a) for wt, res in parts) for a in ("f1", "precision", "recall"))
    first = parts[0][1]
    return RewardResult(
        float(f1),
        kind,
        float(p),
        float(r),
        first.num_pred,
        first.num_gt,
        unreadable,
        bool(duplicate),
        bool(large_box),
        "; ".join(notes) or None,
    )


def _gt_boxes(insts):
    for k, i in enumerate(insts):
        if i.box is None:
            raise ValueError(f"instances[{k}] has no box to score a point against")
    return [i.box for i in insts]


def _masks(sample, mask_source):
    """Per-instance masks: the sample's, completed by ``mask_source``; ``None`` if unavailable."""
    insts = sample.instances
    if all(i.mask is not None for i in insts):
        return [i.mask for i in insts]
    if mask_source is None:
        return None
    got = list(mask_source(sample))
    if len(got) != len(insts):
        raise ValueError(f"mask_source returned {len(got)} masks for {len(insts)} instances")
    return [i.mask if i.mask is not None else m for i, m in zip(insts, got)]


def _instance_area(inst, h, w) -> float:
    """OKS scale: the mask area (COCO's segment area), else the box area, else the extent of
    the labelled keypoints (at least 1 pixel²)."""
    if inst.mask is not None:
        return float(geo.mask_areas(geo.decode_masks([inst.mask], h, w, "mask"))[0]) or 1.0
    if inst.box is not None:
        x0, y0, x1, y1 = inst.box
        return float((x1 - x0) * (y1 - y0))
    pts = np.array([(x, y) for x, y, v in (inst.keypoints or {}).values() if v > 0]).reshape(-1, 2)
    if len(pts) == 0:
        return 1.0
    return max(float(np.prod(pts.max(0) - pts.min(0))), 1.0)


def _check_sample(sample) -> None:
    """Raise ``ValueError`` for a sample a reward cannot be computed against."""
    for attr in ("id", "width", "height", "task", "output", "phrases", "instances"):
        if not hasattr(sample, attr):
            raise ValueError(
                f"score: expected an rlsys.data.samples.Sample, got {type(sample).__name__} without '{attr}'"
            )
    where = f"sample {sample.id!r}"
    for name in ("width", "height"):
        v = getattr(sample, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{where}: {name} must be a positive integer, got {v!r}")
    if sample.task not in TASKS:
        raise ValueError(f"{where}: task {sample.task!r} is not one of {TASKS}")
    if sample.output not in OUTPUTS:
        raise ValueError(f"{where}: output {sample.output!r} is not one of {OUTPUTS}")
    field = {"box": "box", "polygon": "polygon", "keypoint": "keypoints", "point": None, "mask": "mask"}[sample.output]
    for k, inst in enumerate(sample.instances):
        if inst.phrase not in sample.phrases:
            raise ValueError(f"{where}: instances[{k}].phrase {inst.phrase!r} is not one of {sample.phrases}")
        if field and getattr(inst, field) is None:
            raise ValueError(f"{where}: instances[{k}] has no {field} for output {sample.output!r}")
