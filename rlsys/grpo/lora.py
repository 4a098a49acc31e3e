"""LoRA on the learner (``learner.lora``): adapters wrapped around a Hugging Face model with peft,
the reference policy as the same model with its adapters off, and the merged weights that leave
the learner (the engines' weight sync, the Hugging Face export).

Why merged weights out: vLLM's engines, eval and Serve then run a plain checkpoint of the
family, exactly as for full training, and the digest and log-prob checks of a sync hold as they
are. A sync sends only the weights LoRA changes (each adapted linear layer's ``W + B A * scale``;
with the siblings vLLM fuses with it, so a fused layer is always complete), never the frozen
rest, which the engines already hold from the checkpoint they started from.
"""

from __future__ import annotations

import torch

# vLLM fuses these projections into one layer (qkv_proj, gate_up_proj): a sync that changes one of
# them sends all, so the engine's layerwise reload always gets whole layers
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# names of a Qwen-VL language model's linear layers (the vision tower's are qkv, proj, fc1/fc2 or
# linear_fc1/linear_fc2 under "visual"): a regex so the vision tower is left out unless asked
_LLM_ONLY = r"^(?!.*visual).*\.({names})$"


def lora_config(cfg, token_rows: dict[str, list[int]] | None = None):
    """peft's ``LoraConfig`` for a ``learner.lora`` section; ``token_rows``: module name -> the
    token ids whose rows train (peft's trainable tokens), from :func:`coordinate_rows`."""
    from peft import LoraConfig

    names = "|".join(cfg.target_modules)
    targets = (
        _LLM_ONLY.format(names=names) if not cfg.vision else rf"^.*\.({names}|qkv|proj|fc1|fc2|linear_fc1|linear_fc2)$"
    )
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        init_lora_weights=True,  # B = 0: the adapted model starts as the checkpoint
        trainable_token_indices=token_rows or None,
    )


def coordinate_rows(model, tokenizer, tokens) -> dict[str, list[int]]:
    """The rows of the vocabulary's own ``tokens`` that ``lora.coordinate_rows`` trains: in the
    input embedding, and in the output head unless the model ties it to the embedding (peft then
    makes the head follow the embedding's rows). Raises ``ValueError`` naming a token the
    tokenizer lacks, or when there are none (``qwen_json`` writes plain digits)."""
    if not tokens:
        raise ValueError(
            "lora.coordinate_rows: the vocabulary has no tokens of its own (qwen_json, qwen3_json write plain "
            "text), so there are no rows to train; leave it false"
        )
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    unk = tokenizer.unk_token_id
    missing = [t for t, i in zip(tokens, ids) if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(
            f"lora.coordinate_rows: the tokenizer lacks {len(missing)} of the vocabulary's tokens, e.g. {missing[:3]}"
        )
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {_module_name(model, embed): sorted(set(ids))}
    if head is not None and head.weight is not embed.weight:
        rows[_module_name(model, head)] = sorted(set(ids))
    return rows


def _module_name(model, module) -> str:
    # peft matches trainable_token_indices' keys against the end of the module's full name
    return next(n for n, m in model.named_modules() if m is module).rpartition(".")[2]


def wrap(model, cfg, *, tokenizer=None, tokens=()):
    """``model`` with LoRA adapters (peft), only the adapters trainable (with ``cfg.coordinate_rows``
    also the rows of the vocabulary's ``tokens``, which needs the ``tokenizer``)."""
    from peft import get_peft_model

    rows = None
    if getattr(cfg, "coordinate_rows", False):
        if tokenizer is None:
            raise ValueError("lora.coordinate_rows needs the tokenizer to find the tokens' rows")
        rows = coordinate_rows(model, tokenizer, tokens)
    peft_model = get_peft_model(model, lora_config(cfg, rows))
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"learner.lora: target_modules {cfg.target_modules} matched no layer of the model")
    return peft_model


def base_of(model):
    """The Hugging Face model inside a DeepSpeed engine and a peft wrapper (itself otherwise)."""
    m = getattr(model, "module", model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def is_lora(model) -> bool:
    return hasattr(getattr(model, "module", model), "disable_adapter")


# peft's trainable tokens put the embedding (or head) under ``<module>.token_adapter.base_layer``
_TOKEN_ADAPTER = ".token_adapter"


def _lora_layers(base) -> dict:
    """Name -> peft layer of every module whose weight an adapter changes: LoRA's linear layers,
    and the embedding and head of ``coordinate_rows`` (each under its own name, without peft's
    ``token_adapter``)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = {}
    for name, m in base.named_modules():
        if isinstance(m, LoraLayer):
            layers[name] = m
        elif isinstance(m, TrainableTokensLayer) and name.endswith(_TOKEN_ADAPTER):
            layers[name[: -len(_TOKEN_ADAPTER)]] = m
    return layers


def _merge_plan(model, only_changed: bool):
    """``(name, base parameter, adapter layer or None)`` of each tensor :func:`merged_weights`
    gives, in order, without computing anything: the names and shapes come from here alone."""
    base = base_of(model)
    layers = _lora_layers(base)
    changed = set(layers)
    if only_changed:
        for name in list(layers):
            parent, _, leaf = name.rpartition(".")
            for group in FUSED_SIBLINGS:
                if leaf in group:
                    changed.update(f"{parent}.{s}" for s in group)
    for name, p in base.named_parameters():
        if ".lora_" in name or ".trainable_tokens_" in name:
            continue
        owner, _, tail = name.rpartition(".base_layer.")
        owner = owner.removesuffix(_TOKEN_ADAPTER)
        out = f"{owner}.{tail}" if owner else name
        if only_changed and out.rpartition(".")[0] not in changed:
            continue
        yield out, p, (layers[owner] if owner and tail == "weight" and owner in layers else None)


def merged_shapes(model, only_changed: bool = False) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of :func:`merged_weights`, without merging (a merged weight has its
    base weight's shape and dtype): what a sync announces before it sends."""
    return [(name, p.dtype, tuple(p.shape)) for name, p, _ in _merge_plan(model, only_changed)]


def merged_weights(model, only_changed: bool = False):
    """``(name, tensor)`` of the model with its adapters merged, under the checkpoint's names (no
    ``base_layer``, no ``lora_*``; a tied embedding once, as ``named_parameters`` gives it).
    ``only_changed``: just the adapted layers' weights, with their fused siblings."""
    with torch.no_grad():
        for name, p, layer in _merge_plan(model, only_changed):
            if layer is None:
                yield name, p.detach()
            elif hasattr(layer, "trainable_tokens_delta"):  # the base rows with the trained ones put in
                yield name, layer.get_merged_weights(layer.active_adapters).detach()
            else:
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                yield name, (p + delta).detach()


def save_pretrained(model, path) -> None:
    """A Hugging Face checkpoint of ``model`` (inside a DeepSpeed engine or not): with adapters,
    the merged weights under the checkpoint's own names, a plain model of its family that eval,
    Serve and vLLM take as they are; without, the model as it is."""
    m = getattr(model, "module", model)
    if is_lora(m):
        base_of(m).save_pretrained(path, state_dict=dict(merged_weights(m)), safe_serialization=True)
    else:
        m.save_pretrained(path, safe_serialization=True)
