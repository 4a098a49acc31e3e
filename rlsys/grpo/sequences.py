"""Turn (prompt, image, sampled answer) triples into model inputs and answer log-probs.

Used by the learner and the reference policy (no Ray here). Each prompt is encoded by the
checkpoint's own processor, so image placeholder expansion is the model's, not ours; the answer's
token ids are appended as vLLM sampled them (never re-tokenised from text, which could differ).
"""

from __future__ import annotations

import torch

from rlsys.data.images import open_rgb

# Vision placeholders must never be sampled: the learner re-reads prompt + answer through the
# processor, and an <|image_pad|> in an answer is taken for an image slot with no features. The
# engines add this bias (vLLM's floor) to their logits, and the learner adds the same, so both
# take log-probs of the one distribution the answers were drawn from; without it the learner's
# log-probs sit below the engine's by log(1 - p(banned)), 3e-3 nats per token on a random model.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
BANNED_LOGIT_BIAS = -100.0


def banned_token_ids(tokenizer) -> list[int]:
    """Ids of the vision placeholder tokens this tokenizer has (the ones no answer may hold)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return sorted({i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id})


# Keys the Qwen2.5-VL processor returns per token (padded to the batch), vs per image patch (concatenated).
_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")


def encode_prompts(processor, items, cache: dict | None = None) -> list[dict]:
    """Processor outputs for each item's ``prompt`` and ``image`` (:class:`LearnerItem` or
    anything with those attributes; cached by both: the G answers of one prompt share one encoding)."""

    cache = {} if cache is None else cache
    out = []
    for it in items:
        key = (it.prompt, it.image)
        if key not in cache:
            cache[key] = processor(text=[it.prompt], images=[open_rgb(it.image)], return_tensors="pt")
        out.append(cache[key])
    return out


def check_prompt_ids(engine_ids, learner_ids: torch.Tensor, where: str) -> None:
    """Raise if the engine's prompt token ids differ from the learner's processor output, naming
    the first differing position (a different chat template, pixel budget or tokenizer)."""
    mine = learner_ids.tolist()
    theirs = list(engine_ids)
    if mine == theirs:
        return
    k = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    raise ValueError(
        f"the learner's prompt for {where} differs from the engine's at token {k} "
        f"(learner {mine[k : k + 5]}, engine {theirs[k : k + 5]}; lengths {len(mine)} and {len(theirs)}): "
        "the engines and the learner must share the processor, chat template and model.min_pixels/max_pixels"
    )


def build_batch(processor, items, pad_id: int, cache: dict | None = None):
    """Right-padded inputs for ``items`` (:class:`~rlsys.grpo.records.LearnerItem`: prompt,
    image, response_ids and, when the engine reported them, prompt_ids).

    Returns ``(inputs, targets, mask)``: ``inputs`` for the model's forward; ``targets[b, t]``
    is the token at position t+1 and ``mask[b, t]`` is True where that token belongs to the
    answer, so ``log_softmax(logits[:, :-1]).gather(targets)`` under ``mask`` are the answer's
    log-probs, shape ``[B, L-1]``.
    """
    encs = encode_prompts(processor, items, cache)
    seqs, starts = [], []
    for enc, it in zip(encs, items):
        resp = torch.as_tensor(it.response_ids, dtype=torch.long)
        if resp.numel() == 0:
            raise ValueError("an answer with no tokens cannot be scored by the learner")
        placeholders = [
            t
            for t in (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None))
            if t is not None
        ]
        if placeholders and bool(torch.isin(resp, torch.tensor(placeholders)).any()):
            raise ValueError(
                f"an answer to {it.image} contains an image/video placeholder token {placeholders}: the model "
                "would read it as an image slot; the rollout engine must not sample these tokens"
            )
        prompt = enc["input_ids"][0]
        if it.prompt_ids is not None:
            # the engine's token ids for this prompt (image placeholders expanded): the learner
            # must score the sequence the engine sampled from, so its own rendering has to agree
            check_prompt_ids(it.prompt_ids, prompt, it.image)
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


def _decoder_and_head(model):
    """The decoder (returns hidden states after the final norm) and the output projection of a
    causal VLM, looking through a DeepSpeed engine's ``module``."""
    m = getattr(model, "module", model)
    decoder, head = getattr(m, "model", None), getattr(m, "lm_head", None)
    if decoder is None or head is None:
        raise TypeError(f"{type(m).__name__} has no .model / .lm_head: cannot take logits at answer positions only")
    return decoder, head


def _sampling_logits(logits: torch.Tensor, temperature: float, banned_ids) -> torch.Tensor:
    """The engine's processed logits: the banned tokens' bias first, then the temperature (vLLM's order)."""
    logits = logits.float()
    if banned_ids is not None and len(banned_ids):
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        bias[torch.as_tensor(banned_ids, device=logits.device)] = BANNED_LOGIT_BIAS
        logits = logits + bias
    return logits / temperature if temperature != 1.0 else logits


def token_logprobs(
    model,
    inputs,
    targets,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    entropy: bool = True,
    banned_ids=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each target token and the logits' entropy, both ``[B, L-1]``, float32.

    ``temperature`` is the one the answers were sampled at: the policy GRPO optimises is the
    one that produced the samples, ``softmax(logits / T)``, so the ratio, the KL term and the
    entropy are all taken under it (at T = 1 this is the model's own distribution).
    ``banned_ids`` get the engines' logit bias (:data:`BANNED_LOGIT_BIAS`), for the same reason.

    With ``mask`` (``[B, L-1]``, the answer positions of :func:`build_batch`) only those rows of
    the decoder's last hidden state go through the output projection: the image and prompt
    positions, most of a VLM sequence, never become vocabulary-wide logits. A Qwen2.5-VL-3B
    sequence of 5,000 tokens would otherwise hold 5,000 x 151,936 float32 logits (3 GB) per
    copy, and log-softmax, exp and the entropy product each make another. Positions outside
    ``mask`` are 0 in both outputs. The entropy is a metric: it is computed without a graph
    (``entropy=False`` skips it, e.g. for the reference policy), so backward keeps only what
    the log-probs need.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if mask is None:  # every position (prompt log-probs, checks): the plain forward
        logits = _sampling_logits(model(**inputs).logits[:, :-1], temperature, banned_ids)
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1) if entropy else None
        return logp, ent
    if mask.shape != targets.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the targets' shape {tuple(targets.shape)}")
    decoder, head = _decoder_and_head(model)
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]  # [B, L-1, H]: position t predicts token t+1
    logits = _sampling_logits(head(hidden[mask]), temperature, banned_ids)  # [N, V], N = answer tokens in the batch
    logp_all = torch.log_softmax(logits, dim=-1)
    picked = logp_all.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    logp = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
    ent = None
    if entropy:
        with torch.no_grad():
            e = -(logp_all.exp() * logp_all).sum(-1)
            ent = torch.zeros(targets.shape, dtype=e.dtype, device=e.device).masked_scatter(mask, e)
    return logp, ent
