"""NNX versions of torchvision's ImageNet classifiers, computing what PyTorch computes.

``TorchResNet18``, ``TorchResNet50`` (v1.5: the bottleneck's stride on its 3×3 conv),
``TorchVGG16``, ``TorchVGG16BN`` and ``TorchMobileNetV2`` follow ``torchvision.models`` layer for
layer, in NHWC/HWIO, so a torchvision state dict loads into them (``factorize.models.from_torch``)
and their logits equal PyTorch's in eval mode. What makes that exact rather than approximate:

* every conv pads explicitly and symmetrically, as ``nn.Conv2d(padding=p)`` does (Flax's
  ``"SAME"`` pads a 3×3 stride-2 conv on an even input by (0, 1), PyTorch by (1, 1));
* ResNet's 3×3/2 max-pool pads with −inf (``nn.MaxPool2d(3, 2, padding=1)``);
* :func:`adaptive_avg_pool` uses PyTorch's bins (``floor(i·H/o)`` to ``ceil((i+1)·H/o)``), so
  VGG's (7, 7) pool is right at any input size, 32×32 included (a 1×1 map is repeated);
* VGG flattens its features in PyTorch's (C, H, W) order, so the first classifier weight is the
  state dict's, transposed and nothing else;
* BatchNorm in eval mode uses the running statistics, ``eps = bn_eps`` (torchvision: 1e-5);
  MobileNetV2 clips at 6 (ReLU6).

Dropout (VGG's classifier, MobileNetV2's) is left out: it is the identity in eval mode, so
fine-tuning these models here runs without it.

Every factorizable conv goes through the ``conv`` factory (``nnx.Conv``'s signature), as in the
other models of this package, so the same architecture is built full or factorized. MobileNetV2's
depthwise convs stay grouped ``nnx.Conv`` run through :func:`factorize.ops.conv_general_dilated`
(XLA's grouped conv is hundreds of times slower on CPU, docs/design.md, "Fast paths on CPU").

:func:`torch_layers` maps each model's layers to torchvision's state-dict prefixes
(``"layer1.0.downsample.0"``), which import and export share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from factorize import ops

__all__ = [
    "TorchMobileNetV2",
    "TorchResNet18",
    "TorchResNet50",
    "TorchVGG16",
    "TorchVGG16BN",
    "adaptive_avg_pool",
    "layer_variables",
    "torch_layers",
]

Conv = Callable[..., nnx.Module]
BN_EPS = 1e-5  # torchvision's nn.BatchNorm2d default


def _pads(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``nn.Conv2d(padding=p)``: ``p`` zeros on both sides of both axes."""
    return ((p, p), (p, p))


def _bn(c: int, eps: float, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # Flax's momentum is PyTorch's 1 − momentum (torchvision: 0.1).
    return nnx.BatchNorm(c, momentum=0.9, epsilon=eps, rngs=rngs)


def _adaptive_axis(x: jax.Array, axis: int, out: int) -> jax.Array:
    n = x.shape[axis]
    if n % out == 0:  # equal bins: one reshaped mean
        return x.reshape(*x.shape[:axis], out, n // out, *x.shape[axis + 1:]).mean(axis + 1)
    bins = [
        lax.slice_in_dim(x, (i * n) // out, -(-((i + 1) * n) // out), axis=axis)
        .mean(axis, keepdims=True)
        for i in range(out)
    ]
    return jnp.concatenate(bins, axis=axis)


def adaptive_avg_pool(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
    """``nn.AdaptiveAvgPool2d(output_size)`` on an NHWC batch.

    Output cell ``i`` of an axis of length ``n`` averages inputs ``floor(i·n/o)`` to
    ``ceil((i+1)·n/o) − 1``, PyTorch's rule; bins may overlap (n < o repeats inputs). The
    rectangle's mean is taken one axis after the other, which is the same average.

    Example::

        adaptive_avg_pool(jnp.ones((1, 1, 1, 512)), 7).shape  # (1, 7, 7, 512), as VGG at 32×32
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    return _adaptive_axis(_adaptive_axis(x, 1, int(oh)), 2, int(ow))


def _max_pool(x: jax.Array, k: int, s: int, p: int) -> jax.Array:
    # reduce_window pads with its initial value, −inf: padded taps never win the max.
    return nnx.max_pool(x, (k, k), strides=(s, s), padding=_pads(p))


def _nchw_flatten(x: jax.Array) -> jax.Array:
    """``torch.flatten(x, 1)`` of the NCHW tensor that the NHWC ``x`` stands for."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)


# ------------------------------------------------------------------------------- ResNet


class BasicBlock(nnx.Module):
    """torchvision's ``BasicBlock``: 3×3 (stride) → BN → ReLU → 3×3 → BN, + shortcut, ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, *, conv: Conv, bn_eps: float,
                 rngs: nnx.Rngs):
        self.conv1 = conv(cin, planes, (3, 3), strides=stride, padding=_pads(1), use_bias=False,
                          rngs=rngs)
        self.bn1 = _bn(planes, bn_eps, rngs)
        self.conv2 = conv(planes, planes, (3, 3), padding=_pads(1), use_bias=False, rngs=rngs)
        self.bn2 = _bn(planes, bn_eps, rngs)
        self.downsample = _downsample(cin, planes, stride, conv=conv, bn_eps=bn_eps, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5): 1×1 → 3×3 (stride) → 1×1 (×4), BN and ReLU
    between, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, conv: Conv, bn_eps: float,
                 rngs: nnx.Rngs):
        out = planes * self.expansion
        self.conv1 = conv(cin, planes, (1, 1), padding=_pads(0), use_bias=False, rngs=rngs)
        self.bn1 = _bn(planes, bn_eps, rngs)
        self.conv2 = conv(planes, planes, (3, 3), strides=stride, padding=_pads(1),
                          use_bias=False, rngs=rngs)
        self.bn2 = _bn(planes, bn_eps, rngs)
        self.conv3 = conv(planes, out, (1, 1), padding=_pads(0), use_bias=False, rngs=rngs)
        self.bn3 = _bn(out, bn_eps, rngs)
        self.downsample = _downsample(cin, out, stride, conv=conv, bn_eps=bn_eps, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + _shortcut(self.downsample, x))


def _downsample(cin, cout, stride, *, conv, bn_eps, rngs) -> nnx.List | None:
    """``downsample = Sequential(conv1x1(stride), BatchNorm2d)`` where the shape changes."""
    if stride == 1 and cin == cout:
        return None
    proj = conv(cin, cout, (1, 1), strides=stride, padding=_pads(0), use_bias=False, rngs=rngs)
    return nnx.List([proj, _bn(cout, bn_eps, rngs)])


def _shortcut(downsample: nnx.List | None, x: jax.Array) -> jax.Array:
    return x if downsample is None else downsample[1](downsample[0](x))


class _TorchResNet(nnx.Module):
    """torchvision's ``ResNet``: 7×7/2 conv → BN → ReLU → 3×3/2 max-pool → 4 stages → global
    average pool → ``fc``. Attribute names are torchvision's (``layer1[0].downsample[0]``)."""

    def __init__(self, num_classes: int, in_channels: int, *, block: type, layers: Sequence[int],
                 conv: Conv, bn_eps: float, factorize_first: bool, rngs: nnx.Rngs):
        stem = conv if factorize_first else nnx.Conv
        self.conv1 = stem(in_channels, 64, (7, 7), strides=2, padding=_pads(3), use_bias=False,
                          rngs=rngs)
        self.bn1 = _bn(64, bn_eps, rngs)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, planes, stride, conv=conv, bn_eps=bn_eps, rngs=rngs))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _max_pool(nnx.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for blk in getattr(self, name):
                x = blk(x)
        return self.fc(adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))


class TorchResNet18(_TorchResNet):
    """``torchvision.models.resnet18`` (BasicBlock, [2, 2, 2, 2]); 1.82 GMACs at 224×224.

    Example::

        model = TorchResNet18(1000, 3, rngs=nnx.Rngs(0))
        logits = model(jnp.zeros((1, 224, 224, 3)))
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, *, conv: Conv = nnx.Conv,
                 bn_eps: float = BN_EPS, factorize_first: bool = True, rngs: nnx.Rngs):
        super().__init__(num_classes, in_channels, block=BasicBlock, layers=(2, 2, 2, 2),
                         conv=conv, bn_eps=bn_eps, factorize_first=factorize_first, rngs=rngs)


class TorchResNet50(_TorchResNet):
    """``torchvision.models.resnet50`` (Bottleneck v1.5, [3, 4, 6, 3]); 4.1 GMACs at 224×224.

    Example::

        model = TorchResNet50(1000, 3, rngs=nnx.Rngs(0))
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, *, conv: Conv = nnx.Conv,
                 bn_eps: float = BN_EPS, factorize_first: bool = True, rngs: nnx.Rngs):
        super().__init__(num_classes, in_channels, block=Bottleneck, layers=(3, 4, 6, 3),
                         conv=conv, bn_eps=bn_eps, factorize_first=factorize_first, rngs=rngs)


# ---------------------------------------------------------------------------------- VGG

# torchvision's configuration "D": channels of the 3×3 convs, "M" a 2×2/2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class _TorchVGG(nnx.Module):
    """torchvision's ``VGG``: ``features`` (3×3 convs with bias, [BN,] ReLU, max-pools) →
    adaptive average pool to 7×7 → flatten (C, H, W) → Linear–ReLU–Linear–ReLU–Linear."""

    def __init__(self, num_classes: int, in_channels: int, *, batch_norm: bool, conv: Conv,
                 bn_eps: float, factorize_first: bool, rngs: nnx.Rngs):
        convs, bns, cin = [], [], in_channels
        for v in VGG16_CFG:
            if v == "M":
                continue
            make = conv if (convs or factorize_first) else nnx.Conv
            convs.append(make(cin, v, (3, 3), padding=_pads(1), use_bias=True, rngs=rngs))
            if batch_norm:
                bns.append(_bn(v, bn_eps, rngs))
            cin = v
        self.features = nnx.List(convs)
        self.features_bn = nnx.List(bns) if batch_norm else None
        self.classifier = nnx.List([
            nnx.Linear(cin * 7 * 7, 4096, rngs=rngs),
            nnx.Linear(4096, 4096, rngs=rngs),
            nnx.Linear(4096, num_classes, rngs=rngs),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        i = 0
        for v in VGG16_CFG:
            if v == "M":
                x = _max_pool(x, 2, 2, 0)
                continue
            x = self.features[i](x)
            if self.features_bn is not None:
                x = self.features_bn[i](x)
            x = nnx.relu(x)
            i += 1
        x = _nchw_flatten(adaptive_avg_pool(x, 7))
        x = nnx.relu(self.classifier[0](x))
        x = nnx.relu(self.classifier[1](x))
        return self.classifier[2](x)

    def torch_layers(self) -> dict[str, nnx.Module]:
        """torchvision's ``features.{i}`` of each conv (and BN), ``classifier.{0,3,6}``."""
        out, index, i = {}, 0, 0
        for v in VGG16_CFG:
            if v == "M":
                index += 1
                continue
            out[f"features.{index}"] = self.features[i]
            if self.features_bn is not None:
                out[f"features.{index + 1}"] = self.features_bn[i]
            index += 3 if self.features_bn is not None else 2  # conv, [BN,] ReLU
            i += 1
        for k, layer in zip((0, 3, 6), self.classifier, strict=True):
            out[f"classifier.{k}"] = layer
        return out


class TorchVGG16(_TorchVGG):
    """``torchvision.models.vgg16``; 15.5 GMACs at 224×224.

    Example::

        model = TorchVGG16(1000, 3, rngs=nnx.Rngs(0))
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, *, conv: Conv = nnx.Conv,
                 bn_eps: float = BN_EPS, factorize_first: bool = True, rngs: nnx.Rngs):
        super().__init__(num_classes, in_channels, batch_norm=False, conv=conv, bn_eps=bn_eps,
                         factorize_first=factorize_first, rngs=rngs)


class TorchVGG16BN(_TorchVGG):
    """``torchvision.models.vgg16_bn`` (a BatchNorm after every conv).

    Example::

        model = TorchVGG16BN(1000, 3, rngs=nnx.Rngs(0))
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, *, conv: Conv = nnx.Conv,
                 bn_eps: float = BN_EPS, factorize_first: bool = True, rngs: nnx.Rngs):
        super().__init__(num_classes, in_channels, batch_norm=True, conv=conv, bn_eps=bn_eps,
                         factorize_first=factorize_first, rngs=rngs)


# -------------------------------------------------------------------------- MobileNetV2

# (expansion t, channels c, repeats n, first stride s), Sandler et al. 2018, Table 2.
MOBILENET_V2_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)  # fmt: skip


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: the nearest multiple of 8, never 10 % below ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


class InvertedResidual(nnx.Module):
    """1×1 expand (if t ≠ 1) → BN → ReLU6 → depthwise 3×3 (stride) → BN → ReLU6 → 1×1 project
    → BN, + the input when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int, *, conv: Conv,
                 bn_eps: float, rngs: nnx.Rngs):
        hidden = int(round(cin * expand_ratio))
        self.use_residual = stride == 1 and cin == cout
        if expand_ratio != 1:
            self.expand = conv(cin, hidden, (1, 1), padding=_pads(0), use_bias=False, rngs=rngs)
            self.expand_bn = _bn(hidden, bn_eps, rngs)
        else:
            self.expand = self.expand_bn = None
        # Part of the architecture, already the cheap stage of a factorization: not factorized.
        self.depthwise = nnx.Conv(
            hidden, hidden, (3, 3), strides=stride, padding=_pads(1), feature_group_count=hidden,
            use_bias=False, conv_general_dilated=ops.conv_general_dilated, rngs=rngs,
        )
        self.depthwise_bn = _bn(hidden, bn_eps, rngs)
        self.project = conv(hidden, cout, (1, 1), padding=_pads(0), use_bias=False, rngs=rngs)
        self.project_bn = _bn(cout, bn_eps, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        if self.expand is not None:
            y = _relu6(self.expand_bn(self.expand(y)))
        y = _relu6(self.depthwise_bn(self.depthwise(y)))
        y = self.project_bn(self.project(y))
        return x + y if self.use_residual else y

    def torch_layers(self, prefix: str) -> dict[str, nnx.Module]:
        """``{prefix}.conv.…`` as torchvision numbers the block's ``Sequential``."""
        out, k = {}, 0
        if self.expand is not None:
            out |= {f"{prefix}.conv.0.0": self.expand, f"{prefix}.conv.0.1": self.expand_bn}
            k = 1
        return out | {
            f"{prefix}.conv.{k}.0": self.depthwise, f"{prefix}.conv.{k}.1": self.depthwise_bn,
            f"{prefix}.conv.{k + 1}": self.project, f"{prefix}.conv.{k + 2}": self.project_bn,
        }


class TorchMobileNetV2(nnx.Module):
    """``torchvision.models.mobilenet_v2`` (Sandler et al. 2018); 300 MMACs at 224×224.

    Through ``conv`` go the 3×3/2 stem (unless ``factorize_first=False``), every 1×1 expand and
    project conv and the last 1×1 conv; the depthwise 3×3 convs stay grouped ``nnx.Conv``.

    Example::

        model = TorchMobileNetV2(1000, 3, rngs=nnx.Rngs(0))
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, *, conv: Conv = nnx.Conv,
                 width_mult: float = 1.0, bn_eps: float = BN_EPS, factorize_first: bool = True,
                 rngs: nnx.Rngs):
        stem = conv if factorize_first else nnx.Conv
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        self.stem = stem(in_channels, cin, (3, 3), strides=2, padding=_pads(1), use_bias=False,
                         rngs=rngs)
        self.stem_bn = _bn(cin, bn_eps, rngs)
        blocks = []
        for t, c, n, s in MOBILENET_V2_CFG:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, conv=conv,
                                               bn_eps=bn_eps, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.last = conv(cin, last, (1, 1), padding=_pads(0), use_bias=False, rngs=rngs)
        self.last_bn = _bn(last, bn_eps, rngs)
        self.classifier = nnx.Linear(last, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _relu6(self.stem_bn(self.stem(x)))
        for blk in self.blocks:
            x = blk(x)
        x = _relu6(self.last_bn(self.last(x)))
        return self.classifier(adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))

    def torch_layers(self) -> dict[str, nnx.Module]:
        """``features.0`` stem, ``features.1…17`` blocks, ``features.18`` last conv,
        ``classifier.1`` (after the dropout)."""
        out = {"features.0.0": self.stem, "features.0.1": self.stem_bn}
        for i, blk in enumerate(self.blocks, start=1):
            out |= blk.torch_layers(f"features.{i}")
        n = len(self.blocks) + 1
        return out | {f"features.{n}.0": self.last, f"features.{n}.1": self.last_bn,
                      "classifier.1": self.classifier}


# ------------------------------------------------------------------------ torch naming


def torch_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every conv, BatchNorm and linear layer of ``model`` by its PyTorch state-dict prefix.

    Models with torchvision's own numbering (VGG, MobileNetV2) say it themselves
    (``model.torch_layers()``); for the others (ResNet, ``cnn``) the prefix is the module path
    joined by dots, which is what ``nn.Module`` names the same tree. Converted layers
    (``FactorizedConv``) are listed under the name of the conv they replaced.

    Example::

        torch_layers(TorchResNet18(rngs=nnx.Rngs(0)))["layer2.0.downsample.0"]  # an nnx.Conv
    """
    if hasattr(model, "torch_layers"):
        return model.torch_layers()
    from factorize.layers import FactorizedConv

    kinds = (nnx.Conv, nnx.BatchNorm, nnx.Linear, FactorizedConv)
    return {
        ".".join(str(k) for k in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, kinds) and path
    }


# A torch array is the NNX variable's value transposed by these axes (None: as it is).
_HWIO_TO_OIHW = (3, 2, 0, 1)
_IN_OUT_TO_OUT_IN = (1, 0)

TorchVariable = tuple[nnx.Variable, tuple[int, ...] | None]


def layer_variables(prefix: str, layer: nnx.Module) -> dict[str, TorchVariable]:
    """The state-dict entries of one ``nnx.Conv``, ``nnx.Linear`` or ``nnx.BatchNorm``:
    ``{f"{prefix}.weight": (variable, axes), ...}``, the torch array being the variable's value
    transposed by ``axes`` (OIHW conv weights, ``(out, in)`` linear weights).

    Example::

        layer_variables("fc", nnx.Linear(512, 10, rngs=nnx.Rngs(0)))  # fc.weight, fc.bias
    """
    if isinstance(layer, nnx.BatchNorm):
        names = {"weight": layer.scale, "bias": layer.bias, "running_mean": layer.mean,
                 "running_var": layer.var}
        return {f"{prefix}.{k}": (v, None) for k, v in names.items()}
    if isinstance(layer, nnx.Conv | nnx.Linear):
        axes = _HWIO_TO_OIHW if isinstance(layer, nnx.Conv) else _IN_OUT_TO_OUT_IN
        out = {f"{prefix}.weight": (layer.kernel, axes)}
        if layer.bias is not None:
            out[f"{prefix}.bias"] = (layer.bias, None)
        return out
    raise TypeError(f"{prefix}: no PyTorch state-dict layout for {type(layer).__name__}")
