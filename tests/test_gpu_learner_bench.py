"""scripts/gpu_learner_bench.py (the H100 learner benchmark, torch and transformers only) at a
small size on the CPU: it builds the model from a config, runs both variants and reports what it
must; the shared prefix gives the per-answer log-probs."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_learner_bench_runs_both_variants_on_the_cpu(tiny_model_dir, tmp_path):
    out = tmp_path / "res.json"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "gpu_learner_bench.py"),
            "--model-files",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--layers",
            "2",
            "--vision-depth",
            "2",
            "--image-px",
            "112",
            "--answers",
            "3",
            "--answer-tokens",
            "5",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    p = res["prompt_tokens"]
    # the LLM runs the prompt once per answer, or once for the group
    assert res["per_answer"]["llm_tokens"] == 3 * p + 15 and res["shared"]["llm_tokens"] == p + 15
    assert res["per_answer"]["vision_patches"] == 3 * res["shared"]["vision_patches"] > 0
    assert res["max_logp_difference"] < 1e-4  # the same answers' log-probs, float32
    assert res["speedup"] > 0 and res["shared"]["answer_tokens_per_s"] > 0
    assert "shared vs per answer:" in r.stdout
