"""SFT conversations built online from samples (Rex-Omni paper, section 4.1).

Each call draws a fresh question for a sample: a random template, for detection a random subset
of 1..N of the image's phrases (plus, sometimes, an absent category whose answer is ``None``),
for visual prompts a random 1..N of a category's boxes. The answer is the sample's geometry in
pixels, written by the vocabulary (:mod:`rlsys.lang.vocab`; Rex-Omni's bins by default, boxes sorted
by x0 as in section 2.3); a mask is written as the grid points of GETok's greedy conversion.
Keypoint answers take the paper's form, or with ``keypoint_style="rex_release"`` the released
Rex-Omni model's fenced JSON (:func:`rlsys.lang.format.render_keypoints`; Rex bins only).
"""

from __future__ import annotations

import random
from dataclasses import replace

from rewards.geometry import decode_masks
from rewards.mask import mask_to_grid_points
from rlsys.lang import coords, prompts
from rlsys.lang.format import KEYPOINT_STYLES, KeypointInstance, Prediction, render_keypoints
from rlsys.lang.vocab import REX_BINS, check_writes_masks


def answer_text(sample, vocabulary=REX_BINS, keypoint_style: str = "paper") -> str:
    """The target answer for a sample as it stands (phrases in the sample's order), written in
    ``vocabulary``; a keypoint answer in ``keypoint_style`` (``data.keypoint_style``)."""
    if keypoint_style not in KEYPOINT_STYLES:
        raise ValueError(f"keypoint style {keypoint_style!r} is not one of {', '.join(KEYPOINT_STYLES)}")
    w, h = sample.width, sample.height
    vocabulary = vocabulary.for_sample(sample)  # chatrex: the sample's proposals
    if sample.output == "keypoint":
        insts = []
        for k, inst in enumerate(sample.instances):
            kps = {n: (None if v == 0 else (x, y)) for n, (x, y, v) in (inst.keypoints or {}).items()}
            insts.append(KeypointInstance(f"{inst.phrase}{k + 1}", tuple(inst.box), kps))
        if keypoint_style == "paper":
            return vocabulary.render_keypoints(insts, w, h)
        return release_keypoints(insts, w, h, vocabulary)
    preds = []
    for phrase in sample.phrases:
        insts = sample.instances_of(phrase)
        if not insts:
            preds.append(Prediction(phrase, "none", ()))
            continue
        if sample.output == "box":
            geo = [tuple(i.box) for i in insts]
        elif sample.output == "point":
            geo = [tuple(i.point if i.point is not None else _box_centre(i.box)) for i in insts]
        elif sample.output == "mask":
            geo = [mask_points(i.mask, w, h, vocabulary) for i in insts]
        else:  # polygon
            geo = [tuple(i.polygon) for i in insts]
        preds.append(Prediction(phrase, sample.output, tuple(geo)))
    return vocabulary.render(preds, w, h)


def release_keypoints(instances, width: int, height: int, vocabulary=REX_BINS) -> str:
    """Keypoint instances in pixels written in the released Rex-Omni model's form (fenced JSON,
    ``"bbox"``, spaced quoted bins), which only the bins vocabulary writes."""
    if vocabulary.name != "rex_bins":
        raise ValueError(
            f"keypoint style rex_release writes Rex-Omni's bins; model.vocabulary {vocabulary.name} does not"
        )

    def bins(c):
        return tuple(int(b) for b in coords.encode_xy(c, width, height))

    return render_keypoints(
        [
            KeypointInstance(i.name, bins(i.box), {k: None if v is None else bins(v) for k, v in i.keypoints.items()})
            for i in instances
        ],
        style="rex_release",
    )


def mask_points(mask, width: int, height: int, vocabulary) -> tuple[float, ...]:
    """A GT mask (COCO RLE or ``H x W`` array) as the flat grid points that write it in
    ``vocabulary`` (:func:`rewards.mask.mask_to_grid_points` on its grid; the cell footprint,
    i.e. the SAM-free decoder's). A vocabulary without masks is refused, naming it."""

    check_writes_masks(vocabulary)
    m = decode_masks([mask], height, width, "mask")[0]
    return tuple(v for xy in mask_to_grid_points(m, vocabulary.grid) for v in xy)


def _box_centre(box):
    x0, y0, x1, y1 = box
    return ((x0 + x1) / 2, (y0 + y1) / 2)


def augment(sample, rng: random.Random, all_phrases=(), max_phrases: int = 4):
    """A randomised view of ``sample`` for one SFT example (section 4.1's online sampling)."""
    if sample.task in ("detection", "pointing") and len(sample.phrases) > 1:
        present = [p for p in sample.phrases if sample.instances_of(p)]
        k = rng.randint(1, min(len(sample.phrases), max_phrases))
        chosen = rng.sample(sample.phrases, k)
        if not any(p in present for p in chosen) and present:
            chosen[0] = rng.choice(present)
        sample = replace(sample, phrases=chosen, instances=[i for i in sample.instances if i.phrase in chosen])
    if sample.task == "detection" and all_phrases and rng.random() < 0.2:
        absent = [p for p in all_phrases if p not in sample.phrases and not sample.instances_of(p)]
        if absent:
            sample = replace(sample, phrases=sample.phrases + [rng.choice(absent)])
    if sample.task == "visual_prompt" and sample.instances:
        k = rng.randint(1, len(sample.instances))
        sample = replace(sample, prompt_boxes=[i.box for i in rng.sample(sample.instances, k)])
    return sample


def conversation(
    sample,
    rng: random.Random | None = None,
    all_phrases=(),
    max_phrases: int = 4,
    vocabulary=REX_BINS,
    keypoint_style: str = "paper",
    prompt_set: str = "paper",
) -> tuple:
    """``(sample_as_asked, question, answer)``; with ``rng``, randomised as for SFT; the question
    in ``prompt_set``'s wording (``model.prompt_set``)."""
    if rng is not None:
        sample = augment(sample, rng, all_phrases, max_phrases)
    question = prompts.question_for_sample(sample, rng, vocabulary, prompt_set)
    return sample, question, answer_text(sample, vocabulary, keypoint_style)
