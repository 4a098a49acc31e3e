"""Experiment tracking and pictures of predictions: the one W&B start of a GRPO run and the one
drawing of a model's answers on its image (used by GRPO's W&B tables and by ``rlsys.eval``'s
grid). No Ray here."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def wandb_init_args(tracking, out_dir, default_name: str, config: dict, *, continue_run: bool) -> dict:
    """Arguments of the one W&B start (GRPO's driver and SFT's rank 0 alike): online with
    WANDB_API_KEY set, else offline under ``out_dir``. The run id is kept in
    ``out_dir/wandb_run_id``: a run that resumes from its checkpoint (``continue_run``) logs into
    the same W&B run; a run that starts over gets a new id."""
    mode = tracking.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if continue_run and id_file.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:12]
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(run_id)
        tmp.replace(id_file)
    return {"project": tracking.project, "name": tracking.run_name or default_name, "dir": str(out), "mode": mode,
            "config": config, "id": run_id, "resume": "allow"}


def start_tracking(args: dict):
    import wandb

    return wandb.init(**args)


def draw_predictions(sample, text: str, label: str | None = None, vocabulary=None):
    """The sample's image with its ground-truth boxes (green) and the answer's boxes and points
    (red), parsed from ``text`` into pixels by ``vocabulary`` (default: the bins); ``label``
    written in the corner."""
    from PIL import Image, ImageDraw

    from rlsys.eval import predictions_in_pixels

    with Image.open(sample.image) as im:
        img = im.convert("RGB")
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
        table.add_data(wandb.Image(draw_predictions(sample, text, vocabulary=vocabulary)), f"{sample.task}: reward {reward:.2f}", text)
    return table
