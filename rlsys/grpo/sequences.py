"""Turn (prompt, image, sampled answer) triples into model inputs and answer log-probs.

Used by the learner and the reference policy (no Ray here). Each prompt is encoded by the
checkpoint's own processor, so image placeholder expansion is the model's, not ours; the answer's
token ids are appended as vLLM sampled them (never re-tokenised from text, which could differ).
"""

from __future__ import annotations

import torch

from rlsys.data.images import open_rgb
from rlsys.grpo.attention import PAD, PROMPT, additive_mask, block_mask, dense_allowed

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
        _check_answer(processor, it, resp)
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
    causal VLM, looking through a DeepSpeed engine's ``module`` and a peft wrapper."""
    m = getattr(model, "module", model)
    if hasattr(m, "get_base_model"):  # a peft model (learner.lora): its adapters live inside the base
        m = m.get_base_model()
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


# ---------------------------------------------------------------------------------------------
# Shared-prefix passes: one sequence per prompt group (learner.shared_prefix)
# ---------------------------------------------------------------------------------------------
# In perception GRPO the prompt is mostly image (hundreds to thousands of image tokens) and each
# prompt gets G answers of tens of tokens. Run per answer, the vision tower and the whole prompt
# go through the forward and backward G times. Here a group's prompt is laid out once, followed
# by its answers: [prompt | answer 1 | answer 2 | ...]. Each answer attends to the whole prompt
# and causally to itself, never to another answer (a 4-D additive mask, as SDPA and eager
# attention take it), and its position ids continue from the prompt as if it followed the prompt
# alone, so every answer token sees exactly the keys, values and rotary phases it sees in its own
# sequence. The loss is a sum over answer tokens, so the prompt's gradient is the sum of what each
# answer sends it: the same gradient, computed once. (Prefix Grouper, arXiv 2506.05433, shows the
# same for text prompts.) On GPUs the dense mask would be replaced by FlexAttention block masks
# or a prefix/suffix two-stage kernel; on the CPU, SDPA with the explicit mask is what runs.


def prompt_groups(items) -> list[list[int]]:
    """Indices of ``items`` grouped by (prompt, image), groups in order of first appearance."""
    groups: dict = {}
    for i, it in enumerate(items):
        groups.setdefault((it.prompt, it.image), []).append(i)
    return list(groups.values())


def _check_answer(processor, it, resp) -> None:
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


def build_shared_batch(processor, items, pad_id: int, cache: dict | None = None) -> dict:
    """The shared-prefix layout of ``items`` (:class:`~rlsys.grpo.records.LearnerItem`), one row
    per prompt group (answers of one prompt and image need not be adjacent in ``items``).

    Returns a dict: ``input_ids`` ``[S, L]`` (right-padded), ``segments`` ``[S, L]`` (0 prompt,
    k the k-th answer, -1 padding; :mod:`rlsys.grpo.attention`), ``allowed`` ``[S, L, L]`` bool
    (query i may attend to key j: the rule over ``segments``), ``answer_pos`` ``[S, L]`` (an answer token's offset in its
    answer, -1 for prompt and padding), ``prompt_len`` per row, ``encs`` (the processor output of
    each row's prompt), and per item ``rows[i]``, ``pred[i]`` (the positions whose hidden states
    predict its answer tokens: the prompt's last, then its own but last) and ``targets[i]``.
    """
    encs = encode_prompts(processor, items, cache)
    groups = prompt_groups(items)
    rows, pred, targets = [None] * len(items), [None] * len(items), [None] * len(items)
    seqs, layouts, row_encs = [], [], []
    for r, g in enumerate(groups):
        enc = encs[g[0]]
        prompt = enc["input_ids"][0]
        p = prompt.numel()
        parts, spans, start = [prompt], [], p
        for i in g:
            it = items[i]
            resp = torch.as_tensor(it.response_ids, dtype=torch.long)
            _check_answer(processor, it, resp)
            if it.prompt_ids is not None:
                check_prompt_ids(it.prompt_ids, prompt, it.image)
            n = resp.numel()
            parts.append(resp)
            spans.append((start, n))
            rows[i] = r
            pred[i] = torch.cat([torch.tensor([p - 1]), torch.arange(start, start + n - 1)])
            targets[i] = resp
            start += n
        seqs.append(torch.cat(parts))
        layouts.append((p, spans))
        row_encs.append(enc)
    S, L = len(seqs), max(s.numel() for s in seqs)
    input_ids = torch.full((S, L), pad_id, dtype=torch.long)
    segments = torch.full((S, L), PAD, dtype=torch.long)
    answer_pos = torch.full((S, L), -1, dtype=torch.long)
    for r, (s, (p, spans)) in enumerate(zip(seqs, layouts)):
        input_ids[r, : s.numel()] = s
        segments[r, :p] = PROMPT
        for k, (a0, n) in enumerate(spans, start=1):
            segments[r, a0 : a0 + n] = k
            answer_pos[r, a0 : a0 + n] = torch.arange(n)
    return {
        "input_ids": input_ids,
        "segments": segments,
        "allowed": dense_allowed(segments),
        "answer_pos": answer_pos,
        "prompt_len": [lay[0] for lay in layouts],
        "encs": row_encs,
        "rows": rows,
        "pred": pred,
        "targets": targets,
    }


def shared_position_ids(decoder, batch: dict) -> torch.Tensor:
    """``[3, S, L]`` M-RoPE position ids of a :func:`build_shared_batch` layout: the prompt's as the
    model computes them for the prompt alone (image tokens in 3-D), every answer's continuing from
    the prompt's largest position + 1, as a single answer after the prompt would."""
    S, L = batch["input_ids"].shape
    pos = torch.zeros((3, S, L), dtype=torch.long)
    for r, (enc, p) in enumerate(zip(batch["encs"], batch["prompt_len"])):
        kw = {k: enc[k] for k in ("image_grid_thw", "video_grid_thw", "mm_token_type_ids") if k in enc}
        if "mm_token_type_ids" not in kw:
            kw["mm_token_type_ids"] = torch.zeros_like(enc["input_ids"], dtype=torch.int)
        prompt_pos, _ = decoder.get_rope_index(input_ids=enc["input_ids"], **kw)
        pos[:, r, :p] = prompt_pos[:, 0, :p]
        ans = batch["answer_pos"][r]
        on = ans >= 0
        pos[:, r, on] = prompt_pos[:, 0, :p].max() + 1 + ans[on]
    return pos


def shared_token_logprobs(
    model,
    batch: dict,
    device,
    temperature: float = 1.0,
    entropy: bool = True,
    banned_ids=None,
    mm_encoder_outputs=None,
    attention: str = "dense_mask",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Answer log-probs (and entropies) of a :func:`build_shared_batch` layout, as
    :func:`token_logprobs` gives them per answer, in a compact ``[B, T]`` layout: row ``b`` is
    item ``b``'s answer, ``T`` the longest answer, ``mask[b, :len_b]`` True. ``mm_encoder_outputs``:
    the image features, when already computed (a frozen vision tower serves both passes).
    ``attention``: ``dense_mask`` (SDPA with ``batch["allowed"]``) or ``flex`` (a block mask of
    ``batch["segments"]``; the model switched by :func:`rlsys.grpo.attention.use_block_masks`)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    decoder, head = _decoder_and_head(model)
    dtype = next(head.parameters()).dtype
    ids = batch["input_ids"].to(device)
    if attention == "flex":
        attn_mask = block_mask(batch["segments"], device)
    elif attention == "dense_mask":
        attn_mask = additive_mask(batch["allowed"], dtype).to(device)
    else:
        raise ValueError(f"attention must be dense_mask or flex, got {attention!r}")
    kwargs = {
        "input_ids": ids,
        "attention_mask": attn_mask,
        "position_ids": shared_position_ids(decoder, batch).to(device),
        "use_cache": False,
    }
    encs = batch["encs"]
    if mm_encoder_outputs is not None:
        kwargs["mm_encoder_outputs"] = mm_encoder_outputs
    else:
        for k in ("pixel_values", "image_grid_thw"):
            if k in encs[0]:
                kwargs[k] = torch.cat([e[k] for e in encs], dim=0).to(device)
    if "image_grid_thw" in encs[0] and "image_grid_thw" not in kwargs:
        kwargs["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in encs], dim=0).to(device)
    hidden = decoder(**kwargs).last_hidden_state  # [S, L, H]
    rows = torch.cat([torch.full((p.numel(),), r) for r, p in zip(batch["rows"], batch["pred"])]).to(device)
    pred = torch.cat(batch["pred"]).to(device)
    tgt = torch.cat(batch["targets"]).to(device)
    logits = _sampling_logits(head(hidden[rows, pred]), temperature, banned_ids)  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    picked = logp_all.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    lens = torch.tensor([t.numel() for t in batch["targets"]])
    B, T = len(lens), int(lens.max())
    mask = (torch.arange(T)[None, :] < lens[:, None]).to(device)
    logp = torch.zeros((B, T), dtype=picked.dtype, device=device).masked_scatter(mask, picked)
    ent = None
    if entropy:
        with torch.no_grad():
            e = -(logp_all.exp() * logp_all).sum(-1)
            ent = torch.zeros((B, T), dtype=e.dtype, device=device).masked_scatter(mask, e)
    return logp, ent, mask


# ----------------------------------------------------------------------------------------------
# A frozen vision tower's features, computed once per image per step (learner.freeze_vision)
# ----------------------------------------------------------------------------------------------
def _visual(model):
    """The vision tower of a Qwen2.5-VL-style model (``model.model.visual`` or ``model.visual``)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, "model", model)
    return getattr(inner, "visual", None) or getattr(model, "visual", None)


def vision_tower_features(model, enc: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's output for one prompt's images before the merger (the trainable
    projector), with the order that undoes the tower's window permutation: ``(features,
    reverse_index)``. Computed without a graph: only for a frozen tower, whose features are the
    same for the policy and the reference (both start from one checkpoint and the tower never
    moves), so one encoding serves both passes of a step."""
    from transformers.vision_utils import get_vision_window_index

    visual = _visual(model)
    grid = enc["image_grid_thw"].to(device)
    with torch.no_grad():
        out = visual(enc["pixel_values"].to(device).type(visual.dtype), grid_thw=grid)
    vc = visual.config
    window_index, _ = get_vision_window_index(
        grid, spatial_merge_size=visual.spatial_merge_size, window_size=vc.window_size, patch_size=vc.patch_size
    )
    return out.last_hidden_state, torch.argsort(window_index.to(device))


def merged_image_features(model, features: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """``mm_encoder_outputs`` for ``model``'s forward from :func:`vision_tower_features` of each
    row's prompt: ``model``'s own merger (with its graph, when the projector trains) on the
    shared tower output, in the order the model's own forward would give."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    merger = _visual(model).merger
    pooled = tuple(merger(h)[rev] for h, rev in features)
    return {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
