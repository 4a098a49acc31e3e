"""Model factory and loader: a tiny random-weight Qwen2.5-VL for CPUs, and real checkpoints.

:func:`build_tiny_model` writes a complete Hugging Face directory (config, safetensors weights,
tokenizer, image and video processors, chat template) of the Qwen2.5-VL architecture, small
enough to train and sample on 2 CPU cores. Nothing is downloaded: the tokenizer is a byte-level
BPE trained here on the prompt templates and phrase vocabulary, plus Qwen2.5-VL's special tokens
and the 1,000 coordinate tokens. transformers and vLLM load the directory unchanged, so the code
paths that run here are the ones that run on a real checkpoint.

:func:`prepare_checkpoint` takes a real local checkpoint (Qwen2.5-VL-3B-Instruct, Rex-Omni) and
makes sure its tokenizer carries the coordinate tokens, either added to the vocabulary or
mapped onto the last 1,000 BPE rows as Rex-Omni did (section 2.4), in a layout transformers and
vLLM both read with the ids the weights were trained with (the released Rex-Omni's files are
not: :func:`repair_declared_ids`). :func:`check_token_layout` is the check every loader runs.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from rlsys.data import synthetic
from rlsys.lang import prompts
from rlsys.lang.coords import COORD_TOKENS, NUM_BINS
from rlsys.lang.vocab import model_tokens, required_tokens

log = logging.getLogger(__name__)

# Qwen2.5-VL's special tokens, in its order; ids follow the BPE vocabulary in our tokenizer.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's tokenizer layout (GUIDE section 2): byte-level BPE ids 0..151642, then these 22
# added tokens at 151643..151664 (True: a "special" token, skipped when detokenising with
# skip_special_tokens), and embedding rows up to 151935 that no token uses.
QWEN2_5_VL_BPE_ENTRIES = 151643
QWEN2_5_VL_VOCAB_ROWS = 151936
QWEN2_5_VL_ADDED_TOKENS = tuple((t, True) for t in QWEN_SPECIAL_TOKENS) + tuple(
    (t, False)
    for t in (
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    )
)

# Written here (not copied): the Qwen2.5-VL conversation layout, so our prompts tokenise the way
# the real model was trained to read them. Images become <|vision_start|><|image_pad|><|vision_end|>,
# which the processor expands to one pad token per merged vision patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a built random-weight model. head_dim = hidden_size / num_heads must be at least
    64: vLLM's CPU attention rejects smaller heads (GUIDE section 2).

    ``tokenizer_layout="tiny"``: a small BPE trained here with Qwen's special tokens and the
    coordinate tokens after it. ``"qwen2_5_vl"``: Qwen2.5-VL's real id layout (151,643 BPE
    entries, its 22 added tokens at their ids, ``vocab_rows`` embedding rows) and no coordinate
    tokens, as a base checkpoint has none: :func:`prepare_checkpoint` adds or maps them.
    """

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 384
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 1
    vision_intermediate_size: int = 128
    bpe_vocab_size: int = 1024
    # Image budget: 28 px per merged token, so 224x224 -> 8x8 = 64 image tokens.
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224
    max_position_embeddings: int = 4096
    rope_theta: float = 1000000.0
    # Qwen2.5-VL-3B ties lm_head to the input embedding (7B does not); a tied tiny model checks
    # that weight sync and checkpoints handle one tensor under two names
    tie_word_embeddings: bool = False
    tokenizer_layout: str = "tiny"
    vocab_rows: int | None = None  # None: the tokenizer's length rounded up to 64
    seed: int = 0


def qwen2_5_vl_3b_shaped(num_layers: int = 2, vision_depth: int = 2, **kw) -> TinySpec:
    """Qwen2.5-VL-3B-Instruct's shapes (GUIDE section 2: LLM 2048 wide, 16 heads, 2 KV heads,
    MLP 11008, 151,936 vocabulary rows, tied embeddings; vision 1280 wide, 16 heads, MLP 3420,
    window attention with the last block full, merger to 2048) and its tokenizer layout, with
    the layer counts cut (36 and 32 in the real model) so it trains on a CPU."""
    return TinySpec(
        hidden_size=2048,
        num_layers=num_layers,
        num_heads=16,
        num_kv_heads=2,
        intermediate_size=11008,
        vision_hidden_size=1280,
        vision_depth=vision_depth,
        vision_heads=16,
        vision_intermediate_size=3420,
        tie_word_embeddings=True,
        tokenizer_layout="qwen2_5_vl",
        vocab_rows=QWEN2_5_VL_VOCAB_ROWS,
        max_position_embeddings=128000,
        **kw,
    )


def _training_corpus() -> list[str]:
    """Text the tiny BPE is trained on: every prompt template and the synthetic vocabulary."""

    lines = [t for ts in prompts.TEMPLATES.values() for t in ts]
    lines += [prompts.SYSTEM_PROMPT, "system", "user", "assistant", "None", "box", "keypoints", "unvisible"]
    lines += synthetic.vocabulary()
    return lines * 4


def build_tokenizer(spec: TinySpec):
    """A byte-level BPE with Qwen2.5-VL's special tokens and the coordinate tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=spec.max_position_embeddings,
    )
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    # Coordinate tokens are ordinary added tokens (not "special"): detokenising with
    # skip_special_tokens must keep them.
    fast.add_tokens(list(COORD_TOKENS))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_qwen_layout_tokenizer(spec: TinySpec):
    """A byte-level BPE with Qwen2.5-VL's id layout: exactly 151,643 BPE entries (the 256 byte
    symbols, the merges learnt here on the prompt corpus, then filler merges of byte pairs and
    triples up to the count, so the highest ids are real merges as in Qwen's vocabulary), then
    Qwen's 22 added tokens at 151643..151664 with their special flags. No coordinate tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _training_corpus(),
        trainer=trainers.BpeTrainer(
            vocab_size=spec.bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    tj = json.loads(tok.to_str())
    vocab, merges = (
        tj["model"]["vocab"],
        [list(m.split(" ", 1)) if isinstance(m, str) else list(m) for m in tj["model"]["merges"]],
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())

    def fillers():
        pairs = [(a, b) for a in alphabet for b in alphabet]
        yield from pairs
        for a, b in pairs:
            for c in alphabet:
                yield a + b, c

    for a, b in fillers():
        if len(vocab) >= QWEN2_5_VL_BPE_ENTRIES:
            break
        if a + b not in vocab and a in vocab and b in vocab:
            vocab[a + b] = len(vocab)
            merges.append([a, b])
    if len(vocab) != QWEN2_5_VL_BPE_ENTRIES or sorted(vocab.values()) != list(range(QWEN2_5_VL_BPE_ENTRIES)):
        raise AssertionError(f"built {len(vocab)} BPE entries with gaps; expected ids 0..{QWEN2_5_VL_BPE_ENTRIES - 1}")
    tj["model"]["merges"] = merges
    tok = Tokenizer.from_str(json.dumps(tj))
    for content, special in QWEN2_5_VL_ADDED_TOKENS:
        at = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([at])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=spec.max_position_embeddings,
    )
    # as Qwen's tokenizer_config lists them (they exist already: no id moves)
    fast.add_special_tokens(
        {"additional_special_tokens": [t for t, sp in QWEN2_5_VL_ADDED_TOKENS if sp and t != "<|endoftext|>"]}
    )
    want = {t: QWEN2_5_VL_BPE_ENTRIES + k for k, (t, _) in enumerate(QWEN2_5_VL_ADDED_TOKENS)}
    got = {t: fast.convert_tokens_to_ids(t) for t in want}
    if got != want:
        raise AssertionError(f"added tokens landed at other ids than Qwen2.5-VL's: {got}")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir, spec: TinySpec = TinySpec(), *, overwrite: bool = False) -> Path:
    """Write a random-weight Qwen2.5-VL directory to ``out_dir`` and return its path.

    The directory is written to a temporary sibling and renamed into place, so a crash never
    leaves a half-written model that a later run would try to load.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
        shutil.rmtree(out)
    if spec.hidden_size % spec.num_heads or spec.hidden_size // spec.num_heads < 64:
        raise ValueError(
            f"head_dim must be at least 64 for vLLM's CPU attention, got {spec.hidden_size / spec.num_heads:g}"
        )
    if spec.tokenizer_layout not in ("tiny", "qwen2_5_vl"):
        raise ValueError(f"tokenizer_layout must be 'tiny' or 'qwen2_5_vl', got {spec.tokenizer_layout!r}")

    tokenizer = build_tokenizer(spec) if spec.tokenizer_layout == "tiny" else build_qwen_layout_tokenizer(spec)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = spec.vocab_rows or (len(tokenizer) + 63) // 64 * 64  # padded, as real checkpoints are
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_rows {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    head_dim = spec.hidden_size // spec.num_heads
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width); Qwen2.5-VL uses
    # [16, 24, 24] for head_dim 128, scaled here to 64.
    mrope = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=spec.tie_word_embeddings,
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            window_size=112,
            fullatt_block_indexes=[spec.vision_depth - 1],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    (tmp / "rlsys_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    tmp.rename(out)
    log.info("wrote tiny Qwen2.5-VL (%d parameters) to %s", sum(p.numel() for p in model.parameters()), out)
    return out


def ensure_tiny_model(out_dir, spec: TinySpec = TinySpec()) -> Path:
    """Build the tiny model once; later calls reuse the directory if it is complete."""
    out = Path(out_dir)
    spec_file = out / "rlsys_tiny_spec.json"
    if (out / "config.json").is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == asdict(spec):
        return out
    return build_tiny_model(out, spec, overwrite=True)


# ---------------------------------------------------------------------------------------------
# Real checkpoints
# ---------------------------------------------------------------------------------------------
def token_ids(tokenizer, tokens) -> list[int]:
    """Ids of ``tokens`` (a vocabulary's added tokens, :func:`rlsys.lang.vocab.required_tokens`);
    raises if the tokenizer lacks any (the checkpoint needs :func:`prepare_checkpoint` first)."""
    tokens = list(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens) if tokens else []
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in zip(tokens, ids) if i is None or (unk is not None and i == unk)]
    if missing:
        what = (
            "coordinate tokens"
            if tuple(tokens) == COORD_TOKENS
            else f"of the {len(tokens)} tokens its vocabulary needs"
        )
        raise ValueError(
            f"tokenizer lacks {len(missing)} {what} (first: {missing[0]}); "
            "run `python -m rlsys.models prepare --checkpoint DIR --coord-tokens add|map_last` on it "
            "(rlsys.sft and rlsys.grpo do this for model.path themselves)"
        )
    return ids


def coordinate_token_ids(tokenizer) -> list[int]:
    """Ids of ``<0>``..``<999>`` (:func:`token_ids` of the bins)."""
    return token_ids(tokenizer, COORD_TOKENS)


def prepare_checkpoint(src, dst, mode: str = "add", tokens=COORD_TOKENS) -> Path:
    """Copy a local Qwen2.5-VL checkpoint to ``dst`` with a vocabulary's ``tokens`` in its
    tokenizer (the coordinate bins by default; :func:`rlsys.lang.vocab.required_tokens`), in a
    layout every loader (transformers, vLLM) reads with the ids its weights were trained with.

    A tokenizer whose added tokens load at other ids than its ``tokenizer_config.json`` declares
    (the released Rex-Omni: ``<k>`` declared at 150643+k over BPE entries and no
    ``tokenizer.json``, which transformers 5 renumbers to 151643+k, past the embedding) gets a
    ``tokenizer.json`` with the declared ids (:func:`repair_declared_ids`). Then missing tokens:

    ``mode="add"`` appends the missing ones to the vocabulary and grows the embedding and
    output matrices (new rows initialised to the mean of the existing ones).
    ``mode="map_last"`` reuses 1,000 rows of the existing embedding, as Rex-Omni did (section
    2.4; the release's rows, :func:`map_last_ids`). No parameters are added; the BPE entries at
    those ids are removed from the tokenizer so each id has one meaning.
    A checkpoint whose tokenizer already has the tokens at the right ids is copied unchanged.
    The copy is checked (:func:`check_token_layout`) before it is returned.
    """
    import torch
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
    if mode not in ("add", "map_last"):
        raise ValueError(f"coord token mode must be 'add' or 'map_last', got {mode!r}")
    tok = AutoTokenizer.from_pretrained(src)
    declared = declared_token_ids(src)
    work = src
    if declared and tok.convert_tokens_to_ids(list(declared)) != list(declared.values()):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        repair_declared_ids(src, dst)
        work = dst
    processor = AutoProcessor.from_pretrained(work, trust_remote_code=False)
    tok = processor.tokenizer
    tokens = tuple(tokens)
    have = set(tok.get_vocab())
    missing = [t for t in tokens if t not in have]
    if not missing:
        if work == src:
            shutil.copytree(src, dst, dirs_exist_ok=True)
    elif mode == "map_last" and (tokens != COORD_TOKENS or len(missing) != len(tokens)):
        raise ValueError(
            "coord_tokens=map_last maps the 1,000 bins onto a base checkpoint's last rows; "
            f"for these {len(missing)} tokens use coord_tokens=add"
        )
    elif mode == "add":
        dst.mkdir(parents=True, exist_ok=True)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(work, dtype=torch.bfloat16)
        tok.add_tokens(missing)
        old = model.get_input_embeddings().weight.shape[0]
        if len(tok) > old:
            model.resize_token_embeddings(len(tok), mean_resizing=True)
        model.save_pretrained(dst, safe_serialization=True)
        processor.save_pretrained(dst)
    else:
        # map_last: rewrite tokenizer.json so the chosen rows are the coordinate tokens.
        dst.mkdir(parents=True, exist_ok=True)
        vocab_rows = AutoConfig.from_pretrained(work).get_text_config().vocab_size
        if work != dst:
            for f in work.iterdir():
                if f.is_file():
                    shutil.copy2(f, dst / f.name)
        tj = json.loads((work / "tokenizer.json").read_text())
        ids = _map_last_rows(tj, vocab_rows)
        (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
        p = dst / "tokenizer_config.json"
        if p.is_file():
            cfg = json.loads(p.read_text())
            if cfg.get("added_tokens_decoder"):
                # declared ids must agree with tokenizer.json, or the check above would refuse
                # the copy (and a slow tokenizer reading the config would use them)
                for k, t in zip(ids, COORD_TOKENS):
                    cfg["added_tokens_decoder"][str(k)] = {
                        "content": t,
                        "lstrip": False,
                        "normalized": False,
                        "rstrip": False,
                        "single_word": False,
                        "special": False,
                    }
                p.write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
    check_token_layout(AutoTokenizer.from_pretrained(dst), dst, "prepared copy's tokenizer")
    return dst


def map_last_ids(added_ids, vocab_rows: int) -> list[int]:
    """The embedding rows ``map_last`` gives ``<0>``..``<999>``, ascending: the 1,000 highest
    rows below the first added token at or above row 1,000 (the last 1,000 BPE entries), or
    ``vocab_rows - 1000 .. vocab_rows - 1`` when there is none.

    This is the released Rex-Omni's rule: on Qwen2.5-VL (BPE 0..151642, 22 added tokens at
    151643..151664, 151,936 rows) ``<k>`` is row 150643+k, so a model prepared here reads and
    writes the ids of the release's checkpoint. Rows 151665..151935 stay unused, as in Qwen and
    in the release. Added tokens below row 1,000 (an ``<unk>`` at 0, say) are skipped.
    """
    taken = {int(i) for i in added_ids}
    top = min(min((i for i in taken if i >= NUM_BINS), default=vocab_rows), vocab_rows)
    out = [i for i in range(top - 1, -1, -1) if i not in taken][:NUM_BINS]
    if len(out) < NUM_BINS:
        raise ValueError(
            f"a vocabulary of {vocab_rows} rows whose first added token is at row {top} has fewer than "
            f"{NUM_BINS} rows below it for the coordinate tokens"
        )
    return out[::-1]


def _map_last_rows(tj: dict, vocab_rows: int) -> list[int]:
    """Edit a tokenizers JSON in place so coordinate token k has id ``map_last_ids(...)[k]``;
    returns those ids (:func:`place_added_tokens` makes the edit)."""
    added = tj.get("added_tokens", [])
    ids = map_last_ids([t["id"] for t in added], vocab_rows)
    wanted = {t["content"]: t["id"] for t in added}
    wanted.update(zip(COORD_TOKENS, ids))
    dropped = place_added_tokens(tj, wanted)
    log.info(
        "mapped coordinate tokens onto rows %d..%d (%d BPE entries removed; added tokens kept at their ids)",
        ids[0],
        ids[-1],
        dropped,
    )
    return ids


def place_added_tokens(tj: dict, wanted: dict[str, int], special: dict[str, bool] | None = None) -> int:
    """Edit a tokenizers JSON in place so every token of ``wanted`` (content -> id) is an added
    token at exactly that id, the only token with that id; returns the number of BPE entries
    removed. ``special``: a token's special flag (default: the JSON's, else False).

    A BPE entry holding one of those ids is removed, with every merge that makes or uses it, so
    each id has one meaning and the BPE never produces an added token's id. The tokenizers
    library ignores the ids stored with added tokens and numbers them after the model vocabulary
    unless the model vocabulary already holds the token, in which case it keeps that id; so every
    added token is also entered in the BPE vocabulary at its id (no merge leads to it).
    """
    owner: dict[int, str] = {}
    for content, i in wanted.items():
        if i in owner:
            raise ValueError(f"tokens {owner[i]} and {content} both want id {i}")
        owner[i] = content
    old = {t["content"]: t for t in tj.get("added_tokens", [])}
    stray = [c for c in old if c not in wanted]
    if stray:
        raise ValueError(f"added token {stray[0]} has no id in the wanted layout")
    vocab = tj["model"]["vocab"]
    gone = {c for c, i in vocab.items() if c not in wanted and i in owner}
    for c in gone:
        del vocab[c]
    if gone and isinstance(tj["model"].get("merges"), list):

        def parts(m):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            return a, b, a + b

        tj["model"]["merges"] = [m for m in tj["model"]["merges"] if not gone.intersection(parts(m))]
    special = special or {}
    tj["added_tokens"] = [
        {
            **{"single_word": False, "lstrip": False, "rstrip": False, "normalized": False},
            **{k: v for k, v in old.get(c, {}).items() if k in ("single_word", "lstrip", "rstrip", "normalized")},
            "id": i,
            "content": c,
            "special": special.get(c, old.get(c, {}).get("special", False)),
        }
        for c, i in sorted(wanted.items(), key=lambda kv: kv[1])
    ]
    for c, i in wanted.items():
        vocab[c] = i
    return len(gone)


# ---------------------------------------------------------------------------------------------
# Token layout checks: a checkpoint whose tokenizer gives a token another id than its weights
# were trained with runs silently and learns nothing; every loader refuses it instead.
# ---------------------------------------------------------------------------------------------
class TokenLayoutError(ValueError):
    """The tokenizer's ids disagree with the checkpoint (its config or its own declared ids)."""


# config.json keys that name a token's id, and the token (Qwen-VL families)
CONFIG_TOKEN_KEYS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def declared_token_ids(path) -> dict[str, int]:
    """The ids ``tokenizer_config.json`` declares for its added tokens (``added_tokens_decoder``),
    content -> id; empty when it declares none."""
    p = Path(path) / "tokenizer_config.json"
    if not p.is_file():
        return {}
    dec = json.loads(p.read_text()).get("added_tokens_decoder") or {}
    return {(v.get("content") if isinstance(v, dict) else str(v)): int(k) for k, v in dec.items()}


def token_layout_problems(tokenizer, path) -> list[str]:
    """What is wrong with ``tokenizer`` as the tokenizer of the checkpoint at ``path``: a declared
    added token loaded at another id, a token id past the embedding rows, a vision token whose
    id is not the one ``config.json`` names. Empty when all is right."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    text_cfg = cfg.get("text_config") or cfg
    rows = text_cfg.get("vocab_size") or cfg.get("vocab_size")
    problems = []
    declared = declared_token_ids(path)
    if declared:
        got = tokenizer.convert_tokens_to_ids(list(declared))
        moved = [(t, want, have) for (t, want), have in zip(declared.items(), got) if have != want]
        if moved:
            t, want, have = moved[0]
            problems.append(
                f"{len(moved)} added tokens load at other ids than tokenizer_config.json declares "
                f"(first: {t} declared {want}, loaded {have}): the checkpoint ships no tokenizer.json that "
                "agrees with its declared ids, so this transformers version renumbers them"
            )
    vocab = tokenizer.get_vocab()
    if rows:
        past = sorted(((i, t) for t, i in vocab.items() if i >= rows), reverse=True)
        if past:
            i, t = past[0]
            problems.append(f"{len(past)} token ids are past the {rows} embedding rows (highest: {t} = {i})")
    for key, token in CONFIG_TOKEN_KEYS.items():
        want = cfg.get(key)
        if want is None or token not in vocab:
            continue
        if vocab[token] != want:
            problems.append(f"config.json {key} is {want} but the tokenizer gives {token} id {vocab[token]}")
    # generation stops at the config's end-of-sequence ids: each must be one of the tokenizer's
    # added tokens (<|im_end|>, <|endoftext|>), not a BPE piece that moved under it
    eos = text_cfg.get("eos_token_id", cfg.get("eos_token_id"))
    added = {i: t for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")}
    for i in [eos] if isinstance(eos, int) else list(eos or []):
        if i not in added:
            problems.append(
                f"config.json eos_token_id {i} is not an added token of the tokenizer (it is {tokenizer.convert_ids_to_tokens(i)!r})"
            )
    return problems


def check_token_layout(tokenizer, path, who: str = "tokenizer") -> None:
    """Raise :class:`TokenLayoutError` naming the tokens and ids when :func:`token_layout_problems`
    finds any, and the command that writes a copy every loader reads right."""
    problems = token_layout_problems(tokenizer, path)
    if problems:
        raise TokenLayoutError(
            f"{path}: the {who} does not match the checkpoint: "
            + "; ".join(problems)
            + f". Run `python -m rlsys.models prepare --checkpoint {path} --out DIR` and use DIR "
            "(rlsys.sft and rlsys.grpo do this for model.path themselves)"
        )


def repair_declared_ids(src, dst) -> int:
    """Write ``dst/tokenizer.json`` from ``src``'s tokenizer files with every added token at the id
    ``tokenizer_config.json`` declares (the released Rex-Omni's layout: ``<k>`` declared at
    150643+k over BPE entries, no tokenizer.json); returns how many BPE entries gave up their id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tj = json.loads(tok.backend_tokenizer.to_str())
    declared = declared_token_ids(src)
    wanted = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    wanted.update(declared)
    dropped = place_added_tokens(tj, wanted)
    Path(dst).mkdir(parents=True, exist_ok=True)
    (Path(dst) / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    log.info(
        "wrote tokenizer.json with the %d declared added-token ids (%d BPE entries removed)", len(declared), dropped
    )
    return dropped


def param_part(name: str) -> str:
    """Which part of a Qwen2.5-VL-style model a parameter belongs to: ``"vision"`` (the ViT),
    ``"projector"`` (the merger that maps vision features into the LLM) or ``"llm"``."""
    if ".merger." in name or name.startswith("merger."):
        return "projector"
    if ".visual." in name or name.startswith("visual."):
        return "vision"
    return "llm"


def load_processor(path, *, trust_remote_code: bool = False, pixels: dict | None = None, tokens=COORD_TOKENS):
    """The checkpoint's processor; ``pixels`` (``min_pixels``/``max_pixels``, see
    :func:`rlsys.config.pixel_budget`) overrides its image budget. ``tokens``: refuse a tokenizer
    without them (the vocabulary's added tokens, :func:`rlsys.lang.vocab.required_tokens`: the bins
    by default; ``()`` for ``qwen_json``, which runs on a base checkpoint as it is) and a tokenizer
    whose ids do not fit the checkpoint (:func:`check_token_layout`)."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **(pixels or {}))
    check_token_layout(proc.tokenizer, path)
    token_ids(proc.tokenizer, tokens)
    return proc


def processor_for(model_cfg, path, *, pixels: bool = True):
    """:func:`load_processor` with a config's model section (``rlsys.config.ModelConfig`` or
    Serve's): its remote-code setting, its pixel budget (``pixels=False``: the checkpoint's, for
    tokenizer-only checks) and the tokens its vocabulary needs (:func:`rlsys.lang.vocab.model_tokens`)."""

    return load_processor(
        path,
        trust_remote_code=model_cfg.trust_remote_code,
        pixels=model_cfg.pixel_budget() if pixels else None,
        tokens=model_tokens(model_cfg),
    )


def load_model(path, *, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a Qwen2.5-VL-architecture checkpoint for training (weights from safetensors only)."""
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m rlsys.models", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="build the tiny random-weight model")
    t.add_argument("--out", required=True)
    t.add_argument("--overwrite", action="store_true")
    c = sub.add_parser(
        "prepare",
        help="add a vocabulary's tokens (coordinate bins, GETok's grid, ChatRex's indices) to a real local checkpoint, "
        "and give a checkpoint whose tokenizer loads with other ids than it declares (the released Rex-Omni) a "
        "tokenizer.json that every loader reads right",
    )
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--coord-tokens", choices=("add", "map_last"), default="add")
    c.add_argument("--vocabulary", choices=("rex_bins", "getok", "chatrex"), default="rex_bins")
    c.add_argument("--getok-grid", type=int, default=32)
    c.add_argument("--chatrex-max-proposals", type=int, default=100)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.cmd == "tiny":
        print(build_tiny_model(a.out, overwrite=a.overwrite))
    else:
        print(
            prepare_checkpoint(
                a.checkpoint,
                a.out,
                a.coord_tokens,
                required_tokens(a.vocabulary, a.getok_grid, a.chatrex_max_proposals),
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
