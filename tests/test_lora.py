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
