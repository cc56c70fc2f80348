"""MAC counting: the conventional formula, any JAX function's jaxpr, and XLA's own count.

Conventions (docs/design.md): one MAC is one multiply-accumulate, FLOPs = 2 × MACs. The
*conventional* count (MobileNet, Howard et al. 2017, eq. 1–2) is
``output positions × kernel taps × in-channels-per-group × out-channels``, padding taps included.
XLA's ``cost_analysis()`` counts only taps that land inside the input; ``count_padding=False``
gives that count, so the two can be checked against each other.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax

from factorize._checks import Padding, normalize_padding, pair


def _axis_counts(
    n: int, k: int, stride: int, pad: tuple[int, int], dilation: int
) -> tuple[int, int]:
    """(output length, number of (output, tap) pairs whose tap lies inside the input)."""
    out = (n + pad[0] + pad[1] - (k - 1) * dilation - 1) // stride + 1
    if out < 1:
        raise ValueError(
            f"input length {n} is too small for kernel {k} (dilation {dilation}, padding {pad})"
        )
    inside = sum(
        1
        for o in range(out)
        for t in range(k)
        if 0 <= o * stride + t * dilation - pad[0] < n
    )
    return out, inside


def conv_macs(
    kernel_shape: Sequence[int],
    input_hw: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    dilation: int | Sequence[int] = 1,
    *,
    groups: int = 1,
    count_padding: bool = True,
    return_output_hw: bool = False,
) -> int | tuple[int, tuple[int, int]]:
    """Conventional MACs of one conv on one image.

    Args:
      kernel_shape: ``(kh, kw, C // groups, N)`` (HWIO).
      input_hw: input height and width (an int for square inputs).
      strides: the conv's strides (an int or a pair), as for ``nnx.Conv``.
      padding: ``"SAME"``, ``"VALID"`` or explicit ``((lo, hi), (lo, hi))`` pairs, as for
        ``lax.conv_general_dilated``.
      dilation: the kernel dilation (an int or a pair).
      groups: ``feature_group_count``.
      count_padding: count taps that fall on padding (the papers' convention, default) or not
        (XLA's ``cost_analysis`` convention).
      return_output_hw: also return the output's ``(height, width)``.

    Example::

        # a 6×6×3 input, five 3×3×3 filters, VALID: 4×4 outputs × 27 taps·channels × 5
        factorize.conv_macs((3, 3, 3, 5), 6, padding="VALID")                       # 2160
        factorize.conv_macs((3, 3, 3, 5), 6)                                        # 4860
        factorize.conv_macs((3, 3, 3, 5), 6, count_padding=False)                   # 3840
        factorize.conv_macs((3, 3, 3, 5), 6, strides=2, return_output_hw=True)      # (1215, (3, 3))
    """
    if len(kernel_shape) != 4:
        raise ValueError(f"kernel_shape must be (kh, kw, C, N), got {tuple(kernel_shape)}")
    kh, kw, cin_g, cout = (int(s) for s in kernel_shape)
    hw = pair(input_hw, "input_hw")
    strides, dilation = pair(strides, "strides"), pair(dilation, "dilation")
    pads = normalize_padding(padding, hw, (kh, kw), strides, dilation)
    (oh, inside_h), (ow, inside_w) = (
        _axis_counts(hw[a], (kh, kw)[a], strides[a], pads[a], dilation[a]) for a in (0, 1)
    )
    taps_positions = oh * ow * kh * kw if count_padding else inside_h * inside_w
    macs = taps_positions * cin_g * cout
    del groups  # cin_g is already per group; the count does not depend on the group count
    return (macs, (oh, ow)) if return_output_hw else macs


def _eqn_macs(eqn) -> int:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec
        taps = math.prod(rhs[d] for d in rhs_spec[2:])
        out = math.prod(eqn.outvars[0].aval.shape)
        return out * taps * rhs[rhs_spec[1]]
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = math.prod(eqn.outvars[0].aval.shape)
        return out * math.prod(lhs[d] for d in lhs_contract)
    return 0


def _sub_jaxprs(value: Any):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        name = eqn.primitive.name
        if name == "cond":
            total += max(_jaxpr_macs(j) for j in _sub_jaxprs(eqn.params["branches"]))
            continue
        inner = sum(_jaxpr_macs(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
        if name == "scan":
            inner *= eqn.params["length"]
        elif name == "while" and inner:
            warnings.warn(
                "count_macs: a while_loop's trip count is unknown; its body is counted once",
                stacklevel=3,
            )
        total += inner
    return total


def count_macs(fn: Callable, *args, **kwargs) -> int:
    """Conventional MACs of every convolution and matmul that ``fn(*args, **kwargs)`` runs.

    Traces ``fn`` to a jaxpr (nothing is executed) and adds up each ``conv_general_dilated``
    (any ``feature_group_count``, stride, padding, dilation; padding taps included) and each
    ``dot_general`` (``einsum``, ``@``, ``nnx.Linear``), descending into ``jit``, ``scan``
    (× its length), ``cond`` (its costliest branch), ``remat`` and custom-derivative calls. Works
    on any JAX function, including an NNX model's forward pass (``count_macs(model, x)``).
    The count is for the arguments as given, i.e. for the whole batch.

    factorize's fast stage implementations are traced as the convolutions they compute, so
    chains count the same whichever implementation runs.

    Example::

        # the depthwise-separable version of five 3×3×3 filters on a 6×6×3 input, VALID:
        # depthwise 16·9·3 = 432 plus pointwise 16·3·5 = 240
        layer = factorize.FactorizedConv(3, 5, (3, 3), family="dsc", rank=1, padding="VALID",
                                         use_bias=False, rngs=nnx.Rngs(0))
        factorize.count_macs(layer, jnp.ones((1, 6, 6, 3)))                         # 672
        factorize.count_macs(lambda a, b: a @ b, jnp.ones((4, 8)), jnp.ones((8, 3)))  # 96
    """
    from flax import nnx

    from factorize import ops

    if isinstance(fn, nnx.Module):
        # Trace a merged copy: a module in training mode (BatchNorm statistics) must not keep
        # tracers from this trace in its state.
        graphdef, state = nnx.split(fn)

        def fn(state, *args, **kwargs):
            return nnx.merge(graphdef, state)(*args, **kwargs)

        args = (state, *args)
    with ops.reference_implementation():
        closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return _jaxpr_macs(closed.jaxpr)


def xla_flops(fn: Callable, *args, **kwargs) -> float:
    """XLA's FLOP count of ``fn(*args)`` from ``jit(fn).lower(...).cost_analysis()``.

    The count is taken before optimisation: exact for convs and matmuls (2 × MACs, padding
    taps excluded) and it includes elementwise work (bias adds, activations). Like
    :func:`count_macs`, ``fn`` is traced with factorize's reference implementation, so its
    convolutions are counted as convolutions (the CPU fast path's shifted multiply-adds would
    count as elementwise work).

    Example::

        w = jnp.ones((3, 3, 3, 5))
        conv = lambda x: jax.lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        factorize.xla_flops(conv, jnp.ones((1, 6, 6, 3)))    # 4320.0 = 2 × 2160 MACs
    """
    from factorize import ops

    with ops.reference_implementation():
        cost = jax.jit(fn).lower(*args, **kwargs).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])
