"""The one drawing of predictions: an image with its ground truth (green) and an answer's boxes and
points (red), for eval's grids and W&B's example tables."""

from __future__ import annotations

from PIL import ImageDraw

from rlsys.data.images import open_rgb
from rlsys.lang.vocab import REX_BINS


def predictions_in_pixels(text: str, sample, vocabulary=None) -> list[tuple[str, str, tuple[float, ...]]]:
    """``(phrase, kind, coords in pixels)`` per predicted instance, read by ``vocabulary``
    (default: the bins)."""
    voc = (vocabulary or REX_BINS).for_sample(sample)
    read = voc.parse_masks if sample.output == "mask" else voc.parse  # a mask answer: sets of points
    return [(p.phrase, p.kind, tuple(c)) for p in read(text, sample.width, sample.height) for c in p.coords]


def draw_predictions(sample, text: str, label: str | None = None, vocabulary=None):
    """The sample's image with its ground-truth boxes (green) and the answer's boxes and points
    (red), parsed from ``text`` into pixels by ``vocabulary`` (default: the bins); ``label``
    written in the corner."""
    img = open_rgb(sample.image)
    d = ImageDraw.Draw(img)
    for inst in sample.instances:
        if inst.box:
            d.rectangle(inst.box, outline=(0, 170, 0), width=2)
    for _, kind, c in predictions_in_pixels(text, sample, vocabulary):
        if kind == "box" and c[2] > c[0] and c[3] > c[1]:
            d.rectangle(c, outline=(230, 0, 0), width=1)
        elif kind == "point":
            d.ellipse([c[0] - 3, c[1] - 3, c[0] + 3, c[1] + 3], fill=(230, 0, 0))
        elif kind == "mask":  # GETok's mask answer: its set of points
            for x, y in zip(c[0::2], c[1::2]):
                d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(230, 0, 0))
    if label:
        d.text((3, 3), label, fill=(0, 0, 0))
    return img


def example_table(examples, vocabulary=None):
    """A W&B table of (sample, answer, reward) examples, each drawn."""
    import wandb

    table = wandb.Table(columns=["image", "caption", "answer"])
    for sample, text, reward in examples:
        table.add_data(
            wandb.Image(draw_predictions(sample, text, vocabulary=vocabulary)),
            f"{sample.task}: reward {reward:.2f}",
            text,
        )
    return table
