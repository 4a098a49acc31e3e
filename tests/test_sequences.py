"""rlsys.grpo.sequences: prompt + sampled answer -> model inputs, targets and the answer mask."""

from dataclasses import replace

import pytest
import torch

from rlsys.grpo.records import LearnerItem


def _item(proc, sample, response_ids):
    from rlsys.lang.prompts import chat_prompt

    return LearnerItem(prompt=chat_prompt(proc, "Detect circle."), image=sample.image, response_ids=response_ids)


def test_answer_mask_targets_and_padding(tiny_model_dir, synthetic_dir):
    from rlsys.data.samples import load_dataset
    from rlsys.grpo.sequences import build_batch
    from rlsys.models import load_processor

    proc = load_processor(tiny_model_dir)
    s = load_dataset(synthetic_dir / "train.jsonl")[0]
    a, b = [5, 6, 7], [8]
    inputs, targets, mask = build_batch(proc, [_item(proc, s, a), _item(proc, s, b)], proc.tokenizer.pad_token_id)
    # targets under the mask are exactly each answer's tokens, in order
    assert targets[0][mask[0]].tolist() == a and targets[1][mask[1]].tolist() == b
    # the shorter row is right-padded and its padding is out of the attention mask
    assert inputs["attention_mask"][1].sum() == inputs["attention_mask"][0].sum() - 2
    assert inputs["input_ids"][1, -2:].tolist() == [proc.tokenizer.pad_token_id] * 2


def test_answer_with_an_image_placeholder_is_refused_by_name(tiny_model_dir, synthetic_dir):
    from rlsys.data.samples import load_dataset
    from rlsys.grpo.sequences import build_batch
    from rlsys.models import load_processor

    proc = load_processor(tiny_model_dir)
    s = load_dataset(synthetic_dir / "train.jsonl")[0]
    with pytest.raises(ValueError, match="image/video placeholder") as e:
        build_batch(proc, [_item(proc, s, [5, proc.image_token_id])], proc.tokenizer.pad_token_id)
    assert s.image in str(e.value)
    with pytest.raises(ValueError, match="no tokens"):
        build_batch(proc, [_item(proc, s, [])], proc.tokenizer.pad_token_id)


class _FixedLogits(torch.nn.Module):
    """A model whose every position scores two tokens ``[0, ln 3]``: hand-checkable log-probs."""

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, 2)
        logits[..., 1] = torch.log(torch.tensor(3.0))
        return type("Out", (), {"logits": logits})()


def test_token_logprobs_are_taken_under_the_sampling_temperature():
    from rlsys.grpo.sequences import token_logprobs

    ids = torch.tensor([[0, 1, 0]])
    targets = ids[:, 1:]
    # T = 1: p(1) = 3 / (1 + 3) = 0.75, p(0) = 0.25
    logp, ent = token_logprobs(_FixedLogits(), {"input_ids": ids}, targets)
    assert torch.allclose(logp, torch.log(torch.tensor([[0.75, 0.25]])))
    # T = 0.5 doubles the logits: [0, ln 9] -> p(1) = 9 / 10, p(0) = 1 / 10
    logp_half, ent_half = token_logprobs(_FixedLogits(), {"input_ids": ids}, targets, temperature=0.5)
    assert torch.allclose(logp_half, torch.log(torch.tensor([[0.9, 0.1]])))
    # entropy under T: -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.3251 nats, lower than at T = 1 (0.5623)
    assert torch.allclose(ent_half, torch.full((1, 2), 0.325083), atol=1e-5)
    assert torch.allclose(ent, torch.full((1, 2), 0.562335), atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(_FixedLogits(), {"input_ids": ids}, targets, temperature=0.0)


def test_token_logprobs_of_the_real_model_follow_the_temperature(tiny_model_dir, synthetic_dir):
    from rlsys.data.samples import load_dataset
    from rlsys.grpo.sequences import build_batch, token_logprobs
    from rlsys.models import load_model, load_processor

    proc = load_processor(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype="float32").eval()
    s = load_dataset(synthetic_dir / "train.jsonl")[0]
    inputs, targets, mask = build_batch(proc, [_item(proc, s, [5, 6, 7])], proc.tokenizer.pad_token_id)
    with torch.no_grad():
        raw = model(**inputs).logits[:, :-1].float()
        at_07, _ = token_logprobs(model, inputs, targets, temperature=0.7)
        at_1, _ = token_logprobs(model, inputs, targets)
    want_07 = torch.log_softmax(raw / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    want_1 = torch.log_softmax(raw, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(at_07[mask], want_07[mask], atol=1e-5)
    assert torch.allclose(at_1[mask], want_1[mask], atol=1e-5)
    assert not torch.allclose(at_07[mask], at_1[mask], atol=1e-3)


def test_answer_positions_only_give_the_full_forwards_log_probs_and_gradients(tiny_model_dir, synthetic_dir):
    """The lean path (decoder hidden states at the answer positions through lm_head) against the
    plain one (logits at every position): the same log-probs, entropies and parameter gradients,
    on a batch of two answers of different lengths (right padding) to two prompts."""
    from rlsys.data.samples import load_dataset
    from rlsys.grpo.sequences import build_batch, token_logprobs
    from rlsys.models import load_model, load_processor

    proc = load_processor(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype="float32").train()
    samples = load_dataset(synthetic_dir / "train.jsonl")
    from rlsys.lang.prompts import chat_prompt

    items = [
        _item(proc, samples[0], [5, 6, 7, 8]),
        LearnerItem(prompt=chat_prompt(proc, "Point to the square."), image=samples[1].image, response_ids=[9, 10]),
    ]
    inputs, targets, mask = build_batch(proc, items, proc.tokenizer.pad_token_id)
    out = {}
    for lean in (False, True):
        model.zero_grad()
        logp, ent = token_logprobs(model, inputs, targets, temperature=0.7, mask=mask if lean else None)
        (logp * mask).sum().backward()
        out[lean] = (logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (lp0, e0, g0), (lp1, e1, g1) = out[False], out[True]
    assert torch.allclose(lp0[mask], lp1[mask], atol=1e-5) and torch.allclose(e0[mask], e1[mask], atol=1e-4)
    assert (lp1[~mask] == 0).all() and (e1[~mask] == 0).all()
    assert not e1.requires_grad  # the entropy is a metric: no graph kept for it
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5, rtol=1e-4), n


def test_the_engines_prompt_ids_are_checked_against_the_learners(tiny_model_dir, synthetic_dir):
    from rlsys.data.samples import load_dataset
    from rlsys.grpo.sequences import build_batch, encode_prompts
    from rlsys.models import load_processor

    proc = load_processor(tiny_model_dir)
    s = load_dataset(synthetic_dir / "train.jsonl")[0]
    it = _item(proc, s, [5, 6])
    ids = encode_prompts(proc, [it])[0]["input_ids"][0].tolist()
    build_batch(proc, [replace(it, prompt_ids=ids)], proc.tokenizer.pad_token_id)  # the same: accepted
    wrong = ids[:10] + [ids[10] + 1] + ids[11:]
    with pytest.raises(ValueError, match="differs from the engine's at token 10") as e:
        build_batch(proc, [replace(it, prompt_ids=wrong)], proc.tokenizer.pad_token_id)
    assert s.image in str(e.value)
    with pytest.raises(ValueError, match="lengths"):
        build_batch(proc, [replace(it, prompt_ids=ids[:-3])], proc.tokenizer.pad_token_id)


def test_banned_tokens_get_the_engines_bias_before_the_temperature():
    # logits [0, ln 3]; token 0 banned: [-100, ln 3], then / T = 0.5: [-200, 2 ln 3]
    from rlsys.grpo.sequences import token_logprobs

    ids = torch.tensor([[0, 1, 0]])
    logp, _ = token_logprobs(_FixedLogits(), {"input_ids": ids}, ids[:, 1:], temperature=0.5, banned_ids=[0])
    want = torch.log_softmax(torch.tensor([-200.0, 2 * torch.log(torch.tensor(3.0))]), -1)
    assert torch.allclose(logp, want[[1, 0]][None], atol=1e-5)
    assert logp[0, 1] < -100  # the banned token is all but impossible, as in the engine


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, synthetic_dir):
    """learner.gradient_checkpointing recomputes each decoder layer in backward: the same
    log-probs and parameter gradients as keeping the activations."""
    from rlsys.data.samples import load_dataset
    from rlsys.grpo.sequences import build_batch, token_logprobs
    from rlsys.models import load_model, load_processor

    proc = load_processor(tiny_model_dir)
    s = load_dataset(synthetic_dir / "train.jsonl")[0]
    inputs, targets, mask = build_batch(
        proc, [_item(proc, s, [5, 6, 7, 8]), _item(proc, s, [9])], proc.tokenizer.pad_token_id
    )
    grads = []
    for checkpointing in (False, True):
        model = load_model(tiny_model_dir, dtype="float32").train()
        if checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        logp, _ = token_logprobs(model, inputs, targets, mask=mask)
        (logp * mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
