"""The model's output language (Rex-Omni paper, section 2.3): render targets, parse answers.

One phrase is written as::

    <|object_ref_start|>PHRASE<|object_ref_end|><|box_start|>COORDS<|box_end|>

where COORDS is ``None`` for a phrase absent from the image, or instances joined by ``,``, each a
run of coordinate tokens: 2 make a point, 4 a box ``[x0, y0, x1, y1]``, 6 or more (even) a polygon.
A *mask* (GETok's: a mask written as a set of points, :mod:`rewards.mask`) is an instance of any
number of points; the text cannot tell it from a point, box or polygon, so a mask answer is read
as such only when masks were asked for (``parse(text, kind="mask")``), as keypoints are.
Several phrases are joined by ``", "``. Keypoints use a JSON-like form with coordinate tokens in
place of numbers, the paper's or the released model's (:func:`render_keypoints` /
:func:`parse_keypoints`).

:func:`parse` is what rewards, evaluation and Serve read model text with. It must never raise:
a policy under RL writes anything, and one exception would kill a reward worker. Whatever it
cannot read it counts in :attr:`Parsed.unreadable` (reported as a reward part), never drops
silently. Coordinates stay in bins here; :mod:`rlsys.lang.coords` turns them into pixels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from rlsys.lang.coords import MAX_BIN

REF_START = "<|object_ref_start|>"
REF_END = "<|object_ref_end|>"
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"
IM_END = "<|im_end|>"
NONE_TEXT = "None"
SPECIAL_TOKENS = (REF_START, REF_END, BOX_START, BOX_END, IM_END)

Kind = Literal["box", "point", "polygon", "mask", "none"]
KINDS: tuple[str, ...] = ("box", "point", "polygon", "mask", "none")


@dataclass(frozen=True)
class Prediction:
    """One phrase's answer: its instances of one kind, each a tuple of bins (x, y interleaved)."""

    phrase: str
    kind: Kind
    coords: tuple[tuple[int, ...], ...] = ()


class Parsed(list):
    """``list[Prediction]`` plus what could not be read.

    ``unreadable`` counts fragments that were skipped (a truncated phrase, an instance with an odd
    number of coordinates, a bin above 999, stray text); ``errors`` says why, for the first few.
    """

    def __init__(self, preds=(), unreadable: int = 0, errors: list[str] | None = None):
        super().__init__(preds)
        self.unreadable = unreadable
        self.errors = errors or []


def check_kind(values, kind: str) -> None:
    """Raise ``ValueError`` unless ``values`` (one instance) can be a ``kind``: a mask is any
    number >= 1 of (x, y) points, the others as :func:`kind_of` says."""
    n = len(values)
    ok = n >= 2 and n % 2 == 0 if kind == "mask" else kind_of(n) == kind
    if not ok:
        raise ValueError(f"instance {tuple(values)} has {n} values, not a {kind}")


def kind_of(num_values: int) -> Kind:
    """The kind an instance of ``num_values`` coordinates is: 2 point, 4 box, even >= 6 polygon."""
    if num_values == 2:
        return "point"
    if num_values == 4:
        return "box"
    if num_values >= 6 and num_values % 2 == 0:
        return "polygon"
    raise ValueError(f"an instance needs 2, 4 or an even number >= 6 of coordinates, got {num_values}")


# ---------------------------------------------------------------------------------------------
# Rendering (training targets). Callers' mistakes raise: a bad target must not reach SFT.
# ---------------------------------------------------------------------------------------------
def _check_phrase(phrase: str) -> None:
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError(f"phrase must be a non-empty string, got {phrase!r}")
    for tok in SPECIAL_TOKENS:
        if tok in phrase:
            raise ValueError(f"phrase {phrase!r} contains the special token {tok}")
    if re.search(r"<\d+>", phrase):
        raise ValueError(f"phrase {phrase!r} contains a coordinate token")


# A token the tokenizer treats as added is refused in a phrase when it is markup, not text: every
# special token, and every added token written as <...> (coordinate bins <0>..<999>, <tool_call>,
# <|image_pad|>, a vocabulary's grid or index tokens). HF tokenizers cut added tokens out of the
# text by exact match before BPE, so a phrase containing one would put that control token into
# the prompt (a second image slot, a forged turn, an end of text). Text that only looks similar
# (``< 5 >``, ``<|image pad|>``, ``<b>`` when no such token exists) matches nothing and passes.
# An added token that is plain text (a word added to the vocabulary) stays allowed.
_MARKUP = re.compile(r"^<.+>$", re.S)


def control_tokens(tokenizer) -> frozenset[str]:
    """The contents a phrase may not contain, read from ``tokenizer``: its special tokens and
    its added tokens that are markup (see the rule above)."""
    out = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        content = getattr(tok, "content", str(tok))
        if getattr(tok, "special", False) or _MARKUP.match(content):
            out.add(content)
    return frozenset(t for t in out if t)


def find_control_token(phrase: str, tokens: frozenset[str]) -> str | None:
    """The first (leftmost, then longest) of ``tokens`` inside ``phrase``, or None."""
    best = None
    for t in tokens:
        i = phrase.find(t)
        if i >= 0 and (best is None or (i, -len(t)) < (best[0], -len(best[1]))):
            best = (i, t)
    return None if best is None else best[1]


def check_phrase_tokens(phrase: str, tokens: frozenset[str], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the token when ``phrase`` contains one of ``tokens``."""
    tok = find_control_token(phrase, tokens)
    if tok is not None:
        raise ValueError(
            f"{where}: {phrase[:80]!r} contains the tokenizer's control token {tok} (phrases are plain text)"
        )


def check_sample_phrases(samples, tokenizer) -> None:
    """Every phrase, instance phrase and keypoint name of ``samples`` is plain text for
    ``tokenizer``; the first that is not raises, naming the record's source, id and field."""
    tokens = control_tokens(tokenizer)
    for s in samples:
        where = f"{getattr(s, 'source', '<memory>')} (sample {s.id!r})"
        for i, ph in enumerate(s.phrases):
            check_phrase_tokens(ph, tokens, f"{where} field phrases[{i}]")
        for i, inst in enumerate(s.instances):
            check_phrase_tokens(inst.phrase, tokens, f"{where} field instances[{i}].phrase")
            for name in inst.keypoints or {}:
                check_phrase_tokens(name, tokens, f"{where} field instances[{i}].keypoints name")


def render_instance(bins) -> str:
    """``(12, 42, 512, 612)`` -> ``"<12><42><512><612>"`` (bins must be ints in 0..999)."""
    out = []
    for b in bins:
        if isinstance(b, bool) or int(b) != b or not 0 <= int(b) <= MAX_BIN:
            raise ValueError(f"coordinate bin {b!r} is not an integer in 0..{MAX_BIN}")
        out.append(f"<{int(b)}>")
    return "".join(out)


def render_prediction(pred: Prediction, write=render_instance) -> str:
    """One phrase in the markup; ``write`` turns one instance's values into its tokens (the
    bins by default; a vocabulary with other coordinate tokens passes its own)."""
    _check_phrase(pred.phrase)
    if pred.kind == "none":
        if pred.coords:
            raise ValueError(f"phrase {pred.phrase!r}: kind 'none' cannot carry coordinates")
        body = NONE_TEXT
    else:
        if pred.kind not in KINDS:
            raise ValueError(f"phrase {pred.phrase!r}: unknown kind {pred.kind!r}")
        if not pred.coords:
            raise ValueError(
                f"phrase {pred.phrase!r}: kind {pred.kind!r} needs at least one instance (use kind 'none')"
            )
        for inst in pred.coords:
            try:
                check_kind(inst, pred.kind)
            except ValueError as exc:
                raise ValueError(f"phrase {pred.phrase!r}: {exc}") from None
        body = ",".join(write(inst) for inst in pred.coords)
    return f"{REF_START}{pred.phrase.strip()}{REF_END}{BOX_START}{body}{BOX_END}"


def render(preds, write=render_instance) -> str:
    """Render predictions as the model should write them; phrases joined by ``", "``."""
    return ", ".join(render_prediction(p, write) for p in preds)


def sort_boxes(instances):
    """Order instances by x0 then y0, as the paper's targets are (section 2.3)."""
    return tuple(sorted((tuple(i) for i in instances), key=lambda c: (c[0], c[1])))


# ---------------------------------------------------------------------------------------------
# Parsing (model answers). Never raises.
# ---------------------------------------------------------------------------------------------
_SEGMENT = re.compile(
    re.escape(REF_START)
    + r"(.*?)"
    + re.escape(REF_END)
    + r"\s*"
    + re.escape(BOX_START)
    + r"(.*?)"
    + re.escape(BOX_END),
    re.DOTALL,
)
_INSTANCE = re.compile(r"\s*(?:<\d+>\s*)+")
_BIN = re.compile(r"<(\d+)>")
_MAX_ERRORS = 8


def _note(errors: list[str], msg: str) -> None:
    if len(errors) < _MAX_ERRORS:
        errors.append(msg)


def read_bins(raw: str) -> tuple[int, ...]:
    """One instance's text -> its bins; raises ``ValueError`` saying why it is unreadable."""
    if not isinstance(raw, str) or not _INSTANCE.fullmatch(raw):
        raise ValueError(f"instance {str(raw)[:40]!r} is not a run of coordinate tokens")
    values = tuple(int(v) for v in _BIN.findall(raw))
    if any(v > MAX_BIN for v in values):
        raise ValueError(f"bin above {MAX_BIN} in {raw[:40]!r}")
    return values


class Deleted(ValueError):
    """Raised by an instance reader for an instance the model withdrew (GETok's ``<DELETE>``):
    not written, so neither a prediction nor an unreadable fragment."""


def _parse_coords(
    phrase: str, body: str, out: list, errors: list[str], read=read_bins, kind: str | None = None, cut: bool = False
) -> int:
    """Parse one COORDS body into ``out``; return the number of unreadable instances. ``kind``:
    every instance is one (``"mask"``: any number of points), else each is what its count says.
    ``cut``: the body of a phrase cut off before its ``<|box_end|>`` (see :func:`parse`): its last
    instance, the one no ``,`` follows, is the cut one and counts 1 unreadable; the others are
    read as in a closed phrase."""
    body = body.strip()
    raws = body.split(",")
    last = raws.pop() if cut else None
    if not cut and body == NONE_TEXT:
        out.append(Prediction(phrase, "none", ()))
        return 0
    bad = 0
    by_kind: dict[str, list[tuple[int, ...]]] = {}
    for raw in raws:
        if not raw.strip():
            bad += 1
            _note(errors, f"{phrase!r}: empty instance")
            continue
        try:
            values = read(raw)
        except Deleted:
            continue
        except ValueError as exc:
            bad += 1
            _note(errors, f"{phrase!r}: {exc}")
            continue
        try:
            if kind is None:
                this = kind_of(len(values))
            else:
                check_kind(values, kind)
                this = kind
        except ValueError:
            bad += 1
            _note(errors, f"{phrase!r}: {len(values)} coordinates form no {kind or 'point, box or polygon'}")
            continue
        by_kind.setdefault(this, []).append(tuple(values))
    # A phrase whose instances mix kinds (a box and a point) becomes one Prediction per kind, in
    # order of first appearance: nothing the model wrote is lost, and each keeps a single kind.
    for kind, insts in by_kind.items():
        out.append(Prediction(phrase, kind, tuple(insts)))
    if last is not None:
        bad += 1
        _note(errors, f"{phrase!r}: cut off before {BOX_END}, last instance {last.strip()[:40]!r} not read")
    return bad


def parse(text, read=read_bins, kind: str | None = None) -> Parsed:
    """Read a model answer into predictions. Text after ``<|im_end|>`` is ignored. ``read``
    turns one instance's text into its values or raises ``ValueError`` (the bins by default).
    ``kind="mask"`` reads every instance as a mask (a set of points: the question asked for
    masks); by default an instance's value count says its kind.

    An answer cut off (by the token limit) inside its last phrase's instance list, i.e. ending
    ``<|object_ref_start|>P<|object_ref_end|><|box_start|>I1,I2,...,Ik`` with no ``<|box_end|>``,
    keeps every instance that a ``,`` closes (I1..Ik-1, read as in a closed phrase) and counts
    the last one, Ik, as 1 unreadable, whatever it holds, even nothing (the text ended right
    after a ``,`` or right after ``<|box_start|>``). Why not read Ik as well, as the Rex-Omni
    release does (it appends ``<|box_end|>`` and reads everything)? Nothing in the text says Ik
    is whole: a box cut after 2 of its 4 tokens reads as a point, a polygon cut after 6 of its
    8 values as a smaller polygon, a bin ``<512>`` cut to ``<51>``... so Ik is what the cut
    leaves, and counting it keeps the cut visible to the reward (a policy must not learn that
    running into the limit is free), 1 unreadable per cut answer as before this rule, while
    the finished instances stop being lost (a dense single-phrase answer cut by the limit used
    to read 0 boxes). The text cannot tell a cut by the limit from a model that stopped without
    ``<|box_end|>`` (the stop token is stripped), so both read this way; an answer whose last
    phrase is closed is read whole. A cut before ``<|box_start|>`` (inside the phrase, or
    between ``<|object_ref_end|>`` and ``<|box_start|>``) leaves no instance list: the rest
    counts as one unreadable fragment.

    Never raises: any input, including non-strings, yields a :class:`Parsed` (possibly empty)
    whose ``unreadable`` counts the fragments that could not be read.
    """
    errors: list[str] = []
    try:
        if not isinstance(text, str):
            return Parsed([], 1, [f"expected text, got {type(text).__name__}"])
        text = text.split(IM_END, 1)[0]
        preds: list[Prediction] = []
        unreadable = 0
        pos = 0
        for m in _SEGMENT.finditer(text):
            unreadable += _stray(text[pos : m.start()], errors, "stray text")
            pos = m.end()
            phrase = m.group(1).strip()
            if not _good_phrase(phrase):
                unreadable += 1
                _note(errors, f"bad phrase {m.group(1)[:40]!r}")
                continue
            unreadable += _parse_coords(phrase, m.group(2), preds, errors, read, kind)
        tail = text[pos:]
        start = tail.rfind(REF_START)
        cut = _CUT_PHRASE.match(tail, start) if start >= 0 else None
        if cut is None or not _good_phrase(cut.group(1).strip()):
            # text cut before its instance list, or stray text at the end
            unreadable += _stray(tail, errors, "unfinished or stray text at the end")
        else:
            unreadable += _stray(tail[:start], errors, "stray text")
            unreadable += _parse_coords(cut.group(1).strip(), cut.group(2), preds, errors, read, kind, cut=True)
        return Parsed(preds, unreadable, errors)
    except Exception as exc:  # pragma: no cover - defensive: parse must never take a worker down
        return Parsed([], 1, [f"parser error: {exc!r}"])


# The last phrase of an answer cut inside its instance list: no <|box_end|> follows (the closed
# phrases before it were read by _SEGMENT, and it starts at the tail's last <|object_ref_start|>).
_CUT_PHRASE = re.compile(
    re.escape(REF_START) + r"(.*?)" + re.escape(REF_END) + r"\s*" + re.escape(BOX_START) + r"(.*)\Z",
    re.DOTALL,
)


def _good_phrase(phrase: str) -> bool:
    return bool(phrase) and not any(tok in phrase for tok in SPECIAL_TOKENS)


def _stray(gap: str, errors: list[str], what: str) -> int:
    """1 (and a note) when ``gap``, text between or after phrases, holds more than separators."""
    if not gap.strip(" ,\n\t"):
        return 0
    _note(errors, f"{what} {gap.strip()[:40]!r}")
    return 1


# ---------------------------------------------------------------------------------------------
# Keypoints, in one of two forms (KEYPOINT_STYLES); parse_keypoints reads both.
#   paper (the paper's figure, section 2.3), coordinate runs unquoted:
#     {"person1": {"box": <x0><y0><x1><y1>, "keypoints": {"left eye": <x><y>, ...}}, ...}
#   rex_release (what the released Rex-Omni's keypoint parser reads, rex_omni/parser.py
#   parse_keypoint_prediction), a fenced JSON block, key "bbox", each run a quoted string
#   with a space before and after every token:
#     ```json
#     {
#         "person1": {
#             "bbox": " <1> <36> <987> <984> ",
#             "keypoints": {
#                 "nose": " <540> <351> ",
#                 "right eye": "unvisible"
# ...
#     ```
# An invisible keypoint is written "unvisible" in both, as in the released Rex-Omni data.
# ---------------------------------------------------------------------------------------------
INVISIBLE = "unvisible"
KEYPOINT_STYLES: tuple[str, ...] = ("paper", "rex_release")


@dataclass(frozen=True)
class KeypointInstance:
    name: str
    box: tuple[int, int, int, int]
    keypoints: dict[str, tuple[int, int] | None] = field(default_factory=dict)


_TOKEN = re.compile(r"<[^<>]+>")


def _spaced(tokens: str) -> str:
    """``"<12><40>"`` -> ``" <12> <40> "``, the release's way of writing a run of tokens."""
    parts = _TOKEN.findall(tokens)
    if not parts or "".join(parts) != tokens:
        raise ValueError(f"{tokens[:40]!r} is not a run of <...> tokens")
    return " " + " ".join(parts) + " "


def render_keypoints(instances, write=render_instance, style: str = "paper") -> str:
    """Keypoint instances as the model should write them, in ``style`` (:data:`KEYPOINT_STYLES`:
    ``"paper"``, the paper's unquoted form, or ``"rex_release"``, the released model's fenced
    JSON; see above). ``write`` turns one box's or point's values into its tokens."""
    if style not in KEYPOINT_STYLES:
        raise ValueError(f"keypoint style {style!r} is not one of {', '.join(KEYPOINT_STYLES)}")
    rows = []  # (name, box tokens, [(keypoint name, tokens or None)])
    for inst in instances:
        if len(inst.box) != 4:
            raise ValueError(f"keypoint instance {inst.name!r}: box needs 4 bins, got {inst.box}")
        kps = []
        for kname, xy in inst.keypoints.items():
            if xy is not None and len(xy) != 2:
                raise ValueError(f"keypoint {kname!r} of {inst.name!r}: needs 2 bins, got {xy}")
            kps.append((kname, None if xy is None else write(xy)))
        rows.append((inst.name, write(inst.box), kps))
    if style == "paper":
        parts = []
        for name, box, kps in rows:
            kp = ", ".join(f"{json.dumps(k)}: {json.dumps(INVISIBLE) if t is None else t}" for k, t in kps)
            parts.append(f'{json.dumps(name)}: {{"box": {box}, "keypoints": {{{kp}}}}}')
        return "{" + ", ".join(parts) + "}"
    obj: dict[str, dict] = {}
    for name, box, kps in rows:
        if name in obj:
            raise ValueError(f"keypoint instance name {name!r} written twice (JSON keeps one)")
        obj[name] = {"bbox": _spaced(box), "keypoints": {k: INVISIBLE if t is None else _spaced(t) for k, t in kps}}
    return "```json\n" + json.dumps(obj, indent=4, ensure_ascii=False) + "\n```"


_KP_TOKEN = re.compile(r"((?:<\d+>)+)")
_JSON_STRING = r'"(?:[^"\\]|\\.)*"'
_FENCE = re.compile(r"```(?:json)?(.*?)```", re.DOTALL)


def parse_keypoints(text, read=read_bins, run=_KP_TOKEN) -> tuple[list[KeypointInstance], int]:
    """Parse either keypoint form (see above); returns ``(instances, unreadable)``. Never
    raises. ``run`` matches a run of coordinate tokens (the paper form's bare runs are quoted
    to make the text JSON; runs inside JSON strings, the release's, are left as they are),
    ``read`` reads one run (spaces between tokens allowed). A fenced block is read when there
    is one (text around it counts 1 unreadable); the box is ``"box"`` or ``"bbox"``."""
    try:
        if not isinstance(text, str):
            return [], 1
        text = text.split(IM_END, 1)[0].strip()
        bad = 0
        fence = _FENCE.search(text)
        if fence is not None:
            if (text[: fence.start()] + text[fence.end() :]).strip():
                bad += 1
            text = fence.group(1).strip()
        # Quote the bare coordinate runs so the text becomes JSON: <1><2> -> "<1><2>".
        runs = re.compile(f"({_JSON_STRING})|(?:{run.pattern})")
        data = json.loads(runs.sub(lambda m: m.group(1) or json.dumps(m.group(0)), text))
        if not isinstance(data, dict):
            return [], 1
    except Exception:
        return [], 1
    out = []
    for name, body in data.items():
        try:
            box = read(body["bbox"] if "bbox" in body else body["box"])
            if len(box) != 4:
                raise ValueError("box")
            kps: dict[str, tuple[int, int] | None] = {}
            for kname, val in (body.get("keypoints") or {}).items():
                if val == INVISIBLE or val is None:
                    kps[kname] = None
                    continue
                try:
                    xy = read(val)
                except ValueError:
                    xy = ()
                if len(xy) != 2:
                    bad += 1
                    continue
                kps[kname] = xy  # type: ignore[assignment]
            out.append(KeypointInstance(str(name), box, kps))  # type: ignore[arg-type]
        except Exception:
            bad += 1
    return out, bad
