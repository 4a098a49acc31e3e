"""The Qwen families' own grounding answers: JSON of ``bbox_2d``/``point_2d`` entries, in one of
two coordinate frames. Qwen2.5-VL (``qwen_json``) writes integer pixels of the image as its
processor resized it; Qwen3-VL (``qwen3_json``) writes integers on a 0..1000 grid relative to the
image (x * 1000 / width), whatever the resize. The text is the same; reading one frame as the
other is the classic near-zero-IoU bug, so each vocabulary names its frame and
:func:`rlsys.models.check_vocabulary_frame` refuses a frame the model family does not write."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from rlsys.lang.format import (
    IM_END,
    INVISIBLE,
    KeypointInstance,
    Parsed,
    _check_phrase,
    _note,
    kind_of,
)
from rlsys.lang.vocab.base import _group, _Instances, _parsed, _refuse_masks, _unread_masks, resized_size

# ---------------------------------------------------------------------------------------------
_JSON_KEY = {"box": "bbox_2d", "point": "point_2d", "polygon": "polygon"}
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?")


RESIZED_PIXELS = "resized_pixels"
RELATIVE_1000 = "relative_1000"
RELATIVE_GRID = 1000  # Qwen3-VL's grid: 0 is the left/top edge, 1000 the right/bottom edge


@dataclass(frozen=True)
class QwenJson:
    """Qwen's native grounding JSON. ``frame`` ``resized_pixels`` (Qwen2.5-VL): pixels of the
    processor-resized image, which needs the processor's ``min_pixels``, ``max_pixels`` and patch
    ``factor``; ``relative_1000`` (Qwen3-VL): 0..1000 relative to the image, nothing needed."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    factor: int = 28
    name: str = "qwen_json"
    frame: str = RESIZED_PIXELS

    def for_sample(self, sample):
        return self  # nothing per sample: the answer's geometry is self-contained

    def for_proposals(self, boxes, width: int, height: int):
        return self

    def __post_init__(self):
        if self.frame not in (RESIZED_PIXELS, RELATIVE_1000):
            raise ValueError(f"{self.name}: frame must be {RESIZED_PIXELS} or {RELATIVE_1000}, got {self.frame!r}")
        if self.frame == RESIZED_PIXELS and not (
            self.min_pixels is not None and self.max_pixels is not None and 0 < self.min_pixels <= self.max_pixels
        ):
            raise ValueError(
                f"{self.name}: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )

    def added_tokens(self) -> tuple[str, ...]:
        return ()

    # pixels of the sample <-> the model's frame: the resized image's pixels, or the 0..1000 grid
    def _scale(self, width, height) -> tuple[float, float, int, int]:
        if self.frame == RELATIVE_1000:
            return RELATIVE_GRID / width, RELATIVE_GRID / height, RELATIVE_GRID, RELATIVE_GRID
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

    def prompt_boxes(self, boxes, width: int, height: int, floor: bool = False) -> str:
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


QWEN3_JSON = QwenJson(name="qwen3_json", frame=RELATIVE_1000)
