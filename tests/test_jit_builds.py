"""rlsys.jit_builds: a killed JIT build's lock is removed before DeepSpeed builds its ops, a live one is not."""

import os
import time

from torch.utils.file_baton import FileBaton

from rlsys.jit_builds import STALE_BUILD_LOCK_S, build_root, clear_stale_build_locks


def test_a_stale_build_lock_is_removed_and_named_a_fresh_one_kept(tmp_path):
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))
    # what torch does before a build: with the lock there it cannot take the baton and would wait forever
    assert FileBaton(str(stale)).try_acquire() is False
    said = []
    assert clear_stale_build_locks(tmp_path, say=said.append) == [stale]
    assert not stale.exists() and fresh.exists()  # a lock younger than a build may have its builder alive
    assert len(said) == 1 and str(stale) in said[0] and "deepspeed_shm_comm" in said[0] and "11 min old" in said[0]
    baton = FileBaton(str(stale))
    assert baton.try_acquire() is True  # the next build goes ahead
    baton.release()
    assert clear_stale_build_locks(tmp_path, say=said.append) == [] and len(said) == 1


def test_build_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_root() == tmp_path
