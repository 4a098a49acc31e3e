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
    return {
        "project": tracking.project,
        "name": tracking.run_name or default_name,
        "dir": str(out),
        "mode": mode,
        "config": config,
        "id": run_id,
        "resume": "allow",
    }


def start_tracking(args: dict):
    import wandb

    return wandb.init(**args)
