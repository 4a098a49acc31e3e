"""A checkpoint in the released Rex-Omni's file layout, built here from a tiny Qwen-layout model.

The release (IDEA-Research/Rex-Omni on the Hugging Face hub; facts in
``shared/reference/rex-omni-release.md``) ships the slow tokenizer's files only: ``vocab.json``
and ``merges.txt`` with Qwen2.5-VL's 151,643 BPE entries, and a ``tokenizer_config.json`` whose
``added_tokens_decoder`` declares ``<k>`` at id 150643+k, on top of the last 1,000 BPE entries,
and Qwen's 22 added tokens at 151643..151664. No ``tokenizer.json``. Its processor files are the
transformers 4.x ones (``preprocessor_config.json``, ``chat_template.json``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlsys.lang.coords import COORD_TOKENS
from rlsys.models import (
    QWEN2_5_VL_ADDED_TOKENS,
    QWEN2_5_VL_BPE_ENTRIES,
    QWEN2_5_VL_VOCAB_ROWS,
    TinySpec,
    build_tiny_model,
)

RELEASE_FIRST_COORD_ID = 150643


def _token(content: str, special: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def write_release_layout(base: Path, out: Path) -> Path:
    """Rewrite ``base`` (a tiny model with Qwen2.5-VL's tokenizer layout, no coordinate tokens)
    into ``out`` in the release's layout."""
    base, out = Path(base), Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(base / name, out / name)
    tj = json.loads((base / "tokenizer.json").read_text())
    vocab = {t: i for t, i in tj["model"]["vocab"].items() if i < QWEN2_5_VL_BPE_ENTRIES}
    assert len(vocab) == QWEN2_5_VL_BPE_ENTRIES
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    decoder = {str(RELEASE_FIRST_COORD_ID + k): _token(t, False) for k, t in enumerate(COORD_TOKENS)}
    for k, (t, special) in enumerate(QWEN2_5_VL_ADDED_TOKENS):
        decoder[str(QWEN2_5_VL_BPE_ENTRIES + k)] = _token(t, special)
    specials = [t for t, sp in QWEN2_5_VL_ADDED_TOKENS if sp and t != "<|endoftext|>"]
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "added_tokens_decoder": decoder,
                "additional_special_tokens": specials,
                "bos_token": None,
                "clean_up_tokenization_spaces": False,
                "eos_token": "<|im_end|>",
                "errors": "replace",
                "model_max_length": 131072,
                "pad_token": "<|endoftext|>",
                "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": None,
            },
            indent=2,
        )
    )
    proc = json.loads((base / "processor_config.json").read_text())
    image = dict(proc["image_processor"])
    size = image.pop("size")
    image.update(
        min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"], processor_class="Qwen2_5_VLProcessor"
    )
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": (base / "chat_template.jinja").read_text()}))
    return out


def build_release_layout(root: Path, spec: TinySpec | None = None) -> Path:
    """A tiny random model (Qwen2.5-VL layout, 151,936 rows) written in the release's layout."""
    spec = spec or TinySpec(tokenizer_layout="qwen2_5_vl", vocab_rows=QWEN2_5_VL_VOCAB_ROWS)
    base = build_tiny_model(Path(root) / "qwen-base", spec, overwrite=True)
    return write_release_layout(base, Path(root) / "rex-omni-release")
