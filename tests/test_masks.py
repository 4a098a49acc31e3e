"""GETok masks: a GT mask written as a set of grid points (the greedy conversion), read back,
decoded into a mask without SAM, and scored by the mask IoU and point-set rewards and the mask
F1 metric; other vocabularies refuse masks. Hand-worked values in the comments use 40 x 40
images with a 4 x 4 grid: cells are 10 px, cell (i, j)'s centre is (10 i + 5, 10 j + 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.mask import (
    POINT_SET_WEIGHTS,
    grid_cell_masks,
    mask_points_f1,
    mask_to_grid_points,
    point_set_scores,
    reference_points,
)
from rewards.metrics import mask_f1
from rewards.scorer import score, score_cell_masks, score_getok_grid_stage_cell_masks, score_getok_mask_points
from rlsys.config import ConfigError, RewardConfig, SFTConfig, load_config
from rlsys.data.samples import DataError, Instance, Sample
from rlsys.data.synthetic import _rle
from rlsys.lang.format import Prediction, parse
from rlsys.lang.targets import answer_text
from rlsys.lang.vocab import REX_BINS, ChatRex, GETok, QwenJson

G4 = GETok(4)  # with offsets: a grid centre is written <gridI_J><OFF0_0>
G4_GRID_ONLY = GETok(4, offsets=False)
QJ = QwenJson(56 * 56, 224 * 224)


def box_mask(x0, y0, x1, y1, w=40, h=40):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def mask_sample(masks, phrases=("cat",), labels=None, task="detection", w=40, h=40, sid="m"):
    labels = labels or [phrases[0]] * len(masks)
    return Sample(
        sid,
        "img.png",
        w,
        h,
        task,
        list(phrases),
        [Instance(lab, mask=_rle(m)) for lab, m in zip(labels, masks)],
        "mask",
    )


def seg(phrase, body):
    return f"<|object_ref_start|>{phrase}<|object_ref_end|><|box_start|>{body}<|box_end|>"


# ---------------------------------------------------------------------------------------------
# mask -> grid points
# ---------------------------------------------------------------------------------------------
def test_mask_to_grid_points_hand_worked():
    # x < 26, y < 20 (520 px): centres inside are cells (0..2, 0..1). The four cells of x < 20
    # lie wholly inside (IoU 100/520 each, visited first); cells (2, 0) and (2, 1) are 60%
    # inside (x 20..25 of 20..29). After the four: IoU 400/520 = 0.769; (2, 0) adds 60 px to the
    # intersection and 40 to the union: 460/560 = 0.821 > 0.769, taken; (2, 1): 520/600 = 0.867.
    m = box_mask(0, 0, 26, 20)
    assert mask_to_grid_points(m, 4) == [(5, 5), (15, 5), (25, 5), (5, 15), (15, 15), (25, 15)]
    # stopping at the quality threshold: 0.821 >= 0.8 after (2, 0), so (2, 1) is not visited
    assert mask_to_grid_points(m, 4, target_iou=0.8) == [(5, 5), (15, 5), (25, 5), (5, 15), (15, 15)]

    # a 20 x 20 square plus a 5 x 5 blob around (25, 5), the centre of cell (2, 0): that centre
    # is inside, but the cell is only 25% inside. After the square IoU = 400/425 = 0.941; adding
    # the cell: 425/500 = 0.85 < 0.941, so it is left out (f / (1 - f) = 1/3 < 0.941).
    m2 = box_mask(0, 0, 20, 20)
    m2[3:8, 23:28] = True
    assert mask_to_grid_points(m2, 4) == [(5, 5), (15, 5), (5, 15), (15, 15)]

    # no centre inside (pixels 12..13 of cell (1, 1)): one point, the mask pixel nearest the
    # centre (15, 15) of the cell it overlaps most: pixel (13, 13), centre (13.5, 13.5)
    assert mask_to_grid_points(box_mask(12, 12, 14, 14), 4) == [(13.5, 13.5)]


def test_mask_to_grid_points_with_decoder_footprints_is_the_papers_greedy():
    m = box_mask(0, 0, 26, 20)
    # A perfect decoder (every point on the object decodes to the whole object): each
    # candidate's IoU is 1, the first in reading order reaches IoU 1, and one point suffices.
    assert mask_to_grid_points(m, 4, footprints=lambda i, j: m) == [(5, 5)]
    # A decoder that draws the left half (x < 13, 260 px) for the points of column 0 and the
    # right half otherwise: every candidate's IoU is 0.5, so reading order decides; (0, 0) gives
    # IoU 0.5, then (1, 0) the other half (IoU 1), and the threshold 1.0 is reached.
    left, right = box_mask(0, 0, 13, 20), box_mask(13, 0, 26, 20)
    pts = mask_to_grid_points(m, 4, footprints=lambda i, j: left if i == 0 else right)
    assert pts == [(5, 5), (15, 5)]
    with pytest.raises(ValueError, match="footprints"):
        mask_to_grid_points(m, 4, footprints=lambda i, j: np.zeros((3, 3)))


def test_mask_to_grid_points_refuses_bad_input():
    with pytest.raises(ValueError, match="no pixel"):
        mask_to_grid_points(np.zeros((8, 8)), 4)
    with pytest.raises(ValueError, match="H x W"):
        mask_to_grid_points(np.zeros(8), 4)
    with pytest.raises(ValueError, match="grid"):
        mask_to_grid_points(box_mask(0, 0, 5, 5), 0)
    with pytest.raises(ValueError, match="target_iou"):
        mask_to_grid_points(box_mask(0, 0, 5, 5), 4, target_iou=0)


@st.composite
def masks(draw):
    w, h = draw(st.integers(8, 90)), draw(st.integers(8, 90))
    m = np.zeros((h, w), dtype=bool)
    for _ in range(draw(st.integers(1, 3))):
        x0, y0 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
        m[y0 : draw(st.integers(y0 + 1, h)), x0 : draw(st.integers(x0 + 1, w))] = True
    return m


@settings(max_examples=150, deadline=None)
@given(m=masks(), grid=st.integers(2, 12))
def test_every_mask_becomes_grid_points_on_it(m, grid):
    pts = mask_to_grid_points(m, grid)
    h, w = m.shape
    centres = [((i + 0.5) * w / grid, (j + 0.5) * h / grid) for j in range(grid) for i in range(grid)]
    on = [c for c in centres if m[int(c[1]), int(c[0])]]
    assert pts and len(set(pts)) == len(pts) and all(m[int(y), int(x)] for x, y in pts)
    if not on:  # no grid centre on the mask: one point, a pixel centre of the mask
        assert len(pts) == 1
        return
    assert set(pts) <= set(on) and pts == sorted(pts, key=lambda p: (p[1], p[0]))  # reading order

    def iou(points):
        cells = grid_cell_masks([np.ravel(points)], grid, h, w)[0]
        return (cells & m).sum() / (cells | m).sum()

    # the greedy cover starts from the best single cell and never lowers the IoU
    assert iou(pts) >= max(iou([c]) for c in on) - 1e-12


# ---------------------------------------------------------------------------------------------
# render -> parse, garbage
# ---------------------------------------------------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(
    ms=st.lists(masks(), min_size=1, max_size=3), grid=st.integers(2, 16), offsets=st.booleans(), absent=st.booleans()
)
def test_mask_answers_round_trip(ms, grid, offsets, absent):
    h, w = ms[0].shape
    ms = [
        m if m.shape == (h, w) else np.pad(m, ((0, max(0, h - m.shape[0])), (0, max(0, w - m.shape[1]))))[:h, :w]
        for m in ms
    ]
    ms = [m for m in ms if m.any()] or [box_mask(0, 0, 1, 1, w, h)]
    v = GETok(grid, offsets)
    smp = mask_sample(ms, phrases=("cat", "dog") if absent else ("cat",), w=w, h=h)
    text = answer_text(smp, v)
    parsed = v.parse_masks(text, w, h)
    assert parsed.unreadable == 0 and parsed.answered
    got = {p.phrase: p for p in parsed}
    assert got["cat"].kind == "mask" and (not absent or got["dog"].kind == "none")
    want = [tuple(c for xy in mask_to_grid_points(m, grid) for c in xy) for m in ms]
    back = list(got["cat"].coords)
    # read back and written again, every instance is the same tokens (instances in the target's
    # order: by their first point), and a grid centre comes back exactly
    assert sorted(v.write(c, w, h) for c in back) == sorted(v.write(c, w, h) for c in want)
    centres = {((i + 0.5) * w / grid, (j + 0.5) * h / grid) for i in range(grid) for j in range(grid)}
    read = {(round(x, 6), round(y, 6)) for c in back for x, y in zip(c[0::2], c[1::2])}
    assert {(round(x, 6), round(y, 6)) for c in want for x, y in zip(c[0::2], c[1::2]) if (x, y) in centres} <= read
    # and the target scores fully on the point-set reward, whatever the grid, when every mask
    # holds a grid centre (a mask smaller than a cell may be missed by its one written point)
    if all(_holds_a_centre(m, grid) for m in ms):
        assert score_getok_mask_points(text, smp, vocabulary=v).reward == pytest.approx(1.0)


def _holds_a_centre(m, grid):
    h, w = m.shape
    return any(m[int((j + 0.5) * h / grid), int((i + 0.5) * w / grid)] for i in range(grid) for j in range(grid))


@pytest.mark.parametrize("offsets", [False, True])
def test_a_grid_centre_on_a_pixel_border_reads_back_on_the_mask(offsets):
    # 78 x 8 image, grid 13: cells are 6 px wide, so column 7's centre x = 7.5 * 78 / 13 = 45.0
    # lies on the border of pixels 44 and 45 and reads pixel 45 (floor). A mask of the one pixel
    # (x 45, y 0) holds cell (7, 0)'s centre (45, 4/13) and is written <grid7_0>. Read back as
    # 7.5 / 13 * 78 that was 44.99999999999999: pixel 44, off the mask, hit 0 and reward 0.
    # Read back as 7.5 * 78 / 13 it is 45.0, the mask conversion's own centre: reward 1.
    m = box_mask(45, 0, 46, 1, w=78, h=8)
    v = GETok(13, offsets)
    assert mask_to_grid_points(m, 13) == [(45.0, 0.5 * 8 / 13)]
    smp = mask_sample([m], w=78, h=8)
    text = answer_text(smp, v)
    assert text == seg("cat", "<grid7_0><OFF0_0>" if offsets else "<grid7_0>")
    (pred,) = v.parse_masks(text, 78, 8)
    assert pred.coords == ((45.0, 0.5 * 8 / 13),)
    assert score_getok_mask_points(text, smp, vocabulary=v).reward == 1.0


GARBAGE = st.one_of(
    st.text(),
    st.text(alphabet="<>_-,0123456789gridOFDELT |objectrfsabn"),
    st.lists(
        st.sampled_from(
            [
                "<grid3_4>",
                "<grid1_1>",
                "<grid9_0>",
                "<OFF1_-1>",
                "<OFF2_0>",
                "<DELETE>",
                ",",
                "<|object_ref_start|>",
                "cat",
                "<|object_ref_end|>",
                "<|box_start|>",
                "<|box_end|>",
                "None",
                "<12>",
                " ",
                "<|im_end|>",
            ]
        ),
        max_size=30,
    ).map("".join),
    st.none(),
    st.integers(),
    st.lists(st.integers()),
)


@settings(max_examples=300, deadline=None)
@given(text=GARBAGE)
def test_garbage_never_raises(text):
    smp = mask_sample([box_mask(0, 0, 20, 20), box_mask(20, 20, 40, 30)])
    for v in (G4, G4_GRID_ONLY, REX_BINS, QJ, ChatRex()):
        p = v.parse_masks(text, 40, 40)
        assert p.unreadable >= 0 and all(x.kind in ("mask", "none") for x in p)
    for scorer in (score_cell_masks, score_getok_mask_points, score_getok_grid_stage_cell_masks):
        r = scorer(text, smp, vocabulary=G4)
        assert 0.0 <= r.reward <= 1.0


def test_parse_masks_reads_sets_and_deletes():
    # one set of three points (one withdrawn), a set of only withdrawn points (no prediction),
    # and an unreadable instance; each instance is one mask whatever its point count
    text = seg("cat", "<grid0_0><grid1_0><DELETE><grid2_0><OFF1_0>,<grid3_3><DELETE>,<12><13>")
    p = G4.parse_masks(text, 40, 40)
    assert [x.kind for x in p] == ["mask"] and p[0].coords == (pytest.approx((5.0, 5.0, 25 + 10 / 3, 5.0)),)
    assert p.unreadable == 1 and "not a run of grid tokens" in p.errors[0]
    # the markup's own parser: kind "mask" takes any even count >= 2; an odd count is unreadable
    b = parse(seg("cat", "<1><2>,<1><2><3><4><5><6><7><8>,<1><2><3>"), kind="mask")
    assert [len(c) for c in b[0].coords] == [2, 8] and b.unreadable == 1


# ---------------------------------------------------------------------------------------------
# decoding without SAM
# ---------------------------------------------------------------------------------------------
def test_grid_cell_masks_hand_worked():
    # (5, 5) is in cell (0, 0), (25, 35) in cell (2, 3); NaN, negative and past-the-border points
    # paint nothing; (40, 40), the far corner, falls in the last cell (3, 3) as the vocabulary clamps it
    out = grid_cell_masks([(5, 5, 25, 35, float("nan"), 3, -1, 5, 41, 0), (40, 40), ()], 4, 40, 40)
    assert out.shape == (3, 40, 40)
    want = box_mask(0, 0, 10, 10) | box_mask(20, 30, 30, 40)
    np.testing.assert_array_equal(out[0], want)
    np.testing.assert_array_equal(out[1], box_mask(30, 30, 40, 40))
    assert not out[2].any()
    # cells of uneven size: 10 px in 3 cells, a pixel in the cell of its centre: (c + 0.5) * 3 / 10
    # floors to 0 for c = 0..2, 1 for 3..6, 2 for 7..9; (5, 5) is in cell (1, 1)
    np.testing.assert_array_equal(grid_cell_masks([(5.0, 5.0)], 3, 10, 10)[0, 5], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])


# ---------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------
# GT: A = cells (0, 0) and (1, 0) (x < 20, y < 10: 200 px), B = cells (2..3, 2..3) (400 px).
A, B = box_mask(0, 0, 20, 10), box_mask(20, 20, 40, 40)
# answer: {cell (0, 0)} (100 px), {the four cells of B} (exact), {cell (0, 3)} (on nothing)
ANSWER = seg("cat", "<grid0_0>,<grid2_2><grid3_2><grid2_3><grid3_3>,<grid0_3>")


def test_mask_iou_reward_hand_worked():
    smp = mask_sample([A, B])
    r = score_cell_masks(ANSWER, smp, vocabulary=G4)
    # IoUs: {(0, 0)} with A 100/200 = 0.5, the exact set with B 1, the third 0. One to one:
    # matched 1.5; P = 1.5/3, R = 1.5/2, F1 = 2 * 1.5 / (3 + 2) = 0.6
    assert (r.kind, r.num_pred, r.num_gt, r.unreadable) == ("mask_iou_grid_cells", 3, 2, 0)
    assert (r.precision, r.recall, r.reward) == pytest.approx((0.5, 0.75, 0.6))
    # one to one: two copies of the exact set match B once; the second scores 0
    twice = score_cell_masks(
        seg("cat", "<grid2_2><grid3_2><grid2_3><grid3_3>,<grid2_2><grid3_2><grid2_3><grid3_3>"),
        mask_sample([B]),
        vocabulary=G4,
    )
    assert (twice.precision, twice.recall) == pytest.approx((0.5, 1.0))
    # the target of a mask made of whole cells decodes to the mask itself: 1.0
    assert score_cell_masks(answer_text(smp, G4), smp, vocabulary=G4).reward == pytest.approx(1.0)
    # a phrase the question did not ask, and an unreadable fragment, are predictions scoring 0
    extra = score_cell_masks(
        seg("cat", "<grid2_2><grid3_2><grid2_3><grid3_3>,<bad>") + ", " + seg("dog", "<grid0_0>"),
        mask_sample([B]),
        vocabulary=G4,
    )
    # matched 1 over 3 predictions (exact, unreadable, dog) and 1 GT: F1 = 2 * 1 / (3 + 1) = 0.5
    assert (extra.num_pred, extra.unreadable, extra.reward) == (3, 1, pytest.approx(0.5))


def test_point_set_scores_hand_worked():
    # GT: the 20 x 20 square at the origin (400 px); its target is the 4 centres (n_ref = 4).
    sq = box_mask(0, 0, 20, 20)[None]
    assert reference_points(sq[0], 4) == 4
    q = point_set_scores(
        [
            (5, 5, 15, 5, 5, 15, 15, 15),  # the target
            (5, 5, 15, 15),  # two of its points
            (5, 5, 5, 5, 15, 15, 30, 30),  # a repeat and a miss
            (5, 5, 15, 5, 5, 15, 15, 15, 10, 5, 5, 10, 15, 10, 10, 15),  # 8 points
            (5, 5, float("nan"), 1),  # a NaN point
            (),
        ],
        sq,
        [4],
    )
    # target: hit 1; nearest neighbours 10 px vs d_ref = 0.5 sqrt(400 / 4) = 5: spacing 1;
    # saturation (1 - e^-2) / (1 - e^-2) = 1; no excess: q = 1
    # two points: hit 1; NN 14.1 vs d_ref 0.5 sqrt(200) = 7.07: spacing 1; saturation
    # (1 - e^-1) / (1 - e^-2) = 0.63212 / 0.86466 = 0.73106
    # repeat and miss: hit 3/4; NN 0, 0, 14.1, 21.2 vs d_ref 5: spacing (0 + 0 + 1 + 1) / 4 = 0.5;
    # saturation 1: q = 0.375
    # 8 points: all inside; NN 5 px vs d_ref 0.5 sqrt(400 / 8) = 3.54: spacing 1; saturation
    # capped at 1; excess 0.5 * (8 - 4) / 4 = 0.5: q = 0.5
    # NaN point: hit 1/2; the finite point has no neighbour (spacing 1), the NaN one 0: 0.5;
    # saturation 0.73106: q = 0.25 * 0.73106 = 0.18277
    sat2 = (1 - math.exp(-1)) / (1 - math.exp(-2))
    assert q[:, 0] == pytest.approx([1.0, sat2, 0.375, 0.5, 0.25 * sat2, 0.0])
    assert POINT_SET_WEIGHTS == {"saturation_points": 2.0, "excess_penalty": 0.5}
    # the weights are arguments: no excess penalty -> the 8 points score 1
    assert point_set_scores(
        [(5, 5, 15, 5, 5, 15, 15, 15, 10, 5, 5, 10, 15, 10, 10, 15)], sq, [4], weights={"excess_penalty": 0.0}
    )[0, 0] == pytest.approx(1.0)


def test_mask_rewards_of_a_phrase_with_no_object():
    # a mask question whose phrase is absent: "None" is the right answer under every mask scorer,
    # a written mask a false positive (F1 0); the point-set reward used to raise on the empty GT
    smp = Sample("m0", "img.png", 40, 40, "referring", ["cat"], [], "mask")
    none, one = seg("cat", "None"), seg("cat", "<grid0_0><OFF0_0>")
    assert point_set_scores([(5, 5)], np.zeros((0, 40, 40), dtype=bool), []).shape == (1, 0)
    for scorer in (score_getok_mask_points, score_cell_masks, score_getok_grid_stage_cell_masks):
        assert scorer(none, smp, vocabulary=G4).reward == pytest.approx(1.0), scorer.__name__
        r = scorer(one, smp, vocabulary=G4)
        assert r.precision == 0.0 and r.reward < 0.5, (scorer.__name__, r)


@pytest.mark.parametrize(
    "raw, want",
    [
        ((1, 2, 3, 4), [[1, 2], [3, 4]]),
        ([[1, 2], [3, 4]], [[1, 2], [3, 4]]),
        ([[0, 1, 2], [3, 4, 5]], []),  # triples are not points, whatever their total count
        ((1, 2, 3), []),
        ("ab", []),
        ([[1, 2], [3]], []),
    ],
)
def test_as_point_set_reads_pairs_only(raw, want):
    from rewards.mask import as_point_set

    assert as_point_set(raw).reshape(-1, 2).tolist() == want


def test_point_set_reward_through_text_hand_worked():
    smp = mask_sample([A, B])
    r = score_getok_mask_points(ANSWER, smp, vocabulary=G4)
    # n_ref: A's target is 2 points, B's 4. {(5, 5)} on A: hit 1, spacing 1, saturation
    # (1 - e^-0.5) / (1 - e^-1) = 0.39347 / 0.63212 = 0.62246; the four centres of B: 1;
    # (5, 35): on nothing. Matched m = 1.62246 over 3 predictions and 2 GT: F1 = 2m / 5
    m = 1 + (1 - math.exp(-0.5)) / (1 - math.exp(-1))
    assert r.kind == "mask_points" and r.reward == pytest.approx(2 * m / 5)
    assert mask_points_f1([(5, 5)], ["cat"], [A], ["cat"], grid=4, height=40, width=40).f1 == pytest.approx(
        2 * (m - 1) / 2
    )
    # the grid stage: 0.8 * (0.5 * 0.6 + 0.5 * 2m/5) + 0.1 format + 0.1 non-repeat
    g = score_getok_grid_stage_cell_masks(ANSWER, smp, vocabulary=G4)
    assert g.kind == "mask_iou_grid_cells+points"
    assert g.reward == pytest.approx(0.8 * (0.5 * 0.6 + 0.5 * 2 * m / 5) + 0.2)


def test_sam_decoding_is_asked_for_by_name_never_assumed():
    smp = mask_sample([A])
    # score decodes with SAM: without a SAM mask source it says what to configure
    with pytest.raises(ValueError, match="sample 'm'.*reward.sam_checkpoint.*score_cell_masks"):
        score(ANSWER, smp, vocabulary=G4)

    class FakeSam:  # the interface rewards.sam.SamMaskSource offers
        def __init__(self):
            self.sets = []

        def masks_from_points(self, sample, point_sets):
            self.sets.append(point_sets)
            return [A for _ in point_sets]

    sam = FakeSam()
    r = score(ANSWER, smp, vocabulary=G4, mask_source=sam)
    # every set decodes to A: one of the three matches A with IoU 1 -> F1 = 2 * 1 / 4 = 0.5
    assert r.kind == "mask_iou" and r.reward == pytest.approx(0.5)
    assert [len(s) for s in sam.sets[0]] == [2, 8, 2]
    assert [score.mask_decoder, score_cell_masks.mask_decoder, score_getok_mask_points.mask_decoder] == [
        "sam",
        "grid_cells",
        None,
    ]


# ---------------------------------------------------------------------------------------------
# other vocabularies refuse masks; the run refuses what it cannot decode
# ---------------------------------------------------------------------------------------------
def test_other_vocabularies_refuse_masks():
    mask_pred = [Prediction("cat", "mask", ((5.0, 5.0, 15.0, 5.0),))]
    for v in (REX_BINS, QJ, ChatRex().for_proposals([(0, 0, 10, 10)], 40, 40)):
        with pytest.raises(ValueError, match=f"{v.name} cannot write masks"):
            v.render(mask_pred, 40, 40)
        p = v.parse_masks(seg("cat", "<1><2>"), 40, 40)
        assert p.unreadable == 1 and not list(p) and "cannot write masks" in p.errors[0]
    smp = mask_sample([A])
    with pytest.raises(ValueError, match="rex_bins cannot write masks"):
        answer_text(smp, REX_BINS)
    with pytest.raises(ValueError, match="sample 'm'.*rex_bins cannot write masks"):
        score_cell_masks(ANSWER, smp)
    from rlsys.data.prepare import check_targets

    with pytest.raises(ConfigError, match="sample.*'m'.*qwen_json cannot write masks.*getok"):
        check_targets([smp], QJ)
    check_targets([smp], G4)
    # the config refuses synthetic mask samples for a vocabulary without masks, for GRPO and SFT
    for path, schema in ((None, None), ("configs/sft_tiny_cpu.yaml", SFTConfig)):
        kw = {"schema": schema} if schema else {}
        with pytest.raises(ConfigError, match="synthetic_mask_fraction.*rex_bins cannot write"):
            load_config(path, ["data.synthetic_mask_fraction=0.3"], **kw)
        assert load_config(path, ["data.synthetic_mask_fraction=0.3", "model.vocabulary=getok"], **kw)


def test_mask_decoder_is_checked_at_start():
    from rlsys.data.prepare import check_point_masks, mask_decoding

    smp = mask_sample([A])
    with pytest.raises(ConfigError, match="1 sample.*'m'.*decodes mask answers with SAM.*score_cell_masks"):
        check_point_masks([smp], RewardConfig())
    for scorer in (
        "rewards.scorer:score_cell_masks",
        "rewards.scorer:score_getok_mask_points",
        "rewards.scorer:score_getok_grid_stage_cell_masks",
    ):
        assert check_point_masks([smp], RewardConfig(scorer=scorer)) == 0
    assert mask_decoding(RewardConfig(scorer="rewards.scorer:score_cell_masks")) == ("grid_cells", None)
    with pytest.raises(ConfigError, match="reward.sam_checkpoint"):
        mask_decoding(RewardConfig())
    with pytest.raises(ConfigError, match="reward.sam_checkpoint"):
        mask_decoding(RewardConfig(scorer="rewards.scorer:score_getok_mask_points"))


# ---------------------------------------------------------------------------------------------
# data, synthetic, metrics
# ---------------------------------------------------------------------------------------------
def test_mask_records_need_a_mask_that_holds_a_pixel():
    rec = {
        "id": "r1",
        "image": "x.png",
        "width": 40,
        "height": 40,
        "task": "referring",
        "output": "mask",
        "phrases": ["cat"],
        "instances": [{"phrase": "cat", "box": [0, 0, 5, 5]}],
    }
    with pytest.raises(DataError, match=r"r1.*instances\[0\]\.mask.*missing for output 'mask'"):
        Sample.from_dict(rec, "f.jsonl:3")
    rec["instances"][0]["mask"] = _rle(np.zeros((40, 40), dtype=bool))
    with pytest.raises(DataError, match=r"f.jsonl:3.*instances\[0\]\.mask.*empty"):
        Sample.from_dict(rec, "f.jsonl:3")
    rec["instances"][0]["mask"] = _rle(A)
    s = Sample.from_dict(rec, "f.jsonl:3")
    assert s.output == "mask"
    from rlsys.lang.prompts import question_for_sample

    assert question_for_sample(s).startswith("Segment cat.")


def test_synthetic_mask_samples_keep_the_rest_of_the_seed(tmp_path):
    from rlsys.data import synthetic
    from rlsys.data.samples import load_jsonl

    plain = load_jsonl(synthetic.generate(tmp_path / "a", num_images=24, seed=3, image_size=56, max_objects=2))
    masked = load_jsonl(
        synthetic.generate(tmp_path / "b", num_images=24, seed=3, image_size=56, max_objects=2, mask_fraction=0.6)
    )
    assert len(plain) == len(masked)
    changed = [m for p, m in zip(plain, masked) if p.output != m.output]
    assert changed and all(m.output == "mask" and m.task in ("detection", "referring") for m in changed)
    for p, m in zip(plain, masked):  # the same images and ground truth; only the output differs
        assert (p.id, p.task, p.phrases, [i.to_dict() for i in p.instances]) == (
            m.id,
            m.task,
            m.phrases,
            [i.to_dict() for i in m.instances],
        )
        assert (tmp_path / "a" / "images" / p.image.split("/")[-1]).read_bytes() == (
            tmp_path / "b" / "images" / m.image.split("/")[-1]
        ).read_bytes()
    v = GETok(8)
    assert all(
        score_getok_mask_points(answer_text(s, v), s, vocabulary=v).reward == pytest.approx(1.0) for s in changed
    )


def test_mask_metric_identity_is_one_and_hand_worked():
    half = box_mask(0, 0, 12, 10)  # 120 px of A's 200: IoU 0.6
    assert all(v == 1.0 for v in mask_f1([{"gt": [("cat", A), ("cat", B)], "pred": [("cat", A), ("cat", B)]}]).values())
    m = mask_f1([{"gt": [("cat", A)], "pred": [("cat", _rle(half))]}])
    # matched at 0.50, 0.55, 0.60 (of ten thresholds): R@mIoU = P@mIoU = 0.3
    assert (m["F1@0.50"], m["F1@0.60"], m["F1@0.65"], m["F1@mIoU"]) == pytest.approx((1, 1, 0, 0.3))


def test_eval_metrics_of_mask_answers():
    from rlsys.eval.evaluate import compute_metrics, format_table

    smp = [mask_sample([A, B], sid="one"), mask_sample([B], phrases=("cat", "dog"), task="referring", sid="two")]
    # the targets of masks made of whole cells decode (grid cells) to the masks themselves
    answers = [answer_text(s, G4) for s in smp]
    m = compute_metrics(smp, answers, G4, mask_decoder="grid_cells")
    assert m["mask"]["F1@0.50"] == m["mask"]["F1@mIoU"] == 1.0 and m["mask"]["decoder"] == "grid_cells"
    assert set(m["mask_tasks"]) == {"detection", "referring"} and m["mean_reward"] == pytest.approx(1.0)
    assert "mask F1@0.50 / F1@mIoU (grid_cells) | 1.000 / 1.000" in format_table(m)
    wrong = compute_metrics(smp, [ANSWER, "garbage"], G4, mask_decoder="grid_cells")
    assert wrong["mask"]["F1@0.50"] < 1.0
    with pytest.raises(ValueError, match="mask decoder"):
        compute_metrics(smp, answers, G4)


# ---------------------------------------------------------------------------------------------
# Serve
# ---------------------------------------------------------------------------------------------
def test_serve_answers_a_mask_request_in_request_pixels():
    """A mask request to a GETok model: each instance comes back as its points in the request's
    pixels and the mask they decode to, as COCO RLE; a model that writes no masks refuses the
    request with 422 before anything is generated."""
    from pycocotools import mask as mask_utils

    from rlsys.config import LimitsConfig
    from rlsys.serve.requests import RequestError, bind_vocabulary, check_request, parse_request, to_objects

    req = parse_request(b'{"image": "x", "task": "detection", "categories": ["cat"], "output": "mask"}')
    assert check_request(req, LimitsConfig()) == ("mask", ["cat"])
    assert bind_vocabulary(req, "mask", 40, 40, G4) is G4
    for other in (None, REX_BINS, QJ):
        with pytest.raises(RequestError) as e:
            bind_vocabulary(req, "mask", 40, 40, other)
        assert e.value.status == 422 and "cannot write masks" in e.value.message
    # cells (0, 0) and (1, 0), then cell (3, 3) of a 4 x 4 grid on 40 x 40: 10 px cells
    text = seg("cat", "<grid0_0><OFF0_0><grid1_0><OFF0_0>,<grid3_3><OFF0_0>")
    objs, bad = to_objects(text, "detection", 40, 40, G4, "mask")
    assert bad == 0 and [o["points"] for o in objs] == [[[5.0, 5.0], [15.0, 5.0]], [[35.0, 35.0]]]
    got = [mask_utils.decode(o["mask"]).astype(bool) for o in objs]
    assert np.array_equal(got[0], box_mask(0, 0, 20, 10)) and np.array_equal(got[1], box_mask(30, 30, 40, 40))
    assert all(o["mask_decoder"] == "grid_cells" and o["mask"]["size"] == [40, 40] for o in objs)
    # a non-square request image: cells are 10 x 5 px on 40 wide x 20 high
    objs, _ = to_objects(seg("cat", "<grid1_2><OFF0_0>"), "detection", 40, 20, G4, "mask")
    assert objs[0]["points"] == [[15.0, 12.5]]
    assert np.array_equal(mask_utils.decode(objs[0]["mask"]).astype(bool), box_mask(10, 10, 20, 15, w=40, h=20))
    objs, bad = to_objects("gibberish", "detection", 40, 40, G4, "mask")
    assert objs == [] and bad == 1
