"""Argument checks shared by the public functions: each error names the argument, what was
expected and what came."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax import lax

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair of positive ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = (int(value), int(value))
    elif isinstance(value, Sequence) and len(value) == 2:
        out = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out


def normalize_padding(
    padding: Padding,
    input_hw: Sequence[int],
    kernel_hw: Sequence[int],
    strides: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Padding as explicit ``((top, bottom), (left, right))``, the way ``lax`` resolves it.

    Accepts ``"SAME"``, ``"VALID"``, an int (same on every side), a pair of ints (per axis) or a
    pair of ``(low, high)`` pairs (the ``nnx.Conv`` forms).
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
        eff = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation, strict=True)]
        pads = lax.padtype_to_pads(tuple(input_hw), eff, strides, mode)
        return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
    if isinstance(padding, (int, np.integer)):
        return ((int(padding),) * 2,) * 2  # type: ignore[return-value]
    try:
        items = list(padding)
        if len(items) == 2 and all(isinstance(p, (int, np.integer)) for p in items):
            return tuple((int(p), int(p)) for p in items)  # type: ignore[return-value]
        if len(items) == 2 and all(len(p) == 2 for p in items):
            return tuple((int(lo), int(hi)) for lo, hi in items)  # type: ignore[return-value]
    except TypeError:
        pass
    raise ValueError(
        f"padding must be 'SAME', 'VALID', an int, a pair of ints or a pair of (low, high) "
        f"pairs, got {padding!r}"
    )


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_kernel(kernel, name: str = "kernel", layout: str = "HWIO") -> jax.Array:
    """A 4-D finite float kernel in HWIO, transposed from OIHW if ``layout='OIHW'``."""
    import jax.numpy as jnp

    layout_u = str(layout).upper()
    if layout_u not in ("HWIO", "OIHW"):
        raise ValueError(f"layout must be 'HWIO' or 'OIHW', got {layout!r}")
    shape = getattr(kernel, "shape", None)
    if shape is None:
        kernel = np.asarray(kernel)
        shape = kernel.shape
    if len(shape) != 4:
        expected = "(kh, kw, C, N)" if layout_u == "HWIO" else "(N, C, kh, kw)"
        raise ValueError(
            f"{name} must be 4-D {expected} in {layout_u} layout, got shape {tuple(shape)}"
        )
    if min(shape) < 1:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(shape)}")
    kernel = jnp.asarray(kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        kernel = kernel.astype(jnp.float32)
    if layout_u == "OIHW":
        kernel = kernel.transpose(2, 3, 1, 0)
    if is_concrete(kernel):
        finite = np.isfinite(np.asarray(kernel))
        if not finite.all():
            bad = int(finite.size - finite.sum())
            raise ValueError(
                f"{name} must be finite, got {bad} NaN/Inf entries of {finite.size}"
            )
    return kernel
