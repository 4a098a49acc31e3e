"""Does a model learn WHERE objects are, or only what they look like?

A diagnostic for the tiny model (issue 5): plain PyTorch SFT on detection questions with ONE
object per image and a NEW scene for every example (nothing can be memorised), then the
teacher-forced error of each coordinate slot of the answer's box on fixed held-out scenes, in
bins, next to a constant guess. x0/y0 can only come from the image's absolute positions; x1/y1
also have x0/y0 in context, so a model that reads the object's size but not its position gets
x1/y1 right and x0/y0 at chance. That is what the default tiny model does (see the issue note).

    .venv/bin/python scripts/probe_localisation.py --steps 2000
    .venv/bin/python scripts/probe_localisation.py --steps 2000 --blank      # images carry nothing
    .venv/bin/python scripts/probe_localisation.py --steps 2000 --overlay 100 # positions painted in
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rlsys.data import synthetic
from rlsys.grpo.sequences import build_batch
from rlsys.lang.targets import conversation
from rlsys.models import TinySpec, build_tiny_model, coordinate_token_ids, load_model, load_processor
from rlsys.sft.losses import answer_token_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--size-px", type=int, default=112, help="image side; 28 px per image token")
    ap.add_argument("--rope-theta", type=float, default=1e6, help="the LLM's M-RoPE base (Qwen2.5-VL: 1e6)")
    ap.add_argument("--sigma-bins", type=float, default=0.0, help="soft coordinate targets (rlsys.sft.losses)")
    ap.add_argument(
        "--overlay",
        type=float,
        default=0.0,
        help="paint positions into the pixels: a left-right ramp of this many levels in red, top-bottom in green",
    )
    ap.add_argument("--blank", action="store_true", help="train on blank images: what the text alone gives")
    ap.add_argument("--eval-every", type=int, default=100)
    a = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="probe-"))
    spec = TinySpec(max_pixels=a.size_px**2, rope_theta=a.rope_theta)
    model_dir = build_tiny_model(work / "model", spec)
    processor = load_processor(model_dir)
    tok = processor.tokenizer
    model = load_model(model_dir)
    coord_ids = torch.tensor(coordinate_token_ids(tok))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    counter = iter(range(10**9))

    def example(rng: random.Random) -> dict:
        img, objs = synthetic._shape_scene(rng, a.size_px, 1)
        sample = synthetic._shape_samples(rng, "x.png", a.size_px, objs, "detection")
        _, question, answer = conversation(sample, rng, list(synthetic.SHAPES), 1)
        arr = np.asarray(img, dtype=np.float32).copy()
        if a.overlay:
            # compress the colours first so the ramp is never clipped away at 0 or 255
            yy, xx = np.mgrid[0 : a.size_px, 0 : a.size_px] / a.size_px
            arr *= 1 - a.overlay / 255
            arr[..., 0] += a.overlay * xx
            arr[..., 1] += a.overlay * yy
        if a.blank:
            arr[:] = 240
        path = work / f"{next(counter)}.png"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return {
            "prompt": prompt,
            "image": str(path),
            "response_ids": tok(answer, add_special_tokens=False)["input_ids"] + [im_end],
        }

    held_out = [example(random.Random(f"eval-{i}")) for i in range(64)]
    inputs_ev, targets_ev, mask_ev = build_batch(processor, held_out, tok.pad_token_id)
    is_coord = torch.isin(targets_ev, coord_ids) & mask_ev
    true = (targets_ev - coord_ids[0])[is_coord].view(-1, 4).float()  # only boxes: None answers have no coords
    const_err = (true - true.median(0).values).abs().mean(0)
    print(
        f"held-out boxes {true.shape[0]}; constant-guess error per slot x0,y0,x1,y1: {const_err.round().int().tolist()} bins"
    )

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    rng = random.Random(1)
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        lr = a.lr * min(1.0, step / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        inputs, targets, mask = build_batch(processor, [example(rng) for _ in range(a.batch)], tok.pad_token_id)
        per_token, n = answer_token_loss(model(**inputs).logits[:, :-1], targets, mask, coord_ids, a.sigma_bins)
        loss = per_token.sum() / n
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            with torch.no_grad():
                logits = model(**inputs_ev).logits[:, :-1]
            model.train()
            pred = logits[..., coord_ids].argmax(-1)[is_coord].view(-1, 4).float()
            err = (pred - true).abs().mean(0)
            print(
                f"step {step} loss {loss.item():.3f} teacher-forced error per slot x0,y0,x1,y1: "
                f"{err.round().int().tolist()} bins ({(time.perf_counter() - t0) / step:.2f} s/step)",
                flush=True,
            )


if __name__ == "__main__":
    main()
