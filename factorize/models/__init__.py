"""Models (Flax NNX) built through a ``conv`` factory, and their JSON architecture spec.

``make_model("resnet18", num_classes=10, in_channels=3, conv=conv_factory("dsc", 1), rngs=...)``
builds the same architecture with every factorizable conv in the depthwise-separable family.
``ModelSpec`` is the JSON description a checkpoint stores so the model can be rebuilt without the
script that made it, including per-layer families/ranks of a converted model.
``from_torch(state_dict_or_file, arch="resnet18")`` loads a torchvision state dict into the NNX
version of its architecture (``factorize.models.torchvision``).
"""

from __future__ import annotations

from factorize.models.cnn import CNN
from factorize.models.mobilenet import MobileNet
from factorize.models.registry import MODELS, count_params, make_model
from factorize.models.resnet import ResNet18
from factorize.models.spec import ModelSpec, build, conv_layers, record_layers, set_submodule
from factorize.models.torch_import import from_torch, read_state_dict
from factorize.models.torchvision import (
    TorchMobileNetV2,
    TorchResNet18,
    TorchResNet50,
    TorchVGG16,
    TorchVGG16BN,
)

__all__ = [
    "CNN",
    "MODELS",
    "MobileNet",
    "ModelSpec",
    "ResNet18",
    "TorchMobileNetV2",
    "TorchResNet18",
    "TorchResNet50",
    "TorchVGG16",
    "TorchVGG16BN",
    "build",
    "conv_layers",
    "count_params",
    "from_torch",
    "make_model",
    "read_state_dict",
    "record_layers",
    "set_submodule",
]
