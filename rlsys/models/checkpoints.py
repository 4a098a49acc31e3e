"""Real checkpoints: their token layout checked and repaired, a vocabulary's tokens added or mapped
(:func:`prepare_checkpoint`), and the one loader of processors and models.

:func:`prepare_checkpoint` takes a real local checkpoint (Qwen2.5-VL-3B-Instruct, Qwen3-VL,
Rex-Omni) and makes sure its tokenizer carries the coordinate tokens, either added to the
vocabulary or mapped onto the last 1,000 BPE rows as Rex-Omni did (section 2.4), in a layout
transformers and vLLM both read with the ids the weights were trained with (the released
Rex-Omni's files are not: :func:`repair_declared_ids`). :func:`check_token_layout` is the check
every loader runs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from rlsys.lang.coords import COORD_TOKENS, NUM_BINS
from rlsys.lang.vocab import model_tokens
from rlsys.models.families import check_vocabulary_frame, family_of

log = logging.getLogger(__name__)


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
    """Copy a local checkpoint of a known family (:func:`rlsys.models.families.family_of`) to ``dst`` with a vocabulary's ``tokens`` in its
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
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
    family_of(src)  # an unknown family is refused before anything is written
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
        model = AutoModelForImageTextToText.from_pretrained(work, dtype=torch.bfloat16)
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
    """Which part of a Qwen-VL-style model a parameter belongs to: ``"vision"`` (the ViT),
    ``"projector"`` (the mergers that map vision features into the LLM: Qwen2.5-VL's one,
    Qwen3-VL's and its DeepStack mergers) or ``"llm"``."""
    if ".merger." in name or name.startswith("merger.") or ".deepstack_merger_list." in name:
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
    tokenizer-only checks) and the tokens its vocabulary needs (:func:`rlsys.lang.vocab.model_tokens`);
    the checkpoint's family must be known and write the vocabulary's coordinate frame
    (:func:`rlsys.models.families.check_vocabulary_frame`)."""

    family = family_of(path)
    check_vocabulary_frame(model_cfg.vocabulary, family, getattr(model_cfg, "force_vocabulary_frame", False))
    return load_processor(
        path,
        trust_remote_code=model_cfg.trust_remote_code,
        pixels=model_cfg.pixel_budget() if pixels else None,
        tokens=model_tokens(model_cfg),
    )


def load_model(path, *, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a checkpoint of a known family for training (weights from safetensors only)."""
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
