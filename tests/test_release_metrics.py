"""rewards.release_metrics (the public Rex-Omni release's evaluation rules) against rewards.metrics
(the paper's wording), on hand-worked cases where the two protocols part, and the eval's
metrics.json carrying both."""

import numpy as np
import pytest

from rewards import metrics as paper
from rewards import release_metrics as rel

A = (0, 0, 10, 10)
B = (20, 20, 30, 30)
C = (40, 40, 50, 50)
D = (60, 60, 70, 70)


def _all(d: dict, prefix: str) -> list[float]:
    return [v for k, v in d.items() if k.startswith(prefix) and k != f"{prefix}mIoU"]


def test_duplicates_are_charged_by_both():
    # one GT, the same box predicted twice: one match, so R = 1 and P = 1/2 at every threshold,
    # F1 = 2 * 1 * 0.5 / 1.5 = 2/3. Both protocols charge the duplicate (the release's GRPO reward
    # does not, its evaluation does); on one image per-sample and pooled averaging agree.
    ims = [{"gt": [("cat", A)], "pred": [("cat", A), ("cat", A)]}]
    for m in (paper.detection_f1(ims), rel.detection_f1(ims)):
        assert m["R@0.50"] == 1.0 and m["P@0.50"] == 0.5
        assert m["F1@0.50"] == pytest.approx(2 / 3) and m["F1@mIoU"] == pytest.approx(2 / 3)
    # a second image, one GT answered once: paper pools cat (2 matches / 2 GT / 3 predictions):
    # P = 2/3, F1 = 0.8; the release averages the samples' P (1/2 and 1): P = 0.75, F1 = 1.5 / 1.75 = 6/7
    ims.append({"gt": [("cat", B)], "pred": [("cat", B)]})
    assert paper.detection_f1(ims)["F1@0.50"] == pytest.approx(0.8)
    assert rel.detection_f1(ims)["P@0.50"] == 0.75 and rel.detection_f1(ims)["F1@0.50"] == pytest.approx(6 / 7)


def test_prediction_of_a_category_absent_from_the_image():
    # two cats found exactly, plus a dog that is not in the image.
    # paper: cat R = P = 1; dog predicted but has no GT: P = 0, so P = mean(1, 0) = 0.5, R = 1, F1 = 2/3.
    # release: the dog is only one more prediction of the sample: R = 2/2, P = 2/3, F1 = 0.8.
    ims = [{"gt": [("cat", A), ("cat", B)], "pred": [("cat", A), ("cat", B), ("dog", C)]}]
    p, r = paper.detection_f1(ims), rel.detection_f1(ims)
    assert (p["R@0.50"], p["P@0.50"]) == (1.0, 0.5) and p["F1@0.50"] == pytest.approx(2 / 3)
    assert r["R@0.50"] == 1.0 and r["P@0.50"] == pytest.approx(2 / 3) and r["F1@0.50"] == pytest.approx(0.8)
    # class-agnostic among the image's GT categories: cat and dog both in the image, labels
    # swapped. Paper: no same-label pair overlaps: F1 = 0. Release: GT cat@A takes the dog@A, GT
    # dog@B the cat@B: R = P = 1.
    swapped = [{"gt": [("cat", A), ("dog", B)], "pred": [("cat", B), ("dog", A)]}]
    assert paper.detection_f1(swapped)["F1@0.50"] == 0.0
    assert rel.detection_f1(swapped)["F1@mIoU"] == 1.0
    # COCO/LVIS: such predictions are dropped before the AP (positive categories only)
    (kept,) = rel.drop_absent_categories(ims)
    assert kept["pred"] == [("cat", A), ("cat", B)]
    assert rel.drop_absent_categories([{"gt": [], "pred": [("dog", C)]}])[0]["pred"] == [("dog", C)]


def test_label_case_and_normalisation():
    # "Person" against "person": different categories for the paper (R = 0 for Person, P = 0
    # for person: F1 = 0), the same for the release (lower-cased: F1 = 1)
    ims = [{"gt": [("Person", A)], "pred": [("person", A)]}]
    assert paper.detection_f1(ims)["F1@0.50"] == 0.0
    for mode in ("detection", "visual_prompt", "referring"):
        assert rel.detection_f1(ims, label_mode=mode)["F1@0.50"] == 1.0
    # detection keeps letters only; the other box tasks drop spaces and underscores; referring
    # ignores labels; pointing lower-cases only
    assert rel.normalise_label("T-Shirt 2", "detection") == "tshirt"
    assert rel.normalise_label("Traffic_Light", "layout") == "trafficlight"
    assert rel.normalise_label("t-shirt", "visual_prompt") == "t-shirt"
    assert rel.normalise_label("the Red cat", "referring") == rel.normalise_label("a dog", "referring") == ""
    assert rel.normalise_label("Traffic Light", "pointing") == "traffic light"
    hyphen = [{"gt": [("t-shirt", A)], "pred": [("tshirt", A)]}]
    assert rel.detection_f1(hyphen, label_mode="detection")["F1@0.50"] == 1.0
    assert rel.detection_f1(hyphen, label_mode="visual_prompt")["F1@0.50"] == 0.0
    # referring: any phrase may match
    assert (
        rel.detection_f1([{"gt": [("the red cat", A)], "pred": [("a cat", A)]}], label_mode="referring")["F1@0.50"]
        == 1.0
    )


def test_pointing_far_border_truncation_and_greedy():
    h, w = 10, 10
    last_col = np.zeros((h, w), bool)
    last_col[:, w - 1] = True
    first_col = np.zeros((h, w), bool)
    first_col[:, 0] = True
    # x == W: the paper clamps it into the last column (hit: R = P = F1 = 1); the release's int(10.0)
    # = 10 is out of the mask (miss: 0)
    far = [{"gt": [("dot", last_col)], "pred": [("dot", (10.0, 5.0))]}]
    assert paper.pointing_f1(far)["F1"] == 1.0
    assert rel.pointing_f1(far) == {"R": 0.0, "P": 0.0, "F1": 0.0}
    # x = -0.5: outside the image for the paper (0); int(-0.5) = 0 reads column 0 for the release (1)
    neg = [{"gt": [("dot", first_col)], "pred": [("dot", (-0.5, 5.0))]}]
    assert paper.pointing_f1(neg)["F1"] == 0.0 and rel.pointing_f1(neg)["F1"] == 1.0
    # labels lower-cased: "Dot" finds the dot (the paper: two categories, F1 = 0)
    case = [{"gt": [("dot", first_col)], "pred": [("Dot", (0.5, 5.0))]}]
    assert paper.pointing_f1(case)["F1"] == 0.0 and rel.pointing_f1(case)["F1"] == 1.0
    # greedy in GT order: the wide mask (all columns) comes first and takes the first point (x = 2),
    # which the narrow mask (columns 0..4) needed; the second point (x = 7) is not in the narrow
    # one. Release: 1 match of 2 GT and 2 points: R = P = F1 = 0.5. Paper (Hungarian): 2 matches: 1.
    wide, narrow = np.ones((h, w), bool), np.zeros((h, w), bool)
    narrow[:, :5] = True
    greedy = [{"gt": [("dot", wide), ("dot", narrow)], "pred": [("dot", (2.5, 5.0)), ("dot", (7.5, 5.0))]}]
    assert paper.pointing_f1(greedy)["F1"] == 1.0
    assert rel.pointing_f1(greedy) == {"R": 0.5, "P": 0.5, "F1": 0.5}


def test_gui_any_point_or_box_centre():
    box = (10, 10, 20, 20)
    # the right point second: the paper reads the first point only (0,0): wrong; the release any: right
    assert paper.gui_accuracy([(0, 0)], [box]) == 0.0
    assert rel.gui_accuracy([[(0, 0), (15, 15)]], [box]) == 1.0
    # a box whose centre (15, 15) is in the target (corners inverted are put in order first)
    assert rel.gui_accuracy([[(0, 0, 2, 2), (18, 18, 12, 12)]], [box]) == 1.0
    # borders included; no prediction is wrong; a box centre (2, 2) outside is wrong: 2 of 5 right
    preds = [[(20, 20)], [], None, [(0, 0, 4, 4)], [(10, 15)]]
    assert rel.gui_hits(preds, [box] * 5) == [True, False, False, False, True]
    assert rel.gui_accuracy(preds, [box] * 5) == pytest.approx(2 / 5)


def test_per_sample_against_pooled_averaging():
    # image 1: 1 cat found; image 2: 3 cats, 1 found (one prediction, exact).
    # paper (pooled per category): R = 2/4 = 0.5, P = 2/2 = 1, F1 = 1 / 1.5 = 2/3.
    # release (per sample): R = mean(1, 1/3) = 2/3, P = mean(1, 1) = 1, F1 = (4/3) / (5/3) = 0.8.
    ims = [
        {"gt": [("cat", A)], "pred": [("cat", A)]},
        {"gt": [("cat", A), ("cat", B), ("cat", C)], "pred": [("cat", B)]},
    ]
    p, r = paper.detection_f1(ims), rel.detection_f1(ims)
    assert (p["R@0.50"], p["P@0.50"]) == (0.5, 1.0) and p["F1@0.50"] == pytest.approx(2 / 3)
    assert r["R@0.50"] == pytest.approx(2 / 3) and r["P@0.50"] == 1.0 and r["F1@0.50"] == pytest.approx(0.8)
    rec, prec = rel.detection_samples(ims)
    assert rec[:, 0].tolist() == pytest.approx([1.0, 1 / 3]) and prec[:, 0].tolist() == [1.0, 1.0]


def test_miou_is_the_mean_of_f1s():
    # image 1: one GT, one prediction of IoU 0.62 (inter 62, union 100): a match at 0.50, 0.55,
    # 0.60 only. image 2: one GT found exactly plus a prediction on nothing: R = 1, P = 1/2 always.
    # release, per threshold: t <= 0.60: R = 1, P = 0.75, F1 = 6/7; t >= 0.65: R = 0.5, P = 0.25,
    # F1 = 1/3. F1@mIoU = (3 * 6/7 + 7 * 1/3) / 10 = 103/210 = 0.4905;
    # R@mIoU = (3 + 3.5) / 10 = 0.65, P@mIoU = (2.25 + 1.75) / 10 = 0.4, whose harmonic mean
    # (0.52 / 1.05 = 0.4952) the release does NOT report.
    # paper (pooled cat: 2 GT, 3 predictions): t <= 0.60: R = 1, P = 2/3; t >= 0.65: R = 0.5,
    # P = 1/3; F1@mIoU = HM(0.65, 13/30) = 0.52.
    ims = [
        {"gt": [("cat", (0, 0, 10, 10))], "pred": [("cat", (0, 0, 10, 6.2))]},
        {"gt": [("cat", A)], "pred": [("cat", A), ("cat", D)]},
    ]
    r = rel.detection_f1(ims)
    assert [r[f"F1@{t:.2f}"] for t in rel.RELEASE_IOU_THRESHOLDS] == pytest.approx([6 / 7] * 3 + [1 / 3] * 7)
    assert r["F1@mIoU"] == pytest.approx(103 / 210)
    assert r["R@mIoU"] == pytest.approx(0.65) and r["P@mIoU"] == pytest.approx(0.4)
    assert r["F1@mIoU"] != pytest.approx(2 * 0.65 * 0.4 / 1.05)
    assert paper.detection_f1(ims)["F1@mIoU"] == pytest.approx(0.52)
    assert len(_all(r, "F1@")) == 10 and "F1@0.95" in r


def test_empty_samples():
    # a sample without GT and without predictions is perfect for the release (R = P = 1); with GT
    # and no prediction it scores 0. Release: R = P = mean(1, 0) = 0.5, F1 = 0.5 at every
    # threshold. Paper: the empty image adds no category; cat has GT and no prediction: R = 0,
    # and no category was predicted: P = 0, F1 = 0.
    ims = [{"gt": [], "pred": []}, {"gt": [("cat", A)], "pred": []}]
    r = rel.detection_f1(ims)
    assert set(_all(r, "F1@")) == {0.5} and r["F1@mIoU"] == 0.5
    assert paper.detection_f1(ims)["F1@mIoU"] == 0.0
    # predictions on an image without GT: 0 for both
    ghost = [{"gt": [], "pred": [("cat", A)]}]
    assert rel.detection_f1(ghost)["F1@mIoU"] == 0.0 and paper.detection_f1(ghost)["F1@mIoU"] == 0.0
    # an all-empty set: 1 for both
    assert rel.detection_f1([{"gt": [], "pred": []}])["F1@mIoU"] == 1.0
    assert paper.detection_f1([{"gt": [], "pred": []}])["F1@mIoU"] == 1.0
    # pointing: the same rules
    m = np.ones((4, 4), bool)
    pts = [{"gt": [], "pred": []}, {"gt": [("dot", m)], "pred": []}]
    assert rel.pointing_f1(pts) == {"R": 0.5, "P": 0.5, "F1": 0.5}
    with pytest.raises(ValueError):
        rel.detection_f1([])
    with pytest.raises(ValueError):
        rel.detection_f1(ims, label_mode=["detection"])  # one mode for two images


def _masks_rle(h: int, w: int, rows: slice, cols: slice) -> dict:
    from pycocotools import mask as mask_utils

    m = np.zeros((h, w), np.uint8)
    m[rows, cols] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": rle["counts"].decode()}


def test_compute_metrics_reports_both_protocols():
    from rlsys.data.samples import Instance, Sample
    from rlsys.eval.evaluate import compute_metrics, format_table

    # 999 x 999 images: bin k decodes to pixel k exactly
    def ref(phrase, *coords):
        inst = ",".join("".join(f"<{c}>" for c in xs) for xs in coords)
        return f"<|object_ref_start|>{phrase}<|object_ref_end|><|box_start|>{inst}<|box_end|>"

    det = Sample("d", "x.png", 999, 999, "detection", ["cat"], [Instance("cat", box=(100, 100, 300, 300))], "box")
    refer = Sample(
        "r", "x.png", 999, 999, "referring", ["the red cat"], [Instance("the red cat", box=(500, 500, 700, 700))]
    )
    gui = Sample("g", "y.png", 999, 999, "gui", ["ok"], [Instance("ok", box=(10, 10, 50, 50), point=(30, 30))], "point")
    mask = _masks_rle(999, 999, slice(400, 600), slice(900, 999))
    point = Sample("p", "z.png", 999, 999, "pointing", ["dot"], [Instance("dot", mask=mask, point=(950, 500))], "point")
    samples = [det, refer, gui, point]
    answers = [
        ref("Cat", (100, 100, 300, 300)),  # right box, capitalised label
        ref("a cat", (500, 500, 700, 700)),  # right box, another phrase
        ref("ok", (900, 900), (30, 30)),  # the right point second
        ref("dot", (999, 500)),  # on the far border x == W of a mask reaching it
    ]
    m = compute_metrics(samples, answers)
    # paper: labels exact, so all four box categories miss: F1 = 0; the first GUI point is wrong;
    # the far-border point reads the last column: a hit
    assert m["detection"]["F1@0.50"] == 0.0 and m["box_tasks"]["referring"]["F1@mIoU"] == 0.0
    assert m["gui"] == {"accuracy": 0.0, "num_queries": 1}
    assert m["pointing"]["F1"] == 1.0
    # release: "Cat" is "cat", referring ignores the phrase: both boxes found; the GUI's second point
    # counts; int(999.0) = 999 = W misses
    r = m["rex_release"]
    assert r["box"]["F1@0.50"] == 1.0 and r["box"]["F1@mIoU"] == 1.0 and r["box"]["num_images"] == 2
    assert set(r["box_tasks"]) == {"detection", "referring"}
    assert r["box_tasks"]["referring"]["F1@mIoU"] == 1.0
    assert r["gui"] == {"accuracy": 1.0, "num_queries": 1}
    assert r["point"] == {"R": 0.0, "P": 0.0, "F1": 0.0, "num_images": 1}
    table = format_table(m).splitlines()
    assert "| release protocol: F1@0.50 / F1@mIoU (mean of F1s) | 1.000 / 1.000 |" in table
    assert "| release protocol: GUI accuracy (any point or box centre) | 1.000 |" in table
    # one protocol at a time: the paper's keys alone, or the release's alone
    only_paper = compute_metrics(samples, answers, protocol="paper")
    assert "rex_release" not in only_paper
    assert {k: v for k, v in m.items() if k != "rex_release"} == only_paper
    only_rel = compute_metrics(samples, answers, protocol="rex_release")
    assert set(only_rel) == {"num_samples", "rex_release", "mean_reward"}
    assert only_rel["rex_release"] == r
    with pytest.raises(ValueError, match="protocol"):
        compute_metrics(samples, answers, protocol="coco")


def test_cli_offers_the_protocol(capsys):
    from rlsys.eval.evaluate import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--protocol {paper,rex_release,both}" in capsys.readouterr().out
