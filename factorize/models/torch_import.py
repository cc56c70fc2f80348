"""PyTorch state dicts (torchvision layouts) into NNX models: :func:`from_torch`.

A state dict comes as a dict of tensors or arrays, a ``.pth`` / ``.pt`` file (read with
``torch.load(..., weights_only=True)``: no code from the file runs; torch is imported only
then) or a ``.safetensors`` file (read with ``safetensors.numpy``, no torch needed). Conv
weights go from OIHW to HWIO, linear weights are transposed, BatchNorm takes the running
statistics; ``num_batches_tracked`` is ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from factorize.models.registry import make_model
from factorize.models.spec import ModelSpec
from factorize.models.torchvision import BN_EPS, layer_variables, torch_layers

__all__ = ["ARCHS", "TorchNotInstalledError", "from_torch", "read_state_dict", "resolve_arch"]

# The CLI's spelling (torchvision's function names) → (registry name, stem weight, classifier
# weight); the last two give the input channels and the number of classes.
ARCHS: dict[str, tuple[str, str, str]] = {
    "resnet18": ("tv_resnet18", "conv1.weight", "fc.weight"),
    "resnet50": ("tv_resnet50", "conv1.weight", "fc.weight"),
    "vgg16": ("tv_vgg16", "features.0.weight", "classifier.6.weight"),
    "vgg16_bn": ("tv_vgg16_bn", "features.0.weight", "classifier.6.weight"),
    "mobilenet_v2": ("tv_mobilenet_v2", "features.0.0.weight", "classifier.1.weight"),
}
_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_SHOWN = 5  # keys listed per kind of mismatch


class TorchNotInstalledError(ImportError, ValueError):
    """PyTorch is needed (to read a pickled ``.pth``) but not installed. A ``ValueError`` too,
    so the command line reports it in one line."""


def _torch():
    try:
        import torch
    except ImportError:
        raise TorchNotInstalledError(
            "reading a .pth/.pt file needs PyTorch: pip install 'factorize[torch]' (or pip "
            "install torch), or convert the file to .safetensors, which needs no torch"
        ) from None
    return torch


def _to_numpy(value: Any, key: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    try:
        return np.asarray(value)
    except Exception as e:
        raise ValueError(f"state dict entry {key!r} is not an array ({type(value).__name__})") \
            from e


def read_state_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict in ``source`` as numpy arrays.

    ``source`` is a mapping (``model.state_dict()``, numpy arrays), a ``.pth`` / ``.pt`` /
    ``.bin`` file of ``torch.save`` (a state dict, or a checkpoint dict holding one under
    ``"state_dict"`` or ``"model"``) or a ``.safetensors`` file. A ``"module."`` prefix on every
    key (``nn.DataParallel``) is dropped.

    Example::

        arrays = read_state_dict("resnet18-f37072fd.pth")
        arrays["conv1.weight"].shape  # (64, 3, 7, 7)
    """
    if isinstance(source, Mapping):
        obj: Any = source
        where = "state dict"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"state dict file {where!r} does not exist")
        if path.suffix not in _SUFFIXES:
            raise ValueError(
                f"state dict file must end in {', '.join(_SUFFIXES)}, got {path.name!r}"
            )
        obj = _read_file(path)
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{where}: expected a non-empty state dict (name → tensor), got "
                         f"{type(obj).__name__}" + (" (empty)" if isinstance(obj, Mapping)
                                                    else ""))
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{where}: state dict keys must be strings, got {bad[:_SHOWN]}")
    keys = list(obj)
    strip = all(k.startswith("module.") for k in keys)
    return {(k[len("module."):] if strip else k): _to_numpy(obj[k], k) for k in keys}


def _read_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path}: cannot read safetensors file, truncated or corrupt "
                             f"({type(e).__name__}: {e})") from None
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError, UnpicklingError, RuntimeError (zip), ...
        raise ValueError(f"{path}: cannot read PyTorch file, truncated or corrupt "
                         f"({type(e).__name__}: {e})") from None


def resolve_arch(arch: str) -> tuple[str, str, str, str]:
    """``(arch, registry name, stem weight key, classifier weight key)`` of ``arch``
    (``"resnet18"`` or ``"tv_resnet18"``); ``ValueError`` listing the known ones otherwise."""
    for name, (model, stem, head) in ARCHS.items():
        if arch in (name, model):
            return name, model, stem, head
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")


def _listing(what: str, items: list[str]) -> str:
    n = len(items)
    more = f", … ({n - _SHOWN} more)" if n > _SHOWN else ""
    return f"{n} {what}{'s' if n != 1 else ''}: {', '.join(items[:_SHOWN])}{more}"


def from_torch(
    source: Mapping[str, Any] | str | os.PathLike,
    arch: str,
    *,
    num_classes: int | None = None,
    bn_eps: float = BN_EPS,
    return_spec: bool = False,
) -> nnx.Module | tuple[nnx.Module, ModelSpec]:
    """The NNX model (eval mode) holding a torchvision state dict's weights.

    Args:
      source: a state dict, or a ``.pth`` / ``.pt`` / ``.safetensors`` file of one (see
        :func:`read_state_dict`).
      arch: ``"resnet18"``, ``"resnet50"``, ``"vgg16"``, ``"vgg16_bn"`` or
        ``"mobilenet_v2"`` (or the registry name, ``"tv_resnet18"`` …).
      num_classes: classifier outputs; default: read from the classifier weight's shape. The
        input channels are read from the first conv's weight.
      bn_eps: BatchNorm epsilon (a state dict does not store it; torchvision uses 1e-5).
      return_spec: also return the :class:`~factorize.models.ModelSpec` that rebuilds it (what
        a checkpoint stores).

    Raises ``ValueError`` naming the missing, unexpected and mis-shaped keys (the first few of
    each, with counts) when the state dict is not the architecture's.

    Example::

        import torchvision
        tv = torchvision.models.resnet18()
        model = factorize.models.from_torch(tv.state_dict(), arch="resnet18")
        logits = model(jnp.zeros((1, 224, 224, 3)))  # tv(x.permute(0, 3, 1, 2)) in eval mode
    """
    name, registry_name, stem_key, head_key = resolve_arch(arch)
    arrays = read_state_dict(source)
    head, stem = arrays.get(head_key), arrays.get(stem_key)
    if num_classes is None:
        num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1000
    in_channels = int(stem.shape[1]) if stem is not None and stem.ndim == 4 else 3
    kwargs = {} if bn_eps == BN_EPS else {"bn_eps": float(bn_eps)}
    model = nnx.eval_shape(lambda: make_model(
        registry_name, num_classes=num_classes, in_channels=in_channels, rngs=nnx.Rngs(0),
        **kwargs,
    ))
    expected: dict[str, Any] = {}
    for prefix, layer in torch_layers(model).items():
        expected |= layer_variables(prefix, layer)
    ignored = {f"{p}.num_batches_tracked" for p, m in torch_layers(model).items()
               if isinstance(m, nnx.BatchNorm)}
    missing = [k for k in expected if k not in arrays]
    unexpected = [k for k in arrays if k not in expected and k not in ignored]
    misshaped = []
    for key, (var, axes) in expected.items():
        if key not in arrays:
            continue
        a = arrays[key]
        shape = tuple(var.get_value().shape)
        want = tuple(shape[i] for i in axes) if axes else shape
        if a.shape != want or not np.issubdtype(a.dtype, np.floating):
            misshaped.append(f"{key} expected {want} float, got {a.shape} {a.dtype}")
            continue
        value = np.transpose(a, np.argsort(axes)) if axes else a
        var.set_value(np.asarray(value, np.float32))
    if missing or unexpected or misshaped:
        parts = [_listing(w, items) for w, items in (
            ("missing key", missing), ("unexpected key", unexpected),
            ("mis-shaped key", misshaped)) if items]
        raise ValueError(f"state dict does not match torchvision {name} ({num_classes} classes, "
                         f"{in_channels} input channels): " + "; ".join(parts))
    model.eval()
    if not return_spec:
        return model
    return model, ModelSpec(registry_name, num_classes, in_channels, kwargs=kwargs)
