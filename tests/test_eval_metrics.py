"""rlsys.eval.compute_metrics: what the eval and the demo's report read, from answers as the model writes them."""

import pytest

from rlsys.data import Instance, Sample
from rlsys.eval import compute_metrics
from rlsys.targets import answer_text


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
