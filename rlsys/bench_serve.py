"""Serving benchmark: requests/s and latency with and without Serve dynamic batching, one run.

``python -m rlsys.bench_serve [--requests N] [--concurrency C] [--checkpoint DIR] [key=value ...]``
deploys the detector twice side by side (``batching.enabled=true`` at ``/on``, ``false`` at
``/off``; everything else equal), warms both up, then sends N detection requests per mode from C
client threads in alternating rounds (on, off, off, on, ...) so that other load on a shared
machine falls on both alike; prints a markdown table and one JSON line. Latency is measured by
the client (HTTP round trip). vLLM batches concurrent requests by itself in both modes; the
difference measured is what ``@serve.batch``'s gathering adds or costs on top.
"""

import argparse
import io
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor


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
    from rlsys.client import DetectClient, DetectError

    client = DetectClient(url, timeout_s)

    def one(i: int):
        t0 = time.perf_counter()
        try:
            client.detect(image, "detection", categories=["red rectangle", "blue circle"])
            return (time.perf_counter() - t0) * 1000, None
        except DetectError as exc:
            return (time.perf_counter() - t0) * 1000, str(exc)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return [ms for ms, err in results if err is None], [err for _, err in results if err is not None], wall


def summarise(lat: list[float], errors: list[str], wall_s: float) -> dict:
    import numpy as np

    a = np.array(lat)
    return {"answered": len(lat), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": round(wall_s, 3), "requests_per_s": round(len(lat) / wall_s, 2),
            "p50_ms": round(float(np.percentile(a, 50)), 1) if a.size else None,
            "p99_ms": round(float(np.percentile(a, 99)), 1) if a.size else None}


def main(argv=None) -> int:
    from rlsys.config import ConfigError
    from rlsys.serve import load_serve_config, resolve_model_dir

    p = argparse.ArgumentParser(prog="python -m rlsys.bench_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="ServeConfig YAML (default configs/serve_tiny_cpu.yaml)")
    p.add_argument("--checkpoint", help="model to serve (default: the config's; none: the tiny model)")
    p.add_argument("--requests", type=int, default=128, help="measured requests per mode")
    p.add_argument("--concurrency", type=int, default=16, help="client threads")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds the requests are split into")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests per mode first")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--address", default="local", help="Ray address ('local' starts one on this machine)")
    p.add_argument("overrides", nargs="*", help="ServeConfig key=value (batching.enabled is set by the bench)")
    a = p.parse_args(argv)
    try:
        base = load_serve_config(a.config, a.overrides, a.checkpoint)
        model_dir = resolve_model_dir(base)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from rlsys.serve import build_app

    image = _image_png()
    port = _free_port()
    ray.init(address=a.address, include_dashboard=False, log_to_driver=False)
    modes = ("on", "off")
    acc = {m: ([], [], 0.0) for m in modes}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        for mode in modes:  # both engines start together; the second run() waits for the first app
            cfg = base.model_copy(deep=True)
            cfg.batching.enabled = mode == "on"
            cfg.deployment.name = f"bench-batching-{mode}"
            serve.run(build_app(cfg, model_dir), name=cfg.deployment.name, route_prefix=f"/{mode}")
        print(f"deployed both in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        url = f"http://127.0.0.1:{port}"
        for mode in modes:
            load(f"{url}/{mode}", a.warmup, min(a.warmup, a.concurrency), image, a.timeout_s)
        per_round = -(-a.requests // a.rounds)
        for r in range(a.rounds):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                lat, err, wall = load(f"{url}/{mode}", per_round, a.concurrency, image, a.timeout_s)
                acc[mode] = (acc[mode][0] + lat, acc[mode][1] + err, acc[mode][2] + wall)
                print(f"round {r} batching {mode}: {summarise(lat, err, wall)}", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    results = {m: summarise(*acc[m]) for m in modes}

    on, off = results["on"], results["off"]
    ratio = {k: round(on[k] / off[k], 3) if on[k] and off[k] else None for k in ("requests_per_s", "p50_ms", "p99_ms")}
    b = base.batching
    print(f"\nmodel {model_dir}; max_new_tokens {base.generation.max_new_tokens}; {per_round * a.rounds} requests per mode "
          f"in {a.rounds} alternating rounds, concurrency {a.concurrency}; @serve.batch max_batch_size {b.max_batch_size}, "
          f"wait {b.batch_wait_timeout_s} s, max_concurrent_batches {b.max_concurrent_batches}\n")
    print("| dynamic batching | req/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("on", "off"):
        r = results[mode]
        print(f"| {mode} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
    print(f"| on / off | {ratio['requests_per_s']} | {ratio['p50_ms']} | {ratio['p99_ms']} | |\n")
    print(json.dumps({"bench": "serve_dynamic_batching", "model": str(model_dir), "cpus": os.cpu_count(),
                      "max_new_tokens": base.generation.max_new_tokens, "max_batch_size": b.max_batch_size,
                      "batch_wait_timeout_s": b.batch_wait_timeout_s, "max_concurrent_batches": b.max_concurrent_batches,
                      "requests_per_mode": per_round * a.rounds, "concurrency": a.concurrency, "rounds": a.rounds,
                      "on": on, "off": off, "ratio_on_off": ratio}))
    return 0 if not (on["errors"] or off["errors"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
