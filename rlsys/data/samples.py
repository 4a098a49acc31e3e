"""One sample schema for every task, and the loaders that produce it.

A :class:`Sample` is an image with its ground truth in pixels: the phrases the question asks
about, and per phrase the instances (box, point, polygon, mask as COCO RLE, keypoints). Rewards
score against it, prompts are built from it, SFT targets are rendered from it.

Loaders: a JSONL file (one :meth:`Sample.to_dict` per line; referring, pointing, GUI and our
synthetic data) and COCO instances JSON through pycocotools. A bad record raises
:class:`DataError` naming the file, the record and the field; nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("detection", "referring", "pointing", "visual_prompt", "ocr", "layout", "gui", "keypoint")
# "mask": the instance's GT mask, written as a set of grid points (GETok; model.vocabulary getok only)
OUTPUTS = ("box", "point", "polygon", "keypoint", "mask")


class DataError(ValueError):
    """A record that does not fit the schema; the message names file, record and field."""


def _where(source: str, fieldname: str) -> str:
    return f"{source}, field '{fieldname}'"


def _floats(value, n: int | None, source: str, fieldname: str, *, even: bool = False) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{_where(source, fieldname)}: expected a list of numbers, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(f"{_where(source, fieldname)}: {v!r} is not a finite number")
        out.append(float(v))
    if n is not None and len(out) != n:
        raise DataError(f"{_where(source, fieldname)}: expected {n} numbers, got {len(out)}")
    if even and (len(out) < 6 or len(out) % 2):
        raise DataError(f"{_where(source, fieldname)}: a polygon needs an even number >= 6 of values, got {len(out)}")
    return tuple(out)


@dataclass
class Instance:
    """One ground-truth object of a phrase. Coordinates in pixels of the sample's image."""

    phrase: str
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    polygon: tuple[float, ...] | None = None
    mask: dict | None = None  # COCO RLE: {"size": [h, w], "counts": str}
    keypoints: dict[str, tuple[float, float, int]] | None = None  # name -> (x, y, visibility 0/1/2)

    def to_dict(self) -> dict:
        d: dict = {"phrase": self.phrase}
        for k in ("box", "point", "polygon", "mask", "keypoints"):
            v = getattr(self, k)
            if v is not None:
                d[k] = (
                    list(v) if isinstance(v, tuple) else ({n: list(p) for n, p in v.items()} if k == "keypoints" else v)
                )
        return d


@dataclass
class Sample:
    """An image and its ground truth for one task.

    ``phrases`` are what the question asks about, in order; a phrase with no instance is absent
    from the image and its answer is ``None``. ``prompt_boxes`` are the example boxes of a visual
    prompt. ``source`` says where the record came from (``file:line``) for error messages.
    """

    id: str
    image: str
    width: int
    height: int
    task: str
    phrases: list[str]
    instances: list[Instance] = field(default_factory=list)
    output: str = "box"
    prompt_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    source: str = "<memory>"
    # candidate boxes for the chatrex vocabulary (ChatRex's proposals), in pixels; the model
    # answers with their indices (rlsys.lang.vocab.ChatRex)
    proposals: list[tuple[float, float, float, float]] = field(default_factory=list)

    def instances_of(self, phrase: str) -> list[Instance]:
        return [i for i in self.instances if i.phrase == phrase]

    def to_dict(self) -> dict:
        d = {
            "id": self.id,
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "task": self.task,
            "output": self.output,
            "phrases": list(self.phrases),
            "instances": [i.to_dict() for i in self.instances],
        }
        if self.prompt_boxes:
            d["prompt_boxes"] = [list(b) for b in self.prompt_boxes]
        if self.proposals:
            d["proposals"] = [list(b) for b in self.proposals]
        return d

    @classmethod
    def from_dict(cls, d, source: str = "<memory>", root: Path | None = None) -> "Sample":
        """Validate a record and build a Sample; ``root`` resolves relative image paths."""
        if not isinstance(d, dict):
            raise DataError(f"{source}: expected a JSON object, got {type(d).__name__}")
        for req in ("id", "image", "width", "height", "task", "phrases"):
            if req not in d:
                raise DataError(f"{_where(source, req)}: missing")
        src = f"{source} (id {d['id']!r})"
        w, h = d["width"], d["height"]
        for name, v in (("width", w), ("height", h)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise DataError(f"{_where(src, name)}: must be a positive integer, got {v!r}")
        task = d["task"]
        if task not in TASKS:
            raise DataError(f"{_where(src, 'task')}: {task!r} is not one of {', '.join(TASKS)}")
        output = d.get("output", "keypoint" if task == "keypoint" else "box")
        if output not in OUTPUTS:
            raise DataError(f"{_where(src, 'output')}: {output!r} is not one of {', '.join(OUTPUTS)}")
        phrases = d["phrases"]
        if not isinstance(phrases, list) or not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise DataError(f"{_where(src, 'phrases')}: must be a non-empty list of non-empty strings")
        image = str(d["image"])
        if root is not None and not Path(image).is_absolute():
            image = str(root / image)
        insts = []
        raw_insts = d.get("instances", [])
        if not isinstance(raw_insts, list):
            raise DataError(f"{_where(src, 'instances')}: must be a list")
        for k, r in enumerate(raw_insts):
            insts.append(_instance_from_dict(r, src, f"instances[{k}]", phrases, w, h))
        pboxes = [_box(b, src, f"prompt_boxes[{k}]", w, h) for k, b in enumerate(d.get("prompt_boxes", []) or [])]
        raw_props = d.get("proposals", []) or []
        if not isinstance(raw_props, list):
            raise DataError(f"{_where(src, 'proposals')}: must be a list of [x0, y0, x1, y1] boxes")
        props = [_box(b, src, f"proposals[{k}]", w, h) for k, b in enumerate(raw_props)]
        if task == "visual_prompt" and not pboxes:
            raise DataError(f"{_where(src, 'prompt_boxes')}: a visual_prompt sample needs at least one box")
        needed = {"box": "box", "point": None, "polygon": "polygon", "keypoint": "keypoints", "mask": "mask"}[output]
        for k, inst in enumerate(insts):
            if needed and getattr(inst, needed) is None:
                raise DataError(f"{_where(src, f'instances[{k}].{needed}')}: missing for output {output!r}")
            if output == "mask":
                _check_mask_area(inst.mask, src, f"instances[{k}].mask")
            if output == "point" and inst.point is None and inst.mask is None and inst.box is None:
                raise DataError(f"{_where(src, f'instances[{k}]')}: a point task needs a point, mask or box")
        return cls(str(d["id"]), image, w, h, task, list(phrases), insts, output, pboxes, source, props)


def _check_mask_area(rle: dict, src: str, fname: str) -> None:
    """A mask to be written as an answer (output ``mask``) must be readable and hold a pixel."""
    import warnings

    from pycocotools import mask as mask_utils

    try:
        h, w = rle["size"]
        counts = rle["counts"]
        obj = (
            mask_utils.frPyObjects(rle, h, w)
            if isinstance(counts, list)
            else {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        )
        with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2 warns on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            area = int(mask_utils.area(obj))
    except Exception as exc:
        raise DataError(f"{_where(src, fname)}: unreadable COCO RLE ({exc})") from None
    if area == 0:
        raise DataError(f"{_where(src, fname)}: the mask is empty, so it has no answer for output 'mask'")


def _box(b, src: str, fname: str, w: int, h: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = _floats(b, 4, src, fname)
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{_where(src, fname)}: box {list(b)} has no area (need x0 < x1 and y0 < y1)")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise DataError(f"{_where(src, fname)}: box {list(b)} lies outside the {w}x{h} image")
    return (x0, y0, x1, y1)


def _instance_from_dict(r, src: str, fname: str, phrases: list[str], w: int, h: int) -> Instance:
    if not isinstance(r, dict):
        raise DataError(f"{_where(src, fname)}: expected an object")
    phrase = r.get("phrase")
    if phrase not in phrases:
        raise DataError(f"{_where(src, fname + '.phrase')}: {phrase!r} is not one of the sample's phrases {phrases}")
    inst = Instance(phrase)
    if r.get("box") is not None:
        inst.box = _box(r["box"], src, fname + ".box", w, h)
    if r.get("point") is not None:
        x, y = _floats(r["point"], 2, src, fname + ".point")
        if not (0 <= x <= w and 0 <= y <= h):
            raise DataError(f"{_where(src, fname + '.point')}: point {[x, y]} lies outside the {w}x{h} image")
        inst.point = (x, y)
    if r.get("polygon") is not None:
        inst.polygon = _floats(r["polygon"], None, src, fname + ".polygon", even=True)
    if r.get("mask") is not None:
        m = r["mask"]
        if not (isinstance(m, dict) and "counts" in m and list(m.get("size", [])) == [h, w]):
            raise DataError(f"{_where(src, fname + '.mask')}: expected COCO RLE {{'size': [{h}, {w}], 'counts': ...}}")
        inst.mask = {"size": [h, w], "counts": m["counts"]}
    if r.get("keypoints") is not None:
        kp = r["keypoints"]
        if not isinstance(kp, dict):
            raise DataError(f"{_where(src, fname + '.keypoints')}: expected an object name -> [x, y, v]")
        inst.keypoints = {}
        for name, v in kp.items():
            x, y, vis = _floats(v, 3, src, f"{fname}.keypoints.{name}")
            if vis not in (0, 1, 2):
                raise DataError(f"{_where(src, f'{fname}.keypoints.{name}')}: visibility must be 0, 1 or 2, got {vis}")
            inst.keypoints[name] = (x, y, int(vis))
    return inst


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8"
        ) from None


def jsonl_records(path, bad: list | None = None):
    """``(source, record)`` for each non-empty line of a JSONL file (``source`` is ``file:line``);
    a missing file, or a line that is not UTF-8 or not JSON, raises :class:`DataError` naming it
    (with ``bad`` a list, a bad line is appended to it as ``(source, reason)`` instead)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            source = f"{path}:{lineno}"
            try:
                line = _utf8(raw, source)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{source}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except DataError as exc:
                if bad is None:
                    raise
                bad.append((source, str(exc)))
                continue
            yield source, rec


def load_jsonl(path, bad: list | None = None) -> list[Sample]:
    """Load a JSONL dataset; image paths are relative to the file's folder. A bad record raises
    :class:`DataError` naming file, line and field; with ``bad`` a list it is appended there as
    ``(source, reason)`` and left out instead (``data.on_bad_record=skip``)."""
    path = Path(path)
    out = []
    for source, rec in jsonl_records(path, bad):
        try:
            out.append(Sample.from_dict(rec, source, root=path.parent))
        except DataError as exc:
            if bad is None:
                raise
            bad.append((source, str(exc)))
    if not out:
        raise DataError(f"{path}: holds no records" + (f" that can be used ({len(bad)} bad)" if bad else ""))
    return out


def write_jsonl(samples, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict()) + "\n")
    tmp.replace(path)


def load_coco(annotation_file, image_dir=None, *, task: str = "detection") -> list[Sample]:
    """Load a COCO instances (or person-keypoints) JSON through pycocotools.

    One sample per image that has annotations; phrases are the category names present, boxes
    are converted from ``[x, y, w, h]`` to ``[x0, y0, x1, y1]``, segmentations (polygons or RLE)
    become RLE masks, keypoints become ``name -> (x, y, v)`` with the category's keypoint names.
    Crowd annotations are kept out of the ground truth, as COCO evaluation ignores them.
    """
    from pycocotools.coco import COCO

    ann_path = Path(annotation_file)
    if not ann_path.is_file():
        raise DataError(f"{ann_path}: no such file")
    root = Path(image_dir) if image_dir is not None else ann_path.parent
    try:
        data = ann_path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise DataError(
                f"{ann_path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
            ) from None
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{ann_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    for key in ("images", "annotations", "categories"):
        if key not in raw:
            raise DataError(f"{ann_path}, field '{key}': missing (not a COCO instances file)")
    coco = COCO()
    coco.dataset = raw
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    cats = {c["id"]: c for c in raw["categories"]}
    out: list[Sample] = []
    for img_id in sorted(coco.imgs):
        img = coco.imgs[img_id]
        source = f"{ann_path} (image id {img_id})"
        anns = [a for a in coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        w, h = img.get("width"), img.get("height")
        insts, phrases = [], []
        for a in anns:
            where = f"{ann_path} (annotation id {a.get('id')})"
            if a.get("category_id") not in cats:
                raise DataError(f"{where}, field 'category_id': {a.get('category_id')!r} is not a listed category")
            cat = cats[a["category_id"]]
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4):
                raise DataError(f"{where}, field 'bbox': expected [x, y, w, h], got {bbox!r}")
            x, y, bw, bh = bbox
            inst = {"phrase": cat["name"], "box": [x, y, x + bw, y + bh]}
            if a.get("segmentation"):
                try:
                    rle = coco.annToRLE(a)
                except Exception as exc:
                    raise DataError(f"{where}, field 'segmentation': unreadable ({exc})") from None
                counts = rle["counts"]
                inst["mask"] = {
                    "size": [h, w],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                }
            if a.get("keypoints") and cat.get("keypoints"):
                kp = a["keypoints"]
                names = cat["keypoints"]
                if len(kp) != 3 * len(names):
                    raise DataError(f"{where}, field 'keypoints': {len(kp)} values for {len(names)} named keypoints")
                inst["keypoints"] = {n: kp[3 * k : 3 * k + 3] for k, n in enumerate(names)}
            insts.append(inst)
            if cat["name"] not in phrases:
                phrases.append(cat["name"])
        rec = {
            "id": str(img_id),
            "image": img.get("file_name"),
            "width": w,
            "height": h,
            "task": task,
            "output": "keypoint" if task == "keypoint" else "box",
            "phrases": phrases,
            "instances": insts,
        }
        out.append(Sample.from_dict(rec, source, root=root))
    if not out:
        raise DataError(f"{ann_path}: no image has a non-crowd annotation")
    return out


def load_dataset(path, *, task: str | None = None, bad: list | None = None) -> list[Sample]:
    """Load by extension: ``.jsonl`` -> :func:`load_jsonl` (``bad``: see there); ``.json`` ->
    :func:`load_coco` (refuses a bad record whatever ``bad`` is)."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return load_jsonl(p, bad)
    if p.suffix == ".json":
        return load_coco(p, task=task or "detection")
    raise DataError(f"{p}: unknown dataset format (expected .jsonl or a COCO .json)")
