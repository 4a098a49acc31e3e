"""rlsys.sequences: prompt + sampled answer -> model inputs, targets and the answer mask."""

import pytest
import torch


def _item(proc, sample, response_ids):
    from rlsys.grpo import _chat_prompt

    return {"prompt": _chat_prompt(proc, "Detect circle."), "image": sample.image, "response_ids": response_ids}


def test_answer_mask_targets_and_padding(tiny_model_dir, synthetic_dir):
    from rlsys.data import load_dataset
    from rlsys.models import load_processor
    from rlsys.sequences import build_batch

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
    from rlsys.data import load_dataset
    from rlsys.models import load_processor
    from rlsys.sequences import build_batch

    proc = load_processor(tiny_model_dir)
    s = load_dataset(synthetic_dir / "train.jsonl")[0]
    with pytest.raises(ValueError, match="image/video placeholder") as e:
        build_batch(proc, [_item(proc, s, [5, proc.image_token_id])], proc.tokenizer.pad_token_id)
    assert s.image in str(e.value)
    with pytest.raises(ValueError, match="no tokens"):
        build_batch(proc, [_item(proc, s, [])], proc.tokenizer.pad_token_id)
