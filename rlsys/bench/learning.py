"""Does the learning loop learn, and as much as a peer's? ``python -m rlsys.bench --only learning``
(or ``python -m rlsys.bench.learning``).

From one SFT model (default: the demo's, ``runs/demo/sft2/final``) and its training data, with the
config's geometric scorer (``reward.scorer``) and the demo's GRPO settings
(``configs/demo_grpo_tiny_cpu.yaml``: G 8, lr 1e-4, KL 0.01, temperature 0.7, 64 new tokens,
the count-term reward):

- **fixed**: GRPO on a fixed set of ``--fixed-prompts`` training prompts (every step draws all of
  them) for ``--fixed-steps`` steps; the guarded figure is the GREEDY reward on those prompts
  before and after (sampled rewards rise by sharpening alone; the greedy answer is what eval and
  Serve give);
- **fresh**: GRPO on fresh prompts (each step draws ``--prompts-per-step`` new ones: the first
  steps x prompts of the training data, one epoch) for ``--fresh-steps`` steps, with the greedy reward and F1@mIoU on the held-out split at
  every checkpoint: does the gain carry over to prompts it has not seen?
- **trl**: TRL's ``GRPOTrainer`` (Hugging Face ``generate``, no Ray) on the same model, prompts,
  reward function, G, learning rate (constant), KL weight (k3), clip, token-level loss
  (TRL's ``dapo`` = rlsys's global-token normaliser), group-std scaling and step count, for
  both settings. Reported side by side: the training reward per sample seen, the held-out
  metrics of both final models (the same ``rlsys.eval``) and the wall time per 1,000 samples.

Each run is a subprocess (its own Ray, vLLM or torch threads), so they do not share memory or
warm caches; rlsys's times include its actor start-up, reported separately from its steps.
Writes ``learning.json`` and ``learning.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rewards.scorer import load_scorer, score
from rlsys.config import REPO_ROOT, ConfigError, load_config
from rlsys.data.samples import load_dataset
from rlsys.lang.prompts import question_for_sample
from rlsys.lang.vocab import vocabulary_for
from rlsys.models import load_model, param_part, processor_for

REPO = REPO_ROOT
DEMO_GRPO_CONFIG = REPO / "configs" / "demo_grpo_tiny_cpu.yaml"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _run(cmd: list[str], log: Path, timeout_s: float) -> float:
    """Run ``cmd`` with its output in ``log``; returns its wall seconds; a failure raises with the
    log's tail (a benchmark that silently drops a run would compare nothing)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=timeout_s)
    if r.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {r.returncode}); end of {log}:\n{tail}")
    return time.perf_counter() - t0


def subset(src: Path, n: int, dst: Path, tasks=None) -> Path:
    """The first ``n`` records of a JSONL data file whose task is in ``tasks`` (default: any),
    relative image paths made absolute so the copy reads the same images."""

    keep = [k for k, s in enumerate(load_dataset(src)) if tasks is None or s.task in tasks]
    if len(keep) < n:
        raise ValueError(
            f"{src}: {len(keep)} samples"
            + (f" of tasks {sorted(tasks)}" if tasks else "")
            + f", fewer than the {n} asked for"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    lines = [l for l in src.read_text().splitlines() if l.strip()]
    lines = [lines[k] for k in keep[:n]]
    base = src.parent.resolve()
    out = []
    for l in lines:
        r = json.loads(l)
        if not Path(r["image"]).is_absolute():
            r["image"] = str(base / r["image"])
        out.append(json.dumps(r))
    dst.write_text("\n".join(out) + "\n")
    return dst


def _cached(out: Path, done: str, args: dict) -> bool:
    """Whether ``out`` holds a finished result (``done``) of the same ``args``; a folder that holds
    another run's result is an error (silently reusing it would compare the wrong runs), and an
    unfinished one is redone. The arguments are recorded for the next call."""
    rec = out / "bench_args.json"
    args = json.loads(json.dumps(args))  # str paths, lists: as they read back
    if rec.is_file() and json.loads(rec.read_text()) != args:
        if (out / done).is_file():
            raise RuntimeError(
                f"{out} holds a result of other settings ({rec}: {rec.read_text().strip()}); "
                f"pass another --out, or delete it to redo"
            )
    finished = (out / done).is_file() and rec.is_file()
    if not finished:
        out.mkdir(parents=True, exist_ok=True)
        rec.write_text(json.dumps(args) + "\n")
    return finished


def greedy_eval(checkpoint: Path, data: Path, out: Path, config: Path, overrides: list[str], timeout_s: float) -> dict:
    """``rlsys.eval`` (greedy, the GRPO config's engine settings) of one model on ``data``."""
    if not _cached(
        out,
        "metrics.json",
        {"checkpoint": str(checkpoint), "data": str(data), "config": str(config), "overrides": overrides},
    ):
        _run(
            [
                sys.executable,
                "-m",
                "rlsys.eval",
                "--checkpoint",
                str(checkpoint),
                "--data",
                str(data),
                "--out",
                str(out),
                "--config",
                str(config),
                *overrides,
            ],
            out.with_suffix(".log"),
            timeout_s,
        )
    m = json.loads((out / "metrics.json").read_text())
    return {
        "mean_reward": m["mean_reward"],
        "F1@mIoU": m.get("detection", {}).get("F1@mIoU"),
        "F1@0.50": m.get("detection", {}).get("F1@0.50"),
        "pointing_F1": m.get("pointing", {}).get("F1"),
        "under_count_rate": m.get("detection", {}).get("under_count_rate"),
    }


def run_rlsys(
    out: Path,
    init: Path,
    train: Path,
    steps: int,
    prompts_per_step: int,
    checkpoint_every: int,
    config: Path,
    overrides: list[str],
    timeout_s: float,
) -> dict:
    """One rlsys GRPO run; returns its per-step records and times."""
    args = {
        "init": str(init),
        "train": str(train),
        "steps": steps,
        "prompts_per_step": prompts_per_step,
        "checkpoint_every": checkpoint_every,
        "config": str(config),
        "overrides": overrides,
    }
    if not _cached(out, "wall_s.txt", args):
        wall = _run(
            [
                sys.executable,
                "-m",
                "rlsys.grpo",
                "--config",
                str(config),
                f"run.out_dir={out}",
                f"run.init_checkpoint={init}",
                f"data.train={train}",
                f"run.steps={steps}",
                f"run.prompts_per_step={prompts_per_step}",
                f"run.checkpoint_every_steps={checkpoint_every}",
                "run.resume=false",
                "tracking.mode=disabled",
                *overrides,
            ],
            out.with_suffix(".log"),
            timeout_s,
        )
        (out / "wall_s.txt").write_text(f"{wall}\n")
    steps_rec = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]
    return {
        "rewards": [r["reward/mean"] for r in steps_rec],
        "kl": [r["learner/kl"] for r in steps_rec],
        "step_s": [r["time/step_s"] for r in steps_rec],
        "wall_s": float((out / "wall_s.txt").read_text()),
        "samples_per_step": steps_rec[0]["learner/answers"] if steps_rec else 0,
        "checkpoints": sorted(str(p / "hf") for p in (out / "checkpoints").glob("step_*[0-9]")),
    }


def run_trl(
    out: Path,
    init: Path,
    train: Path,
    steps: int,
    prompts_per_step: int,
    config: Path,
    overrides: list[str],
    timeout_s: float,
    checkpoint_every: int = 0,
) -> dict:
    """One TRL GRPOTrainer run in a subprocess (:func:`trl_worker`)."""
    args = {
        "out": str(out),
        "init": str(init),
        "train": str(train),
        "steps": steps,
        "prompts_per_step": prompts_per_step,
        "config": str(config),
        "overrides": overrides,
        "checkpoint_every": checkpoint_every,
    }
    if not _cached(out, "wall_s.txt", args):
        wall = _run(
            [sys.executable, "-m", "rlsys.bench.learning", "--trl-worker", json.dumps(args)],
            out.with_suffix(".log"),
            timeout_s,
        )
        (out / "wall_s.txt").write_text(f"{wall}\n")
    recs = [json.loads(l) for l in (out / "trl_steps.jsonl").read_text().splitlines()]
    return {
        "rewards": [r["reward"] for r in recs],
        "kl": [r.get("kl", 0.0) for r in recs],
        "step_s": [r["step_s"] for r in recs],
        "wall_s": float((out / "wall_s.txt").read_text()),
        "samples_per_step": recs[0]["samples"] if recs else 0,
        "checkpoints": sorted(str(p) for p in out.glob("step_*[0-9]") if (p / "config.json").is_file()),
    }


def trl_reward_function(samples_by_id: dict, tokenizer, vocabulary, scorer=None, **scorer_kwargs):
    """``rewards.scorer.score`` (or ``scorer``, called with ``scorer_kwargs`` such as
    ``matching``, as the reward workers call it) as a TRL reward function. TRL hands it the
    decoded completions with special tokens skipped, which drops the markup and the coordinate
    tokens this scorer reads; so it decodes ``completion_ids`` itself, as the rollout engines' text
    is decoded (``skip_special_tokens=False``). The sample is found by the dataset's ``sample_id`` column."""

    scorer = scorer or score
    # as the reward workers: a scorer without vocabulary= (None here) reads the default bins
    extra = {**scorer_kwargs, **({"vocabulary": vocabulary} if vocabulary is not None else {})}

    def reward(prompts, completions, completion_ids, sample_id, **_):
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=False)
        return [float(scorer(t, samples_by_id[i], **extra).reward) for t, i in zip(texts, sample_id)]

    reward.__name__ = "rlsys_score"
    return reward


# rlsys's learner.advantage_scaling -> TRL's scale_rewards
TRL_SCALE_REWARDS = {"group_std": "group", "none": "none"}


def check_trl_maps(cfg) -> None:
    """Refuse settings TRL's run would not share, so the two systems never differ silently.
    Mapped one by one in :func:`trl_worker`: lr and its warm-up, weight decay, grad clip, KL
    weight (k3 in both), clip range, temperature, top-p, new tokens, G, advantage scaling,
    token-level loss, frozen vision, the scorer and its matching."""
    bad = []
    if cfg.run.dynamic_sampling:
        bad.append("run.dynamic_sampling (TRL draws no extra prompts)")
    if cfg.run.max_staleness_steps:
        bad.append("run.max_staleness_steps (TRL generates on-policy)")
    if cfg.reward.sam_checkpoint:
        bad.append("reward.sam_checkpoint (the TRL run has no SAM mask source)")
    if bad:
        raise ValueError("the TRL baseline cannot share these settings: " + "; ".join(bad))


def trl_worker(args: dict) -> None:
    """Train with TRL's GRPOTrainer, settings mapped from the rlsys config one by one."""
    import random

    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from actors.rewards import scorer_vocabulary

    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args["config"], args["overrides"])
    check_trl_maps(cfg)
    torch.manual_seed(cfg.run.seed)
    init = str(args["init"])
    processor = processor_for(cfg.model, init)
    # TRL left-pads the prompt ids and has the processor pad its per-token fields (Qwen2.5-VL's
    # mm_token_type_ids) on the tokenizer's side: both must be left, or the image positions of
    # every shorter prompt in a micro-batch are misplaced (a shape error in get_rope_index)
    processor.tokenizer.padding_side = "left"
    vocabulary = vocabulary_for(cfg.model, processor)
    samples = load_dataset(args["train"])
    by_id = {s.id: s for s in samples}
    rows = []
    for k, s in enumerate(samples):
        q = question_for_sample(s, random.Random(f"{cfg.run.seed}-{k}"), vocabulary)
        with Image.open(s.image) as im:
            rows.append({"prompt": [{"role": "user", "content": q}], "image": im.convert("RGB"), "sample_id": s.id})
    model = load_model(init, dtype=cfg.model.dtype)
    if cfg.learner.freeze_vision:
        for name, p in model.named_parameters():
            if param_part(name) == "vision":
                p.requires_grad_(False)
    r, G = cfg.rollout, cfg.rollout.samples_per_prompt
    targs = TRLConfig(
        output_dir=str(out / "trainer"),
        max_steps=args["steps"],
        per_device_train_batch_size=G,
        gradient_accumulation_steps=args["prompts_per_step"],  # one optimizer step per prompts x G answers, as rlsys
        # HF's warm-up gives update k (from 0) lr x k/N, rlsys's x (k+1)/N: one update apart
        num_generations=G,
        learning_rate=cfg.learner.lr,
        warmup_steps=cfg.learner.warmup_steps,
        lr_scheduler_type="constant_with_warmup" if cfg.learner.warmup_steps else "constant",
        weight_decay=cfg.learner.weight_decay,
        max_grad_norm=cfg.learner.grad_clip,
        beta=cfg.learner.kl_coef,
        epsilon=cfg.learner.clip_low,
        epsilon_high=cfg.learner.clip_high,
        temperature=r.temperature,
        top_p=r.top_p,
        max_completion_length=r.max_new_tokens,
        loss_type="dapo",
        scale_rewards=TRL_SCALE_REWARDS[cfg.learner.advantage_scaling],
        num_iterations=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=cfg.run.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        log_completions=False,
    )
    recs: list[dict] = []

    class Record(TrainerCallback):
        t0 = time.perf_counter()

        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                now = time.perf_counter()
                recs.append(
                    {
                        "step": state.global_step,
                        "reward": logs["reward"],
                        "kl": logs.get("kl", 0.0),
                        "step_s": now - Record.t0,
                        "samples": args["prompts_per_step"] * G,
                    }
                )
                Record.t0 = now
                with (out / "trl_steps.partial.jsonl").open("a") as f:
                    f.write(json.dumps(recs[-1]) + "\n")
                print(
                    f"trl step {state.global_step}/{args['steps']} reward {logs['reward']:.3f} ({recs[-1]['step_s']:.1f} s/step)",
                    flush=True,
                )

        def on_step_end(self, _args, state, control, **kw):
            every = args.get("checkpoint_every") or 0
            if every and state.global_step % every == 0 and state.global_step < args["steps"]:
                trainer.save_model(str(out / f"step_{state.global_step:06d}"))
                processor.save_pretrained(str(out / f"step_{state.global_step:06d}"))

    scorer = load_scorer(cfg.reward.scorer)
    reward_fn = trl_reward_function(
        by_id,
        processor.tokenizer,
        scorer_vocabulary(cfg.reward.scorer, vocabulary),
        scorer,
        matching=cfg.reward.matching,
        mask_source=None,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward_fn],
        args=targs,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        callbacks=[Record()],
    )
    trainer.train()
    final = out / f"step_{args['steps']:06d}"
    trainer.save_model(str(final))
    processor.save_pretrained(str(final))
    (out / "trl_steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def per_1000_samples(run: dict) -> dict:
    """Seconds per 1,000 training answers: of a step (the median step, the first dropped: robust
    to a neighbour's load on a shared machine) and of the whole run (start-up, checkpoints included)."""
    import statistics

    steps = run["step_s"][1:] or run["step_s"]
    n = run["samples_per_step"] or 1
    return {"steps_s": statistics.median(steps) / n * 1000, "wall_s": run["wall_s"] / (len(run["step_s"]) * n) * 1000}


def window_change(rewards: list[float], k: int = 10, *, n_resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """The sampled reward's change from the first ``k`` steps to the last ``k`` (mean of step
    means), with a percentile bootstrap interval: each window's steps are resampled with
    replacement, independently. Returns ``(first, last, change, lo, hi)``. Steps next to each
    other are correlated, so the interval is a floor on the uncertainty, not a test; with fewer
    than ``2 k`` steps the windows overlap, as the table's first/last columns do."""
    import numpy as np

    if not rewards:
        raise ValueError("window_change needs at least one step's reward")
    a, b = np.asarray(rewards[:k], float), np.asarray(rewards[-k:], float)
    rng = np.random.default_rng(seed)
    d = rng.choice(b, (n_resamples, len(b))).mean(1) - rng.choice(a, (n_resamples, len(a))).mean(1)
    lo, hi = np.percentile(d, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(a.mean()), float(b.mean()), float(b.mean() - a.mean()), float(lo), float(hi)


def markdown(res: dict) -> str:
    rows = [
        "| setting | system | greedy reward before -> after | held-out F1@mIoU after (fresh) | sampled reward, first -> last 10 steps (change [95% interval]) "
        "| s per 1,000 samples (median step / whole run) |",
        "|---|---|---|---|---|---|",
    ]
    for setting in ("fixed", "fresh"):
        for system in ("rlsys", "trl"):
            r = res.get(setting, {}).get(system)
            if not r:
                continue
            first, last, change, lo, hi = window_change(r["train"]["rewards"], 10)
            t = per_1000_samples(r["train"])
            f1 = r["after"].get("F1@mIoU") if setting == "fresh" else None  # fixed: scored on its training prompts
            rows.append(
                f"| {setting} | {system} | {r['before']['mean_reward']:.3f} -> {r['after']['mean_reward']:.3f} | "
                f"{'-' if f1 is None else f'{f1 * 100:.1f}'} | {first:.3f} -> {last:.3f} ({change:+.3f} [{lo:+.3f}, {hi:+.3f}]) | {t['steps_s']:.0f} / {t['wall_s']:.0f} |"
            )
        both = res.get(setting, {})
        if "rlsys" in both and "trl" in both:
            a, b = per_1000_samples(both["rlsys"]["train"]), per_1000_samples(both["trl"]["train"])
            gain = lambda r: r["after"]["mean_reward"] - r["before"]["mean_reward"]  # noqa: E731
            rows.append(
                f"| {setting} | rlsys / TRL | gain {gain(both['rlsys']):+.3f} vs {gain(both['trl']):+.3f} | | | "
                f"TRL takes {b['steps_s'] / a['steps_s']:.2f}x rlsys's step time ({b['wall_s'] / a['wall_s']:.2f}x whole run) |"
            )

    def point(m: dict) -> str:
        f1 = m.get("F1@mIoU")
        return f"{m['mean_reward']:.3f} / " + ("-" if f1 is None else f"{f1 * 100:.1f}")

    for system, r in res.get("fresh", {}).items():
        if r.get("curve"):
            rows += [
                "",
                f"fresh prompts, {system}, held-out greedy reward / F1@mIoU by step: "
                + ", ".join(f"{k}: {point(m)}" for k, m in r["curve"]),
            ]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.bench.learning", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--init", default="runs/demo/sft2/final", help="the SFT model GRPO starts from (the demo's by default)"
    )
    p.add_argument(
        "--train", default=None, help="training data (default: the SFT run's data/train.jsonl beside --init)"
    )
    p.add_argument("--val", default=None, help="held-out data (default: the SFT run's data/val.jsonl beside --init)")
    p.add_argument("--config", default=str(DEMO_GRPO_CONFIG))
    p.add_argument("--out", default="runs/bench/learning")
    p.add_argument("--only", nargs="*", choices=("fixed", "fresh"), default=["fixed", "fresh"])
    p.add_argument("--systems", nargs="*", choices=("rlsys", "trl"), default=["rlsys", "trl"])
    p.add_argument("--fixed-prompts", type=int, default=16)
    p.add_argument("--fixed-steps", type=int, default=50)
    p.add_argument("--fresh-steps", type=int, default=60)
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=20, help="fresh setting: held-out eval every N steps")
    p.add_argument("--val-limit", type=int, default=400, help="held-out samples evaluated (the first N of --val)")
    p.add_argument("--timeout-s", type=float, default=4 * 3600)
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="GRPO config key=value for both systems (e.g. learner.lr=5e-5)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.trl_worker:
        trl_worker(json.loads(a.trl_worker))
        return 0

    try:
        tasks = load_config(a.config, a.overrides).data.tasks
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    init = Path(a.init).resolve()
    if not (init / "config.json").is_file():
        print(
            f"error: {init} is not a model directory; run the demo's SFT first (python -m rlsys.demo) or pass --init",
            file=sys.stderr,
        )
        return 2
    train = Path(a.train or init.parent / "data" / "train.jsonl").resolve()
    val = Path(a.val or init.parent / "data" / "val.jsonl").resolve()
    for path in (train, val):
        if not path.is_file():
            print(f"error: {path}: no such data file (pass --train / --val)", file=sys.stderr)
            return 2
    out = Path(a.out).resolve()

    # the tasks the GRPO config trains on, as many as there are up to --val-limit
    n_val = sum(1 for s in load_dataset(val) if not tasks or s.task in tasks)
    val = subset(val, min(a.val_limit, n_val), out / "val.jsonl", tasks or None)
    res: dict = {
        "init": str(init),
        "train": str(train),
        "val": str(val),
        "config": a.config,
        "overrides": a.overrides,
        "cores": os.cpu_count(),
    }
    ev = lambda ckpt, data, name: greedy_eval(
        Path(ckpt), data, out / "eval" / name, Path(a.config), a.overrides, a.timeout_s
    )  # noqa: E731
    if "fixed" in a.only:
        fixed = subset(train, a.fixed_prompts, out / "fixed" / "data.jsonl", tasks or None)
        res["fixed"] = {}
        before = ev(init, fixed, "fixed_before")
        for system in a.systems:
            run_dir = out / "fixed" / system
            n = a.fixed_prompts
            t = (
                run_rlsys(
                    run_dir, init, fixed, a.fixed_steps, n, a.fixed_steps, Path(a.config), a.overrides, a.timeout_s
                )
                if system == "rlsys"
                else run_trl(run_dir, init, fixed, a.fixed_steps, n, Path(a.config), a.overrides, a.timeout_s)
            )
            res["fixed"][system] = {
                "before": before,
                "after": ev(t["checkpoints"][-1], fixed, f"fixed_{system}"),
                "train": t,
            }
            print(markdown(res), flush=True)
    if "fresh" in a.only:
        res["fresh"] = {}
        # one epoch: each prompt is drawn once, by either system (TRL holds its dataset's images in memory)
        fresh = subset(train, a.fresh_steps * a.prompts_per_step, out / "fresh" / "data.jsonl", tasks or None)
        before = ev(init, val, "fresh_before")
        for system in a.systems:
            run_dir = out / "fresh" / system
            t = (
                run_rlsys(
                    run_dir,
                    init,
                    fresh,
                    a.fresh_steps,
                    a.prompts_per_step,
                    a.eval_every,
                    Path(a.config),
                    a.overrides,
                    a.timeout_s,
                )
                if system == "rlsys"
                else run_trl(
                    run_dir,
                    init,
                    fresh,
                    a.fresh_steps,
                    a.prompts_per_step,
                    Path(a.config),
                    a.overrides,
                    a.timeout_s,
                    checkpoint_every=a.eval_every,
                )
            )
            curve = [(0, before)] + [
                (
                    int(Path(c).parent.name.split("_")[1]) if system == "rlsys" else int(Path(c).name.split("_")[1]),
                    ev(c, val, f"fresh_{system}_{Path(c).parent.name if system == 'rlsys' else Path(c).name}"),
                )
                for c in t["checkpoints"]
            ]
            res["fresh"][system] = {"before": before, "after": curve[-1][1], "curve": curve, "train": t}
            print(markdown(res), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / "learning.md").write_text(md + "\n")
    print(md)
    print(json.dumps({k: v for k, v in res.items() if k not in ("fixed", "fresh")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
