"""Stale locks of torch's JIT extension builds, cleared before DeepSpeed builds its ops.

DeepSpeed builds some ops at first use on each machine (on CPUs the shared-memory collective,
``deepspeed_shm_comm``, inside ``deepspeed.init_distributed``) through
``torch.utils.cpp_extension``, which guards each build with a lock file (``FileBaton``) that every
other process waits on with no time limit. A build killed mid-way (Ray's memory monitor, a
Ctrl-C, a lost node) leaves its lock behind, and every later learner or SFT start on that machine
hangs in ``init_distributed`` without a message. Seen on the 2-core CI machine: a ``make run``
killed at GRPO start left ``~/.cache/torch_extensions/py311_cu130/deepspeed_shm_comm/lock``;
the next ``make run`` waited on it for 10 minutes until it was removed by hand.

A build takes a minute or two, so a lock older than :data:`STALE_BUILD_LOCK_S` has no live
builder: it is removed, and said so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

STALE_BUILD_LOCK_S = 600.0


def build_root() -> Path:
    """torch's folder of JIT builds for this Python and accelerator (``TORCH_EXTENSIONS_DIR`` if set)."""
    from torch.utils.cpp_extension import _get_build_directory

    # torch names the folder from the Python version and the accelerator; ask it for one build's
    # folder rather than rebuilding its rule here
    return Path(_get_build_directory("deepspeed_shm_comm", False)).parent


def clear_stale_build_locks(
    root: Path | None = None, max_age_s: float = STALE_BUILD_LOCK_S, say: Callable[[str], None] = log.warning
) -> list[Path]:
    """Remove every ``<build>/lock`` under ``root`` (default :func:`build_root`) older than
    ``max_age_s`` seconds, saying which; returns the removed paths. Younger locks are left to
    their builders."""
    root = build_root() if root is None else Path(root)
    removed = []
    for lock in sorted(root.glob("*/lock")):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # its build finished meanwhile
            continue
        if age <= max_age_s:
            continue
        lock.unlink(missing_ok=True)
        removed.append(lock)
        say(
            f"removed {lock}, a torch JIT build lock {age / 60:.0f} min old: a build of {lock.parent.name} was killed "
            "mid-way, and every later build of it would have waited on this file forever"
        )
    return removed
