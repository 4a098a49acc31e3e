"""Rewards against hand-worked values (paper section 4.2.3, equations 3-5), the slow loop
reference, bad inputs, and the import purity of ``rewards``."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards import (
    box_iou_f1,
    keypoint_oks_f1,
    point_in_box_f1,
    point_in_mask_f1,
    polygon_iou_f1,
)
from rewards import geometry as geo
from rewards.f1 import f1_from_sum
from rewards.reference import box_iou_f1_reference, iou_one

A = (0.0, 0.0, 10.0, 10.0)
B = (20.0, 20.0, 30.0, 30.0)
FAR = (50.0, 50.0, 60.0, 60.0)


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
def test_box_iou_hand_worked():
    # A vs (5, 5, 15, 15): inter 5*5 = 25, union 100 + 100 - 25 = 175 -> 1/7.
    # A vs (0, 0, 10, 20): inter 100, union 100 + 200 - 100 = 200 -> 0.5.
    iou = geo.box_iou([A], [A, (5, 5, 15, 15), (0, 0, 10, 20), FAR])
    np.testing.assert_allclose(iou, [[1.0, 1 / 7, 0.5, 0.0]])
    assert geo.box_iou([], [A]).shape == (0, 1) and geo.box_iou([A], []).shape == (1, 0)


def test_box_iou_invalid_boxes_are_zero_not_repaired():
    # NaN, zero width, and A written inverted (x1 < x0): all IoU 0, even against themselves.
    bad = [(np.nan, 0, 10, 10), (5, 5, 5, 9), (10, 10, 0, 0)]
    assert not geo.box_iou(bad, [A] + bad).any()


def test_points_in_boxes_and_masks():
    # Borders count; NaN and outside points hit nothing.
    pts = [(0, 0), (10, 10), (10.01, 5), (np.nan, 5), (-1, 3)]
    assert geo.points_in_boxes(pts, [A])[:, 0].tolist() == [True, True, False, False, False]
    m = np.zeros((1, 4, 6), bool)  # H=4, W=6
    m[0, 1:3, 5] = True  # the last column, rows 1-2
    # (5.5, 1.5) reads pixel (1, 5); x == W = 6 is the far border (bin 999) and reads column 5;
    # (6.01, 1.5) is outside the image; (5.5, 3.5) reads row 3, not in the mask.
    hits = geo.points_in_masks([(5.5, 1.5), (6.0, 2.0), (6.01, 1.5), (5.5, 3.5), (np.nan, 1)], m)
    assert hits[:, 0].tolist() == [True, True, False, False, False]


def test_decode_masks_rle_and_size_check():
    from pycocotools import mask as mask_utils

    m = np.zeros((5, 7), np.uint8)
    m[1:3, 2:6] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    as_str = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    for given_mask in (m, rle, as_str):
        np.testing.assert_array_equal(geo.decode_masks([given_mask], 5, 7)[0], m.astype(bool))
    with pytest.raises(ValueError, match="expected \\[5, 8\\]"):
        geo.decode_masks([as_str], 5, 8)
    with pytest.raises(ValueError, match="shape \\[5, 7\\], expected \\[6, 7\\]"):
        geo.decode_masks([m], 6, 7)


def test_oks_matches_cocoeval_transcription():
    # cocoeval.computeOks, written as loops, on random data: e = d^2 / vars / (area + eps) / 2.
    rng = np.random.default_rng(0)
    k = 17
    sig = np.array(list(geo.COCO_PERSON_SIGMAS.values()))
    gt = np.concatenate([rng.uniform(0, 100, (3, k, 2)), rng.integers(0, 3, (3, k, 1))], axis=2)
    pred = gt[[0, 1, 2, 0], :, :2] + rng.normal(0, 3, (4, k, 2))
    pred[0, 3] = np.nan  # a missing predicted keypoint contributes 0
    areas = rng.uniform(500, 3000, 3)
    got = geo.oks(pred, gt, areas, sig)
    for i, j in itertools.product(range(4), range(3)):
        vis = gt[j, :, 2] > 0
        total = 0.0
        for n in range(k):
            if vis[n] and not np.isnan(pred[i, n, 0]):
                d2 = (pred[i, n, 0] - gt[j, n, 0]) ** 2 + (pred[i, n, 1] - gt[j, n, 1]) ** 2
                total += math.exp(-d2 / (2 * sig[n]) ** 2 / (areas[j] + np.spacing(1)) / 2)
        assert got[i, j] == pytest.approx(total / vis.sum())


def test_keypoint_sigmas_names():
    s = geo.keypoint_sigmas(["left eye", "Left-Hip", "tail"], {"tail": 0.5})
    np.testing.assert_allclose(s, [0.025, 0.107, 0.5])
    assert geo.keypoint_sigmas(["top"])[0] == pytest.approx(geo.DEFAULT_SIGMA)


# ----------------------------------------------------------------------------------------------
# box IoU F1 (eq. 3-4)
# ----------------------------------------------------------------------------------------------
def test_box_f1_brief_example():
    # Two GT, three predictions: A exactly (IoU 1.0), half of B (20,20,30,25): inter 50, union
    # 100 -> IoU 0.5, and one far away. r = [1.0, 0.5]: P = 1.5/3 = 0.5, R = 1.5/2 = 0.75,
    # F1 = 2 * 0.5 * 0.75 / 1.25 = 0.6.
    for matching in ("paper", "hungarian"):
        r = box_iou_f1([A, (20, 20, 30, 25), FAR], ["x"] * 3, [A, B], ["x", "x"], matching=matching)
        assert (r.precision, r.recall, r.f1) == pytest.approx((0.5, 0.75, 0.6))
        assert (r.num_pred, r.num_gt, r.matched) == (3, 2, pytest.approx(1.5))


def test_box_f1_wrong_label_of_best_box_scores_zero_in_paper_matching():
    # GT A "cat". Pred 1: A labelled "dog" (IoU 1.0); pred 2: (0,0,10,20) "cat" (IoU 0.5).
    # Paper eq. 3 takes the best-IoU prediction (the dog): wrong label -> r = 0 -> F1 0.
    # Hungarian pairs the GT with the cat: r = 0.5, P = 0.5/2, R = 0.5/1, F1 = 2*.25*.5/.75 = 1/3.
    args = ([A, (0, 0, 10, 20)], ["dog", "cat"], [A], ["cat"])
    assert box_iou_f1(*args).f1 == 0.0
    assert box_iou_f1(*args, matching="hungarian").f1 == pytest.approx(1 / 3)


def test_box_f1_tie_goes_to_same_label():
    # The same box twice, first with the wrong label: both have IoU 1; the tie goes to "cat".
    # r = 1: P = 1/2, R = 1, F1 = 2/3.
    assert box_iou_f1([A, A], ["dog", "cat"], [A], ["cat"]).f1 == pytest.approx(2 / 3)


def test_box_f1_one_box_over_two_objects():
    # GT (0,0,10,10) and (10,0,20,10); one prediction (0,0,20,10) has IoU 100/200 = 0.5 with each.
    # Paper: both GT take it, r = [.5, .5]: P = 1/1, R = 1/2, F1 = 2*.5/1.5 = 2/3.
    # Hungarian: it serves one GT: r = [.5, 0]: P = .5, R = .25, F1 = 2*.125/.75 = 1/3.
    args = ([(0, 0, 20, 10)], None, [(0, 0, 10, 10), (10, 0, 20, 10)], None)
    assert box_iou_f1(*args).f1 == pytest.approx(2 / 3)
    assert box_iou_f1(*args, matching="hungarian").f1 == pytest.approx(1 / 3)


def test_precision_is_clipped_when_one_box_is_best_for_several_gt():
    # Two identical GT boxes, one prediction on them: eq. 3 gives r = [1, 1], and eq. 4 would
    # give P = 2/1 = 2, F1 = 4/3. Clipped: P = 1, R = 1, F1 = 1 (hungarian: r = [1, 0], F1 2/3).
    r = box_iou_f1([A], None, [A, A], None)
    assert (r.precision, r.recall, r.f1) == (1.0, 1.0, 1.0)
    assert box_iou_f1([A], None, [A, A], None, matching="hungarian").f1 == pytest.approx(2 / 3)


def test_box_f1_duplicates_cost_precision():
    # One GT, the right box written 3 times: r = 1, P = 1/3, R = 1, F1 = 2*(1/3)/(4/3) = 0.5.
    assert box_iou_f1([A] * 3, None, [A], None).f1 == pytest.approx(0.5)
    assert box_iou_f1([A], None, [A], None).f1 == 1.0  # exactly 1.0: no epsilon in the way


def test_box_f1_empty_sides():
    assert box_iou_f1([], [], [], []).f1 == 1.0  # nothing there, nothing claimed
    assert box_iou_f1([], [], [A], ["x"]).f1 == 0.0
    assert box_iou_f1([A], ["x"], [], []).f1 == 0.0
    assert box_iou_f1(np.zeros((0, 4)), [], np.zeros((0, 4)), [], matching="hungarian").f1 == 1.0


@pytest.mark.parametrize("bad", [(5, 5, 5, 9), (10, 10, 0, 0), (np.nan, 0, 10, 10), (0, 0, np.inf, 10)])
def test_box_f1_model_mistakes_score_zero_and_count(bad):
    # The bad prediction has IoU 0 but still counts: r = [1], P = 1/2, R = 1, F1 = 2/3.
    r = box_iou_f1([A, bad], None, [A], None)
    assert (r.num_pred, r.f1) == (2, pytest.approx(2 / 3))
    assert box_iou_f1([bad], None, [A], None).f1 == 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        (([A], ["x", "y"], [A], ["x"]), "2 labels for 1 instances"),
        (([A], ["x"], [A], []), "gt_labels: 0 labels"),
        (([(0, 0, 1)], ["x"], [A], ["x"]), "shape \\[N, 4\\]"),
        (([A], ["x"], [(np.nan, 0, 1, 1)], ["x"]), "gt_boxes\\[0\\]"),
        (([A], ["x"], [(0, 0, 0, 5)], ["x"]), "x0 < x1"),
        (([A], ["x"], [(10, 10, 0, 0)], ["x"]), "x0 < x1"),
        (([A], "x", [A], ["x"]), "single string"),
    ],
)
def test_box_f1_caller_mistakes_raise(args, message):
    with pytest.raises(ValueError, match=message):
        box_iou_f1(*args)


def test_unknown_matching_raises():
    with pytest.raises(ValueError, match="matching"):
        box_iou_f1([A], None, [A], None, matching="greedy")


# ----------------------------------------------------------------------------------------------
# vectorised == slow reference
# ----------------------------------------------------------------------------------------------
def _random_case(rng, n, m, labels=3):
    def boxes(k):
        xy = rng.uniform(0, 80, (k, 2))
        return np.concatenate([xy, xy + rng.uniform(1, 30, (k, 2))], axis=1)

    gt = boxes(m)
    pred = boxes(n)
    if n and m:  # some predictions near GT, some exact duplicates of one another
        near = rng.integers(0, m, n)
        take = rng.random(n) < 0.5
        pred[take] = gt[near[take]] + rng.normal(0, 2, (take.sum(), 4))
        if n > 2:
            pred[1] = pred[0]
    if n > 3:  # a model mistake or two
        pred[2] = (5, 5, 5, 9)
        pred[3, 0] = np.nan
    return pred, rng.integers(0, labels, n).tolist(), gt, rng.integers(0, labels, m).tolist()


@pytest.mark.parametrize("matching", ["paper", "hungarian"])
@pytest.mark.parametrize("seed", range(6))
def test_vectorised_matches_reference(seed, matching):
    rng = np.random.default_rng(seed)
    for n, m in [(0, 0), (0, 3), (4, 0), (1, 1), (7, 5), (20, 30), (40, 12)]:
        p, pl, g, gl = _random_case(rng, n, m)
        fast = box_iou_f1(p, pl, g, gl, matching=matching)
        slow = box_iou_f1_reference(p.tolist(), pl, g.tolist(), gl, matching=matching)
        assert (fast.num_pred, fast.num_gt) == (slow.num_pred, slow.num_gt)
        assert fast.f1 == pytest.approx(slow.f1, abs=1e-12)
        assert fast.matched == pytest.approx(slow.matched, abs=1e-12)
        # The IoU matrix itself is bit-identical (same arithmetic order).
        assert geo.box_iou(p, g).tolist() == [[iou_one(a, b) for b in g.tolist()] for a in p.tolist()]


@pytest.mark.parametrize("seed", range(4))
def test_hungarian_is_the_best_one_to_one_assignment(seed):
    # Brute force over all injections of GT into predictions (small sizes only).
    rng = np.random.default_rng(100 + seed)
    p, pl, g, gl = _random_case(rng, 5, 4, labels=2)
    w = [[iou_one(a, b) if la == lb else 0.0 for b, lb in zip(g.tolist(), gl)] for a, la in zip(p.tolist(), pl)]
    best = max(sum(w[i][j] for j, i in enumerate(perm)) for perm in itertools.permutations(range(5), 4))
    assert box_iou_f1(p, pl, g, gl, matching="hungarian").matched == pytest.approx(best)


box_st = st.tuples(*[st.floats(0, 50, allow_nan=False)] * 2, *[st.floats(0.5, 20, allow_nan=False)] * 2).map(
    lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])
)


@settings(max_examples=60, deadline=None)
@given(st.lists(box_st, max_size=6), st.lists(box_st, max_size=6), st.integers(0, 5))
def test_properties(preds, gts, dup):
    r = box_iou_f1(preds, None, gts, None)
    assert 0.0 <= r.f1 <= 1.0 and 0.0 <= r.precision <= 1.0 and 0.0 <= r.recall <= 1.0
    # One class: one-to-one can only lose matches.
    assert box_iou_f1(preds, None, gts, None, matching="hungarian").f1 <= r.f1 + 1e-12
    if preds:  # writing a prediction again never helps under eq. 4
        again = preds + [preds[dup % len(preds)]]
        assert box_iou_f1(again, None, gts, None).f1 <= r.f1 + 1e-12


# ----------------------------------------------------------------------------------------------
# point in mask (eq. 5), point in box (GUI)
# ----------------------------------------------------------------------------------------------
def _two_masks():
    m = np.zeros((2, 10, 10), bool)
    m[0, :, :5] = True  # "a": the left half
    m[1, :5, 5:] = True  # "b": the top-right quarter
    return m


def test_point_in_mask_hand_worked():
    # (2, 2) "a" lies in mask a -> r_a = 1. Mask b holds only (7.5, 1), labelled "a" -> r_b = 0;
    # (7, 7) "b" lies outside b. Sum 1: P = 1/3, R = 1/2, F1 = 2*(1/6)/(5/6) = 0.4.
    r = point_in_mask_f1([(2, 2), (7, 7), (7.5, 1)], ["a", "b", "a"], _two_masks(), ["a", "b"])
    assert (r.precision, r.recall, r.f1) == pytest.approx((1 / 3, 0.5, 0.4))


def test_point_in_mask_rle_equals_array_and_single_target_is_binary():
    from pycocotools import mask as mask_utils

    masks = _two_masks()
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    pts, labels = [(2, 2), (7, 2)], ["a", "b"]
    assert point_in_mask_f1(pts, labels, rles, ["a", "b"], height=10, width=10).f1 == 1.0
    assert point_in_mask_f1(pts, labels, masks, ["a", "b"]).f1 == 1.0
    assert point_in_mask_f1([(2, 2)], None, masks[:1], None).f1 == 1.0
    assert point_in_mask_f1([(7, 7)], None, masks[:1], None).f1 == 0.0


def test_point_in_mask_duplicates_and_bad_points():
    masks = _two_masks()[:1]
    # Three points in the one mask: r = 1, P = 1/3, R = 1 -> F1 0.5 (paper); same one-to-one.
    for matching in ("paper", "hungarian"):
        assert point_in_mask_f1([(1, 1)] * 3, None, masks, None, matching=matching).f1 == pytest.approx(0.5)
    # NaN and off-image points count as predictions hitting nothing: P = 1/3, R = 1 -> 0.5.
    assert point_in_mask_f1([(1, 1), (np.nan, 1), (-3, 4)], None, masks, None).f1 == pytest.approx(0.5)
    assert point_in_mask_f1([], None, masks, None).f1 == 0.0
    assert point_in_mask_f1([], None, np.zeros((0, 10, 10), bool), None).f1 == 1.0


def test_point_in_mask_caller_mistakes():
    masks = _two_masks()
    with pytest.raises(ValueError, match="expected \\[12, 10\\]"):
        point_in_mask_f1([(1, 1)], None, list(masks), [0, 0], height=12, width=10)
    with pytest.raises(ValueError, match="but the image is 12x10"):
        point_in_mask_f1([(1, 1)], None, masks, [0, 0], height=12, width=10)
    with pytest.raises(ValueError, match="height and width"):
        point_in_mask_f1([(1, 1)], None, list(masks), [0, 0])
    with pytest.raises(ValueError, match="1 labels for 2"):
        point_in_mask_f1([(1, 1)], None, masks, [0])


def test_point_in_box():
    # Single GUI target: inside (borders included) -> 1, outside -> 0 (the paper's binary reward).
    assert point_in_box_f1([(10, 10)], ["ok"], [A], ["ok"]).f1 == 1.0
    assert point_in_box_f1([(11, 5)], ["ok"], [A], ["ok"]).f1 == 0.0
    assert point_in_box_f1([(5, 5)], ["cancel"], [A], ["ok"]).f1 == 0.0
    # Two points, one inside: P = 1/2, R = 1, F1 = 2/3.
    assert point_in_box_f1([(5, 5), (np.nan, 5)], None, [A], None).f1 == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="x0 < x1"):
        point_in_box_f1([(5, 5)], None, [(10, 0, 0, 10)], None)


# ----------------------------------------------------------------------------------------------
# polygons (OCR) and keypoints (OKS)
# ----------------------------------------------------------------------------------------------
SQUARE = (0, 0, 10, 0, 10, 10, 0, 10)


def test_polygon_f1():
    kw = dict(height=20, width=20)
    assert polygon_iou_f1([SQUARE], None, [SQUARE], None, **kw).f1 == pytest.approx(1.0)
    # The left half of the square: IoU 50/100 = 0.5 (pycocotools rasterises on the 20x20 grid).
    half = (0, 0, 5, 0, 5, 10, 0, 10)
    assert polygon_iou_f1([half], None, [SQUARE], None, **kw).f1 == pytest.approx(0.5, abs=0.02)
    # A malformed prediction (5 values, NaN, only 2 vertices) scores 0 and counts: F1 = 2/3.
    for bad in [(0, 0, 10, 0, 10), (0, 0, 10, np.nan, 10, 10), (0, 0, 10, 10)]:
        r = polygon_iou_f1([SQUARE, bad], None, [SQUARE], None, **kw)
        assert (r.num_pred, r.f1) == (2, pytest.approx(2 / 3))
    with pytest.raises(ValueError, match="gt_polygons\\[0\\]"):
        polygon_iou_f1([SQUARE], None, [(0, 0, 1, 1)], None, **kw)
    assert polygon_iou_f1([], None, [], None, **kw).f1 == 1.0


def test_keypoint_oks_f1_hand_worked():
    gt = [{"tip": (10.0, 10.0, 2), "base": (20.0, 20.0, 2), "hidden": (0.0, 0.0, 0)}]
    sig = {"tip": 0.5, "base": 0.5}
    # sigma 0.5 -> (2 sigma)^2 = 1; area 1. "tip" off by (1, 1): e = 2 / 1 / 1 / 2 = 1 -> e^-1.
    # "base" not predicted -> 0; "hidden" is unlabelled and ignored. OKS = (e^-1 + 0) / 2.
    pred = [{"tip": (11.0, 11.0), "base": None, "hidden": (99.0, 99.0)}]
    r = keypoint_oks_f1(pred, ["t"], gt, ["t"], [1.0], sigmas=sig)
    assert r.matched == pytest.approx(math.exp(-1) / 2)
    assert r.f1 == pytest.approx(math.exp(-1) / 2)  # P = R = OKS for one-to-one
    exact = [{"tip": (10.0, 10.0), "base": (20.0, 20.0)}]
    assert keypoint_oks_f1(exact, ["t"], gt, ["t"], [1.0]).f1 == pytest.approx(1.0)
    assert keypoint_oks_f1(exact, ["u"], gt, ["t"], [1.0]).f1 == 0.0  # wrong label
    assert keypoint_oks_f1([], [], gt, ["t"], [1.0]).f1 == 0.0


def test_keypoint_without_labelled_keypoints_falls_back_to_box_iou():
    gt = [{"tip": (1.0, 1.0, 0)}]
    with pytest.raises(ValueError, match="no labelled keypoint"):
        keypoint_oks_f1([{}], None, gt, None, [100.0])
    # Box (0,0,10,20) vs GT box A: IoU 0.5 -> F1 0.5.
    r = keypoint_oks_f1([{}], None, gt, None, [100.0], pred_boxes=[(0, 0, 10, 20)], gt_boxes=[A])
    assert r.f1 == pytest.approx(0.5)


def test_keypoint_caller_mistakes():
    with pytest.raises(ValueError, match="gt_areas"):
        keypoint_oks_f1([], [], [{"a": (1, 1, 2)}], ["t"], [0.0])
    with pytest.raises(ValueError, match="finite"):
        keypoint_oks_f1([], [], [{"a": (np.nan, 1, 2)}], ["t"], [1.0])


def test_f1_from_sum():
    # matched 1.5 over 3 predictions and 2 GT: the brief's example again.
    assert f1_from_sum(1.5, 3, 2).f1 == pytest.approx(0.6)
    assert float(f1_from_sum(0.0, 0, 0)) == 1.0


# ----------------------------------------------------------------------------------------------
# purity
# ----------------------------------------------------------------------------------------------
def test_import_is_pure():
    # Reward workers import rewards on every node: it must not drag in the distributed stack
    # (or torch, whose import alone takes seconds).
    code = (
        "import sys, rewards, rewards.scorer, rewards.metrics, rewards.reference, rewards.geometry\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'vllm', 'deepspeed', 'torch'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_threshold_credit_hand_worked():
    from rewards import COCO_IOU_THRESHOLDS, threshold_credit

    assert COCO_IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    # 0.7 reaches 0.50, 0.55, 0.60, 0.65, 0.70: 5 of 10; 0.49 none; 1.0 all; 0.95 all ten
    assert threshold_credit([0.7, 0.49, 1.0, 0.95]).tolist() == [0.5, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="thresholds"):
        threshold_credit([0.5], thresholds=[])
    with pytest.raises(ValueError, match="thresholds"):
        threshold_credit([0.5], thresholds=[0.0, 0.5])


def test_box_reward_at_iou_thresholds_does_not_pay_for_a_grown_box():
    gt = [[0, 0, 10, 10]]
    exact, grown, off = [[0, 0, 10, 10]], [[0, 0, 12, 12]], [[3, 0, 13, 10]]
    # plain IoU: grown box 100 / 144 = 0.694; shifted box 70 / 130 = 0.538
    assert box_iou_f1(grown, None, gt, None).f1 == pytest.approx(100 / 144)
    assert box_iou_f1(off, None, gt, None).f1 == pytest.approx(70 / 130)
    # at the thresholds: 0.694 reaches 0.50..0.65 (4 of 10), 0.538 reaches 0.50 (1 of 10)
    from rewards import COCO_IOU_THRESHOLDS as t

    assert box_iou_f1(exact, None, gt, None, iou_thresholds=t).f1 == 1.0
    assert box_iou_f1(grown, None, gt, None, iou_thresholds=t).f1 == pytest.approx(0.4)
    assert box_iou_f1(off, None, gt, None, iou_thresholds=t).f1 == pytest.approx(0.1)
    # two predictions on one GT: P = 0.4 / 2, R = 0.4 -> F1 = 2 * 0.2 * 0.4 / 0.6
    r = box_iou_f1(grown + [[50, 50, 60, 60]], None, gt, None, iou_thresholds=t)
    assert r.f1 == pytest.approx(2 * 0.2 * 0.4 / 0.6)


def test_score_coco_thresholds_scores_boxes_at_thresholds_and_points_as_before():
    from rewards.scorer import score, score_coco_thresholds
    from rlsys.data.samples import Instance, Sample

    s = Sample("s", "img.png", 999, 999, "detection", ["cat"], [Instance("cat", box=(0, 0, 100, 100))], "box")
    text = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><120><120><|box_end|>"
    assert score(text, s).reward == pytest.approx(100 * 100 / (120 * 120))  # 0.694
    assert score_coco_thresholds(text, s).reward == pytest.approx(0.4)
    p = Sample("p", "img.png", 999, 999, "pointing", ["cat"], [Instance("cat", box=(0, 0, 100, 100))], "point")
    pt = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><50><50><|box_end|>"
    assert score_coco_thresholds(pt, p).reward == score(pt, p).reward == 1.0


# ---------------------------------------------------------------------------------------------
# GETok's box term: IoU with an L1 corner term
# ---------------------------------------------------------------------------------------------
def test_corner_similarity_hand_worked():
    from rewards.box import box_iou_l1_f1, corner_similarity

    gt = [(0, 0, 10, 10)]
    # scale 2 * (10 + 10) = 40: the same box 1; every corner 5 px off (sum 20) 0.5; a box one
    # width to the right (sum 20) 0.5 though its IoU is 0; two widths right (sum 40) 0; clipped at 0
    preds = [(0, 0, 10, 10), (5, 5, 15, 15), (10, 0, 20, 10), (20, 0, 30, 10), (100, 100, 110, 110)]
    assert corner_similarity(preds, gt)[:, 0] == pytest.approx([1.0, 0.5, 0.5, 0.0, 0.0])
    assert corner_similarity(np.zeros((0, 4)), gt).shape == (0, 1)
    # F1 with similarity (IoU + corner) / 2: the shifted box (5, 5, 15, 15) has IoU 25 / 175
    r = box_iou_l1_f1([(5, 5, 15, 15)], ["a"], gt, ["a"])
    assert r.f1 == pytest.approx((25 / 175 + 0.5) / 2)
    # the non-overlapping neighbour still earns its corner half; the wrong label earns nothing
    assert box_iou_l1_f1([(10, 0, 20, 10)], ["a"], gt, ["a"]).f1 == pytest.approx(0.25)
    assert box_iou_l1_f1([(0, 0, 10, 10)], ["b"], gt, ["a"]).f1 == 0.0
    # a NaN prediction scores 0 and counts, as for the IoU reward
    assert box_iou_l1_f1([(np.nan, 0, 10, 10), (0, 0, 10, 10)], ["a", "a"], gt, ["a"]).f1 == pytest.approx(2 / 3)


def test_getok_grid_stage_reward_hand_worked():
    from rewards.scorer import score, score_getok_grid_stage
    from rlsys.data.samples import Instance, Sample
    from rlsys.lang.format import Prediction, render

    smp = Sample("s", "img.png", 999, 999, "detection", ["cat"], [Instance("cat", box=(0, 0, 999, 999))], "box")
    full = render([Prediction("cat", "box", ((0, 0, 999, 999),))])  # bins = pixels on a 999 px image
    # exact box, readable, no repeat: 0.8 + 0.1 + 0.1
    assert score_getok_grid_stage(full, smp).reward == pytest.approx(1.0)
    assert score_getok_grid_stage(full, smp).kind == "box_iou_l1"
    # one unreadable fragment: F1 = 2 * (1/2) * 1 / 1.5 = 2/3 and no format point
    r = score_getok_grid_stage(full + ", junk", smp)
    assert r.unreadable == 1 and r.reward == pytest.approx(0.8 * 2 / 3 + 0.1)
    # a box one width off to the right of a 100 px GT: IoU 0, corner 0.5 -> similarity 0.25
    smp2 = Sample("t", "img.png", 999, 999, "detection", ["cat"], [Instance("cat", box=(0, 0, 100, 100))], "box")
    shifted = full.replace("<0><0><999><999>", "<100><0><200><100>")
    assert score(shifted, smp2).reward == 0.0
    assert score_getok_grid_stage(shifted, smp2).reward == pytest.approx(0.8 * 0.25 + 0.2)
    # the same box written twice: F1 = 2 * (1/2) * 1 / 1.5 = 2/3 and no non-repeat point
    twice = full.replace("<0><0><999><999>", "<0><0><999><999>,<0><0><999><999>")
    assert score_getok_grid_stage(twice, smp).reward == pytest.approx(0.8 * 2 / 3 + 0.1)
    with pytest.raises(ValueError, match="choose one"):
        score(full, smp, box_corner_term=True, box_iou_thresholds=(0.5,))
