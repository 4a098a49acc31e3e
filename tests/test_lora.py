"""learner.lora (rlsys/grpo/lora.py): what leaves a LoRA learner is the model with its adapters
merged, exactly as peft merges it; the reference policy is the same model with its adapters off,
the same log-probs as a separate copy of the base."""

import copy

import pytest
import torch

from rlsys.config import LoraSection
from rlsys.grpo.lora import base_of, merged_shapes, merged_weights, wrap
from rlsys.models import load_model


def _adapted(tiny_model_dir, **kw):
    """The tiny model with adapters whose B is random (a trained adapter: the merge is not a no-op)."""
    model = wrap(load_model(str(tiny_model_dir)), LoraSection(rank=4, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_merged_weights_are_pefts_merge_under_the_checkpoints_names(tiny_model_dir):
    base = dict(load_model(str(tiny_model_dir)).named_parameters())
    model = _adapted(tiny_model_dir)
    merged = dict(merged_weights(model))
    assert merged.keys() == base.keys()  # the checkpoint's names: no base_layer, no lora_*
    peft_merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    for n in base:
        torch.testing.assert_close(merged[n], peft_merged[n], rtol=0, atol=0)
    # only the LLM's linear layers changed; the vision tower and the embedding are the checkpoint's
    changed = {n for n in base if not torch.equal(merged[n], base[n])}
    assert changed and all("language_model.layers" in n and n.endswith("proj.weight") for n in changed), changed


def test_a_sync_sends_the_adapted_layers_with_their_fused_siblings(tiny_model_dir):
    """Adapters on q_proj and up_proj only: a sync sends q, k, v (vLLM's qkv_proj) and gate, up
    (gate_up_proj) whole, and nothing else."""
    model = _adapted(tiny_model_dir, target_modules=["q_proj", "up_proj"])
    sent = dict(merged_weights(model, only_changed=True))
    leaves = {n.rsplit(".", 2)[-2] for n in sent}
    assert leaves == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}, leaves
    full = dict(merged_weights(model))
    for n, t in sent.items():
        assert torch.equal(t, full[n])
    # what a sync announces first, without merging, is what it then sends
    assert merged_shapes(model, only_changed=True) == [(n, t.dtype, tuple(t.shape)) for n, t in sent.items()]


def test_the_reference_is_the_base_with_adapters_off(tiny_model_dir, synthetic_dir):
    from rlsys.data.samples import load_dataset
    from rlsys.grpo.sequences import build_shared_batch, shared_token_logprobs
    from rlsys.models import load_processor
    from tests.test_shared_prefix import _items

    proc = load_processor(str(tiny_model_dir))
    items = _items(proc, load_dataset(synthetic_dir / "train.jsonl")[:2], [(4, 2), (5,)])
    batch = build_shared_batch(proc, items, proc.tokenizer.pad_token_id)
    model = _adapted(tiny_model_dir)
    separate = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        want = shared_token_logprobs(separate, batch, "cpu", entropy=False)[0]
        with model.disable_adapter():
            off = shared_token_logprobs(model, batch, "cpu", entropy=False)[0]
        on = shared_token_logprobs(model, batch, "cpu", entropy=False)[0]
    torch.testing.assert_close(off, want, rtol=1e-6, atol=1e-6)
    assert float((on - want).abs().max()) > 1e-3  # the adapters matter with them on
    assert base_of(model) is model.get_base_model()


def test_lora_targets_that_match_nothing_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="target"):
        wrap(load_model(str(tiny_model_dir)), LoraSection(target_modules=["no_such_proj"]))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_coordinate_rows_train_only_the_vocabularys_rows_and_leave_merged(tmp_path, tied):
    """lora.coordinate_rows (peft's trainable tokens): the embedding's and head's rows of <0>..<999>
    train and nothing else of those matrices; merged_weights is peft's merge, a sync sends the
    embedding (and an untied head) beside the adapted layers, a plain model loaded with the merged
    weights gives the adapted model's logits (what an engine computes after a sync), and with the
    adapters off the model is the checkpoint (the reference)."""
    from rlsys.lang.coords import COORD_TOKENS
    from rlsys.models import TinySpec, build_tiny_model, load_processor

    d = build_tiny_model(tmp_path / "tiny", TinySpec(tie_word_embeddings=tied))
    tok = load_processor(str(d)).tokenizer
    ids = torch.tensor(tok.convert_tokens_to_ids(list(COORD_TOKENS)))
    base_model = load_model(str(d)).eval()
    base = {n: p.detach().clone() for n, p in base_model.named_parameters()}
    model = wrap(load_model(str(d)), LoraSection(rank=4, coordinate_rows=True), tokenizer=tok, tokens=COORD_TOKENS)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = [p for n, p in trainable.items() if "trainable_tokens_delta" in n]
    assert len(rows) == (1 if tied else 2) and all(p.shape[0] == len(COORD_TOKENS) for p in rows)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: random B, and coordinate rows moved
        for n, p in trainable.items():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    merged = dict(merged_weights(model))
    assert merged.keys() == base.keys()
    peft_merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    for n in base:
        torch.testing.assert_close(merged[n], peft_merged[n], rtol=0, atol=0)
    embed = next(n for n in base if n.endswith("embed_tokens.weight"))
    for n in [embed] + ([] if tied else ["lm_head.weight"]):
        moved = (merged[n] != base[n]).any(dim=1).nonzero().flatten()
        assert torch.equal(moved, ids.sort().values), n  # exactly the vocabulary's rows
    sent = dict(merged_weights(model, only_changed=True))
    assert embed in sent and (("lm_head.weight" in sent) != tied)
    assert merged_shapes(model, only_changed=True) == [(n, t.dtype, tuple(t.shape)) for n, t in sent.items()]
    x = torch.tensor([[1, 5, int(ids[3]), int(ids[999]), 7]])
    plain = load_model(str(d)).eval()
    plain.load_state_dict(merged, strict=False)
    if tied:
        assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    with torch.no_grad():
        on = model(input_ids=x).logits
        torch.testing.assert_close(plain(input_ids=x).logits, on, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=x).logits, base_model(input_ids=x).logits, rtol=1e-6, atol=1e-6)
        assert float((on - base_model(input_ids=x).logits).abs().max()) > 1e-3


def test_coordinate_rows_need_the_vocabularys_tokens(tiny_model_dir):
    from rlsys.config import ConfigError, load_config
    from rlsys.models import load_processor

    with pytest.raises(ConfigError, match="model.vocabulary qwen_json has none"):
        load_config(None, ["learner.lora.coordinate_rows=true", "model.vocabulary=qwen_json"])
    tok = load_processor(str(tiny_model_dir)).tokenizer
    with pytest.raises(ValueError, match=r"lacks 1 of the vocabulary's tokens, e.g. \['<no_such_token>'\]"):
        wrap(
            load_model(str(tiny_model_dir)),
            LoraSection(coordinate_rows=True),
            tokenizer=tok,
            tokens=("<no_such_token>",),
        )
