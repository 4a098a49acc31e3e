"""The demo: how it chains its stages, and its report (the SFT-vs-GRPO table and both curves,
from metrics dicts as rlsys.eval writes them)."""

import json
from pathlib import Path

import pytest

from rlsys.config import ConfigError
from rlsys.demo import DEMO_GRPO_CONFIG, DEMO_SFT_CONFIGS, _plot, main, plan, report, smooth


def test_plan_chains_the_sft_stages_into_grpo(tmp_path):
    stages, runs = plan(
        tmp_path,
        DEMO_SFT_CONFIGS,
        ["tracking.mode=disabled"],
        DEMO_GRPO_CONFIG,
        ["run.steps=3", "run.seed=9"],
        seeds=[4, 0],
    )
    one, two = stages
    grpo = runs[0]
    assert one.run.out_dir == str(tmp_path / "sft1") and one.model.path is None  # stage 1: random weights
    assert one.data.synthetic_max_objects == 1
    assert two.run.out_dir == str(tmp_path / "sft2") and two.model.path == str(tmp_path / "sft1" / "final")
    assert two.data.synthetic_max_objects == 3 and two.data.synthetic_one_kind_per_scene
    assert {s.tracking.mode for s in stages} == {"disabled"}  # --sft overrides reach every stage
    assert grpo.run.init_checkpoint == str(tmp_path / "sft2" / "final")
    assert grpo.data.train == str(tmp_path / "sft2" / "data" / "train.jsonl")
    assert grpo.run.steps == 3 and grpo.run.out_dir == str(tmp_path / "grpo_seed4")
    # one GRPO run per seed, the seeds winning over an override, each stage labelled for its progress lines
    assert [(r.run.seed, r.run.out_dir) for r in runs] == [
        (4, str(tmp_path / "grpo_seed4")),
        (0, str(tmp_path / "grpo_seed0")),
    ]
    assert runs[1].run.init_checkpoint == grpo.run.init_checkpoint and runs[1].run.steps == 3
    assert [s.run.progress_label for s in stages] == ["[demo 1/4 sft1]", "[demo 2/4 sft2]"]
    assert [r.run.progress_label for r in runs] == ["[demo 3/4 grpo seed 4]", "[demo 4/4 grpo seed 0]"]
    with pytest.raises(ConfigError, match="distinct"):
        plan(tmp_path, DEMO_SFT_CONFIGS, [], DEMO_GRPO_CONFIG, [], seeds=[1, 1])
    # GRPO's own synthetic settings (used when it runs alone) describe the same scenes as stage 2
    for key in (
        "synthetic_image_size_px",
        "synthetic_max_objects",
        "synthetic_one_kind_per_scene",
        "synthetic_position_ramp_levels",
        "tasks",
    ):
        assert getattr(grpo.data, key) == getattr(two.data, key), key


def _finished(cfg, step):
    """A GRPO stage as grpo.run leaves it: checkpoints/latest naming a step with its trainer state."""
    import json
    from pathlib import Path

    ck = Path(cfg.run.out_dir) / "checkpoints"
    (ck / f"step_{step:06d}").mkdir(parents=True)
    (ck / f"step_{step:06d}" / "trainer_state.json").write_text(json.dumps({"step": step, "config": cfg.model_dump()}))
    (ck / "latest").write_text(f"step_{step:06d}")


def test_a_finished_grpo_stage_is_reused_only_with_its_settings(tmp_path, capsys):
    from rlsys.demo import _stage_done

    _, (then,) = plan(tmp_path, DEMO_SFT_CONFIGS, [], DEMO_GRPO_CONFIG, ["run.steps=3"], seeds=[0])
    assert not _stage_done(then)  # nothing there yet
    _finished(then, 3)
    # the same settings, labelled and checkpointed otherwise: reused
    _, (same,) = plan(
        tmp_path, DEMO_SFT_CONFIGS, [], DEMO_GRPO_CONFIG, ["run.steps=3", "run.checkpoint_every_steps=1"], seeds=[0]
    )
    assert _stage_done(same)
    # a run saved before the schema gained a setting (here the test split's size) is reused while
    # that setting stays at its default, and refused once it is given another value
    state_file = Path(then.run.out_dir) / "checkpoints" / "step_000003" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["data"]["synthetic_test_images"]
    state_file.write_text(json.dumps(state))
    assert _stage_done(same)
    _, (bigger,) = plan(
        tmp_path, DEMO_SFT_CONFIGS, [], DEMO_GRPO_CONFIG, ["run.steps=3", "data.synthetic_test_images=7"], seeds=[0]
    )
    with pytest.raises(ConfigError, match=r"data.synthetic_test_images: None then, 7 now"):
        _stage_done(bigger)
    # more steps: not done, grpo.run resumes it
    _, (longer,) = plan(tmp_path, DEMO_SFT_CONFIGS, [], DEMO_GRPO_CONFIG, ["run.steps=5"], seeds=[0])
    assert not _stage_done(longer)
    # another reward (the demo's config changed, or other --grpo overrides): refused, naming the setting
    _, (other,) = plan(
        tmp_path,
        DEMO_SFT_CONFIGS,
        [],
        DEMO_GRPO_CONFIG,
        ["run.steps=3", "reward.scorer=rewards.scorer:score", "rollout.temperature=0.5"],
        seeds=[0],
    )
    with pytest.raises(
        ConfigError,
        match=r"reward.scorer: 'rewards.scorer:score_coco_count_penalty' then, 'rewards.scorer:score' now; "
        r"rollout.temperature: 0.7 then, 0.5 now",
    ):
        _stage_done(other)
    # and main says so before anything starts
    assert main(["--out", str(tmp_path), "--seeds", "0", "--grpo", "run.steps=3", "rollout.temperature=0.5"]) == 2
    assert "finished with other settings (rollout.temperature: 0.7 then, 0.5 now)" in capsys.readouterr().err


def test_a_grpo_seed_stopped_by_sigterm_stops_the_demo(tmp_path, monkeypatch, capsys):
    """SIGTERM during a GRPO seed (grpo.run returns at a step boundary with a checkpoint, marked
    stopped): the demo stops there with the stop's exit code, rather than starting the next seed."""
    from rlsys import demo
    from rlsys.grpo.lifecycle import STOPPED_EXIT_CODE

    for k in (1, 2):  # both SFT stages finished before
        (tmp_path / f"sft{k}" / "final").mkdir(parents=True)
        (tmp_path / f"sft{k}" / "final" / "config.json").write_text("{}")
    seeds = []

    def stopped_run(cfg):
        seeds.append(cfg.run.seed)
        return {"stopped": "SIGTERM", "step": 2, "checkpoint": "step_000002"}

    monkeypatch.setattr(demo.grpo, "run", stopped_run)
    assert main(["--out", str(tmp_path), "--grpo", "run.steps=3"]) == STOPPED_EXIT_CODE
    assert seeds == [0]
    assert "grpo seed 0: stopped by SIGTERM after step 2; the same command resumes it" in capsys.readouterr().out


def test_plan_rejects_a_bad_stage_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.steps"):
        plan(tmp_path, DEMO_SFT_CONFIGS, ["train.steps=0"], DEMO_GRPO_CONFIG, [])
    assert main(["--out", str(tmp_path), "--grpo", "learner.lr=-1"]) == 2
    assert "learner.lr" in capsys.readouterr().err
    assert not (tmp_path / "sft1").exists()  # nothing started


def _metrics(f1, dup, reward):
    det = {
        "F1@0.50": f1 + 0.1,
        "R@0.50": f1 + 0.2,
        "P@0.50": f1,
        "F1@0.95": f1 - 0.1,
        "F1@mIoU": f1,
        "R@mIoU": f1,
        "P@mIoU": f1,
        "duplicate_rate": dup,
        "large_box_rate": 0.0,
        "predictions_per_image": 2.5,
        "num_images": 10,
        "exact_count_rate": 0.5 + dup,
        "over_count_rate": 0.5 - dup,
        "under_count_rate": 0.0,
    }
    by_task = {
        "detection": {"F1@0.50": f1, "F1@mIoU": f1 / 2, "exact_count_rate": 0.9},
        "referring": {"F1@0.50": 2 * f1, "F1@mIoU": f1, "exact_count_rate": 1.0},
    }
    return {
        "num_samples": 20,
        "detection": det,
        "box_tasks": by_task,
        "pointing": {"F1": 0.3},
        "gui": {"accuracy": 0.5},
        "mean_reward": reward,
    }


def test_smooth_is_a_trailing_mean():
    # window 2: [1], [1, 3], [3, 5], [5, 7] -> 1, 2, 4, 6
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([2.0, 4.0], 10) == [2.0, 3.0]
    with pytest.raises(ValueError):
        smooth([1.0], 0)


def test_report_table_seed_columns_intervals_and_curves(tmp_path):
    sft = _metrics(0.40, 0.20, 0.30)
    grpo = [_metrics(0.45, 0.05, 0.41), _metrics(0.41, 0.10, 0.35)]
    steps = {
        0: [{"step": 1, "reward/mean": 0.3}, {"step": 2, "reward/mean": 0.35}],
        1: [{"step": 1, "reward/mean": 0.2}, {"step": 2, "reward/mean": 0.4}],
    }
    f1 = {0: [(0, 0.40), (2, 0.45)], 1: [(0, 0.40), (2, 0.41)]}
    intervals = {
        "box F1@mIoU": {
            "base": 0.40,
            "change": 0.03,
            "lo": 0.01,
            "hi": 0.05,
            "excludes_zero": True,
            "n_resamples": 500,
            "per_run": [{"change": 0.05, "lo": 0.02, "hi": 0.08}, {"change": 0.01, "lo": -0.02, "hi": 0.04}],
        },
        "too few boxes": {
            "base": 0.0,
            "change": 0.0,
            "lo": -0.01,
            "hi": 0.01,
            "excludes_zero": False,
            "n_resamples": 500,
            "per_run": [{"change": 0.0, "lo": -0.01, "hi": 0.01}] * 2,
        },
    }
    _plot(steps, f1, tmp_path, window=2)
    text = report(sft, grpo, steps, f1, tmp_path, ["python -m rlsys.demo --out X"], intervals, window=2)
    lines = text.splitlines()
    # percent; mean over seeds, their range, mean change, each seed's change
    assert "| F1@mIoU | 40.0 | 43.0 | 41.0 .. 45.0 | +3.0 | +5.0 +1.0 |" in lines
    assert "| F1@0.50 | 50.0 | 53.0 | 51.0 .. 55.0 | +3.0 | +5.0 +1.0 |" in lines
    assert "| duplicate rate (%) | 20.0 | 7.5 | 5.0 .. 10.0 | -12.5 | -15.0 -10.0 |" in lines
    assert "| mean reward (x100) | 30.0 | 38.0 | 35.0 .. 41.0 | +8.0 | +11.0 +5.0 |" in lines
    assert "| referring: F1@0.50 | 80.0 | 86.0 | 82.0 .. 90.0 | +6.0 | +10.0 +2.0 |" in lines
    assert "| pointing F1 | 30.0 | 30.0 | 30.0 .. 30.0 | +0.0 | +0.0 +0.0 |" in lines
    assert (
        "| box F1@mIoU | 40.0 | +3.0 | [+1.0, +5.0] | +5.0 [+2.0, +8.0] +1.0 [-2.0, +4.0] | "
        "yes: the interval excludes 0 |"
    ) in lines
    assert (
        "| too few boxes | 0.0 | +0.0 | [-1.0, +1.0] | +0.0 [-1.0, +1.0] +0.0 [-1.0, +1.0] | no: within noise |"
        in lines
    )
    # the smoothed training reward (window 2) and the F1 curve, per seed
    assert "- seed 0: step 2: 0.325" in lines and "- seed 1: step 2: 0.300" in lines
    assert "- seed 1: step 0: 40.0, step 2: 41.0" in lines
    assert "    python -m rlsys.demo --out X" in lines
    assert (tmp_path / "report.md").read_text() == text + "\n"
    for png in ("reward_curve.png", "f1_over_steps.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_leaves_out_rows_a_run_did_not_measure(tmp_path):
    sft, grpo = _metrics(0.4, 0.2, 0.3), _metrics(0.4, 0.2, 0.3)
    del sft["gui"], grpo["gui"]
    text = report(sft, [grpo], {}, {}, tmp_path, [])
    assert "GUI accuracy" not in text and "| F1@mIoU |" in text and "more than noise" not in text


def test_intervals_from_eval_predictions_match_the_metrics_and_refuse_other_samples(tmp_path):
    """rlsys.demo.intervals_for reads the evals' predictions.jsonl: with unit weights its figures
    are compute_metrics'; predictions of other samples (a stale eval folder) are refused by path."""
    import json

    from rlsys.data.samples import Instance, Sample
    from rlsys.demo import intervals_for
    from rlsys.eval.evaluate import compute_metrics
    from rlsys.lang.vocab import REX_BINS

    def seg(body):
        return f"<|object_ref_start|>cat<|object_ref_end|><|box_start|>{body}<|box_end|>"

    samples = [
        Sample(f"s{k}", f"img{k}.png", 999, 999, "detection", ["cat"], [Instance("cat", box=(0, 0, 500, 500))], "box")
        for k in range(4)
    ]
    sft = [seg("<0><0><500><500>"), seg("<0><0><500><250>"), seg("<600><600><900><900>"), seg("<0><0><500><500>")]
    grpo = [seg("<0><0><500><500>")] * 4

    def write(name, answers):
        p = tmp_path / name
        p.write_text("".join(json.dumps({"id": s.id, "answer": a}) + "\n" for s, a in zip(samples, answers)))
        return p

    iv = intervals_for(write("sft.jsonl", sft), [write("grpo.jsonl", grpo)], samples, REX_BINS, n_resamples=200)
    for name, key in (
        ("box F1@0.50", "F1@0.50"),
        ("box F1@mIoU", "F1@mIoU"),
        ("box F1@mIoU per image", "F1@mIoU_per_image"),
        ("too few boxes", "under_count_rate"),
    ):
        assert iv[name]["base"] == pytest.approx(compute_metrics(samples, sft)["detection"][key])
        assert iv[name]["others"][0] == pytest.approx(compute_metrics(samples, grpo)["detection"][key])
    # SFT: two exact boxes, one at IoU 0.5 exactly (counts at 0.50), one far off: F1@0.50 0.75 -> 1.0
    assert iv["box F1@0.50"]["change"] == pytest.approx(0.25) and iv["box F1@0.50"]["lo"] >= 0.0
    # per image: 1, the half box (IoU 0.5: 1 of the 10 thresholds) 0.1, 0, 1: mean 0.525 -> 1.0
    assert iv["box F1@mIoU per image"]["base"] == pytest.approx(2.1 / 4)
    assert iv["box F1@mIoU per image"]["change"] == pytest.approx(1 - 2.1 / 4)
    assert "pointing F1" not in iv  # no pointing samples: no figure
    with pytest.raises(ValueError, match="not the held-out samples in order"):
        intervals_for(write("other.jsonl", sft[:3]), [write("g.jsonl", grpo)], samples, REX_BINS)


@pytest.mark.slow
def test_make_run_chains_every_stage_with_tiny_step_counts(tmp_path):
    """`make run` as shipped (the demo's own configs and code path), each stage cut to a couple of
    steps: both SFT stages through Ray Train, one GRPO seed through the actor groups, the
    evaluations and the report. A change that breaks the README's main command, or leaves a
    stage's config unable to chain into the next, fails here rather than in a user's hour-long run."""
    import os
    import subprocess
    import sys

    out = tmp_path / "demo"
    args = [
        *("--out", str(out), "--seeds", "0", "--max-new-tokens", "16", "--bootstrap-resamples", "10"),
        "--sft",
        *("train.steps=2", "train.log_every_steps=1", "train.checkpoint_every_steps=2", "train.micro_batch_size=2"),
        *("data.synthetic_train_images=8", "data.synthetic_val_images=4", "data.synthetic_test_images=3"),
        "tracking.mode=disabled",
        "--grpo",
        *("run.steps=1", "run.prompts_per_step=2", "run.checkpoint_every_steps=1", "rollout.samples_per_prompt=2"),
        *("learner.micro_batch_size=4", "tracking.mode=disabled"),
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    r = subprocess.run(
        [sys.executable, "-m", "rlsys.demo", *args], capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for k, stage in enumerate(("sft1: 2 steps", "sft2: 2 steps", "grpo seed 0: 1 steps"), start=1):
        assert f"[demo {k}/3] {stage}" in r.stdout, r.stdout[-3000:]
    report_md = (out / "report.md").read_text()
    assert "| box F1@mIoU |" in report_md and "95% interval" in report_md
    assert report_md.startswith("# rlsys demo: SFT vs GRPO on the synthetic test split")
    assert (out / "sft2" / "final" / "config.json").is_file()
    # every checkpoint on val (choosing settings), the final models on test (the report), each its own split
    for split, n in (("val", 4), ("test", 3)):
        for name in ("sft", "grpo_seed0/step_000001"):
            assert json.loads((out / "eval" / split / name / "metrics.json").read_text())["num_samples"] == n
    assert "Held-out images: 3 samples" in report_md
