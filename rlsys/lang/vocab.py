"""Spatial vocabularies: the languages a model can write geometry in, behind one interface.

A vocabulary says how geometry becomes text and back. Everything else (the F1 rewards, the
metrics, Serve's JSON) works in the sample image's pixels, so a vocabulary only converts:

- ``render(preds, width, height)``: SFT targets. ``preds`` are :class:`rlsys.lang.format.Prediction`
  with coordinates in pixels of a ``width`` x ``height`` image; raises on a bad target.
- ``parse(text, width, height)``: a model answer -> :class:`rlsys.lang.format.Parsed` of
  predictions in pixels. Never raises; counts what it cannot read (``unreadable``) and says why
  (``errors``). ``answered`` is False when nothing readable was written at all (an empty answer
  is a format failure, not "nothing here").
  ``written`` holds each instance's coordinates as the model wrote them (bins, or the resized
  image's pixels), in reading order: the paper's duplicate test reads runs of written values.
- ``render_keypoints`` / ``parse_keypoints``: the same for keypoint instances (the list has
  ``written`` too: each instance's box as written).
- ``parse_masks(text, width, height)``: an answer to a mask question, each instance read as a
  mask written as a set of points (kind ``"mask"``; ``render`` writes such predictions). Only
  ``getok`` writes masks (:data:`MASK_VOCABULARIES`); the others refuse to render them and
  read every mask answer as unreadable.
- ``prompt_boxes(boxes, width, height)``: visual-prompt boxes written in the vocabulary, so the
  model reads boxes in the language it writes them.
- ``question_hint(output)``: wording appended to the task's question ("" for none).
- ``added_tokens()``: the tokens the vocabulary needs in the tokenizer (added to a base
  checkpoint by ``rlsys.data.prepare``; none for ``qwen_json``).
- ``for_sample(sample)`` / ``for_proposals(boxes, width, height)``: the vocabulary as it reads
  one sample (every caller binds it first). Only ``chatrex`` needs this, for its proposals; the
  others return themselves.

Chosen by ``model.vocabulary`` (:func:`make_vocabulary`):

``rex_bins`` (default): Rex-Omni's 1,000 quantised bins ``<0>``..``<999>`` in
:mod:`rlsys.lang.format`'s markup; bins are relative to the image, so the pixel budget does not enter.

``qwen_json``: what a base Qwen2.5-VL already answers for grounding: JSON in a code fence,
``[{"bbox_2d": [x0, y0, x1, y1], "label": "cat"}]`` (``point_2d`` for points; ``polygon`` as a
list of ``[x, y]`` for OCR outlines; keypoint instances add ``"keypoints": {"nose": [x, y] or
"unvisible"}``), integer coordinates in the pixels of the image *as the processor resized it*
(Qwen2.5-VL's grounding convention). The processor's resize is needed to map back:
:func:`resized_size` is its rule (sides rounded to multiples of 28, area kept in [min_pixels,
max_pixels]). A phrase absent from the image has no entry; ``[]`` is a readable answer (no
object). Parsing takes fenced or bare JSON, a single object for a list, and a list cut short
by the token limit (the objects before the cut are kept, the cut counts as unreadable).

``getok``: GETok's grid tokens ``<gridX_Y>`` with offsets ``<OFFdx_dy>`` and ``<DELETE>`` in the
markup of the bins (:class:`GETok`).

``chatrex``: ChatRex's indices ``<objK>`` into candidate boxes listed in the question
(:class:`ChatRex`).

Pure Python, no Ray, vLLM or torch; tested in ``tests/test_vocab.py``.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, replace

from rlsys.lang import coords
from rlsys.lang.format import (
    IM_END,
    INVISIBLE,
    Deleted,
    KeypointInstance,
    Parsed,
    Prediction,
    _check_phrase,
    _note,
    check_kind,
    kind_of,
    render_instance,
    sort_boxes,
)
from rlsys.lang.format import (
    parse as parse_bins,
)
from rlsys.lang.format import (
    parse_keypoints as parse_keypoint_bins,
)
from rlsys.lang.format import (
    render as render_bins,
)
from rlsys.lang.format import (
    render as render_markup,
)
from rlsys.lang.format import (
    render_keypoints as render_keypoint_bins,
)

VOCABULARIES = ("rex_bins", "qwen_json", "getok", "chatrex")
# The vocabularies that write masks (a set of grid points per mask, GETok section 3.2.1); a mask
# output asked of another is refused when the config and the data are checked.
MASK_VOCABULARIES = ("getok",)


def _no_masks(name: str) -> str:
    return (
        f"model.vocabulary {name} cannot write masks (output 'mask'): only "
        f"{', '.join(MASK_VOCABULARIES)} writes a mask, as a set of grid points"
    )


def check_writes_masks(vocabulary) -> None:
    """Raise ``ValueError`` naming ``vocabulary`` unless it writes masks (:data:`MASK_VOCABULARIES`)."""
    if vocabulary.name not in MASK_VOCABULARIES:
        raise ValueError(_no_masks(vocabulary.name))


def _refuse_masks(name: str, preds) -> None:
    if any(p.kind == "mask" for p in preds):
        raise ValueError(_no_masks(name))


def resized_size(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """``(width, height)`` of an image after Qwen2-VL's processor resize: each side rounded to a
    multiple of ``factor``, then scaled (keeping the aspect ratio) so the area lies in
    [min_pixels, max_pixels], sides floored (too large) or ceiled (too small) to the factor."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(width, height) / min(width, height) > 200:
        raise ValueError(f"image {width}x{height}: aspect ratio over 200, which the processor refuses")
    h = round(height / factor) * factor  # Python's round (half to even), as the processor's
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def _group(items: list[tuple[str, str, tuple]]) -> list[Prediction]:
    """(phrase, kind, coords) in reading order -> one Prediction per (phrase, kind), in order of
    first appearance (as :func:`rlsys.lang.format.parse` groups a phrase's instances)."""
    out: dict[tuple[str, str], list[tuple]] = {}
    for phrase, kind, c in items:
        out.setdefault((phrase, kind), []).append(c)
    return [Prediction(p, k, tuple(cs)) for (p, k), cs in out.items()]


def _parsed(preds, unreadable: int, errors: list[str], answered: bool, written) -> Parsed:
    p = Parsed(preds, unreadable, errors)
    p.answered, p.written = answered, [tuple(c) for c in written]
    return p


def _unread_masks(name: str) -> Parsed:
    """A mask answer read by a vocabulary that has no masks: one unreadable fragment, why."""
    return _parsed([], 1, [_no_masks(name)], False, [])


class _Instances(list):
    """Keypoint instances in pixels, with ``written``: each one's box as the model wrote it."""

    def __init__(self, items=(), written=()):
        super().__init__(items)
        self.written = [tuple(c) for c in written]


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RexBins:
    """Rex-Omni's coordinate bins (see :mod:`rlsys.lang.format` and :mod:`rlsys.lang.coords`)."""

    name: str = "rex_bins"

    def for_sample(self, sample):
        return self  # nothing per sample: the answer's geometry is self-contained

    def for_proposals(self, boxes, width: int, height: int):
        return self

    def added_tokens(self) -> tuple[str, ...]:
        return coords.COORD_TOKENS

    def _bins(self, c, width, height) -> tuple[int, ...]:
        return tuple(int(b) for b in coords.encode_xy(c, width, height))

    def render(self, preds, width: int, height: int) -> str:
        _refuse_masks(self.name, preds)
        out = []
        for p in preds:
            if p.kind == "none":
                out.append(p)
                continue
            # boxes sorted by x0 then y0 in bins, as the paper's targets are (section 2.3)
            out.append(Prediction(p.phrase, p.kind, sort_boxes(self._bins(c, width, height) for c in p.coords)))
        return render_bins(out)

    def parse(self, text, width: int, height: int) -> Parsed:
        b = parse_bins(text)
        preds = [
            Prediction(
                p.phrase, p.kind, tuple(tuple(float(v) for v in coords.decode_xy(c, width, height)) for c in p.coords)
            )
            for p in b
        ]
        return _parsed(preds, b.unreadable, b.errors, bool(b), [c for p in b for c in p.coords])

    def parse_masks(self, text, width: int, height: int) -> Parsed:
        return _unread_masks(self.name)

    def render_keypoints(self, instances, width: int, height: int) -> str:
        return render_keypoint_bins(
            [
                KeypointInstance(
                    i.name,
                    self._bins(i.box, width, height),
                    {k: None if v is None else self._bins(v, width, height) for k, v in i.keypoints.items()},
                )
                for i in instances
            ]
        )

    def parse_keypoints(self, text, width: int, height: int) -> tuple[list[KeypointInstance], int]:
        insts, bad = parse_keypoint_bins(text)

        def px(c):
            return tuple(float(v) for v in coords.decode_xy(c, width, height))

        return _Instances(
            [
                KeypointInstance(i.name, px(i.box), {k: None if v is None else px(v) for k, v in i.keypoints.items()})
                for i in insts
            ],
            [i.box for i in insts],
        ), bad

    def prompt_boxes(self, boxes, width: int, height: int) -> str:
        """``"<12><412><339><568>", ...`` (quoted coordinate-token strings)."""
        return ", ".join(f'"{render_instance(self._bins(b, width, height))}"' for b in boxes)

    def question_hint(self, output: str) -> str:
        return ""


# ---------------------------------------------------------------------------------------------
_JSON_KEY = {"box": "bbox_2d", "point": "point_2d", "polygon": "polygon"}
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?")


@dataclass(frozen=True)
class QwenJson:
    """Qwen2.5-VL's native grounding JSON, in pixels of the processor-resized image."""

    min_pixels: int
    max_pixels: int
    factor: int = 28
    name: str = "qwen_json"

    def for_sample(self, sample):
        return self  # nothing per sample: the answer's geometry is self-contained

    def for_proposals(self, boxes, width: int, height: int):
        return self

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"qwen_json: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    def added_tokens(self) -> tuple[str, ...]:
        return ()

    # pixels of the sample <-> pixels of the resized image the model sees
    def _scale(self, width, height) -> tuple[float, float, int, int]:
        rw, rh = resized_size(width, height, self.min_pixels, self.max_pixels, self.factor)
        return rw / width, rh / height, rw, rh

    def _to_model(self, c, width, height) -> list[int]:
        sx, sy, rw, rh = self._scale(width, height)
        out = []
        for k, v in enumerate(c):
            v = float(v)
            if math.isnan(v):
                raise ValueError(f"cannot render NaN coordinate in {tuple(c)}")
            lim, s = (rw, sx) if k % 2 == 0 else (rh, sy)
            out.append(int(min(max(round(v * s), 0), lim)))
        return out

    def _to_pixels(self, c, width, height) -> tuple[float, ...]:
        sx, sy, rw, rh = self._scale(width, height)
        return tuple(min(max(float(v), 0.0), lim) / s for v, (lim, s) in zip(c, [(rw, sx), (rh, sy)] * (len(c) // 2)))

    def _entry(self, kind, c, width, height) -> list:
        xy = self._to_model(c, width, height)
        if kind == "polygon":
            return [xy[i : i + 2] for i in range(0, len(xy), 2)]
        return xy

    def _dump(self, objs) -> str:
        return "```json\n" + json.dumps(objs, ensure_ascii=False) + "\n```"

    def render(self, preds, width: int, height: int) -> str:
        _refuse_masks(self.name, preds)
        objs = []
        for p in preds:
            _check_phrase(p.phrase)
            if p.kind == "none":
                if p.coords:
                    raise ValueError(f"phrase {p.phrase!r}: kind 'none' cannot carry coordinates")
                continue  # absent: no entry
            if p.kind not in _JSON_KEY:
                raise ValueError(f"phrase {p.phrase!r}: unknown kind {p.kind!r}")
            if not p.coords:
                raise ValueError(f"phrase {p.phrase!r}: kind {p.kind!r} needs at least one instance (use kind 'none')")
            entries = []
            for c in p.coords:
                if kind_of(len(c)) != p.kind:
                    raise ValueError(f"phrase {p.phrase!r}: instance {tuple(c)} has {len(c)} values, not a {p.kind}")
                entries.append(self._entry(p.kind, c, width, height))
            # left to right, then top to bottom, as the bins' targets are ordered
            for e in sorted(entries, key=lambda e: (e[0], e[1]) if p.kind != "polygon" else tuple(e[0])):
                objs.append({_JSON_KEY[p.kind]: e, "label": p.phrase.strip()})
        return self._dump(objs)

    # -- parsing -----------------------------------------------------------------------------
    def _objects(self, text, errors: list[str]) -> tuple[list, int, bool]:
        """The JSON objects of an answer: ``(objects, unreadable, answered)``. Never raises."""
        if not isinstance(text, str):
            return [], 1, False
        text = text.split(IM_END, 1)[0]
        bad = 0
        start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
        if start < 0:
            if text.strip():
                _note(errors, f"no JSON in {text.strip()[:40]!r}")
                return [], 1, False
            return [], 0, False
        before = _FENCE.sub("", text[:start]).strip()
        if before:
            bad += 1
            _note(errors, f"stray text {before[:40]!r}")
        dec = json.JSONDecoder()
        try:
            value, end = dec.raw_decode(text, start)
            rest = _FENCE.sub("", text[end:]).replace("`", "").strip()
            if rest:
                bad += 1
                _note(errors, f"stray text at the end {rest[:40]!r}")
            return (value if isinstance(value, list) else [value]), bad, True
        except ValueError:
            pass
        # Not one JSON value: most often a list cut off by the token limit. Keep each complete
        # object of it, then count the unfinished rest as one unreadable fragment.
        objs, pos = [], start + 1 if text[start] == "[" else start
        while True:
            while pos < len(text) and text[pos] in " \t\n\r,":
                pos += 1
            if pos >= len(text) or text[pos] == "`":
                bad += 1
                _note(errors, "the JSON list is not closed")
                break
            if text[pos] == "]":
                break
            try:
                value, pos = dec.raw_decode(text, pos)
            except ValueError:
                bad += 1
                _note(errors, f"unfinished or unreadable JSON {text[pos : pos + 40]!r}")
                break
            objs.append(value)
        return objs, bad, bool(objs) or bad == 0

    @staticmethod
    def _numbers(v, n: int | None = None) -> list[float] | None:
        if not isinstance(v, list) or (n is not None and len(v) != n):
            return None
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
            return None
        return [float(x) for x in v]

    def _geometry(self, obj) -> tuple[str, tuple[float, ...]] | str:
        """``(kind, flat coords in model pixels)`` of one object, or why it cannot be read."""
        if "bbox_2d" in obj:
            b = self._numbers(obj["bbox_2d"], 4)
            if b is None:
                return f"bbox_2d {str(obj['bbox_2d'])[:40]} is not 4 numbers"
            if b[2] < b[0] or b[3] < b[1] or min(b) < 0:
                return f"bbox_2d {b} is not [x0, y0, x1, y1] with x0 <= x1, y0 <= y1 and no negative value"
            return "box", tuple(b)
        if "point_2d" in obj:
            p = self._numbers(obj["point_2d"], 2)
            if p is None or min(p) < 0:
                return f"point_2d {str(obj['point_2d'])[:40]} is not 2 non-negative numbers"
            return "point", tuple(p)
        if "polygon" in obj:
            pts = obj["polygon"]
            flat = (
                [v for pt in pts for v in pt]
                if isinstance(pts, list) and all(isinstance(pt, list) and len(pt) == 2 for pt in pts)
                else None
            )
            flat = self._numbers(flat) if flat is not None else None
            if flat is None or len(flat) < 6 or min(flat) < 0:
                return f"polygon {str(pts)[:40]} is not 3 or more [x, y] points"
            return "polygon", tuple(flat)
        return f"object with keys {sorted(obj)[:4]} has no bbox_2d, point_2d or polygon"

    @staticmethod
    def _label(obj) -> str | None:
        label = obj.get("label")
        if not isinstance(label, str) or not label.strip():
            return None
        try:
            _check_phrase(label)
        except ValueError:
            return None
        return label.strip()

    def parse(self, text, width: int, height: int) -> Parsed:
        errors: list[str] = []
        try:
            objs, bad, answered = self._objects(text, errors)
            items, written = [], []
            for obj in objs:
                if not isinstance(obj, dict):
                    bad += 1
                    _note(errors, f"{str(obj)[:40]!r} is not an object")
                    continue
                label = self._label(obj)
                if label is None:
                    bad += 1
                    _note(errors, f"object {str(obj)[:40]!r} has no usable label")
                    continue
                g = self._geometry(obj)
                if isinstance(g, str):
                    bad += 1
                    _note(errors, f"{label!r}: {g}")
                    continue
                kind, c = g
                items.append((label, kind, self._to_pixels(c, width, height)))
                written.append(c)
            return _parsed(_group(items), bad, errors, answered, written)
        except Exception as exc:  # pragma: no cover - defensive: parse must never take a worker down
            return _parsed([], 1, [f"parser error: {exc!r}"], False, [])

    def parse_masks(self, text, width: int, height: int) -> Parsed:
        return _unread_masks(self.name)

    def render_keypoints(self, instances, width: int, height: int) -> str:
        objs = []
        for i in instances:
            if len(i.box) != 4:
                raise ValueError(f"keypoint instance {i.name!r}: box needs 4 values, got {i.box}")
            kps = {}
            for k, v in i.keypoints.items():
                if v is not None and len(v) != 2:
                    raise ValueError(f"keypoint {k!r} of {i.name!r}: needs 2 values, got {v}")
                kps[k] = INVISIBLE if v is None else self._to_model(v, width, height)
            objs.append({"bbox_2d": self._to_model(i.box, width, height), "label": i.name, "keypoints": kps})
        return self._dump(objs)

    def parse_keypoints(self, text, width: int, height: int) -> tuple[list[KeypointInstance], int]:
        errors: list[str] = []
        try:
            objs, bad, _ = self._objects(text, errors)
            out, written = [], []
            for obj in objs:
                label = self._label(obj) if isinstance(obj, dict) else None
                g = self._geometry(obj) if label is not None else "no label"
                if isinstance(g, str) or g[0] != "box":
                    bad += 1
                    continue
                kps, raw = {}, obj.get("keypoints") or {}
                if not isinstance(raw, dict):
                    bad += 1
                    continue
                for k, v in raw.items():
                    if v == INVISIBLE or v is None:
                        kps[str(k)] = None
                        continue
                    xy = self._numbers(v, 2)
                    if xy is None or min(xy) < 0:
                        bad += 1
                        continue
                    kps[str(k)] = self._to_pixels(xy, width, height)
                out.append(KeypointInstance(label, self._to_pixels(g[1], width, height), kps))
                written.append(g[1])
            return _Instances(out, written), bad
        except Exception:  # pragma: no cover - defensive
            return _Instances(), 1

    def prompt_boxes(self, boxes, width: int, height: int) -> str:
        """``[x0, y0, x1, y1], ...`` in the resized image's pixels."""
        return ", ".join(json.dumps(self._to_model(b, width, height)) for b in boxes)

    def question_hint(self, output: str) -> str:
        if output == "keypoint":
            return ""  # the keypoint question already asks for JSON
        key = _JSON_KEY.get(output)
        if key is None:
            return ""
        example = {"box": "[x0, y0, x1, y1]", "point": "[x, y]", "polygon": "[[x, y], ...]"}[output]
        return f' Answer in JSON as [{{"{key}": {example}, "label": "..."}}].'


# ---------------------------------------------------------------------------------------------
_GRID_TOKEN = re.compile(r"<grid(\d+)_(\d+)>")
_POINT = re.compile(r"\s*<grid(\d+)_(\d+)>\s*(?:<OFF(-?\d+)_(-?\d+)>|(<DELETE>))?")
_GETOK_RUN = re.compile(r"((?:<grid\d+_\d+>(?:<OFF-?\d+_-?\d+>|<DELETE>)?)+)")
OFFSETS = tuple((dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
DELETE = "<DELETE>"


def getok_tokens(grid: int) -> tuple[str, ...]:
    """GETok's added tokens for a ``grid`` x ``grid`` lattice: ``<gridX_Y>`` row by row, the nine
    offsets ``<OFFdx_dy>`` (dx, dy in -1, 0, 1) and ``<DELETE>``: grid² + 10 tokens. The paper
    spells them ``<gridX,Y>`` and ``<OFFdx,dy>``; the comma would clash with the markup's
    instance separator, so an underscore takes its place (the tokens are learned either way)."""
    return (
        tuple(f"<grid{x}_{y}>" for y in range(grid) for x in range(grid))
        + tuple(f"<OFF{dx}_{dy}>" for dx, dy in OFFSETS)
        + (DELETE,)
    )


@dataclass(frozen=True)
class GETok:
    """GETok's grid and offset tokens (``getok-grounding-everything-in-tokens``, section 3.1).

    The image is a ``grid`` x ``grid`` lattice; ``<gridX_Y>`` stands for the centre of cell
    (X, Y) (X the column, Y the row), so a point is one token and a box two (its top-left and
    bottom-right corners), a polygon one per vertex, in :mod:`rlsys.lang.format`'s markup. An offset
    token after a grid token moves that point by a third of a cell in each direction
    (``<OFF1_-1>``: right and up), which makes the nine positions of a cell a uniform 3·grid
    lattice: with the paper's grid of 32, points land within 1/192 of the image side, against
    1/64 for grid tokens alone (and 1/1998 for the 1,000 bins). ``<DELETE>`` after a grid token
    withdraws that point: a point or box with a withdrawn point is no prediction (not an
    unreadable one either); a polygon loses the vertex, and is withdrawn below 3 vertices.

    Masks (section 3.2.1) are sets of grid points, one instance per mask in the same markup:
    ``<grid3_4><OFF0_0><grid4_4><OFF0_0>,<grid9_2><OFF0_0>`` is two masks. Targets hold the
    points :func:`rewards.mask.mask_to_grid_points` picks for the GT mask (rendered like any
    points); :meth:`parse_masks` reads an answer to a mask question, where every instance is a
    set of any number of points (a withdrawn point leaves the set; a set of only withdrawn
    points is no prediction). The paper wraps a mask in ``<seg>...</seg>``; here the question
    says masks are asked for, as it does for keypoints, so no tokens are added for it.

    ``offsets`` says whether targets are rendered with an offset after every grid token (the
    3·grid precision) or grid tokens alone (the paper's first stage); answers are read either
    way. The paper's second RL stage, multi-turn refinement with offsets and ``<DELETE>``, needs
    multi-turn rollouts and is not here. ``written`` coordinates are in cells (X + 0.5 + dx/3).
    """

    grid: int = 32
    offsets: bool = True
    name: str = "getok"

    def for_sample(self, sample):
        return self  # nothing per sample: the answer's geometry is self-contained

    def for_proposals(self, boxes, width: int, height: int):
        return self

    def __post_init__(self):
        if not 2 <= self.grid <= 256:
            raise ValueError(f"getok grid must be 2..256 cells per side, got {self.grid}")

    def added_tokens(self) -> tuple[str, ...]:
        return getok_tokens(self.grid)

    # pixels <-> cells; with offsets the 3·grid sub-lattice
    def _token(self, v: float, size: float) -> tuple[int, int]:
        if math.isnan(v):
            raise ValueError("cannot render a NaN coordinate")
        sub = 3 if self.offsets else 1
        k = min(max(math.floor(v / size * self.grid * sub), 0), self.grid * sub - 1)
        return (k // 3, k % 3 - 1) if self.offsets else (k, 0)

    def write(self, values, width: float, height: float) -> str:
        """A flat pixel sequence ``[x0, y0, x1, y1, ...]`` -> its tokens."""
        values = [float(v) for v in values]
        if len(values) % 2 or not values:
            raise ValueError(f"an instance needs x, y pairs, got {len(values)} values")
        out = []
        for x, y in zip(values[0::2], values[1::2]):
            (i, dx), (j, dy) = self._token(x, width), self._token(y, height)
            out.append(f"<grid{i}_{j}>" + (f"<OFF{dx}_{dy}>" if self.offsets else ""))
        return "".join(out)

    def read(self, raw) -> tuple[float, ...]:
        """One instance's tokens -> its points in cells; raises ``ValueError`` (unreadable) or
        :class:`rlsys.lang.format.Deleted` (withdrawn)."""
        pts, deleted = self._read_points(raw)
        n = len(pts) // 2 + deleted
        if deleted and (n < 3 or len(pts) < 6):
            raise Deleted(f"instance withdrawn with {deleted} <DELETE>")
        return pts

    def read_mask(self, raw) -> tuple[float, ...]:
        """One mask instance's tokens -> its set of points in cells: withdrawn points leave the
        set, and a set of only withdrawn points raises :class:`rlsys.lang.format.Deleted`."""
        pts, deleted = self._read_points(raw)
        if not pts:
            raise Deleted(f"mask withdrawn with {deleted} <DELETE>")
        return pts

    def _read_points(self, raw) -> tuple[tuple[float, ...], int]:
        """``(points in cells, withdrawn count)`` of one instance; ``ValueError`` if unreadable
        or empty."""
        if not isinstance(raw, str):
            raise ValueError(f"instance {str(raw)[:40]!r} is not text")
        pos, pts, deleted = 0, [], 0
        raw = raw.rstrip()
        while pos < len(raw):
            m = _POINT.match(raw, pos)
            if m is None:
                raise ValueError(f"instance {raw[:40]!r} is not a run of grid tokens")
            pos = m.end()
            i, j = int(m.group(1)), int(m.group(2))
            if i >= self.grid or j >= self.grid:
                raise ValueError(f"grid token <grid{i}_{j}> outside the {self.grid}x{self.grid} grid")
            if m.group(5):
                deleted += 1
                continue
            dx, dy = (int(m.group(3)), int(m.group(4))) if m.group(3) is not None else (0, 0)
            if abs(dx) > 1 or abs(dy) > 1:
                raise ValueError(f"offset <OFF{dx}_{dy}> is not one of the nine (-1..1 each way)")
            pts += [i + 0.5 + dx / 3, j + 0.5 + dy / 3]
        if not pts and not deleted:
            raise ValueError("empty instance")
        return tuple(pts), deleted

    def _pixels(self, c, width, height) -> tuple[float, ...]:
        return tuple(v / self.grid * (width if k % 2 == 0 else height) for k, v in enumerate(c))

    def render(self, preds, width: int, height: int) -> str:
        out = []
        for p in preds:
            if p.kind != "none":
                for c in p.coords:
                    try:
                        check_kind(c, p.kind)  # a mask: any number of points
                    except ValueError as exc:
                        raise ValueError(f"phrase {p.phrase!r}: {exc}") from None
            # boxes left to right, then top to bottom (ordered by their tokens, as the bins are)
            key = lambda c: (self._token(float(c[0]), width), self._token(float(c[1]), height))
            out.append(p if p.kind == "none" else Prediction(p.phrase, p.kind, tuple(sorted(p.coords, key=key))))
        return render_markup(out, lambda c: self.write(c, width, height))

    def parse(self, text, width: int, height: int) -> Parsed:
        b = parse_bins(text, self.read)
        preds = [Prediction(p.phrase, p.kind, tuple(self._pixels(c, width, height) for c in p.coords)) for p in b]
        # a withdrawn instance still is an answer: text with only withdrawn points is not empty
        answered = bool(b) or bool(isinstance(text, str) and DELETE in text and not b.unreadable)
        return _parsed(preds, b.unreadable, b.errors, answered, [c for p in b for c in p.coords])

    def parse_masks(self, text, width: int, height: int) -> Parsed:
        """An answer to a mask question: every instance a set of points (kind ``"mask"``, flat
        ``(x0, y0, x1, y1, ...)`` in pixels). Never raises, as :meth:`parse`."""
        b = parse_bins(text, self.read_mask, kind="mask")
        preds = [Prediction(p.phrase, p.kind, tuple(self._pixels(c, width, height) for c in p.coords)) for p in b]
        answered = bool(b) or bool(isinstance(text, str) and DELETE in text and not b.unreadable)
        return _parsed(preds, b.unreadable, b.errors, answered, [c for p in b for c in p.coords])

    def render_keypoints(self, instances, width: int, height: int) -> str:
        return render_keypoint_bins(instances, lambda c: self.write(c, width, height))

    def parse_keypoints(self, text, width: int, height: int) -> tuple[list[KeypointInstance], int]:
        insts, bad = parse_keypoint_bins(text, self.read, _GETOK_RUN)

        def px(c):
            return self._pixels(c, width, height)

        return _Instances(
            [
                KeypointInstance(i.name, px(i.box), {k: None if v is None else px(v) for k, v in i.keypoints.items()})
                for i in insts
            ],
            [i.box for i in insts],
        ), bad

    def prompt_boxes(self, boxes, width: int, height: int) -> str:
        """``"<grid1_12><OFF0_1><grid10_18><OFF-1_0>", ...`` (quoted, as the bins' are)."""
        return ", ".join(f'"{self.write(b, width, height)}"' for b in boxes)

    def question_hint(self, output: str) -> str:
        return ""


# ---------------------------------------------------------------------------------------------
_OBJ = re.compile(r"\s*<obj(\d+)>\s*")
_OBJ_RUN = re.compile(r"(<obj\d+>)(?=\s*<obj\d+>)")


def chatrex_tokens(max_proposals: int) -> tuple[str, ...]:
    """ChatRex's index tokens ``<obj0>``..``<obj{K-1}>``."""
    return tuple(f"<obj{i}>" for i in range(max_proposals))


def box_iou(a, b) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes (0 when either has no area)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def synthetic_proposals(sample, distractors: int = 5, jitter: float = 0.1, min_iou: float = 0.7) -> tuple:
    """A stand-in proposal network for synthetic data: each GT box moved by up to ``jitter`` of
    its sides (redrawn until its IoU with the GT is at least ``min_iou``), plus ``distractors``
    random boxes, shuffled so an index says nothing about which is right. A pure function of the
    sample's id, so SFT, GRPO, eval and the rewards all see the same proposals."""
    rng = random.Random(f"chatrex-proposals-{sample.id}")
    W, H = sample.width, sample.height
    out = []
    for inst in sample.instances:
        if inst.box is None:
            continue
        gt = tuple(float(v) for v in inst.box)
        bw, bh = gt[2] - gt[0], gt[3] - gt[1]
        best = gt
        for _ in range(20):
            c = (
                max(0.0, gt[0] + rng.uniform(-jitter, jitter) * bw),
                max(0.0, gt[1] + rng.uniform(-jitter, jitter) * bh),
                min(float(W), gt[2] + rng.uniform(-jitter, jitter) * bw),
                min(float(H), gt[3] + rng.uniform(-jitter, jitter) * bh),
            )
            if c[2] > c[0] and c[3] > c[1] and box_iou(c, gt) >= min_iou:
                best = c
                break
        out.append(tuple(round(v, 1) for v in best))
    for _ in range(distractors):
        w, h = rng.uniform(0.05, 0.5) * W, rng.uniform(0.05, 0.5) * H
        x0, y0 = rng.uniform(0, W - w), rng.uniform(0, H - h)
        out.append(tuple(round(v, 1) for v in (x0, y0, x0 + w, y0 + h)))
    rng.shuffle(out)
    return tuple(out)


@dataclass(frozen=True)
class ChatRex:
    """ChatRex's detection as retrieval (``chatrex``, section 3): candidate boxes are listed in
    the question with their index tokens, and the model answers with indices,
    ``<|object_ref_start|>cat<|object_ref_end|><|box_start|><obj3><obj7><|box_end|>``; it never
    writes a coordinate. ChatRex's own markup (``<g>cat</g><o><obj3><obj7></o>``) is replaced by
    rlsys's so one markup parser serves every vocabulary.

    The proposals belong to a sample, so this vocabulary is bound to one (:meth:`for_sample`,
    which every caller uses) before it renders or parses: they come from the sample's record
    (``proposals``, e.g. a proposal network's boxes merged in with ``python -m rlsys.data.proposals``),
    or, with ``proposal_source="synthetic"``, from :func:`synthetic_proposals` (GT jittered plus
    distractors; for synthetic data only: it leaks the GT's presence). The question lists them in
    the bins (``<obj0>: <12><40><100><200>``), so the model needs the coordinate tokens as well as
    ``<obj0>``..``<obj{K-1}>``; ChatRex feeds RoI features of each box instead, which needs an
    object encoder in the model. The reward is the box IoU F1 of the chosen proposals' boxes.
    Box outputs only (detection, referring, visual prompts, GUI boxes)."""

    max_proposals: int = 100
    proposal_source: str = "record"
    distractors: int = 5
    proposals: tuple | None = None
    size: tuple | None = None  # (width, height) of the bound image: the question lists the boxes in bins
    name: str = "chatrex"

    def __post_init__(self):
        if not 1 <= self.max_proposals <= 1000:
            raise ValueError(f"chatrex max_proposals must be 1..1000, got {self.max_proposals}")
        if self.proposal_source not in ("record", "synthetic"):
            raise ValueError(f"chatrex proposal_source must be 'record' or 'synthetic', got {self.proposal_source!r}")

    def added_tokens(self) -> tuple[str, ...]:
        return coords.COORD_TOKENS + chatrex_tokens(self.max_proposals)

    def for_proposals(self, boxes, width: int, height: int) -> "ChatRex":
        boxes = tuple(tuple(float(v) for v in b) for b in boxes)
        if not boxes:
            raise ValueError("chatrex needs at least one proposal box to answer with")
        if len(boxes) > self.max_proposals:
            raise ValueError(
                f"{len(boxes)} proposals, more than the {self.max_proposals} index tokens (model.chatrex_max_proposals)"
            )
        if any(len(b) != 4 or not (0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height) for b in boxes):
            bad = next(
                b for b in boxes if len(b) != 4 or not (0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height)
            )
            raise ValueError(f"proposal {list(bad)} is not an [x0, y0, x1, y1] box inside the {width}x{height} image")
        return replace(self, proposals=boxes, size=(int(width), int(height)))

    def for_sample(self, sample) -> "ChatRex":
        where = f"sample {sample.id!r} ({getattr(sample, 'source', '<memory>')})"
        if sample.output != "box":
            raise ValueError(
                f"{where}: chatrex answers with proposal indices, so boxes only; output is {sample.output!r} "
                "(set data.tasks to box tasks)"
            )
        props = list(getattr(sample, "proposals", None) or [])
        if not props:
            if self.proposal_source != "synthetic":
                raise ValueError(
                    f"{where}: no proposals (add a 'proposals' list of boxes to its record, e.g. with "
                    "python -m rlsys.data.proposals; model.chatrex_proposals=synthetic makes them from the GT, "
                    "for synthetic data only)"
                )
            props = synthetic_proposals(sample, self.distractors)
        try:
            return self.for_proposals(props, sample.width, sample.height)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def _props(self) -> tuple:
        if self.proposals is None:
            raise ValueError("chatrex: bind the vocabulary to a sample's proposals first (for_sample)")
        return self.proposals

    def index_of(self, box) -> int:
        """The proposal that stands for a GT ``box``: the one of largest IoU, at least 0.5."""
        props = self._props()
        ious = [box_iou(box, p) for p in props]
        k = max(range(len(props)), key=ious.__getitem__)
        if ious[k] < 0.5:
            raise ValueError(
                f"box {tuple(box)} has no proposal with IoU >= 0.5 (best {ious[k]:.2f}): the answer cannot name it"
            )
        return k

    def render(self, preds, width: int, height: int) -> str:
        self._props()
        _refuse_masks(self.name, preds)
        for p in preds:
            if p.kind not in ("box", "none"):
                raise ValueError(f"phrase {p.phrase!r}: chatrex answers boxes only, not {p.kind}")
        # instances by proposal index, written back to back as ChatRex writes them
        out = [
            p if p.kind == "none" else Prediction(p.phrase, p.kind, tuple(sorted(p.coords, key=self.index_of)))
            for p in preds
        ]
        return render_markup(out, lambda c: f"<obj{self.index_of(c)}>").replace(">,<obj", "><obj")

    def read(self, raw) -> tuple[float, ...]:
        m = _OBJ.fullmatch(raw) if isinstance(raw, str) else None
        if m is None:
            raise ValueError(f"instance {str(raw)[:40]!r} is not one <objK> token")
        k = int(m.group(1))
        props = self._props()
        if k >= len(props):
            raise ValueError(f"<obj{k}> names no proposal (there are {len(props)})")
        return tuple(props[k])

    def parse(self, text, width: int, height: int) -> Parsed:
        if self.proposals is None:
            return _parsed([], 1, ["chatrex: no proposals bound to read indices against"], False, [])
        if isinstance(text, str):
            text = _OBJ_RUN.sub(r"\1,", text)  # <obj1><obj5> -> one instance each
        b = parse_bins(text, self.read)
        written = [(self.proposals.index(c),) for p in b for c in p.coords]
        return _parsed(list(b), b.unreadable, b.errors, bool(b), written)

    def parse_masks(self, text, width: int, height: int) -> Parsed:
        return _unread_masks(self.name)

    def render_keypoints(self, instances, width: int, height: int) -> str:
        raise ValueError("chatrex answers boxes only, not keypoints")

    def parse_keypoints(self, text, width: int, height: int) -> tuple[list[KeypointInstance], int]:
        return _Instances(), 1

    def prompt_boxes(self, boxes, width: int, height: int) -> str:
        return REX_BINS.prompt_boxes(boxes, width, height)

    def question_hint(self, output: str) -> str:
        if self.proposals is None:
            return ""
        listed = ", ".join(
            f"<obj{k}>: {render_instance(tuple(int(v) for v in coords.encode_xy(b, *self.size)))}"
            for k, b in enumerate(self.proposals)
        )
        return f" Candidate boxes: {listed}. Answer with their indices."


Vocabulary = RexBins | QwenJson | GETok | ChatRex
REX_BINS = RexBins()


def required_tokens(name: str, getok_grid: int = 32, chatrex_max_proposals: int = 100) -> tuple[str, ...]:
    """The tokens a checkpoint's tokenizer must hold for vocabulary ``name`` (a base checkpoint
    gets them from :func:`rlsys.models.prepare_checkpoint`): the bins for ``rex_bins``, the grid,
    offset and delete tokens for ``getok``, none for ``qwen_json`` (it uses the checkpoint as it is)."""
    if name == "rex_bins":
        return coords.COORD_TOKENS
    if name == "getok":
        return getok_tokens(getok_grid)
    if name == "qwen_json":
        return ()
    if name == "chatrex":
        return coords.COORD_TOKENS + chatrex_tokens(chatrex_max_proposals)
    raise ValueError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABULARIES)}")


def model_tokens(model_cfg) -> tuple[str, ...]:
    """:func:`required_tokens` of a config's model section (training's or Serve's). Serve's has
    no ``getok_grid``: there the grid is whatever the checkpoint holds (:func:`vocabulary_for`
    refuses a tokenizer without a complete one), so nothing is required up front."""
    grid = getattr(model_cfg, "getok_grid", None)
    if model_cfg.vocabulary == "getok" and grid is None:
        return ()
    if model_cfg.vocabulary == "chatrex":
        k = getattr(model_cfg, "chatrex_max_proposals", None)
        return coords.COORD_TOKENS if k is None else required_tokens("chatrex", chatrex_max_proposals=k)
    return required_tokens(model_cfg.vocabulary, grid or 32)


def make_vocabulary(
    name: str,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int = 28,
    *,
    getok_grid: int = 32,
    getok_offsets: bool = True,
    chatrex_max_proposals: int = 100,
    chatrex_proposals: str = "record",
    chatrex_distractors: int = 5,
) -> Vocabulary:
    """The vocabulary ``name`` (``model.vocabulary``). ``qwen_json`` needs the processor's pixel
    budget and patch factor (its coordinates are pixels of the resized image); ``getok`` its grid
    size and whether targets carry offsets."""
    if name == "rex_bins":
        return REX_BINS
    if name == "getok":
        return GETok(int(getok_grid), bool(getok_offsets))
    if name == "chatrex":
        return ChatRex(int(chatrex_max_proposals), chatrex_proposals, int(chatrex_distractors))
    if name == "qwen_json":
        if min_pixels is None or max_pixels is None:
            raise ValueError("vocabulary qwen_json needs the processor's min_pixels and max_pixels")
        return QwenJson(int(min_pixels), int(max_pixels), int(factor))
    raise ValueError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABULARIES)}")


def vocabulary_for(model_cfg, processor) -> Vocabulary:
    """The vocabulary of a config's model section (``model.vocabulary``, training's or Serve's;
    a bare name works too) with what it needs from ``processor``: the pixel budget for
    ``qwen_json`` (its image processor's ``size`` holds ``shortest_edge``/``longest_edge`` =
    min/max pixels), the grid size for ``getok`` (read from the tokenizer's grid tokens, so a
    checkpoint is always read in the grid it was trained on)."""
    name = model_cfg if isinstance(model_cfg, str) else model_cfg.vocabulary
    offsets = bool(getattr(model_cfg, "getok_offsets", True))
    if name == "getok":
        tok = getattr(processor, "tokenizer", processor)
        grid = tokenizer_grid(tok)
        want = getattr(model_cfg, "getok_grid", None)
        if want is not None and want != grid:
            raise ValueError(f"model.getok_grid is {want} but the checkpoint's tokenizer has a {grid}x{grid} grid")
        return make_vocabulary(name, getok_grid=grid, getok_offsets=offsets)
    if name == "chatrex":
        tok = getattr(processor, "tokenizer", processor)
        k = tokenizer_proposals(tok)
        want = getattr(model_cfg, "chatrex_max_proposals", None)
        if want is not None and want != k:
            raise ValueError(
                f"model.chatrex_max_proposals is {want} but the checkpoint's tokenizer has {k} <objK> tokens"
            )
        return make_vocabulary(
            name,
            chatrex_max_proposals=k,
            chatrex_proposals=getattr(model_cfg, "chatrex_proposals", "record"),
            chatrex_distractors=getattr(model_cfg, "chatrex_distractors", 5),
        )
    if name != "qwen_json":
        return make_vocabulary(name)
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None) or {}
    lo = size.get("shortest_edge", getattr(ip, "min_pixels", None))
    hi = size.get("longest_edge", getattr(ip, "max_pixels", None))
    return make_vocabulary(name, lo, hi, getattr(ip, "patch_size", 14) * getattr(ip, "merge_size", 2))


def tokenizer_grid(tokenizer) -> int:
    """The GETok grid size of a tokenizer: n when it holds all of :func:`getok_tokens` (n)."""
    found = [
        _GRID_TOKEN.fullmatch(t) for t in (tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer)
    ]
    cells = {(int(m.group(1)), int(m.group(2))) for m in found if m}
    n = math.isqrt(len(cells))
    if not cells or n * n != len(cells) or cells != {(x, y) for x in range(n) for y in range(n)}:
        raise ValueError(
            f"the tokenizer holds no complete GETok grid ({len(cells)} <gridX_Y> tokens); prepare the "
            "checkpoint with model.vocabulary=getok (rlsys.data.prepare adds them)"
        )
    return n


def tokenizer_proposals(tokenizer) -> int:
    """How many ChatRex index tokens a tokenizer holds: K when it has ``<obj0>``..``<obj{K-1}>``."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer
    k = 0
    while f"<obj{k}>" in vocab:
        k += 1
    if k == 0:
        raise ValueError(
            "the tokenizer holds no ChatRex index tokens <obj0>..; prepare the checkpoint with "
            "model.vocabulary=chatrex (rlsys.data.prepare adds them)"
        )
    return k
