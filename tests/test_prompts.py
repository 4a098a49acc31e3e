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


# --- the released Rex-Omni's wording (model.prompt_set=rex_release) ------------------------------
def test_release_prompt_set_covers_every_task_of_the_paper_set():
    assert set(prompts.RELEASE_TEMPLATES) == set(prompts.TEMPLATES)
    assert all(len(v) == 1 for v in prompts.RELEASE_TEMPLATES.values())  # one question, as its code asks


@pytest.mark.parametrize(
    "task,output,phrases,want",
    [
        (
            "detection",
            "box",
            ["cat", "dog"],
            "Detect cat, dog. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
        ),
        ("pointing", "point", ["cat"], "Point to cat."),
        ("referring", "point", ["the red cup"], "Point to the red cup."),
        ("gui", "point", ["Submit"], 'Point to element "Submit".'),
        ("gui", "box", ["Submit"], 'Detect element "Submit"" in the image.'),
        ("ocr", "box", ["hello"], "Detect all text and recognize them."),
    ],
)
def test_release_wording(task, output, phrases, want):
    assert prompts.build_question(task, output, phrases, prompt_set="rex_release") == want
    # the paper set's canonical question differs for all but box detection
    paper = prompts.build_question(task, output, phrases)
    assert (paper == want) == (task == "detection")


def test_release_visual_prompt_is_its_json_with_boxes_by_floor():
    q = prompts.build_question(
        "visual_prompt",
        "box",
        ["object_1"],
        width=1000,
        height=1000,
        prompt_boxes=[(12, 412, 339, 568), (500, 500, 999.9, 1000)],
        prompt_set="rex_release",
    )
    # floor: 12/1000*999 = 11.99 -> 11; 412 -> 411.59 -> 411; 339 -> 338.66 -> 338; 568 -> 567.43 -> 567;
    # 500 -> 499.5 -> 499; 999.9 -> 998.9 -> 998; 1000 -> 999 (rounding gave 12, 412, 339, 567, 500, 999)
    assert q == (
        'Given reference boxes {"object_1": ["<11><411><338><567>", "<499><499><998><999>"]} indicating one or '
        "more objects, find all similar objects in the image and output their bounding boxes."
    )


def test_release_system_prompt_goes_into_the_chat(tiny_model_dir):
    from rlsys.models import load_processor

    proc = load_processor(tiny_model_dir)
    paper = prompts.chat_prompt(proc, "Point to cat.")
    release = prompts.chat_prompt(proc, "Point to cat.", "rex_release")
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in paper  # the template's default
    assert "<|im_start|>system\nYou are a helpful assistant<|im_end|>" in release  # the release's, no period
    assert release.count("<|im_start|>system") == 1 and release.endswith("<|im_start|>assistant\n")


def test_unknown_prompt_set_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown prompt set 'rex'; known: paper, rex_release"):
        prompts.build_question("detection", "box", ["x"], prompt_set="rex")
    from rlsys.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="prompt_set"):
        load_config(None, ["model.prompt_set=rex"])
