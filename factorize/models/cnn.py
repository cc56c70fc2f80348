"""Small CNN for 8×8 digits and 28×28 Fashion-MNIST: 3×3 convs, BatchNorm, global pool."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx


class CNN(nnx.Module):
    """``conv1 … convL`` (3×3, widths ``widths``, strides ``strides``), each followed by
    BatchNorm and ReLU, then global average pooling and a linear classifier ``head``.

    The default is three convs: conv3×3(32) → conv3×3/2(64) → conv3×3/2(128). Every conv goes
    through ``conv`` (``nnx.Conv``'s signature), so the same network can be built with any
    factorized family. Global pooling makes it input-size agnostic (8×8 or 28×28).
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
        strides: Sequence[int] | None = None,
        factorize_first: bool = True,
        rngs: nnx.Rngs,
    ):
        widths = [int(w) for w in widths]
        strides = [1] + [2] * (len(widths) - 1) if strides is None else [int(s) for s in strides]
        if not widths or len(strides) != len(widths):
            raise ValueError(
                f"widths and strides must be non-empty and of equal length, got widths={widths}, "
                f"strides={strides}"
            )
        self.depth = len(widths)
        c_in = in_channels
        for i, (width, stride) in enumerate(zip(widths, strides, strict=True), start=1):
            make = conv if (i > 1 or factorize_first) else nnx.Conv
            # No conv bias: the following BatchNorm's shift makes it redundant.
            layer = make(c_in, width, (3, 3), strides=stride, use_bias=False, rngs=rngs)
            setattr(self, f"conv{i}", layer)
            setattr(self, f"bn{i}", nnx.BatchNorm(width, momentum=0.9, rngs=rngs))
            c_in = width
        self.head = nnx.Linear(c_in, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(1, self.depth + 1):
            x = nnx.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.head(x.mean(axis=(1, 2)))
