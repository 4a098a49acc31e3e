"""The released Rex-Omni checkpoint's layout (``tests/release_layout.py``: ``vocab.json`` and
``merges.txt`` with Qwen2.5-VL's 151,643 BPE entries, ``<k>`` declared at 150643+k in
``tokenizer_config.json``, no ``tokenizer.json``) at the tiny model's widths: transformers 5 and
vLLM renumber its added tokens past the embedding; every loader refuses it, naming ``prepare``;
``prepare`` writes a copy both read with the release's ids; GRPO pointed at it prepares it itself
and trains; eval runs on the copy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from release_layout import RELEASE_FIRST_COORD_ID, build_release_layout

from rlsys.lang.coords import COORD_TOKENS
from rlsys.models import (
    QWEN2_5_VL_ADDED_TOKENS,
    TokenLayoutError,
    check_token_layout,
    coordinate_token_ids,
    load_model,
    load_processor,
    prepare_checkpoint,
    token_layout_problems,
)

REPO = Path(__file__).resolve().parent.parent
RELEASE_IDS = {t: RELEASE_FIRST_COORD_ID + k for k, t in enumerate(COORD_TOKENS)}
RELEASE_IDS.update({t: 151643 + k for k, (t, _) in enumerate(QWEN2_5_VL_ADDED_TOKENS)})


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    return build_release_layout(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def prepared_release(release_dir, tmp_path_factory):
    return prepare_checkpoint(release_dir, tmp_path_factory.mktemp("prepared") / "rex")


def _ids(tok, tokens):
    return dict(zip(tokens, tok.convert_tokens_to_ids(list(tokens))))


def test_transformers_renumbers_the_release_and_every_loader_refuses_it(release_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(release_dir)
    # the silent failure this guards against: <0> and <|im_end|> moved by 1,000, past the rows
    assert tok.convert_tokens_to_ids(["<0>", "<|im_end|>", "<|image_pad|>"]) == [151643, 152645, 152655]
    problems = token_layout_problems(tok, release_dir)
    assert any("declared 150643, loaded 151643" in p for p in problems), problems
    assert any("past the 151936 embedding rows" in p for p in problems), problems
    assert any("image_token_id is 151655" in p and "152655" in p for p in problems), problems
    with pytest.raises(TokenLayoutError, match=r"rlsys\.models prepare --checkpoint"):
        load_processor(release_dir)


def test_prepare_gives_transformers_and_vllm_the_release_ids(release_dir, prepared_release):
    from transformers import AutoTokenizer
    from vllm.tokenizers.registry import get_tokenizer

    hf = AutoTokenizer.from_pretrained(prepared_release)
    vl = get_tokenizer(str(prepared_release))
    assert _ids(hf, RELEASE_IDS) == RELEASE_IDS
    assert _ids(vl, RELEASE_IDS) == RELEASE_IDS
    proc = load_processor(prepared_release)
    assert coordinate_token_ids(proc.tokenizer) == list(range(150643, 151643))
    # encode and decode agree between the two and round-trip the markup, coordinates one id each
    text = "<|object_ref_start|>red circle<|object_ref_end|><|box_start|><0><5><998><999><|box_end|><|im_end|>"
    enc = hf(text, add_special_tokens=False)["input_ids"]
    assert enc == vl.encode(text, add_special_tokens=False)
    assert [i for i in enc if 150643 <= i < 151643] == [150643, 150648, 151641, 151642]
    assert hf.decode(enc) == text == vl.decode(enc)
    # the BPE pieces that gave up their ids still tokenise (into smaller pieces) and decode back
    vocab = json.loads((release_dir / "vocab.json").read_text())
    for piece in [t for t, i in vocab.items() if i in (150643, 151000, 151642)]:
        s = hf.convert_tokens_to_string([piece])
        e = hf(s, add_special_tokens=False)["input_ids"]
        assert not any(150643 <= i < 151643 for i in e) and hf.decode(e) == s, (piece, e)
    # weights untouched: same rows, same tensors
    assert load_model(prepared_release).get_input_embeddings().weight.shape[0] == 151936
    assert (prepared_release / "model.safetensors").read_bytes() == (release_dir / "model.safetensors").read_bytes()
    check_token_layout(hf, prepared_release)


def test_layout_check_names_a_vision_token_in_the_wrong_place(prepared_release, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(prepared_release, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["image_token_id"] = 151654
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        TokenLayoutError, match=r"image_token_id is 151654 but the tokenizer gives <\|image_pad\|> id 151655"
    ):
        load_processor(bad)
    # a copy cannot repair weights trained with other ids: prepare refuses too
    with pytest.raises(TokenLayoutError, match="image_token_id"):
        prepare_checkpoint(bad, tmp_path / "bad-prepared")


def test_prepare_cli_writes_the_copy(release_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlsys.models",
            "prepare",
            "--checkpoint",
            str(release_dir),
            "--out",
            str(tmp_path / "p"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert coordinate_token_ids(load_processor(tmp_path / "p").tokenizer)[:2] == [150643, 150644]


def _run(args, cwd, timeout=900):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_grpo_prepares_the_release_itself_and_eval_refuses_it_then_runs_the_copy(release_dir, tmp_path):
    """``rlsys.grpo`` with ``model.path`` at the release: the copy is prepared under the run, the
    engines and the learner load it (each checks its tokenizer), one step trains and the weight
    push's equality check holds. ``rlsys.eval`` pointed at the release refuses it, naming
    ``prepare``; on the prepared copy it evaluates."""
    out = tmp_path / "grpo"
    r = _run(
        [
            "rlsys.grpo",
            f"run.out_dir={out}",
            f"model.path={release_dir}",
            "run.steps=1",
            "run.prompts_per_step=4",
            "rollout.samples_per_prompt=2",
            # the release's wording and decoding, as a user continuing it would train
            "model.prompt_set=rex_release",
            "rollout.repetition_penalty=1.05",
            "rollout.max_new_tokens=12",
            "run.dynamic_sampling=false",
            "tracking.mode=disabled",
            "data.synthetic_train_images=8",
            "data.synthetic_val_images=4",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    prepared = out / "prepared-model"
    assert _ids(load_processor(prepared).tokenizer, RELEASE_IDS) == RELEASE_IDS
    records = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1]
    final = json.loads(r.stdout.split("final: ", 1)[1].splitlines()[0])
    assert final["weights_in_sync"] is True, final

    refused = _run(
        ["rlsys.eval", "--checkpoint", str(release_dir), "--out", str(tmp_path / "e0"), "--limit", "2"], tmp_path
    )
    assert refused.returncode == 2 and "rlsys.models prepare" in refused.stderr, refused.stderr[-2000:]
    ev = _run(
        [
            "rlsys.eval",
            "--checkpoint",
            str(prepared),
            "--out",
            str(tmp_path / "e1"),
            "--limit",
            "4",
            "--max-new-tokens",
            "12",
        ],
        tmp_path,
    )
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["num_samples"] == 4


def test_serve_config_for_the_release_and_serve_refuses_the_download(release_dir, prepared_release):
    from rlsys.config import ConfigError
    from rlsys.serve.app import load_serve_config, resolve_model_dir

    cfg = load_serve_config(REPO / "configs" / "serve_rex_omni.yaml", checkpoint=str(release_dir))
    g = cfg.generation
    assert (cfg.model.prompt_set, g.repetition_penalty, g.max_new_tokens, g.temperature) == (
        "rex_release",
        1.05,
        4096,
        0.0,
    )
    assert (cfg.model.min_pixels, cfg.model.max_pixels) == (16 * 28 * 28, 2560 * 28 * 28)
    # before Ray starts: the download is refused with the command that fixes it; the copy is taken
    with pytest.raises(ConfigError, match=r"rlsys\.models prepare"):
        resolve_model_dir(cfg)
    cfg.model.checkpoint = str(prepared_release)
    assert resolve_model_dir(cfg) == prepared_release
