"""The tiny model directory loads in transformers and in vLLM; real-checkpoint token handling."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlsys.lang.coords import COORD_TOKENS
from rlsys.models import (
    QWEN_SPECIAL_TOKENS,
    coordinate_token_ids,
    load_model,
    load_processor,
    map_last_ids,
    prepare_checkpoint,
)


def _inputs(proc, image_path, question="Detect circle."):
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return text, proc(text=[text], images=[Image.open(image_path)], return_tensors="pt")


def test_tokenizer_has_qwen_special_and_coordinate_tokens(tiny_model_dir):
    proc = load_processor(tiny_model_dir)
    tok = proc.tokenizer
    for t in QWEN_SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id and len(tok.tokenize(t)) == 1
    ids = coordinate_token_ids(tok)
    assert len(set(ids)) == 1000
    # a coordinate run is one token per coordinate, and decodes back to the same text
    text = "<|box_start|><12><42><512><612><|box_end|>"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert len(enc) == 6 and tok.decode(enc, skip_special_tokens=False) == text


def test_chat_template_is_qwen_layout(tiny_model_dir):
    proc = load_processor(tiny_model_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n"
    )


def test_transformers_forward_with_image(tiny_model_dir, synthetic_dir):
    proc = load_processor(tiny_model_dir)
    model = load_model(tiny_model_dir)
    _, inp = _inputs(proc, synthetic_dir / "images/train_00000.png")
    # 224x224 image, 14 px patches -> 16x16 = 256 patches, merged 2x2 -> 64 image tokens
    assert inp["pixel_values"].shape[0] == 256
    assert int((inp["input_ids"] == model.config.image_token_id).sum()) == 64
    with torch.no_grad():
        out = model(**inp)
    assert out.logits.shape[:2] == inp["input_ids"].shape
    assert torch.isfinite(out.logits).all()
    # the image changes the answer's logits: the vision tower is really wired in
    blank = proc.image_processor(images=[torch.zeros(3, 224, 224, dtype=torch.uint8)], return_tensors="pt")
    with torch.no_grad():
        out2 = model(**{**inp, "pixel_values": blank["pixel_values"]})
    assert not torch.allclose(out.logits[0, -1], out2.logits[0, -1])


@pytest.mark.slow
def test_vllm_generates_from_same_directory(tiny_model_dir, synthetic_dir, tmp_path):
    # vLLM spawns worker processes: run it as a script with a __main__ guard, in its own process.
    script = tmp_path / "gen.py"
    script.write_text(
        textwrap.dedent(f"""
        import json
        from PIL import Image
        from transformers import AutoProcessor
        from vllm import LLM, SamplingParams
        from rlsys.models import load_processor
        from rlsys.config import prepare_sync_engine_process
        if __name__ == "__main__":
            prepare_sync_engine_process()  # the engine as rlsys builds one (in this process on a CPU)
            # a pixel budget below the checkpoint's (224 x 224): the processor and vLLM both take it
            pixels = {{"max_pixels": 112 * 112}}
            proc = load_processor({str(tiny_model_dir)!r}, pixels=pixels)
            msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Detect circle."}}]}}]
            text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            llm = LLM(model={str(tiny_model_dir)!r}, gpu_memory_utilization=0.1, kv_cache_memory_bytes=256 << 20, max_model_len=1024,
                      limit_mm_per_prompt={{"image": 1}}, enforce_eager=True, seed=0, mm_processor_kwargs=pixels)
            sp = SamplingParams(n=4, temperature=1.0, max_tokens=12, logprobs=0, skip_special_tokens=False, seed=0)
            img = Image.open({str(synthetic_dir / "images/train_00000.png")!r})
            out = llm.generate([{{"prompt": text, "multi_modal_data": {{"image": img}}}}], sp)[0]
            hf_ids = proc(text=[text], images=[img], return_tensors="pt")["input_ids"][0].tolist()
            print("RESULT " + json.dumps({{"prompt": list(out.prompt_token_ids), "hf_prompt": hf_ids, "image_pad": proc.image_token_id,
                                           "answers": [{{"ids": list(c.token_ids), "lp": [next(iter(d.values())).logprob for d in c.logprobs]}} for c in out.outputs]}}))
    """)
    )
    repo = str(Path(__file__).resolve().parent.parent)
    r = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=540,
        env={**os.environ, "PYTHONPATH": repo},
        cwd=repo,
    )
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    res = json.loads(line[0][7:])
    # the same prompt ids in both: 112 x 112 px under the budget = 4 x 4 = 16 image tokens (64 without it)
    assert res["prompt"] == res["hf_prompt"] and res["prompt"].count(res["image_pad"]) == 16
    outs = res["answers"]
    assert len(outs) == 4
    for o in outs:
        assert len(o["ids"]) == 12 == len(o["lp"])
        assert all(lp <= 0 for lp in o["lp"])


def _tiny_base_without_coords(tiny_model_dir, tmp_path):
    """A stand-in for a base Qwen2.5-VL: the tiny model with the coordinate tokens removed."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    tj = json.loads((base / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in set(COORD_TOKENS)]
    (base / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    dec = cfg.get("added_tokens_decoder", {})
    for k in [k for k, v in dec.items() if v["content"] in set(COORD_TOKENS)]:
        del dec[k]
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    return base


def test_prepare_checkpoint_map_last(tiny_model_dir, tmp_path):
    base = _tiny_base_without_coords(tiny_model_dir, tmp_path)
    with pytest.raises(ValueError, match="lacks 1000 coordinate tokens"):
        load_processor(base)
    special_before = {t: load_processor(tiny_model_dir).tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    out = prepare_checkpoint(base, tmp_path / "mapped", mode="map_last")
    proc = load_processor(out)
    # Qwen's special tokens keep their ids
    assert {t: proc.tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS} == special_before
    rows = json.loads((out / "config.json").read_text())["text_config"]["vocab_size"]
    ids = coordinate_token_ids(proc.tokenizer)
    # the tiny BPE has fewer than 1,000 entries, so its added tokens sit below row 1,000 and
    # <k> is the row V - 1000 + k (a Qwen-sized vocabulary: test_map_last_on_qwen_layout_...)
    assert min(special_before.values()) < 1000
    assert ids == list(range(rows - 1000, rows))
    assert proc.tokenizer.decode(proc.tokenizer("<5><999>", add_special_tokens=False)["input_ids"]) == "<5><999>"
    # the model itself is unchanged: same number of embedding rows
    assert load_model(out).get_input_embeddings().weight.shape[0] == rows


def test_prepare_checkpoint_add(tiny_model_dir, tmp_path):
    base = _tiny_base_without_coords(tiny_model_dir, tmp_path)
    out = prepare_checkpoint(base, tmp_path / "added", mode="add")
    proc = load_processor(out)
    ids = coordinate_token_ids(proc.tokenizer)
    model = load_model(out)
    assert max(ids) < model.get_input_embeddings().weight.shape[0]
    assert max(ids) < model.get_output_embeddings().weight.shape[0]


def test_param_part_sorts_qwen2_5_vl_parameter_names():
    from rlsys.models import param_part

    # both the checkpoint layout (visual.*) and transformers' newer in-memory one (model.visual.*)
    assert param_part("visual.blocks.0.attn.qkv.weight") == "vision"
    assert param_part("model.visual.patch_embed.proj.weight") == "vision"
    assert param_part("visual.merger.mlp.0.weight") == "projector"
    assert param_part("model.visual.merger.ln_q.weight") == "projector"
    assert param_part("model.language_model.layers.0.mlp.up_proj.weight") == "llm"
    assert param_part("model.layers.1.self_attn.q_proj.bias") == "llm"
    assert param_part("lm_head.weight") == "llm"


@pytest.fixture(scope="module")
def qwen_layout_base(tmp_path_factory):
    """A base checkpoint with Qwen2.5-VL's real tokenizer layout and vocabulary rows (151,643 BPE
    entries, its 22 added tokens at 151643..151664, 151,936 rows) at the tiny model's widths."""
    from rlsys.models import QWEN2_5_VL_VOCAB_ROWS, TinySpec, build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("qwen-layout") / "base",
        TinySpec(tokenizer_layout="qwen2_5_vl", vocab_rows=QWEN2_5_VL_VOCAB_ROWS),
    )


def test_qwen_layout_tokenizer_has_the_real_ids(qwen_layout_base):
    from transformers import AutoTokenizer

    from rlsys.models import QWEN2_5_VL_ADDED_TOKENS

    tok = AutoTokenizer.from_pretrained(qwen_layout_base)
    assert len(tok) == 151643 + 22
    assert [tok.convert_tokens_to_ids(t) for t, _ in QWEN2_5_VL_ADDED_TOKENS] == list(range(151643, 151665))
    assert tok.convert_ids_to_tokens(151642) is not None and not tok.convert_ids_to_tokens(151642).startswith("<|")
    special = {t for t, sp in QWEN2_5_VL_ADDED_TOKENS if sp}
    assert set(tok.all_special_tokens) >= special and "<tool_call>" not in tok.all_special_tokens
    assert json.loads((qwen_layout_base / "config.json").read_text())["text_config"]["vocab_size"] == 151936
    with pytest.raises(ValueError, match="lacks 1000 coordinate tokens"):
        load_processor(qwen_layout_base)


def test_map_last_on_qwen_layout_skips_the_added_tokens(qwen_layout_base, tmp_path):
    """Qwen2.5-VL's layout: map_last takes the last 1,000 BPE rows 150643..151642, below the 22
    added tokens, the released Rex-Omni's rows (the 271 unused rows above stay unused)."""
    from rlsys.models import QWEN2_5_VL_ADDED_TOKENS

    before = {t: i for i, (t, _) in enumerate(QWEN2_5_VL_ADDED_TOKENS, start=151643)}
    tj = json.loads((qwen_layout_base / "tokenizer.json").read_text())
    id_to_bpe = {i: t for t, i in tj["model"]["vocab"].items()}
    out = prepare_checkpoint(qwen_layout_base, tmp_path / "mapped", mode="map_last")
    tok = load_processor(out).tokenizer
    ids = coordinate_token_ids(tok)
    assert ids == list(range(150643, 151643))
    assert ids == map_last_ids(before.values(), 151936)
    # every added token keeps its id, special or not
    assert {t: tok.convert_tokens_to_ids(t) for t in before} == before
    assert len(tok) == 151665  # the 1,000 last BPE rows became coordinates; 151665..151935 stay unused
    # coordinates encode to one id each and decode back, in the middle of text and specials
    text = "<|box_start|><5><999><0><|box_end|>"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert enc == [151648, ids[5], ids[999], ids[0], 151649]
    assert tok.decode(enc) == text
    # the BPE entries that gave their rows no longer come out of the BPE: their text still
    # tokenises (into smaller pieces) and decodes back, with no coordinate id among its tokens
    for old_id in (150643, 151000, 151642):
        piece = tok.convert_tokens_to_string([id_to_bpe[old_id]])
        enc = tok(piece, add_special_tokens=False)["input_ids"]
        assert not set(enc) & set(ids) and tok.decode(enc) == piece, (old_id, piece, enc)
    # the checkpoint's shapes are unchanged
    assert load_model(out).get_input_embeddings().weight.shape[0] == 151936


def test_map_last_ids_rule():
    # Qwen2.5-VL: the last 1,000 BPE rows below its 22 added tokens, as the release
    assert map_last_ids(range(151643, 151665), 151936) == list(range(150643, 151643))
    # no added token (or only some below row 1,000): the last 1,000 rows, skipping those
    assert map_last_ids([], 2000) == list(range(1000, 2000))
    assert map_last_ids([0, 1, 5], 2000) == list(range(1000, 2000))
    assert map_last_ids([0, 1500, 1999], 2000) == list(range(500, 1500))
    with pytest.raises(ValueError, match="fewer than 1000 rows"):
        map_last_ids([999, 1000], 2000)  # 999 free rows below the first added token
