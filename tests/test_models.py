"""The tiny model directory loads in transformers and in vLLM; real-checkpoint token handling."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from rlsys.coords import COORD_TOKENS
from rlsys.models import QWEN_SPECIAL_TOKENS, coordinate_token_ids, load_model, load_processor, prepare_checkpoint


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
    script.write_text(textwrap.dedent(f"""
        import json
        from PIL import Image
        from transformers import AutoProcessor
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            proc = AutoProcessor.from_pretrained({str(tiny_model_dir)!r})
            msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Detect circle."}}]}}]
            text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            llm = LLM(model={str(tiny_model_dir)!r}, gpu_memory_utilization=0.1, max_model_len=1024,
                      limit_mm_per_prompt={{"image": 1}}, enforce_eager=True, seed=0)
            sp = SamplingParams(n=4, temperature=1.0, max_tokens=12, logprobs=0, skip_special_tokens=False, seed=0)
            img = Image.open({str(synthetic_dir / "images/train_00000.png")!r})
            out = llm.generate([{{"prompt": text, "multi_modal_data": {{"image": img}}}}], sp)[0]
            print("RESULT " + json.dumps([{{"ids": list(c.token_ids), "lp": [next(iter(d.values())).logprob for d in c.logprobs]}} for c in out.outputs]))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=540)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    outs = json.loads(line[0][7:])
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
    # <k> is the embedding row V - 1000 + k, as Rex-Omni repurposed the last 1,000 rows
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
