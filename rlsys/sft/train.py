"""Supervised fine-tuning as a Ray Train job: ``python -m rlsys.sft [--config FILE] [key=value ...]``.

Rex-Omni's first stage (section 4.1): conversations built online from the samples (random
templates, multi-phrase queries, visual prompts, ``None`` for absent phrases), cross-entropy on
the answer tokens only, separate learning rates for the vision encoder, the projector and the
LLM, AdamW with 3% warm-up and weight decay 0.01. Each Ray Train worker runs DeepSpeed (gloo on
CPUs). Ray Train checkpoints make the run resumable; the final model is written as a Hugging
Face directory (``out_dir/final``) that GRPO, eval and Serve load.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from actors.group import actor_env
from rlsys.config import REPO_ROOT, ConfigError, SFTConfig, deepspeed_config, describe, load_config
from rlsys.data.prepare import check_phrases, check_targets, load_checked, prepare_data_path, prepare_model_dir
from rlsys.data.samples import DataError
from rlsys.grpo import lora
from rlsys.grpo.lifecycle import STOPPED_EXIT_CODE, StopSignal
from rlsys.grpo.records import LearnerItem
from rlsys.grpo.sequences import build_batch
from rlsys.jit_builds import clear_stale_build_locks
from rlsys.lang.prompts import chat_prompt
from rlsys.lang.targets import conversation
from rlsys.lang.vocab import model_tokens, vocabulary_for
from rlsys.models import coordinate_token_ids, load_model, param_part, processor_for
from rlsys.sft.losses import answer_token_loss
from rlsys.tracking import start_tracking, wandb_init_args

log = logging.getLogger("rlsys.sft")
DEFAULT_SFT_CONFIG = REPO_ROOT / "configs" / "sft_tiny_cpu.yaml"


def param_groups(model, lrs: dict, weight_decay: float) -> list[dict]:
    """Vision encoder / projector (merger) / LLM parameter groups, each with its own lr.
    Norms and biases take no weight decay."""

    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = param_part(name)
        decay = p.ndim >= 2
        groups.setdefault((part, decay), []).append(p)
    return [
        {
            "params": ps,
            "lr": lrs[part],
            "initial_lr": lrs[part],
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_nodecay'}",
        }
        for (part, decay), ps in groups.items()
    ]


def lr_metrics(groups) -> dict[str, float]:
    """``sft/lr_<part>`` for each part's optimizer groups (vision, projector, llm; a part's
    no-decay group runs at the same rate), so each rate is logged under its own name."""
    out: dict[str, float] = {}
    for g in groups:
        out.setdefault(f"sft/lr_{g['name'].removesuffix('_nodecay')}", g["lr"])
    return out


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% (a multiplier of each group's lr)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import random

    import deepspeed
    import ray.train
    import torch

    cfg = SFTConfig.model_validate(config["cfg"])
    tr = cfg.train
    label = f"{cfg.run.progress_label} " if cfg.run.progress_label else ""
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(tr.seed + rank)
    processor = processor_for(cfg.model, config["model_dir"])
    tok = processor.tokenizer
    model = load_model(config["model_dir"], dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    if tr.lora is not None:  # adapters only; each keeps its part's lr (param_groups reads the names)
        model = lora.wrap(model, tr.lora, tokenizer=tok, tokens=model_tokens(cfg.model))
    lrs = {"vision": tr.lr_vision, "projector": tr.lr_projector, "llm": tr.lr_llm}
    optim = torch.optim.AdamW(param_groups(model, lrs, tr.weight_decay))
    clear_stale_build_locks()  # deepspeed.initialize builds DeepSpeed's CPU collective; a killed build's lock hangs it
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optim,
        config=deepspeed_config(
            micro_batch_size=tr.micro_batch_size,
            grad_clip=tr.grad_clip,
            zero_stage=tr.zero_stage,
            dtype=cfg.model.dtype,
            gradient_accumulation_steps=tr.grad_accum_steps,
        ),
    )
    # checked on the driver already; skipped records are left out here the same way
    samples = load_checked(config["train_path"], cfg.data.on_bad_record, say=lambda _msg: None)
    if cfg.data.tasks:
        samples = [s for s in samples if s.task in cfg.data.tasks]
    all_phrases = sorted({p for s in samples for p in s.phrases})

    vocabulary = vocabulary_for(cfg.model, processor)  # the targets' language
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, "ds"), tag="state")
            start = json.loads(Path(d, "state.json").read_text())["step"]
    warmup = int(tr.warmup_fraction * tr.steps)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    coord_ids = torch.tensor(coordinate_token_ids(tok)) if tr.coord_label_sigma_bins > 0 else None
    cache: dict = {}
    tracker = None
    if rank == 0 and config.get("wandb"):
        tracker = start_tracking(config["wandb"])
    t0 = time.perf_counter()
    for step in range(start, tr.steps):
        for g in engine.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, tr.steps, warmup)
        total = 0.0
        n_tok_step = 0
        for micro in range(tr.grad_accum_steps):
            # Conversations drawn from (seed, step, micro, rank): resuming replays the same data.
            rng = random.Random(f"{tr.seed}-{step}-{micro}-{rank}")
            items = []
            for _ in range(tr.micro_batch_size):
                s = samples[rng.randrange(len(samples))]
                _, q, a = conversation(
                    s,
                    rng,
                    all_phrases,
                    tr.max_phrases,
                    vocabulary,
                    keypoint_style=cfg.data.keypoint_style,
                    prompt_set=cfg.model.prompt_set,
                )
                prompt = chat_prompt(processor, q, cfg.model.prompt_set)
                ids = tok(a, add_special_tokens=False)["input_ids"] + [im_end]
                items.append(LearnerItem(prompt=prompt, image=s.image, response_ids=ids))
            inputs, targets, mask = build_batch(processor, items, tok.pad_token_id, cache)
            if len(cache) > 4096:
                cache.clear()
            logits = engine(**inputs).logits[:, :-1]
            per_token, n_tok = answer_token_loss(logits, targets, mask, coord_ids, tr.coord_label_sigma_bins)
            # mean over this micro-batch's answer tokens; DeepSpeed averages over accumulation and ranks
            loss = per_token.sum() / n_tok.clamp(min=1)
            engine.backward(loss)
            engine.step()
            total += float(loss.detach()) / tr.grad_accum_steps
            n_tok_step += int(n_tok)
        done = step + 1
        if done % tr.log_every_steps == 0 or done == tr.steps:
            m = {
                "sft/loss": total,
                "sft/answer_tokens": n_tok_step,
                "sft/s_per_step": (time.perf_counter() - t0) / (done - start),
                **lr_metrics(engine.optimizer.param_groups),
            }
            if rank == 0:
                left_min = (tr.steps - done) * m["sft/s_per_step"] / 60
                # to the process's own stdout: Ray Train routes a plain print through its logger
                # and, while W&B wraps sys.stdout, also through W&B's copy: every line came twice
                print(
                    f"{label}sft step {done}/{tr.steps} loss {total:.4f} ({m['sft/s_per_step']:.2f} s/step, {left_min:.1f} min left)",
                    file=sys.__stdout__,
                    flush=True,
                )
            if tracker:
                tracker.log(m, step=done)
        saved = done % tr.checkpoint_every_steps == 0 or done == tr.steps
        if saved:
            save_checkpoint(
                engine, processor, rank, done, final=done == tr.steps, metrics={"step": done, "loss": total}
            )
        if done < tr.steps and stop_requested(config.get("stop_flag"), rank, engine.device):
            if not saved:
                save_checkpoint(engine, processor, rank, done, final=False, metrics={"step": done, "loss": total})
            if rank == 0:
                print(f"{label}sft: stopped after step {done}, checkpoint written", file=sys.__stdout__, flush=True)
            break
    if tracker:
        tracker.finish()


class StopFlag:
    """Set by the driver when it gets SIGTERM, read by the workers after each step (a Ray actor:
    it reaches workers on every node, whatever the checkpoint storage is)."""

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def requested(self) -> bool:
        return self._set


def stop_requested(flag, rank: int, device) -> bool:
    """Whether the driver asked the run to stop. Rank 0 asks the flag and every rank takes its
    answer (one all-reduce), so all ranks stop after the same step: the checkpoint they then
    write is collective, and a rank that went on alone would wait in it for the others."""
    import ray
    import torch
    import torch.distributed as dist

    asked = 0
    if rank == 0 and flag is not None:
        try:
            asked = int(ray.get(flag.requested.remote(), timeout=60))
        except Exception as exc:  # the driver and its flag gone: Ray Train ends the workers with it
            log.warning("could not read the stop flag (%s); going on", exc)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([asked], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        asked = int(t.item())
    return bool(asked)


class SFTStopped(Exception):
    """The run stopped on SIGTERM at a step boundary with a checkpoint; the same command resumes
    it. An exception, not a return value: a caller must not go on as if the final model existed."""

    def __init__(self, signal_name: str, step: int | None, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"SFT stopped by {signal_name} after step {step} (checkpoint {checkpoint})")


def save_checkpoint(engine, processor, rank: int, step: int, *, final: bool, metrics: dict) -> None:
    """Write this rank's part of the step-``step`` checkpoint (DeepSpeed state; on the last step
    rank 0 adds the Hugging Face model) and report it to Ray Train.

    With storage on a local or shared filesystem (the default ``run.out_dir/ray_train``), each
    rank writes straight into the checkpoint's directory in storage and reports it with
    ``NO_UPLOAD``: a 3B checkpoint with its optimizer state is tens of GB, and writing it to a
    temporary directory first made it exist twice while Ray copied it. Ray registers the
    checkpoint only when every rank has reported, so a crash mid-write leaves an unregistered
    directory that a resume ignores (and the redone step overwrites). Other storage (s3://, gs://)
    is staged in a temporary directory and uploaded, as Ray Train does by default."""
    import pyarrow.fs
    import ray.train
    from ray.train import CheckpointUploadMode

    storage = ray.train.get_context().get_storage()

    def write(d: str) -> None:
        engine.save_checkpoint(os.path.join(d, "ds"), tag="state")
        if rank == 0:
            Path(d, "state.json").write_text(json.dumps({"step": step}))
            if final:
                lora.save_pretrained(engine.module, os.path.join(d, "hf"))  # with LoRA: merged
                processor.save_pretrained(os.path.join(d, "hf"))

    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        name = f"checkpoint_step_{step:07d}"
        d = storage.build_checkpoint_path_from_name(name)
        os.makedirs(d, exist_ok=True)
        write(d)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )
        return
    with tempfile.TemporaryDirectory() as d:
        write(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def run(cfg: SFTConfig) -> Path:
    """Run the Ray Train job; returns the final Hugging Face directory."""

    out = Path(cfg.run.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # the workers read the file themselves; a record that cannot be used, a phrase with a control
    # token, or a target the vocabulary cannot write (chatrex without a matching proposal), is
    # refused here, before Ray starts (the data first: it is named before a model is built)
    train_path = prepare_data_path(cfg.data, out)
    samples = load_checked(train_path, cfg.data.on_bad_record)
    model_dir = prepare_model_dir(cfg.model, out, None)
    processor = processor_for(cfg.model, model_dir, pixels=False)
    if cfg.data.tasks:
        samples = [s for s in samples if s.task in cfg.data.tasks]
    check_phrases(samples, processor.tokenizer)
    check_targets(samples, vocabulary_for(cfg.model, processor))

    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": actor_env(cpu_only=not cfg.train.use_gpu)})
    wandb_cfg = None
    if cfg.tracking.mode != "disabled":
        # Ray Train resumes from its latest checkpoint in storage: then the W&B run continues too
        resuming = cfg.run.resume and any((out / "ray_train" / "sft").glob("checkpoint_*"))
        wandb_cfg = wandb_init_args(cfg.tracking, out, out.name + "-sft", cfg.model_dump(), continue_run=resuming)
    name = "sft"
    storage = out / "ray_train"
    trainer_kwargs = dict(
        train_loop_per_worker=train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "model_dir": model_dir,
            "train_path": str(train_path),
            "wandb": wandb_cfg,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage), checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    # Ray Train (v2) resumes by itself: a run with the same name and storage path hands the
    # latest checkpoint to the workers (ray.train.get_checkpoint()); resume=false starts afresh.
    if not cfg.run.resume:
        shutil.rmtree(storage / name, ignore_errors=True)
    # SIGTERM: the driver sets the flag, the workers finish their step, write a checkpoint and
    # return; then this raises SFTStopped (exit 143 from the command line)
    flag = ray.remote(num_cpus=0)(StopFlag).remote()
    trainer_kwargs["train_loop_config"]["stop_flag"] = flag
    trainer = TorchTrainer(**trainer_kwargs)
    with StopSignal(cfg.run.stop_timeout_s) as stop:
        fitted = threading.Event()

        def pass_on() -> None:  # not from the signal handler itself: it interrupts ray.get
            while not fitted.wait(0.2):
                if stop.requested:
                    flag.set.remote()
                    return

        threading.Thread(target=pass_on, daemon=True, name="sft-stop").start()
        try:
            result = trainer.fit()
        finally:
            fitted.set()
    if result.error:
        raise RuntimeError(f"SFT failed: {result.error}")
    if stop.requested and not (result.checkpoint and (Path(result.checkpoint.path) / "hf").is_dir()):
        step = (result.metrics or {}).get("step")
        raise SFTStopped(stop.requested, step, result.checkpoint.path if result.checkpoint else None)
    final = out / "final"
    with result.checkpoint.as_directory() as d:
        src = Path(d) / "hf"
        if not src.is_dir():
            raise RuntimeError(f"the last SFT checkpoint ({result.checkpoint.path}) has no Hugging Face model")
        tmp = out / "final.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    print(f"SFT done: {final}", flush=True)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_SFT_CONFIG))
    p.add_argument("--help-config", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.help_config:
        print("\n".join(describe(SFTConfig)))
        return 0
    try:
        cfg = load_config(a.config, a.overrides, schema=SFTConfig)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print("rlsys SFT:", json.dumps(cfg.totals()), flush=True)
    try:
        run(cfg)
    except DataError as exc:  # a record that cannot be used, named with file:line (before Ray started)
        print(f"data error: {exc}", file=sys.stderr)
        return 2
    except SFTStopped as exc:
        print(f"{exc}; the same command resumes it", flush=True)
        return STOPPED_EXIT_CODE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
