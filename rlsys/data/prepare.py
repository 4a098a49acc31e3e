"""What every entry point needs before Ray starts: a model directory and data on disk.

With no model path, the tiny random-weight model is built once under the run's folder; with no
data path, the synthetic set is generated once per split (train, val, test). Real checkpoints without
the tokens of their vocabulary (coordinate bins, GETok's grid, ChatRex's indices) get them added
(``model.coord_tokens``) into ``out_dir/prepared-model``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from rewards.sam import SamMaskSource
from rewards.scorer import load_scorer
from rlsys.config import ConfigError, DataConfig, ModelConfig
from rlsys.data import synthetic
from rlsys.data.images import check_images
from rlsys.data.samples import DataError, load_dataset
from rlsys.lang.format import check_sample_phrases
from rlsys.lang.prompts import build_question, chat_prompt, templates_for
from rlsys.lang.targets import answer_text
from rlsys.lang.vocab import REX_BINS, check_writes_masks, model_tokens
from rlsys.models import check_vocabulary_frame, ensure_tiny_model, family_of, prepare_checkpoint, processor_for

log = logging.getLogger(__name__)


def prepare_model_dir(model: ModelConfig, out_dir, init_checkpoint: str | None = None) -> str:
    out = Path(out_dir)
    path = init_checkpoint or model.path
    if path is None:
        # the tiny model has the bins; a Qwen-layout base has no coordinate tokens, and neither has
        # GETok's or ChatRex's tokens: what its vocabulary lacks is added below, as for a real base
        path = ensure_tiny_model(out / "tiny-model", model.tiny_spec())
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {path}: not a Hugging Face checkpoint directory (no config.json)")
    try:  # the family is known and writes the vocabulary's frame: refused here, never "prepared" away
        check_vocabulary_frame(model.vocabulary, family_of(path), model.force_vocabulary_frame)
    except ValueError as exc:
        raise ConfigError(f"model {path}: {exc}") from exc

    try:
        # a vocabulary without added tokens (qwen_json) takes a base checkpoint as it is
        processor_for(model, path, pixels=False)
    except ValueError:
        prepared = out / "prepared-model"
        stamp = prepared / "rlsys_prepared_from.json"
        source = {
            "source": str(path.resolve()),
            "coord_tokens": model.coord_tokens,
            "vocabulary": model.vocabulary,
            "getok_grid": model.getok_grid if model.vocabulary == "getok" else None,
            "chatrex_max_proposals": model.chatrex_max_proposals if model.vocabulary == "chatrex" else None,
            "source_config_mtime_ns": (path / "config.json").stat().st_mtime_ns,
        }
        if stamp.is_file() and json.loads(stamp.read_text()) == source:
            return str(prepared.resolve())  # prepared by an earlier start of this run
        log.info("adding the %s tokens to %s (%s) -> %s", model.vocabulary, path, model.coord_tokens, prepared)
        tmp = out / "prepared-model.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            prepare_checkpoint(path, tmp, model.coord_tokens, model_tokens(model))
        except ValueError as exc:
            raise ConfigError(f"model {path}: {exc}") from exc
        (tmp / stamp.name).write_text(json.dumps(source))
        shutil.rmtree(prepared, ignore_errors=True)
        tmp.rename(prepared)
        path = prepared
    return str(path.resolve())


def _synthetic(data: DataConfig, out_dir, split: str) -> Path:

    d = Path(out_dir) / "data"
    path = d / f"{split}.jsonl"
    n = getattr(data, f"synthetic_{split}_images")
    params = {
        "num_images": n,
        "seed": data.seed,
        "split": split,
        "image_size": data.synthetic_image_size_px,
        "max_objects": data.synthetic_max_objects,
        "position_ramp_levels": data.synthetic_position_ramp_levels,
        "one_kind_per_scene": data.synthetic_one_kind_per_scene,
        # only the tasks the run trains on: every image is used (detection twice as often by default)
        "tasks": list(data.tasks) if data.tasks else list(synthetic.TASK_MIX),
    }
    if data.synthetic_mask_fraction:  # only when used: the stamps of data made before it stay valid
        params["mask_fraction"] = data.synthetic_mask_fraction
    # The parameters are stamped next to the data: a run with other settings regenerates it
    # instead of silently training on the old set.
    stamp = d / f"{split}.params.json"
    if not (path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params):
        if path.is_file():
            log.info("synthetic %s data in %s was made with other settings: regenerating", split, d)
        synthetic.generate(d, **params)
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps(params))
        tmp.replace(stamp)
    return path


SPLITS = ("train", "val", "test")


def prepare_data_path(data: DataConfig, out_dir, split: str = "train") -> Path:
    """The file of ``split`` (train, val or test): ``data.<split>`` if given, else the synthetic
    split under ``out_dir/data``, generated on first use from its own seeded stream."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    given = getattr(data, split)  # data.train, data.val, data.test
    if given:
        p = Path(given)
        if not p.is_file():
            raise ConfigError(f"data.{split} {p}: no such file")
        return p
    return _synthetic(data, out_dir, split)


def load_checked(path, on_bad_record: str = "refuse", *, task: str | None = None, say=print) -> list:
    """The dataset at ``path`` with every record checked before anything starts: its bytes are
    UTF-8, it is JSON, its fields are valid (:mod:`rlsys.data.samples`) and its image exists,
    reads whole and has the record's size (:func:`rlsys.data.images.check_images`).
    ``on_bad_record`` "refuse": the first bad record's :class:`DataError` (or, for images, the
    list of them) names file:line, id and why; "skip": bad records are left out, counted and the
    first few printed through ``say``."""
    bad: list | None = [] if on_bad_record == "skip" else None
    samples = load_dataset(path, task=task, bad=bad)
    unusable = check_images(samples)
    if unusable:
        lines = [f"{s.source}, id {s.id!r}: {why}" for s, why in unusable]
        if bad is None:
            raise DataError(
                f"{len(unusable)} record(s) of {path} cannot be used (data.on_bad_record=skip would leave them out):\n  "
                + "\n  ".join(lines[:10])
                + (f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else "")
            )
        drop = {id(s) for s, _ in unusable}
        samples = [s for s in samples if id(s) not in drop]
        bad.extend((s.source, why) for s, why in unusable)
    if bad:
        say(
            f"[data] {path}: {len(bad)} bad record(s) left out (data.on_bad_record=skip), {len(samples)} kept; first:\n  "
            + "\n  ".join(f"{src}: {why}" for src, why in bad[:5])
        )
    if not samples:
        raise DataError(f"{path}: no usable record")
    return samples


def load_samples(data: DataConfig, out_dir, split: str = "train"):
    samples = load_checked(prepare_data_path(data, out_dir, split), data.on_bad_record)
    if data.tasks:
        samples = [s for s in samples if s.task in data.tasks]
        if not samples:
            raise ConfigError(f"data.tasks={data.tasks}: no {split} sample has one of these tasks")
    return samples


def check_phrases(samples, tokenizer) -> None:
    """No phrase of ``samples`` carries a control token of the model's tokenizer (an
    ``<|image_pad|>`` in a category would add an image slot to the prompt); the first that does
    raises ``ValueError`` naming the file, line, record and field."""

    check_sample_phrases(samples, tokenizer)


def check_targets(samples, vocabulary) -> None:
    """Every sample can be asked and answered in ``vocabulary``, checked before Ray starts: a
    mask output needs a vocabulary that writes masks (getok); for chatrex each needs proposals,
    a box output, and a proposal of IoU >= 0.5 for every GT box (else its answer cannot name
    it). The first that cannot raises ``ConfigError`` naming it."""

    masks = [s for s in samples if s.output == "mask"]
    if masks:
        try:
            check_writes_masks(vocabulary)
        except ValueError as exc:
            first = masks[0]
            raise ConfigError(
                f"{len(masks)} sample(s) ask for masks (first: {first.id!r} at {first.source}): {exc}; set "
                "model.vocabulary=getok or leave mask samples out of the data"
            ) from None
    if vocabulary.name != "chatrex":
        return  # the other vocabularies write any valid record's geometry

    for s in samples:
        try:
            answer_text(s, vocabulary)
        except ValueError as exc:
            raise ConfigError(f"model.vocabulary=chatrex: sample {s.id!r} ({s.source}): {exc}") from None


def scorer_mask_decoder(scorer: str) -> str | None:
    """The mask decoder ``reward.scorer`` (``module:function``) decodes mask answers with: its
    ``mask_decoder`` attribute (:mod:`rewards.scorer`), ``"sam"``, ``"grid_cells"``, None for
    one that decodes nothing, ``"unknown"`` for a scorer that does not say."""

    try:
        f = load_scorer(scorer)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"reward.scorer {scorer}: cannot import it ({exc})") from None
    return getattr(f, "mask_decoder", "unknown")


def mask_decoding(reward) -> tuple[str, object | None]:
    """``(decoder, mask_source)`` that turns mask answers into masks for evaluation, the one the
    config's reward decodes with: ``reward.scorer``'s decoder (``grid_cells``: no mask source;
    ``sam``: a :class:`rewards.sam.SamMaskSource` of ``reward.sam_checkpoint``), SAM when the
    scorer decodes nothing itself and a SAM checkpoint is set. Otherwise ``ConfigError``: the
    mask IoU metric is not computed by a decoder nobody chose."""
    dec = scorer_mask_decoder(reward.scorer)
    if dec == "grid_cells":
        return "grid_cells", None
    if reward.sam_checkpoint:
        return "sam", SamMaskSource(reward.sam_checkpoint)
    raise ConfigError(
        f"mask answers need a decoder for the mask IoU metric, and reward.scorer {reward.scorer} "
        f"({'SAM' if dec == 'sam' else 'no decoder of its own'}) has none without reward.sam_checkpoint: "
        "set reward.sam_checkpoint to a local SAM checkpoint, or choose the SAM-free grid-cell decoder "
        "with reward.scorer=rewards.scorer:score_cell_masks"
    )


def check_point_masks(samples, reward) -> int:
    """Pointing samples whose reward needs masks they lack (point output, any task but gui; the
    scorer's rule): with no ``reward.sam_checkpoint`` to make them, the scorer falls back to
    point-in-box. Refused (``ConfigError`` naming the count and the first sample) unless
    ``reward.points_without_masks`` is ``box``; returns how many there are.

    Also the masks a mask output's reward needs: a scorer that decodes mask answers with SAM
    (``reward.scorer``'s ``mask_decoder``, e.g. the default) without ``reward.sam_checkpoint``
    is refused, naming the SAM-free and decoder-free scorers."""
    _check_mask_decoder(samples, reward)
    lacking = [
        s for s in samples if s.output == "point" and s.task != "gui" and any(i.mask is None for i in s.instances)
    ]
    if not lacking or reward.sam_checkpoint:
        return len(lacking) if not reward.sam_checkpoint else 0
    first = lacking[0]
    if reward.points_without_masks == "refuse":
        raise ConfigError(
            f"{len(lacking)} pointing sample(s) have no masks (first: {first.id!r} at {first.source}) and "
            "reward.sam_checkpoint is not set: they would be scored point-in-box, not point-in-mask. Add masks to "
            "the data, set reward.sam_checkpoint to a local SAM checkpoint, or accept point-in-box with "
            "reward.points_without_masks=box"
        )
    log.warning(
        "%d pointing samples have no masks and no SAM checkpoint is set: they are scored point-in-box "
        "(reward.points_without_masks=box; counted per step as reward/kind/point_in_box_fallback)",
        len(lacking),
    )
    return len(lacking)


def _check_mask_decoder(samples, reward) -> None:
    masks = [s for s in samples if s.output == "mask"]
    if not masks or reward.sam_checkpoint or scorer_mask_decoder(reward.scorer) != "sam":
        return
    first = masks[0]
    raise ConfigError(
        f"{len(masks)} sample(s) ask for masks (first: {first.id!r} at {first.source}) and reward.scorer "
        f"{reward.scorer} decodes mask answers with SAM, but reward.sam_checkpoint is not set. Set it to a local SAM "
        "checkpoint, or choose by name: rewards.scorer:score_cell_masks (mask IoU, SAM-free: the union of the "
        "points' grid cells), rewards.scorer:score_getok_mask_points (the point-set reward, nothing decoded), "
        "rewards.scorer:score_getok_grid_stage_cell_masks"
    )


def image_tokens(processor, width: int, height: int) -> tuple[int, int, int]:
    """``(tokens, resized width, resized height)`` of one image under the processor's pixel
    budget: Qwen2.5-VL resizes to multiples of patch x merge (28 px) within
    [min_pixels, max_pixels], one token per 28 x 28 px."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    h, w = smart_resize(
        height, width, factor=factor, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"]
    )
    return (h // factor) * (w // factor), w, h


def check_fit(
    samples,
    processor,
    max_model_len: int,
    max_new_tokens: int,
    too_long: str = "refuse",
    vocabulary=None,
    prompt_set: str = "paper",
) -> tuple[list, int]:
    """Keep only samples whose longest prompt (every question template of its task, the chat
    markup, its image tokens under the pixel budget) plus ``max_new_tokens`` fits the engines'
    context; such a request would be refused by vLLM at generation time. ``too_long="refuse"``
    raises ``ConfigError`` on the first one, naming it and the numbers; ``"skip"`` leaves them
    out and returns how many. Returns ``(kept samples, skipped count)``."""

    tok = processor.tokenizer
    # the chat markup with an empty question; its one <|image_pad|> becomes the image's tokens
    markup = len(tok(chat_prompt(processor, "", prompt_set), add_special_tokens=False)["input_ids"]) - 1

    class _Pick:  # build_question's rng, fixed on template k
        def __init__(self, k):
            self.k = k

        def randrange(self, n):
            return self.k

    questions, owner = [], []
    for j, s in enumerate(samples):
        kp = list(dict.fromkeys(n for i in s.instances for n in (i.keypoints or {})))
        for k in range(len(templates_for(s.task, s.output, prompt_set))):
            questions.append(
                build_question(
                    s.task,
                    s.output,
                    s.phrases,
                    width=s.width,
                    height=s.height,
                    prompt_boxes=s.prompt_boxes,
                    keypoint_names=kp,
                    rng=_Pick(k),
                    vocabulary=(vocabulary or REX_BINS).for_sample(s),
                    prompt_set=prompt_set,
                )
            )  # chatrex lists its proposals
            owner.append(j)
    longest = [0] * len(samples)
    # tokenised apart from the markup: never fewer tokens than inside it (a merge across the
    # boundary only removes tokens), so the count is an upper bound
    for j, ids in zip(owner, tok(questions, add_special_tokens=False)["input_ids"] if questions else []):
        longest[j] = max(longest[j], len(ids))
    kept, skipped = [], 0
    for s, q in zip(samples, longest):
        img, w, h = image_tokens(processor, s.width, s.height)
        total = markup + q + img + max_new_tokens
        if total <= max_model_len:
            kept.append(s)
            continue
        if too_long == "refuse":
            raise ConfigError(
                f"{s.source} sample {s.id!r}: prompt {markup + q} tokens + {img} image tokens ({s.width}x{s.height} px "
                f"resized to {w}x{h}) + rollout.max_new_tokens {max_new_tokens} = {total} > rollout.max_model_len_tokens "
                f"{max_model_len}; lower model.max_pixels, raise rollout.max_model_len_tokens, or skip such samples with "
                "data.too_long=skip"
            )
        skipped += 1
    if skipped:
        log.warning(
            "skipped %d of %d samples whose prompt and answer cannot fit rollout.max_model_len_tokens %d (data.too_long=skip)",
            skipped,
            len(samples),
            max_model_len,
        )
    return kept, skipped
