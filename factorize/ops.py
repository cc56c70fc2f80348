"""The conv primitive every chain stage runs through.

All stages of all families call :func:`conv`, so a faster implementation of a stage type
(depthwise, pointwise, grouped) plugs in here once for every family.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    groups: int = 1,
    strides: tuple[int, int] = (1, 1),
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
    dilation: tuple[int, int] = (1, 1),
) -> jax.Array:
    """NHWC × HWIO convolution with explicit padding; equal to ``lax.conv_general_dilated``."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


# Which implementation `conv` uses; scoped by a context manager, never changed at import.
_IMPLEMENTATION: contextvars.ContextVar[str] = contextvars.ContextVar(
    "factorize_conv_implementation", default="auto"
)
IMPLEMENTATIONS = ("auto", "lax")


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    """Within the block (at trace time), stages run with implementation ``name``."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    token = _IMPLEMENTATION.set(name)
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)


def reference_implementation() -> contextlib.AbstractContextManager[None]:
    """Stages run as plain ``lax.conv_general_dilated`` (what :func:`count_macs` traces)."""
    return implementation("lax")
