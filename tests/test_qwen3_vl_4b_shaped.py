"""A Qwen3-VL-4B-shaped model (its real widths: 2560 wide, 32 heads of 128 over 8 KV heads,
151,936 rows, tied embeddings, a 1024-wide ViT with DeepStack, patch 16; and Qwen3's tokenizer id
layout with its 26 added tokens) cut to 1 LLM layer and 2 vision blocks. Built as a base without
coordinate tokens, it goes the way a real checkpoint goes: map_last, then transformers and vLLM
read the same prompt ids and give the same log-probs."""

import json

import pytest

from rlsys.lang.coords import COORD_TOKENS
from rlsys.lang.format import control_tokens
from rlsys.models import (
    QWEN3_VL_ADDED_TOKENS,
    build_tiny_model,
    coordinate_token_ids,
    load_processor,
    prepare_checkpoint,
    qwen3_vl_4b_shaped,
)
from tests.test_qwen3b_shaped import transformers_and_vllm_logprobs

pytestmark = pytest.mark.slow


def test_the_4b_shape_maps_the_bins_and_loads_in_transformers_and_vllm(tmp_path, synthetic_dir):
    base = build_tiny_model(tmp_path / "base", qwen3_vl_4b_shaped(num_layers=1, vision_depth=2, max_pixels=12544))
    cfg = json.loads((base / "config.json").read_text())
    t, v = cfg["text_config"], cfg["vision_config"]
    assert (t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]) == (2560, 32, 8, 128)
    assert (t["intermediate_size"], t["vocab_size"], t["rope_parameters"]["mrope_section"]) == (
        9728,
        151936,
        [24, 20, 20],
    )
    assert (v["hidden_size"], v["num_heads"], v["intermediate_size"], v["out_hidden_size"], v["patch_size"]) == (
        1024,
        16,
        4096,
        2560,
        16,
    )
    assert cfg["tie_word_embeddings"] and v["deepstack_visual_indexes"] == [0]
    # Qwen3's 26 added tokens (<think> at 151667) after Qwen2.5's 151,643 BPE entries
    tok = load_processor(base, tokens=()).tokenizer
    assert [tok.convert_tokens_to_ids(t) for t, _ in QWEN3_VL_ADDED_TOKENS] == list(range(151643, 151669))
    assert tok.convert_tokens_to_ids("<think>") == 151667
    # map_last reads the first added token from the tokenizer: the bins sit below it, as on Qwen2.5-VL
    out = prepare_checkpoint(base, tmp_path / "mapped", mode="map_last")
    proc = load_processor(out)
    assert coordinate_token_ids(proc.tokenizer) == list(range(151643 - len(COORD_TOKENS), 151643))
    assert proc.tokenizer.convert_tokens_to_ids("<think>") == 151667  # the added tokens keep their ids
    # the control-token rule is read from the tokenizer: a phrase may not smuggle Qwen3's markers in
    assert {"<think>", "</think>", "<tool_response>"} <= control_tokens(proc.tokenizer)
    image = sorted((synthetic_dir / "images").glob("*.png"))[0]
    res = transformers_and_vllm_logprobs(out, image, tmp_path)
    assert res["same_ids"] and res["tied"]
    assert all(abs(a - b) < 2e-3 for a, b in zip(res["vllm"], res["hf"])), res
