"""The check of every record's image before a run (rlsys.data.images.check_images) on a large set,
against decoding every image as the model would (the alternative a check could have used).

``python -m rlsys.bench.images [--records 100000] [--out runs/bench/images]`` writes that many
records, each with its own PNG (the demo's synthetic scenes, 112 px), then times, in one run:
the check with 8 threads, the check with 1 thread, and a full decode (``open_rgb``) of every
image. Prints and writes ``images.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from rlsys.data import synthetic
from rlsys.data.images import check_images, open_rgb
from rlsys.data.samples import Sample, load_jsonl, write_jsonl


def _dataset(out: Path, records: int) -> list[Sample]:
    """``records`` samples, each with its own image file (copies of 50 synthetic scenes: the
    check reads each file, so copies cost what distinct images of that size would)."""
    path = out / "records.jsonl"
    if path.is_file() and sum(1 for _ in path.open()) == records:
        return load_jsonl(path)
    seed = load_jsonl(synthetic.generate(out / "seed", num_images=50, seed=3, split="train", image_size=112))
    imgs = out / "images"
    imgs.mkdir(parents=True, exist_ok=True)
    samples = []
    for k in range(records):
        s = seed[k % len(seed)]
        dst = imgs / f"{k:06d}.png"
        if not dst.exists():
            shutil.copyfile(s.image, dst)
        samples.append(replace(s, id=f"r{k}", image=str(dst)))
    write_jsonl(samples, path)
    return load_jsonl(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.bench.images", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--out", default="runs/bench/images")
    a = p.parse_args(argv)
    out = Path(a.out)
    samples = _dataset(out, a.records)
    res = {"records": len(samples)}
    for name, fn in (
        ("check_8_threads_s", lambda: check_images(samples, threads=8)),
        ("check_1_thread_s", lambda: check_images(samples, threads=1)),
        ("decode_every_image_s", lambda: [open_rgb(s.image) for s in samples]),
    ):
        t0 = time.perf_counter()
        got = fn()
        res[name] = round(time.perf_counter() - t0, 2)
        if name.startswith("check"):
            assert got == [], got[:3]
    res["decode_over_check_8"] = round(res["decode_every_image_s"] / res["check_8_threads_s"], 2)
    res["check_1_over_8_threads"] = round(res["check_1_thread_s"] / res["check_8_threads_s"], 2)
    (out / "images.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
