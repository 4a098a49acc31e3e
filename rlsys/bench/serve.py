"""Serving benchmark: the HTTP path against the engine's own limit, and autoscaling, in one run.

``python -m rlsys.bench.serve [--requests-per-client 4] [--checkpoint DIR] [key=value ...]``

1. **Offline limit.** The same detection requests (same image, phrases, chat prompt and greedy
   sampling as the server builds them) through vLLM's offline ``LLM.generate`` in one call, in a
   child process (so its engine is gone before Serve's starts): requests/s with no HTTP, no
   validation, no image decoding, vLLM batching all of them at once.
2. **Serve** with one replica: requests/s and client-side p50/p99 latency at 1, 4, 16 and 64
   concurrent clients (``--requests-per-client`` each, at least 16 requests per level), as a
   share of the offline rate. The goal is 80% at 16 clients.
3. **Autoscaling** once: a second application with ``min_replicas 1, max_replicas 2`` and a low
   ``target_ongoing_requests`` under 64 clients; how long Serve took to run 2 replicas, and
   requests/s before and after (fractional CPUs: both replicas share this machine's cores).

Prints a markdown table and one JSON line. vLLM batches concurrent requests by itself: what
Serve's path costs is what remains between the offline rate and the served rate.
"""

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rlsys.config import ConfigError, vllm_engine_args
from rlsys.lang.prompts import chat_prompt
from rlsys.models import load_processor
from rlsys.serve.app import build_app, load_serve_config, resolve_model_dir
from rlsys.serve.client import DetectClient, DetectError
from rlsys.serve.requests import DetectRequest, check_request, question_for

CATEGORIES = ["red rectangle", "blue circle"]
CLIENTS = (1, 4, 16, 64)


def _image_png(size: int = 224) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (235, 235, 225))
    d = ImageDraw.Draw(im)
    d.rectangle([20, 30, 90, 110], fill=(200, 40, 40))
    d.ellipse([120, 100, 200, 180], fill=(40, 90, 200))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, n: int, concurrency: int, image: bytes, timeout_s: float) -> tuple[list[float], list[str], float]:
    """Send ``n`` requests from ``concurrency`` threads: (latencies of answered ones in ms, errors, wall s)."""

    client = DetectClient(url, timeout_s)

    def one(i: int):
        t0 = time.perf_counter()
        try:
            client.detect(image, "detection", categories=CATEGORIES)
            return (time.perf_counter() - t0) * 1000, None
        except DetectError as exc:
            return (time.perf_counter() - t0) * 1000, str(exc)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return [ms for ms, err in results if err is None], [err for _, err in results if err is not None], wall


def _cpu_group(pid: int, name: str, cmd: str) -> str:
    if pid == os.getpid():
        return "load client (this process)"
    if name.startswith("VLLM::"):
        return "vLLM engine core + worker"
    if "ServeReplica" in name or "ServeReplica" in cmd:
        return "Serve replica (HTTP handler, vLLM front-end)"
    if "ProxyActor" in name or "ProxyActor" in cmd:
        return "Serve HTTP proxy"
    if name.startswith("ray::") or name in ("raylet", "gcs_server") or "site-packages/ray/" in cmd:
        return "Ray system processes"
    return "other processes"


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds (user + system) used so far by every process on the machine, by group."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            t = p.cpu_times()
            g = _cpu_group(p.pid, p.info["name"] or "", " ".join(p.info["cmdline"] or []))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out[g] = out.get(g, 0.0) + t.user + t.system
    return out


def cpu_per_request(before: dict, after: dict, n: int) -> dict[str, float]:
    """CPU milliseconds per answered request, by process group (groups that used under 1 ms left out)."""
    out = {g: round((after.get(g, 0.0) - before.get(g, 0.0)) * 1000 / max(n, 1), 1) for g in after}
    return {g: v for g, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 1.0}


def summarise(lat: list[float], errors: list[str], wall_s: float) -> dict:
    import numpy as np

    a = np.array(lat)
    return {
        "answered": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": round(wall_s, 3),
        "requests_per_s": round(len(lat) / wall_s, 2),
        "p50_ms": round(float(np.percentile(a, 50)), 1) if a.size else None,
        "p99_ms": round(float(np.percentile(a, 99)), 1) if a.size else None,
    }


def offline_rate(cfg, model_dir: str, n_at: dict[int, int]) -> dict:
    """The benchmark request through ``LLM.generate`` (this process): all ``max(n_at)`` copies in
    one call (vLLM batches up to ``max_num_seqs``), and for each client count c, ``n_at[c]``
    copies in consecutive calls of c, which is what c closed-loop clients can keep in flight
    (greedy answers all run to ``max_new_tokens``, so a call of c is a continuous batch of c)."""
    from PIL import Image
    from vllm import LLM, SamplingParams

    e, g = cfg.engine, cfg.generation
    pixels = cfg.model.pixel_budget()  # the server's budget, so both paths see the same image tokens
    processor = load_processor(model_dir, trust_remote_code=cfg.model.trust_remote_code, pixels=pixels)
    image = Image.open(io.BytesIO(_image_png())).convert("RGB")
    req = DetectRequest(image="", task="detection", categories=CATEGORIES)
    output, phrases = check_request(req, cfg.limits)
    question = question_for(req, output, phrases, *image.size)
    prompt = chat_prompt(processor, question)
    llm = LLM(**vllm_engine_args(cfg.model, model_dir, e, seed=e.seed))
    sp = SamplingParams(
        max_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, skip_special_tokens=False
    )

    def run(n: int, chunk: int) -> tuple[float, int]:
        inputs = [{"prompt": prompt, "multi_modal_data": {"image": image}} for _ in range(n)]
        t0, tokens = time.perf_counter(), 0
        for i in range(0, n, chunk):
            tokens += sum(len(o.outputs[0].token_ids) for o in llm.generate(inputs[i : i + chunk], sp, use_tqdm=False))
        return time.perf_counter() - t0, tokens

    run(8, 8)  # warm-up
    n = max(n_at.values())
    before = cpu_snapshot()
    wall, tokens = run(n, n)
    cpu = cpu_per_request(before, cpu_snapshot(), n)
    out = {
        "requests": n,
        "wall_s": round(wall, 3),
        "requests_per_s": round(n / wall, 2),
        "mean_answer_tokens": round(tokens / n, 1),
        "max_num_seqs": e.max_num_seqs,
        "cpu_ms_per_request": cpu,
        "at_concurrency": {},
    }
    for c, m in n_at.items():
        before = cpu_snapshot()
        w, _ = run(m, min(c, e.max_num_seqs))
        out["at_concurrency"][c] = {
            "requests": m,
            "wall_s": round(w, 3),
            "requests_per_s": round(m / w, 2),
            "cpu_ms_per_request": cpu_per_request(before, cpu_snapshot(), m),
        }
    return out


def _replicas(app: str, deployment: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or deployment not in st.deployments:
        return 0
    return int(st.deployments[deployment].replica_states.get("RUNNING", 0))


def autoscale(
    base, model_dir: str, url: str, image: bytes, timeout_s: float, clients: int = 64, limit_s: float = 240.0
) -> dict:
    """Deploy a 1..2-replica application, load it with ``clients`` until a second replica runs
    (or ``limit_s`` passes), then measure again."""
    from ray import serve

    cfg = base.model_copy(deep=True)
    cfg.deployment.name = "bench-autoscale"
    cfg.deployment.min_replicas, cfg.deployment.max_replicas = 1, 2
    cfg.deployment.target_ongoing_requests = 2.0
    cfg.deployment.cpus_per_replica = 0.5
    serve.run(build_app(cfg, model_dir), name=cfg.deployment.name, route_prefix="/scale")
    app_url = f"{url}/scale"
    load(app_url, 4, 4, image, timeout_s)
    before = summarise(*load(app_url, 2 * clients, clients, image, timeout_s))
    t0 = time.perf_counter()
    rounds = 0
    while _replicas(cfg.deployment.name, cfg.deployment.name) < 2 and time.perf_counter() - t0 < limit_s:
        load(app_url, clients, clients, image, timeout_s)  # keep the queue full while Serve decides and starts one
        rounds += 1
    scaled_s = time.perf_counter() - t0
    replicas = _replicas(cfg.deployment.name, cfg.deployment.name)
    after = summarise(*load(app_url, 2 * clients, clients, image, timeout_s)) if replicas >= 2 else None
    serve.delete(cfg.deployment.name)
    return {
        "clients": clients,
        "target_ongoing_requests": 2.0,
        "replicas_reached": replicas,
        "seconds_to_2_replicas": round(scaled_s, 1) if replicas >= 2 else None,
        "load_rounds": rounds,
        "one_replica": before,
        "two_replicas": after,
    }


def main(argv=None) -> int:

    p = argparse.ArgumentParser(prog="python -m rlsys.bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="ServeConfig YAML (default configs/serve_tiny_cpu.yaml)")
    p.add_argument("--checkpoint", help="model to serve (default: the config's; none: the tiny model)")
    p.add_argument(
        "--requests-per-client",
        type=int,
        default=4,
        help="measured requests per client at each level (at least 16 in all)",
    )
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--no-autoscale", action="store_true", help="skip the autoscaling part")
    p.add_argument(
        "--offline-only", metavar="JSON", help=argparse.SUPPRESS
    )  # the child process of part 1: {clients: requests}
    p.add_argument("--address", default="local", help="Ray address ('local' starts one on this machine)")
    p.add_argument("overrides", nargs="*", help="ServeConfig key=value")
    a = p.parse_args(argv)
    try:
        base = load_serve_config(a.config, a.overrides, a.checkpoint)
        model_dir = str(resolve_model_dir(base))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if a.offline_only:
        print(json.dumps(offline_rate(base, model_dir, {int(k): v for k, v in json.loads(a.offline_only).items()})))
        return 0

    n_at = {c: max(16, c * a.requests_per_client) for c in CLIENTS}
    child = [sys.executable, "-m", "rlsys.bench.serve", "--offline-only", json.dumps(n_at)]
    child += (
        (["--config", a.config] if a.config else [])
        + (["--checkpoint", a.checkpoint] if a.checkpoint else [])
        + a.overrides
    )
    print("offline LLM.generate ...", file=sys.stderr, flush=True)
    r = subprocess.run(child, capture_output=True, text=True, timeout=1800)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        print(f"offline run failed:\n{r.stderr[-3000:]}", file=sys.stderr)
        return 1
    offline = json.loads(lines[-1])
    print(f"offline: {offline}", file=sys.stderr, flush=True)

    import ray
    from ray import serve

    image = _image_png()
    ray.init(address=a.address, include_dashboard=False, log_to_driver=False)
    served, scaling = {}, None
    try:
        for attempt in range(3):  # a free port can be taken between the probe and the proxy's bind
            port = _free_port()
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                break
            except Exception as exc:  # noqa: BLE001 - ray wraps the bind error in its own types
                if attempt == 2 or "bind" not in str(exc):
                    raise
                print(f"port {port} taken ({exc.__class__.__name__}); trying another", file=sys.stderr, flush=True)
                serve.shutdown()
        cfg = base.model_copy(deep=True)
        cfg.deployment.name = "bench-serve"
        cfg.deployment.min_replicas = cfg.deployment.max_replicas = 1
        t0 = time.perf_counter()
        serve.run(build_app(cfg, model_dir), name=cfg.deployment.name, route_prefix="/one")
        print(f"deployed in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        url = f"http://127.0.0.1:{port}"
        load(f"{url}/one", 8, 8, image, a.timeout_s)  # warm-up
        for c in CLIENTS:
            before = cpu_snapshot()
            served[c] = summarise(*load(f"{url}/one", n_at[c], c, image, a.timeout_s))
            served[c]["cpu_ms_per_request"] = cpu_per_request(before, cpu_snapshot(), served[c]["answered"])
            served[c]["share_of_offline"] = round(served[c]["requests_per_s"] / offline["requests_per_s"], 3)
            served[c]["share_of_offline_same_concurrency"] = round(
                served[c]["requests_per_s"] / offline["at_concurrency"][str(c)]["requests_per_s"], 3
            )
            print(f"{c} clients: {served[c]}", file=sys.stderr, flush=True)
        serve.delete(cfg.deployment.name)
        if not a.no_autoscale:
            scaling = autoscale(base, model_dir, url, image, a.timeout_s)
            print(f"autoscaling: {scaling}", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    b = base.batching
    print(
        f"\nmodel {model_dir}; max_new_tokens {base.generation.max_new_tokens} (mean answer {offline['mean_answer_tokens']} tokens); "
        f"@serve.batch {'on' if b.enabled else 'off'} (max_batch_size {b.max_batch_size}, wait {b.batch_wait_timeout_s} s); "
        f"{os.cpu_count()} cores\n"
    )
    print(
        "| path | clients | requests | req/s | share of offline, all at once | share of offline, same concurrency | p50 ms | p99 ms | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| offline `LLM.generate`, one call (batch up to {offline['max_num_seqs']}) | - | {offline['requests']} | {offline['requests_per_s']} | 1.0 | | | | |"
    )
    for c, o in offline["at_concurrency"].items():
        print(
            f"| offline `LLM.generate`, calls of {min(int(c), offline['max_num_seqs'])} | {c} | {o['requests']} | {o['requests_per_s']} | "
            f"{round(o['requests_per_s'] / offline['requests_per_s'], 3)} | 1.0 | | | |"
        )
    for c, s in served.items():
        print(
            f"| Serve, 1 replica | {c} | {s['answered'] + s['errors']} | {s['requests_per_s']} | {s['share_of_offline']} | "
            f"{s['share_of_offline_same_concurrency']} | {s['p50_ms']} | {s['p99_ms']} | {s['errors']} |"
        )
    if scaling:
        for k, label in (("one_replica", "autoscaling app, before"), ("two_replicas", "autoscaling app, 2 replicas")):
            s = scaling[k]
            if s:
                print(
                    f"| {label} | {scaling['clients']} | {s['answered'] + s['errors']} | {s['requests_per_s']} | "
                    f"{round(s['requests_per_s'] / offline['requests_per_s'], 3)} | | {s['p50_ms']} | {s['p99_ms']} | {s['errors']} |"
                )
        print(
            f"\nautoscaling 1 -> 2 replicas: {scaling['replicas_reached']} running after "
            f"{scaling['seconds_to_2_replicas']} s of load ({scaling['load_rounds']} rounds of {scaling['clients']} requests)"
        )
    if "16" in offline["at_concurrency"] and 16 in served:
        o, sv = offline["at_concurrency"]["16"]["cpu_ms_per_request"], served[16]["cpu_ms_per_request"]
        print(
            f"\nCPU ms per request at 16 clients, by process ({os.cpu_count()} cores; what the served path adds to the engine's own):\n"
        )
        print("| process group | offline, calls of 16 | Serve, 16 clients |")
        print("|---|---:|---:|")
        for g in sorted(set(o) | set(sv), key=lambda g: -(sv.get(g, 0) + o.get(g, 0))):
            print(f"| {g} | {o.get(g, '')} | {sv.get(g, '')} |")
        print(f"| all | {round(sum(o.values()), 1)} | {round(sum(sv.values()), 1)} |")
    print(
        json.dumps(
            {
                "bench": "serve_vs_offline",
                "model": model_dir,
                "cpus": os.cpu_count(),
                "offline": offline,
                "served": served,
                "autoscaling": scaling,
                "goal_share_at_16": 0.8,
            }
        )
    )
    errors = sum(s["errors"] for s in served.values())
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
