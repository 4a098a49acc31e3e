"""Soak run: GRPO on the tiny default for many steps while workers and a node are lost.

``python -m rlsys.bench.soak [--steps 100] [--seed 0] [--out runs/soak]`` (also
``python -m rlsys.bench --only soak``) starts a two-node Ray cluster on this machine (Ray's
``ray.cluster_utils.Cluster``: a head node for the driver, 2 vLLM engines and 2 reward workers;
a second node for 2 learner ranks), runs ``run.steps`` steps and, at steps drawn from ``--seed``,
kills an engine's process, kills a reward worker's process, and removes the learners' node
(a replacement joins 5 s later, as an autoscaler would add one). It writes ``soak.json`` and
prints a table: steps run, restarts by cause (``restarts.jsonl``), engine restarts in place and
reward workers replaced, steps lost (must be 0) and steps recorded twice (must be 0).

Whether the learned weights equal those of a run resumed by hand at the same checkpoints is not
measured: an engine restarted in place samples its retried prompts again, from a fresh vLLM
sampler state, so the answers after any engine fault differ from every other run's and the weights
with them (rlsys does not seed vLLM per request). The data order is what resume guarantees, and
the table checks it: every step's prompts are the uninterrupted order's."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from rlsys.config import DEFAULT_CONFIG, load_config
from rlsys.grpo import run as grpo
from rlsys.grpo.pipeline import PromptOrder


def _pids(class_name: str) -> list[int]:
    """Processes of live actors of one class on this machine: Ray titles an actor's process
    ``ray::ClassName`` (``ray::ClassName.method`` while it runs one)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].split(".")[0] == f"ray::{class_name}":
            out.append(proc.pid)
    return sorted(out)


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def inject(what: str, cluster, learner_resources: dict) -> dict:
    """One fault: an engine's or a reward worker's process killed (SIGKILL), or the learners'
    node removed and, 5 s later, a replacement with the same resources added. From the main
    thread: Ray's ``Cluster.add_node`` sets a signal handler."""
    if what in ("engine", "reward_worker"):
        pids = _pids("RolloutWorker" if what == "engine" else "RewardWorker")
        if not pids:
            return {"injected": False, "why": "no live actor of that class"}
        os.kill(pids[0], signal.SIGKILL)
        return {"injected": True, "pid": pids[0]}
    cluster.remove_node(next(iter(cluster.worker_nodes)))
    time.sleep(5)
    cluster.add_node(num_cpus=2, resources=learner_resources)
    return {"injected": True}


LEARNER_NODE = {"learner_node": 8}


def two_node_cluster():
    """A Ray cluster of two raylets on this machine (Ray's ``ray.cluster_utils.Cluster``) with
    logical CPUs, joined by this process: the head (the driver's node) advertises ``rollout_node``
    for the engines and reward workers, the second node ``learner_node`` for the learner ranks
    (``resources_per_*`` pin each group). Also the distributed and node-loss tests' cluster."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"rollout_node": 8}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, resources=LEARNER_NODE)
    cluster.wait_for_nodes()
    ray.init(
        address=cluster.address,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": ":".join(sys.path)}},
    )
    return cluster


def soak(steps: int, seed: int, out: Path, overrides: list[str] = ()) -> dict:
    import ray

    # a fresh run directory: the faults are timed by its steps.jsonl, which must not be an old run's
    shutil.rmtree(out / "run", ignore_errors=True)
    cluster = two_node_cluster()
    cfg = load_config(
        DEFAULT_CONFIG,
        [
            f"run.out_dir={out / 'run'}",
            "run.resume=false",
            f"run.steps={steps}",
            "run.checkpoint_every_steps=5",
            "run.keep_checkpoints=2",
            "run.max_restarts=5",
            "run.dynamic_sampling=false",
            "run.actor_start_timeout_s=300",
            "tracking.mode=disabled",
            "tracking.image_table_every_steps=0",
            "learner.num_ranks=2",
            "learner.cpus_per_rank=0.5",
            "learner.resources_per_rank={learner_node: 1}",
            "rollout.num_engines=2",
            "rollout.cpus_per_engine=0.5",
            "rollout.resources_per_engine={rollout_node: 1}",
            "reward.num_workers=2",
            "reward.cpus_per_worker=0.25",
            "reward.resources_per_worker={rollout_node: 1}",
            *overrides,
        ],
    )
    rng = random.Random(seed)
    # three distinct steps, away from the start and the end, for the three faults
    at = sorted(rng.sample(range(max(3, steps // 10), max(4, steps - steps // 10)), 3))
    kinds = ["engine", "reward_worker", "learner_node"]
    rng.shuffle(kinds)
    plan = dict(zip(kinds, at))
    steps_file = Path(cfg.run.out_dir) / "steps.jsonl"
    result: dict = {}

    def train():
        try:
            result["metrics"] = grpo.run(cfg)
        except Exception as exc:  # reported in the table: the soak's point is whether it survives
            result["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"

    # the run in a thread (its SIGTERM stop is off there), the faults from the main thread
    t0 = time.time()
    run = threading.Thread(target=train, daemon=True)
    run.start()
    done: dict[str, dict] = {}
    pending = sorted(plan.items(), key=lambda kv: kv[1])
    try:
        while run.is_alive():
            recs = _records(steps_file)
            last = recs[-1]["step"] if recs else 0
            if pending and last >= pending[0][1]:
                what, _ = pending.pop(0)
                done[what] = {"after_step": last, **inject(what, cluster, LEARNER_NODE)}
                print(f"soak: {what} lost after step {last}", flush=True)
            time.sleep(0.2)
        run.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    m, error = result.get("metrics", {}), result.get("error")
    recs = _records(steps_file)
    restarts = _records(Path(cfg.run.out_dir) / "restarts.jsonl")
    got = Counter(r["step"] for r in recs)
    res = {
        "command": f"python -m rlsys.bench.soak --steps {steps} --seed {seed}",
        "steps_asked": steps,
        "steps_run": len(got),
        "steps_lost": sum(1 for s in range(1, steps + 1) if s not in got),
        "steps_recorded_twice": sum(1 for c in got.values() if c > 1),
        "faults_planned": plan,
        "faults_injected": done,
        "restarts": len(restarts),
        "restarts_by_group": dict(Counter(r.get("group") or "other" for r in restarts)),
        "restart_records": restarts,
        "engine_restarts_in_place": _over_rebuilds(recs, "rollout/engine_restarts"),
        "reward_workers_replaced": _over_rebuilds(recs, "reward/worker_replacements"),
        "weights_in_sync_at_end": m.get("weights_in_sync"),
        "error": error,
        "wall_s": round(time.time() - t0, 1),
    }
    # the data order: with no dynamic sampling a step draws prompts_per_step prompts in the
    # order's sequence, so the steps' prompts are the uninterrupted order's (the samples as the
    # run loaded them: the tiny default drops none at its context check)
    ids = [i for r in sorted(recs, key=lambda r: r["step"]) for i in r["prompt_ids"]]
    samples = grpo.prepare_data(cfg)
    expected = [samples[i].id for i in PromptOrder(len(samples), cfg.run.seed).take(len(ids))]
    res["prompts_in_uninterrupted_order"] = bool(ids) and ids == expected
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(res, indent=2))
    return res


def _over_rebuilds(recs: list[dict], key: str) -> int:
    """A per-groups counter summed over the run: it starts again at 0 when the groups are rebuilt,
    so its rises are added up."""
    total, prev = 0, 0
    for r in sorted(recs, key=lambda r: r["step"]):
        v = int(r.get(key, 0))
        total += v - prev if v >= prev else v
        prev = v
    return total


def table(res: dict) -> str:
    rows = [
        ("steps asked / run", f"{res['steps_asked']} / {res['steps_run']}"),
        ("steps lost (must be 0)", res["steps_lost"]),
        ("steps recorded twice (must be 0)", res["steps_recorded_twice"]),
        (
            "faults (step each was injected after)",
            ", ".join(f"{k} {v['after_step']}" for k, v in res["faults_injected"].items()),
        ),
        ("restarts of the run, by group", f"{res['restarts']} {res['restarts_by_group']}"),
        ("engine restarts in place", res["engine_restarts_in_place"]),
        ("reward workers replaced", res["reward_workers_replaced"]),
        ("weights in sync at the end", res["weights_in_sync_at_end"]),
        ("every step's prompts as in an uninterrupted run", res["prompts_in_uninterrupted_order"]),
        ("error", res["error"] or "none"),
        ("wall time", f"{res['wall_s'] / 60:.1f} min"),
    ]
    return "\n".join(["| soak | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/soak")
    p.add_argument("overrides", nargs="*", help="config key=value, after the soak's own")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    res = soak(a.steps, a.seed, Path(a.out), a.overrides)
    print(table(res))
    print(json.dumps({k: v for k, v in res.items() if k != "restart_records"}))
    ok = res["steps_lost"] == 0 and res["steps_recorded_twice"] == 0 and not res["error"]
    return 0 if ok and res["prompts_in_uninterrupted_order"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
