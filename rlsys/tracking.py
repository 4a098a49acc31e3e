"""Experiment tracking and pictures of predictions: the one W&B start of a GRPO run and the one
drawing of a model's answers on its image (used by GRPO's W&B tables and by ``rlsys.eval``'s
grid). No Ray here."""

from __future__ import annotations

import os
from pathlib import Path


def start_tracking(cfg):
    """A W&B run for a GRPO config: online with WANDB_API_KEY set, else offline under out_dir."""
    import wandb

    mode = cfg.tracking.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=cfg.tracking.project, name=cfg.tracking.run_name or Path(cfg.run.out_dir).name,
                      dir=str(Path(cfg.run.out_dir).resolve()), mode=mode, config=cfg.model_dump(), resume="allow")


def draw_predictions(sample, text: str, label: str | None = None):
    """The sample's image with its ground-truth boxes (green) and the answer's boxes and points
    (red), parsed from ``text`` into pixels; ``label`` written in the corner."""
    from PIL import Image, ImageDraw

    from rlsys.eval import predictions_in_pixels

    with Image.open(sample.image) as im:
        img = im.convert("RGB")
    d = ImageDraw.Draw(img)
    for inst in sample.instances:
        if inst.box:
            d.rectangle(inst.box, outline=(0, 170, 0), width=2)
    for _, kind, c in predictions_in_pixels(text, sample):
        if kind == "box" and c[2] > c[0] and c[3] > c[1]:
            d.rectangle(c, outline=(230, 0, 0), width=1)
        elif kind == "point":
            d.ellipse([c[0] - 3, c[1] - 3, c[0] + 3, c[1] + 3], fill=(230, 0, 0))
    if label:
        d.text((3, 3), label, fill=(0, 0, 0))
    return img


def example_table(examples):
    """A W&B table of (sample, answer, reward) examples, each drawn."""
    import wandb

    table = wandb.Table(columns=["image", "caption", "answer"])
    for sample, text, reward in examples:
        table.add_data(wandb.Image(draw_predictions(sample, text)), f"{sample.task}: reward {reward:.2f}", text)
    return table
