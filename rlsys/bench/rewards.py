"""Time the vectorised box reward against the plain-loop reference on the same input.

``python -m rlsys.bench.rewards [--samples 64] [--boxes 100] [--seed 0] [--matching paper]``

Each sample has ``--boxes`` GT boxes and as many predictions (jittered GT boxes, some random
ones, 5 labels) in a 1000x1000 image. Prints both times, their ratio, and a JSON line; exits
non-zero if the two disagree. The vectorised time is the best of several repeats (it is a few
milliseconds, and the machine is shared); the reference runs once.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from rewards.box import box_iou_f1
from rewards.reference import box_iou_f1_reference


def make_samples(num_samples: int, num_boxes: int, seed: int, num_labels: int = 5) -> list[tuple]:
    """``(pred_boxes, pred_labels, gt_boxes, gt_labels)`` per sample, pixels in a 1000x1000 image."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_samples):
        xy = rng.uniform(0, 900, (num_boxes, 2))
        gt = np.concatenate([xy, xy + rng.uniform(10, 100, (num_boxes, 2))], axis=1)
        gl = rng.integers(0, num_labels, num_boxes).tolist()
        pred = gt + rng.normal(0, 5, gt.shape)
        pl = list(gl)
        k = num_boxes // 5  # a fifth are unrelated boxes with random labels
        pred[:k] = np.concatenate([xy[:k][::-1], xy[:k][::-1] + 50], axis=1)
        pl[:k] = rng.integers(0, num_labels, k).tolist()
        out.append((pred, pl, gt, gl))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlsys.bench.rewards", description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--boxes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matching", choices=("paper", "hungarian"), default="paper")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the vectorised run (best is kept)")
    a = ap.parse_args(argv)
    samples = make_samples(a.samples, a.boxes, a.seed)
    # Reference loops take plain Python lists, as a per-box loop would get them.
    samples_ref = [(p.tolist(), pl, g.tolist(), gl) for p, pl, g, gl in samples]

    vec_s, fast = float("inf"), []
    for _ in range(max(1, a.repeats)):
        t0 = time.perf_counter()
        fast = [box_iou_f1(*s, matching=a.matching).f1 for s in samples]
        vec_s = min(vec_s, time.perf_counter() - t0)
    t0 = time.perf_counter()
    slow = [box_iou_f1_reference(*s, matching=a.matching).f1 for s in samples_ref]
    ref_s = time.perf_counter() - t0

    max_diff = float(np.max(np.abs(np.array(fast) - np.array(slow))))
    ratio = ref_s / vec_s
    print(f"box_iou_f1 ({a.matching}), {a.samples} samples x {a.boxes} GT x {a.boxes} predictions")
    print(f"  vectorised : {vec_s * 1e3:9.2f} ms  (best of {a.repeats})")
    print(f"  reference  : {ref_s * 1e3:9.2f} ms  (plain Python loop)")
    print(f"  speed-up   : {ratio:9.1f}x   max |difference| {max_diff:.2e}   mean reward {np.mean(fast):.4f}")
    print(
        json.dumps(
            {
                "bench": "box_iou_f1",
                "matching": a.matching,
                "samples": a.samples,
                "boxes": a.boxes,
                "vectorised_s": vec_s,
                "reference_s": ref_s,
                "speedup": ratio,
                "max_abs_diff": max_diff,
                "mean_reward": float(np.mean(fast)),
            }
        )
    )
    assert np.allclose(fast, slow, rtol=1e-9, atol=1e-12), f"vectorised and reference disagree by {max_diff}"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
