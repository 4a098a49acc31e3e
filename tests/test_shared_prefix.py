"""Shared-prefix passes (learner.shared_prefix, rlsys.grpo.sequences.build_shared_batch): one
sequence per prompt group gives every answer's log-probs, the loss and every parameter's
gradient of the one-sequence-per-answer path, within float32 tolerance."""

import pytest
import torch

from rlsys.data.samples import load_dataset
from rlsys.grpo.records import LearnerItem
from rlsys.grpo.sequences import build_batch, build_shared_batch, shared_token_logprobs, token_logprobs
from rlsys.lang.prompts import chat_prompt, question_for_sample
from rlsys.models import load_model, load_processor


def _items(proc, samples, lengths, seed=0):
    """Answers of the given lengths (random ordinary tokens) to one prompt per entry of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s, lens in zip(samples, lengths):
        prompt = chat_prompt(proc, question_for_sample(s))
        for n in lens:
            ids = torch.randint(20, 600, (n,), generator=g).tolist()
            out.append(LearnerItem(prompt=prompt, image=s.image, response_ids=ids))
    return out


def _per_answer(model, proc, items, temperature):
    inputs, targets, mask = build_batch(proc, items, proc.tokenizer.pad_token_id)
    logp, ent = token_logprobs(model, inputs, targets, temperature, mask=mask)
    return [logp[b][mask[b]] for b in range(len(items))], [ent[b][mask[b]] for b in range(len(items))]


def _shared(model, proc, items, temperature, leak=False):
    batch = build_shared_batch(proc, items, proc.tokenizer.pad_token_id)
    if leak:  # every answer may also see the answers laid out before it: plain concatenation
        L = batch["allowed"].shape[-1]
        batch["allowed"] |= torch.tril(torch.ones(L, L, dtype=torch.bool))
    logp, ent, mask = shared_token_logprobs(model, batch, "cpu", temperature)
    return [logp[b][mask[b]] for b in range(len(items))], [ent[b][mask[b]] for b in range(len(items))]


def _grads(model, logps, adv):
    model.zero_grad()
    loss = sum(a * lp.sum() for a, lp in zip(adv, logps))
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, synthetic_dir):
    proc = load_processor(tiny_model_dir)
    model = load_model(tiny_model_dir).train()
    samples = load_dataset(synthetic_dir / "train.jsonl")
    return proc, model, samples


def test_shared_prefix_equals_per_answer_log_probs_loss_and_gradients(tiny):
    proc, model, samples = tiny
    # two groups, answers of different lengths and one of a single token, interleaved in the
    # micro-batch (parts of two groups; the layout gathers each group's answers behind its prompt)
    items = _items(proc, samples[:2], [(5, 1, 9), (3, 7)])
    items = [items[0], items[3], items[1], items[4], items[2]]
    adv = [1.0, -0.5, 0.3, 2.0, -1.0]
    ref_lp, ref_ent = _per_answer(model, proc, items, 0.7)
    lp, ent = _shared(model, proc, items, 0.7)
    assert [t.numel() for t in lp] == [5, 3, 1, 7, 9]
    for a, b in zip(ref_lp, lp):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(ref_ent, ent):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    loss_a, ga = _grads(model, ref_lp, adv)
    loss_b, gb = _grads(model, lp, adv)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert ga.keys() == gb.keys() and len(ga) == len(list(model.parameters()))  # vision tower included
    for n in ga:
        scale = float(ga[n].abs().max()) + 1e-12
        assert float((ga[n] - gb[n]).abs().max()) <= 1e-4 * scale, n


def test_the_layout_runs_each_prompt_once(tiny):
    proc, _, samples = tiny
    items = _items(proc, samples[:2], [(4, 4, 4), (2,)])
    per = build_batch(proc, items, proc.tokenizer.pad_token_id)[0]
    shared = build_shared_batch(proc, items, proc.tokenizer.pad_token_id)
    assert shared["input_ids"].shape[0] == 2 and per["input_ids"].shape[0] == 4
    # one image per group in the shared rows (the vision tower runs once per prompt group)
    assert sum(int(e["image_grid_thw"].shape[0]) for e in shared["encs"]) == 2
    assert per["image_grid_thw"].shape[0] == 4
    p = shared["prompt_len"][0]
    assert shared["input_ids"][0].numel() >= p + 12 and int((shared["answer_pos"][0] >= 0).sum()) == 12
    # answer 2 of group 0 sees the prompt and its own earlier tokens, not answers 1 or 3
    a1 = p + 4  # its first token
    row = shared["allowed"][0, a1 + 1]
    assert bool(row[:p].all()) and not bool(row[p : p + 4].any()) and bool(row[a1 : a1 + 2].all())
    assert not bool(row[a1 + 2 :].any())


def test_the_equality_fails_when_an_answer_sees_another(tiny):
    """The check above is not vacuous: with answers allowed to attend to earlier answers (plain
    concatenation of a group), every answer after the first gets other log-probs."""
    proc, model, samples = tiny
    items = _items(proc, samples[:1], [(6, 6, 6)])
    ref_lp, _ = _per_answer(model, proc, items, 1.0)
    lp, _ = _shared(model, proc, items, 1.0, leak=True)
    torch.testing.assert_close(lp[0], ref_lp[0], rtol=1e-5, atol=1e-5)  # the first sees no other answer
    for a, b in zip(ref_lp[1:], lp[1:]):
        assert float((a - b).abs().max()) > 1e-3


def test_the_attention_rule_by_hand():
    """A row of prompt (2 tokens), answer 1 (2), answer 2 (1), padding (1): each answer sees the
    prompt and its own earlier tokens; padding sees the prompt and itself."""
    from rlsys.grpo.attention import dense_allowed

    allowed = dense_allowed(torch.tensor([[0, 0, 1, 1, 2, -1]]))[0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 1],
    ]


def _flex_logprobs(model, proc, items, merge_answers=False):
    batch = build_shared_batch(proc, items, proc.tokenizer.pad_token_id)
    if merge_answers:  # every answer in one segment: plain concatenation of the group
        batch["segments"][batch["segments"] > 0] = 1
    with torch.no_grad():
        logp, _, mask = shared_token_logprobs(model, batch, "cpu", 0.7, attention="flex")
    return [logp[b][mask[b]] for b in range(len(items))]


def test_flex_block_masks_give_the_per_answer_log_probs(tiny_model_dir, synthetic_dir):
    """learner.shared_prefix_attention flex (the GPU path): FlexAttention with a block mask of the
    same rule gives every answer's per-answer log-probs. Forward only: torch has no CPU backward
    for FlexAttention, so its gradients are checked on a GPU (scripts/gpu_learner_bench.py)."""
    from rlsys.grpo.attention import use_block_masks

    proc = load_processor(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).eval()
    use_block_masks(model)
    assert model.config.text_config._attn_implementation == "rlsys_shared_prefix"
    assert model.config.vision_config._attn_implementation == "sdpa"  # the tower keeps its own
    items = _items(proc, load_dataset(synthetic_dir / "train.jsonl")[:2], [(5, 1, 9), (3, 7)])
    items = [items[0], items[3], items[1], items[4], items[2]]
    with torch.no_grad():
        ref_lp, _ = _per_answer(model, proc, items, 0.7)  # a dense mask: SDPA through the same function
    for a, b in zip(ref_lp, _flex_logprobs(model, proc, items)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # seen failing: with the answers in one segment, the later ones see the earlier ones
    leaked = _flex_logprobs(model, proc, items, merge_answers=True)
    assert any(float((a - b).abs().max()) > 1e-3 for a, b in zip(ref_lp, leaked))


def test_flex_is_refused_without_gpus():
    from rlsys.config import LearnerConfig
    from rlsys.grpo.attention import resolve

    assert resolve("auto", cuda=False) == "dense_mask" and resolve("auto", cuda=True) == "flex"
    with pytest.raises(ValueError, match="CPU backward"):
        resolve("flex", cuda=False)
    with pytest.raises(ValueError, match="gpus_per_rank"):
        LearnerConfig(shared_prefix_attention="flex")
    assert LearnerConfig(shared_prefix_attention="flex", gpus_per_rank=1).shared_prefix_attention == "flex"


@pytest.mark.slow
def test_shared_prefix_is_exact_on_the_3b_shape(tmp_path, synthetic_dir):
    """Qwen2.5-VL-3B's widths (2048 wide, 16 heads over 2 KV heads, M-RoPE sections [16, 24, 24],
    151,936 rows, tied embeddings; window attention in the vision tower) with 1 LLM layer and 1
    vision block: log-probs, loss and gradients of both layouts agree."""
    from rlsys.models import build_tiny_model, qwen2_5_vl_3b_shaped

    d = build_tiny_model(tmp_path / "qwen3b", qwen2_5_vl_3b_shaped(num_layers=1, vision_depth=1, max_pixels=224 * 224))
    proc = load_processor(d, tokens=())
    model = load_model(d).train()
    samples = load_dataset(synthetic_dir / "train.jsonl")
    items = _items(proc, samples[:2], [(6, 1, 4), (5, 3)], seed=1)
    items = [items[0], items[3], items[1], items[4], items[2]]
    adv = [0.7, -1.0, 1.5, -0.2, 0.4]
    ref_lp, _ = _per_answer(model, proc, items, 1.0)
    lp, _ = _shared(model, proc, items, 1.0)
    for a, b in zip(ref_lp, lp):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    loss_a, ga = _grads(model, ref_lp, adv)
    loss_b, gb = _grads(model, lp, adv)
    assert loss_b == pytest.approx(loss_a, rel=1e-4)
    for n in ga:
        scale = float(ga[n].abs().max()) + 1e-12
        assert float((ga[n] - gb[n]).abs().max()) <= 1e-3 * scale, n


def test_a_frozen_towers_features_computed_once_give_the_same_logprobs_and_gradients(tiny_model_dir, synthetic_dir):
    """learner.freeze_vision: the tower's output before the merger, computed once without a graph
    and shared by the reference and the training pass (each model applies its own merger), gives
    the log-probs and gradients of the model running its tower itself; the merger (the projector)
    still gets its gradient through the shared features."""
    from rlsys.grpo.sequences import merged_image_features, vision_tower_features
    from rlsys.models import param_part

    proc = load_processor(str(tiny_model_dir))
    items = _items(proc, load_dataset(synthetic_dir / "train.jsonl")[:2], [(4, 1, 6), (3, 2)])
    batch = build_shared_batch(proc, items, proc.tokenizer.pad_token_id)
    assert len(batch["encs"]) >= 2  # two images, one row each

    def run(model, shared_features):
        model.zero_grad(set_to_none=True)
        mm = merged_image_features(model, shared_features) if shared_features is not None else None
        logp, _, mask = shared_token_logprobs(model, batch, "cpu", mm_encoder_outputs=mm)
        (logp[mask].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logp.detach(), grads

    model = load_model(str(tiny_model_dir))
    for n, p in model.named_parameters():
        if param_part(n) == "vision":
            p.requires_grad_(False)
    features = [vision_tower_features(model, enc, "cpu") for enc in batch["encs"]]
    own_logp, own_grads = run(model, None)
    shared_logp, shared_grads = run(model, features)
    assert torch.allclose(own_logp, shared_logp, atol=1e-5)
    assert own_grads.keys() == shared_grads.keys()
    assert any(param_part(n) == "projector" for n in shared_grads)  # the merger learns
    for n in own_grads:
        assert torch.allclose(own_grads[n], shared_grads[n], atol=1e-5, rtol=1e-4), n

    # the reference (another copy of the checkpoint) reads the policy's tower output as its own
    ref = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        own = shared_token_logprobs(ref, batch, "cpu", entropy=False)[0]
        reused = shared_token_logprobs(
            ref, batch, "cpu", entropy=False, mm_encoder_outputs=merged_image_features(ref, features)
        )[0]
    assert torch.allclose(own, reused, atol=1e-5)

    # and the window permutation is undone: the same features left in the tower's windowed order
    # give other log-probs (the synthetic images span several 112 px windows)
    assert any(not torch.equal(rev, torch.arange(rev.numel())) for _, rev in features)
    wrong = [(h, torch.arange(rev.numel())) for h, rev in features]
    with torch.no_grad():
        bad = shared_token_logprobs(
            ref, batch, "cpu", entropy=False, mm_encoder_outputs=merged_image_features(ref, wrong)
        )[0]
    assert not torch.allclose(own, bad, atol=1e-4)
