"""A sample's image as the model sees it, and the check that every record agrees with its image.

One function opens an image for the model (:func:`open_rgb`: EXIF orientation applied, RGB), so
the rollout engines, the learner, eval, SAM and the drawings all see the same pixels, and a
record's ``width``/``height`` are those of the image *as displayed* (a phone JPEG stored sideways
with an orientation tag is annotated upright). :func:`check_images` runs before a run starts: each
image exists, its header reads, its file is whole (PNG chunk checksums; a truncated file fails)
and its size is the record's; what fails is named with file:line, id and both sizes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

ORIENTATION_TAG = 0x0112
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that turn the image a quarter: width and height swap


def open_rgb(path) -> Image.Image:
    """The image at ``path`` as the model sees it: EXIF orientation applied, RGB."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def _orientation(im: Image.Image) -> int | None:
    # a PNG's getexif() decodes the whole image unless its eXIf chunk came before the pixels
    # (then it is in im.info already); JPEG, TIFF and WebP keep EXIF in the header
    if im.format == "PNG" and "exif" not in im.info:
        return None
    return im.getexif().get(ORIENTATION_TAG)


def displayed_size(path) -> tuple[int, int]:
    """``(width, height)`` of the image as displayed, from its header (no pixels decoded)."""
    with Image.open(path) as im:
        w, h = im.size
        return (h, w) if _orientation(im) in TRANSPOSED else (w, h)


def _inspect(path: str) -> tuple[int, int] | str:
    """The displayed size, or why the image cannot be used."""
    p = Path(path)
    if not p.is_file():
        return "the image file does not exist"
    try:
        with Image.open(p) as im:
            w, h = im.size
            if _orientation(im) in TRANSPOSED:
                w, h = h, w
            # reads the file through without decoding pixels: a truncated or corrupt PNG fails
            # here (chunk checksums), not hours later in a rollout worker
            im.verify()
    except Exception as exc:  # PIL raises several types for unreadable files
        return f"the image does not read ({type(exc).__name__}: {str(exc) or 'truncated or corrupt'})"
    return w, h


def check_images(samples, threads: int = 8) -> list[tuple[object, str]]:
    """``(sample, reason)`` for every sample whose image is missing, unreadable or of another
    size than its record says. Each distinct image is read once (a file's header, and for PNGs
    its chunks), by ``threads`` threads: file reads release the GIL."""
    paths = sorted({s.image for s in samples})
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = dict(zip(paths, pool.map(_inspect, paths)))
    bad = []
    for s in samples:
        got = found[s.image]
        if isinstance(got, str):
            bad.append((s, f"{got}: {s.image}"))
        elif got != (s.width, s.height):
            bad.append(
                (
                    s,
                    f"the record says {s.width}x{s.height} but the image {s.image} is {got[0]}x{got[1]}"
                    + (" (after its EXIF orientation)" if got != _raw_size(s.image) else ""),
                )
            )
    return bad


def _raw_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size
