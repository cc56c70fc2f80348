"""Loads a model written by ``factorize export --to torch`` into PyTorch.

This file is copied next to the export as ``load.py``; it needs only ``torch`` and
``safetensors`` (and ``torchvision`` for torchvision architectures), never ``factorize``::

    python load.py EXPORT_DIR            # builds the model, runs one random image, prints shapes

    from load import load
    model = load("EXPORT_DIR")           # an nn.Module in eval mode, NCHW input
    logits = model(images)               # images: (B, C, H, W) float32

``architecture.json`` describes every conv, linear and BatchNorm layer: a factorized conv is an
``nn.Sequential`` of ``nn.Conv2d`` stages (with ``groups``) and, where a padding is not
symmetric, an ``nn.ZeroPad2d`` before the stage it belongs to. Such paddings were resolved for
``input_shape``; for torchvision architectures every padding is symmetric.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn


def _module(d: dict) -> nn.Module:
    kind = d["type"]
    if kind == "Conv2d":
        return nn.Conv2d(
            d["in_channels"], d["out_channels"], tuple(d["kernel_size"]),
            stride=tuple(d["stride"]), padding=tuple(d["padding"]),
            dilation=tuple(d["dilation"]), groups=d["groups"], bias=d["bias"],
        )
    if kind == "ZeroPad2d":
        return nn.ZeroPad2d(tuple(d["padding"]))
    if kind == "Linear":
        return nn.Linear(d["in_features"], d["out_features"], bias=d["bias"])
    if kind == "Unflatten":
        return nn.Unflatten(1, (d["channels"], 1, 1))
    if kind == "Flatten":
        return nn.Flatten(1)
    raise ValueError(f"unknown module type {kind!r} in architecture.json")


def build_layer(desc: dict) -> nn.Module:
    """One layer of ``architecture.json``: a module, or an ``nn.Sequential`` of its stages."""
    if desc["kind"] == "batchnorm":
        return nn.BatchNorm2d(desc["num_features"], eps=desc["eps"])
    modules = [_module(m) for m in desc["modules"]]
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


class CNN(nn.Module):
    """factorize's ``cnn``: ``conv{i}`` → ``bn{i}`` → ReLU for each conv, global average pool,
    linear ``head``."""

    def __init__(self, arch: dict):
        super().__init__()
        self.depth = sum(1 for name in arch["layers"] if name.startswith("conv"))
        for name, desc in arch["layers"].items():
            setattr(self, name, build_layer(desc))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.head(x.mean(dim=(2, 3)))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, last = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, last, module)


def build(arch: dict) -> nn.Module:
    """The model ``arch`` describes, with untrained weights."""
    if arch.get("format") != 1:
        raise ValueError(f"architecture.json format {arch.get('format')!r}; this loader reads 1")
    if arch["torchvision"]:
        import torchvision

        make = getattr(torchvision.models, arch["torchvision"])
        model = make(weights=None, num_classes=arch["num_classes"], **arch["torchvision_kwargs"])
        for name, desc in arch["layers"].items():
            _replace(model, name, build_layer(desc))
        return model
    if arch["model"] == "cnn":
        return CNN(arch)
    raise ValueError(f"no PyTorch definition for model {arch['model']!r}")


def load(directory: str | Path, device: str = "cpu") -> nn.Module:
    """The exported model in ``directory`` with its weights, in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    arch = json.loads((directory / "architecture.json").read_text())
    model = build(arch)
    model.load_state_dict(load_file(directory / "model.safetensors", device=device), strict=True)
    return model.to(device).eval()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python load.py EXPORT_DIR")
    root = Path(sys.argv[1])
    net = load(root)
    shape = json.loads((root / "architecture.json").read_text())["input_shape"]
    with torch.no_grad():
        y = net(torch.randn(1, *shape))
    print(f"{type(net).__name__}: input (1, {', '.join(map(str, shape))}) -> {tuple(y.shape)}")
