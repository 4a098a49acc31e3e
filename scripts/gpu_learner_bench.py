"""The learner's forward and backward on one GPU, shared prefix against one sequence per answer.

Needs only torch, transformers and rlsys's pure modules (``rlsys.grpo.sequences``, ``.records``,
``.algorithm``, ``rlsys.data.images``): a lent GPU machine has no Ray, vLLM or DeepSpeed. The model
is built from a config on the device with random weights (a full-depth Qwen2.5-VL-3B is 7.5 GB in
bf16, too large to carry); its processor files come from ``--model-files``, a directory with the
config and the tokenizer/processor files and no weights, which ``--prepare DIR`` writes here from
rlsys's 3B-shaped model (the real widths and token layout).

On CUDA a third variant runs the shared prefix with FlexAttention block masks
(``learner.shared_prefix_attention`` flex, the learner's GPU default) beside the dense mask.

One step, as the learner runs it: the reference policy's forward (no graph), then the policy's
forward and backward with the GRPO loss, for one group of ``--answers`` answers of
``--answer-tokens`` tokens to one ``--image-px`` square image. Prints per variant: step time,
answer tokens per second, peak GPU memory, and model FLOPs utilisation: the FLOPs the variant
executes (2 x parameters x tokens for the reference pass, 6 x for the training pass, vision and
LLM counted apart, attention's own FLOPs not counted) over step time x ``--peak-tflops``.

Prepare here, run there::

    python scripts/gpu_learner_bench.py --prepare runs/gpu-model-files
    # on the GPU machine (carry runs/gpu-model-files):
    python scripts/gpu_learner_bench.py --model-files runs/gpu-model-files --device cuda \\
        --dtype bfloat16 --layers 36 --vision-depth 32 --image-px 896
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 (the datasheet's 1,979 is with sparsity)


def prepare(out: Path) -> Path:
    """The 3B-shaped model's config and processor files, without weights (rlsys.models builds it)."""
    from rlsys.bench.learner import _model_dir

    src = Path(_model_dir("qwen3b_g8_1024", out.parent / (out.name + "-build")))
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt")):
            shutil.copy2(f, out / f.name)
    return out


def build(model_files: Path, layers: int, vision_depth: int, dtype, device):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    cfg = AutoConfig.from_pretrained(model_files)
    cfg.text_config.num_hidden_layers = layers
    cfg.vision_config.depth = vision_depth
    # Qwen2.5-VL-3B: windowed attention in every block but each 8th (7, 15, 23, 31)
    cfg.vision_config.fullatt_block_indexes = [k for k in range(vision_depth) if k % 8 == 7] or [vision_depth - 1]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    processor = AutoProcessor.from_pretrained(model_files)
    return model, processor


def parameter_counts(model) -> dict[str, int]:
    """Parameters the tokens go through: the LLM's (embeddings excluded: a lookup, no FLOPs),
    the LM head's (logits are taken only at answer positions) and the vision tower's."""
    out = {"llm": 0, "vision": 0, "embedding": 0}
    for name, p in model.named_parameters():
        if "visual" in name:
            out["vision"] += p.numel()
        elif "embed_tokens" in name:
            out["embedding"] += p.numel()
        elif "lm_head" not in name:
            out["llm"] += p.numel()
    out["head"] = model.get_output_embeddings().weight.numel()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", help="write the model files (config, processor, no weights) here and stop")
    p.add_argument("--model-files", help="a directory written by --prepare (or any Qwen2.5-VL model directory)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--vision-depth", type=int, default=32)
    p.add_argument("--image-px", type=int, default=896, help="square image side: 896 px is 1,024 image tokens")
    p.add_argument("--answers", type=int, default=8)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    if a.prepare:
        print(prepare(Path(a.prepare)))
        return 0
    if not a.model_files:
        p.error("--model-files is needed (write one with --prepare)")

    import torch
    from PIL import Image

    from rlsys.grpo.algorithm import policy_loss
    from rlsys.grpo.attention import use_block_masks
    from rlsys.grpo.records import LearnerItem
    from rlsys.grpo.sequences import (
        banned_token_ids,
        build_batch,
        build_shared_batch,
        shared_token_logprobs,
        token_logprobs,
    )

    dtype = getattr(torch, a.dtype)
    device = torch.device(a.device)
    model, processor = build(Path(a.model_files), a.layers, a.vision_depth, dtype, device)
    model.train()
    tok = processor.tokenizer
    img = Path(tempfile.mkdtemp()) / f"noise-{a.image_px}.png"
    Image.effect_noise((a.image_px, a.image_px), 60).convert("RGB").save(img)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect every circle."}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    rng = random.Random(0)
    items = [
        LearnerItem(
            prompt=prompt,
            image=str(img),
            response_ids=[rng.randrange(10, tok.vocab_size) for _ in range(a.answer_tokens)],
            advantage=rng.uniform(-1, 1),
        )
        for _ in range(a.answers)
    ]
    banned = banned_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_answer = a.answers * a.answer_tokens
    counts = parameter_counts(model)
    params = [q for q in model.parameters() if q.requires_grad]

    def per_answer():
        cache: dict = {}
        inputs, targets, mask = build_batch(processor, items, pad, cache)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        targets, mask = targets.to(device), mask.to(device)
        with torch.no_grad():
            ref, _ = token_logprobs(model, inputs, targets, mask=mask, entropy=False, banned_ids=banned)
        logp, _ = token_logprobs(model, inputs, targets, mask=mask, banned_ids=banned)
        return logp, ref, mask

    def shared(attention="dense_mask"):
        batch = build_shared_batch(processor, items, pad, {})
        kw = {"banned_ids": banned, "attention": attention}
        with torch.no_grad():
            ref, _, _ = shared_token_logprobs(model, batch, device, entropy=False, **kw)
        logp, _, mask = shared_token_logprobs(model, batch, device, **kw)
        return logp, ref, mask

    variants = [("per_answer", per_answer), ("shared", shared)]
    if device.type == "cuda":  # FlexAttention's backward runs on GPUs only
        use_block_masks(model)  # other masks still go to SDPA: the two variants above are unchanged
        variants.append(("shared_flex", lambda: shared("flex")))

    enc = processor(text=[prompt], images=[Image.open(img)], return_tensors="pt")
    prompt_tokens = int(enc["input_ids"].shape[1])
    patches = int(enc["pixel_values"].shape[0])
    results, logps = {}, {}
    for name, fn in variants:
        times = []
        for k in range(a.repeats + 1):  # the first is a warm-up (kernels chosen, allocator grown)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            logp, ref, mask = fn()
            adv = torch.tensor([it.advantage for it in items], device=device, dtype=torch.float32)
            loss, _ = policy_loss(
                logp.float(), logp.detach().float(), ref.float(), adv, mask, kl_coef=0.01, num_tokens=n_answer
            )
            loss.backward()
            for q in params:
                q.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k:
                times.append(time.perf_counter() - t0)
            logps[name] = logp.detach()[mask].float().cpu()
        step_s = statistics.median(times)
        copies = a.answers if name == "per_answer" else 1  # the prompt (and the image) per answer, or once
        llm_tokens = copies * prompt_tokens + n_answer
        # 8 = 2 (reference forward) + 6 (training forward and backward) FLOPs per parameter and token
        flops = 8 * (counts["llm"] * llm_tokens + counts["vision"] * copies * patches + counts["head"] * n_answer)
        results[name] = {
            "step_s": step_s,
            "answer_tokens_per_s": n_answer / step_s,
            "llm_tokens": llm_tokens,
            "vision_patches": copies * patches,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "mfu": flops / step_s / (a.peak_tflops * 1e12) if device.type == "cuda" else None,
            "executed_tflop": flops / 1e12,
        }
    gap = float((logps["shared"] - logps["per_answer"]).abs().max())
    flex = {}
    if "shared_flex" in results:
        flex = {
            "speedup_flex": results["per_answer"]["step_s"] / results["shared_flex"]["step_s"],
            "max_logp_difference_flex": float((logps["shared_flex"] - logps["per_answer"]).abs().max()),
        }
    res = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dtype": a.dtype,
        "layers": a.layers,
        "vision_depth": a.vision_depth,
        "image_px": a.image_px,
        "prompt_tokens": prompt_tokens,
        "answers": a.answers,
        "answer_tokens": a.answer_tokens,
        "parameters": counts,
        **results,
        "speedup": results["per_answer"]["step_s"] / results["shared"]["step_s"],
        "llm_token_ratio": results["per_answer"]["llm_tokens"] / results["shared"]["llm_tokens"],
        "max_logp_difference": gap,
        **flex,
    }
    print(
        f"{res['device']} {a.dtype}, {a.layers} layers + {a.vision_depth} vision blocks, {prompt_tokens} prompt tokens, "
        f"G={a.answers} x {a.answer_tokens} answer tokens"
    )
    for name, r in results.items():
        mem = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"  {name:11s} {r['step_s']:.3f} s/step  {r['answer_tokens_per_s']:.0f} answer tok/s  "
            f"peak {mem}  MFU {mfu}  ({r['llm_tokens']} LLM tokens)"
        )
    print(
        f"  shared vs per answer: {res['speedup']:.2f}x faster, {res['llm_token_ratio']:.2f}x fewer LLM tokens; "
        f"answer log-probs differ by at most {gap:.2e}"
    )
    if flex:
        print(
            f"  shared with FlexAttention block masks: {flex['speedup_flex']:.2f}x faster than per answer; "
            f"log-probs differ by at most {flex['max_logp_difference_flex']:.2e}"
        )
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
