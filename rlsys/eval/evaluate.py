"""Evaluate a checkpoint on held-out data: ``python -m rlsys.eval --checkpoint DIR [--data FILE]``.

Runs the model through vLLM (greedy decoding) on every sample, then the paper's metrics
(section 5.1 F1@IoU table, 5.6 pointing F1, 5.7 GUI accuracy, 6.1.2 duplicate and large-box
rates) from :mod:`rewards.metrics`, and/or the public Rex-Omni release's evaluation of the same
figures from :mod:`rewards.release_metrics` (``--protocol paper|rex_release|both``; ``both``, the
default, keeps the paper's keys and adds the release's under ``rex_release``). Writes
``metrics.json``, ``predictions.jsonl`` and a PNG grid of predictions drawn on images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rewards import release_metrics
from rewards.box import COCO_IOU_THRESHOLDS, box_iou_f1
from rewards.geometry import decode_masks
from rewards.mask import decode_point_sets
from rewards.metrics import (
    CountTable,
    _detection_dict,
    _pointing_dict,
    count_rates,
    count_rates_weighted,
    count_table,
    detection_f1,
    detection_table,
    duplicate_rate,
    gui_accuracy,
    large_box_rate,
    mask_f1,
    pointing_f1,
    pointing_table,
)
from rewards.scorer import leave_one_out_gain, load_scorer, score, takes_vocabulary
from rlsys.config import (
    RELEASE_REPETITION_PENALTY,
    ConfigError,
    load_config,
    prepare_sync_engine_process,
    vllm_engine_args,
)
from rlsys.data import synthetic
from rlsys.data.images import open_rgb
from rlsys.data.prepare import check_targets, load_checked, mask_decoding
from rlsys.data.samples import DataError, load_dataset
from rlsys.eval.drawing import draw_predictions, predictions_in_pixels
from rlsys.lang.prompts import chat_prompt, question_for_sample
from rlsys.lang.vocab import REX_BINS, vocabulary_for
from rlsys.models import check_token_layout, processor_for

BOX_TASKS = ("detection", "referring", "visual_prompt", "layout")
# Which evaluation rules compute_metrics applies: the paper's (rewards.metrics), the public
# release's (rewards.release_metrics), or both (the paper's keys plus "rex_release").
PROTOCOLS = ("paper", "rex_release", "both")


def generate_answers(
    model_dir: str,
    samples,
    cfg,
    *,
    max_new_tokens: int | None = None,
    processor=None,
    repetition_penalty: float | None = None,
) -> list[str]:
    """Greedy answers for the samples' canonical questions (the first template of
    ``model.prompt_set``). The engine's settings (dtype, context length, memory share, eager mode,
    pixel budget) are the GRPO config's (``model`` and ``rollout``), so a 3B config evaluates on
    its GPU settings. ``repetition_penalty`` None: the prompt set's decoding (the release's 1.05
    for ``rex_release``, none for ``paper``)."""
    prepare_sync_engine_process()
    from vllm import LLM, SamplingParams

    r = cfg.rollout
    max_new_tokens = max_new_tokens or r.max_new_tokens
    if repetition_penalty is None:
        repetition_penalty = RELEASE_REPETITION_PENALTY if cfg.model.prompt_set == "rex_release" else 1.0
    ps = cfg.model.prompt_set
    proc = processor or processor_for(cfg.model, model_dir)
    vocabulary = vocabulary_for(cfg.model, proc)

    llm = LLM(**vllm_engine_args(cfg.model, model_dir, r, seed=0))
    check_token_layout(llm.get_tokenizer(), model_dir, "vLLM engine's tokenizer")
    inputs = []
    for s in samples:
        inputs.append(
            {
                "prompt": chat_prompt(proc, question_for_sample(s, vocabulary=vocabulary, prompt_set=ps), ps),
                "multi_modal_data": {"image": open_rgb(s.image)},
            }
        )
    sampling = SamplingParams(
        temperature=0.0, max_tokens=max_new_tokens, repetition_penalty=repetition_penalty, skip_special_tokens=False
    )
    outs = llm.generate(inputs, sampling, use_tqdm=False)
    del llm
    return [o.outputs[0].text for o in outs]


def task_images(samples, answers, vocabulary=None) -> dict:
    """The metrics' inputs, by task family: ``det`` (box-output box tasks, with ``det_rows`` their
    sample indices and ``det_tasks``), ``point`` (pointing with masks, ``point_rows``), ``gui_pts``
    and ``gui_boxes`` (point-output GUI: the first predicted point, the paper's metric), and
    ``gui_all`` with ``gui_all_boxes`` (every GUI sample with a target box: all its predicted
    points and boxes, the release's metric); answers read by ``vocabulary`` (default: the bins)."""
    keys = ("det", "det_rows", "det_tasks", "point", "point_rows", "gui_pts", "gui_boxes", "gui_all", "gui_all_boxes")
    d: dict = {k: [] for k in keys}
    for row, (s, text) in enumerate(zip(samples, answers)):
        preds = predictions_in_pixels(text, s, vocabulary)
        if s.task in BOX_TASKS and s.output == "box":
            d["det"].append(
                {
                    "gt": [(i.phrase, i.box) for i in s.instances],
                    "pred": [(ph, c) for ph, k, c in preds if k == "box"],
                    "width": s.width,
                    "height": s.height,
                }
            )
            d["det_rows"].append(row)
            d["det_tasks"].append(s.task)
        elif s.task == "pointing" and all(i.mask is not None for i in s.instances):
            d["point"].append(
                {
                    "gt": [(i.phrase, i.mask) for i in s.instances],
                    "pred": [(ph, c) for ph, k, c in preds if k == "point"],
                }
            )
            d["point_rows"].append(row)
        elif s.task == "gui" and s.output == "point":
            pts = [c for _, k, c in preds if k == "point"]
            d["gui_pts"].append(pts[0] if pts else None)
            d["gui_boxes"].append(s.instances[0].box)
        if s.task == "gui" and s.instances and s.instances[0].box is not None:
            d["gui_all"].append([c for _, k, c in preds if k in ("point", "box")])
            d["gui_all_boxes"].append(s.instances[0].box)
    return d


def release_figures(d: dict) -> dict:
    """The public Rex-Omni release's figures (:mod:`rewards.release_metrics`) of a
    :func:`task_images` result, by family: ``box`` (box tasks pooled, per-sample averaging, each
    sample's labels read by its task's rule) with ``box_tasks`` (each task on its own, as the
    release reports each task and dataset), ``point`` and ``gui``. Families without samples are
    left out."""
    out: dict = {}
    if d["det"]:
        modes = [release_metrics.label_mode(t) for t in d["det_tasks"]]
        out["box"] = {**release_metrics.detection_f1(d["det"], label_mode=modes), "num_images": len(d["det"])}
        out["box_tasks"] = {}
        for task in sorted(set(d["det_tasks"])):
            sub = [im for im, t in zip(d["det"], d["det_tasks"]) if t == task]
            out["box_tasks"][task] = {
                **release_metrics.detection_f1(sub, label_mode=release_metrics.label_mode(task)),
                "num_images": len(sub),
            }
    if d["point"]:
        out["point"] = {**release_metrics.pointing_f1(d["point"]), "num_images": len(d["point"])}
    if d["gui_all"]:
        out["gui"] = {
            "accuracy": release_metrics.gui_accuracy(d["gui_all"], d["gui_all_boxes"]),
            "num_queries": len(d["gui_all"]),
        }
    return out


# The figures the demo's report puts intervals on: (name, family, key of the family's figures).
BOOTSTRAP_METRICS = (
    ("box F1@0.50", "box", "F1@0.50"),
    ("box F1@mIoU", "box", "F1@mIoU"),
    ("box F1@mIoU per image", "image", "F1@mIoU_per_image"),
    ("too few boxes", "count", "under_count_rate"),
    ("too many boxes", "count", "over_count_rate"),
    ("pointing F1", "point", "F1"),
)


def per_image_box_f1(det) -> list[float]:
    """Each box image's own F1@mIoU: the answer's F1 with COCO threshold credit
    (:func:`rewards.box.box_iou_f1`, thresholds 0.50:0.95, the paper's matching, labels by phrase;
    the credit enters F1 linearly, so this is the mean of the image's F1 at each threshold). Their
    mean weighs every image alike. The pooled F1@mIoU averages over categories instead, and where
    most phrases are rare (referring: one category each) a few images carry it: on the demo's
    splits 8% of the box images, the comparative phrases, held over half of it (issue 33). The
    public Rex-Omni release's evaluation averages per image too (``rex_release``'s F1@mIoU, a
    mean of per-image F1s); this one is in the paper's matching and has a bootstrap interval."""
    out = []
    for im in det:
        pred, gt = im["pred"], im["gt"]
        r = box_iou_f1(
            [b for _, b in pred],
            [p for p, _ in pred],
            [b for _, b in gt],
            [p for p, _ in gt],
            iou_thresholds=COCO_IOU_THRESHOLDS,
        )
        out.append(r.f1)
    return out


def weighted_metrics(samples, answers, vocabulary=None) -> tuple[list[str], dict]:
    """For a bootstrap over held-out IMAGES: ``(units, {name: fn})`` where ``units`` are the
    distinct images of ``samples`` (an image asked several questions is one unit, so its
    questions are drawn together) and ``fn(weights [B, len(units)]) -> [B]`` is the named figure
    of :data:`BOOTSTRAP_METRICS` under those image multiplicities (with weights of one: the value
    :func:`compute_metrics` reports). Figures whose family has no sample are left out."""
    import numpy as np

    d = task_images(samples, answers, vocabulary)
    units = sorted({str(s.image) for s in samples})
    unit_of = {u: k for k, u in enumerate(units)}
    row_unit = np.asarray([unit_of[str(s.image)] for s in samples], dtype=np.int64)

    def over_rows(rows, f):  # weights over units -> weights over the family's rows
        cols = row_unit[np.asarray(rows, dtype=np.int64)]
        return lambda w: f(np.asarray(w, dtype=np.float64)[:, cols])

    fns: dict = {}
    if d["det"]:
        dt: CountTable = detection_table(d["det"])
        ct = count_table(d["det"])
        for name, fam, key in BOOTSTRAP_METRICS:
            if fam == "box":
                fns[name] = over_rows(
                    d["det_rows"], lambda w, key=key: _detection_dict(*dt.scores(w), dt.thresholds)[key]
                )
            elif fam == "count":
                fns[name] = over_rows(d["det_rows"], lambda w, key=key: count_rates_weighted(ct, w)[key])
            elif fam == "image":
                f1s = np.asarray(per_image_box_f1(d["det"]), dtype=np.float64)
                fns[name] = over_rows(d["det_rows"], lambda w, f1s=f1s: (w @ f1s) / np.maximum(w.sum(axis=1), 1e-12))
    if d["point"]:
        pt = pointing_table(d["point"])
        fns["pointing F1"] = over_rows(d["point_rows"], lambda w: _pointing_dict(*pt.scores(w))["F1"])
    return units, fns


def mask_images(samples, answers, vocabulary, mask_decoder: str, mask_source=None) -> tuple[list[dict], list[str]]:
    """The mask-output samples' answers as :func:`rewards.metrics.mask_f1` images (the point sets
    read by ``vocabulary.parse_masks``, :func:`predictions_in_pixels`, decoded by
    ``mask_decoder``: :mod:`rewards.mask`), and each one's task."""

    imgs, tasks = [], []
    for s, text in zip(samples, answers):
        if s.output != "mask":
            continue
        preds = [(ph, c) for ph, k, c in predictions_in_pixels(text, s, vocabulary) if k == "mask"]
        decoded = decode_point_sets(
            [c for _, c in preds],
            s,
            decoder=mask_decoder,
            mask_source=mask_source,
            grid=getattr(vocabulary, "grid", None),
        )
        gt = decode_masks([i.mask for i in s.instances], s.height, s.width, f"sample {s.id!r} masks")
        imgs.append(
            {
                "gt": [(i.phrase, m) for i, m in zip(s.instances, gt)],
                "pred": [(ph, m) for (ph, _), m in zip(preds, decoded)],
            }
        )
        tasks.append(s.task)
    return imgs, tasks


def compute_metrics(
    samples,
    answers,
    vocabulary=None,
    *,
    mask_decoder: str | None = None,
    mask_source=None,
    reward=None,
    protocol: str = "both",
) -> dict:
    """The paper's metrics over the samples, by task family; answers read by ``vocabulary``
    (default: the bins). ``protocol`` (:data:`PROTOCOLS`): ``"paper"`` gives the keys below;
    ``"rex_release"`` only the release's figures under ``rex_release`` (:func:`release_figures`;
    the release has no mask F1, duplicate, large-box, count or leave-one-out figures, so those
    are left out), with ``num_samples`` and ``mean_reward``; ``"both"`` (default) the paper's keys
    unchanged plus ``rex_release``. Mask-output samples (GETok) are decoded by ``mask_decoder`` (``"sam"``
    with ``mask_source``, or ``"grid_cells"``; :func:`rlsys.data.prepare.mask_decoding` picks the
    config's) and scored by mask IoU F1 (``mask``, ``mask_tasks``); without a decoder they raise.
    ``reward``: the run's ``RewardConfig`` (default: the paper's scorer and matching), whose pull
    towards too few boxes is reported as ``detection.leave_one_out``
    (:func:`rewards.scorer.leave_one_out_gain`): over the box answers with as many boxes as
    objects (two or more), the share where dropping a box would raise that reward, and the mean
    best change."""
    import numpy as np

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    paper = protocol in ("paper", "both")
    d = task_images(samples, answers, vocabulary)
    det, det_tasks, point_imgs, gui_pts, gui_boxes = d["det"], d["det_tasks"], d["point"], d["gui_pts"], d["gui_boxes"]
    if not paper:  # the paper's figures below are skipped
        det, point_imgs, gui_pts = [], [], []

    out: dict = {"num_samples": len(samples)}
    if det:
        out["detection"] = detection_f1(det)
        out["detection"]["duplicate_rate"] = duplicate_rate(det)
        out["detection"]["large_box_rate"] = large_box_rate(det)
        out["detection"].update(count_rates(det))
        out["detection"]["num_images"] = len(det)
        image_f1 = per_image_box_f1(det)  # once: the per-task means below take their images' share
        out["detection"]["F1@mIoU_per_image"] = float(np.mean(image_f1))
        out["detection"]["predictions_per_image"] = float(np.mean([len(d["pred"]) for d in det]))
        out["detection"]["leave_one_out"] = _leave_one_out(
            samples, answers, vocabulary or REX_BINS, reward, mask_source
        )
        # Categories are averaged (paper 5.1), so in the pooled figure every referring phrase is
        # a category of its own and outweighs the few detection categories; the paper reports
        # each task on its own benchmark, and so does this.
        out["box_tasks"] = {}
        for task in sorted(set(det_tasks)):
            sub = [d for d, t in zip(det, det_tasks) if t == task]
            out["box_tasks"][task] = {
                **detection_f1(sub),
                **count_rates(sub),
                "F1@mIoU_per_image": float(np.mean([f for f, t in zip(image_f1, det_tasks) if t == task])),
                "num_images": len(sub),
            }
    if point_imgs:
        out["pointing"] = {**pointing_f1(point_imgs), "num_images": len(point_imgs)}
    if gui_pts:
        out["gui"] = {"accuracy": gui_accuracy(gui_pts, gui_boxes), "num_queries": len(gui_pts)}
    if paper and any(s.output == "mask" for s in samples):
        if mask_decoder is None:
            raise ValueError(
                "mask-output samples need a mask decoder for their metric (mask_decoder='sam' with a "
                "mask_source, or 'grid_cells'; rlsys.data.prepare.mask_decoding picks the config's)"
            )
        imgs, tasks = mask_images(samples, answers, vocabulary or REX_BINS, mask_decoder, mask_source)
        out["mask"] = {**mask_f1(imgs), "num_images": len(imgs), "decoder": mask_decoder}
        out["mask_tasks"] = {
            t: {**mask_f1([m for m, u in zip(imgs, tasks) if u == t]), "num_images": tasks.count(t)}
            for t in sorted(set(tasks))
        }
    if protocol in ("rex_release", "both"):
        out["rex_release"] = release_figures(d)
    rewards = [
        score(
            t, s, vocabulary=vocabulary or REX_BINS, mask_source=mask_source, mask_decoder=mask_decoder or "sam"
        ).reward
        for s, t in zip(samples, answers)
    ]
    out["mean_reward"] = float(np.mean(rewards))
    return out


def _leave_one_out(samples, answers, vocabulary, reward, mask_source) -> dict:
    """``detection.leave_one_out`` of :func:`compute_metrics`, under ``reward``'s scorer and matching."""
    import numpy as np

    scorer, matching = (reward.scorer, reward.matching) if reward is not None else ("rewards.scorer:score", "paper")
    score_fn = load_scorer(scorer)
    if not takes_vocabulary(score_fn):  # a scorer of its own making reads the bins only
        scorer, score_fn = "rewards.scorer:score", score
    gains = [
        g
        for s, t in zip(samples, answers)
        if (g := leave_one_out_gain(t, s, score_fn, vocabulary, matching=matching, mask_source=mask_source)) is not None
    ]
    return {
        "scorer": scorer,
        "matching": matching,
        "answers": len(gains),
        "drop_pays_rate": float(np.mean([g > 1e-9 for g in gains])) if gains else None,
        "mean_best_gain": float(np.mean(gains)) if gains else None,
    }


def draw_grid(samples, answers, path, cols: int = 4, max_images: int = 16, vocabulary=None) -> None:
    """PNG grid: ground-truth boxes green, predictions red, the question's task on top."""
    from PIL import Image

    tiles = [
        draw_predictions(s, text, label=s.task, vocabulary=vocabulary)
        for s, text in list(zip(samples, answers))[:max_images]
    ]
    if not tiles:
        return
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % cols) * w, (k // cols) * h))
    grid.save(path)


def evaluate(
    checkpoint,
    samples,
    out_dir,
    cfg=None,
    *,
    max_new_tokens: int | None = None,
    protocol: str = "both",
    repetition_penalty: float | None = None,
) -> dict:
    """``cfg``: the GRPO config whose engine settings to use (default: configs/tiny_cpu.yaml);
    ``protocol``: which metrics (:func:`compute_metrics`); ``repetition_penalty``: see
    :func:`generate_answers`."""
    if protocol not in PROTOCOLS:  # before the engine starts
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg or load_config()
    proc = processor_for(cfg.model, str(checkpoint))
    vocabulary = vocabulary_for(cfg.model, proc)
    decoder, mask_source = None, None
    if any(s.output == "mask" for s in samples):  # decided before generating: a missing decoder fails fast
        check_targets(samples, vocabulary)
        decoder, mask_source = mask_decoding(cfg.reward)
    answers = generate_answers(
        str(checkpoint),
        samples,
        cfg,
        max_new_tokens=max_new_tokens,
        processor=proc,
        repetition_penalty=repetition_penalty,
    )
    metrics = compute_metrics(
        samples,
        answers,
        vocabulary,
        mask_decoder=decoder,
        mask_source=mask_source,
        reward=cfg.reward,
        protocol=protocol,
    )
    metrics["vocabulary"] = vocabulary.name
    metrics["checkpoint"] = str(checkpoint)
    with (out / "predictions.jsonl").open("w") as f:
        for s, a in zip(samples, answers):
            f.write(json.dumps({"id": s.id, "task": s.task, "answer": a}) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    draw_grid(samples, answers, out / "predictions.png", vocabulary=vocabulary)
    return metrics


def format_table(metrics: dict) -> str:
    d = metrics.get("detection", {})
    rows = ["| metric | value |", "|---|---|"]
    for k in (
        "F1@0.50",
        "F1@0.95",
        "F1@mIoU",
        "R@mIoU",
        "P@mIoU",
        "duplicate_rate",
        "large_box_rate",
        "exact_count_rate",
        "over_count_rate",
        "under_count_rate",
    ):
        if k in d:
            rows.append(f"| {k} | {d[k]:.3f} |")
    loo = d.get("leave_one_out") or {}
    if loo.get("drop_pays_rate") is not None:
        rows.append(
            f"| dropping a box pays, {loo['scorer'].split(':')[-1]} ({loo['answers']} answers) | {loo['drop_pays_rate']:.3f} |"
        )
    for task, m in metrics.get("box_tasks", {}).items():
        rows.append(f"| {task}: F1@0.50 / F1@mIoU | {m['F1@0.50']:.3f} / {m['F1@mIoU']:.3f} |")
    if "pointing" in metrics:
        rows.append(f"| pointing F1 | {metrics['pointing']['F1']:.3f} |")
    if "gui" in metrics:
        rows.append(f"| GUI accuracy | {metrics['gui']['accuracy']:.3f} |")
    if "mask" in metrics:
        m = metrics["mask"]
        rows.append(f"| mask F1@0.50 / F1@mIoU ({m['decoder']}) | {m['F1@0.50']:.3f} / {m['F1@mIoU']:.3f} |")
    rel = metrics.get("rex_release", {})
    if "box" in rel:
        b = rel["box"]
        rows.append(f"| release protocol: F1@0.50 / F1@mIoU (mean of F1s) | {b['F1@0.50']:.3f} / {b['F1@mIoU']:.3f} |")
    for task, m in rel.get("box_tasks", {}).items():
        rows.append(f"| release protocol, {task}: F1@0.50 / F1@mIoU | {m['F1@0.50']:.3f} / {m['F1@mIoU']:.3f} |")
    if "point" in rel:
        rows.append(f"| release protocol: pointing F1 | {rel['point']['F1']:.3f} |")
    if "gui" in rel:
        rows.append(f"| release protocol: GUI accuracy (any point or box centre) | {rel['gui']['accuracy']:.3f} |")
    rows.append(f"| mean reward | {metrics['mean_reward']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="Hugging Face model directory")
    p.add_argument("--data", help="held-out .jsonl or COCO .json (default: a fresh synthetic validation split)")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    p.add_argument("--tasks", default=None, help="comma-separated tasks to keep")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length limit (default: the config's rollout.max_new_tokens; the release decodes up to 4096)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="vLLM repetition penalty (default: 1.05 with model.prompt_set=rex_release, as the release decodes; else none)",
    )
    p.add_argument(
        "--config",
        help="GRPO config whose model and rollout sections set the engine (dtype, context length, "
        "memory share, eager mode, pixel budget); default configs/tiny_cpu.yaml",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="both",
        help="metrics: the paper's (section 5.1 wording), the public Rex-Omni release's evaluation code, "
        "or both (default: the paper's keys plus the release's under 'rex_release')",
    )
    p.add_argument("overrides", nargs="*", help="config key=value, e.g. rollout.gpu_memory_utilization=0.8")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not (Path(a.checkpoint) / "config.json").is_file():
        print(f"error: {a.checkpoint} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 2

    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    if a.data:
        try:
            samples = load_checked(a.data, cfg.data.on_bad_record)
        except DataError as exc:
            print(f"data error: {exc}", file=sys.stderr)
            return 2
    else:
        samples = load_dataset(
            synthetic.generate(
                Path(a.out) / "data",
                num_images=200,
                seed=1234,
                split="val",
                mask_fraction=cfg.data.synthetic_mask_fraction,
            )
        )
    if a.tasks:
        keep = set(a.tasks.split(","))
        samples = [s for s in samples if s.task in keep]
    samples = samples[: a.limit] if a.limit else samples
    try:  # a tokenizer that does not fit the checkpoint, or lacks the vocabulary's tokens: say so
        processor_for(cfg.model, a.checkpoint, pixels=False)
    except ValueError as exc:
        print(f"model error: {exc}", file=sys.stderr)
        return 2
    m = evaluate(
        a.checkpoint,
        samples,
        a.out,
        cfg,
        max_new_tokens=a.max_new_tokens,
        protocol=a.protocol,
        repetition_penalty=a.repetition_penalty,
    )
    print(format_table(m))
    print(json.dumps(m))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
