import random

import pytest

from rlsys.data.samples import Sample
from rlsys.lang import prompts


def test_every_task_has_several_templates_or_a_single_fixed_form():
    tasks = {t for t, _ in prompts.TEMPLATES}
    assert tasks == {"detection", "referring", "pointing", "visual_prompt", "ocr", "layout", "gui", "keypoint"}
    assert sum(len(v) for v in prompts.TEMPLATES.values()) >= 25


def test_phrases_joined_with_commas():
    q = prompts.build_question("detection", "box", ["pigeon", "person", "truck"])
    assert "pigeon, person, truck" in q


def test_visual_prompt_writes_boxes_as_coordinate_tokens():
    q = prompts.build_question(
        "visual_prompt", "box", ["object1"], width=1000, height=1000, prompt_boxes=[(12, 412, 339, 568)]
    )
    # 12/1000*999 = 11.99 -> 12; 412 -> 411.6 -> 412; 339 -> 338.7 -> 339; 568 -> 567.4 -> 567
    assert '"<12><412><339><567>"' in q


def test_seeded_choice_is_deterministic_and_varies():
    a = [prompts.build_question("detection", "box", ["x"], rng=random.Random(s)) for s in range(20)]
    b = [prompts.build_question("detection", "box", ["x"], rng=random.Random(s)) for s in range(20)]
    assert a == b and len(set(a)) > 1


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="no prompt template for task 'dance'"):
        prompts.build_question("dance", "box", ["x"])


def test_keypoint_question_names_keypoints():
    s = Sample.from_dict(
        {
            "id": "k",
            "image": "i.png",
            "width": 10,
            "height": 10,
            "task": "keypoint",
            "phrases": ["triangle"],
            "instances": [
                {"phrase": "triangle", "box": [1, 1, 5, 5], "keypoints": {"top": [3, 1, 2], "left": [1, 5, 2]}}
            ],
        }
    )
    assert "top, left" in prompts.question_for_sample(s)
