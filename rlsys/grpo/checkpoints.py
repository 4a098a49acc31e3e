"""The GRPO run's checkpoint store: complete directories renamed into place, a ``latest``
pointer replaced atomically. With ``keep`` set, older step checkpoints are pruned after each
commit: the newest ``keep`` and every final one stay (a Qwen2.5-VL-3B checkpoint with its
optimizer state is ~60 GB)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


class Checkpoints:
    """``out_dir/checkpoints/step_NNNNNN`` directories, each renamed into place when complete,
    and a ``latest`` file replaced atomically: a killed run never leaves a half checkpoint that
    resume would read."""

    def __init__(self, out_dir: Path, keep: int = 0):
        self.root = out_dir / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep  # 0: keep all

    def complete(self) -> list[Path]:
        """Committed step checkpoints, oldest first."""
        return sorted(
            p
            for p in self.root.glob("step_*")
            if p.is_dir() and not p.name.endswith(".partial") and (p / "trainer_state.json").is_file()
        )

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
        self.prune()
        return final

    def prune(self) -> list[Path]:
        """Delete step checkpoints beyond the newest ``keep``, never a final one nor the one
        ``latest`` names; returns what was deleted. Runs after ``latest`` moved, so a crash
        here leaves extra checkpoints, never a missing one."""
        if not self.keep:
            return []
        done = self.complete()
        latest = self.latest()
        gone = []
        for p in done[: -self.keep]:
            if p == latest or json.loads((p / "trainer_state.json").read_text()).get("final"):
                continue
            shutil.rmtree(p)
            gone.append(p)
        return gone
