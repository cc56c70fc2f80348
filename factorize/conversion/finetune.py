"""Fine-tuning after conversion: the training loop of ``factorize.training``, with the factors
trainable or frozen."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from factorize.training import TrainConfig, evaluate, fit

# The factors of every FactorizedConv live under the attribute ``factors``.
FACTORS = nnx.PathContains("factors")


def finetune(
    model: nnx.Module,
    dataset: Any,
    config: TrainConfig,
    *,
    freeze_factors: bool = False,
    workdir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tunes ``model`` in place; returns test accuracy before and after, and the history.

    With ``freeze_factors`` only the parameters outside the factorized layers' factors train
    (biases, BatchNorm, heads, kept layers): how much accuracy the rest of the network can
    recover around a fixed projection.
    """
    wrt = nnx.All(nnx.Param, nnx.Not(FACTORS)) if freeze_factors else nnx.Param
    before = evaluate(model, dataset.x_test, dataset.y_test)["accuracy"]
    history = fit(model, dataset, config, workdir=workdir, wrt=wrt)
    # fit evaluates after its last epoch; evaluate only when it did not train at all
    after = history[-1]["test_accuracy"] if history else before
    return {
        "accuracy_before": before,
        "accuracy_after": after,
        "freeze_factors": freeze_factors,
        "config": dataclasses.asdict(config),
        "history": history,
    }
