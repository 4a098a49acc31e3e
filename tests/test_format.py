import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsys.lang.format import (
    KeypointInstance,
    Prediction,
    parse,
    parse_keypoints,
    render,
    render_keypoints,
)

PAPER_BOX = (
    "<|object_ref_start|>person<|object_ref_end|><|box_start|><12><42><512><612>,"
    "<24><66><172><623><|box_end|>, "
    "<|object_ref_start|>truck<|object_ref_end|><|box_start|>None<|box_end|>"
)


def test_paper_box_example():
    p = parse(PAPER_BOX)
    assert p.unreadable == 0
    assert p == [
        Prediction("person", "box", ((12, 42, 512, 612), (24, 66, 172, 623))),
        Prediction("truck", "none", ()),
    ]


def test_paper_point_and_polygon_examples():
    p = parse("<|object_ref_start|>button<|object_ref_end|><|box_start|><100><150>,<200><250><|box_end|>")
    assert p == [Prediction("button", "point", ((100, 150), (200, 250)))]
    p = parse("<|object_ref_start|>text<|object_ref_end|><|box_start|><10><20><30><20><30><40><10><40><|box_end|>")
    assert p == [Prediction("text", "polygon", ((10, 20, 30, 20, 30, 40, 10, 40),))]


def test_guide_example_and_im_end():
    text = (
        "<|object_ref_start|>person<|object_ref_end|><|box_start|><0><35><980><987>,<646><0><999><940><|box_end|>"
        "<|im_end|><|object_ref_start|>ignored<|object_ref_end|><|box_start|><1><2><|box_end|>"
    )
    p = parse(text)
    assert [x.phrase for x in p] == ["person"] and p.unreadable == 0
    assert p[0].coords == ((0, 35, 980, 987), (646, 0, 999, 940))


def test_unreadable_fragments_are_counted_not_dropped_silently():
    # odd coordinate count (3), a bin above 999, and a phrase truncated by the token limit
    text = (
        "<|object_ref_start|>a<|object_ref_end|><|box_start|><1><2><3>,<1><2><3><4><|box_end|>, "
        "<|object_ref_start|>b<|object_ref_end|><|box_start|><1000><2><|box_end|>, "
        "<|object_ref_start|>c<|object_ref_end|><|box_start|><5><6"
    )
    p = parse(text)
    assert p == [Prediction("a", "box", ((1, 2, 3, 4),))]
    assert p.unreadable == 3
    assert len(p.errors) == 3


def test_mixed_kinds_in_one_phrase_keep_every_instance():
    p = parse("<|object_ref_start|>x<|object_ref_end|><|box_start|><1><2><3><4>,<5><6>,<7><8><9><10><|box_end|>")
    assert p == [Prediction("x", "box", ((1, 2, 3, 4), (7, 8, 9, 10))), Prediction("x", "point", ((5, 6),))]


def test_non_string_and_empty():
    assert parse(None) == [] and parse(None).unreadable == 1
    assert parse("") == [] and parse("").unreadable == 0
    assert parse("hello").unreadable == 1


def test_render_rejects_bad_targets():
    with pytest.raises(ValueError, match="0..999"):
        render([Prediction("a", "box", ((1, 2, 3, 1000),))])
    with pytest.raises(ValueError, match="not a box"):
        render([Prediction("a", "box", ((1, 2),))])
    with pytest.raises(ValueError, match="special token"):
        render([Prediction("a<|box_end|>", "point", ((1, 2),))])
    with pytest.raises(ValueError, match="none"):
        render([Prediction("a", "none", ((1, 2),))])


phrase_st = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<>,"), min_size=1, max_size=20
).filter(lambda s: s.strip() == s and s.strip() != "")
bin_st = st.integers(0, 999)


@st.composite
def prediction_st(draw):
    kind = draw(st.sampled_from(["box", "point", "polygon", "none"]))
    phrase = draw(phrase_st)
    if kind == "none":
        return Prediction(phrase, "none", ())
    n = {"box": 4, "point": 2}.get(kind) or 2 * draw(st.integers(3, 8))
    insts = draw(st.lists(st.tuples(*[bin_st] * n), min_size=1, max_size=5))
    return Prediction(phrase, kind, tuple(insts))


@settings(max_examples=200, deadline=None)
@given(st.lists(prediction_st(), max_size=5))
def test_render_parse_round_trip(preds):
    p = parse(render(preds))
    assert p.unreadable == 0
    assert list(p) == preds


_PIECES = list("<>|,0123456789 aN") + [
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|im_end|>",
    "None",
    "<12>",
    "<1000>",
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=60).map("".join))
def test_garbage_never_raises(text):
    p = parse(text)
    assert p.unreadable >= 0
    for pred in p:
        assert pred.kind in ("box", "point", "polygon", "none")
        assert all(0 <= b <= 999 for inst in pred.coords for b in inst)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_arbitrary_unicode_never_raises(text):
    parse(text)
    parse_keypoints(text)


def test_keypoint_round_trip_and_paper_form():
    insts = [
        KeypointInstance("person1", (0, 123, 42, 256), {"left eye": (32, 43), "right eye": None}),
        KeypointInstance("person2", (51, 116, 72, 522), {"left eye": (342, 23)}),
    ]
    text = render_keypoints(insts)
    assert text.startswith('{"person1": {"box": <0><123><42><256>, "keypoints": {"left eye": <32><43>')
    got, bad = parse_keypoints(text)
    assert bad == 0 and got == insts
    got, bad = parse_keypoints('{"p": {"box": <1><2><3>, "keypoints": {}}}')
    assert got == [] and bad == 1
