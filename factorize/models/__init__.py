"""Models (Flax NNX) built through a ``conv`` factory, and their JSON architecture spec.

``make_model("resnet18", num_classes=10, in_channels=3, conv=conv_factory("dsc", 1), rngs=...)``
builds the same architecture with every factorizable conv in the depthwise-separable family.
``ModelSpec`` is the JSON description a checkpoint stores so the model can be rebuilt without the
script that made it, including per-layer families/ranks of a converted model.
"""

from __future__ import annotations

from factorize.models.cnn import CNN
from factorize.models.mobilenet import MobileNet
from factorize.models.registry import MODELS, count_params, make_model
from factorize.models.resnet import ResNet18
from factorize.models.spec import ModelSpec, build, conv_layers, record_layers, set_submodule

__all__ = [
    "CNN",
    "MODELS",
    "MobileNet",
    "ModelSpec",
    "ResNet18",
    "build",
    "conv_layers",
    "count_params",
    "make_model",
    "record_layers",
    "set_submodule",
]
