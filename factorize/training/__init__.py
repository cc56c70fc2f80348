"""Training: ``train_and_evaluate(config, workdir)``, ``fit`` for any NNX model, checkpoints and
data parallelism (see :mod:`factorize.training.parallel` for multi-device/multi-host use)."""

from __future__ import annotations

from factorize.training.checkpoint import CheckpointError, read_meta, restore, save
from factorize.training.config import TrainConfig, get_config
from factorize.training.parallel import make_mesh
from factorize.training.train import (
    augment_batch,
    evaluate,
    fit,
    make_optimizer,
    make_train_step,
    train_and_evaluate,
)

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "augment_batch",
    "evaluate",
    "fit",
    "get_config",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "read_meta",
    "restore",
    "save",
    "train_and_evaluate",
]
