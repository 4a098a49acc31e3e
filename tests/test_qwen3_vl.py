"""Qwen3-VL, the second model family (rlsys/models/qwen3_vl.py): the tiny model's architecture,
the learner's shared-prefix positions on its interleaved M-RoPE, the family read from a
checkpoint, its grounding frame enforced; and the whole path (SFT, GRPO with 2 learner ranks and
the weight transfer, eval, Serve) in qwen3_json on a tied tiny Qwen3-VL."""

import json
import re

import pytest
import torch

from rlsys.data.samples import load_dataset
from rlsys.models import TinySpec, build_tiny_model, family_of, load_model, load_processor, param_part


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("q3") / "tiny", TinySpec(family="qwen3_vl"))


def test_the_tiny_qwen3_vl_is_the_real_architecture(qwen3_dir):
    cfg = json.loads((qwen3_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and family_of(qwen3_dir).title == "Qwen3-VL"
    v = cfg["vision_config"]
    assert v["patch_size"] == 16 and v["spatial_merge_size"] == 2 and v["deepstack_visual_indexes"] == [0, 1]
    assert cfg["text_config"]["rope_parameters"]["mrope_interleaved"] is True
    model = load_model(qwen3_dir)
    names = [n for n, _ in model.named_parameters()]
    # DeepStack's mergers map vision features into the LLM: the projector, with its own lr in SFT
    deep = [n for n in names if "deepstack_merger_list" in n]
    assert deep and {param_part(n) for n in deep} == {"projector"}
    assert param_part("model.visual.pos_embed.weight") == "vision"
    # 32 px per image token: a 224 x 224 image is 7 x 7 tokens (Qwen2.5-VL's 28 px would give 8 x 8)
    proc = load_processor(qwen3_dir)
    from PIL import Image

    enc = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (224, 224))])
    assert int((torch.as_tensor(enc["input_ids"]) == proc.image_token_id).sum()) == 49


def test_an_unknown_family_is_refused_with_the_known_ones(tmp_path, capsys):
    from rlsys.models.__main__ import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="'llava'.*qwen2_5_vl, qwen3_vl"):
        family_of(tmp_path)
    # the prepare command says it in one line, before it writes anything
    assert main(["prepare", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "model_type 'llava' is not a model family" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_json_frame_the_family_does_not_write_is_refused(qwen3_dir, tiny_model_dir):
    from rlsys.config import load_config
    from rlsys.models import processor_for

    for vocab, path in (("qwen_json", qwen3_dir), ("qwen3_json", tiny_model_dir)):
        cfg = load_config(overrides=[f"model.path={path}", f"model.vocabulary={vocab}"])
        with pytest.raises(ValueError, match=f"model.vocabulary {vocab} writes coordinates"):
            processor_for(cfg.model, path)
    forced = load_config(
        overrides=[f"model.path={qwen3_dir}", "model.vocabulary=qwen_json", "model.force_vocabulary_frame=true"]
    )
    assert processor_for(forced.model, qwen3_dir) is not None
    for vocab in ("rex_bins", "qwen3_json"):  # tokens fit any family; its own JSON fits it
        assert processor_for(
            load_config(overrides=[f"model.path={qwen3_dir}", f"model.vocabulary={vocab}"]).model, qwen3_dir
        )
    # before any run starts: the model a run starts from (built, model.path or run.init_checkpoint)
    from rlsys.config import ConfigError
    from rlsys.data.prepare import prepare_model_dir

    cfg = load_config(overrides=["model.tiny_family=qwen3_vl", "model.vocabulary=qwen_json"])
    with pytest.raises(ConfigError, match="writes coordinates as resized_pixels"):
        prepare_model_dir(cfg.model, qwen3_dir.parent / "run", init_checkpoint=str(qwen3_dir))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_shared_prefix_is_exact_on_qwen3_vl(tmp_path, synthetic_dir, tied):
    """The learner's shared-prefix rows on Qwen3-VL (interleaved M-RoPE, DeepStack): every
    answer's log-probs and every parameter's gradient as one sequence per answer."""
    from tests.test_shared_prefix import _grads, _items, _per_answer, _shared

    d = build_tiny_model(tmp_path / "q3", TinySpec(family="qwen3_vl", tie_word_embeddings=tied))
    proc, model = load_processor(d), load_model(d).train()
    items = _items(proc, load_dataset(synthetic_dir / "train.jsonl")[:2], [(5, 1, 8), (3, 6)])
    items = [items[0], items[3], items[1], items[4], items[2]]
    adv = [1.0, -0.5, 0.3, 2.0, -1.0]
    ref_lp, _ = _per_answer(model, proc, items, 0.9)
    lp, _ = _shared(model, proc, items, 0.9)
    for a, b in zip(ref_lp, lp):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    loss_a, ga = _grads(model, ref_lp, adv)
    loss_b, gb = _grads(model, lp, adv)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert any("deepstack" in n for n in ga)
    for n in ga:
        scale = float(ga[n].abs().max()) + 1e-12
        assert float((ga[n] - gb[n]).abs().max()) <= 1e-4 * scale, n


@pytest.mark.slow
def test_qwen3_vl_sft_grpo_on_two_ranks_eval_and_serve_in_qwen3_json(tmp_path):
    """A tied tiny Qwen3-VL through every stage in its own grounding JSON: SFT (Ray Train), GRPO
    with 2 learner ranks and the vLLM engine fed by the weight transfer (its equality check on
    every sync, the engine's log-probs against the learner's), the geometric reward reading
    0..1000 JSON, eval, and a live Serve request answered in pixels."""
    from tests.test_e2e import _run, _serve_in_pixels

    family = ["model.tiny_family=qwen3_vl", "model.tiny_tie_word_embeddings=true", "model.vocabulary=qwen3_json"]
    common = ["tracking.mode=disabled", "data.tasks=[referring,visual_prompt]"]
    stdout = _run(
        [
            "rlsys.sft",
            f"run.out_dir={tmp_path / 'sft'}",
            "train.steps=300",
            "train.log_every_steps=50",
            "train.checkpoint_every_steps=300",
            "data.synthetic_train_images=400",
            *family,
            *common,
        ],
        900,
        tmp_path,
    )
    losses = [float(x) for x in re.findall(r"sft step \d+/300 loss ([0-9.]+)", stdout)]
    assert len(losses) >= 3 and losses[-1] < 0.6 * losses[0], losses
    init = tmp_path / "sft" / "final"
    assert family_of(init).model_type == "qwen3_vl"
    out = tmp_path / "grpo"
    _run(
        [
            "rlsys.grpo",
            f"run.out_dir={out}",
            f"run.init_checkpoint={init}",
            "run.steps=2",
            "run.prompts_per_step=4",
            "rollout.max_new_tokens=64",
            "rollout.temperature=0.5",
            "run.dynamic_sampling=false",
            "learner.num_ranks=2",
            "learner.cpus_per_rank=0.25",
            "model.vocabulary=qwen3_json",
            *common,
        ],
        900,
        tmp_path,
    )
    records = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["reward/kind/box_iou"] == 4 * 4 for r in records), records
    assert min(r["reward/unreadable_per_answer"] for r in records) < 1.0, records
    # the engine samples from the learner's weights: its log-probs are the learner's (float32)
    assert all(abs(r["rollout/logprob_gap"]) < 1e-3 for r in records), [r["rollout/logprob_gap"] for r in records]
    trained = sorted((out / "checkpoints").glob("step_*"))[-1] / "hf"  # the GRPO model, as Hugging Face files
    assert family_of(trained).model_type == "qwen3_vl"
    ev = _run(
        [
            "rlsys.eval",
            "--checkpoint",
            str(trained),
            "--out",
            str(tmp_path / "eval"),
            "--limit",
            "8",
            "--tasks",
            "referring",
            "--max-new-tokens",
            "64",
            "model.vocabulary=qwen3_json",
        ],
        600,
        tmp_path,
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["vocabulary"] == "qwen3_json" and metrics["num_samples"] == 8 and "F1@0.50" in ev
    _serve_in_pixels(trained, "qwen3_json", tmp_path, max_new_tokens=64)


@pytest.mark.parametrize("mode", ["add", "map_last"])
def test_prepare_adds_or_maps_the_bins_on_a_tied_qwen3_vl(tmp_path, mode):
    """``rlsys.models prepare`` on a base Qwen3-VL (tied lm_head, as the 2B/4B): the bins added
    (the embedding and the tied head grow together) or mapped onto existing rows."""
    from rlsys.lang.coords import COORD_TOKENS
    from rlsys.models import coordinate_token_ids, prepare_checkpoint
    from tests.test_models import _tiny_base_without_coords

    tiny = build_tiny_model(tmp_path / "q3", TinySpec(family="qwen3_vl", tie_word_embeddings=True))
    base = _tiny_base_without_coords(tiny, tmp_path)
    with pytest.raises(ValueError, match="coordinate tokens"):
        load_processor(base)
    out = prepare_checkpoint(base, tmp_path / mode, mode=mode)
    assert family_of(out).model_type == "qwen3_vl"
    ids = coordinate_token_ids(load_processor(out).tokenizer)
    model = load_model(out)
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(set(ids)) == len(COORD_TOKENS) and max(ids) < rows
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
