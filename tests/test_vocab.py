"""rlsys.lang.vocab: every vocabulary renders pixel geometry to text and reads it back into pixels,
never raises on garbage, and scores through the one reward implementation."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.scorer import score
from rlsys.data.samples import Instance, Sample
from rlsys.lang.format import KeypointInstance, Prediction
from rlsys.lang.format import render as render_bins_markup
from rlsys.lang.vocab import (
    QWEN3_JSON,
    REX_BINS,
    GETok,
    QwenJson,
    getok_tokens,
    make_vocabulary,
    resized_size,
    tokenizer_grid,
    vocabulary_for,
)

# 640x480 under a 56*56..224*224 budget is resized to 252x168 (scale 0.39375 x 0.35)
QJ = QwenJson(56 * 56, 224 * 224)
GT32 = GETok(32)  # the paper's grid, with offsets: a 96 x 96 lattice
GT8 = GETok(8, offsets=False)  # grid tokens alone
VOCABS = [REX_BINS, QJ, QWEN3_JSON, GT32, GT8]


def _vid(v):
    return f"{v.name}{getattr(v, 'grid', '')}{'' if getattr(v, 'offsets', True) else '-grid-only'}"


def _tolerance(v, width, height):
    """Largest round-trip error per axis: half a bin (rex_bins), half a resized pixel mapped back
    (qwen_json), half a lattice step (getok: a third of a cell with offsets, a cell without)."""
    if v is REX_BINS:
        return width / 1998 + 1e-9, height / 1998 + 1e-9
    if isinstance(v, GETok):
        n = v.grid * (3 if v.offsets else 1)
        return width / (2 * n) + 1e-9, height / (2 * n) + 1e-9
    if v.frame == "relative_1000":  # half a step of the 0..1000 grid
        return width / 2000 + 1e-9, height / 2000 + 1e-9
    rw, rh = resized_size(width, height, v.min_pixels, v.max_pixels)
    return 0.5 * width / rw + 1e-9, 0.5 * height / rh + 1e-9


def test_resized_size_is_the_processors_rule():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    rng = random.Random(0)
    for _ in range(3000):
        w, h = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(w, h) / min(w, h) > 200:
            continue
        lo, hi = rng.choice([(3136, 50176), (3136, 12845056), (200704, 1003520), (100, 12544)])
        rh, rw = smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
        assert resized_size(w, h, lo, hi) == (rw, rh), (w, h, lo, hi)
    assert resized_size(640, 480, 56 * 56, 224 * 224) == (252, 168)


def test_qwen_json_hand_worked_box_and_point():
    text = QJ.render(
        [
            Prediction("cat", "box", ((100, 50, 300, 400),)),
            Prediction("dog", "none", ()),
            Prediction("cup", "point", ((320, 240),)),
        ],
        640,
        480,
    )
    # 100 * 0.39375 = 39.4 -> 39; 50 * 0.35 = 17.5 -> 18 (half to even); 300 -> 118.1 -> 118; 400 -> 140
    # the absent phrase has no entry; the point 320, 240 -> 126, 84
    assert text == (
        '```json\n[{"bbox_2d": [39, 18, 118, 140], "label": "cat"}, {"point_2d": [126, 84], "label": "cup"}]\n```'
    )
    p = QJ.parse(text, 640, 480)
    assert p.unreadable == 0 and p.answered
    (cat,), (cup,) = p[0].coords, p[1].coords
    assert [p[0].phrase, p[0].kind, p[1].phrase, p[1].kind] == ["cat", "box", "cup", "point"]
    assert cat == pytest.approx((39 / 0.39375, 18 / 0.35, 118 / 0.39375, 140 / 0.35))
    assert cup == pytest.approx((320, 240))
    assert p.written == [(39, 18, 118, 140), (126, 84)]


boxes = st.tuples(st.floats(0, 639), st.floats(0, 479), st.floats(0, 639), st.floats(0, 479)).map(
    lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
)
points = st.tuples(st.floats(0, 640), st.floats(0, 480))
polygons = st.lists(points, min_size=3, max_size=6).map(lambda pts: tuple(v for p in pts for v in p))
phrases = st.sampled_from(["cat", "red circle", "text", "a dog's ear", "数字"])


@st.composite
def answers(draw):
    out, used = [], set()
    for _ in range(draw(st.integers(0, 4))):
        phrase = draw(phrases)
        if phrase in used:
            continue
        used.add(phrase)
        kind = draw(st.sampled_from(["box", "point", "polygon", "none"]))
        geo = {"box": boxes, "point": points, "polygon": polygons}.get(kind)
        coords = () if geo is None else tuple(draw(st.lists(geo, min_size=1, max_size=4)))
        out.append(Prediction(phrase, kind, coords))
    return out


@pytest.mark.parametrize("v", VOCABS, ids=_vid)
@settings(max_examples=150, deadline=None)
@given(preds=answers())
def test_render_then_parse_gives_the_pixels_back(v, preds):
    w, h = 640, 480
    tx, ty = _tolerance(v, w, h)
    got = v.parse(v.render(preds, w, h), w, h)
    assert got.unreadable == 0, got.errors
    want = {(p.phrase, p.kind): p.coords for p in preds if not isinstance(v, QwenJson) or p.kind != "none"}
    assert {(p.phrase, p.kind) for p in got} == set(want)
    for p in got:
        # instances come back sorted (left to right), each within the vocabulary's resolution
        sent, back = want[(p.phrase, p.kind)], p.coords
        assert len(back) == len(sent)
        for b in back:  # (near-ties may swap places after rounding: matched as sets)
            assert any(
                all(abs(x - y) <= (tx if k % 2 == 0 else ty) for k, (x, y) in enumerate(zip(a, b))) for a in sent
            ), (b, sent)


@pytest.mark.parametrize("v", VOCABS, ids=_vid)
def test_keypoints_round_trip(v):
    insts = [
        KeypointInstance("person1", (10.0, 20.0, 300.0, 400.0), {"nose": (100.0, 120.0), "left eye": None}),
        KeypointInstance("person2", (320.0, 20.0, 600.0, 470.0), {"nose": (400.0, 100.0)}),
    ]
    tx, ty = _tolerance(v, 640, 480)
    back, bad = v.parse_keypoints(v.render_keypoints(insts, 640, 480), 640, 480)
    assert bad == 0 and [i.name for i in back] == ["person1", "person2"]
    for a, b in zip(insts, back):
        assert all(abs(x - y) <= t for x, y, t in zip(a.box, b.box, (tx, ty, tx, ty)))
        assert a.keypoints.keys() == b.keypoints.keys() and b.keypoints["nose"] is not None
        assert abs(a.keypoints["nose"][0] - b.keypoints["nose"][0]) <= tx
    assert back[0].keypoints["left eye"] is None
    assert len(back.written) == 2


@pytest.mark.parametrize("v", VOCABS, ids=_vid)
@settings(max_examples=400, deadline=None)
@given(
    text=st.one_of(
        st.text(),
        st.text(alphabet='[]{}",:0123456789.-e bbox_2dpointlabel`json<>|'),
        st.text(alphabet="<>_-,0123456789gridOFDELT |objectrfsabn"),
        st.lists(
            st.sampled_from(
                [
                    "<grid3_4>",
                    "<grid31_0>",
                    "<grid32_1>",
                    "<OFF1_-1>",
                    "<OFF2_0>",
                    "<DELETE>",
                    ",",
                    "<|box_start|>",
                    "<|box_end|>",
                    "<|object_ref_start|>cat<|object_ref_end|>",
                    "None",
                    "<5>",
                ]
            )
        ).map("".join),
        st.none(),
        st.integers(),
        st.lists(st.integers()),
    )
)
def test_garbage_never_raises(v, text):
    p = v.parse(text, 640, 480)
    assert p.unreadable >= 0 and isinstance(p.errors, list)
    for pred in p:
        assert all(0 <= x <= 640 for c in pred.coords for x in c[0::2])
        assert all(0 <= y <= 480 for c in pred.coords for y in c[1::2])
    insts, bad = v.parse_keypoints(text, 640, 480)
    assert bad >= 0


@pytest.mark.parametrize("v", VOCABS, ids=_vid)
def test_every_prefix_of_an_answer_parses(v):
    """A policy's answer is cut by the token limit anywhere: each prefix parses without raising,
    and what it keeps is a prefix of the full answer's instances."""
    preds = [
        Prediction("cat", "box", ((10, 20, 300, 400), (320, 30, 600, 470))),
        Prediction("cup", "point", ((50, 60),)),
    ]
    text = v.render(preds, 640, 480)
    full = [(p.phrase, c) for p in v.parse(text, 640, 480) for c in p.coords]
    for n in range(len(text) + 1):
        got = [(p.phrase, c) for p in v.parse(text[:n], 640, 480) for c in p.coords]
        assert all(g in full for g in got), (n, text[:n])


def test_qwen3_json_hand_worked_box_and_point():
    """Qwen3-VL's frame: integers on 0..1000 relative to the image, whatever its size or the
    processor's resize; 200 x 100 px: x * 5, y * 10."""
    preds = [Prediction("cat", "box", [(50, 25, 150, 75)]), Prediction("dog", "point", [(20.2, 99.96)])]
    text = QWEN3_JSON.render(preds, 200, 100)
    objs = json.loads(text.removeprefix("```json\n").removesuffix("\n```"))
    assert objs == [{"bbox_2d": [250, 250, 750, 750], "label": "cat"}, {"point_2d": [101, 1000], "label": "dog"}]
    answer = '[{"bbox_2d": [250, 250, 750, 750], "label": "cat"}]'
    got = QWEN3_JSON.parse(answer, 200, 100)
    assert got.unreadable == 0 and [(p.phrase, p.kind) for p in got] == [("cat", "box")]
    assert got[0].coords == [(50.0, 25.0, 150.0, 75.0)] or list(got[0].coords) == [(50.0, 25.0, 150.0, 75.0)]
    # read as Qwen2.5-VL's resized pixels, the same text is another box: the bug the frame check stops
    assert list(QJ.parse(answer, 200, 100)[0].coords) != list(got[0].coords)
    assert make_vocabulary("qwen3_json") is QWEN3_JSON and QWEN3_JSON.added_tokens() == ()


def test_qwen_json_reads_what_models_write():
    w, h = 640, 480
    assert QJ.parse("```json\n[]\n```", w, h).answered  # no object: a readable answer
    bare = QJ.parse('[{"bbox_2d": [39, 18, 118, 140], "label": "cat"}]', w, h)
    assert bare.unreadable == 0 and bare[0].kind == "box"
    single = QJ.parse('{"point_2d": [126, 84], "label": "cup"}', w, h)
    assert single.unreadable == 0 and single[0].coords[0] == pytest.approx((320, 240))
    cut = QJ.parse('```json\n[{"bbox_2d": [39, 18, 118, 140], "label": "cat"}, {"bbox_2d": [40, 1', w, h)
    assert len(cut[0].coords) == 1 and cut.unreadable == 1 and "unfinished" in cut.errors[0]
    bad = QJ.parse(
        '[{"bbox_2d": [39, 18], "label": "cat"}, {"bbox_2d": [5, 5, 9, 9]}, {"bbox_2d": [9, 9, 5, 5], "label": "x"},'
        ' {"point_2d": [1, 2], "label": "ok"}, 7] trailing',
        w,
        h,
    )
    assert bad.unreadable == 5 and [p.phrase for p in bad] == ["ok"]  # 4 bad entries and the trailing text
    assert not QJ.parse("", w, h).answered and QJ.parse("I cannot see it", w, h).unreadable == 1
    # off the image: clamped to the resized image, then mapped back
    off = QJ.parse('[{"bbox_2d": [200, 100, 900, 900], "label": "cat"}]', w, h)
    assert off[0].coords[0] == pytest.approx((200 / 0.39375, 100 / 0.35, 640, 480))


def test_rex_bins_are_todays_markup():
    preds = [Prediction("person", "box", ((0, 35, 980, 987), (646, 0, 999, 940)))]
    assert REX_BINS.render(preds, 999, 999) == render_bins_markup(
        [Prediction("person", "box", ((0, 35, 980, 987), (646, 0, 999, 940)))]
    )
    assert REX_BINS.prompt_boxes([(0, 0, 999, 999)], 999, 999) == '"<0><0><999><999>"'
    assert REX_BINS.question_hint("box") == "" and len(REX_BINS.added_tokens()) == 1000 and QJ.added_tokens() == ()


def _sample(instances, phrases=("cat",), output="box", task="detection", w=280, h=280):
    return Sample("s", "img.png", w, h, task, list(phrases), list(instances), output)


# 280x280 inside a 56*56..280*280 budget stays 280x280: model pixels are image pixels
SAME = QwenJson(56 * 56, 280 * 280)


def test_qwen_json_rewards_are_the_box_f1():
    smp = _sample([Instance("cat", box=(28, 28, 140, 140))])
    exact = score('[{"bbox_2d": [28, 28, 140, 140], "label": "cat"}]', smp, vocabulary=SAME)
    assert exact.reward == pytest.approx(1.0) and exact.kind == "box_iou"
    # one exact box and one that misses: precision 1/2, recall 1, F1 2/3
    two = score(
        '[{"bbox_2d": [28, 28, 140, 140], "label": "cat"}, {"bbox_2d": [200, 200, 250, 250], "label": "cat"}]',
        smp,
        vocabulary=SAME,
    )
    assert two.reward == pytest.approx(2 / 3) and (two.num_pred, two.num_gt) == (2, 1)
    # half the width: IoU 0.5
    half = score('[{"bbox_2d": [28, 28, 84, 140], "label": "cat"}]', smp, vocabulary=SAME)
    assert half.reward == pytest.approx(0.5)
    # nothing to find: "[]" is right, an empty or unreadable answer is not
    absent = _sample([], phrases=("dog",))
    assert score("```json\n[]\n```", absent, vocabulary=SAME).reward == 1.0
    assert score("", absent, vocabulary=SAME).reward == 0.0
    assert score("no idea", absent, vocabulary=SAME).unreadable == 1
    # the same answer in bins scores the same through the same reward
    bins = score(REX_BINS.render([Prediction("cat", "box", ((28, 28, 140, 140),))], 280, 280), smp)
    assert bins.reward == pytest.approx(1.0, abs=0.01)


def test_qwen_json_points_and_keypoints_score():
    gui = _sample([Instance("ok button", box=(10, 10, 60, 40))], phrases=("ok button",), output="point", task="gui")
    assert score('[{"point_2d": [30, 20], "label": "ok button"}]', gui, vocabulary=SAME).reward == 1.0
    assert score('[{"point_2d": [100, 100], "label": "ok button"}]', gui, vocabulary=SAME).reward == 0.0
    kp = _sample(
        [Instance("person", box=(10, 10, 200, 250), keypoints={"nose": (100, 50, 2), "left eye": (90, 40, 2)})],
        phrases=("person",),
        output="keypoint",
        task="keypoint",
    )
    text = SAME.render_keypoints(
        [KeypointInstance("person1", (10, 10, 200, 250), {"nose": (100, 50), "left eye": (90, 40)})], 280, 280
    )
    assert json.loads(text.strip("`json\n"))[0]["keypoints"] == {"nose": [100, 50], "left eye": [90, 40]}
    assert score(text, kp, vocabulary=SAME).reward == pytest.approx(1.0)


def test_sft_targets_and_questions_speak_the_vocabulary():
    from rlsys.lang.prompts import question_for_sample
    from rlsys.lang.targets import answer_text

    smp = _sample(
        [Instance("cat", box=(28, 28, 140, 140)), Instance("cat", box=(0, 0, 20, 20))], phrases=("cat", "dog")
    )
    assert json.loads(answer_text(smp, SAME).strip("`json\n")) == [
        {"bbox_2d": [0, 0, 20, 20], "label": "cat"},
        {"bbox_2d": [28, 28, 140, 140], "label": "cat"},
    ]
    assert answer_text(smp).endswith("<|object_ref_start|>dog<|object_ref_end|><|box_start|>None<|box_end|>")
    assert question_for_sample(smp, vocabulary=SAME).endswith(
        'Answer in JSON as [{"bbox_2d": [x0, y0, x1, y1], "label": "..."}].'
    )
    vp = Sample(
        "v",
        "img.png",
        280,
        280,
        "visual_prompt",
        ["cat"],
        [Instance("cat", box=(28, 28, 140, 140))],
        "box",
        prompt_boxes=[(28, 28, 140, 140)],
    )
    assert "[28, 28, 140, 140]" in question_for_sample(vp, vocabulary=SAME)
    assert '"<100><100><500><500>"' in question_for_sample(vp)


def test_serve_answers_in_request_pixels_whatever_the_vocabulary():
    from rlsys.serve.requests import to_objects

    objs, bad = to_objects('```json\n[{"bbox_2d": [39, 18, 118, 140], "label": "cat"}]\n```', "detection", 640, 480, QJ)
    assert bad == 0 and objs == [
        {"phrase": "cat", "box": [round(39 / 0.39375, 2), round(18 / 0.35, 2), round(118 / 0.39375, 2), 400.0]}
    ]
    # getok: cells 20 x 15 px at 640 x 480; <grid5_8><OFF-1_-1> is (103.33, 122.5), <grid0_0> (10, 7.5)
    objs, bad = to_objects(_one("<grid5_8><OFF-1_-1>, <grid0_0>"), "pointing", 640, 480, GT32)
    assert bad == 0 and objs == [{"phrase": "cat", "point": [103.33, 122.5]}, {"phrase": "cat", "point": [10.0, 7.5]}]


def test_vocabulary_from_config_and_processor(tiny_model_dir):
    from rlsys.models import load_processor

    assert make_vocabulary("rex_bins") is REX_BINS
    with pytest.raises(ValueError, match="min_pixels"):
        make_vocabulary("qwen_json")
    with pytest.raises(ValueError, match="unknown vocabulary"):
        make_vocabulary("nonesuch")
    assert make_vocabulary("getok", getok_grid=16, getok_offsets=False) == GETok(16, False)
    with pytest.raises(ValueError, match="no complete GETok grid"):
        vocabulary_for("getok", load_processor(tiny_model_dir))
    v = vocabulary_for("qwen_json", load_processor(tiny_model_dir, pixels={"min_pixels": 3136, "max_pixels": 50176}))
    assert (v.min_pixels, v.max_pixels, v.factor) == (3136, 50176, 28)


def test_a_custom_scorer_without_the_argument_is_refused_for_another_vocabulary():
    from actors.rewards import scorer_vocabulary

    assert scorer_vocabulary("rewards.scorer:score", QJ) is QJ
    assert scorer_vocabulary("tests.scorers_for_tests:score", QJ) is QJ  # takes **kw
    assert scorer_vocabulary("tests.test_vocab:_plain_scorer", REX_BINS) is None  # the default: not passed
    with pytest.raises(ValueError, match="takes no vocabulary"):
        scorer_vocabulary("tests.test_vocab:_plain_scorer", QJ)


def _plain_scorer(text, sample, *, mask_source=None, matching="paper"):
    return score(text, sample, mask_source=mask_source, matching=matching)


def test_qwen_json_takes_a_base_checkpoint_as_it_is(tiny_model_dir, tmp_path):
    """A base checkpoint without <0>..<999> is prepared (tokens added) for rex_bins and used
    unchanged for qwen_json; soft coordinate targets are refused without bins."""
    from rlsys.config import ConfigError, load_config
    from rlsys.data.prepare import prepare_model_dir
    from rlsys.sft.train import SFTConfig
    from tests.test_models import _tiny_base_without_coords

    base = _tiny_base_without_coords(tiny_model_dir, tmp_path)
    cfg = load_config(overrides=[f"model.path={base}", "model.vocabulary=qwen_json"])
    assert prepare_model_dir(cfg.model, tmp_path / "run-json") == str(base.resolve())
    cfg = load_config(overrides=[f"model.path={base}"])
    assert prepare_model_dir(cfg.model, tmp_path / "run-bins") == str(
        (tmp_path / "run-bins" / "prepared-model").resolve()
    )
    with pytest.raises((ConfigError, ValueError), match="writes no bins"):
        SFTConfig.model_validate({"model": {"vocabulary": "qwen_json"}, "train": {"coord_label_sigma_bins": 2}})


# ---------------------------------------------------------------------------------------------
# GETok
# ---------------------------------------------------------------------------------------------
def _one(text_body, phrase="cat"):
    return f"<|object_ref_start|>{phrase}<|object_ref_end|><|box_start|>{text_body}<|box_end|>"


def test_getok_hand_worked_point_and_box():
    # 640 x 480, grid 32 with offsets: a 96-step lattice, 6.67 x 5 px per step.
    # x = 100: 100 / 640 * 96 = 15 -> cell 5, offset 15 % 3 - 1 = -1; y = 120: 24 -> cell 8, offset -1
    assert GT32.write((100, 120), 640, 480) == "<grid5_8><OFF-1_-1>"
    # back: (5 + 0.5 - 1/3) / 32 * 640 = 103.33, (8 + 0.5 - 1/3) / 32 * 480 = 122.5
    p = GT32.parse(_one("<grid5_8><OFF-1_-1>"), 640, 480)
    assert p.unreadable == 0 and p[0].kind == "point"
    assert p[0].coords[0] == pytest.approx((103.3333, 122.5), abs=1e-3)
    assert p.written == [pytest.approx((5 + 0.5 - 1 / 3, 8 + 0.5 - 1 / 3))]
    # grid tokens alone (grid 8, 80 x 60 px cells): the box (0, 0, 640, 480) is cells 0 and 7,
    # whose centres are 40 px (30 px) in from the borders
    assert GT8.write((0, 0, 640, 480), 640, 480) == "<grid0_0><grid7_7>"
    assert GT8.parse(_one("<grid0_0><grid7_7>"), 640, 480)[0].coords == ((40.0, 30.0, 600.0, 450.0),)
    # a grid token without an offset is the cell centre even for the offset vocabulary
    assert GT32.parse(_one("<grid0_0>"), 640, 480)[0].coords == ((10.0, 7.5),)


def test_getok_delete_withdraws_points_and_bad_tokens_are_unreadable():
    # a box with a withdrawn corner is no prediction, and not an unreadable one; the answer counts
    p = GT32.parse(_one("<grid3_4><DELETE><grid9_9>,<grid1_1><grid2_2>"), 640, 480)
    assert p.unreadable == 0 and p.answered and [c for c in p[0].coords] == [(30.0, 22.5, 50.0, 37.5)]
    only = GT32.parse(_one("<grid3_4><DELETE>"), 640, 480)
    assert only.unreadable == 0 and only.answered and not list(only)
    # a polygon loses the vertex; under 3 vertices it is withdrawn
    quad = GT32.parse(_one("<grid1_1><grid9_1><DELETE><grid9_9><grid1_9>"), 640, 480)
    assert quad[0].kind == "polygon" and len(quad[0].coords[0]) == 6
    assert not list(GT32.parse(_one("<grid1_1><grid9_1><DELETE><grid9_9>"), 640, 480))
    # outside the grid, an offset of 2 steps, bins in a getok answer: unreadable, with the reason
    for body, why in (
        ("<grid32_0>", "outside the 32x32 grid"),
        ("<grid3_3><OFF2_0>", "not one of the nine"),
        ("<12><40>", "not a run of grid tokens"),
    ):
        bad = GT32.parse(_one(body), 640, 480)
        assert bad.unreadable == 1 and not list(bad) and why in bad.errors[0]


def test_getok_tokens_and_the_grid_read_from_a_tokenizer():
    toks = getok_tokens(32)
    assert len(toks) == len(set(toks)) == 32 * 32 + 10
    assert toks[0] == "<grid0_0>" and toks[1] == "<grid1_0>" and toks[-1] == "<DELETE>" and "<OFF-1_1>" in toks
    assert GT32.added_tokens() == toks
    assert tokenizer_grid({t: i for i, t in enumerate(getok_tokens(12))}) == 12
    with pytest.raises(ValueError, match="no complete GETok grid"):
        tokenizer_grid({t: i for i, t in enumerate(getok_tokens(12)[:-20])})


def test_getok_scores_through_the_one_box_reward():
    smp = _sample([Instance("cat", box=(100, 100, 300, 300))], phrases=("cat",), w=640, h=480)
    exact = GT32.render([Prediction("cat", "box", ((100, 100, 300, 300),))], 640, 480)
    r = score(exact, smp, vocabulary=GT32)
    # written (103.33, 102.5, 303.33, 302.5): each corner snaps to the lower third of its step;
    # IoU = 196.67 * 197.5 / (2 * 200² - 196.67 * 197.5) = 0.94371
    assert r.kind == "box_iou" and r.unreadable == 0
    assert r.reward == pytest.approx((590 / 3 * 197.5) / (80000 - 590 / 3 * 197.5), rel=1e-9)
    # the same text read as bins is unreadable: each vocabulary reads only its own tokens
    assert score(exact, smp).unreadable == 1


# ---------------------------------------------------------------------------------------------
# ChatRex
# ---------------------------------------------------------------------------------------------
from rlsys.lang.vocab import ChatRex, chatrex_tokens, required_tokens, synthetic_proposals  # noqa: E402

PROPS = [(10, 10, 50, 50), (100, 20, 150, 80), (0, 0, 20, 20)]


def _cr_sample(instances, proposals=PROPS, output="box", sid="s"):
    return Sample(
        sid, "img.png", 200, 100, "detection", ["cat", "dog"], list(instances), output, proposals=list(proposals)
    )


def test_chatrex_hand_worked_render_parse_and_question():
    smp = _cr_sample([Instance("cat", box=(101, 20, 150, 79)), Instance("cat", box=(12, 11, 49, 52))])
    v = ChatRex().for_sample(smp)
    # each GT box is named by its best-IoU proposal; instances in index order, back to back
    text = v.render(
        [Prediction("cat", "box", ((101, 20, 150, 79), (12, 11, 49, 52))), Prediction("dog", "none", ())], 200, 100
    )
    assert text == (
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|><obj0><obj1><|box_end|>, "
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|>None<|box_end|>"
    )
    p = v.parse(text, 200, 100)
    assert (
        p.unreadable == 0
        and p[0].coords == ((10.0, 10.0, 50.0, 50.0), (100.0, 20.0, 150.0, 80.0))
        and p.written == [(0,), (1,)]
    )
    # the question lists the proposals in bins: x 10 / 200 * 999 = 49.95 -> 50, y 10 / 100 * 999 -> 100, ...
    assert v.question_hint("box").startswith(
        " Candidate boxes: <obj0>: <50><100><250><500>, <obj1>: <500><200><749><799>"
    )
    # the reward is the box IoU F1 of the chosen proposals' boxes
    from rewards.box import box_iou_f1

    want = box_iou_f1([PROPS[0], PROPS[1]], ["cat", "cat"], [(101, 20, 150, 79), (12, 11, 49, 52)], ["cat", "cat"]).f1
    assert score(text, smp, vocabulary=ChatRex()).reward == pytest.approx(want) and want > 0.8


def test_chatrex_refuses_what_it_cannot_read_or_write():
    smp = _cr_sample([Instance("cat", box=(12, 11, 49, 52))])
    v = ChatRex().for_sample(smp)
    for body, why in (
        ("<obj3>", "names no proposal (there are 3)"),
        ("<12><40><100><200>", "not one <objK> token"),
        ("<obj1> cat", "not one <objK> token"),
    ):
        bad = v.parse(_one(body), 200, 100)
        assert bad.unreadable == 1 and not list(bad) and why in bad.errors[0], bad.errors
    assert ChatRex().parse(_one("<obj0>"), 200, 100).unreadable == 1  # not bound to a sample's proposals
    with pytest.raises(ValueError, match="no proposal with IoU >= 0.5"):
        v.render([Prediction("cat", "box", ((150, 0, 200, 15),))], 200, 100)
    with pytest.raises(ValueError, match="no proposals"):
        ChatRex().for_sample(_cr_sample([], proposals=()))
    with pytest.raises(ValueError, match="boxes only"):
        ChatRex(proposal_source="synthetic").for_sample(_cr_sample([], output="point"))
    with pytest.raises(ValueError, match="more than the 2 index tokens"):
        ChatRex(max_proposals=2).for_sample(smp)
    with pytest.raises(ValueError, match="inside the 200x100 image"):
        ChatRex().for_proposals([(0, 0, 250, 50)], 200, 100)
    assert required_tokens("chatrex", chatrex_max_proposals=100)[-1] == "<obj99>" and len(chatrex_tokens(100)) == 100


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        st.text(),
        st.lists(
            st.sampled_from(
                [
                    "<obj0>",
                    "<obj2>",
                    "<obj99>",
                    "<obj-1>",
                    ",",
                    " ",
                    "<|box_start|>",
                    "<|box_end|>",
                    "<|object_ref_start|>cat<|object_ref_end|>",
                    "None",
                    "<5>",
                ]
            )
        ).map("".join),
        st.none(),
    )
)
def test_chatrex_garbage_never_raises(text):
    v = ChatRex().for_sample(_cr_sample([Instance("cat", box=(12, 11, 49, 52))]))
    p = v.parse(text, 200, 100)
    assert p.unreadable >= 0 and all(c in [tuple(map(float, b)) for b in PROPS] for q in p for c in q.coords)


def test_synthetic_proposals_cover_every_gt_box_and_are_reproducible():
    rng = random.Random(3)
    for k in range(50):
        insts = []
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.uniform(0, 150), rng.uniform(0, 70)
            insts.append(Instance("cat", box=(x0, y0, x0 + rng.uniform(5, 50), y0 + rng.uniform(5, 30))))
        smp = _cr_sample(insts, proposals=(), sid=f"s{k}")
        props = synthetic_proposals(smp, distractors=4)
        assert props == synthetic_proposals(smp, distractors=4) and len(props) == len(insts) + 4
        assert all(0 <= b[0] < b[2] <= 200 and 0 <= b[1] < b[3] <= 100 for b in props)
        from rewards.geometry import box_iou

        assert all(box_iou([i.box], props).max() >= 0.69 for i in insts)
        # and the SFT target of every such sample can be written
        v = ChatRex(proposal_source="synthetic", distractors=4).for_sample(smp)
        assert (
            v.parse(v.render([Prediction("cat", "box", tuple(i.box for i in insts))], 200, 100), 200, 100).unreadable
            == 0
        )


def test_proposals_merge_tool(tmp_path):
    from PIL import Image

    from rlsys.data.proposals import merge
    from rlsys.data.samples import DataError, load_jsonl

    for name in ("img.png", "other.png"):  # the merge checks each record's image and its size
        Image.new("RGB", (200, 100)).save(tmp_path / name)
    data = tmp_path / "d.jsonl"
    recs = [_cr_sample([Instance("cat", box=(12, 11, 49, 52))], proposals=(), sid=f"r{k}").to_dict() for k in range(2)]
    recs[1]["image"] = "other.png"
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    boxes = tmp_path / "b.jsonl"
    boxes.write_text(
        json.dumps({"image": "img.png", "boxes": [[10, 10, 50, 50]]})
        + "\n"
        + json.dumps({"id": "r1", "boxes": [[0, 0, 20, 20], [100, 20, 150, 80]]})
        + "\n"
    )
    assert merge(data, boxes, tmp_path / "out.jsonl") == 2
    got = load_jsonl(tmp_path / "out.jsonl")
    assert got[0].proposals == [(10.0, 10.0, 50.0, 50.0)] and got[1].proposals == [
        (0.0, 0.0, 20.0, 20.0),
        (100.0, 20.0, 150.0, 80.0),
    ]
    boxes.write_text(json.dumps({"image": "img.png", "boxes": [[10, 10, 50, 50]]}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2 \(id 'r1'\): .* no boxes for image 'other.png'"):
        merge(data, boxes, tmp_path / "out2.jsonl")
    boxes.write_text(
        json.dumps({"image": "img.png", "boxes": [[10, 10, 500, 50]]})
        + "\n"
        + json.dumps({"id": "r1", "boxes": []})
        + "\n"
    )
    with pytest.raises(DataError, match=r"proposals\[0\].*outside the 200x100 image"):
        merge(data, boxes, tmp_path / "out3.jsonl")
    assert not (tmp_path / "out2.jsonl").exists() and not (tmp_path / "out3.jsonl").exists()


def test_serve_binds_the_request_proposals_for_chatrex_only():
    from rlsys.serve.requests import DetectRequest, RequestError, bind_vocabulary, to_objects

    req = DetectRequest(
        image="x", task="detection", categories=["cat"], proposals=[[10, 10, 50, 50], [100, 20, 150, 80]]
    )
    v = bind_vocabulary(req, "box", 200, 100, ChatRex())
    objs, bad = to_objects(_one("<obj1>"), "detection", 200, 100, v)
    assert bad == 0 and objs == [{"phrase": "cat", "box": [100.0, 20.0, 150.0, 80.0]}]
    with pytest.raises(RequestError, match="needs 'proposals'"):
        bind_vocabulary(DetectRequest(image="x", task="detection", categories=["cat"]), "box", 200, 100, ChatRex())
    with pytest.raises(RequestError, match="applies only to a model trained with vocabulary chatrex"):
        bind_vocabulary(req, "box", 200, 100, REX_BINS)
    with pytest.raises(RequestError, match="not output 'point'"):
        bind_vocabulary(req, "point", 200, 100, ChatRex())
    bad_req = DetectRequest(image="x", task="detection", categories=["cat"], proposals=[[10, 10, 500, 50]])
    with pytest.raises(RequestError, match="inside the 200x100 image"):
        bind_vocabulary(bad_req, "box", 200, 100, ChatRex())


@pytest.mark.parametrize("voc", [QJ, GETok(16, False), GETok(32, True), REX_BINS, ChatRex()], ids=lambda v: v.name)
def test_leave_one_out_gain_reads_and_writes_every_vocabulary(voc):
    """rlsys.eval's leave_one_out re-renders the answer less one box in the model's vocabulary:
    the gain is the reward of the one-box answer it keeps best, less the two-box answer's."""
    from rewards.scorer import leave_one_out_gain

    insts = [Instance("cat", box=tuple(PROPS[0])), Instance("cat", box=tuple(PROPS[1]))]
    smp = _cr_sample(insts)
    v = voc.for_sample(smp)
    both = v.render([Prediction("cat", "box", (tuple(PROPS[0]), tuple(PROPS[2])))], 200, 100)
    kept = v.render([Prediction("cat", "box", (tuple(PROPS[0]),))], 200, 100)
    want = score(kept, smp, vocabulary=voc).reward - score(both, smp, vocabulary=voc).reward
    assert want > 0.1  # the box on the third proposal matches no cat
    assert leave_one_out_gain(both, smp, vocabulary=voc) == pytest.approx(want)
