"""The demo: how it chains its stages, and its report (the SFT-vs-GRPO table and both curves,
from metrics dicts as rlsys.eval writes them)."""

import pytest

from rlsys.config import ConfigError
from rlsys.demo import DEMO_GRPO_CONFIG, DEMO_SFT_CONFIGS, _plot, main, plan, report


def test_plan_chains_the_sft_stages_into_grpo(tmp_path):
    stages, grpo = plan(tmp_path, DEMO_SFT_CONFIGS, ["tracking.mode=disabled"], DEMO_GRPO_CONFIG, ["run.steps=3"])
    one, two = stages
    assert one.run.out_dir == str(tmp_path / "sft1") and one.model.path is None  # stage 1: random weights
    assert one.data.synthetic_max_objects == 1
    assert two.run.out_dir == str(tmp_path / "sft2") and two.model.path == str(tmp_path / "sft1" / "final")
    assert two.data.synthetic_max_objects == 3 and two.data.synthetic_one_kind_per_scene
    assert {s.tracking.mode for s in stages} == {"disabled"}  # --sft overrides reach every stage
    assert grpo.run.init_checkpoint == str(tmp_path / "sft2" / "final")
    assert grpo.data.train == str(tmp_path / "sft2" / "data" / "train.jsonl")
    assert grpo.run.steps == 3 and grpo.run.out_dir == str(tmp_path / "grpo")
    # GRPO's own synthetic settings (used when it runs alone) describe the same scenes as stage 2
    for key in ("synthetic_image_size_px", "synthetic_max_objects", "synthetic_one_kind_per_scene",
                "synthetic_position_ramp_levels", "tasks"):
        assert getattr(grpo.data, key) == getattr(two.data, key), key


def test_plan_rejects_a_bad_stage_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.steps"):
        plan(tmp_path, DEMO_SFT_CONFIGS, ["train.steps=0"], DEMO_GRPO_CONFIG, [])
    assert main(["--out", str(tmp_path), "--grpo", "learner.lr=-1"]) == 2
    assert "learner.lr" in capsys.readouterr().err
    assert not (tmp_path / "sft1").exists()  # nothing started


def _metrics(f1, dup, reward):
    det = {"F1@0.50": f1 + 0.1, "R@0.50": f1 + 0.2, "P@0.50": f1, "F1@0.95": f1 - 0.1, "F1@mIoU": f1, "R@mIoU": f1, "P@mIoU": f1,
           "duplicate_rate": dup, "large_box_rate": 0.0, "predictions_per_image": 2.5, "num_images": 10,
           "exact_count_rate": 0.5 + dup, "over_count_rate": 0.5 - dup, "under_count_rate": 0.0}
    by_task = {"detection": {"F1@0.50": f1, "F1@mIoU": f1 / 2, "exact_count_rate": 0.9},
               "referring": {"F1@0.50": 2 * f1, "F1@mIoU": f1, "exact_count_rate": 1.0}}
    return {"num_samples": 20, "detection": det, "box_tasks": by_task, "pointing": {"F1": 0.3}, "gui": {"accuracy": 0.5},
            "mean_reward": reward}


def test_report_table_change_column_and_curves(tmp_path):
    sft, grpo = _metrics(0.40, 0.20, 0.30), _metrics(0.45, 0.05, 0.41)
    steps = [{"step": 1, "reward/mean": 0.3}, {"step": 2, "reward/mean": 0.35}]
    f1_points = [(0, 0.40), (2, 0.45)]
    _plot(steps, f1_points, tmp_path)
    text = report(sft, grpo, steps, f1_points, tmp_path, ["python -m rlsys.demo --out X"])
    lines = text.splitlines()
    # values in percent, change = GRPO - SFT
    assert "| F1@mIoU | 40.0 | 45.0 | +5.0 |" in lines
    assert "| F1@0.50 | 50.0 | 55.0 | +5.0 |" in lines
    assert "| R@0.50 | 60.0 | 65.0 | +5.0 |" in lines and "| P@0.50 | 40.0 | 45.0 | +5.0 |" in lines
    assert "| duplicate rate (%) | 20.0 | 5.0 | -15.0 |" in lines
    assert "| mean reward (x100) | 30.0 | 41.0 | +11.0 |" in lines
    assert "| too many boxes (%) | 30.0 | 45.0 | +15.0 |" in lines
    assert "| detection: F1@mIoU | 20.0 | 22.5 | +2.5 |" in lines
    assert "| referring: F1@0.50 | 80.0 | 90.0 | +10.0 |" in lines
    assert "| referring: right box count (%) | 100.0 | 100.0 | +0.0 |" in lines
    assert "| pointing F1 | 30.0 | 30.0 | +0.0 |" in lines
    assert "F1@mIoU over GRPO steps: step 0: 40.0, step 2: 45.0" in text
    assert "    python -m rlsys.demo --out X" in lines
    assert (tmp_path / "report.md").read_text() == text + "\n"
    for png in ("reward_curve.png", "f1_over_steps.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_leaves_out_rows_a_run_did_not_measure(tmp_path):
    sft, grpo = _metrics(0.4, 0.2, 0.3), _metrics(0.4, 0.2, 0.3)
    del sft["gui"], grpo["gui"]
    text = report(sft, grpo, [], [(0, 0.4)], tmp_path, [])
    assert "GUI accuracy" not in text and "| F1@mIoU |" in text
