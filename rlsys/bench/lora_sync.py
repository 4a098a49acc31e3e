"""How a LoRA learner's weights reach a vLLM engine, two ways, beside full training's sync, on one
model shape (issue 31).

``merged`` (what rlsys does): the learner merges each adapted layer (``W + B A * alpha / r``, with
the layers vLLM fuses with it) and the engine reloads those tensors in place (vLLM's layerwise
reload, as the object-store fallback does: ``rlsys_load_weights_files``); the engine then samples
with plain kernels. ``adapter``: the learner writes the adapters alone (peft's
``save_pretrained``) and the engine, started with ``enable_lora``, hot-loads each new version as
a new LoRA request (``add_lora``, the old one removed) and samples through vLLM's LoRA kernels.
``full``: what a fully trained learner's sync moves, every weight of the model (the same update,
merged), reloaded the same way: the figure LoRA is measured against.

Per variant, each in its own process (``python -m rlsys.bench.lora_sync --model NAME --variant
merged|adapter|full``): the bytes one sync moves; the learner's seconds to make them; the engine's
seconds to take them (median of ``--repeats`` syncs, each a new random update); and the engine's
tokens/s on the same text prompts after the sync (with the adapter active for ``adapter``); and
whether the engines then give the same greedy answers (the same update every way). All three
go through local files, so none pays a network here: over a link the bytes ratio is what
matters. ``python -m rlsys.bench.lora_sync --model NAME`` runs all three and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlsys.bench.learner import _model_dir
from rlsys.config import (
    REPO_ROOT,
    LoraSection,
    ModelConfig,
    RolloutConfig,
    prepare_sync_engine_process,
    vllm_engine_args,
)
from rlsys.grpo import lora
from rlsys.models import load_model

VARIANTS = ("merged", "adapter", "full")


def _train_adapters(model, seed: int) -> None:
    """A new random update of every adapter (B and A), as a learner step would make."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def run(model_name: str, variant: str, out_dir: Path, *, rank: int = 16, repeats: int = 3) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    prepare_sync_engine_process()  # the engine as the rollout actor builds it
    from safetensors.torch import save_file
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model_dir = _model_dir(model_name, out_dir)
    model = lora.wrap(load_model(model_dir), LoraSection(rank=rank, alpha=2.0 * rank))
    engine = RolloutConfig(max_model_len_tokens=512, kv_cache_mib=256)
    args = vllm_engine_args(ModelConfig(), model_dir, engine, seed=0)
    extra = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1} if variant == "adapter" else {}
    t0 = time.perf_counter()
    llm = LLM(**args, worker_extension_cls="actors.weight_sync.VllmWorkerExtension", **extra)
    start_s = time.perf_counter() - t0
    llm.collective_rpc("rlsys_track_received")
    tmp = Path(tempfile.mkdtemp(prefix="rlsys-lora-sync-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    prompts = [f"Describe object number {k} in a few words." for k in range(8)]
    sampling = SamplingParams(max_tokens=48, min_tokens=48, temperature=1.0, seed=0)
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    learner_s, engine_s, nbytes, request = [], [], 0, None
    try:
        for k in range(repeats):
            _train_adapters(model, seed=k)
            t0 = time.perf_counter()
            if variant in ("merged", "full"):
                path = tmp / f"{variant}-{k}.safetensors"
                changed = variant == "merged"
                tensors = {n: t.contiguous() for n, t in lora.merged_weights(model, only_changed=changed)}
                save_file(tensors, str(path))
            else:
                path = tmp / f"adapter-{k}"
                model.save_pretrained(str(path), safe_serialization=True)
            learner_s.append(time.perf_counter() - t0)
            nbytes = (
                path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            )
            t0 = time.perf_counter()
            if variant in ("merged", "full"):
                llm.collective_rpc("rlsys_load_weights_files", args=([str(path)],))
                llm.reset_prefix_cache()
            else:
                new = LoRARequest(f"v{k + 1}", k + 1, str(path))
                llm.llm_engine.add_lora(new)  # loaded into the engine's adapter cache now, not at first use
                if request is not None:
                    llm.llm_engine.remove_lora(request.lora_int_id)
                request = new
            engine_s.append(time.perf_counter() - t0)
        # the update took: the greedy answers moved (random adapters change most of them)
        after = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, lora_request=request, use_tqdm=False)]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sampling, lora_request=request, use_tqdm=False)
        gen_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "model": model_name,
        "variant": variant,
        "rank": rank,
        "sync_mib": nbytes / 2**20,
        "learner_s": statistics.median(learner_s),
        "engine_s": statistics.median(engine_s),
        "tokens_per_s": tokens / gen_s,
        "greedy_answers_changed": sum(list(a) != list(b) for a, b in zip(before, after)),
        "prompts": len(prompts),
        "greedy_after": [list(a) for a in after],
        "engine_start_s": start_s,
        "repeats": repeats,
    }


def compare(model_name: str, out_dir: Path, *, rank: int = 16, repeats: int = 3, timeout_s: int = 1800) -> dict:
    """Every variant, each in its own process (one vLLM engine per process), and their ratios."""
    res = {}
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            "-m",
            "rlsys.bench.lora_sync",
            *("--model", model_name, "--variant", variant, "--out", str(out_dir)),
            *("--rank", str(rank), "--repeats", str(repeats)),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        res[variant] = json.loads(r.stdout.strip().splitlines()[-1])
        if res[variant]["greedy_answers_changed"] == 0:
            raise RuntimeError(
                f"{variant}: no greedy answer changed after the syncs: the update did not reach the engine"
            )
    m, a, f = res["merged"], res["adapter"], res["full"]
    m_after, a_after, f_after = m.pop("greedy_after"), a.pop("greedy_after"), f.pop("greedy_after")
    # the same last update, merged or as adapters: the engines should answer alike (float rounding may flip a token)
    res["greedy_answers_agree"] = sum(x == y for x, y in zip(m_after, a_after))
    # full and merged load the same weights (the rest reloaded as it was): the same answers
    res["greedy_full_equals_merged"] = sum(x == y for x, y in zip(m_after, f_after))
    res["ratios"] = {
        "sync_bytes_merged_over_adapter": m["sync_mib"] / a["sync_mib"],
        "learner_s_merged_over_adapter": m["learner_s"] / a["learner_s"],
        "engine_s_merged_over_adapter": m["engine_s"] / a["engine_s"],
        "tokens_per_s_merged_over_adapter": m["tokens_per_s"] / a["tokens_per_s"],
        "sync_bytes_full_over_merged": f["sync_mib"] / m["sync_mib"],
        "learner_s_full_over_merged": f["learner_s"] / m["learner_s"],
        "engine_s_full_over_merged": f["engine_s"] / m["engine_s"],
    }
    return res


def table(res: dict) -> str:
    m, a, f = res["merged"], res["adapter"], res["full"]

    def row(name: str, key: str, fmt: str) -> str:
        return (
            f"| {name} | {f[key]:{fmt}} | {m[key]:{fmt}} | {a[key]:{fmt}} "
            f"| {f[key] / m[key]:.2f}x | {m[key] / a[key]:.2f}x |"
        )

    head = (
        f"| {m['model']}, LoRA rank {m['rank']} | full training: every weight, reloaded "
        "| LoRA: merged layers, reloaded | LoRA: adapters, hot-loaded | full / merged | merged / adapters |"
    )
    agree = (
        f"Greedy answers to {m['prompts']} prompts after the last sync, the same as the merged engine's: "
        f"adapters {res['greedy_answers_agree']}, full {res['greedy_full_equals_merged']}."
    )
    body = [
        row("a sync's bytes (MiB)", "sync_mib", ".1f"),
        row("learner: make them (s)", "learner_s", ".3f"),
        row("engine: take them (s)", "engine_s", ".3f"),
        row("engine: tokens/s after", "tokens_per_s", ".1f"),
    ]
    return "\n".join([head, "|---|---|---|---|---|---|", *body, "", agree])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.bench.lora_sync", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo_g8", help="a model of rlsys.bench.learner.MODELS")
    p.add_argument("--variant", choices=VARIANTS, help="one variant in this process (default: all, compared)")
    p.add_argument("--out", default="runs/bench/lora_sync")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.variant:
        print(json.dumps(run(a.model, a.variant, out, rank=a.rank, repeats=a.repeats)), flush=True)
        return 0
    res = compare(a.model, out, rank=a.rank, repeats=a.repeats)
    (out / f"lora_sync_{a.model}.json").write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
