"""How a GRPO run ends other than by finishing its steps: a clean stop on SIGTERM, and restarts
after losing a worker or a node. No Ray import at module level: the driver loop in
:mod:`rlsys.grpo.run` uses these, and tests drive them with in-process fakes."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger("rlsys.grpo")

# 128 + SIGTERM, what a process killed by the signal reports: a supervisor (a Kubernetes Job, a
# spot-instance script) reads "terminated, not finished" and may start the run again, which resumes.
STOPPED_EXIT_CODE = 143


class StopSignal:
    """While active (``with StopSignal(timeout_s):``), the first SIGTERM sets :attr:`requested`:
    the run finishes the step it is in, writes a checkpoint at the step boundary and returns. A
    second SIGTERM, or ``timeout_s`` after the first with the run still going, ends the process
    at once (exit :data:`STOPPED_EXIT_CODE`): the last committed checkpoint stands.

    ``ray job stop`` sends SIGTERM, then SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S`` (3 s unless
    the job's environment sets it): that variable must exceed ``run.stop_timeout_s`` for the
    checkpoint to be written. Handlers can only be set in the main thread; elsewhere (a run
    started from a worker thread) the stop is inactive and says so."""

    def __init__(self, timeout_s: float, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.timeout_s = timeout_s
        self.signals = signals
        self.requested: str | None = None  # the signal's name once one came
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            log.info("not the main thread: SIGTERM ends this run without the clean stop")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            print(
                f"rlsys: second {name}: exiting now; the last committed checkpoint stands", file=sys.stderr, flush=True
            )
            os._exit(STOPPED_EXIT_CODE)
        self.requested = name
        print(
            f"rlsys: {name}: finishing this step, then a checkpoint and exit (within run.stop_timeout_s "
            f"{self.timeout_s:.0f} s; send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )
        self._timer = threading.Timer(self.timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        print(
            f"rlsys: the step did not finish within run.stop_timeout_s {self.timeout_s:.0f} s of the {self.requested}: "
            "exiting now; the last committed checkpoint stands",
            file=sys.stderr,
            flush=True,
        )
        os._exit(STOPPED_EXIT_CODE)


def lost_worker(exc: BaseException) -> bool:
    """Whether ``exc`` means a worker or a node was lost (the run can go on from its last
    checkpoint with rebuilt groups), as opposed to an error in the data, the config or the code,
    which a restart would only repeat."""
    from actors.group import MemberFailed

    if isinstance(exc, MemberFailed):
        return True
    try:
        import ray.exceptions as rx
    except ImportError:  # pragma: no cover - Ray is installed wherever a run starts
        return False
    return isinstance(
        exc, (rx.RayActorError, rx.NodeDiedError, rx.ObjectLostError, rx.WorkerCrashedError, rx.GetTimeoutError)
    )


def cause_of(exc: BaseException) -> dict:
    """A restart's cause as a record: the group and member when known, and the error's first line."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return {
        "group": getattr(exc, "group", None),
        "member": getattr(exc, "member", None),
        "during": getattr(exc, "what", None),
        "error": f"{type(exc).__name__}: {first[:500]}",
    }
