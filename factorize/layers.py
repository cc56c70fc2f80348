"""Flax NNX layers: a factorized conv for every family, a drop-in for ``nnx.Conv``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from factorize._checks import Padding, pair
from factorize.factorized import Factorized, random_factorized
from factorize.families import RankArg

_ZEROS = nnx.initializers.zeros_init()


class FactorizedConv(nnx.Module):
    """A conv whose kernel is a family's chain of stage kernels (NHWC in, NHWC out).

    Takes ``nnx.Conv``'s arguments, so a model built with a ``conv`` factory can be built full or
    factorized. Fresh factors are LeCun-normal per stage (each stage initialised over its own
    fan-in, as when training MobileNet from scratch); :meth:`from_factorized` builds the layer
    from converted weights instead. The bias sits on the last stage only.

    Example::

        layer = factorize.FactorizedConv(64, 128, (3, 3), family="dsc", rank=1,
                                         rngs=nnx.Rngs(0))
        y = layer(jnp.ones((2, 16, 16, 64)))       # (2, 16, 16, 128)
        layer.macs(32)                             # 32·32·(9·64 + 64·128) MACs per image
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        family: str = "full",
        rank: RankArg = "full",
        strides: int | Sequence[int] = 1,
        padding: Padding = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        bias_init: Callable = _ZEROS,
        rngs: nnx.Rngs,
    ):
        if feature_group_count != 1:
            raise ValueError(
                f"feature_group_count must be 1 for a factorized conv (a grouped conv is already "
                f"structured; build it with nnx.Conv), got {feature_group_count}"
            )
        kh, kw = pair(kernel_size, "kernel_size")
        shape = (kh, kw, int(in_features), int(out_features))
        value = random_factorized(rngs.params(), shape, family, rank, dtype=param_dtype)
        bias = bias_init(rngs.params(), (out_features,), param_dtype) if use_bias else None
        self._setup(value, bias, strides, padding, kernel_dilation, dtype)

    def _setup(self, value: Factorized, bias, strides, padding, kernel_dilation, dtype) -> None:
        self.family = value.family
        self.rank = value.rank
        self.kernel_shape = value.kernel_shape
        self.in_features, self.out_features = value.kernel_shape[2:]
        self.kernel_size = value.kernel_shape[:2]
        self.strides = pair(strides, "strides")
        self.padding = padding
        self.kernel_dilation = pair(kernel_dilation, "kernel_dilation")
        self.dtype = dtype
        self.factors = nnx.List([nnx.Param(f) for f in value.factors])
        self.bias = nnx.Param(bias) if bias is not None else None

    @classmethod
    def from_factorized(
        cls,
        value: Factorized,
        *,
        bias: jax.Array | None = None,
        strides: int | Sequence[int] = 1,
        padding: Padding = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        dtype: Any = None,
    ) -> FactorizedConv:
        """The layer holding ``value``'s factors (e.g. from :func:`factorize.decompose`)."""
        if bias is not None:
            bias = jnp.asarray(bias)
            if bias.shape != (value.kernel_shape[3],):
                raise ValueError(
                    f"bias must have shape ({value.kernel_shape[3]},), got {tuple(bias.shape)}"
                )
        kh, kw, c, n = value.kernel_shape
        # Built through __init__ (abstractly: no random init runs) so NNX registers the
        # module; its placeholder factors are then replaced.
        layer = nnx.eval_shape(
            lambda: cls(
                c, n, (kh, kw), family=value.family, rank=value.rank, use_bias=bias is not None,
                rngs=nnx.Rngs(0),
            )
        )
        layer._setup(value, bias, strides, padding, kernel_dilation, dtype)
        return layer

    @property
    def use_bias(self) -> bool:
        return self.bias is not None

    def to_factorized(self) -> Factorized:
        """The layer's factors as a :class:`Factorized` value."""
        return Factorized(
            self.family, self.rank, self.kernel_shape, [p[...] for p in self.factors]
        )

    def macs(self, input_hw: int | Sequence[int]) -> int:
        """Conventional MACs on one image (bias adds not counted)."""
        return self.to_factorized().macs(
            input_hw, self.strides, self.padding, self.kernel_dilation
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        x, bias, *factors = dtypes.promote_dtype(
            (x, bias, *[p[...] for p in self.factors]), dtype=self.dtype
        )
        value = Factorized(self.family, self.rank, self.kernel_shape, factors)
        y = value(x, self.strides, self.padding, self.kernel_dilation)
        return y + bias if bias is not None else y


class FactorizedLinear(FactorizedConv):
    """A dense layer ``(..., C) → (..., N)`` held as a family's chain of a 1×1 kernel.

    A linear layer is a 1×1 conv (docs/design.md), so ``lowrank_in`` / ``lowrank_out`` give the
    rank-R bottleneck C→R→N and ``tucker2`` a C→R1→R2→N chain. Built by
    :meth:`from_factorized` from a ``(1, 1, C, N)`` factorization, e.g. by ``factorize.convert``.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        y = super().__call__(x.reshape(-1, 1, 1, x.shape[-1]))
        return y.reshape(*lead, y.shape[-1])

    def macs(self, input_hw: int | Sequence[int] = 1) -> int:
        """MACs per input vector."""
        return super().macs(1)


def conv_factory(family: str = "full", rank: RankArg = "full") -> Callable[..., FactorizedConv]:
    """A ``conv`` factory with ``nnx.Conv``'s signature that builds ``family`` at ``rank``.

    ``model = make_model(..., conv=conv_factory("dsc", 1))`` builds the MobileNet version of an
    architecture; a float rank is a parameter fraction of each layer's full kernel.

    Example::

        from factorize.models import make_model

        conv = factorize.conv_factory("dsc", 1)
        layer = conv(16, 32, (3, 3), strides=2, rngs=nnx.Rngs(0))   # an nnx.Conv stand-in
        layer.macs(8)                          # 16·(9·16 + 16·32) = 10496 MACs per image
        model = make_model("cnn", num_classes=10, in_channels=1, conv=conv, rngs=nnx.Rngs(0))
        model.conv2.family, model.conv2.rank   # ('dsc', 1)
    """
    return functools.partial(FactorizedConv, family=family, rank=rank)
