"""Tokenizers of the built models: a small BPE trained here, or one in a Qwen checkpoint's real
id layout, with Qwen's special tokens and chat layout. Nothing is downloaded."""

from __future__ import annotations

import json

from rlsys.data import synthetic
from rlsys.lang import prompts
from rlsys.lang.coords import COORD_TOKENS

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
# Qwen3 (Qwen3-VL included) keeps that BPE and those 22 and adds 4 more after them, at
# 151665..151668: the tool-response pair and the reasoning markers, none "special".
QWEN3_VL_ADDED_TOKENS = QWEN2_5_VL_ADDED_TOKENS + tuple(
    (t, False) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")
)
# the real id layouts the built tokenizers can take (TinySpec.tokenizer_layout)
QWEN_LAYOUTS = {"qwen2_5_vl": QWEN2_5_VL_ADDED_TOKENS, "qwen3_vl": QWEN3_VL_ADDED_TOKENS}

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


def _training_corpus() -> list[str]:
    """Text the tiny BPE is trained on: every prompt template and the synthetic vocabulary."""

    lines = [t for ts in prompts.TEMPLATES.values() for t in ts]
    lines += [prompts.SYSTEM_PROMPT, "system", "user", "assistant", "None", "box", "keypoints", "unvisible"]
    lines += synthetic.vocabulary()
    return lines * 4


def build_tokenizer(spec):
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


def build_qwen_layout_tokenizer(spec):
    """A byte-level BPE with a Qwen checkpoint's id layout (``spec.tokenizer_layout``): exactly
    151,643 BPE entries (the 256 byte symbols, the merges learnt here on the prompt corpus, then
    filler merges of byte pairs and triples up to the count, so the highest ids are real merges as
    in Qwen's vocabulary), then the layout's added tokens from 151643 with their special flags
    (Qwen2.5-VL's 22; Qwen3-VL's 26). No coordinate tokens."""
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
    added = QWEN_LAYOUTS[spec.tokenizer_layout]
    for content, special in added:
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
    fast.add_special_tokens({"additional_special_tokens": [t for t, sp in added if sp and t != "<|endoftext|>"]})
    want = {t: QWEN2_5_VL_BPE_ENTRIES + k for k, (t, _) in enumerate(added)}
    got = {t: fast.convert_tokens_to_ids(t) for t in want}
    if got != want:
        raise AssertionError(f"added tokens landed at other ids than {spec.tokenizer_layout}'s: {got}")
    fast.chat_template = CHAT_TEMPLATE
    return fast
