"""Answers as the released Rex-Omni model writes or leaves them: answers cut by the token limit
(rlsys.lang.format.parse keeps the finished instances of a cut phrase, counts the cut) and
keypoints in the release's fenced JSON form (parse_keypoints reads both forms, render_keypoints
writes either)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rlsys.lang.format as F  # the module under test; swappable for a copy of an older one
from rewards.scorer import score
from rlsys.data.samples import Instance, Sample
from rlsys.lang.format import BOX_END, BOX_START, REF_END, REF_START, KeypointInstance, Prediction
from rlsys.lang.targets import answer_text, conversation
from rlsys.lang.vocab import REX_BINS, GETok, make_vocabulary

W, H = 640, 480

# ---------------------------------------------------------------------------------------------
# Random predictions and where each instance of their rendered text is finished
# ---------------------------------------------------------------------------------------------
BIN = st.integers(0, 999)
PHRASE = st.text("abcdefgh xyz", min_size=1, max_size=8).map(str.strip).filter(bool)


@st.composite
def predictions(draw):
    preds = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["box", "box", "point", "polygon", "none"]))
        if kind == "none":
            preds.append(Prediction(draw(PHRASE), "none", ()))
            continue
        n = {"box": st.just(4), "point": st.just(2), "polygon": st.integers(3, 6).map(lambda k: 2 * k)}[kind]
        insts = draw(st.lists(n.flatmap(lambda k: st.tuples(*[BIN] * k)), min_size=1, max_size=5))
        preds.append(Prediction(draw(PHRASE), kind, tuple(insts)))
    return preds


def layout(preds):
    """``(text, instances, segments)``: the rendered answer; each instance as ``(end, phrase,
    kind, coords, k)``, ``end`` the offset just past the ``,`` or ``<|box_end|>`` that finishes
    it, ``k`` its phrase's index (a ``None`` answer is one instance, coords None); each phrase's
    ``(start, end)`` span."""
    text, instances, segments = "", [], []
    for k, p in enumerate(preds):
        if k:
            text += ", "
        start = len(text)
        text += f"{REF_START}{p.phrase}{REF_END}{BOX_START}"
        bodies = [F.NONE_TEXT] if p.kind == "none" else [F.render_instance(c) for c in p.coords]
        for i, body in enumerate(bodies):
            text += body + ("," if i < len(bodies) - 1 else BOX_END)
            instances.append((len(text), p.phrase, p.kind, None if p.kind == "none" else p.coords[i], k))
        segments.append((start, len(text)))
    assert text == F.render(preds)  # the layout is the renderer's
    return text, instances, segments


def flat(parsed):
    """A parse as ``[(phrase, kind, coords)]`` in reading order (one kind per phrase here)."""
    out = []
    for p in parsed:
        out += [(p.phrase, "none", None)] if p.kind == "none" else [(p.phrase, p.kind, c) for c in p.coords]
    return out


def cut_inside_a_phrase(n, segments) -> bool:
    """The prefix of length ``n`` ends inside a phrase (after its first character, before the
    end of its ``<|box_end|>``): the answer was cut there."""
    return any(s < n < e for s, e in segments)


# ---------------------------------------------------------------------------------------------
# Truncated answers
# ---------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(predictions())
def test_every_prefix_keeps_exactly_the_finished_instances(preds):
    text, instances, segments = layout(preds)
    full = F.parse(text)
    assert full.unreadable == 0 and flat(full) == [(ph, k, c) for _, ph, k, c, _ in instances]
    for n in range(len(text)):
        got = F.parse(text[:n])  # never raises
        want = [(ph, k, c) for end, ph, k, c, _ in instances if end <= n]
        assert flat(got) == want, (n, text[:n], got.errors)
        # one unreadable for the cut when it falls inside a phrase; a prefix that ends between
        # phrases reads as a shorter, whole answer
        assert got.unreadable == (1 if cut_inside_a_phrase(n, segments) else 0), (n, text[:n], got.errors)


@settings(max_examples=100, deadline=None)
@given(predictions(), st.data())
def test_a_cut_within_an_instance_list_keeps_the_phrases_earlier_instances(preds, data):
    text, instances, segments = layout(preds)
    # cut inside an instance that is not its phrase's first
    multi = [i for i in range(1, len(instances)) if instances[i][4] == instances[i - 1][4]]
    if not multi:
        return
    i = data.draw(st.sampled_from(multi))
    prev_end, end = instances[i - 1][0], instances[i][0]
    n = data.draw(st.integers(prev_end, end - 1))
    got = F.parse(text[:n])
    assert flat(got) == [(ph, k, c) for _, ph, k, c, _ in instances[:i]]
    assert got.unreadable == 1 and "cut off" in got.errors[-1]


def _dense(n_boxes=40):
    boxes = tuple((10 * k % 990, 5 * k % 990, 10 * k % 990 + 9, 5 * k % 990 + 9) for k in range(n_boxes))
    return boxes, F.render([Prediction("person", "box", boxes)])


def test_dense_single_phrase_cut_in_its_box_list_keeps_the_finished_boxes():
    boxes, text = _dense()
    # cut by the token limit after 2 tokens of box 31: 30 boxes are finished
    cut = text[: text.index(F.render_instance(boxes[30]))] + "<300><150>"
    got = F.parse(cut)
    assert got == [Prediction("person", "box", boxes[:30])]  # before this rule: [] (0 boxes)
    assert got.unreadable == 1
    # the cut box's first 2 tokens are not read as a point (the release reads them as one)
    assert all(p.kind == "box" for p in got)
    # the same through the default vocabulary, in pixels, and through the reward: the 30 boxes
    # count (recall 30/40) and the cut counts as one wrong prediction
    px = REX_BINS.parse(cut, 999, 999)
    assert len(px[0].coords) == 30 and px.unreadable == 1 and px.answered
    smp = Sample("d", "img.png", 999, 999, "detection", ["person"], [Instance("person", box=b) for b in boxes])
    r = score(cut, smp)
    assert (r.num_pred, r.num_gt, r.unreadable) == (31, 40, 1) and r.reward > 0.5


def test_hand_worked_cuts():
    a = f"{REF_START}cat{REF_END}{BOX_START}<1><2><3><4>{BOX_END}, "
    cases = {
        # inside the phrase text or before <|box_start|>: one unreadable fragment
        f"{a}{REF_START}do": ([("cat", "box", (1, 2, 3, 4))], 1),
        f"{a}{REF_START}dog{REF_END}": ([("cat", "box", (1, 2, 3, 4))], 1),
        # right after <|box_start|>, right after a ",": nothing cut mid-instance, but the phrase is
        f"{a}{REF_START}dog{REF_END}{BOX_START}": ([("cat", "box", (1, 2, 3, 4))], 1),
        f"{a}{REF_START}dog{REF_END}{BOX_START}<5><6>,": ([("cat", "box", (1, 2, 3, 4)), ("dog", "point", (5, 6))], 1),
        # a box cut after 2 of its 4 tokens is not a point; 'None' without <|box_end|> is cut
        f"{a}{REF_START}dog{REF_END}{BOX_START}<5><6>,<7><8>": (
            [("cat", "box", (1, 2, 3, 4)), ("dog", "point", (5, 6))],
            1,
        ),
        f"{a}{REF_START}dog{REF_END}{BOX_START}None": ([("cat", "box", (1, 2, 3, 4))], 1),
        # finished instances of the cut phrase are read as in a closed phrase: a bad one counts
        f"{REF_START}dog{REF_END}{BOX_START}<5><6><7>,<1000><1>,<5><6><7><8>,<9": ([("dog", "box", (5, 6, 7, 8))], 3),
        # stray text before the cut phrase counts too
        f"{a}hmm {REF_START}dog{REF_END}{BOX_START}<5><6>,<7": (
            [("cat", "box", (1, 2, 3, 4)), ("dog", "point", (5, 6))],
            2,
        ),
        # an unclosed phrase before <|im_end|> reads the same (the stop token is usually stripped)
        f"{REF_START}dog{REF_END}{BOX_START}<5><6>,<7><8><|im_end|>": ([("dog", "point", (5, 6))], 1),
        # a closed answer is read whole
        a.rstrip(", "): ([("cat", "box", (1, 2, 3, 4))], 0),
    }
    for text, (want, bad) in cases.items():
        got = F.parse(text)
        assert (flat(got), got.unreadable) == (want, bad), (text, got.errors)


def instance_ends(text):
    """Where each instance of a rendered answer is finished: just past its ``,`` or ``<|box_end|>``
    (``None`` answers hold none)."""
    ends = []
    for m in F._SEGMENT.finditer(text):
        if m.group(2) != F.NONE_TEXT:
            ends += [m.start(2) + i + 1 for i, ch in enumerate(m.group(2)) if ch == ","] + [m.end()]
    return ends


def _tokens(text):
    return re.findall(r"<\|[a-z_]+\|>|<[^<>|]+>|.", text, re.S)


@pytest.mark.parametrize("v", [REX_BINS, GETok(32), GETok(8, offsets=False)], ids=["rex_bins", "getok32", "getok8"])
def test_vocabularies_keep_the_finished_instances_of_every_token_prefix(v):
    """Cut at every token, as the token limit cuts: each vocabulary that reads through
    :func:`parse` keeps the instances finished before the cut, in pixels as the full parse."""
    preds = [
        Prediction("cat", "box", ((10, 20, 300, 400), (320, 30, 600, 470), (5, 5, 60, 60))),
        Prediction("dog", "none", ()),
        Prediction("cup", "point", ((50, 60), (500, 400))),
    ]
    text = v.render(preds, W, H)
    full = [(p.phrase, c) for p in v.parse(text, W, H) for c in p.coords]
    toks = _tokens(text)
    ends = instance_ends(text)
    assert "".join(toks) == text and len(full) == len(ends) == 5
    for k in range(len(toks)):
        prefix = "".join(toks[:k])
        got = v.parse(prefix, W, H)
        finished = sum(1 for end in ends if end <= len(prefix))
        assert [(p.phrase, c) for p in got for c in p.coords] == full[:finished], prefix
        inside = prefix.count(REF_START) > prefix.count(BOX_END)
        assert got.unreadable == int(inside), (prefix, got.errors)


def test_chatrex_keeps_the_last_index_token_of_a_cut_answer():
    """ChatRex's instances are single tokens ``<objK>``: a cut answer ending on one ends after a
    whole instance, which is kept; the cut still counts."""
    v = make_vocabulary("chatrex").for_proposals([(0, 0, 10, 10), (20, 20, 40, 40), (50, 50, 60, 60)], 100, 100)
    text = v.render([Prediction("a", "box", ((0, 0, 10, 10), (20, 20, 40, 40), (50, 50, 60, 60)))], 100, 100)
    assert text.endswith("<obj0><obj1><obj2><|box_end|>")
    for k, want in ((0, 3), (len(BOX_END), 3), (len(BOX_END) + len("<obj2>"), 2), (len(BOX_END) + 12, 1)):
        got = v.parse(text[: len(text) - k], 100, 100)
        assert (sum(len(p.coords) for p in got), got.unreadable) == (want, int(k > 0)), k


# ---------------------------------------------------------------------------------------------
# Keypoints: the paper's form and the release's
# ---------------------------------------------------------------------------------------------
# The release's form, as rex_omni/parser.py (parse_keypoint_prediction) documents and reads it
RELEASE_EXAMPLE = """```json
{
    "person1": {
        "bbox": " <1> <36> <987> <984> ",
        "keypoints": {
            "nose": " <540> <351> ",
            "left eye": " <559> <316> ",
            "right eye": "unvisible"
        }
    }
}
```"""
EXAMPLE = KeypointInstance(
    "person1", (1, 36, 987, 984), {"nose": (540, 351), "left eye": (559, 316), "right eye": None}
)


def test_release_keypoint_form_is_written_and_read():
    assert F.render_keypoints([EXAMPLE], style="rex_release") == RELEASE_EXAMPLE
    assert F.parse_keypoints(RELEASE_EXAMPLE) == ([EXAMPLE], 0)
    assert F.parse_keypoints(RELEASE_EXAMPLE + "<|im_end|>") == ([EXAMPLE], 0)
    # the paper's form, unchanged
    paper = F.render_keypoints([EXAMPLE])
    assert paper.startswith('{"person1": {"box": <1><36><987><984>, "keypoints": {"nose": <540><351>')
    assert F.parse_keypoints(paper) == ([EXAMPLE], 0)
    # text around the fence counts; a cut (no closing fence) reads nothing and counts
    assert F.parse_keypoints("Here you go:\n" + RELEASE_EXAMPLE) == ([EXAMPLE], 1)
    assert F.parse_keypoints(RELEASE_EXAMPLE[:-20]) == ([], 1)
    # one bad keypoint and one bad box count, the rest is read
    bad = RELEASE_EXAMPLE.replace('" <559> <316> "', '" <559> "').replace(
        "}\n}", '},\n"p2": {"bbox": " <1> ", "keypoints": {}}\n}'
    )
    insts, n = F.parse_keypoints(bad)
    assert n == 2 and insts == [KeypointInstance("person1", EXAMPLE.box, {"nose": (540, 351), "right eye": None})]
    with pytest.raises(ValueError, match="style"):
        F.render_keypoints([EXAMPLE], style="json")
    with pytest.raises(ValueError, match="twice"):
        F.render_keypoints([EXAMPLE, EXAMPLE], style="rex_release")


KP_NAME = st.sampled_from(["nose", "left eye", "right eye", "left wrist", "tail", 'a "quoted" one', "é"])
XY = st.one_of(st.none(), st.tuples(BIN, BIN))


@st.composite
def keypoint_instances(draw):
    names = draw(st.lists(st.text("abcxyz 12", min_size=1, max_size=6), min_size=0, max_size=4, unique=True))
    return [
        KeypointInstance(name, draw(st.tuples(BIN, BIN, BIN, BIN)), draw(st.dictionaries(KP_NAME, XY, max_size=5)))
        for name in names
    ]


@settings(max_examples=150, deadline=None)
@given(keypoint_instances(), st.sampled_from(["paper", "rex_release"]))
def test_keypoints_round_trip_in_both_forms(insts, style):
    text = F.render_keypoints(insts, style=style)
    assert F.parse_keypoints(text) == (insts, 0)
    if style == "rex_release":
        assert text.startswith("```json\n{") and text.endswith("}\n```")
        for inst in insts:  # every run a quoted string with a space around each token
            assert f'"bbox": " {" ".join(f"<{b}>" for b in inst.box)} "' in text


def test_vocabularies_read_release_keypoints():
    w, h = 640, 480
    px = [KeypointInstance("person1", (64.0, 48.0, 320.0, 400.0), {"nose": (200.0, 100.0), "left eye": None})]
    for v in (REX_BINS, GETok(32)):
        want = v.parse_keypoints(v.render_keypoints(px, w, h), w, h)
        if v is REX_BINS:
            release = answer_text(_kp_sample(), keypoint_style="rex_release")
        else:
            release = F.render_keypoints(px, lambda c: v.write(c, w, h), style="rex_release")
            assert '"bbox": " <grid' in release
        got = v.parse_keypoints(release, w, h)
        assert got[1] == 0 and got[0] == want[0], v.name


def _kp_sample():
    return Sample(
        "k",
        "img.png",
        640,
        480,
        "keypoint",
        ["person"],
        [Instance("person", box=(64, 48, 320, 400), keypoints={"nose": (200, 100, 2), "left eye": (0, 0, 0)})],
        "keypoint",
    )


def test_sft_targets_in_the_release_keypoint_form():
    smp = _kp_sample()
    text = answer_text(smp, keypoint_style="rex_release")
    assert text.startswith("```json\n") and '"bbox": " <' in text and '"left eye": "unvisible"' in text
    assert json.loads(text[len("```json\n") : -len("\n```")])["person1"]["keypoints"]["left eye"] == "unvisible"
    paper = answer_text(smp)
    assert paper.startswith('{"person1": {"box": <')
    assert F.parse_keypoints(text) == F.parse_keypoints(paper) and F.parse_keypoints(text)[1] == 0
    # the reward reads either form alike
    assert score(text, smp).reward == pytest.approx(score(paper, smp).reward)
    assert conversation(smp, keypoint_style="rex_release")[2] == text
    with pytest.raises(ValueError, match="keypoint style"):
        answer_text(smp, keypoint_style="release")
    with pytest.raises(ValueError, match="rex_release writes Rex-Omni's bins"):
        answer_text(smp, GETok(32), keypoint_style="rex_release")


def test_config_option():
    from rlsys.config import REPO_ROOT, ConfigError, SFTConfig, load_config

    path = REPO_ROOT / "configs" / "sft_tiny_cpu.yaml"
    assert load_config(path, schema=SFTConfig).data.keypoint_style == "paper"
    assert load_config(path, ["data.keypoint_style=rex_release"], schema=SFTConfig).data.keypoint_style == "rex_release"
    with pytest.raises(ConfigError, match="keypoint_style"):
        load_config(path, ["data.keypoint_style=json"], schema=SFTConfig)


def test_release_keypoint_targets_need_the_bins_at_config_load():
    from rlsys.config import ConfigError, SFTConfig, load_config

    with pytest.raises(ConfigError, match="keypoint_style rex_release .* model.vocabulary getok writes no bins"):
        load_config(
            Path(__file__).resolve().parent.parent / "configs" / "sft_tiny_cpu.yaml",
            ["data.keypoint_style=rex_release", "model.vocabulary=getok"],
            schema=SFTConfig,
        )
