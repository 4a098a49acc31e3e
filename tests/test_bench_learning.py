"""The learning benchmark's parts (rlsys.bench.learning): the peer's reward is rlsys's scorer on the
text the model wrote, its data subsets, its figures; and TRL's GRPOTrainer really trains the tiny
model through it."""

import json
from pathlib import Path

import pytest

from rlsys.bench.learning import markdown, per_1000_samples, subset, trl_reward_function


def test_trl_reward_is_the_scorer_on_the_text_with_its_control_tokens(tiny_model_dir):
    from rewards.scorer import score
    from rlsys.data.samples import Instance, Sample
    from rlsys.lang.vocab import REX_BINS
    from rlsys.models import load_processor

    tok = load_processor(str(tiny_model_dir)).tokenizer
    s = Sample("a", "img.png", 999, 999, "detection", ["cat"], [Instance("cat", box=(0, 0, 500, 500))], "box")
    exact = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><500><500><|box_end|><|im_end|>"
    half = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><500><250><|box_end|><|im_end|>"
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in (exact, half)]
    reward = trl_reward_function({"a": s}, tok, REX_BINS)
    got = reward(
        prompts=[None, None], completions=["", ""], completion_ids=ids, sample_id=["a", "a"], trainer_state=None
    )
    assert got == pytest.approx([1.0, score(half, s).reward]) and got[1] == pytest.approx(0.5)
    # what TRL decodes for its `completions` (special tokens skipped) is not the answer the scorer reads
    skipped = tok.decode(ids[0], skip_special_tokens=True)
    assert score(skipped, s).reward < 1.0


def test_subset_takes_the_first_records_with_absolute_images(synthetic_dir, tmp_path):
    src = Path(synthetic_dir) / "train.jsonl"
    dst = subset(src, 3, tmp_path / "d" / "fixed.jsonl")
    rows = [json.loads(l) for l in dst.read_text().splitlines()]
    first = [json.loads(l) for l in src.read_text().splitlines()[:3]]
    assert [r["id"] for r in rows] == [r["id"] for r in first]
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in rows)
    with pytest.raises(ValueError, match="fewer than"):
        subset(src, 10**6, tmp_path / "x.jsonl")


def test_figures_per_1000_samples_and_the_table():
    # steps of 10 s (the first, 30 s, is start-up and dropped) over 100 answers each: 100 s per
    # 1,000 answers; the whole run, 90 s for 3 x 100 answers: 300 s per 1,000.
    run = {"step_s": [30.0, 10.0, 10.0], "wall_s": 90.0, "samples_per_step": 100, "rewards": [0.2, 0.4, 0.6]}
    assert per_1000_samples(run) == {"steps_s": pytest.approx(100.0), "wall_s": pytest.approx(300.0)}
    trl = {**run, "step_s": [40.0, 20.0, 20.0], "wall_s": 120.0}
    res = {
        "fixed": {
            "rlsys": {"before": {"mean_reward": 0.3}, "after": {"mean_reward": 0.5, "F1@mIoU": 0.25}, "train": run},
            "trl": {"before": {"mean_reward": 0.3}, "after": {"mean_reward": 0.4, "F1@mIoU": None}, "train": trl},
        }
    }
    lines = markdown(res).splitlines()
    # F1@mIoU is a held-out figure: the fixed setting scores its training prompts, so it has none
    # three steps, windows of ten: both windows are all three steps (mean 0.4), no change; the
    # bootstrap of two resampled means of {0.2, 0.4, 0.6} spans +-0.267 (2/3 of a 0.4 range)
    assert "| fixed | rlsys | 0.300 -> 0.500 | - | 0.400 -> 0.400 (+0.000 [-0.267, +0.267]) | 100 / 300 |" in lines
    assert "| fixed | trl | 0.300 -> 0.400 | - | 0.400 -> 0.400 (+0.000 [-0.267, +0.267]) | 200 / 400 |" in lines
    assert (
        "| fixed | rlsys / TRL | gain +0.200 vs +0.100 | | | TRL takes 2.00x rlsys's step time (1.33x whole run) |"
        in lines
    )
    fresh = markdown({"fresh": {"rlsys": {**res["fixed"]["rlsys"], "curve": []}}}).splitlines()
    assert "| fresh | rlsys | 0.300 -> 0.500 | 25.0 | 0.400 -> 0.400 (+0.000 [-0.267, +0.267]) | 100 / 300 |" in fresh


def test_window_change_and_its_interval():
    from rlsys.bench.learning import window_change

    # each window constant: first 0, last 1, and every resample gives the same change
    assert window_change([0.0, 0.0, 1.0, 1.0], 2) == (0.0, 1.0, 1.0, 1.0, 1.0)
    # windows of 2 over [0.1, 0.3, 0.5, 0.9]: 0.2 -> 0.7, +0.5. A resampled first window's mean is
    # 0.1, 0.2 or 0.3, the last's 0.5, 0.7 or 0.9: every change lies in [0.5 - 0.3, 0.9 - 0.1] = [0.2, 0.8]
    first, last, change, lo, hi = window_change([0.1, 0.3, 0.5, 0.9], 2)
    assert (first, last, change) == pytest.approx((0.2, 0.7, 0.5))
    assert 0.2 - 1e-9 <= lo < 0.5 < hi <= 0.8 + 1e-9
    with pytest.raises(ValueError, match="at least one"):
        window_change([], 10)


def test_trl_run_shares_the_settings_or_refuses(tiny_model_dir):
    """The peer's run takes rlsys's scorer and matching (the reward workers' call), its advantage
    scaling and warm-up; a setting TRL has no counterpart for is refused, not dropped."""
    from rewards.scorer import score, score_recall_weighted
    from rlsys.bench.learning import TRL_SCALE_REWARDS, check_trl_maps
    from rlsys.config import load_config
    from rlsys.data.samples import Instance, Sample
    from rlsys.models import load_processor

    assert TRL_SCALE_REWARDS == {"group_std": "group", "none": "none"}
    for ov in (["run.dynamic_sampling=true"], ["run.max_staleness_steps=1"]):
        with pytest.raises(ValueError, match=ov[0].split("=")[0]):
            check_trl_maps(load_config(None, ov))
    check_trl_maps(load_config(None, ["learner.warmup_steps=5", "learner.advantage_scaling=none"]))
    tok = load_processor(str(tiny_model_dir)).tokenizer
    # two cats, one box written (IoU 1): F1 = 2/3, F2 = 5 * 1 * 0.5 / (4 * 1 + 0.5) = 5/9
    s = Sample(
        "a",
        "img.png",
        999,
        999,
        "detection",
        ["cat"],
        [Instance("cat", box=(0, 0, 500, 500)), Instance("cat", box=(600, 600, 900, 900))],
        "box",
    )
    ids = [
        tok(
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><500><500><|box_end|>",
            add_special_tokens=False,
        )["input_ids"]
    ]
    call = dict(prompts=[None], completions=[""], completion_ids=ids, sample_id=["a"])
    plain = trl_reward_function({"a": s}, tok, None, score, matching="hungarian")(**call)[0]
    f2 = trl_reward_function({"a": s}, tok, None, score_recall_weighted, matching="hungarian")(**call)[0]
    assert plain == pytest.approx(2 / 3) and f2 == pytest.approx(5 / 9)


@pytest.mark.slow
def test_trl_grpo_trainer_trains_the_tiny_model_on_rlsys_rewards(tiny_model_dir, synthetic_dir, tmp_path):
    """TRL's GRPOTrainer, configured from the demo's GRPO config as the benchmark does, runs two
    steps on the tiny model and writes a model rlsys can load, with per-step records."""
    # questions of different lengths (a detection and a pointing question) share a micro-batch:
    # the padding of TRL's prompt ids and of the processor's image-token types must agree
    import random

    from rlsys.bench.learning import DEMO_GRPO_CONFIG, run_trl
    from rlsys.data.samples import load_dataset
    from rlsys.lang.prompts import question_for_sample
    from rlsys.models import load_processor

    rows = [json.loads(l) for l in (Path(synthetic_dir) / "train.jsonl").read_text().splitlines()]
    tok = load_processor(str(tiny_model_dir)).tokenizer
    # the shortest and the longest question (as the worker words them): the most padding
    n = [
        len(tok(question_for_sample(s, random.Random(f"0-{k}")))["input_ids"])
        for k, s in enumerate(load_dataset(Path(synthetic_dir) / "train.jsonl"))
    ]
    picked = [rows[n.index(min(n))], rows[n.index(max(n))]]
    assert max(n) - min(n) >= 10, n
    for r in picked:
        r["image"] = str(Path(synthetic_dir) / r["image"])
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in picked))
    t = run_trl(
        tmp_path / "trl",
        Path(tiny_model_dir),
        data,
        steps=2,
        prompts_per_step=2,
        config=DEMO_GRPO_CONFIG,
        overrides=["rollout.max_new_tokens=16", "rollout.samples_per_prompt=2", "data.tasks=null"],
        timeout_s=900,
        checkpoint_every=1,
    )
    # the demo's reward is F1 with the two-sided count term (rewards.scorer.score_coco_count_penalty): [-0.3, 1]
    from rewards.scorer import COUNT_PENALTY

    assert len(t["rewards"]) == 2 and t["samples_per_step"] == 4
    assert all(-COUNT_PENALTY <= r <= 1.0 for r in t["rewards"]), t["rewards"]
    assert [Path(c).name for c in t["checkpoints"]] == ["step_000001", "step_000002"]
    from rlsys.models import load_model, load_processor

    load_model(t["checkpoints"][-1])
    load_processor(t["checkpoints"][-1])


@pytest.mark.slow
def test_the_learning_benchmark_runs_at_toy_size_and_writes_its_table(sft_run, tmp_path):
    """`python -m rlsys.bench.learning` end to end at toy size, on the shared SFT model: the
    greedy evaluation before, rlsys's GRPO run (LoRA, the paper's reward on visual prompts: the
    settings of the LoRA figure in the README) and the evaluation after, then its table. What it
    measures at full size (a reward that rises, beside TRL's) is a benchmark's figure, not a
    test's: 2 steps here show the path works, not that it learns."""
    import json

    from rlsys.bench import learning

    sft_out, _ = sft_run
    out = tmp_path / "bench"
    code = learning.main(
        [
            *("--init", str(sft_out / "final"), "--out", str(out), "--only", "fixed", "--systems", "rlsys"),
            # the shared SFT run made no held-out split; the fixed setting scores its training prompts
            *("--val", str(sft_out / "data" / "train.jsonl")),
            *("--fixed-prompts", "2", "--fixed-steps", "2", "--val-limit", "2", "--timeout-s", "900"),
            *("data.tasks=[visual_prompt]", "reward.scorer=rewards.scorer:score", "rollout.samples_per_prompt=4"),
            *("rollout.max_new_tokens=24", "learner.lora.rank=8", "learner.lora.alpha=16", "learner.lr=1e-3"),
        ]
    )
    assert code == 0
    res = json.loads((out / "learning.json").read_text())
    run = res["fixed"]["rlsys"]
    assert len(run["train"]["rewards"]) == 2 and run["train"]["samples_per_step"] == 2 * 4
    assert 0.0 <= run["before"]["mean_reward"] <= 1.0 and 0.0 <= run["after"]["mean_reward"] <= 1.0
    # the model after is the run's last checkpoint, not the start
    assert run["train"]["checkpoints"][-1].endswith("step_000002/hf")
    md = (out / "learning.md").read_text()
    assert "| fixed | rlsys |" in md and "[95% interval]" in md
