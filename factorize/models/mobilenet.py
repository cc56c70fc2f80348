"""MobileNet v1 (Howard et al. 2017) for 32×32 inputs (CIFAR variant: stride-1 stem)."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from factorize import ops

# (out_channels, stride) of the 13 depthwise-separable blocks; the CIFAR variant keeps the
# paper's channel plan and drops the stem stride, so 32×32 ends at 2×2.
MOBILENET_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


def _scaled(c: int, alpha: float) -> int:
    return max(1, int(round(c * alpha)))


class DepthwiseSeparable(nnx.Module):
    """depthwise 3×3 (plain ``nnx.Conv`` with ``feature_group_count``) → BN → ReLU →
    pointwise 1×1 (through ``conv``) → BN → ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, *, conv: Callable, rngs: nnx.Rngs):
        # The depthwise conv is part of the architecture, already structured: not factorizable.
        # It runs through factorize.ops (shifted multiply-adds on CPU; XLA's grouped conv is
        # hundreds of times slower there, docs/design.md, "Fast paths on CPU").
        self.depthwise = nnx.Conv(
            cin, cin, (3, 3), strides=stride, feature_group_count=cin, use_bias=False,
            conv_general_dilated=ops.conv_general_dilated, rngs=rngs,
        )
        self.bn1 = nnx.BatchNorm(cin, momentum=0.9, rngs=rngs)
        self.pointwise = conv(cin, cout, (1, 1), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.depthwise(x)))
        return nnx.relu(self.bn2(self.pointwise(x)))


class MobileNet(nnx.Module):
    """MobileNet v1 with width multiplier ``alpha``.

    Through ``conv`` go the full convs: the 3×3 stem (unless ``factorize_first=False``) and the
    13 pointwise 1×1 convs (≈95% of the MACs; a low-rank 1×1 is a bottleneck). The depthwise
    3×3 convs are plain grouped ``nnx.Conv``: they already are the cheap stage of a factorization.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        conv: Callable[..., nnx.Module] = nnx.Conv,
        alpha: float = 1.0,
        factorize_first: bool = True,
        rngs: nnx.Rngs,
    ):
        stem = conv if factorize_first else nnx.Conv
        cin = _scaled(32, alpha)
        self.stem = stem(in_channels, cin, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(cin, momentum=0.9, rngs=rngs)
        blocks = []
        for c, s in MOBILENET_BLOCKS:
            cout = _scaled(c, alpha)
            blocks.append(DepthwiseSeparable(cin, cout, s, conv=conv, rngs=rngs))
            cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))
