"""Question templates per task (Rex-Omni paper, table 1 and section 2.2).

Several phrasings per task so a model does not learn one sentence; training draws one at random
(seeded), evaluation and Serve use the first. Multiple phrases are joined with ", " as in the
paper's multi-object example. Visual prompts write their example boxes in the vocabulary the
model answers in (:mod:`rlsys.lang.vocab`; coordinate tokens by default), so the model reads boxes in
the same language it writes them; a vocabulary may append wording (qwen_json: the JSON keys).
"""

from __future__ import annotations

import random

from rlsys.lang.vocab import REX_BINS

# {phrases} is filled with the comma-joined phrases, {boxes} with the visual prompt's boxes.
TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("detection", "box"): (
        "Detect {phrases}. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
        "Please detect {phrases} in this image. Return the output in box format.",
        "Locate every {phrases} in the image and give their boxes as [x0, y0, x1, y1].",
        "Find all instances of {phrases} and answer with bounding boxes.",
    ),
    ("detection", "point"): (
        "Point to {phrases}. Output the coordinates in [x0, y0] format.",
        "Please point to every {phrases} in this image.",
    ),
    ("referring", "box"): (
        "Detect {phrases}. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
        "Find the object described as: {phrases}. Return its box.",
        "Which objects match {phrases}? Answer with bounding boxes.",
    ),
    ("referring", "point"): (
        "Point to {phrases}. Output the coordinates in [x0, y0] format.",
        "Where is {phrases}? Answer with a point.",
    ),
    ("pointing", "point"): (
        "Point to {phrases}. Output the coordinates in [x0, y0] format.",
        "Please point to {phrases} in this image.",
        "Mark each {phrases} with a point.",
    ),
    ("visual_prompt", "box"): (
        "Here are some example boxes specifying the location of several objects in the image: "
        '"object1": [{boxes}]. Please detect all objects with the same category and return their '
        "bounding boxes in [x0, y0, x1, y1] format.",
        "Given reference boxes {boxes} indicating one or more objects, find all objects with the same category.",
    ),
    ("ocr", "box"): (
        "Detect all the text in box format and recognize them.",
        "Find every piece of {phrases} in the image and return its bounding box.",
    ),
    ("ocr", "polygon"): (
        "Detect all the text in polygon format and recognize them.",
        "Find every piece of {phrases} in the image and outline it with a polygon.",
    ),
    ("layout", "box"): (
        "Detect {phrases} in this document image. Output the bounding box coordinates.",
        "Locate the layout regions {phrases} and answer with boxes.",
    ),
    ("gui", "box"): (
        "Detect element {phrases} in this screenshot. Output its bounding box.",
        "Locate the UI element {phrases} and give its box.",
    ),
    ("gui", "point"): (
        "Point to element {phrases} in this screenshot.",
        "Where should I click for {phrases}? Answer with a point.",
    ),
    ("keypoint", "keypoint"): (
        "Can you detect each {phrases} in the image using a [x0, y0, x1, y1] box format, and then "
        "provide the coordinates of its {keypoints} as [x0, y0]? Output the answer in JSON format.",
    ),
}

# Masks written as sets of grid points (GETok; model.vocabulary getok). Kept apart from TEMPLATES,
# whose text the tiny model's BPE is trained on (rlsys.models._training_corpus): adding these there
# would change the merges, and so the token ids, of every tiny model built after, mask runs or not.
MASK_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("detection", "mask"): (
        "Segment {phrases}. Output each mask as a set of points.",
        "Please segment every {phrases} in this image and answer with the points of each mask.",
    ),
    ("referring", "mask"): (
        "Segment {phrases}. Output its mask as a set of points.",
        "Find the object described as: {phrases}. Return its mask as points.",
    ),
}

SYSTEM_PROMPT = "You are a helpful assistant."

# The released Rex-Omni's wording (its rex_omni/tasks.py and wrapper, read 2026-12-06; facts in
# shared/reference/rex-omni-release.md section 3), one question per task as its inference code
# asks it. A release checkpoint answers these best; a model trained here may be trained on them
# (model.prompt_set=rex_release). Kept out of TEMPLATES for the reason MASK_TEMPLATES is.
# The visual prompt lists its boxes in the release's JSON under the sample's phrase (the
# release's wrapper calls it "object_1", its eval scripts the category name) with boxes encoded
# by floor, as the release encodes them; OCR asks for "text" (the paper set ignores categories
# for OCR too). The GUI box question keeps the release's doubled quote: it is what the model saw.
RELEASE_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("detection", "box"): ("Detect {phrases}. Output the bounding box coordinates in [x0, y0, x1, y1] format.",),
    ("detection", "point"): ("Point to {phrases}.",),
    ("referring", "box"): ("Detect {phrases}. Output the bounding box coordinates in [x0, y0, x1, y1] format.",),
    ("referring", "point"): ("Point to {phrases}.",),
    ("pointing", "point"): ("Point to {phrases}.",),
    ("visual_prompt", "box"): (
        'Given reference boxes {{"{phrases}": [{boxes}]}} indicating one or more objects, find all similar '
        "objects in the image and output their bounding boxes.",
    ),
    ("ocr", "box"): ("Detect all text and recognize them.",),
    ("ocr", "polygon"): (
        "Can you detect all text in this image in polygon format like [x0, y0, x1, y1, x2, y2 ...] and then "
        "recognize them?",
    ),
    ("layout", "box"): ("Detect {phrases}. Output the bounding box coordinates in [x0, y0, x1, y1] format.",),
    ("gui", "box"): ('Detect element "{phrases}"" in the image.',),
    ("gui", "point"): ('Point to element "{phrases}".',),
    ("keypoint", "keypoint"): TEMPLATES[("keypoint", "keypoint")],
}

# model.prompt_set: the questions' wording and the system prompt (None: the chat template's own,
# "You are a helpful assistant." for Qwen2.5-VL); the release sends its own, without the period.
PROMPT_SETS: dict[str, dict] = {"paper": TEMPLATES, "rex_release": RELEASE_TEMPLATES}
SYSTEM_PROMPTS: dict[str, str | None] = {"paper": None, "rex_release": "You are a helpful assistant"}
# visual-prompt boxes: rounded to the nearest bin here, floored by the release
FLOOR_PROMPT_BOXES: dict[str, bool] = {"paper": False, "rex_release": True}


def _prompt_set(name: str) -> dict:
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
    return PROMPT_SETS[name]


def templates_for(task: str, output: str, prompt_set: str = "paper") -> tuple[str, ...]:
    try:
        return _prompt_set(prompt_set).get((task, output)) or MASK_TEMPLATES[(task, output)]
    except KeyError:
        known = ", ".join(f"{t}/{o}" for t, o in [*TEMPLATES, *MASK_TEMPLATES])
        raise ValueError(f"no prompt template for task {task!r} with output {output!r}; known: {known}") from None


def visual_prompt_boxes(boxes, width: int, height: int, vocabulary=REX_BINS, floor: bool = False) -> str:
    """Example boxes in ``vocabulary``: ``"<12><412><339><568>", ...`` for the bins (``floor``:
    bins by floor, as the release encodes them, for the vocabularies that have bins)."""
    return vocabulary.prompt_boxes(boxes, width, height, floor=floor)


def build_question(
    task: str,
    output: str,
    phrases,
    *,
    width: int | None = None,
    height: int | None = None,
    prompt_boxes=(),
    keypoint_names=(),
    rng: random.Random | None = None,
    vocabulary=REX_BINS,
    prompt_set: str = "paper",
) -> str:
    """The user question for one sample in ``prompt_set``'s wording. ``rng`` picks a template;
    without it, the first."""
    options = templates_for(task, output, prompt_set)
    template = options[rng.randrange(len(options))] if rng is not None else options[0]
    boxes = ""
    if "{boxes}" in template:
        if not prompt_boxes or width is None or height is None:
            raise ValueError("a visual prompt needs prompt_boxes and the image width and height")
        boxes = visual_prompt_boxes(prompt_boxes, width, height, vocabulary, FLOOR_PROMPT_BOXES[prompt_set])
    return template.format(
        phrases=", ".join(phrases),
        boxes=boxes,
        keypoints=", ".join(keypoint_names) or "keypoints",
    ) + vocabulary.question_hint(output)


def question_for_sample(
    sample, rng: random.Random | None = None, vocabulary=REX_BINS, prompt_set: str = "paper"
) -> str:
    """The question for a :class:`rlsys.data.samples.Sample` (for chatrex, with its proposals listed)."""
    vocabulary = vocabulary.for_sample(sample)
    kp_names: list[str] = []
    for inst in sample.instances:
        for name in inst.keypoints or {}:
            if name not in kp_names:
                kp_names.append(name)
    return build_question(
        sample.task,
        sample.output,
        sample.phrases,
        width=sample.width,
        height=sample.height,
        prompt_boxes=sample.prompt_boxes,
        keypoint_names=kp_names,
        rng=rng,
        vocabulary=vocabulary,
        prompt_set=prompt_set,
    )


def chat_prompt(processor, question: str, prompt_set: str = "paper") -> str:
    """The one chat prompt: the prompt set's system turn (none: the chat template's default),
    a user turn with the image, then ``question``, and the assistant's turn opened (SFT, the
    rollout engines, the learner, eval and Serve all send this)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    system = SYSTEM_PROMPTS[prompt_set] if prompt_set in SYSTEM_PROMPTS else _prompt_set(prompt_set)
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
