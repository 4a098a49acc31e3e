"""Shared fixtures. The tiny model and synthetic data are built once per test session."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from rlsys.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from rlsys import synthetic

    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, num_images=48, seed=0, split="train")
    synthetic.generate(out, num_images=16, seed=0, split="val")
    return out
