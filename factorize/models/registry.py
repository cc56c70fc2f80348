"""Model registry: names as the command line spells them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from factorize.models.cnn import CNN
from factorize.models.mobilenet import MobileNet
from factorize.models.resnet import ResNet18
from factorize.models.torchvision import (
    TorchMobileNetV2,
    TorchResNet18,
    TorchResNet50,
    TorchVGG16,
    TorchVGG16BN,
)

MODELS: dict[str, type[nnx.Module]] = {
    "cnn": CNN,
    "resnet18": ResNet18,  # the CIFAR layout
    "mobilenet": MobileNet,
    # torchvision's ImageNet layouts (factorize.models.from_torch loads their state dicts)
    "tv_resnet18": TorchResNet18,
    "tv_resnet50": TorchResNet50,
    "tv_vgg16": TorchVGG16,
    "tv_vgg16_bn": TorchVGG16BN,
    "tv_mobilenet_v2": TorchMobileNetV2,
}


def make_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    conv: Callable[..., nnx.Module] = nnx.Conv,
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> nnx.Module:
    """Build model ``name`` (one of :data:`MODELS`); ``kwargs`` go to its constructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    cls = MODELS[name]
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters
        if p not in ("self", "num_classes", "in_channels", "conv", "rngs")
    ]  # fmt: skip
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{name} has no argument(s) {unknown}; it takes {accepted}")
    return cls(num_classes, in_channels, conv=conv, rngs=rngs, **kwargs)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param``; BatchNorm running stats excluded)."""
    state = nnx.state(model, nnx.Param)
    return int(sum(x.size for x in jax.tree.leaves(state)))
