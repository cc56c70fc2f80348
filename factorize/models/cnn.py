"""Small CNN for 8×8 digits and 28×28 Fashion-MNIST: three 3×3 convs, BatchNorm, global pool."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx


class CNN(nnx.Module):
    """conv3×3(w0) → conv3×3/2(w1) → conv3×3/2(w2), each followed by BatchNorm and ReLU, then
    global average pooling and a linear classifier.

    Every conv goes through ``conv`` (``nnx.Conv``'s signature), so the same network can be built
    with any factorized family. Global pooling makes it input-size agnostic (8×8 or 28×28).
    ``factorize_first=False`` keeps the first conv full, as MobileNet does: with one input channel
    most families cannot reduce it anyway.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        conv: Callable[..., nnx.Module] = nnx.Conv,
        widths: Sequence[int] = (32, 64, 128),
        factorize_first: bool = True,
        rngs: nnx.Rngs,
    ):
        w0, w1, w2 = widths
        first = conv if factorize_first else nnx.Conv
        # No conv bias: the following BatchNorm's shift makes it redundant.
        self.conv1 = first(in_channels, w0, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(w0, momentum=0.9, rngs=rngs)
        self.conv2 = conv(w0, w1, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(w1, momentum=0.9, rngs=rngs)
        self.conv3 = conv(w1, w2, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn3 = nnx.BatchNorm(w2, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(w2, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        x = nnx.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean(axis=(1, 2)))
