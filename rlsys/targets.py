"""SFT conversations built online from samples (Rex-Omni paper, section 4.1).

Each call draws a fresh question for a sample: a random template, for detection a random subset
of 1..N of the image's phrases (plus, sometimes, an absent category whose answer is ``None``),
for visual prompts a random 1..N of a category's boxes. The answer is rendered with
:mod:`rlsys.format` from bins made by :mod:`rlsys.coords`, boxes sorted by x0 (section 2.3).
"""

from __future__ import annotations

import random
from dataclasses import replace

from rlsys import coords, prompts
from rlsys.format import KeypointInstance, Prediction, render, render_keypoints, sort_boxes


def _bins(values, sample) -> tuple[int, ...]:
    return tuple(int(b) for b in coords.encode_xy(values, sample.width, sample.height))


def answer_text(sample) -> str:
    """The target answer for a sample as it stands (phrases in the sample's order)."""
    if sample.output == "keypoint":
        insts = []
        for k, inst in enumerate(sample.instances):
            kps = {n: (None if v == 0 else _bins((x, y), sample)) for n, (x, y, v) in (inst.keypoints or {}).items()}
            insts.append(KeypointInstance(f"{inst.phrase}{k + 1}", _bins(inst.box, sample), kps))
        return render_keypoints(insts)
    preds = []
    for phrase in sample.phrases:
        insts = sample.instances_of(phrase)
        if not insts:
            preds.append(Prediction(phrase, "none", ()))
            continue
        if sample.output == "box":
            geo = [_bins(i.box, sample) for i in insts]
        elif sample.output == "point":
            geo = [_bins(i.point if i.point is not None else _box_centre(i.box), sample) for i in insts]
        else:  # polygon
            geo = [_bins(i.polygon, sample) for i in insts]
        preds.append(Prediction(phrase, sample.output, sort_boxes(geo)))
    return render(preds)


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


def conversation(sample, rng: random.Random | None = None, all_phrases=(), max_phrases: int = 4) -> tuple:
    """``(sample_as_asked, question, answer)``; with ``rng``, randomised as for SFT."""
    if rng is not None:
        sample = augment(sample, rng, all_phrases, max_phrases)
    return sample, prompts.question_for_sample(sample, rng), answer_text(sample)
