"""Ask a served detector about one image: ``python -m rlsys.serve.detect IMAGE --categories "a,b"``.

Prints the server's JSON answer; ``--save OUT.png`` also writes the image with the predictions
drawn. Needs a running server (``python -m rlsys.serve`` or ``serve run configs/serve_app.yaml``).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib

from rlsys.serve.client import DetectClient, DetectError

_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
)


def draw_objects(image, objects):
    """A copy of ``image`` (PIL) with each object's box, point, polygon or keypoints drawn and labelled."""
    from PIL import ImageDraw

    img = image.convert("RGB")
    d = ImageDraw.Draw(img)
    r = max(2, round(min(img.size) / 100))
    for obj in objects:
        phrase = str(obj.get("phrase", ""))
        color = _PALETTE[zlib.crc32(phrase.encode()) % len(_PALETTE)]  # stable colour per phrase
        label_at = None
        if obj.get("box"):
            x0, y0, x1, y1 = obj["box"]
            d.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=color, width=2)
            label_at = (min(x0, x1) + 2, min(y0, y1) + 1)
        if obj.get("point"):
            x, y = obj["point"]
            d.ellipse([x - r, y - r, x + r, y + r], fill=color)
            label_at = (x + r + 1, y - r)
        if obj.get("polygon"):
            pts = list(zip(obj["polygon"][::2], obj["polygon"][1::2]))
            d.polygon(pts, outline=color, width=2)
            label_at = pts[0]
        for xy in (obj.get("keypoints") or {}).values():
            if xy:
                d.ellipse([xy[0] - r, xy[1] - r, xy[0] + r, xy[1] + r], fill=color)
        if label_at and phrase:
            d.text(label_at, phrase, fill=color)
    return img


def _boxes(text: str):
    """``"x0,y0,x1,y1;x0,y0,x1,y1"`` -> list of 4-number lists."""
    return [[float(v) for v in b.split(",")] for b in text.split(";") if b.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.serve.detect", description=__doc__.split("\n\n")[0])
    p.add_argument("image", help="PNG or JPEG file (or an http(s) URL, if the server fetches URLs)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument(
        "--task",
        default="detection",
        choices=("detection", "referring", "pointing", "visual_prompt", "ocr", "gui", "keypoint"),
    )
    p.add_argument("--categories", help='comma-separated phrases, e.g. "person,dog"')
    p.add_argument("--expression", help="referring expression or GUI element (referring, gui)")
    p.add_argument("--prompt-boxes", type=_boxes, help='visual prompt boxes in pixels: "x0,y0,x1,y1;..."')
    p.add_argument(
        "--output", choices=("box", "point", "polygon", "keypoint"), help="answer geometry (default per task)"
    )
    p.add_argument("--keypoint-names", help="comma-separated keypoint names (keypoint)")
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--save", metavar="OUT.png", help="write the image with the predictions drawn")
    a = p.parse_args(argv)

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    try:
        result = DetectClient(a.url, a.timeout_s).detect(
            a.image,
            a.task,
            categories=split(a.categories),
            expression=a.expression,
            prompt_boxes=a.prompt_boxes,
            output=a.output,
            keypoint_names=split(a.keypoint_names),
        )
    except (DetectError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    if a.save:
        from PIL import Image

        if a.image.lower().startswith(("http://", "https://")):
            print("error: --save needs a local image", file=sys.stderr)
            return 1
        with Image.open(a.image) as im:
            draw_objects(im, result["objects"]).save(a.save)
        print(f"saved {a.save}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
