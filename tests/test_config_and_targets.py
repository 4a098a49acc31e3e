import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlsys.config import ConfigError, GRPOConfig, SFTConfig, load_config
from rlsys.data import synthetic
from rlsys.data.samples import load_jsonl
from rlsys.lang.coords import decode_xy
from rlsys.lang.format import parse, parse_keypoints
from rlsys.lang.targets import answer_text, conversation

REPO = Path(__file__).resolve().parent.parent


def test_defaults_and_totals():
    cfg = load_config()
    t = cfg.totals()
    # 4 prompts x 4 samples per prompt; one rank; micro-batch 8 -> 2 micro-batches
    assert t["samples_per_step"] == 16 and t["micro_batches_per_rank_per_step"] == 2
    assert cfg.cpus_requested() <= 2  # the embedded default fits this 2-core machine


def test_sft_configs_load():
    for f in sorted((REPO / "configs").glob("sft_*.yaml")):
        load_config(f, schema=SFTConfig)


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"rollout\.samples_per_prompt: Input should be greater than or equal to 2"):
        load_config(overrides=["rollout.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match=r"learner\.bogus"):
        load_config(overrides=["learner.bogus=3"])
    with pytest.raises(ConfigError, match="multiple of 64"):
        load_config(overrides=["model.tiny_hidden_size=96"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(overrides=["learner.micro_batch_size=999"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["run.steps"])


def test_help_and_config_errors_are_fast_and_need_no_ray():
    # the entry point validates before importing Ray/vLLM/DeepSpeed
    code = (
        "import sys, rlsys.grpo.run as g; rc = g.main(['run.steps=0']); "
        "assert rc == 2, rc; assert not any(m in sys.modules for m in ('ray', 'vllm', 'deepspeed')), 'heavy import'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "run.steps" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "rlsys.grpo", "--help-config"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert r.returncode == 0 and "rollout.samples_per_prompt = 8" in r.stdout


def test_sft_targets_decode_back_to_ground_truth(tmp_path):
    samples = load_jsonl(synthetic.generate(tmp_path, num_images=80, seed=2))
    for s in samples:
        text = answer_text(s)
        if s.output == "keypoint":
            insts, bad = parse_keypoints(text)
            assert bad == 0 and len(insts) == len(s.instances)
            continue
        p = parse(text)
        assert p.unreadable == 0
        assert [x.phrase for x in p] == s.phrases
        for pred in p:
            gts = s.instances_of(pred.phrase)
            if not gts:
                assert pred.kind == "none"
                continue
            key = {"box": "box", "point": "point", "polygon": "polygon"}[pred.kind]
            got = sorted(tuple(decode_xy(c, s.width, s.height)) for c in pred.coords)
            want = sorted(tuple(getattr(g, key)) for g in gts)
            # every coordinate within the codec's bound, size / 1998
            assert np.allclose(got, want, atol=s.width / 1998 + 1e-9)


def test_conversation_sampling_is_seeded_and_keeps_present_phrases(tmp_path):
    samples = load_jsonl(synthetic.generate(tmp_path, num_images=40, seed=3, tasks=("detection",)))
    a = [conversation(s, random.Random(7), ["circle", "square", "triangle"])[1:] for s in samples]
    b = [conversation(s, random.Random(7), ["circle", "square", "triangle"])[1:] for s in samples]
    assert a == b
    for s in samples:
        asked, _, ans = conversation(s, random.Random(1), ["circle", "square", "triangle"])
        assert any(asked.instances_of(p) for p in asked.phrases)  # never a question whose answer is all None
        assert all(i.phrase in asked.phrases for i in asked.instances)


def test_zero3_is_refused_with_the_reason_for_grpo_and_sft():
    # ZeRO-3 would leave export, checkpoints and checksums reading empty partitioned parameters
    for path, key, schema in (
        (None, "learner.zero_stage", GRPOConfig),
        ("configs/sft_tiny_cpu.yaml", "train.zero_stage", SFTConfig),
    ):
        with pytest.raises(ConfigError, match=r"zero_stage 3 is not supported: ZeRO-3 partitions the parameters"):
            load_config(path, [f"{key}=3"], schema=schema)
        for ok in (0, 1, 2):
            load_config(path, [f"{key}={ok}"], schema=schema)


def test_weight_transfer_backend_follows_the_devices():
    cfg = load_config()
    assert cfg.rollout.weight_transfer == "auto" and cfg.weight_transfer_backend == "rlsys_gloo"
    gpu = load_config(overrides=["rollout.gpus_per_engine=1", "learner.gpus_per_rank=1"])
    assert gpu.weight_transfer_backend == "nccl"
    assert load_config(overrides=["rollout.weight_transfer=object_store"]).weight_transfer_backend == "object_store"
    with pytest.raises(ConfigError, match="nccl needs GPUs on both sides"):
        load_config(overrides=["rollout.weight_transfer=nccl", "rollout.gpus_per_engine=1"])


def test_sft_logs_each_parts_learning_rate_under_its_own_name(tiny_model_dir):
    """The vision encoder, the merger and the LLM train at different rates (paper: 2e-6, 2e-5,
    2e-5); each is logged under its own name, not the first group's rate as sft/lr_llm."""
    from rlsys.models import load_model
    from rlsys.sft.train import lr_factor, lr_metrics, param_groups

    groups = param_groups(load_model(tiny_model_dir), {"vision": 2e-6, "projector": 3e-5, "llm": 1e-5}, 0.01)
    assert {g["name"] for g in groups} == {
        "vision",
        "vision_nodecay",
        "projector",
        "projector_nodecay",
        "llm",
        "llm_nodecay",
    }
    assert lr_metrics(groups) == {"sft/lr_vision": 2e-6, "sft/lr_projector": 3e-5, "sft/lr_llm": 1e-5}
    f = lr_factor(5, 100, 10)  # in warm-up: every rate scaled alike
    for g in groups:
        g["lr"] = g["initial_lr"] * f
    assert lr_metrics(groups) == pytest.approx(
        {"sft/lr_vision": 2e-6 * f, "sft/lr_projector": 3e-5 * f, "sft/lr_llm": 1e-5 * f}
    )
