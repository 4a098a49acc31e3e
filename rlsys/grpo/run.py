"""GRPO on Ray: ``python -m rlsys.grpo [--config FILE] [key=value ...]``.

One step, as in the paper's section 4.2: sample prompts -> the rollout group samples G answers
each -> the reward group scores them against the image's ground truth -> group-normalised
advantages -> reference log-probs -> learner update -> weight sync to the generators. Each stage
is timed and logged. With ``run.max_staleness_steps`` N > 0 the next batches are generated while
the learner trains on this one (asynchronous rollouts), never more than N policy versions behind
the learner, and the loss importance-weights them by the engines' log-probs. With no arguments it runs ``configs/tiny_cpu.yaml``: the tiny
model on synthetic data, on this machine; under ``ray job submit`` it joins that cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from actors.group import actor_env
from rlsys.config import ConfigError, GRPOConfig, describe, load_config
from rlsys.data.prepare import (
    check_fit,
    check_phrases,
    check_point_masks,
    check_targets,
    load_samples,
    prepare_model_dir,
)
from rlsys.data.samples import DataError
from rlsys.eval.drawing import example_table
from rlsys.grpo.lifecycle import STOPPED_EXIT_CODE, StopSignal, cause_of, lost_worker
from rlsys.grpo.trainer import Groups, Trainer
from rlsys.lang.vocab import vocabulary_for
from rlsys.models import processor_for
from rlsys.tracking import start_tracking, wandb_init_args

log = logging.getLogger("rlsys.grpo")


def prepare_model(cfg: GRPOConfig) -> str:
    return prepare_model_dir(cfg.model, cfg.run.out_dir, cfg.run.init_checkpoint)


def prepare_data(cfg: GRPOConfig):
    return load_samples(cfg.data, cfg.run.out_dir, "train")


def keep_step_records(path: Path, last_step: int) -> int:
    """Rewrite ``steps.jsonl`` (atomically) with only the records of steps ``<= last_step``: a
    resumed run redoes the steps after its checkpoint, and each step appears once. Returns the
    number of records dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(path)
        log.info(
            "%s: dropped %d records of steps after %d (redone after the resume)",
            path,
            len(lines) - len(kept),
            last_step,
        )
    return len(lines) - len(kept)


def start_groups(cfg: GRPOConfig, model_dir: str, vocabulary) -> Groups:
    """The three actor groups and the weight sync between them, started and ready; a group that
    cannot start frees the ones started before it."""
    import ray

    # actors/ import Ray at module level (their classes are Ray actors): imported when a run starts
    from actors.learner import LearnerGroup
    from actors.rewards import RewardGroup
    from actors.rollout import RolloutGroup
    from actors.weight_sync import WeightSync

    have = ray.cluster_resources().get("CPU", 0)
    if cfg.cpus_requested() > have:
        log.warning(
            "the actor groups ask for %.1f CPUs but the cluster has %.1f now: they start only if an "
            "autoscaler adds nodes (lower rollout.cpus_per_engine / learner.cpus_per_rank / "
            "reward.cpus_per_worker on a small machine)",
            cfg.cpus_requested(),
            have,
        )
    start = cfg.run.actor_start_timeout_s
    t0 = time.perf_counter()
    groups = Groups(None, None, None, None)
    try:
        groups.learners = LearnerGroup(cfg, model_dir, start)
        groups.rollouts = RolloutGroup(cfg, model_dir, start)
        groups.rewards = RewardGroup(cfg.reward, start, vocabulary=vocabulary)
        # both groups load their models at once; each then waits within the same limit
        groups.learners.ready(start)
        groups.rollouts.ready(start)
    except BaseException:
        groups.shutdown()
        raise
    log.info("actors ready in %.1f s", time.perf_counter() - t0)
    groups.weights = WeightSync(
        groups.learners,
        groups.rollouts,
        cfg.weight_transfer_backend,
        cfg.rollout.weight_bucket_mib << 20,
        cfg.rollout.timeout_s,
    )
    return groups


def start_trainer(cfg: GRPOConfig, model_dir: str, samples, processor=None) -> Trainer:
    """The groups started and a :class:`Trainer` over them (resumed when ``run.resume``)."""
    processor = processor or processor_for(cfg.model, model_dir)
    vocabulary = vocabulary_for(cfg.model, processor)
    groups = start_groups(cfg, model_dir, vocabulary)
    try:
        return Trainer(cfg, groups, samples, processor, vocabulary)
    except BaseException:
        groups.shutdown()
        raise


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m rlsys.grpo",
        description=__doc__.split("\n\n")[0],
        epilog="Overrides are dotted keys, e.g. run.steps=10 rollout.samples_per_prompt=8.",
    )
    p.add_argument("--config", help="YAML values for the schema in rlsys/config.py (default: configs/tiny_cpu.yaml)")
    p.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    p.add_argument("overrides", nargs="*", help="key=value")
    return p.parse_args(argv)


def run(cfg: GRPOConfig) -> dict:
    """Run GRPO to ``cfg.run.steps``; returns the last step's metrics and the final checkpoint."""
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the data first: a record that cannot be used is named in seconds, before a model is built
    samples = prepare_data(cfg)
    model_dir = prepare_model(cfg)
    if cfg.model.path is None and cfg.run.init_checkpoint is None:
        log.warning(
            "starting GRPO from the random-weight tiny model: it cannot write the output format yet, so "
            "rewards stay near 0. Run SFT first (python -m rlsys.sft) and pass "
            "run.init_checkpoint=runs/sft-tiny/final, or run the whole demo: python -m rlsys.demo"
        )
    processor = processor_for(cfg.model, model_dir)
    vocabulary = vocabulary_for(cfg.model, processor)
    check_phrases(samples, processor.tokenizer)
    check_point_masks(samples, cfg.reward)
    check_targets(samples, vocabulary)  # chatrex: proposals for every sample
    # every prompt fits the engines' context under the pixel budget (else refused here, by name)
    samples, too_long = check_fit(
        samples,
        processor,
        cfg.rollout.max_model_len_tokens,
        cfg.rollout.max_new_tokens,
        cfg.data.too_long,
        vocabulary,
        cfg.model.prompt_set,
    )
    if not samples:
        raise ConfigError(
            f"no training sample fits rollout.max_model_len_tokens {cfg.rollout.max_model_len_tokens} "
            f"({too_long} skipped)"
        )
    import ray

    if not ray.is_initialized():
        # Joins the cluster when there is one (RAY_ADDRESS is set under `ray job submit`), else
        # starts one here. Only variables the job has not set itself go into the runtime env: Ray
        # refuses a driver that sets one the job's runtime env already sets.
        ray.init(runtime_env={"env_vars": actor_env(cpu_only=cfg.learner.gpus_per_rank == 0)}, log_to_driver=True)
    return drive(cfg, lambda c: start_trainer(c, model_dir, samples, processor))


def drive(cfg: GRPOConfig, start: Callable[[GRPOConfig], Trainer]) -> dict:
    """The run loop over a trainer that ``start(cfg)`` builds (groups started, resumed from the
    last checkpoint when there is one): steps, their records and progress, checkpoints. A lost
    worker or node (:func:`lifecycle.lost_worker`) tears the groups down and starts them again
    from the last checkpoint, up to ``run.max_restarts`` times; SIGTERM stops at the next step
    boundary with a checkpoint (:class:`lifecycle.StopSignal`). Returns the last step's metrics
    (``stopped``: the signal's name, when the run stopped early)."""
    out = Path(cfg.run.out_dir)
    restarts: list[dict] = []
    with StopSignal(cfg.run.stop_timeout_s) as stop:
        trainer = start(cfg)
        resumed = trainer.step_no > 0
        # steps after the checkpoint resumed from are redone: their old records go
        keep_step_records(out / "steps.jsonl", trainer.step_no)
        tracker = start_tracking(wandb_init_args(cfg.tracking, out, out.name, cfg.model_dump(), continue_run=resumed))
        wandb_last = int(getattr(tracker, "step", 0) or 0) if resumed else 0
        if wandb_last > trainer.step_no:
            log.warning(
                "the W&B run already holds steps up to %d, logged before the checkpoint of step %d this run resumed "
                "from; W&B keeps those first values for steps %d..%d (it refuses earlier steps), steps.jsonl holds "
                "the redone ones",
                wandb_last,
                trainer.step_no,
                trainer.step_no + 1,
                wandb_last,
            )
        metrics: dict = {}
        at_step = trainer.step_no  # the last step finished (a restart's record says after which)
        recent: deque[float] = deque(maxlen=5)  # step times, for the time left
        label = f"{cfg.run.progress_label} " if cfg.run.progress_label else ""
        try:
            while True:
                try:
                    if trainer is None:
                        # a restart: the same config, resumed from the last checkpoint whatever run.resume says
                        trainer = start(cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": True})}))
                        dropped = keep_step_records(out / "steps.jsonl", trainer.step_no)
                        restarts[-1].update(resumed_at_step=trainer.step_no, step_records_dropped=dropped)
                        _append_jsonl(out / "restarts.jsonl", restarts[-1])
                        log.warning("restart %d: running again from step %d", len(restarts), trainer.step_no)
                    at_step = trainer.step_no
                    while trainer.step_no < cfg.run.steps and not stop.requested:
                        metrics = trainer.step()
                        s = at_step = metrics["step"]
                        metrics["run/restarts"] = len(restarts)
                        # A plain per-step record beside W&B: greppable, and what resume tests compare.
                        _append_jsonl(
                            out / "steps.jsonl",
                            {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list))},
                        )
                        t = {k[5:-2]: v for k, v in metrics.items() if k.startswith("time/")}
                        recent.append(t["step"])
                        left_s = (cfg.run.steps - s) * sum(recent) / len(recent)
                        stale = (
                            f" staleness {metrics['rollout/staleness_mean']:.2f}" if cfg.run.max_staleness_steps else ""
                        )
                        print(
                            f"{label}step {s}/{cfg.run.steps} reward {metrics['reward/mean']:.3f} kl {metrics['learner/kl']:.4f} "
                            f"len {metrics['answer/length_tokens']:.1f}{stale} | {t['step']:.1f} s/step, {left_s / 60:.1f} min left | "
                            + " ".join(f"{k} {v:.1f}s" for k, v in t.items() if k != "step"),
                            flush=True,
                        )
                        log_payload = dict(metrics)
                        every = cfg.tracking.image_table_every_steps
                        if every and s % every == 0:
                            log_payload["examples"] = example_table(trainer.last_examples, trainer.vocabulary)
                        log_payload.pop("prompt_ids")
                        if s > wandb_last:  # a step redone after a restart is not logged twice
                            tracker.log(log_payload, step=s)
                            wandb_last = s
                        if s % cfg.run.checkpoint_every_steps == 0 or s == cfg.run.steps:
                            metrics["checkpoint"] = str(trainer.save(final=s == cfg.run.steps))
                        elif stop.requested:
                            metrics["checkpoint"] = str(trainer.save())
                    break
                except Exception as exc:
                    if trainer is None:  # a restart's start-up failed: its record says so
                        restarts[-1].update(resumed_at_step=None)
                        _append_jsonl(out / "restarts.jsonl", restarts[-1])
                    if stop.requested or not lost_worker(exc) or len(restarts) >= cfg.run.max_restarts:
                        raise
                    restarts.append({"restart": len(restarts) + 1, "after_step": at_step, **cause_of(exc)})
                    log.warning(
                        "restart %d of run.max_restarts %d after step %d: %s -- tearing the groups down and "
                        "starting them again from the last checkpoint (waiting up to run.actor_start_timeout_s "
                        "%.0f s for the cluster to offer their resources)",
                        len(restarts),
                        cfg.run.max_restarts,
                        at_step,
                        restarts[-1]["error"],
                        cfg.run.actor_start_timeout_s,
                    )
                    if trainer is not None:
                        trainer.shutdown()
                    trainer = None
            metrics["run/restarts"] = len(restarts)
            if stop.requested:
                metrics.update(stopped=stop.requested, step=trainer.step_no)
                return metrics
            if trainer.step_no % cfg.run.sync_every_steps:
                trainer.sync_weights()
            metrics["weights_in_sync"] = trainer.weights_in_sync()
        finally:
            tracker.finish()
            if trainer is not None:
                trainer.shutdown()  # its placement groups freed: a next run in this Ray session can place its own
    return metrics


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print("\n".join(describe()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print("rlsys GRPO:", json.dumps(cfg.totals()), flush=True)
    try:
        m = run(cfg)
    except ConfigError as exc:  # the data or model did not fit the config (named in the message)
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:  # a record that cannot be used, named with file:line (before Ray started)
        print(f"data error: {exc}", file=sys.stderr)
        return 2
    print("final:", json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float, str, bool))}), flush=True)
    if m.get("stopped"):
        where = f"checkpoint {m['checkpoint']}" if m.get("checkpoint") else "no step was run; nothing new to save"
        print(
            f"stopped by {m['stopped']} after step {m['step']} ({where}). Resume: run the same command again "
            "(run.resume is on by default)",
            file=sys.stderr,
            flush=True,
        )
        return STOPPED_EXIT_CODE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
