"""``rewards.score``: model text + Sample -> reward. Images are 999x999 pixels so that bin ``b``
decodes to pixel ``b`` (``b / 999 * 999``, up to float rounding) and the arithmetic stays readable."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.scorer import score
from rlsys.data.samples import Instance, Sample, load_jsonl
from rlsys.lang import coords
from rlsys.lang.format import KeypointInstance, Prediction, render, render_keypoints

S = 999


def seg(phrase, body):
    return f"<|object_ref_start|>{phrase}<|object_ref_end|><|box_start|>{body}<|box_end|>"


def sample(task="detection", output="box", phrases=("person",), instances=(), **kw):
    return Sample(
        "s", "img.png", kw.pop("width", S), kw.pop("height", S), task, list(phrases), list(instances), output, **kw
    )


# The GUIDE's example of the released output format (two people).
PEOPLE = sample(instances=[Instance("person", box=(0, 35, 980, 987)), Instance("person", box=(646, 0, 999, 940))])
# three 10 x 10 boxes apart, for the hand-worked count terms
THREE_PEOPLE = sample(
    instances=[Instance("person", box=(k, k, k + 10, k + 10)) for k in (0, 20, 40)],
)
PAPER_TEXT = seg("person", "<0><35><980><987>,<646><0><999><940>") + "<|im_end|>"


def test_paper_example_perfect():
    r = score(PAPER_TEXT, PEOPLE)
    assert (r.reward, r.kind, r.num_pred, r.num_gt, r.unreadable, r.error) == (
        pytest.approx(1.0),
        "box_iou",
        2,
        2,
        0,
        None,
    )
    assert not r.duplicate and not r.large_box


def test_paper_point_example():
    # Section 2.3's point example: two buttons pointed at; one GT mask holds (100, 150), the
    # other is elsewhere -> r = [1, 0]: P = 1/2, R = 1/2, F1 = 1/2.
    text = "<|object_ref_start|>button<|object_ref_end|><|box_start|><100><150>,<200><250><|box_end|>"
    smp = sample(
        "pointing",
        "point",
        ["button"],
        [
            Instance("button", box=(50, 100, 150, 200), mask=_disc_mask(100, 150, 40)),
            Instance("button", box=(500, 500, 600, 600), mask=_disc_mask(550, 550, 40)),
        ],
    )
    r = score(text, smp)
    assert (r.kind, r.precision, r.recall, r.reward) == ("point_in_mask", 0.5, 0.5, 0.5)


def test_brief_example_through_text():
    # GT (0,0,10,10) and (20,20,30,30); answer: exact, (20,20,30,25) (IoU 0.5), far away.
    # P = 1.5/3, R = 1.5/2, F1 = 0.6.
    smp = sample(instances=[Instance("person", box=(0, 0, 10, 10)), Instance("person", box=(20, 20, 30, 30))])
    r = score(seg("person", "<0><0><10><10>,<20><20><30><25>,<500><500><600><600>"), smp)
    assert (r.precision, r.recall, r.reward) == pytest.approx((0.5, 0.75, 0.6))


def test_none_answers_and_unasked_phrases():
    cat = Instance("cat", box=(0, 0, 10, 10))
    smp = sample(phrases=["cat", "dog"], instances=[cat])
    box = "<0><0><10><10>"
    # "dog" is absent and answered None: right, adds nothing -> 1.0.
    assert score(seg("cat", box) + ", " + seg("dog", "None"), smp).reward == pytest.approx(1.0)
    # "cat" answered None: its GT is unfound -> 0 (R = 0, no predictions).
    r = score(seg("cat", "None") + ", " + seg("dog", "None"), smp)
    assert (r.reward, r.num_pred, r.num_gt) == (0.0, 0, 1)
    # A phrase nobody asked about is a false positive: P = 1/2, R = 1 -> 2/3.
    assert score(seg("cat", box) + ", " + seg("bird", "<100><100><200><200>"), smp).reward == pytest.approx(2 / 3)
    # Everything absent, everything None: no GT, no prediction -> 1.0.
    assert score(seg("cat", "None"), sample(phrases=["cat"])).reward == 1.0


def test_wrong_kind_counts_as_zero_prediction():
    smp = sample(phrases=["cat"], instances=[Instance("cat", box=(0, 0, 10, 10))])
    # A right box plus a point: P = 1/2, R = 1, F1 = 2/3.
    r = score(seg("cat", "<0><0><10><10>,<5><5>"), smp)
    assert (r.num_pred, r.reward) == (2, pytest.approx(2 / 3))
    assert "another kind" in r.error
    assert score(seg("cat", "<5><5>"), smp).reward == 0.0


def test_unreadable_text_scores_zero_and_is_counted():
    absent = sample(phrases=["cat"])  # nothing to find: garbage must not earn "no GT, no prediction"
    for text in ("hello", "", "<|box_start|>", 42, None):
        r = score(text, absent)
        assert r.reward == 0.0 and r.unreadable >= 1 and r.num_pred >= 1 and r.error
    # A right box, then a phrase cut off by the token limit: P = 1/2, R = 1 -> 2/3.
    smp = sample(phrases=["cat"], instances=[Instance("cat", box=(0, 0, 10, 10))])
    r = score(seg("cat", "<0><0><10><10>") + ", <|object_ref_start|>cat<|object_ref_end|><|box_start|><1", smp)
    assert (r.unreadable, r.num_pred, r.reward) == (1, 2, pytest.approx(2 / 3))


def test_duplicate_heavy_answer_scores_lower():
    boxes = [(10, 10, 50, 50), (100, 10, 150, 50), (200, 10, 250, 50)]
    smp = sample(phrases=["cat"], instances=[Instance("cat", box=b) for b in boxes])
    clean = seg("cat", ",".join(f"<{a}><{b}><{c}><{d}>" for a, b, c, d in boxes))
    # Each box written 10 times in a row: r = [1, 1, 1] still, but P = 3/30: F1 = 2*.1/1.1.
    dup = seg("cat", ",".join(f"<{a}><{b}><{c}><{d}>" for a, b, c, d in boxes for _ in range(10)))
    rc, rd = score(clean, smp), score(dup, smp)
    assert rc.reward == pytest.approx(1.0) and not rc.duplicate
    assert rd.reward == pytest.approx(0.2 / 1.1) and rd.duplicate  # 30 > 2 * 3 boxes, run of 10
    assert rd.reward < rc.reward
    # Hungarian is stricter still only where one box serves several GT; here it agrees.
    assert score(dup, smp, matching="hungarian").reward == pytest.approx(0.2 / 1.1)


def test_large_box_flag():
    smp = sample(phrases=["cat"], instances=[Instance("cat", box=(0, 0, 10, 10))])
    assert score(seg("cat", "<0><0><999><999>"), smp).large_box
    assert not score(seg("cat", "<0><0><999><999>,<0><0><10><10>"), smp).large_box


def _disc_mask(cx, cy, r, size=S):
    from pycocotools import mask as mask_utils

    yy, xx = np.mgrid[:size, :size]
    m = ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [size, size], "counts": rle["counts"].decode("ascii")}


def test_pointing_masks_source_and_fallback():
    # A disc of radius 50 at (100, 100): its box (50, 50, 150, 150) has corners outside the disc.
    box = (50.0, 50.0, 150.0, 150.0)
    with_mask = sample("pointing", "point", ["ball"], [Instance("ball", box=box, mask=_disc_mask(100, 100, 50))])
    no_mask = sample("pointing", "point", ["ball"], [Instance("ball", box=box)])
    centre, corner = seg("ball", "<100><100>"), seg("ball", "<55><55>")
    assert (score(centre, with_mask).reward, score(centre, with_mask).kind) == (1.0, "point_in_mask")
    assert score(corner, with_mask).reward == 0.0  # in the box, outside the disc
    # No mask in the sample: mask_source supplies one per instance.
    calls = []

    def source(s):
        calls.append(s.id)
        return [_disc_mask(100, 100, 50)]

    r = score(corner, no_mask, mask_source=source)
    assert (r.reward, r.kind, calls) == (0.0, "point_in_mask", ["s"])
    # Neither: point in the GT box, and the kind says so.
    r = score(corner, no_mask)
    assert (r.reward, r.kind) == (1.0, "point_in_box_fallback")
    with pytest.raises(ValueError, match="returned 2 masks for 1 instances"):
        score(corner, no_mask, mask_source=lambda s: [None, None])
    with pytest.raises(ValueError, match="expected \\[999, 999\\]"):
        score(corner, no_mask, mask_source=lambda s: [np.zeros((10, 10), bool)])


def test_gui_point_and_box():
    inst = Instance("the OK button", box=(100, 100, 200, 150), point=(150, 125))
    pt = sample("gui", "point", ["the OK button"], [inst])
    assert (score(seg("the OK button", "<150><125>"), pt).reward, score("", pt).kind) == (1.0, "point_in_box")
    assert score(seg("the OK button", "<250><125>"), pt).reward == 0.0
    bx = sample("gui", "box", ["the OK button"], [inst])
    # (100,100,200,125): inter 100*25, union 100*50 -> IoU 0.5 = F1 for one box on one GT.
    assert score(seg("the OK button", "<100><100><200><125>"), bx).reward == pytest.approx(0.5)


def test_ocr_polygon():
    poly = (100, 100, 300, 100, 300, 200, 100, 200)
    smp = sample("ocr", "polygon", ["text"], [Instance("text", box=(100, 100, 300, 200), polygon=poly)])
    r = score(seg("text", "<100><100><300><100><300><200><100><200>"), smp)
    assert (r.kind, r.reward) == ("polygon_iou", pytest.approx(1.0))
    # The left half: IoU 0.5 (pixel-rasterised).
    assert score(seg("text", "<100><100><200><100><200><200><100><200>"), smp).reward == pytest.approx(0.5, abs=0.01)
    assert score(seg("text", "<100><100><300><200>"), smp).reward == 0.0  # a box where a polygon was asked


def test_keypoints_paper_format():
    kps = {"left eye": (32.0, 43.0, 2), "right eye": (66.0, 55.0, 2)}
    smp = sample("keypoint", "keypoint", ["person"], [Instance("person", box=(0, 23, 142, 256), keypoints=kps)])
    text = '{"person1": {"box": <0><23><142><256>, "keypoints": {"left eye": <32><43>, "right eye": <66><55>}}}'
    r = score(text, smp)
    assert (r.kind, r.reward, r.num_pred, r.num_gt) == ("keypoint_oks", pytest.approx(1.0), 1, 1)
    # The right eye said invisible: OKS = (1 + 0) / 2.
    half = '{"person1": {"box": <0><23><142><256>, "keypoints": {"left eye": <32><43>, "right eye": "unvisible"}}}'
    assert score(half, smp).reward == pytest.approx(0.5)
    # Left eye off by (3, 4) pixels: d^2 = 25, sigma 0.025 -> (2 sigma)^2 = 0.0025, area = box
    # 142 * 233 -> e = 25 / 0.0025 / 33086 / 2; OKS = (exp(-e) + 1) / 2.
    off = '{"person1": {"box": <0><23><142><256>, "keypoints": {"left eye": <35><47>, "right eye": <66><55>}}}'
    e = 25 / 0.0025 / (142 * 233) / 2
    assert score(off, smp).reward == pytest.approx((math.exp(-e) + 1) / 2)
    assert score("not json", smp).reward == 0.0 and score("not json", smp).unreadable == 1


def test_malformed_sample_raises():
    good = Instance("cat", box=(0, 0, 10, 10))
    bad_samples = [
        (sample(width=0), "width"),
        (sample(task="dance"), "task"),
        (sample(output="mesh"), "output"),
        (sample(phrases=["cat"], instances=[Instance("dog", box=(0, 0, 1, 1))]), "not one of"),
        (sample(phrases=["cat"], instances=[Instance("cat")]), "no box"),
        (sample(phrases=["cat"], instances=[Instance("cat", box=(0, 0, math.nan, 1))]), "gt_boxes"),
        (sample(phrases=["cat"], instances=[good], output="polygon", task="ocr"), "no polygon"),
        (sample("pointing", "point", ["cat"], [Instance("cat", point=(1, 1))]), "no box"),
        ("not a sample", "expected an rlsys.data.samples.Sample"),
    ]
    for smp, message in bad_samples:
        with pytest.raises(ValueError, match=message):
            score(PAPER_TEXT, smp)
    with pytest.raises(ValueError, match="matching"):
        score(PAPER_TEXT, PEOPLE, matching="greedy")


def test_perfect_answers_on_synthetic_data_score_near_one(tmp_path):
    # Render every synthetic sample's own GT as the answer: the reward is 1 up to the bin
    # quantisation (half a bin, 0.11 px on 224 px images), so at least 0.95.
    from rlsys.data.synthetic import generate

    for smp in load_jsonl(generate(tmp_path, num_images=24, seed=3)):
        w, h = smp.width, smp.height
        enc = lambda xy: tuple(int(v) for v in coords.encode_xy(xy, w, h))  # noqa: E731
        if smp.output == "keypoint":
            text = render_keypoints(
                [
                    KeypointInstance(
                        f"{i.phrase}{k + 1}", enc(i.box), {n: enc(xy[:2]) for n, xy in i.keypoints.items()}
                    )
                    for k, i in enumerate(smp.instances)
                ]
            )
        else:
            preds = []
            for p in smp.phrases:
                geo = [enc(getattr(i, smp.output)) for i in smp.instances_of(p)]
                preds.append(Prediction(p, smp.output if geo else "none", tuple(geo)))
            text = render(preds)
        r = score(text, smp)
        assert r.reward >= 0.95, (smp.task, smp.output, r)
        assert r.unreadable == 0 and not r.duplicate


FRAGMENTS = [
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|im_end|>",
    "cat",
    "dog",
    "None",
    ",",
    ", ",
    " ",
    "<0>",
    "<999>",
    "<1000>",
    "<5>",
    "<12><42>",
    "<-1>",
    "<>",
    "{",
    "}",
    '"cat1"',
    '"box"',
    '"keypoints"',
    '"top"',
    ":",
    '"unvisible"',
    "\n",
    "\x00",
]
TEXT = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=40).map("".join)
SAMPLES = [
    sample(phrases=["cat", "dog"], instances=[Instance("cat", box=(0, 0, 10, 10))]),
    sample("pointing", "point", ["cat"], [Instance("cat", box=(0, 0, 10, 10))]),
    sample("gui", "point", ["cat"], [Instance("cat", box=(0, 0, 10, 10))]),
    sample("ocr", "polygon", ["cat"], [Instance("cat", polygon=(0, 0, 10, 0, 10, 10))]),
    sample("keypoint", "keypoint", ["cat"], [Instance("cat", box=(0, 0, 10, 10), keypoints={"top": (5, 0, 2)})]),
]


@settings(max_examples=120, deadline=None)
@given(TEXT)
def test_score_never_raises_on_text(text):
    for smp in SAMPLES:
        r = score(text, smp)
        assert 0.0 <= r.reward <= 1.0 and 0.0 <= r.precision <= 1.0 and 0.0 <= r.recall <= 1.0
        assert r.num_pred >= r.unreadable >= 0 and r.num_gt == len(smp.instances)


def test_recall_weighted_scorer_hand_worked():
    from rewards.f1 import f_beta
    from rewards.scorer import score_recall_weighted

    # F-beta by hand: P 0.8, R 0.5; beta 2: 5 * 0.4 / (3.2 + 0.5) = 0.54054; beta 1 is F1 = 0.61538.
    assert f_beta(0.8, 0.5, 2.0) == pytest.approx(2.0 / 3.7)
    assert f_beta(0.8, 0.5, 1.0) == pytest.approx(0.8 / 1.3)
    assert f_beta(0.0, 0.0, 2.0) == 0.0
    with pytest.raises(ValueError):
        f_beta(0.5, 0.5, 0.0)
    # Three GT, two found exactly: P 1, R 2/3. F1 = 0.8; F2 = 5 * (2/3) / (4 + 2/3) = 0.714286.
    smp = THREE_PEOPLE
    two = seg("person", "<0><0><10><10>,<20><20><30><30>")
    assert score(two, smp).reward == pytest.approx(0.8)
    assert score_recall_weighted(two, smp).reward == pytest.approx(10 / 14)
    # A third box far off: P 2/3, R 2/3: F1 = F2 = 2/3. Under F1 the miss costs 0.133 against
    # leaving the box out; under F2 only 0.048: the uncertain box is worth trying.
    three = seg("person", "<0><0><10><10>,<20><20><30><30>,<500><500><600><600>")
    assert score(three, smp).reward == pytest.approx(2 / 3)
    assert score_recall_weighted(three, smp).reward == pytest.approx(2 / 3)
    # perfect and correctly-empty answers still score 1
    assert score_recall_weighted(PAPER_TEXT, PEOPLE).reward == pytest.approx(1.0)
    none = sample(phrases=("cat",), instances=[])
    assert score_recall_weighted(seg("cat", "None"), none).reward == 1.0


def test_missed_penalty_scorer_hand_worked():
    from rewards.scorer import MISSED_OBJECT_PENALTY, score_missed_penalty

    assert MISSED_OBJECT_PENALTY == 0.2  # the figures below are worked for it
    smp = THREE_PEOPLE
    # Two of three found exactly: F1 0.8, one object missed: 0.8 - 0.2 / 3 = 0.73333.
    two = seg("person", "<0><0><10><10>,<20><20><30><30>")
    r = score_missed_penalty(two, smp)
    assert r.reward == pytest.approx(0.8 - 0.2 / 3)
    assert (r.precision, r.recall, r.num_pred, r.num_gt) == pytest.approx((1.0, 2 / 3, 2, 3))
    # A third box far off: F1 2/3 and no count term, so now leaving it out costs 0.067 instead of
    # gaining 0.133 (under plain F1 the two-box answer scores 0.8 > 2/3).
    three = seg("person", "<0><0><10><10>,<20><20><30><30>,<500><500><600><600>")
    assert score_missed_penalty(three, smp).reward == pytest.approx(2 / 3)
    assert score_missed_penalty(three, smp).reward == pytest.approx(score(three, smp).reward)
    # One box: F1 2 * 1 * (1/3) / (4/3) = 0.5, two missed: 0.5 - 0.2 * 2/3 = 0.36667.
    one = seg("person", "<0><0><10><10>")
    assert score_missed_penalty(one, smp).reward == pytest.approx(0.5 - 0.4 / 3)
    # "None" for three objects: F1 0, all missed: the floor -0.2.
    assert score_missed_penalty(seg("person", "None"), smp).reward == pytest.approx(-0.2)
    # Too many boxes are precision's business: no count term. Perfect and correctly empty answers score 1.
    four = seg("person", "<0><0><10><10>,<20><20><30><30>,<40><40><50><50>,<500><500><600><600>")
    assert score_missed_penalty(four, smp).reward == pytest.approx(score(four, smp).reward) == pytest.approx(6 / 7)
    assert score_missed_penalty(PAPER_TEXT, PEOPLE).reward == pytest.approx(1.0)
    none = sample(phrases=("cat",), instances=[])
    assert score_missed_penalty(seg("cat", "None"), none).reward == 1.0


def test_count_penalty_scorers_hand_worked():
    from rewards.scorer import COUNT_PENALTY, score_coco_count_penalty, score_count_penalty, score_missed_penalty

    assert COUNT_PENALTY == 0.3  # the figures below are worked for it
    # A referring question: one object. One exact box scores 1 under both.
    ref = sample(instances=[Instance("person", box=(0, 0, 10, 10))])
    one = seg("person", "<0><0><10><10>")
    assert score_count_penalty(one, ref).reward == pytest.approx(1.0)
    assert score_coco_count_penalty(one, ref).reward == pytest.approx(1.0)
    # A second box far off: P 1/2, R 1, F1 2/3; one extra for one object costs the full 0.3, where
    # the one-sided term charged nothing (2/3: the extra box was the hedge).
    two = seg("person", "<0><0><10><10>,<500><500><600><600>")
    assert score_missed_penalty(two, ref).reward == pytest.approx(2 / 3)
    assert score_count_penalty(two, ref).reward == pytest.approx(2 / 3 - 0.3)
    # Five extra boxes: the term is capped at one penalty (the reward's floor stays -0.3).
    six = seg("person", "<0><0><10><10>" + "".join(f",<{k}00><{k}00><{k}50><{k}50>" for k in range(3, 8)))
    assert score_count_penalty(six, ref).reward == pytest.approx(2 * (1 / 6) / (1 / 6 + 1) - 0.3)
    # The missed side as score_missed_penalty's at 0.3: three objects, two found exactly: 0.8 - 0.3 / 3.
    smp = THREE_PEOPLE
    found = seg("person", "<0><0><10><10>,<20><20><30><30>")
    assert score_count_penalty(found, smp).reward == pytest.approx(0.8 - 0.1)
    assert score_missed_penalty(found, smp).reward == pytest.approx(0.8 - 0.2 / 3)
    assert score_count_penalty(seg("person", "None"), smp).reward == pytest.approx(-0.3)
    # COCO thresholds: a box at IoU 0.625 (x1 16 against 10 on the 10 x 10 box: 100 / 160)
    # reaches 0.50, 0.55, 0.60 of the ten: credit 0.3 where the paper's reward pays 0.625.
    loose = seg("person", "<0><0><16><10>")
    assert score_count_penalty(loose, ref).reward == pytest.approx(0.625)
    assert score_coco_count_penalty(loose, ref).reward == pytest.approx(0.3)
    # A box below IoU 0.5 earns nothing under thresholds; the paper's reward pays its IoU (0.4).
    off = seg("person", "<0><0><25><10>")
    assert score_count_penalty(off, ref).reward == pytest.approx(0.4)
    assert score_coco_count_penalty(off, ref).reward == pytest.approx(0.0)
    # Correctly empty answers score 1; an instance for an absent phrase is precision's business.
    none = sample(phrases=("cat",), instances=[])
    assert score_count_penalty(seg("cat", "None"), none).reward == 1.0
    assert score_coco_count_penalty(seg("cat", "None"), none).reward == 1.0


def test_leave_one_out_gain_hand_worked():
    from rewards.scorer import leave_one_out_gain, score_missed_penalty, score_recall_weighted

    smp = THREE_PEOPLE
    # Two exact boxes and one far off: F1 2/3; without the far box 0.8 (P 1, R 2/3): +0.1333.
    far = seg("person", "<0><0><10><10>,<20><20><30><30>,<500><500><600><600>")
    assert leave_one_out_gain(far, smp) == pytest.approx(0.8 - 2 / 3)
    # F2: 10/14 against 2/3, +0.0476; the count term: 0.8 - 0.2/3 against 2/3, +0.0667.
    assert leave_one_out_gain(far, smp, score_recall_weighted) == pytest.approx(10 / 14 - 2 / 3)
    assert leave_one_out_gain(far, smp, score_missed_penalty) == pytest.approx(0.8 - 0.2 / 3 - 2 / 3)
    # All three exact: dropping any costs 1 - 0.8.
    exact = seg("person", "<0><0><10><10>,<20><20><30><30>,<40><40><50><50>")
    assert leave_one_out_gain(exact, smp) == pytest.approx(-0.2)
    assert leave_one_out_gain(exact, smp, matching="hungarian") == pytest.approx(-0.2)
    # Not measured: another count than the objects', one object, unreadable parts, points.
    assert leave_one_out_gain(seg("person", "<0><0><10><10>,<20><20><30><30>"), smp) is None
    assert (
        leave_one_out_gain(seg("person", "<0><0><10><10>"), sample(instances=[Instance("person", box=(0, 0, 10, 10))]))
        is None
    )
    assert leave_one_out_gain(exact.replace("<40><40><50><50>", "<40><40><50>"), smp) is None
    assert leave_one_out_gain(seg("person", "<5><5>,<25><25>,<45><45>"), smp) is None
    # A phrase answered None stays in both texts: two phrases, "cat" absent.
    two = sample(
        phrases=("person", "cat"),
        instances=[Instance("person", box=(0, 0, 10, 10)), Instance("person", box=(20, 20, 30, 30))],
    )
    text = seg("person", "<0><0><10><10>,<20><20><30><30>") + ", " + seg("cat", "None")
    assert score(text, two).reward == pytest.approx(1.0)
    assert leave_one_out_gain(text, two) == pytest.approx(2 * 1 * 0.5 / 1.5 - 1.0)
