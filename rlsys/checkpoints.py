"""The GRPO run's checkpoint store: complete directories renamed into place, a ``latest``
pointer replaced atomically. Old checkpoints are kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


class Checkpoints:
    """``out_dir/checkpoints/step_NNNNNN`` directories, each renamed into place when complete,
    and a ``latest`` file replaced atomically: a killed run never leaves a half checkpoint that
    resume would read."""

    def __init__(self, out_dir: Path):
        self.root = out_dir / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)

    def latest(self) -> Path | None:
        f = self.root / "latest"
        if not f.is_file():
            return None
        p = self.root / f.read_text().strip()
        return p if (p / "trainer_state.json").is_file() else None

    def partial(self, step: int) -> Path:
        p = self.root / f"step_{step:06d}.partial"
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
        return p

    def commit(self, partial: Path, step: int, state: dict) -> Path:
        (partial / "trainer_state.json").write_text(json.dumps(state, indent=2))
        final = self.root / f"step_{step:06d}"
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        tmp = self.root / "latest.tmp"
        tmp.write_text(final.name)
        tmp.replace(self.root / "latest")
        return final
