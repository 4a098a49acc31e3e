"""Turn (prompt, image, sampled answer) triples into model inputs and answer log-probs.

Used by the learner and the reference policy (no Ray here). Each prompt is encoded by the
checkpoint's own processor, so image placeholder expansion is the model's, not ours; the answer's
token ids are appended as vLLM sampled them (never re-tokenised from text, which could differ).
"""

from __future__ import annotations

import torch

# Keys the Qwen2.5-VL processor returns per token (padded to the batch), vs per image patch (concatenated).
_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")


def encode_prompts(processor, items, cache: dict | None = None) -> list[dict]:
    """Processor outputs for each item's ``prompt`` and ``image`` (cached by both: the G
    answers of one prompt share one encoding)."""
    from PIL import Image

    cache = {} if cache is None else cache
    out = []
    for it in items:
        key = (it["prompt"], it["image"])
        if key not in cache:
            with Image.open(it["image"]) as im:
                cache[key] = processor(text=[it["prompt"]], images=[im.convert("RGB")], return_tensors="pt")
        out.append(cache[key])
    return out


def build_batch(processor, items, pad_id: int, cache: dict | None = None):
    """Right-padded inputs for ``items`` (dicts with prompt, image, response_ids).

    Returns ``(inputs, targets, mask)``: ``inputs`` for the model's forward; ``targets[b, t]``
    is the token at position t+1 and ``mask[b, t]`` is True where that token belongs to the
    answer, so ``log_softmax(logits[:, :-1]).gather(targets)`` under ``mask`` are the answer's
    log-probs, shape ``[B, L-1]``.
    """
    encs = encode_prompts(processor, items, cache)
    seqs, starts = [], []
    for enc, it in zip(encs, items):
        resp = torch.as_tensor(it["response_ids"], dtype=torch.long)
        if resp.numel() == 0:
            raise ValueError("an answer with no tokens cannot be scored by the learner")
        placeholders = [t for t in (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None)) if t is not None]
        if placeholders and bool(torch.isin(resp, torch.tensor(placeholders)).any()):
            raise ValueError(f"an answer to {it['image']} contains an image/video placeholder token {placeholders}: the model "
                             "would read it as an image slot; the rollout engine must not sample these tokens")
        prompt = enc["input_ids"][0]
        seqs.append(torch.cat([prompt, resp]))
        starts.append(prompt.numel())
    L = max(s.numel() for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    mm_types = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1), dtype=torch.bool)
    for b, (s, p0) in enumerate(zip(seqs, starts)):
        input_ids[b, : s.numel()] = s
        attention[b, : s.numel()] = 1
        if "mm_token_type_ids" in encs[b]:
            mm_types[b, :p0] = encs[b]["mm_token_type_ids"][0]
        # position t predicts token t+1: the answer's tokens p0..len-1 are predicted at p0-1..len-2
        mask[b, p0 - 1 : s.numel() - 1] = True
    inputs = {"input_ids": input_ids, "attention_mask": attention}
    if "mm_token_type_ids" in encs[0]:
        inputs["mm_token_type_ids"] = mm_types
    for k in encs[0]:
        if k not in _PER_TOKEN:
            inputs[k] = torch.cat([e[k] for e in encs], dim=0)
    return inputs, input_ids[:, 1:].clone(), mask


def token_logprobs(model, inputs, targets, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the logits' entropy, both ``[B, L-1]``, float32.

    ``temperature`` is the one the answers were sampled at: the policy GRPO optimises is the
    one that produced the samples, ``softmax(logits / T)``, so the ratio, the KL term and the
    entropy are all taken under it (at T = 1 this is the model's own distribution).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logits = model(**inputs).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
