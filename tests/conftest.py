"""Shared fixtures. The tiny model and synthetic data are built once per test session."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from rlsys.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from rlsys.data import synthetic

    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, num_images=48, seed=0, split="train")
    synthetic.generate(out, num_images=16, seed=0, split="val")
    return out


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """SFT of the tiny model for 400 steps through Ray Train, as a user runs it (its own
    process), on the tasks whose answer is always a box (referring, visual prompts: no None
    targets), so the policy writes boxes and GRPO's rewards vary. 400 steps, not fewer: at 150
    the model still wrote three coordinates a box (the real scorer gave 0 to every answer, no
    signal for a learning test); at 400 it writes four, and the paper's reward on visual
    prompts at temperature 0.7 is ~0.04, with a spread GRPO can climb. Shared by the end-to-end
    and the distributed GRPO tests. Returns (out_dir, stdout)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONPATH": str(repo)}
    out = tmp_path_factory.mktemp("sft")
    args = [
        "rlsys.sft",
        f"run.out_dir={out}",
        "train.steps=400",
        "train.log_every_steps=25",
        "train.checkpoint_every_steps=200",
        "data.synthetic_train_images=400",
        "tracking.mode=offline",
        "data.tasks=[referring,visual_prompt]",
    ]
    r = subprocess.run([sys.executable, "-m", *args], cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"rlsys.sft failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return out, r.stdout


@pytest.fixture(scope="module")
def cluster():
    """The two-node local cluster of :func:`rlsys.bench.soak.two_node_cluster` (head: engines and
    reward workers, ``rollout_node``; second node: learner ranks, ``learner_node``)."""
    import ray

    from rlsys.bench.soak import two_node_cluster

    c = two_node_cluster()
    yield c
    ray.shutdown()
    c.shutdown()
