"""ResNet-18 in the CIFAR layout (He et al. 2016): 3×3 stem, no max-pool, 4 stages of 2 blocks."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx


class BasicBlock(nnx.Module):
    """Two 3×3 convs with BatchNorm; a 1×1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, *, conv: Callable, rngs: nnx.Rngs):
        self.conv1 = conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.conv2 = conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        if stride != 1 or cin != cout:
            self.shortcut = conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            self.shortcut_bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        else:
            self.shortcut = None
            self.shortcut_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return nnx.relu(y + s)


class ResNet18(nnx.Module):
    """ResNet-18 for 32×32 inputs. ``width`` scales the stage widths (64, 128, 256, 512 at 64).

    Every conv (stem, block convs, projection shortcuts) goes through ``conv``;
    ``factorize_first=False`` keeps the stem full.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        conv: Callable[..., nnx.Module] = nnx.Conv,
        width: int = 64,
        factorize_first: bool = True,
        rngs: nnx.Rngs,
    ):
        stem = conv if factorize_first else nnx.Conv
        self.stem = stem(in_channels, width, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        blocks = []
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            for j in range(2):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, conv=conv, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))
