"""The model's output language (Rex-Omni paper, section 2.3): render targets, parse answers.

One phrase is written as::

    <|object_ref_start|>PHRASE<|object_ref_end|><|box_start|>COORDS<|box_end|>

where COORDS is ``None`` for a phrase absent from the image, or instances joined by ``,``, each a
run of coordinate tokens: 2 make a point, 4 a box ``[x0, y0, x1, y1]``, 6 or more (even) a polygon.
A *mask* (GETok's: a mask written as a set of points, :mod:`rewards.mask`) is an instance of any
number of points; the text cannot tell it from a point, box or polygon, so a mask answer is read
as such only when masks were asked for (``parse(text, kind="mask")``), as keypoints are.
Several phrases are joined by ``", "``. Keypoints use a JSON-like form with coordinate tokens in
place of numbers (:func:`render_keypoints` / :func:`parse_keypoints`).

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


def _parse_coords(phrase: str, body: str, out: list, errors: list[str], read=read_bins, kind: str | None = None) -> int:
    """Parse one COORDS body into ``out``; return the number of unreadable instances. ``kind``:
    every instance is one (``"mask"``: any number of points), else each is what its count says."""
    body = body.strip()
    if body == NONE_TEXT:
        out.append(Prediction(phrase, "none", ()))
        return 0
    bad = 0
    by_kind: dict[str, list[tuple[int, ...]]] = {}
    for raw in body.split(","):
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
    return bad


def parse(text, read=read_bins, kind: str | None = None) -> Parsed:
    """Read a model answer into predictions. Text after ``<|im_end|>`` is ignored. ``read``
    turns one instance's text into its values or raises ``ValueError`` (the bins by default).
    ``kind="mask"`` reads every instance as a mask (a set of points: the question asked for
    masks); by default an instance's value count says its kind.

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
            gap = text[pos : m.start()]
            if gap.strip(" ,\n\t"):
                unreadable += 1
                _note(errors, f"stray text {gap.strip()[:40]!r}")
            pos = m.end()
            phrase = m.group(1).strip()
            if not phrase or any(tok in phrase for tok in SPECIAL_TOKENS):
                unreadable += 1
                _note(errors, f"bad phrase {m.group(1)[:40]!r}")
                continue
            unreadable += _parse_coords(phrase, m.group(2), preds, errors, read, kind)
        tail = text[pos:]
        if tail.strip(" ,\n\t"):
            # Most often a phrase cut off by the token limit.
            unreadable += 1
            _note(errors, f"unfinished or stray text at the end {tail.strip()[:40]!r}")
        return Parsed(preds, unreadable, errors)
    except Exception as exc:  # pragma: no cover - defensive: parse must never take a worker down
        return Parsed([], 1, [f"parser error: {exc!r}"])


# ---------------------------------------------------------------------------------------------
# Keypoints: {"person1": {"box": <x0><y0><x1><y1>, "keypoints": {"left eye": <x><y>, ...}}, ...}
# An invisible keypoint is written "unvisible", as in the released Rex-Omni data.
# ---------------------------------------------------------------------------------------------
INVISIBLE = "unvisible"


@dataclass(frozen=True)
class KeypointInstance:
    name: str
    box: tuple[int, int, int, int]
    keypoints: dict[str, tuple[int, int] | None] = field(default_factory=dict)


def render_keypoints(instances, write=render_instance) -> str:
    parts = []
    for inst in instances:
        if len(inst.box) != 4:
            raise ValueError(f"keypoint instance {inst.name!r}: box needs 4 bins, got {inst.box}")
        kps = []
        for kname, xy in inst.keypoints.items():
            if xy is None:
                kps.append(f"{json.dumps(kname)}: {json.dumps(INVISIBLE)}")
            else:
                if len(xy) != 2:
                    raise ValueError(f"keypoint {kname!r} of {inst.name!r}: needs 2 bins, got {xy}")
                kps.append(f"{json.dumps(kname)}: {write(xy)}")
        parts.append(f'{json.dumps(inst.name)}: {{"box": {write(inst.box)}, "keypoints": {{{", ".join(kps)}}}}}')
    return "{" + ", ".join(parts) + "}"


_KP_TOKEN = re.compile(r"((?:<\d+>)+)")


def parse_keypoints(text, read=read_bins, run=_KP_TOKEN) -> tuple[list[KeypointInstance], int]:
    """Parse the keypoint form; returns ``(instances, unreadable)``. Never raises. ``run``
    matches a run of coordinate tokens (quoted to make the text JSON), ``read`` reads one."""
    try:
        if not isinstance(text, str):
            return [], 1
        text = text.split(IM_END, 1)[0].strip()
        # Quote the coordinate runs so the text becomes JSON: <1><2> -> "<1><2>".
        data = json.loads(run.sub(lambda m: json.dumps(m.group(1)), text))
        if not isinstance(data, dict):
            return [], 1
    except Exception:
        return [], 1
    out, bad = [], 0
    for name, body in data.items():
        try:
            box = read(body["box"])
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
