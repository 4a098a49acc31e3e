"""What every entry point needs before Ray starts: a model directory and data on disk.

With no model path, the tiny random-weight model is built once under the run's folder; with no
data path, the synthetic set is generated once (train and val splits). Real checkpoints without
coordinate tokens get them added (``model.coord_tokens``) into ``out_dir/prepared-model``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rlsys.config import ConfigError, DataConfig, ModelConfig

log = logging.getLogger(__name__)


def prepare_model_dir(model: ModelConfig, out_dir, init_checkpoint: str | None = None) -> str:
    out = Path(out_dir)
    path = init_checkpoint or model.path
    if path is None:
        from rlsys.models import ensure_tiny_model

        return str(ensure_tiny_model(out / "tiny-model", model.tiny_spec()).resolve())
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {path}: not a Hugging Face checkpoint directory (no config.json)")
    from rlsys.models import load_processor, prepare_checkpoint

    try:
        load_processor(path, trust_remote_code=model.trust_remote_code)
    except ValueError:
        prepared = out / "prepared-model"
        log.info("adding coordinate tokens to %s (%s) -> %s", path, model.coord_tokens, prepared)
        path = prepare_checkpoint(path, prepared, model.coord_tokens)
    return str(path.resolve())


def _synthetic(data: DataConfig, out_dir, split: str) -> Path:
    from rlsys import synthetic

    d = Path(out_dir) / "data"
    path = d / f"{split}.jsonl"
    n = data.synthetic_train_images if split == "train" else data.synthetic_val_images
    params = {"num_images": n, "seed": data.seed, "split": split, "image_size": data.synthetic_image_size_px,
              "max_objects": data.synthetic_max_objects, "position_ramp_levels": data.synthetic_position_ramp_levels,
              "one_kind_per_scene": data.synthetic_one_kind_per_scene,
              # only the tasks the run trains on: every image is used (detection twice as often by default)
              "tasks": list(data.tasks) if data.tasks else list(synthetic.TASK_MIX)}
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


def prepare_data_path(data: DataConfig, out_dir, split: str = "train") -> Path:
    given = data.train if split == "train" else data.val
    if given:
        p = Path(given)
        if not p.is_file():
            raise ConfigError(f"data.{split} {p}: no such file")
        return p
    return _synthetic(data, out_dir, split)


def load_samples(data: DataConfig, out_dir, split: str = "train"):
    from rlsys.data import load_dataset

    samples = load_dataset(prepare_data_path(data, out_dir, split))
    if data.tasks:
        samples = [s for s in samples if s.task in data.tasks]
        if not samples:
            raise ConfigError(f"data.tasks={data.tasks}: no {split} sample has one of these tasks")
    return samples


def check_phrases(samples, model_dir: str, trust_remote_code: bool = False) -> None:
    """No phrase of ``samples`` carries a control token of the model's tokenizer (an
    ``<|image_pad|>`` in a category would add an image slot to the prompt); the first that does
    raises ``ValueError`` naming the file, line, record and field."""
    from rlsys.format import check_sample_phrases
    from rlsys.models import load_processor

    check_sample_phrases(samples, load_processor(model_dir, trust_remote_code=trust_remote_code).tokenizer)
