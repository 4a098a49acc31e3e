"""What a long run leaves in out_dir: checkpoints pruned to the newest N and the final one,
steps.jsonl with each step once after a resume, one W&B run continued across a resume."""

import json

import pytest

from rlsys.config import TrackingConfig
from rlsys.grpo.checkpoints import Checkpoints
from rlsys.grpo.run import keep_step_records
from rlsys.tracking import wandb_init_args


def _commit(ck: Checkpoints, step: int, final: bool = False):
    part = ck.partial(step)
    (part / "weights.bin").write_bytes(b"x" * 10)
    return ck.commit(part, step, {"step": step, "final": final})


def test_keep_checkpoints_prunes_to_the_newest_n_and_keeps_finals(tmp_path):
    ck = Checkpoints(tmp_path, keep=2)
    for s in (10, 20, 30):
        _commit(ck, s)
    assert [p.name for p in ck.complete()] == ["step_000020", "step_000030"]
    _commit(ck, 40, final=True)  # e.g. a finished run ...
    _commit(ck, 50)  # ... extended with run.steps raised
    _commit(ck, 60)
    assert [p.name for p in ck.complete()] == ["step_000040", "step_000050", "step_000060"]
    assert ck.latest().name == "step_000060"
    # a half-written checkpoint (killed mid-save) is neither counted nor deleted by pruning
    (ck.root / "step_000070.partial").mkdir()
    _commit(ck, 80)
    assert [p.name for p in ck.complete()] == ["step_000040", "step_000060", "step_000080"]
    # 0 keeps everything
    ck_all = Checkpoints(tmp_path / "all")
    for s in range(1, 6):
        _commit(ck_all, s)
    assert len(ck_all.complete()) == 5


def test_steps_after_the_resumed_checkpoint_are_dropped_from_steps_jsonl(tmp_path):
    p = tmp_path / "steps.jsonl"
    p.write_text("".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n" for s in range(1, 13)))
    # the run died after step 12; its last checkpoint is step 10: steps 11 and 12 are redone
    assert keep_step_records(p, 10) == 2
    assert [json.loads(l)["step"] for l in p.read_text().splitlines()] == list(range(1, 11))
    assert keep_step_records(p, 10) == 0
    assert keep_step_records(tmp_path / "none.jsonl", 3) == 0
    assert keep_step_records(p, 0) == 10 and p.read_text() == ""  # a run that starts over


def test_wandb_run_id_is_kept_for_a_resumed_run_and_new_for_a_fresh_one(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    t = TrackingConfig()
    first = wandb_init_args(t, tmp_path, "grpo", {}, continue_run=False)
    assert first["mode"] == "offline" and first["resume"] == "allow" and len(first["id"]) == 12
    assert (tmp_path / "wandb_run_id").read_text() == first["id"]
    again = wandb_init_args(t, tmp_path, "grpo", {}, continue_run=True)
    assert again["id"] == first["id"]
    fresh = wandb_init_args(t, tmp_path, "grpo", {}, continue_run=False)
    assert fresh["id"] != first["id"] and (tmp_path / "wandb_run_id").read_text() == fresh["id"]
    # a resumed run whose out_dir has no id yet (older run) gets one
    other = tmp_path / "older"
    assert wandb_init_args(t, other, "grpo", {}, continue_run=True)["id"] == (other / "wandb_run_id").read_text()


def test_resumed_wandb_run_continues_the_same_offline_run(tmp_path, monkeypatch):
    """Two W&B starts with the kept id write into one run (offline: one run directory)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    t = TrackingConfig(mode="offline")
    a = wandb_init_args(t, tmp_path, "grpo", {"x": 1}, continue_run=False)
    run = wandb.init(**a)
    run.log({"m": 1.0}, step=1)
    run.finish()
    b = wandb_init_args(t, tmp_path, "grpo", {"x": 1}, continue_run=True)
    run = wandb.init(**b)
    assert run.id == a["id"]
    run.log({"m": 2.0}, step=2)
    run.finish()
    dirs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.endswith(a["id"]) for d in dirs)
