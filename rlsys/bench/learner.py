"""The learner's work per GRPO step, before and after it was made lean, on the same batch.

``python -m rlsys.bench.learner --model NAME --variant {before,after,shared} [--out DIR]``
prints one JSON line; ``python -m rlsys.bench --only learner`` runs every pair, each variant in
its own process (so peak memory is that variant's alone), and prints the ratios.

- ``before``: the learner as it was: a separate no-grad "old" log-prob pass, the reference
  pass, and a training forward, each taking float32 logits over the whole vocabulary at every
  position (image and prompt tokens included), with the entropy computed inside the graph.
- ``after``: :func:`rlsys.grpo.sequences.token_logprobs` with the answer mask: no old pass (the
  training forward, detached, is the proximal policy), logits only at answer positions, the
  entropy without a graph.
- ``lora``: ``shared`` with LoRA adapters (``learner.lora`` at its defaults: rank 16 on every
  linear layer of the LLM) and the reference as the same model with its adapters off, no copy.
  Compared with ``shared`` on the ``*_g8_*`` models: step time, the process's whole peak
  (``peak_mib_total``: weights, reference, gradients and optimizer state included, where LoRA's
  saving is), and what a weight sync would send (``sync_mib``, and ``sync_pack_s``, the seconds
  to gather and pack it into the transfer's buckets on the learner).
- ``shared``: ``after`` with one sequence per prompt group (``learner.shared_prefix``,
  :func:`rlsys.grpo.sequences.build_shared_batch`): the image and prompt once per group, each
  answer attending to the prompt and itself. Compared with ``after`` on the ``*_g8_*`` models
  (G = 8 answers to one image), with the LLM token counts of both layouts beside the time ratio.

Both take one AdamW step after the backward. Time: median of ``--repeats`` steps after one
warm-up. Memory, sampled every 5 ms as the resident size above the size just before the step
(model, reference copy, gradients and optimizer state already allocated by the warm-up):
``peak_mib_step``, the whole step's peak, which also holds parameter-sized temporaries (the
embedding's and lm_head's weight gradients before they are added into ``.grad``, the optimizer's
buffers) that do not depend on the batch; and ``peak_mib_per_answer``, what one more answer in
the micro-batch adds: the peak at the full micro-batch minus the peak at half of it, per answer
(the memory that grows with micro-batch size and sequence length, and runs out first).
``MALLOC_MMAP_THRESHOLD_`` is set so that freed tensors go back to the OS and each step's peak
is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from actors.weight_sync import state_dict_buckets
from rlsys.config import REPO_ROOT, LoraSection, ModelConfig
from rlsys.data.prepare import prepare_model_dir
from rlsys.grpo import lora
from rlsys.grpo.algorithm import policy_loss
from rlsys.grpo.records import LearnerItem
from rlsys.grpo.sequences import (
    banned_token_ids,
    build_batch,
    build_shared_batch,
    shared_token_logprobs,
    token_logprobs,
)
from rlsys.lang.prompts import chat_prompt
from rlsys.models import load_model, load_processor

MODELS = {
    # name: image side px, answers in the batch, tokens per answer, micro-batch
    "tiny": dict(image_px=112, answers=8, answer_tokens=48, micro_batch=8),
    "30m": dict(image_px=224, answers=8, answer_tokens=48, micro_batch=8),
    # Qwen2.5-VL-3B's widths and real 151,936-row vocabulary, 2 LLM layers, one vision block;
    # a 672 px image is 576 image tokens (the paper's budget allows 2,560)
    "qwen3b": dict(image_px=672, answers=2, answer_tokens=64, micro_batch=2),
    # one GRPO group (G = 8 answers of 64 tokens to one image) at 256 and 1,024 image tokens, the
    # 3B widths with 1 LLM layer and 1 vision block (what bounds a shared prefix is the share of
    # the sequence the prompt is, not the depth); and the demo's shape (tiny model, 112 px)
    "qwen3b_g8_256": dict(image_px=448, answers=8, answer_tokens=64, micro_batch=8, layers=1),
    "qwen3b_g8_1024": dict(image_px=896, answers=8, answer_tokens=64, micro_batch=8, layers=1),
    "demo_g8": dict(image_px=112, answers=8, answer_tokens=48, micro_batch=8),
}
# (before, after) pairs compared per model
PAIRS = {"qwen3b_g8_256": ("after", "shared"), "qwen3b_g8_1024": ("after", "shared"), "demo_g8": ("after", "shared")}
# full training against LoRA, each on the shared-prefix path (``--only learner`` adds these pairs
# under the model's name + "_lora")
LORA_MODELS = ("qwen3b_g8_256", "demo_g8")


def _model_dir(name: str, out_dir: Path) -> str:
    """The benchmark's model, built once under ``out_dir``."""

    if name in ("tiny", "demo_g8"):
        cfg = ModelConfig()
    elif name == "30m":
        cfg = ModelConfig(
            tiny_hidden_size=512,
            tiny_num_layers=8,
            tiny_intermediate_size=1536,
            tiny_vision_hidden_size=256,
            tiny_vision_depth=4,
            tiny_max_pixels=224 * 224,
        )
    else:  # Qwen's token layout with the coordinate tokens mapped onto its last BPE rows, as for a real base checkpoint
        m = MODELS[name]
        cfg = ModelConfig(
            tiny_shape="qwen2_5_vl_3b",
            tiny_num_layers=m.get("layers", 2),
            tiny_vision_depth=1,
            tiny_max_pixels=m["image_px"] ** 2,
            coord_tokens="map_last",
        )
        name = f"qwen3b-l{m.get('layers', 2)}-{m['image_px']}"
    return prepare_model_dir(cfg, out_dir / f"model-{name}")


class PeakRSS:
    """The largest resident set size seen by a 5 ms sampler while the block runs."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.start = self.proc.memory_info().rss

        def sample():
            while not self.stop:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _full_logprobs_with_entropy_graph(model, inputs, targets, temperature):
    """The learner's forward before: logits at every position, entropy kept in the graph."""
    import torch

    logits = model(**inputs).logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def run(model_name: str, variant: str, out_dir: Path, repeats: int = 3, seed: int = 0) -> dict:
    import torch

    torch.manual_seed(seed)
    model_dir = _model_dir(model_name, out_dir)
    with PeakRSS() as total:  # the whole process from here: the models, the optimizer, the steps
        return _run(model_name, variant, out_dir, repeats, seed, model_dir, total)


def _run(model_name, variant, out_dir, repeats, seed, model_dir, total) -> dict:
    import random

    import torch
    from PIL import Image

    m = MODELS[model_name]
    proc = load_processor(str(model_dir))
    model = load_model(str(model_dir)).train()
    if variant == "lora":  # the reference is the model with its adapters off
        model = lora.wrap(model, LoraSection())
        ref = model
    else:
        ref = load_model(str(model_dir)).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    rng = random.Random(seed)
    img = out_dir / f"image-{m['image_px']}.png"
    if not img.is_file():
        Image.effect_noise((m["image_px"], m["image_px"]), 60).convert("RGB").save(img)
    prompt = chat_prompt(proc, "Detect every circle and square in the image.")
    vocab = proc.tokenizer.vocab_size  # ordinary BPE ids, below every added token
    items = [
        LearnerItem(
            prompt=prompt,
            image=str(img),
            response_ids=[rng.randrange(10, vocab) for _ in range(m["answer_tokens"])],
            advantage=rng.uniform(-1, 1),
        )
        for _ in range(m["answers"])
    ]
    banned = banned_token_ids(proc.tokenizer)
    n_tokens = sum(len(it.response_ids) for it in items)
    cache: dict = {}

    pad = proc.tokenizer.pad_token_id

    def shared_step(mb: int, items=items):
        cache.clear()
        chunks = [items[i : i + mb] for i in range(0, len(items), mb)]
        batches = [build_shared_batch(proc, c, pad, cache) for c in chunks]
        adapters_off = model.disable_adapter() if variant == "lora" else contextlib.nullcontext()
        with torch.no_grad(), adapters_off:
            refs = [shared_token_logprobs(ref, b, "cpu", entropy=False, banned_ids=banned)[0] for b in batches]
        opt.zero_grad(set_to_none=False)
        for b, r, c in zip(batches, refs, chunks):
            logp, _, mask = shared_token_logprobs(model, b, "cpu", banned_ids=banned)
            adv = torch.tensor([it.advantage for it in c])
            loss, _ = policy_loss(logp, logp.detach(), r, adv, mask, kl_coef=0.01, num_tokens=n_tokens)
            loss.backward()
        opt.step()

    def step(mb: int, items=items):
        if variant in ("shared", "lora"):
            return shared_step(mb, items)
        cache.clear()
        chunks = [items[i : i + mb] for i in range(0, len(items), mb)]
        batches = [build_batch(proc, c, pad, cache) for c in chunks]
        olds, refs = [], []
        with torch.no_grad():
            for inputs, targets, mask in batches:
                if variant == "before":
                    olds.append(_full_logprobs_with_entropy_graph(model, inputs, targets, 1.0)[0])
                    refs.append(_full_logprobs_with_entropy_graph(ref, inputs, targets, 1.0)[0])
                else:
                    refs.append(token_logprobs(ref, inputs, targets, mask=mask, entropy=False, banned_ids=banned)[0])
        opt.zero_grad(set_to_none=False)
        for (inputs, targets, mask), old, r, c in zip(batches, olds or [None] * len(batches), refs, chunks):
            if variant == "before":
                logp, ent = _full_logprobs_with_entropy_graph(model, inputs, targets, 1.0)
                ent = ent[mask].sum()  # the metric, still holding its graph through backward
            else:
                logp, ent = token_logprobs(model, inputs, targets, mask=mask, banned_ids=banned)
                old = logp.detach()
            adv = torch.tensor([it.advantage for it in c])
            loss, _ = policy_loss(logp, old, r, adv, mask, kl_coef=0.01, num_tokens=n_tokens)
            loss.backward()
        opt.step()

    mb = m["micro_batch"]
    step(mb)  # warm-up: gradients and optimizer state allocated, the processor's first call paid
    times, peaks = [], []
    for _ in range(repeats):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            step(mb)
            times.append(time.perf_counter() - t0)
        peaks.append(mem.peak - mem.start)
    with PeakRSS() as half:  # half the micro-batch (and half the answers: one micro-batch either way)
        step(mb // 2, items[: mb // 2])
    full = statistics.median(peaks)
    t0 = time.perf_counter()  # what a sync sends, gathered and packed as the transfer packs it
    sent = lora.merged_weights(model, only_changed=True) if variant == "lora" else model.named_parameters()
    sync_bytes = sum(len(b) for b in state_dict_buckets(sent))
    sync_pack_s = time.perf_counter() - t0
    prompt_tokens = int(build_batch(proc, items[:1], pad)[0]["input_ids"].shape[1]) - m["answer_tokens"]
    return {
        "model": model_name,
        "variant": variant,
        "step_s": statistics.median(times),
        "peak_mib_step": full / 2**20,
        "peak_mib_per_answer": (full - (half.peak - half.start)) / (mb - mb // 2) / 2**20,
        "answers": m["answers"],
        "answer_tokens": m["answer_tokens"],
        "image_px": m["image_px"],
        "prompt_tokens": prompt_tokens,
        # tokens through the LLM per step (each pass): per answer, the prompt once per answer;
        # shared, once per group (all the answers here share one prompt)
        "llm_tokens": (prompt_tokens + n_tokens)
        if variant in ("shared", "lora")
        else len(items) * prompt_tokens + n_tokens,
        "vocab_rows": int(model.get_output_embeddings().weight.shape[0]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_mib_total": max(total.peak, total.proc.memory_info().rss) / 2**20,
        "sync_mib": sync_bytes / 2**20,
        "sync_pack_s": sync_pack_s,
    }


def _variant(name: str, variant: str, out_dir: Path, timeout_s: int) -> dict:
    """One model x variant in its own process (so its peak memory is its own)."""
    import subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "rlsys.bench.learner", "--model", name, "--variant", variant, "--out", str(out_dir)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if r.returncode == 0 and lines else {"error": r.stderr[-800:]}


def compare(
    out_dir: Path, models=("tiny", "30m", "qwen3b", *PAIRS), lora_models=LORA_MODELS, timeout_s: int = 1800
) -> dict:
    """Every model x variant in its own process; the after/before ratios (``PAIRS``: shared
    against after, with the LLM token ratio); and full training against LoRA on
    ``lora_models`` (under ``NAME_lora``: time, whole-process peak and sync size ratios)."""
    res: dict = {}
    for name in lora_models:
        full, ad = _variant(name, "shared", out_dir, timeout_s), _variant(name, "lora", out_dir, timeout_s)
        res[f"{name}_lora"] = r = {"shared": full, "lora": ad}
        if "error" not in full and "error" not in ad:
            r["time_ratio_lora_over_full"] = ad["step_s"] / full["step_s"]
            r["memory_ratio_full_over_lora"] = full["peak_mib_total"] / ad["peak_mib_total"]
            r["sync_ratio_full_over_lora"] = full["sync_mib"] / ad["sync_mib"]
    for name in models:
        first, second = PAIRS.get(name, ("before", "after"))
        for variant in (first, second):
            res.setdefault(name, {})[variant] = _variant(name, variant, out_dir, timeout_s)
        b, a = res[name][first], res[name][second]
        if "error" not in a and "error" not in b:
            res[name][f"time_ratio_{second}_over_{first}"] = a["step_s"] / b["step_s"]
            res[name][f"memory_ratio_{first}_over_{second}"] = b["peak_mib_per_answer"] / max(
                a["peak_mib_per_answer"], 1e-9
            )
            res[name][f"llm_token_ratio_{first}_over_{second}"] = b["llm_tokens"] / a["llm_tokens"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.bench.learner", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(MODELS), default="tiny")
    p.add_argument("--variant", choices=("before", "after", "shared", "lora"), default="after")
    p.add_argument("--out", default="runs/bench/learner")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(a.model, a.variant, out, a.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
