"""Evaluation metrics (paper sections 5.1, 5.6, 5.7, 6.1.2) against hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest

from rewards import geometry as geo
from rewards.behaviour import is_duplicate, is_large_box, longest_repeat_run
from rewards.metrics import (
    DEFAULT_IOU_THRESHOLDS,
    count_rates,
    detection_f1,
    duplicate_flags,
    duplicate_rate,
    gui_accuracy,
    large_box_flags,
    large_box_rate,
    pointing_f1,
)

A = (0.0, 0.0, 10.0, 10.0)
B = (20.0, 0.0, 30.0, 10.0)
C = (0.0, 20.0, 10.0, 30.0)
FAR = (50.0, 50.0, 60.0, 60.0)


def test_detection_f1_hand_worked():
    # cat: GT A, B; predictions A exactly (IoU 1), (20,0,30,12.5) (inter 100 / union 125 = 0.8)
    # and one far away. dog: GT C; prediction (0,20,10,40) (inter 100 / union 200 = 0.5).
    images = [
        {
            "gt": [("cat", A), ("cat", B), ("dog", C)],
            "pred": [("cat", A), ("cat", (20, 0, 30, 12.5)), ("cat", FAR), ("dog", (0, 20, 10, 40))],
        }
    ]
    m = detection_f1(images)
    # t = 0.50: cat TP 2 (R 2/2, P 2/3), dog TP 1 (R 1, P 1): R = 1, P = 5/6, F1 = 10/11.
    assert (m["R@0.50"], m["P@0.50"], m["F1@0.50"]) == pytest.approx((1.0, 5 / 6, 10 / 11))
    # t = 0.55 .. 0.80 (six thresholds; 0.8 exactly still counts): cat as above, dog TP 0:
    # R = (1 + 0)/2 = 0.5, P = (2/3 + 0)/2 = 1/3, F1 = 2 * (1/6) / (5/6) = 0.4.
    for t in ("0.55", "0.60", "0.65", "0.70", "0.75", "0.80"):
        assert (m[f"R@{t}"], m[f"P@{t}"], m[f"F1@{t}"]) == pytest.approx((0.5, 1 / 3, 0.4))
    # t = 0.85 .. 0.95: only A: cat R 1/2, P 1/3; dog 0: R = 0.25, P = 1/6, F1 = (1/12)/(5/12) = 0.2.
    for t in ("0.85", "0.90", "0.95"):
        assert (m[f"R@{t}"], m[f"P@{t}"], m[f"F1@{t}"]) == pytest.approx((0.25, 1 / 6, 0.2))
    # mIoU: R = (1 + 6*0.5 + 3*0.25)/10 = 0.475, P = (5/6 + 6/3 + 3/6)/10 = 1/3,
    # F1 = 2 * 0.475 * (1/3) / (0.475 + 1/3) = 0.39175... (harmonic mean of the means).
    assert m["R@mIoU"] == pytest.approx(0.475)
    assert m["P@mIoU"] == pytest.approx(1 / 3)
    assert m["F1@mIoU"] == pytest.approx(2 * 0.475 / 3 / (0.475 + 1 / 3))
    assert len(m) == 3 * 11 and list(m)[:3] == ["R@0.50", "P@0.50", "F1@0.50"]


def test_detection_f1_counts_over_the_set_then_averages_categories():
    # Image 1: cat found. Image 2: cat missed, a prediction elsewhere. Per category over the set:
    # cat TP 1, GT 2, pred 2 -> R 1/2, P 1/2 (not the mean of per-image values).
    images = [
        {"gt": [("cat", A)], "pred": [("cat", A)]},
        {"gt": [("cat", A)], "pred": [("cat", FAR)]},
    ]
    m = detection_f1(images, iou_thresholds=[0.5])
    assert (m["R@0.50"], m["P@0.50"]) == (0.5, 0.5)


def test_detection_f1_one_to_one():
    # The same box three times for one GT: one match, two false positives: R 1, P 1/3, F1 0.5.
    m = detection_f1([{"gt": [("cat", A)], "pred": [("cat", A)] * 3}], iou_thresholds=[0.5])
    assert (m["R@0.50"], m["P@0.50"], m["F1@0.50"]) == pytest.approx((1.0, 1 / 3, 0.5))
    # Labels must agree: a perfect box with the wrong label matches nothing.
    m = detection_f1([{"gt": [("cat", A)], "pred": [("dog", A)]}], iou_thresholds=[0.5])
    assert m["F1@0.50"] == 0.0


def test_detection_f1_categories_missing_on_one_side():
    # cat: found (R 1, P 1). dog: GT, never predicted -> recall 0, no precision (undefined).
    # bird: predicted, no GT -> precision 0, no recall. R = (1 + 0)/2 = 0.5 over {cat, dog};
    # P = (1 + 0)/2 = 0.5 over {cat, bird}; F1 = 0.5.
    images = [{"gt": [("cat", A), ("dog", C)], "pred": [("cat", A), ("bird", FAR)]}]
    m = detection_f1(images, iou_thresholds=[0.5])
    assert (m["R@0.50"], m["P@0.50"], m["F1@0.50"]) == (0.5, 0.5, 0.5)


def test_detection_f1_empty_conventions_and_bad_input():
    assert detection_f1([{"gt": [], "pred": []}])["F1@mIoU"] == 1.0
    only_gt = detection_f1([{"gt": [("cat", A)], "pred": []}])
    assert (only_gt["R@mIoU"], only_gt["P@mIoU"], only_gt["F1@mIoU"]) == (0.0, 0.0, 0.0)
    only_pred = detection_f1([{"gt": [], "pred": [("cat", A)]}])
    assert (only_pred["R@mIoU"], only_pred["P@mIoU"]) == (0.0, 0.0)
    # Invalid predictions match nothing but count; invalid GT is the caller's bug.
    m = detection_f1([{"gt": [("cat", A)], "pred": [("cat", A), ("cat", (10, 10, 0, 0)), ("cat", (np.nan,) * 4)]}])
    assert m["P@0.50"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="gt boxes"):
        detection_f1([{"gt": [("cat", (0, 0, 0, 0))], "pred": []}])
    with pytest.raises(ValueError, match="at least one image"):
        detection_f1([])
    with pytest.raises(ValueError, match="keys"):
        detection_f1([{"gt": []}])
    with pytest.raises(ValueError, match="iou_thresholds"):
        detection_f1([{"gt": [], "pred": []}], iou_thresholds=[0.0])


def _greedy_at(sim, t):
    """Greedy matching restricted to pairs with IoU >= t, re-run for every threshold."""
    pairs = sorted(
        (
            (sim[i, j], i, j)
            for i in range(sim.shape[0])
            for j in range(sim.shape[1])
            if sim[i, j] >= t - 1e-9 and sim[i, j] > 0
        ),
        reverse=True,
    )
    used_i, used_j, n = set(), set(), 0
    for _, i, j in pairs:
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            n += 1
    return n


@pytest.mark.parametrize("seed", range(3))
def test_detection_f1_single_pass_equals_per_threshold_greedy(seed):
    # detection_f1 matches once and thresholds the matched IoUs; re-matching at every threshold
    # must give the same counts (greedy takes pairs in descending order).
    rng = np.random.default_rng(seed)
    images, tp = [], {t: 0 for t in DEFAULT_IOU_THRESHOLDS}
    for _ in range(4):
        xy = rng.uniform(0, 100, (8, 2))
        gt = np.concatenate([xy, xy + rng.uniform(5, 30, (8, 2))], axis=1)
        pred = np.concatenate([gt, gt[:4]]) + rng.normal(0, 2, (12, 4))
        images.append({"gt": [("c", b) for b in gt], "pred": [("c", b) for b in pred]})
        for t in tp:
            tp[t] += _greedy_at(geo.box_iou(pred, gt), t)
    m = detection_f1(images)
    for t, n in tp.items():
        assert m[f"R@{t:.2f}"] == pytest.approx(n / 32) and m[f"P@{t:.2f}"] == pytest.approx(n / 48)


def test_pointing_f1():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, :, :5] = True
    masks[1, :, 5:] = True
    # cat: two points in mask 0 -> one match (one-to-one), one false positive: R 1, P 1/2.
    # dog: GT mask 1, its point (2, 2) falls in mask 0 (the cat's) -> R 0, P 0.
    # R = (1 + 0)/2 = 0.5, P = (0.5 + 0)/2 = 0.25, F1 = 2 * .125 / .75 = 1/3.
    images = [
        {"gt": [("cat", masks[0]), ("dog", masks[1])], "pred": [("cat", (1, 1)), ("cat", (2, 2)), ("dog", (2, 2))]}
    ]
    m = pointing_f1(images)
    assert (m["R"], m["P"], m["F1"]) == pytest.approx((0.5, 0.25, 1 / 3))
    assert pointing_f1([{"gt": [("cat", masks[0])], "pred": [("cat", None)]}])["F1"] == 0.0


def test_gui_accuracy():
    # Hit, miss, border hit (inclusive), no answer: 2/4.
    boxes = [A, A, A, A]
    assert gui_accuracy([(5, 5), (11, 5), (10, 0), None], boxes) == 0.5
    with pytest.raises(ValueError, match="3 points for 4 boxes"):
        gui_accuracy([(5, 5)] * 3, boxes)


def test_duplicate_definition():
    box = (12, 42, 512, 612)
    # The same box 10 times: x0 repeats across 10 consecutive instances (run 10), and
    # 10 boxes > 2 * 1 GT -> repeated prediction.
    assert longest_repeat_run([box] * 10) == 10
    assert is_duplicate([box] * 10, num_gt=1)
    assert not is_duplicate([box] * 10, num_gt=5)  # 10 boxes are not more than 2 * 5
    assert not is_duplicate([box] * 9, num_gt=1)  # a run of 9 is not enough
    # Shifted copies that keep x0 count too; the flat token stream counts (here <7> x 12).
    assert longest_repeat_run([(12, k, 100, 100 + k) for k in range(11)]) == 11
    assert longest_repeat_run([(7, 7, 7, 7)] * 3) == 12
    assert longest_repeat_run([]) == 0


def test_count_rates_hand_worked():
    B = (0, 0, 10, 10)
    images = [
        {"gt": [("cat", B)] * 2, "pred": [("cat", B)] * 2},  # cat: exact
        {"gt": [("cat", B)], "pred": [("cat", B)] * 3},  # cat: over
        {"gt": [("cat", B)] * 3 + [("dog", B)], "pred": [("cat", B)]},  # cat: under, dog: under
        {"gt": [], "pred": [("dog", B)]},  # dog on nothing: over
        {"gt": [], "pred": []},  # no pair at all
    ]
    # 5 (image, label) pairs: 1 exact, 2 over, 2 under; the empty image adds none
    assert count_rates(images) == {"exact_count_rate": 0.2, "over_count_rate": 0.4, "under_count_rate": 0.4}
    assert count_rates([{"gt": [], "pred": []}]) == {
        "exact_count_rate": 1.0,
        "over_count_rate": 0.0,
        "under_count_rate": 0.0,
    }
    with pytest.raises(ValueError, match=r"images\[0\]\['pred'\]\[0\]"):
        count_rates([{"gt": [], "pred": [("cat",)]}])


def test_duplicate_and_large_box_rates():
    dup = {"gt": [("cat", A)], "pred": [("cat", A)] * 12}
    clean = {"gt": [("cat", A)], "pred": [("cat", A)]}
    many_gt = {"gt": [("cat", A)] * 6, "pred": [("cat", A)] * 12}  # 12 is not > 2 * 6
    assert duplicate_flags([dup, clean, many_gt]) == [True, False, False]
    assert duplicate_rate([dup, clean, many_gt]) == pytest.approx(1 / 3)
    # 100x100 image: a box of 98x98 = 96% > 95% -> large; 90x100 = 90% -> not; two boxes -> not.
    big = {"gt": [], "pred": [("cat", (1, 1, 99, 99))], "width": 100, "height": 100}
    smaller = {"gt": [], "pred": [("cat", (0, 0, 90, 100))], "width": 100, "height": 100}
    two = {"gt": [], "pred": [("cat", (0, 0, 100, 100))] * 2, "width": 100, "height": 100}
    assert large_box_flags([big, smaller, two]) == [True, False, False]
    assert large_box_rate([big, smaller, two, big]) == 0.5
    assert not is_large_box([(100, 100, 0, 0)], 100, 100)  # inverted: no area
    with pytest.raises(ValueError, match="width"):
        large_box_rate([{"gt": [], "pred": []}])


# ---- per-image count tables and the paired bootstrap over images --------------------------------
from rewards.metrics import (  # noqa: E402
    count_rates_weighted,
    count_table,
    detection_table,
    paired_bootstrap,
    pointing_table,
)


def _random_images(rng, n, labels=("cat", "dog", "red square")):
    def box():
        x, y = rng.uniform(0, 80, 2)
        return (x, y, x + rng.uniform(5, 20), y + rng.uniform(5, 20))

    return [
        {
            "gt": [(labels[rng.integers(len(labels))], box()) for _ in range(rng.integers(0, 4))],
            "pred": [(labels[rng.integers(len(labels))], box()) for _ in range(rng.integers(0, 4))],
            "width": 100,
            "height": 100,
        }
        for _ in range(n)
    ]


def _expand(images, weights):
    """The slow reference of a weighted set: each image repeated as often as it was drawn."""
    return [im for im, k in zip(images, weights) for _ in range(int(k))]


def test_count_table_with_unit_weights_is_the_metric_and_a_resample_is_the_repeated_set():
    rng = np.random.default_rng(3)
    images = _random_images(rng, 25)
    table = detection_table(images)
    r, p = table.scores()
    m = detection_f1(images)
    assert r[0].tolist() == pytest.approx([m[f"R@{t:.2f}"] for t in DEFAULT_IOU_THRESHOLDS])
    assert p[0].tolist() == pytest.approx([m[f"P@{t:.2f}"] for t in DEFAULT_IOU_THRESHOLDS])
    w = rng.multinomial(25, np.full(25, 1 / 25), size=6).astype(float)
    r, p = table.scores(w)
    ct = count_table(images)
    rates = count_rates_weighted(ct, w)
    for b in range(6):
        ref = detection_f1(_expand(images, w[b]))
        assert r[b].tolist() == pytest.approx([ref[f"R@{t:.2f}"] for t in DEFAULT_IOU_THRESHOLDS])
        assert p[b].tolist() == pytest.approx([ref[f"P@{t:.2f}"] for t in DEFAULT_IOU_THRESHOLDS])
        ref_rates = count_rates(_expand(images, w[b]))
        assert {k: float(v[b]) for k, v in rates.items()} == pytest.approx(ref_rates)


def test_count_table_categories_absent_from_a_resample_drop_out_of_the_average():
    # image 0: cat found exactly; image 1: dog GT never predicted. All of the set: R = (1 + 0)/2,
    # P = 1 (only cat predicted). Drawing image 0 twice: dog is not in the set, R = P = 1.
    # Drawing image 1 twice: dog only, R = 0, nothing predicted -> P = 0.
    table = detection_table([{"gt": [("cat", A)], "pred": [("cat", A)]}, {"gt": [("dog", A)], "pred": []}], [0.5])
    r, p = table.scores(np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]]))
    assert r[:, 0].tolist() == [0.5, 1.0, 0.0] and p[:, 0].tolist() == [1.0, 1.0, 0.0]
    # no GT and no prediction in the draw: R = P = 1, the empty-set convention
    empty = detection_table([{"gt": [], "pred": []}], [0.5])
    assert empty.scores()[0].tolist() == [[1.0]]


def test_pointing_table_is_pointing_f1():
    m = np.zeros((10, 10), dtype=bool)
    m[2:5, 2:5] = True
    images = [
        {"gt": [("cat", m)], "pred": [("cat", (3, 3)), ("cat", (3.5, 3.5))]},  # one hit, a second point in it
        {"gt": [("dog", m)], "pred": [("dog", (8, 8))]},
    ]  # a miss
    r, p = pointing_table(images).scores()
    ref = pointing_f1(images)
    assert (r[0, 0], p[0, 0]) == pytest.approx((ref["R"], ref["P"]))
    # cat R 1, P 1/2; dog R 0, P 0: R = 0.5, P = 0.25
    assert (ref["R"], ref["P"]) == pytest.approx((0.5, 0.25))


def test_paired_bootstrap_hand_worked_and_paired():
    # base scores 0 on every image, the other model 1: every resample's change is exactly +1.
    base = lambda w: np.zeros(len(w))  # noqa: E731
    better = lambda w: np.ones(len(w))  # noqa: E731
    out = paired_bootstrap(base, [better, better], 10, n_resamples=50)
    assert (out["change"], out["lo"], out["hi"], out["excludes_zero"]) == (1.0, 1.0, 1.0, True)
    assert [r["change"] for r in out["per_run"]] == [1.0, 1.0]
    # Pairing: two models with the same per-image scores differ by 0 on every draw, however
    # noisy the images; an unpaired interval would be wide.
    vals = np.random.default_rng(0).uniform(0, 1, 40)
    mean = lambda w: (w @ vals) / w.sum(1)  # noqa: E731
    out = paired_bootstrap(mean, [mean], 40, n_resamples=200)
    assert out["lo"] == out["hi"] == 0.0 and not out["excludes_zero"]
    # A mean metric: the interval of a constant shift d is [d, d]; of noise, it straddles 0.
    shifted = lambda w: (w @ (vals + 0.1)) / w.sum(1)  # noqa: E731
    assert paired_bootstrap(mean, [shifted], 40, n_resamples=200)["lo"] == pytest.approx(0.1)
    noisy = np.random.default_rng(1).uniform(0, 1, 40)
    other = lambda w: (w @ noisy) / w.sum(1)  # noqa: E731
    out = paired_bootstrap(mean, [other], 40, n_resamples=500)
    assert out["lo"] < out["change"] < out["hi"] and out["hi"] - out["lo"] > 0.1
    # reproducible from its seed
    assert paired_bootstrap(mean, [other], 40, n_resamples=100, seed=3) == paired_bootstrap(
        mean, [other], 40, n_resamples=100, seed=3
    )
    with pytest.raises(ValueError, match="at least one model"):
        paired_bootstrap(mean, [], 40)
