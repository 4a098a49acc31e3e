"""How a run survives: restarts after a lost worker (run.max_restarts) and the clean stop on
SIGTERM (run.stop_timeout_s), driven through rlsys.grpo.run.drive with the in-process fakes of
tests/controller_fakes.py (milliseconds each). The same paths against real Ray, vLLM and
DeepSpeed: test_e2e.py (SIGTERM to `python -m rlsys.grpo`) and test_node_loss.py (a learner node
removed from a two-node cluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from actors.group import MemberFailed
from rlsys.grpo.lifecycle import STOPPED_EXIT_CODE, cause_of, lost_worker
from rlsys.grpo.run import drive
from tests.controller_fakes import FakeLearners
from tests.test_controller import _cfg, _trainer, spread


class DyingLearners(FakeLearners):
    """A learner group whose update number ``die_at`` (counted over this process, so a rebuilt
    group does not die again) raises what a lost rank raises, or calls ``action``."""

    calls = 0

    def __init__(self, die_at: int, error: BaseException | None = None, action=None):
        super().__init__()
        self.die_at, self.error, self.action = die_at, error, action

    def train(self, items):
        DyingLearners.calls += 1
        if DyingLearners.calls == self.die_at:
            if self.action is not None:
                self.action()
            else:
                raise self.error
        return super().train(items)


def _records(out):
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def _starter(make_learners):
    started = []

    def start(cfg):
        learners = make_learners()
        started.append(learners)  # the trainer's groups are gone once it shuts down
        return _trainer(cfg, spread, learners=learners)

    return start, started


def _overrides(*more):
    return ("tracking.mode=disabled", "tracking.image_table_every_steps=0", "run.checkpoint_every_steps=4", *more)


def test_a_lost_learner_rank_restarts_from_the_last_checkpoint_and_each_step_is_recorded_once(tmp_path):
    # the uninterrupted run, for the prompt order
    whole, _ = _starter(FakeLearners)
    drive(_cfg(tmp_path / "whole", *_overrides()), whole)
    expected = [r["prompt_ids"] for r in _records(tmp_path / "whole")]

    # update 6 (step 6) loses a rank: steps 1-5 are recorded, the checkpoint is step 4's
    DyingLearners.calls = 0
    lost = MemberFailed("learner", 1, "learner update", "The actor died unexpectedly before finishing this task.")
    start, started = _starter(lambda: DyingLearners(6, lost))
    out = tmp_path / "cut"
    m = drive(_cfg(out, *_overrides()), start)

    assert len(started) == 2 and started[1].loaded  # rebuilt, resumed from the checkpoint
    assert m["step"] == 6 and m["run/restarts"] == 1
    recs = _records(out)
    # step 5's record (after the checkpoint) was dropped and redone: each step once, in order
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["prompt_ids"] for r in recs] == expected  # the same prompts as the uninterrupted run
    assert [r["run/restarts"] for r in recs] == [0, 0, 0, 0, 1, 1]
    (restart,) = [json.loads(line) for line in (out / "restarts.jsonl").read_text().splitlines()]
    assert restart["group"] == "learner" and restart["member"] == 1 and restart["during"] == "learner update"
    assert restart["after_step"] == 5 and restart["resumed_at_step"] == 4 and restart["step_records_dropped"] == 1


def test_restarts_stop_at_run_max_restarts_and_other_errors_are_not_restarted(tmp_path):
    lost = MemberFailed("learner", 0, "learner update", "died")
    # 0: today's behaviour, the first loss ends the run
    DyingLearners.calls = 0
    start, started = _starter(lambda: DyingLearners(2, lost))
    with pytest.raises(MemberFailed, match="learner member 0 failed during learner update"):
        drive(_cfg(tmp_path / "zero", *_overrides("run.max_restarts=0")), start)
    assert len(started) == 1

    # an error in the data or the code is not a lost worker: no restart
    DyingLearners.calls = 0
    start, started = _starter(lambda: DyingLearners(2, ValueError("an answer of 0 tokens")))
    with pytest.raises(ValueError, match="an answer of 0 tokens"):
        drive(_cfg(tmp_path / "bug", *_overrides()), start)
    assert len(started) == 1


def start_once(cfg):
    """A first start that works, whose learner dies at its first update."""
    DyingLearners.calls = 0
    return _trainer(cfg, spread, learners=DyingLearners(1, MemberFailed("learner", 0, "learner update", "died")))


def test_restart_limit_counts_failed_start_ups(tmp_path):
    tries = []

    def start(cfg):
        if not tries:
            tries.append("first")
            return start_once(cfg)
        tries.append(cfg.run.resume)  # a restart always resumes, whatever run.resume says
        raise MemberFailed("rollout", 0, "start-up", "node lost")

    with pytest.raises(MemberFailed, match="rollout member 0 failed during start-up"):
        drive(_cfg(tmp_path, *_overrides("run.max_restarts=2", "run.resume=false")), start)
    assert tries == ["first", True, True]
    recs = [json.loads(line) for line in (tmp_path / "restarts.jsonl").read_text().splitlines()]
    assert [(r["restart"], r["group"], r["resumed_at_step"]) for r in recs] == [
        (1, "learner", None),
        (2, "rollout", None),
    ]


def test_lost_worker_tells_lost_workers_from_errors():
    import ray.exceptions as rx

    assert lost_worker(MemberFailed("reward", 2, "scoring", "no answer within 60 s"))
    assert lost_worker(rx.ActorDiedError()) and lost_worker(rx.NodeDiedError("node gone"))
    assert not lost_worker(ValueError("bad record")) and not lost_worker(TimeoutError("placement group"))
    c = cause_of(MemberFailed("learner", 1, "learner update", "died\nstack"))
    assert c == {
        "group": "learner",
        "member": 1,
        "during": "learner update",
        "error": "MemberFailed: learner member 1 failed during learner update: died",
    }


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_a_resume_runs_each_step_once(tmp_path):
    # SIGTERM arrives during update 3 (step 3): the step finishes, a checkpoint is written there
    # (not a checkpoint step), the run returns; the handler that was there before is back
    before = signal.getsignal(signal.SIGTERM)
    DyingLearners.calls = 0
    start, _ = _starter(lambda: DyingLearners(3, action=lambda: os.kill(os.getpid(), signal.SIGTERM)))
    out = tmp_path / "stopped"
    m = drive(_cfg(out, *_overrides("run.max_staleness_steps=1")), start)
    assert m["stopped"] == "SIGTERM" and m["step"] == 3
    assert m["checkpoint"].endswith("step_000003")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"
    state = json.loads((out / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["pending_batches"], "the batch generating ahead is saved to be generated again"
    assert signal.getsignal(signal.SIGTERM) is before

    # the resume finishes the run: steps 4-6, each step once, the uninterrupted run's prompts
    again, started = _starter(FakeLearners)
    m = drive(_cfg(out, *_overrides("run.max_staleness_steps=1")), again)
    assert started[0].loaded and m["step"] == 6 and "stopped" not in m
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    whole_async, _ = _starter(FakeLearners)
    drive(_cfg(tmp_path / "whole_async", *_overrides("run.max_staleness_steps=1")), whole_async)
    assert [r["prompt_ids"] for r in recs] == [r["prompt_ids"] for r in _records(tmp_path / "whole_async")]


STOP_SCRIPT = """
import os, signal, sys, time
from rlsys.grpo.lifecycle import StopSignal
with StopSignal(float(sys.argv[1])) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    print("requested", stop.requested, flush=True)
    if sys.argv[2] == "twice":
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
print("not reached", flush=True)
"""


@pytest.mark.parametrize("how", ["timeout", "twice"])
def test_a_second_sigterm_or_the_stop_timeout_exits_at_once(how):
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", STOP_SCRIPT, "0.5" if how == "timeout" else "60", how],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert r.returncode == STOPPED_EXIT_CODE, r.stdout + r.stderr
    assert "requested SIGTERM" in r.stdout and "not reached" not in r.stdout
    assert time.monotonic() - t0 < 20
    if how == "twice":
        assert "second SIGTERM: exiting now" in r.stderr
    else:
        assert "the step did not finish within run.stop_timeout_s" in r.stderr
