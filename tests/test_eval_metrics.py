"""rlsys.eval.compute_metrics: what the eval and the demo's report read, from answers as the model writes them."""

import pytest

from rlsys.data.samples import Instance, Sample
from rlsys.eval.evaluate import compute_metrics
from rlsys.lang.targets import answer_text


def _sample(sid, task, phrases, boxes):
    insts = [Instance(p, box=b) for p, b in zip(phrases, boxes)]
    return Sample(sid, "x.png", 100, 100, task, sorted(set(phrases)), insts, "box")


def test_box_tasks_are_scored_pooled_and_each_on_its_own():
    det = _sample("d", "detection", ["circle", "circle"], [(10, 10, 30, 30), (60, 60, 90, 90)])
    ref = _sample("r", "referring", ["red circle"], [(20, 20, 40, 40)])
    # detection answered exactly (its own ground truth); referring answered with a box shifted by
    # 10 px: IoU = 10 x 10 / (2 x 400 - 100) = 1/7, below every threshold
    wrong = _sample("r", "referring", ["red circle"], [(30, 30, 50, 50)])
    m = compute_metrics([det, ref], [answer_text(det), answer_text(wrong)])
    by = m["box_tasks"]
    assert set(by) == {"detection", "referring"}
    assert by["detection"]["F1@0.50"] == pytest.approx(1.0, abs=1e-3)  # 1 px at most from binning
    assert by["referring"]["F1@0.50"] == 0.0 and by["referring"]["F1@mIoU"] == 0.0
    assert by["detection"]["exact_count_rate"] == 1.0 and by["detection"]["num_images"] == 1
    # pooled: two categories averaged, one perfect and one missed -> R = P = 0.5
    assert m["detection"]["F1@0.50"] == pytest.approx(0.5, abs=1e-3)
    assert m["detection"]["num_images"] == 2 and m["detection"]["predictions_per_image"] == 1.5


def test_leave_one_out_is_measured_under_the_runs_reward():
    from rlsys.config import load_config

    three = _sample("t", "detection", ["circle"] * 3, [(0, 0, 20, 20), (40, 40, 60, 60), (70, 70, 90, 90)])
    # two boxes exact, the third on nothing: dropping it raises F1 (0.8 against 2/3) and the
    # count term's reward (0.7333 against 2/3); the exact answer loses by dropping any box
    off = _sample("t", "detection", ["circle"] * 3, [(0, 0, 20, 20), (40, 40, 60, 60), (0, 70, 10, 80)])
    two = _sample("u", "detection", ["circle"] * 2, [(0, 0, 20, 20), (40, 40, 60, 60)])
    samples = [three, three, two]
    answers = [
        answer_text(off),
        answer_text(three),
        answer_text(_sample("u", "detection", ["circle"], [(0, 0, 20, 20)])),
    ]
    loo = compute_metrics(samples, answers)["detection"]["leave_one_out"]
    assert (
        loo["scorer"] == "rewards.scorer:score" and loo["answers"] == 2
    )  # the one-box answer to two objects is not measured
    assert loo["drop_pays_rate"] == 0.5
    assert loo["mean_best_gain"] == pytest.approx((0.8 - 2 / 3 - 0.2) / 2, abs=0.01)  # binning moves IoUs a little
    cfg = load_config(overrides=["reward.scorer=rewards.scorer:score_missed_penalty"])
    loo = compute_metrics(samples, answers, reward=cfg.reward)["detection"]["leave_one_out"]
    assert loo["scorer"] == "rewards.scorer:score_missed_penalty"
    # the exact answer's best drop now also pays the count term: 0.8 - 0.2/3 against 1
    assert loo["mean_best_gain"] == pytest.approx((0.8 - 0.2 / 3 - 2 / 3 + 0.8 - 0.2 / 3 - 1) / 2, abs=0.01)
    from rlsys.eval.evaluate import format_table

    assert (
        "| dropping a box pays, score_missed_penalty (2 answers) | 0.500 |"
        in format_table(compute_metrics(samples, answers, reward=cfg.reward)).splitlines()
    )
