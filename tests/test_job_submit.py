"""`ray job submit` end to end, as on a cluster: a local Ray head (`ray start --head`), the GRPO main
job on the tiny CPU config for two steps submitted to it, its logs read back, the head stopped.

The head is stopped by process id (its `ray start --block` process and that process's
descendants), not with `ray stop`, which stops every Ray process on the machine, other people's
runs included. Its ports are free ones and its temp dir is its own, so it neither collides with
nor is joined by another Ray instance on this machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: the `ray` CLI and the job's python
RAY = str(BIN / "ray")
JOB_TIMEOUT_S = 12 * 60


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # all open at once: n distinct ports
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process (it shuts its node down), then end whatever of its
    descendants (raylet, GCS, dashboard, workers, the job's driver) is left, by pid."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]  # snapshot: the tree is reparented as it dies
    except psutil.NoSuchProcess:
        return
    root.terminate()
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _ray(args: list[str], env: dict, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


def _wait_for_job_server(address: str, env: dict, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if _ray(["job", "list", "--address", address], env, timeout_s=60).returncode == 0:
            return
        time.sleep(3)
    pytest.fail(f"the job server at {address} did not answer within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def _job_status(address: str, sid: str, env: dict) -> str:
    """The job's status as a bare word (PENDING, RUNNING, SUCCEEDED, ...). Through the SDK in a
    fresh process, which reads this head's token from env; `ray job status` prints prose."""
    code = (
        "import sys; from ray.job_submission import JobSubmissionClient as C; "
        "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)"
    )
    r = subprocess.run([sys.executable, "-c", code, address, sid], env=env, capture_output=True, text=True, timeout=120)
    return (
        r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else f"unknown ({r.stderr[-300:]})"
    )


@pytest.fixture
def ray_head(tmp_path):
    gcs, dash, client, agent, agent_grpc, rt_env, metrics, node_mgr, obj_mgr = _free_ports(9)
    # Short: Ray's unix socket paths (temp_dir/session_.../sockets/...) must stay under 108 chars.
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
    # Token authentication with a token of this head's own (Ray turns token auth on when
    # ~/.ray/auth_token exists; the CLI calls and the job's driver below all carry this env).
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("WANDB_API_KEY", None)
    log = tmp_path / "ray_start.log"
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--num-cpus=2",
        "--num-gpus=0",
        # the job server lives in the dashboard (head) and its agent (per node)
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}",
        f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        _wait_for_job_server(address, env, proc, log, timeout_s=180)
        yield address, env
    finally:
        _stop_tree(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 300)
def test_ray_job_submit_runs_grpo_on_a_local_head(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "run"
    sid = f"rlsys-grpo-test-{os.getpid()}"
    # Run in place: the venv's python (rlsys is installed editable in it), absolute paths, no
    # working_dir upload. The env the driver forwards to its actors (DS_ACCELERATOR, WANDB_MODE,
    # PYTHONPATH) comes from the head's environment, not from --runtime-env-json: Ray refuses a
    # driver whose ray.init(runtime_env) repeats an env var of the job's runtime_env.
    entrypoint = [
        sys.executable,
        "-m",
        "rlsys.grpo",
        "--config",
        str(ROOT / "configs" / "tiny_cpu.yaml"),
        "run.steps=2",
        f"run.out_dir={out}",
        "run.checkpoint_every_steps=2",
        "tracking.mode=offline",
    ]
    t0 = time.monotonic()
    sub = _ray(["job", "submit", "--address", address, "--submission-id", sid, "--no-wait", "--", *entrypoint], env)
    assert sub.returncode == 0, f"ray job submit failed:\n{sub.stdout}\n{sub.stderr}"

    status = None
    while time.monotonic() - t0 < JOB_TIMEOUT_S:
        status = _job_status(address, sid, env)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)  # a status call is cheap; a 10 s poll cost 5 s a run on average
    elapsed = time.monotonic() - t0
    logs = _ray(["job", "logs", sid, "--address", address], env)
    text = logs.stdout
    if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        _ray(["job", "stop", sid, "--address", address, "--no-wait"], env)
    assert status == "SUCCEEDED", (
        f"job {sid}: {status} after {elapsed:.0f} s; logs:\n{text[-6000:]}{logs.stderr[-2000:]}"
    )

    assert logs.returncode == 0
    assert "step 1/2" in text and "step 2/2" in text, text[-4000:]
    final = [line for line in text.splitlines() if line.startswith("final: ")]
    assert final and '"weights_in_sync": true' in final[-1], text[-4000:]
    assert json.loads(final[-1][len("final: ") :])["step"] == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    print(f"job {sid} succeeded in {elapsed:.0f} s")
