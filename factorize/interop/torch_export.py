"""A (converted) NNX model as a PyTorch state dict, a JSON architecture and a loader.

Every factorized conv becomes an ``nn.Sequential`` of standard ``nn.Conv2d`` layers, one per
chain stage (``factorize.chain.Stage``: the HWIO stage kernel with in-channels per group becomes
an OIHW weight with ``groups``), each carrying the stride, padding and dilation of the axes it
owns; the bias sits on the last stage. Padding PyTorch cannot express (Flax's ``"SAME"`` pads a
stride-2 conv on an even input by (0, 1)) becomes an explicit ``nn.ZeroPad2d`` before the stage
that owns the axis, resolved for the input size the checkpoint records (``image_shape``): the
exported ``cnn`` is exact at that size. torchvision architectures pad symmetrically, so theirs
is exact at every size. A converted linear layer becomes ``nn.Linear`` stages (grouped ones as
1×1 ``nn.Conv2d`` between ``nn.Unflatten`` and ``nn.Flatten``).

The output directory holds ``model.safetensors`` (no pickle), ``architecture.json`` and
``load.py`` (:mod:`factorize.interop.torch_loader`, which needs only torch and safetensors, and
torchvision for torchvision architectures: it builds ``torchvision.models.<arch>`` and swaps in
the exported layers).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from factorize._checks import normalize_padding, pair
from factorize.chain import Stage, _stage_geometry
from factorize.layers import FactorizedConv, FactorizedLinear
from factorize.models.spec import ModelSpec, conv_layers
from factorize.models.torch_import import ARCHS
from factorize.models.torchvision import layer_variables, torch_layers

__all__ = ["FORMAT", "SUPPORTED_MODELS", "export_torch", "torch_state"]

FORMAT = 1
TORCHVISION = {model: arch for arch, (model, _, _) in ARCHS.items()}
SUPPORTED_MODELS = ("cnn", *TORCHVISION)
_OIHW = (3, 2, 0, 1)
# Copied next to the export as load.py (read as a file: importing it would import torch).
LOADER = Path(__file__).with_name("torch_loader.py")


def _conv_modules(stages: Sequence[Stage], factors, bias, strides, pads, dilation):
    """(module descriptions, {sequential-relative key: array}) of a chain of conv stages."""
    modules: list[dict[str, Any]] = []
    tensors: dict[str, np.ndarray] = {}
    for k, (st, kernel) in enumerate(zip(stages, factors, strict=True)):
        s, p, d = _stage_geometry(st, strides, pads, dilation)
        (top, bottom), (left, right) = p
        conv_pad = [top, left]
        if top != bottom or left != right:  # nn.Conv2d pads both sides alike
            modules.append({"type": "ZeroPad2d", "padding": [left, right, top, bottom]})
            conv_pad = [0, 0]
        last = k == len(stages) - 1
        modules.append({
            "type": "Conv2d", "in_channels": st.in_channels, "out_channels": st.out_channels,
            "kernel_size": list(st.shape[:2]), "stride": list(s), "padding": conv_pad,
            "dilation": list(d), "groups": st.groups, "bias": bool(last and bias is not None),
        })
        i = len(modules) - 1
        tensors[f"{i}.weight"] = np.asarray(kernel).transpose(_OIHW)
        if last and bias is not None:
            tensors[f"{i}.bias"] = np.asarray(bias)
    return modules, tensors


def _linear_modules(stages: Sequence[Stage], factors, bias):
    if all(st.groups == 1 for st in stages):
        modules, tensors = [], {}
        for k, (st, kernel) in enumerate(zip(stages, factors, strict=True)):
            last = k == len(stages) - 1
            modules.append({"type": "Linear", "in_features": st.in_channels,
                            "out_features": st.out_channels,
                            "bias": bool(last and bias is not None)})
            tensors[f"{k}.weight"] = np.asarray(kernel)[0, 0].T
            if last and bias is not None:
                tensors[f"{k}.bias"] = np.asarray(bias)
        return modules, tensors
    # grouped 1×1 stages: as convs on a (B, C, 1, 1) view
    convs, conv_tensors = _conv_modules(stages, factors, bias, (1, 1), ((0, 0), (0, 0)), (1, 1))
    modules = [{"type": "Unflatten", "channels": stages[0].in_channels}, *convs,
               {"type": "Flatten"}]
    tensors = {f"{int(k.split('.')[0]) + 1}.{k.split('.')[1]}": v for k, v in conv_tensors.items()}
    return modules, tensors


def _prefixed(prefix: str, modules: list, tensors: dict) -> dict[str, np.ndarray]:
    """Keys of a single module are ``prefix.weight``; of a Sequential ``prefix.{i}.weight``."""
    if len(modules) == 1:
        return {f"{prefix}.{k.split('.', 1)[1]}": v for k, v in tensors.items()}
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _torch_array(var: nnx.Variable, axes) -> np.ndarray:
    a = np.asarray(var[...])
    return a if axes is None else a.transpose(axes)


def _layer(prefix: str, layer: nnx.Module, in_shape) -> tuple[dict, dict[str, np.ndarray]]:
    """(description, state-dict entries) of one layer."""
    if isinstance(layer, nnx.BatchNorm):
        tensors = {k: _torch_array(v, axes)
                   for k, (v, axes) in layer_variables(prefix, layer).items()}
        tensors[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)
        return {"kind": "batchnorm", "num_features": int(layer.num_features),
                "eps": float(layer.epsilon)}, tensors
    if isinstance(layer, FactorizedLinear):
        f = layer.to_factorized()
        bias = layer.bias[...] if layer.bias is not None else None
        modules, tensors = _linear_modules(f.stages, f.factors, bias)
        kind = "linear"
    elif isinstance(layer, nnx.Linear):
        modules = [{"type": "Linear", "in_features": int(layer.in_features),
                    "out_features": int(layer.out_features), "bias": layer.bias is not None}]
        tensors = {f"0.{k.rsplit('.', 1)[1]}": _torch_array(v, axes)
                   for k, (v, axes) in layer_variables(prefix, layer).items()}
        kind = "linear"
    else:
        modules, tensors = _conv(prefix, layer, in_shape)
        kind = "conv"
    return {"kind": kind, "modules": modules}, _prefixed(prefix, modules, tensors)


def _conv(prefix: str, layer: nnx.Module, in_shape):
    if isinstance(layer, FactorizedConv):
        f = layer.to_factorized()
        stages, factors = f.stages, f.factors
        strides, padding, dilation = layer.strides, layer.padding, layer.kernel_dilation
    else:
        if pair(layer.input_dilation or 1, "input_dilation") != (1, 1):
            raise ValueError(f"layer {prefix!r}: input_dilation has no nn.Conv2d equivalent")
        kernel = layer.kernel[...]
        groups = int(layer.feature_group_count)
        stages, factors = (Stage(tuple(kernel.shape), groups, (True, True)),), (kernel,)
        strides = pair(layer.strides or 1, "strides")
        dilation = pair(layer.kernel_dilation or 1, "kernel_dilation")
        padding = layer.padding
    if in_shape is None:
        raise ValueError(f"layer {prefix!r} is never called on the export's input size")
    kernel_hw = (max(st.shape[0] for st in stages), max(st.shape[1] for st in stages))
    pads = normalize_padding(padding, in_shape[1:3], kernel_hw, pair(strides, "strides"),
                             pair(dilation, "dilation"))
    bias = layer.bias[...] if layer.bias is not None else None
    return _conv_modules(stages, factors, bias, pair(strides, "strides"), pads,
                         pair(dilation, "dilation"))


def torch_state(
    model: nnx.Module, spec: ModelSpec, image_shape: Sequence[int]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(state dict, architecture description)`` of ``model`` for PyTorch.

    ``image_shape`` is ``(H, W, C)``: the size at which ``"SAME"`` paddings are resolved.
    Raises ``ValueError`` for a model other than :data:`SUPPORTED_MODELS`, or one holding
    variables the export would not carry.

    Example::

        state, arch = torch_state(model, spec, (224, 224, 3))
        state["conv1.0.weight"].shape  # the first stage of a converted conv1, OIHW
    """
    from factorize.conversion import layer_inputs

    if spec.model not in SUPPORTED_MODELS:
        raise ValueError(f"export to torch supports the models {', '.join(SUPPORTED_MODELS)}; "
                         f"this checkpoint is {spec.model!r}")
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
    shapes = layer_inputs(model, jnp.zeros((1, *image_shape), jnp.float32), layers=conv_layers)
    path_of = {id(m): p for p, m in conv_layers(model).items()}
    layers = torch_layers(model)
    state: dict[str, np.ndarray] = {}
    described: dict[str, Any] = {}
    for prefix, layer in layers.items():
        in_shape = shapes.get(path_of.get(id(layer), ""))
        described[prefix], tensors = _layer(prefix, layer, in_shape)
        state |= tensors
    _check_covered(model, layers)
    arch = {
        "format": FORMAT,
        "model": spec.model,
        "torchvision": TORCHVISION.get(spec.model),
        "torchvision_kwargs": {k: v for k, v in spec.kwargs.items() if k == "width_mult"},
        "num_classes": spec.num_classes,
        "in_channels": spec.in_channels,
        "input_shape": [image_shape[2], image_shape[0], image_shape[1]],
        "input_layout": "NCHW",
        "layers": described,
    }
    return {k: np.ascontiguousarray(v) for k, v in state.items()}, arch


def _check_covered(model: nnx.Module, layers: dict[str, nnx.Module]) -> None:
    """Every variable of ``model`` lies in an exported layer (nothing is silently dropped)."""
    inside = {id(v) for m in layers.values() for _, v in nnx.iter_graph(m)
              if isinstance(v, nnx.Variable)}
    left = [".".join(map(str, p)) for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable) and id(v) not in inside]
    if left:
        raise ValueError(f"export to torch cannot carry {len(left)} variable(s) outside conv, "
                         f"BatchNorm and linear layers: {', '.join(left[:5])}")


def export_torch(
    model: nnx.Module,
    spec: ModelSpec,
    out: str | os.PathLike,
    *,
    image_shape: Sequence[int],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Writes ``out/`` with ``model.safetensors``, ``architecture.json`` and ``load.py``.

    ``out`` must not exist; it is written under a temporary name and renamed into place, so a
    failure leaves nothing. ``metadata`` (JSON) goes into ``architecture.json``.

    Example::

        export_torch(model, spec, "resnet18-dsc", image_shape=(224, 224, 3))
        # then, with PyTorch:  from load import load;  net = load("resnet18-dsc")
    """
    from safetensors.numpy import save_file

    from factorize._io import atomic_write_json

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} already exists; choose a new directory")
    state, arch = torch_state(model, spec, image_shape)
    arch["metadata"] = metadata or {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "architecture.json", arch)
        shutil.copyfile(LOADER, tmp / "load.py")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
