"""Benchmarks: where time goes in a GRPO step, and each part against the obvious alternative.

``python -m rlsys.bench [--config FILE] [--out DIR] [--only NAME ...]`` writes ``bench.json``
and ``bench.md``. Every figure is a ratio against an alternative run in the same process and
the same minute (this machine is shared and noisy; absolute times drift), and carries the
command that produced it.

- rollout: tokens/s of the vLLM rollout actor vs Hugging Face ``generate`` on the same model,
  prompts, images and sampling settings (both forced to the same answer length);
- rewards: box-IoU F1 vectorised vs a plain Python loop (``rlsys.bench.rewards``);
- sync: seconds per weight sync through vLLM's weight-transfer protocol (rlsys_gloo here, nccl on
  GPUs) vs the object-store fallback vs one Ray call per tensor, for the tiny model and a larger
  random model of the same architecture, and the sync's share of step time;
- sync with LoRA (with ``sync``): on the Qwen2.5-VL-3B shape, the bytes and seconds of one sync of a
  LoRA learner (merged layers reloaded, what rlsys does; adapters hot-loaded) against full
  training's (every weight), each in its own process and engine (``rlsys.bench.lora_sync``);
- distributed: step time with 1 vs 2 learner ranks and 1 vs 2 rollout engines, same batch;
- step: share of step time in generate, reward, reference, learn, sync and idle;
- scaling: step time as prompts per step doubles (2, 4, 8, 16);
- async: steps per second with asynchronous rollouts (run.max_staleness_steps 1) vs the
  synchronous loop (0) on the demo's GRPO config, and the staleness of what was learnt;
- learner: seconds and peak memory per answer of one learner step before and after it was made
  lean (no old log-prob pass, logits at answer positions only), tiny, ~30M and Qwen2.5-VL-3B-shaped
  models; and with the shared-prefix layout against one sequence per answer (G = 8 answers to one
  image at 256 and 1,024 image tokens on the 3B widths, and the demo's shape), the LLM token
  ratio beside the time ratio (``rlsys.bench.learner``);
- vocab: answer tokens per box for each spatial vocabulary (``rlsys.lang.vocab``) on the same
  answers (the SFT targets of the same samples), with the model's tokenizer (Rex-Omni's table 17:
  7.6 tokens per box for its bins);
- learning (on request only): does GRPO learn, on fixed and on fresh prompts, beside TRL's
  GRPOTrainer on the same model, data, reward and settings (``rlsys.bench.learning``);
- soak (on request only): 100 steps of the tiny default on a two-node cluster with an engine,
  a reward worker and the learners' node lost at seeded steps (``rlsys.bench.soak``);
- serve: requests/s and p50/p99 latency at 1-64 clients against vLLM's offline ``LLM.generate`` on the same requests, and autoscaling (``rlsys.bench.serve``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from actors.group import actor_env
from rlsys.bench import learning as bench_learning
from rlsys.bench import lora_sync
from rlsys.bench.learner import compare
from rlsys.config import DEFAULT_CONFIG, REPO_ROOT, load_config
from rlsys.grpo.run import prepare_data, prepare_model, start_trainer
from rlsys.lang.prompts import chat_prompt, question_for_sample
from rlsys.lang.targets import answer_text
from rlsys.lang.vocab import VOCABULARIES, make_vocabulary, vocabulary_for
from rlsys.models import load_model, load_processor

REPO = REPO_ROOT
ALL = ("rewards", "rollout", "step", "sync", "distributed", "scaling", "async", "learner", "vocab", "serve")
# Long (tens of minutes to hours, from the demo's SFT model): only when asked for by name.
ON_REQUEST = ("learning", "soak")
DEMO_GRPO_CONFIG = REPO / "configs" / "demo_grpo_tiny_cpu.yaml"
LORA_SYNC_MODEL = "qwen3b_g8_256"  # the Qwen2.5-VL-3B widths, 1 LLM layer (rlsys.bench.learner.MODELS)


def _trainer(cfg):

    return start_trainer(cfg, prepare_model(cfg), prepare_data(cfg))


def bench_rollout(cfg, prompts: int = 4, samples: int = 4, new_tokens: int = 32) -> dict:
    """vLLM actor vs HF generate: same prompts, images, temperature/top-p, forced length."""
    import random

    import ray
    import torch
    from PIL import Image

    t = _trainer(cfg)
    try:
        reqs = [
            {"prompt": chat_prompt(t.processor, question_for_sample(s)), "image": s.image} for s in t.samples[:prompts]
        ]
        kw = dict(
            n=samples,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            seed=0,
        )
        ray.get(t.groups.rollouts.engines[0].generate.remote(reqs, **kw))  # warm-up
        t0 = time.perf_counter()
        out = ray.get(t.groups.rollouts.engines[0].generate.remote(reqs, **kw))
        vllm_s = time.perf_counter() - t0
        vllm_tokens = sum(len(a["token_ids"]) for o in out for a in o)
    finally:
        t.shutdown()
    proc = load_processor(t.model_dir)
    model = load_model(t.model_dir).eval()
    proc.tokenizer.padding_side = "left"
    images = [Image.open(r["image"]).convert("RGB") for r in reqs]
    inputs = proc(text=[r["prompt"] for r in reqs], images=images, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    gen = dict(
        do_sample=True,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        num_return_sequences=samples,
        pad_token_id=proc.tokenizer.pad_token_id,
    )
    with torch.no_grad():
        model.generate(**inputs, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        seqs = model.generate(**inputs, **gen)
        hf_s = time.perf_counter() - t0
    hf_tokens = (seqs.shape[1] - inputs["input_ids"].shape[1]) * seqs.shape[0]
    random.seed(0)
    return {
        "vllm_tokens_per_s": vllm_tokens / vllm_s,
        "hf_tokens_per_s": hf_tokens / hf_s,
        "ratio_vllm_over_hf": (vllm_tokens / vllm_s) / (hf_tokens / hf_s),
        "prompts": prompts,
        "samples_per_prompt": samples,
        "new_tokens": new_tokens,
    }


def bench_async(out: Path, steps: int = 5, overrides=()) -> dict:
    """Steps per second, synchronous (staleness 0) vs asynchronous (staleness 1), on the demo's
    GRPO config (32 prompts x 8 answers) from the same random start; the first step of each
    (no batch generated ahead yet) is dropped. ``time/step_s`` is the wall time between step ends."""
    res: dict = {}
    for n in (0, 1):
        cfg = load_config(
            DEMO_GRPO_CONFIG,
            [
                f"run.out_dir={out / 'run-async'}",
                "run.resume=false",
                "tracking.mode=disabled",
                f"run.steps={steps}",
                f"run.max_staleness_steps={n}",
                *overrides,
            ],
        )
        t = _trainer(cfg)
        try:
            recs = [t.step() for _ in range(steps)][1:]
        finally:
            t.shutdown()
        step_s = statistics.mean(r["time/step_s"] for r in recs)
        res[n] = {
            "step_s": step_s,
            "steps_per_s": 1 / step_s,
            "stage_s": {
                k: statistics.mean(r.get(f"time/{k}_s", 0.0) for r in recs)
                for k in ("generate", "reward", "reference", "learn", "sync", "idle")
            },
            "staleness_hist": dict(
                sum(
                    (
                        Counter(
                            {int(k.rsplit("/", 1)[1]): v for k, v in r.items() if k.startswith("rollout/staleness/")}
                        )
                        for r in recs
                    ),
                    Counter(),
                )
            ),
        }
    return {
        "by_staleness": res,
        "speedup_staleness_1": res[0]["step_s"] / res[1]["step_s"],
        "steps": steps,
        "cores": os.cpu_count(),
    }


# The naive transport the sync benchmark compares against: one Ray call per tensor into the
# engine actor (run there through Ray's __ray_call__, so the production actor carries no RPC for
# it), then one reload.
def _stage_tensor(engine, name: str, tensor) -> None:
    engine.__dict__.setdefault("_staged", {})[name] = tensor


def _load_staged(engine) -> int:
    from safetensors.torch import save

    staged, engine._staged = engine.__dict__.get("_staged", {}), {}
    return engine.load_weight_buckets(save(staged))


def bench_step_and_sync(cfg, steps: int = 3, sync_repeats: int = 3) -> dict:
    """Step breakdown (steady state: the first step is dropped) and one sync three ways, on the
    same learner and engines: vLLM's protocol, the object-store fallback, one call per tensor."""
    import ray

    from actors.weight_sync import WeightSync

    t = _trainer(cfg)
    try:
        recs = [t.step() for _ in range(steps)][1:]
        stages = ("generate", "reward", "reference", "learn", "sync", "idle")
        step_s = statistics.mean(r["time/step_s"] for r in recs)
        share = {s: statistics.mean(r.get(f"time/{s}_s", 0.0) for r in recs) / step_s for s in stages}
        protocol, phases = [], []
        for _ in range(sync_repeats):
            protocol.append(t.groups.weights.push())
            phases.append(t.groups.learners.weights_timing())
        in_sync = t.weights_in_sync()
        store = WeightSync(
            t.groups.learners,
            t.groups.rollouts,
            "object_store",
            cfg.rollout.weight_bucket_mib << 20,
            cfg.rollout.timeout_s,
        )
        object_store = [store.push() for _ in range(sync_repeats)]
        naive = []
        engine, learner = t.groups.rollouts.engines[0], t.groups.learners.ranks[0]
        for _ in range(sync_repeats):
            t0 = time.perf_counter()
            sd = ray.get(learner.state_dict_cpu.remote())
            ray.get([engine.__ray_call__.remote(_stage_tensor, k, v) for k, v in sd.items()])
            ray.get(engine.__ray_call__.remote(_load_staged))
            naive.append(
                (time.perf_counter() - t0) * len(t.groups.rollouts.engines)
            )  # one engine timed; each costs the same
        n_tensors, n_params = len(sd), sum(v.numel() for v in sd.values())
        n_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    finally:
        t.shutdown()
    p, o, n = (statistics.median(x) for x in (protocol, object_store, naive))
    return {
        "step_s": step_s,
        "share": share,
        "sync_protocol_s": p,
        "sync_object_store_s": o,
        "sync_per_tensor_s": n,
        "ratio_object_store_over_protocol": o / p,
        "ratio_per_tensor_over_protocol": n / p,
        "sync_share_of_step": p / step_s,
        "tensors": n_tensors,
        "parameters": n_params,
        "bytes": n_bytes,
        "backend": cfg.weight_transfer_backend,
        "bucket_mib": cfg.rollout.weight_bucket_mib,
        # the protocol's phases (median): start and finish are RPCs to every engine's workers;
        # update waits for the workers to load what the broadcast delivered
        "protocol_phases_s": {k: statistics.median(p[k] for p in phases) for k in phases[0]}
        if phases and phases[0]
        else {},
        "weights_in_sync_after": in_sync,
    }


def bench_distributed(cfg, steps: int = 3) -> dict:
    """Step time (steady state) with 1 vs 2 learner ranks and 1 vs 2 engines, same batch size."""
    out = {}
    for ranks, engines in ((1, 1), (2, 1), (1, 2)):
        c = cfg.model_copy(deep=True)
        c.learner.num_ranks, c.rollout.num_engines = ranks, engines
        c.learner.cpus_per_rank = c.rollout.cpus_per_engine = 0.25
        t = _trainer(c)
        try:
            recs = [t.step() for _ in range(steps)][1:]
        finally:
            t.shutdown()
        out[f"{ranks}x{engines}"] = {
            k: statistics.mean(r[f"time/{k}_s"] for r in recs) for k in ("step", "generate", "learn", "sync")
        }
    base = out["1x1"]["step"]
    return {
        "by_ranks_x_engines": out,
        "ratio_2_ranks": out["2x1"]["step"] / base,
        "ratio_2_engines": out["1x2"]["step"] / base,
        "cores": os.cpu_count(),
    }


def bench_scaling(cfg, sizes=(2, 4, 8, 16), steps: int = 2) -> dict:
    out = {}
    for n in sizes:
        c = cfg.model_copy(deep=True)
        c.run.prompts_per_step = n
        t = _trainer(c)
        try:
            recs = [t.step() for _ in range(steps)]
        finally:
            t.shutdown()
        out[n] = recs[-1]["time/step_s"]
    return {
        "step_s_by_prompts_per_step": out,
        "growth_per_doubling": [out[b] / out[a] for a, b in zip(sizes, sizes[1:])],
    }


def bench_vocab(cfg, max_samples: int = 500) -> dict:
    """Answer tokens per box and per point for each vocabulary on the same samples' targets
    (chatrex: boxes only, and the tokens its question spends listing the candidate boxes)."""

    proc = load_processor(prepare_model(cfg), pixels=cfg.model.pixel_budget())
    samples = [s for s in prepare_data(cfg) if s.output in ("box", "point") and s.instances][:max_samples]
    res = {"samples": len(samples), "tokenizer_vocabulary": len(proc.tokenizer)}
    for name in VOCABULARIES:
        tok = proc.tokenizer
        if name in ("getok", "chatrex"):  # the tokenizer as rlsys.data.prepare leaves it: the vocabulary's tokens added
            v = make_vocabulary(
                name,
                getok_grid=cfg.model.getok_grid,
                getok_offsets=cfg.model.getok_offsets,
                chatrex_max_proposals=cfg.model.chatrex_max_proposals,
                chatrex_proposals="synthetic",
                chatrex_distractors=cfg.model.chatrex_distractors,
            )
            tok = copy.deepcopy(tok)
            tok.add_tokens([t for t in v.added_tokens() if t not in tok.get_vocab()])
        else:
            v = vocabulary_for(name, proc)
        per: dict[str, list[int]] = {"box": [0, 0], "point": [0, 0]}
        listed = [0, 0]
        for s in samples:
            if name == "chatrex" and s.output != "box":
                continue
            n = len(tok(answer_text(s, v), add_special_tokens=False)["input_ids"])
            per[s.output][0] += n
            per[s.output][1] += len(s.instances)
            if name == "chatrex":
                listed[0] += len(tok(v.for_sample(s).question_hint(s.output), add_special_tokens=False)["input_ids"])
                listed[1] += 1
        res[name] = {f"tokens_per_{k}": round(t / c, 2) if c else None for k, (t, c) in per.items()}
        if name == "chatrex":
            res[name]["question_tokens_listing_proposals"] = round(listed[0] / max(listed[1], 1), 1)
    for name in VOCABULARIES[1:]:
        res[f"ratio_{name}_over_rex_bins_per_box"] = round(
            res[name]["tokens_per_box"] / res["rex_bins"]["tokens_per_box"], 2
        )
    return res


def _module_json(args: list[str], timeout_s: int) -> dict | None:
    r = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr or r.stdout)[-800:]}
    return json.loads(lines[-1])


def markdown(res: dict, cmd: str) -> str:
    rows = ["| part | figure | alternative | ratio | command |", "|---|---|---|---|---|"]
    if "rewards" in res and "speedup" in res["rewards"]:
        r = res["rewards"]
        rows.append(
            f"| rewards: box-IoU F1, 64 x 100 x 100 | {r['vectorised_s'] * 1e3:.1f} ms | loop {r['reference_s'] * 1e3:.0f} ms | {r['speedup']:.0f}x | `python -m rlsys.bench.rewards` |"
        )
    for key in ("rollout", "rollout_demo_batch"):
        if key in res:
            r = res[key]
            rows.append(
                f"| rollout tokens/s (vLLM actor), {r['prompts']} prompts x {r['samples_per_prompt']} | {r['vllm_tokens_per_s']:.0f} "
                f"| HF generate {r['hf_tokens_per_s']:.0f} | {r['ratio_vllm_over_hf']:.1f}x | `{cmd} --only rollout` |"
            )
    if "async" in res:
        r = res["async"]
        s0, s1 = r["by_staleness"][0], r["by_staleness"][1]
        stage = lambda s: ", ".join(f"{k} {v:.1f}" for k, v in s["stage_s"].items() if v)  # noqa: E731
        rows.append(
            f"| GRPO step, demo config, asynchronous (staleness 1) | {s1['step_s']:.1f} s ({stage(s1)}); staleness "
            f"{s1['staleness_hist']} | synchronous {s0['step_s']:.1f} s ({stage(s0)}) | {r['speedup_staleness_1']:.2f}x steps/s "
            f"({r['cores']} cores) | `{cmd} --only async` |"
        )
    for name, r in res.get("learner", {}).items():
        b, a = r.get("before", {}), r.get("after", {})
        if "time_ratio_after_over_before" in r:
            rows.append(
                f"| learner step, {name} ({a['parameters'] / 1e6:.0f}M params, {a['vocab_rows']} vocab rows, "
                f"{a['prompt_tokens']} prompt + {a['answer_tokens']} answer tokens, {a['answers']} answers) | "
                f"{a['step_s']:.2f} s, {a['peak_mib_per_answer']:.0f} MiB peak per answer | before: {b['step_s']:.2f} s, "
                f"{b['peak_mib_per_answer']:.0f} MiB | time x{r['time_ratio_after_over_before']:.2f}, memory "
                f"{r['memory_ratio_before_over_after']:.1f}x lower | `python -m rlsys.bench --only learner` |"
            )
        elif "time_ratio_lora_over_full" in r:
            f, a = r["shared"], r["lora"]
            rows.append(
                f"| learner step, LoRA rank 16, {name.removesuffix('_lora')} ({a['trainable_parameters'] / 1e6:.1f}M of "
                f"{f['parameters'] / 1e6:.0f}M params trained, reference = adapters off) | {a['step_s']:.2f} s, "
                f"{a['peak_mib_total']:.0f} MiB process peak, sync {a['sync_mib']:.0f} MiB packed in {a['sync_pack_s']:.2f} s "
                f"| full: {f['step_s']:.2f} s, {f['peak_mib_total']:.0f} MiB, sync {f['sync_mib']:.0f} MiB in "
                f"{f['sync_pack_s']:.2f} s | time x{r['time_ratio_lora_over_full']:.2f}, memory "
                f"{r['memory_ratio_full_over_lora']:.1f}x lower, sync {r['sync_ratio_full_over_lora']:.1f}x smaller "
                "| `python -m rlsys.bench --only learner` |"
            )
        elif "time_ratio_shared_over_after" in r:
            b, a = r["after"], r["shared"]
            rows.append(
                f"| learner step, shared prefix, {name} ({a['parameters'] / 1e6:.0f}M params, {a['prompt_tokens']} "
                f"prompt + {a['answer_tokens']} answer tokens, {a['answers']} answers to one image) | {a['step_s']:.2f} s, "
                f"{a['peak_mib_step']:.0f} MiB step peak, {a['llm_tokens']} LLM tokens | per answer: {b['step_s']:.2f} s, "
                f"{b['peak_mib_step']:.0f} MiB, {b['llm_tokens']} tokens | {1 / r['time_ratio_shared_over_after']:.2f}x "
                f"throughput (token ratio {r['llm_token_ratio_after_over_shared']:.2f}x) | `python -m rlsys.bench --only learner` |"
            )
        else:
            rows.append(
                f"| learner step, {name} | failed: {str(r)[:200]} | | | `python -m rlsys.bench --only learner` |"
            )
    for key, label in (("sync", "tiny"), ("sync_large", "larger")):
        if key in res:
            r = res[key]
            rows.append(
                f"| weight sync, {label} model ({r['parameters'] / 1e6:.1f}M params, {r['bytes'] / 2**20:.0f} MiB, {r['tensors']} tensors), "
                f"{r['backend']} | {r['sync_protocol_s'] * 1e3:.0f} ms, {r['sync_share_of_step'] * 100:.1f}% of a {r['step_s']:.2f} s step "
                f"| object store {r['sync_object_store_s'] * 1e3:.0f} ms; per-tensor calls {r['sync_per_tensor_s'] * 1e3:.0f} ms "
                f"| {r['ratio_object_store_over_protocol']:.1f}x; {r['ratio_per_tensor_over_protocol']:.1f}x | `{cmd} --only sync` |"
            )
            if r.get("protocol_phases_s"):
                rows.append(
                    f"| protocol phases, {label} model | "
                    + ", ".join(f"{k[:-2]} {v * 1e3:.0f} ms" for k, v in r["protocol_phases_s"].items())
                    + " | | | |"
                )
    if "lora_sync" in res:
        r = res["lora_sync"]
        if "ratios" in r:
            f, m, ad, q = r["full"], r["merged"], r["adapter"], r["ratios"]
            rows.append(
                f"| weight sync with LoRA, {m['model']} rank {m['rank']}: merged layers reloaded | "
                f"{m['sync_mib']:.1f} MiB, learner {m['learner_s']:.2f} s, engine {m['engine_s']:.2f} s "
                f"| full training {f['sync_mib']:.1f} MiB, {f['learner_s']:.2f} s, {f['engine_s']:.2f} s; "
                f"adapters hot-loaded {ad['sync_mib']:.1f} MiB, {ad['learner_s']:.2f} s, {ad['engine_s']:.2f} s "
                f"| full / merged: bytes {q['sync_bytes_full_over_merged']:.1f}x, engine {q['engine_s_full_over_merged']:.1f}x; "
                f"merged / adapters: bytes {q['sync_bytes_merged_over_adapter']:.0f}x, engine "
                f"{q['engine_s_merged_over_adapter']:.1f}x, tokens/s after {q['tokens_per_s_merged_over_adapter']:.2f}x "
                f"| `{cmd} --only sync` |"
            )
        else:
            rows.append(f"| weight sync with LoRA | failed: {str(r)[:200]} | | | `{cmd} --only sync` |")
    if "sync" in res:
        sh = res["sync"]["share"]
        rows.append(
            "| step time shares (tiny default) | "
            + ", ".join(f"{k} {v * 100:.0f}%" for k, v in sh.items())
            + f" of {res['sync']['step_s']:.2f} s | | | `{cmd} --only step` |"
        )
    if "distributed" in res:
        d = res["distributed"]["by_ranks_x_engines"]
        rows.append(
            "| step time, learner ranks x engines | "
            + ", ".join(
                f"{k}: {v['step']:.2f} s (learn {v['learn']:.2f}, generate {v['generate']:.2f})" for k, v in d.items()
            )
            + f" | 1x1 | 2 ranks x{res['distributed']['ratio_2_ranks']:.2f}, 2 engines x{res['distributed']['ratio_2_engines']:.2f} "
            f"({res['distributed']['cores']} cores) | `{cmd} --only distributed` |"
        )
    if "scaling" in res:
        s = res["scaling"]["step_s_by_prompts_per_step"]
        rows.append(
            "| step time vs prompts per step | "
            + ", ".join(f"{k}: {v:.2f} s" for k, v in s.items())
            + " | | x"
            + ", x".join(f"{g:.2f}" for g in res["scaling"]["growth_per_doubling"])
            + f" per doubling | `{cmd} --only scaling` |"
        )
    if "vocab" in res:
        v = res["vocab"]
        rows.append(
            f"| answer tokens per box / per point, rex_bins | {v['rex_bins']['tokens_per_box']} / {v['rex_bins']['tokens_per_point']} "
            f"| qwen_json {v['qwen_json']['tokens_per_box']} / {v['qwen_json']['tokens_per_point']} "
            f"| {v['ratio_qwen_json_over_rex_bins_per_box']}x per box | `{cmd} --only vocab` |"
        )
        if "chatrex" in v:
            rows.append(
                f"| answer tokens per box, chatrex (+ question tokens listing the proposals) | {v['chatrex']['tokens_per_box']} "
                f"(+{v['chatrex']['question_tokens_listing_proposals']} per question) | rex_bins {v['rex_bins']['tokens_per_box']} "
                f"| {v['ratio_chatrex_over_rex_bins_per_box']}x per box | `{cmd} --only vocab` |"
            )
        if "getok" in v:
            rows.append(
                f"| answer tokens per box / per point, getok | {v['getok']['tokens_per_box']} / {v['getok']['tokens_per_point']} "
                f"| rex_bins {v['rex_bins']['tokens_per_box']} / {v['rex_bins']['tokens_per_point']} "
                f"| {v['ratio_getok_over_rex_bins_per_box']}x per box | `{cmd} --only vocab` |"
            )
    if "serve" in res and res["serve"] and "error" not in res["serve"]:
        off = res["serve"]["offline"]
        for c, r in res["serve"]["served"].items():
            same = off["at_concurrency"][str(c)]["requests_per_s"]
            rows.append(
                f"| serve, 1 replica, {c} concurrent clients | {r['requests_per_s']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms "
                f"| offline LLM.generate, {c} at a time: {same} req/s | {r['share_of_offline_same_concurrency']:.2f} of offline "
                f"| `python -m rlsys.bench.serve` |"
            )
    elif "serve" in res:
        rows.append(f"| serve | failed: {str(res['serve'])[:200]} | | | `python -m rlsys.bench.serve` |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--out", default="runs/bench")
    p.add_argument(
        "--only",
        nargs="*",
        choices=ALL + ON_REQUEST,
        default=list(ALL),
        help="parts to run (default: all but learning, which trains for tens of minutes: rlsys.bench.learning)",
    )
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(a.out)
    cfg = load_config(
        a.config, [f"run.out_dir={out / 'run'}", "run.resume=false", "tracking.mode=disabled", *a.overrides]
    )
    cmd = "python -m rlsys.bench" + (f" --config {a.config}" if a.config != str(DEFAULT_CONFIG) else "")
    res: dict = {"device": "CPU, " + str(os.cpu_count()) + " cores", "config": a.config}
    if "rewards" in a.only:
        res["rewards"] = _module_json(["rlsys.bench.rewards"], 600)
    if set(a.only) & {"rollout", "step", "sync", "distributed", "scaling", "async"}:
        import ray

        ray.init(runtime_env={"env_vars": actor_env(cpu_only=cfg.learner.gpus_per_rank == 0)})
        if "rollout" in a.only:
            res["rollout"] = bench_rollout(cfg)
            # and at the demo's batch: 32 prompts x 8 answers
            res["rollout_demo_batch"] = bench_rollout(cfg, prompts=32, samples=8)
        if "step" in a.only or "sync" in a.only:
            res["sync"] = bench_step_and_sync(cfg)
        if "sync" in a.only:
            big = cfg.model_copy(deep=True)
            big.run.out_dir = str(out / "run-large")
            big.model.tiny_hidden_size, big.model.tiny_num_layers, big.model.tiny_intermediate_size = 512, 8, 1536
            big.model.tiny_vision_hidden_size, big.model.tiny_vision_depth = 256, 4
            res["sync_large"] = bench_step_and_sync(big, steps=2)
        if "distributed" in a.only:
            res["distributed"] = bench_distributed(cfg)
        if "scaling" in a.only:
            res["scaling"] = bench_scaling(cfg)
        if "async" in a.only:
            res["async"] = bench_async(out)
    if "learner" in a.only:
        res["learner"] = compare(out / "learner")
    if "sync" in a.only:
        try:  # its own processes and engines, after the Ray sections' actors are gone
            res["lora_sync"] = lora_sync.compare(LORA_SYNC_MODEL, out / "lora_sync")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            res["lora_sync"] = {"error": str(exc)[-800:]}
    if "vocab" in a.only:
        res["vocab"] = bench_vocab(cfg)
    if "serve" in a.only:
        res["serve"] = _module_json(["rlsys.bench.serve"], 1200)
    if "soak" in a.only:
        # its own two-node cluster and config (rlsys.bench.soak): a separate process
        if subprocess.run([sys.executable, "-m", "rlsys.bench.soak", "--out", str(out / "soak")]).returncode != 0:
            return 2
    if "learning" in a.only:
        # its own defaults (the demo's SFT model and GRPO config), its own report
        if bench_learning.main(["--out", str(out / "learning")]) != 0:
            return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    md = markdown(res, cmd)
    (out / "bench.md").write_text(md + "\n")
    print(md)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
