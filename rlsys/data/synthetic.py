"""A synthetic dataset, deterministic by seed, that exercises every reward.

Two kinds of image:
- *shape scenes*: coloured circles, squares and triangles on a plain background, drawn with their
  exact masks. They give detection (box F1), referring expressions ("the largest red circle"),
  pointing (point in mask), visual prompts (example boxes of one shape) and keypoints (a
  triangle's three corners, OKS).
- *GUI screens*: a window with labelled buttons. They give GUI grounding (point in box, box F1)
  and OCR (the labels' quadrilaterals as polygons).

It writes the formats a real dataset uses: ``<split>.jsonl`` in :mod:`rlsys.data.samples`'s schema and,
for the shape scenes, a COCO instances JSON (``<split>_coco.json``) with RLE segmentations,
so both loaders are exercised by the same data.

Masks: ``mask_fraction`` asks a share of the detection and referring samples for their objects'
masks instead of boxes (output ``mask``: GETok's masks as sets of grid points, for
``model.vocabulary=getok``); drawn from a stream of its own, so the images, tasks and every other
sample of a seed stay what they were without it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from rlsys.data.samples import Instance, Sample, write_jsonl

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BUTTONS = ("OK", "Cancel", "Submit", "Search", "Save", "Open", "Close", "Next", "Back", "Login")
TRIANGLE_KEYPOINTS = ("top", "left", "right")
TASK_MIX = ("detection", "detection", "referring", "pointing", "visual_prompt", "keypoint", "gui", "ocr")


def vocabulary() -> list[str]:
    """Every word the synthetic questions and answers use (the tiny tokenizer trains on it)."""
    words = list(SHAPES) + list(COLORS) + list(BUTTONS) + list(TRIANGLE_KEYPOINTS)
    words += [f"{c} {s}" for c in COLORS for s in SHAPES]
    words += [f"the {size} {c} {s}" for size in ("largest", "smallest") for c in COLORS for s in SHAPES]
    words += ["text", "button", "the " + " button, the ".join(BUTTONS) + " button"]
    return words


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # apex up: keypoints top, left, right
        return [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
    raise ValueError(shape)


def _draw_shape(draw, mask_draw, shape, cx, cy, r, color):
    if shape == "circle":
        bbox = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(bbox, fill=color)
        mask_draw.ellipse(bbox, fill=1)
    else:
        poly = _shape_polygon(shape, cx, cy, r)
        draw.polygon(poly, fill=color)
        mask_draw.polygon(poly, fill=1)


def _shape_scene(rng: random.Random, size: int, max_objects: int, one_kind: bool = False):
    """Draw non-overlapping shapes; returns the image and a list of object dicts.

    ``one_kind``: every shape in the scene is of one kind (colours still vary), so a detection
    answer lists every object in the image: counting and enumerating without telling kinds apart.
    """
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    objects: list[dict] = []
    n = rng.randint(1, max_objects)
    kind = rng.choice(SHAPES) if one_kind else None  # drawn only when asked: old seeds keep their images
    for _ in range(n * 20):
        if len(objects) == n:
            break
        r = rng.uniform(size * 0.05, size * 0.16)
        cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
        if any((cx - o["cx"]) ** 2 + (cy - o["cy"]) ** 2 < (r + o["r"] + 3) ** 2 for o in objects):
            continue
        shape = kind if kind is not None else rng.choice(SHAPES)
        color = rng.choice(list(COLORS))
        m = Image.new("L", (size, size), 0)
        _draw_shape(draw, ImageDraw.Draw(m), shape, cx, cy, r, COLORS[color])
        mask = np.array(m, dtype=bool)
        ys, xs = np.nonzero(mask)
        # The box is the mask's pixel extent: exact ground truth, not the drawing call's numbers.
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        objects.append(dict(shape=shape, color=color, cx=cx, cy=cy, r=r, mask=mask, box=box, area=int(mask.sum())))
    return img, objects


def _shape_samples(rng, image_name, size, objects, task) -> Sample:
    present = sorted({o["shape"] for o in objects})
    sid = f"{Path(image_name).stem}-{task}"
    if task == "detection":
        phrases = present[:]
        absent = [s for s in SHAPES if s not in present]
        if absent and rng.random() < 0.3:  # teach None answers for absent phrases (section 2.3)
            phrases.append(rng.choice(absent))
        rng.shuffle(phrases)
        insts = [Instance(o["shape"], box=o["box"], mask=_rle(o["mask"])) for o in objects]
        return Sample(sid, image_name, size, size, "detection", phrases, insts, "box")
    if task == "pointing":
        phrases = present[:]
        insts = []
        for o in objects:
            ys, xs = np.nonzero(o["mask"])
            k = len(xs) // 2  # a pixel that surely lies in the mask (a triangle's centroid may not)
            insts.append(
                Instance(o["shape"], box=o["box"], point=(float(xs[k]) + 0.5, float(ys[k]) + 0.5), mask=_rle(o["mask"]))
            )
        return Sample(sid, image_name, size, size, "pointing", phrases, insts, "point")
    if task == "referring":
        o = rng.choice(objects)
        same = [p for p in objects if p["shape"] == o["shape"] and p["color"] == o["color"]]
        if len(same) == 1:
            phrase = f"{o['color']} {o['shape']}"
        else:
            which = rng.choice(("largest", "smallest"))
            o = max(same, key=lambda p: p["area"]) if which == "largest" else min(same, key=lambda p: p["area"])
            phrase = f"the {which} {o['color']} {o['shape']}"
        return Sample(
            sid,
            image_name,
            size,
            size,
            "referring",
            [phrase],
            [Instance(phrase, box=o["box"], mask=_rle(o["mask"]))],
            "box",
        )
    if task == "visual_prompt":
        shape = rng.choice(present)
        group = [o for o in objects if o["shape"] == shape]
        k = rng.randint(1, len(group))
        prompt = [o["box"] for o in rng.sample(group, k)]
        insts = [Instance("object1", box=o["box"]) for o in group]
        return Sample(sid, image_name, size, size, "visual_prompt", ["object1"], insts, "box", prompt)
    if task == "keypoint":
        tris = [o for o in objects if o["shape"] == "triangle"]
        insts = []
        for o in tris:
            pts = _shape_polygon("triangle", o["cx"], o["cy"], o["r"])
            kps = {
                name: (min(max(x, 0.0), size), min(max(y, 0.0), size), 2)
                for name, (x, y) in zip(TRIANGLE_KEYPOINTS, pts)
            }
            insts.append(Instance("triangle", box=o["box"], keypoints=kps))
        return Sample(sid, image_name, size, size, "keypoint", ["triangle"], insts, "keypoint")
    raise ValueError(task)


def _gui_screen(rng: random.Random, size: int):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), (245, 245, 248))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, size, size // 10], fill=(60, 90, 160))  # title bar
    font = ImageFont.load_default()
    labels = rng.sample(BUTTONS, rng.randint(2, 5))
    buttons = []
    rows = np.linspace(size * 0.18, size * 0.85, len(labels))
    for label, y in zip(labels, rows):
        w, h = rng.uniform(size * 0.25, size * 0.45), rng.uniform(size * 0.08, size * 0.12)
        x = rng.uniform(4, size - w - 4)
        box = (round(x), round(y), round(x + w), round(y + h))
        draw.rectangle(box, fill=(210, 215, 225), outline=(90, 90, 90))
        tb = draw.textbbox((0, 0), label, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        tx, ty = box[0] + (box[2] - box[0] - tw) / 2, box[1] + (box[3] - box[1] - th) / 2
        draw.text((tx - tb[0], ty - tb[1]), label, fill=(20, 20, 20), font=font)
        text_box = (tx, ty, tx + tw, ty + th)
        buttons.append(dict(label=label, box=tuple(float(v) for v in box), text_box=text_box))
    return img, buttons


def _gui_sample(rng, image_name, size, buttons, task) -> Sample:
    sid = f"{Path(image_name).stem}-{task}"
    if task == "gui":
        b = rng.choice(buttons)
        phrase = f"the {b['label']} button"
        output = rng.choice(("point", "box"))
        cx, cy = (b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2
        return Sample(
            sid, image_name, size, size, "gui", [phrase], [Instance(phrase, box=b["box"], point=(cx, cy))], output
        )
    if task == "ocr":
        insts = []
        for b in buttons:
            x0, y0, x1, y1 = b["text_box"]
            insts.append(Instance("text", box=(x0, y0, x1, y1), polygon=(x0, y0, x1, y0, x1, y1, x0, y1)))
        return Sample(sid, image_name, size, size, "ocr", ["text"], insts, "polygon")
    raise ValueError(task)


def paint_position_ramp(img, levels: int):
    """Write each pixel's position into its colour: red rises by ``levels`` from left to right,
    green from top to bottom; the colours are first compressed by ``1 - levels/255`` so nothing
    clips. Returns a new image.

    Why: Qwen2.5-VL's vision tower has no absolute position embedding (2-D rotary only), so a
    small model trained from random weights can tell what an image token shows but not where it
    sits: the tiny model learns an object's size to ~1% and its position not at all
    (scripts/probe_localisation.py). Painting the coordinates in, as CoordConv adds coordinate
    channels to a CNN, puts position into the tokens' contents. A pretrained model does not need
    it; real data never has it.
    """
    from PIL import Image

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) * (1 - levels / 255)
    h, w = arr.shape[:2]
    arr[..., 0] += levels * (np.arange(w, dtype=np.float32) / w)[None, :]
    arr[..., 1] += levels * (np.arange(h, dtype=np.float32) / h)[:, None]
    return Image.fromarray(np.rint(arr).clip(0, 255).astype(np.uint8))


MASK_TASKS = ("detection", "referring")  # the synthetic tasks that may ask for masks


def generate(
    out_dir,
    *,
    num_images: int,
    seed: int,
    split: str = "train",
    image_size: int = 224,
    max_objects: int = 6,
    tasks=TASK_MIX,
    position_ramp_levels: int = 0,
    one_kind_per_scene: bool = False,
    mask_fraction: float = 0.0,
) -> Path:
    """Write ``num_images`` images and ``<split>.jsonl`` (+ ``<split>_coco.json``) to ``out_dir``.

    Each image yields one sample of a task drawn from ``tasks``. Same seed, same bytes.
    ``position_ramp_levels > 0`` paints positions into every image (:func:`paint_position_ramp`).
    ``one_kind_per_scene``: all shapes of a scene are of one kind (:func:`_shape_scene`).
    ``mask_fraction``: the share of detection and referring samples whose output is ``mask``
    (their objects' masks, for GETok), drawn per sample from its own seeded stream.
    """
    unknown = sorted(set(tasks) - set(TASK_MIX))
    if unknown:
        raise ValueError(f"synthetic data has no task {unknown}; it makes {sorted(set(TASK_MIX))}")
    if not 0.0 <= mask_fraction <= 1.0:
        raise ValueError(f"mask_fraction must be in [0, 1], got {mask_fraction}")
    mask_rng = random.Random(f"{seed}-{split}-masks")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-{split}")
    samples: list[Sample] = []
    coco = {
        "images": [],
        "annotations": [],
        "categories": [
            {"id": k + 1, "name": s, "keypoints": list(TRIANGLE_KEYPOINTS) if s == "triangle" else []}
            for k, s in enumerate(SHAPES)
        ],
    }
    for i in range(num_images):
        task = rng.choice(tasks)
        name = f"images/{split}_{i:05d}.png"
        if task in ("gui", "ocr"):
            img, buttons = _gui_screen(rng, image_size)
            samples.append(_gui_sample(rng, name, image_size, buttons, task))
        else:
            img, objects = _shape_scene(rng, image_size, max_objects, one_kind_per_scene)
            if task == "keypoint" and not any(o["shape"] == "triangle" for o in objects):
                task = "detection"
            samples.append(_shape_samples(rng, name, image_size, objects, task))
            if mask_fraction and task in MASK_TASKS and mask_rng.random() < mask_fraction:
                samples[-1].output = "mask"  # every instance of these tasks carries its mask
            coco["images"].append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
            for o in objects:
                x0, y0, x1, y1 = o["box"]
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": i + 1,
                        "category_id": SHAPES.index(o["shape"]) + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": o["area"],
                        "iscrowd": 0,
                        "segmentation": _rle(o["mask"]),
                    }
                )
        if position_ramp_levels:
            img = paint_position_ramp(img, position_ramp_levels)
        img.save(out / name, format="PNG", optimize=False)
    write_jsonl(samples, out / f"{split}.jsonl")
    tmp = out / f"{split}_coco.json.tmp"
    tmp.write_text(json.dumps(coco))
    tmp.replace(out / f"{split}_coco.json")
    return out / f"{split}.jsonl"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m rlsys.data.synthetic", description="write the synthetic dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--test-images", type=int, default=0, help="a test split too (its own stream; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--position-ramp", type=int, default=0, help="paint positions into the pixels (levels; 0: off)")
    p.add_argument("--max-objects", type=int, default=6, help="most shapes in one scene")
    p.add_argument("--one-kind-per-scene", action="store_true", help="all shapes of a scene are of one kind")
    p.add_argument(
        "--mask-fraction",
        type=float,
        default=0.0,
        help="share of detection and referring samples asking for masks (output mask; for model.vocabulary=getok)",
    )
    a = p.parse_args(argv)
    for split, n in (("train", a.train_images), ("val", a.val_images), ("test", a.test_images)):
        if n == 0:
            continue
        print(
            generate(
                a.out,
                num_images=n,
                seed=a.seed,
                split=split,
                image_size=a.image_size,
                max_objects=a.max_objects,
                position_ramp_levels=a.position_ramp,
                one_kind_per_scene=a.one_kind_per_scene,
                mask_fraction=a.mask_fraction,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
