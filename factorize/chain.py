"""A chain of linear convs: the one shared machinery behind every family.

Every efficient conv block in this library is a sequence of convs with no nonlinearity in
between (docs/design.md). This module holds the three things all families share:

* :func:`compose` — the stage kernels composed into the one full kernel ``(kh, kw, C, N)``;
* :func:`chain_macs` / :func:`chain_params` — conventional MACs and parameter count;
* :func:`run_chain` — the forward pass, stage by stage (never via the composed kernel).

Convention (docs/design.md): every spatial axis is *owned* by exactly one stage, which carries that
axis' stride, padding and dilation; all other stages are 1-wide along it and run with stride 1
and no padding. A 1×1 stage before the strided stage therefore runs at the input resolution.
Because at most one stage has extent along each axis, the composed kernel is a plain product
along that axis, and the chain with the full conv's padding equals the full conv.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from factorize import ops
from factorize._checks import Padding, normalize_padding, pair
from factorize.costs import conv_macs

KernelShape = tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One conv of a chain.

    Attributes:
      shape: the stage kernel ``(kh, kw, in_channels // groups, out_channels)`` (HWIO).
      groups: ``feature_group_count`` of the conv (``in_channels`` for depthwise).
      owns: ``(owns_h, owns_w)``, whether this stage carries the stride, padding and dilation
        of the height / width axis.

    Example::

        st = factorize.Stage((3, 3, 1, 64), groups=64, owns=(True, True))
        st.kind, st.in_channels, st.params          # ('depthwise', 64, 576)
        factorize.get_family("dsc").chain((3, 3, 64, 128), 1)   # (depthwise, pointwise)
    """

    shape: KernelShape
    groups: int = 1
    owns: tuple[bool, bool] = (False, False)

    @property
    def in_channels(self) -> int:
        return self.shape[2] * self.groups

    @property
    def out_channels(self) -> int:
        return self.shape[3]

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    @property
    def kind(self) -> str:
        kh, kw, cin_g, cout = self.shape
        if kh == kw == 1:
            return "pointwise" if self.groups == 1 else "grouped pointwise"
        if self.groups == 1:
            return "dense"
        if cin_g == 1:
            return "depthwise"
        return "grouped"


Chain = tuple[Stage, ...]


def check_chain(stages: Sequence[Stage], kernel_shape: KernelShape) -> None:
    """Raises if ``stages`` is not a well-formed chain for a kernel of ``kernel_shape``."""
    kh, kw, c, n = kernel_shape
    channels = c
    for i, st in enumerate(stages):
        if st.in_channels != channels:
            raise ValueError(
                f"stage {i} takes {st.in_channels} channels, previous gives {channels}"
            )
        if st.out_channels % st.groups:
            raise ValueError(f"stage {i}: {st.out_channels} outputs not divisible by {st.groups}")
        channels = st.out_channels
    if channels != n:
        raise ValueError(f"chain ends with {channels} channels, kernel has N={n}")
    for axis, extent in ((0, kh), (1, kw)):
        owners = [st for st in stages if st.owns[axis]]
        if len(owners) != 1:
            raise ValueError(f"axis {axis} must be owned by exactly one stage, got {len(owners)}")
        if any(st.shape[axis] != 1 for st in stages if not st.owns[axis]):
            raise ValueError(f"only the owning stage may have extent along axis {axis}")
        if owners[0].shape[axis] != extent:
            raise ValueError(f"owning stage has extent {owners[0].shape[axis]} != {extent}")


def chain_params(stages: Sequence[Stage]) -> int:
    """Number of factor entries of the chain (biases excluded)."""
    return sum(st.params for st in stages)


def _stage_geometry(
    st: Stage, strides: tuple[int, int], pads, dilation: tuple[int, int]
) -> tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]], tuple[int, int]]:
    """The stride, explicit padding and dilation a stage runs with (non-owned axes: identity)."""
    s = tuple(strides[a] if st.owns[a] else 1 for a in (0, 1))
    p = tuple(pads[a] if st.owns[a] else (0, 0) for a in (0, 1))
    d = tuple(dilation[a] if st.owns[a] else 1 for a in (0, 1))
    return s, p, d


def chain_macs(
    stages: Sequence[Stage],
    input_hw: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    dilation: int | Sequence[int] = 1,
    *,
    count_padding: bool = True,
) -> int:
    """Conventional MACs of the chain on one ``input_hw`` image (docs/design.md, Conventions).

    Each stage counts ``output positions × taps × in-channels-per-group × out-channels`` at the
    resolution it actually runs at. ``count_padding=False`` counts only taps that land inside the
    input, which is what XLA's ``cost_analysis()`` reports (as FLOPs = 2 × MACs).
    """
    hw = pair(input_hw, "input_hw")
    strides, dilation = pair(strides, "strides"), pair(dilation, "dilation")
    kernel_hw = _chain_extent(stages)
    pads = normalize_padding(padding, hw, kernel_hw, strides, dilation)
    return sum(macs for _, macs, _ in _stage_costs(stages, hw, strides, pads, dilation,
                                                   count_padding))


def _stage_costs(stages, hw, strides, pads, dilation, count_padding: bool = True):
    """``(stage, MACs per image, output (height, width))`` of each stage, in order, each run at
    the resolution the previous one produced."""
    for st in stages:
        s, p, d = _stage_geometry(st, strides, pads, dilation)
        macs, hw = conv_macs(
            st.shape, hw, s, p, d, groups=st.groups, count_padding=count_padding,
            return_output_hw=True,
        )
        yield st, macs, hw


def _chain_extent(stages: Sequence[Stage]) -> tuple[int, int]:
    return (
        max(st.shape[0] for st in stages),
        max(st.shape[1] for st in stages),
    )


def run_chain(
    x: jax.Array,
    stages: Sequence[Stage],
    factors: Sequence[jax.Array],
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    dilation: int | Sequence[int] = 1,
) -> jax.Array:
    """Runs the chain on an NHWC batch, one conv per stage."""
    strides, dilation = pair(strides, "strides"), pair(dilation, "dilation")
    pads = normalize_padding(padding, x.shape[1:3], _chain_extent(stages), strides, dilation)
    layouts: dict[int, str] = {}
    fast = ops.current_implementation() == "fast"
    if fast:
        stages, factors = _merge_separable_depthwise(stages, factors)
        factors, layouts = _channel_major_layouts(stages, factors)

    def stage_fn(k: int):
        st, layout = stages[k], layouts.get(k)
        s, p, d = _stage_geometry(st, strides, pads, dilation)

        def fn(x, kernel):
            if layout == "inputs_major":
                return ops.grouped_inputs_major(x, kernel, s, p, d)
            if layout == "multiplier_major":
                return ops.depthwise_multiplier_major(x, kernel, s, p, d)
            return ops.conv(x, kernel, groups=st.groups, strides=s, padding=p, dilation=d)

        return fn

    fns = [stage_fn(k) for k in range(len(stages))]
    if fast:
        chunk_inference = _chunk_inference(stages, x, strides, pads, dilation)
        chunk_training = _chunk_training(stages, x, strides, pads, dilation)
        if chunk_inference or chunk_training:
            return _in_batch_chunks(fns, x, factors, chunk_inference, chunk_training)
    return _run_stages(fns, x, factors)


def _run_stages(fns, x, factors):
    """Stage after stage: ``fns[k](x, factors[k])``."""
    for fn, kernel in zip(fns, factors, strict=True):
        x = fn(x, kernel)
    return x


# Batch chunks of the chain's forward pass (inference) and backward pass (training), by bytes
# per image of the largest chunked array. C = 128 and 256, 32×32, batch 32, interleaved A/B:
# 2 MiB beat 4 and 8 for inference; for training 2 MiB was within noise of 1 MiB, and 4 and
# 8 MiB were slower (cp3 at C = 64, 32×32: 21, 21, 24, 37 ms).
_CHUNK_BYTES = 2 << 20


def _chunkable(stages, x) -> bool:
    """Neither pass is ever chunked for a single image or a chain with a dense stage (XLA's
    dense conv, and its gradients most of all, ran slower on chunks)."""
    return x.shape[0] > 1 and not any(st.kind == "dense" for st in stages)


def _large_intermediates(stages, x, strides, pads, dilation, *, at_least: int) -> bool:
    """Whether the chain's intermediate activations (every stage output but the last) take at
    least twice the input's bytes and at least ``at_least`` bytes."""
    intermediate = sum(
        x.shape[0] * math.prod(hw) * st.out_channels * x.dtype.itemsize
        for st, _, hw in _stage_costs(stages[:-1], x.shape[1:3], strides, pads, dilation)
    )
    return intermediate >= max(2 * x.size * x.dtype.itemsize, at_least)


def _chunk_inference(stages, x, strides, pads, dilation) -> bool:
    """Whether inference runs the whole chain over batch chunks (the intermediates of a chunk
    stay in cache and no full-batch intermediate is written, but each 1×1 stage becomes
    several smaller matmuls, slower per MAC). Measured (fast path, batch 32, 3×3, C = 64–256,
    16×16 and 32×32; interleaved A/B) it paid when the chain starts with a depthwise stage
    (dsc: C = 256, 32×32, rank 1 49 → 42 ms, rank 2 94 → 81 ms; never slower beyond noise) or
    when its intermediates are at least twice the input and over 24 MiB (cp3, cp4, bsconv at
    ≈ 1/4 of the MACs, C = 128, 32×32: 33–38 → 22–24 ms). It lost for cp3/cp4 with smaller
    intermediates (≈ 1/8 of the MACs: 11 → 13 ms) and for chains with a dense stage
    (tucker2: 38 → 42 ms), which are never chunked."""
    if not _chunkable(stages, x):
        return False
    if stages[0].kind == "depthwise":
        return True
    return _large_intermediates(stages, x, strides, pads, dilation, at_least=24 << 20)


def _chunk_training(stages, x, strides, pads, dilation) -> bool:
    """Whether the backward pass runs over batch chunks: the forward pass keeps every stage's
    input, then each chunk's cotangent goes back through all the stages, so no full-batch
    cotangent of an intermediate is written and a step needs less scratch memory.

    Measured (training steps, batch 32, interleaved A/B, YNNPACK off): cp3 and cp4 at ≈ 1/4
    of the MACs, C = 64, 32×32, 28 → 21 ms (XLA's scratch 36 → 24 MB; glibc serves a block
    over 32 MiB by a fresh mmap each step: ~9000 page faults, ~10 ms here); cp3 at C = 256,
    16×16 42 → 35 ms; bsconv at C = 128, 32×32 70 → 67 ms. It lost with small intermediates
    (cp4 at C = 128, 16×16, 9 MB: 10.9 → 12.4 ms) and for depthwise-first chains (dsc at
    C = 256, 32×32: 91 → 98 ms); chains with a dense stage were 20–50× slower (XLA's conv
    gradients over small batches). Those run whole."""
    if not _chunkable(stages, x) or stages[0].kind == "depthwise":
        return False
    return _large_intermediates(stages, x, strides, pads, dilation, at_least=16 << 20)


def _in_batch_chunks(fns, x, factors, chunk_inference: bool, chunk_training: bool):
    """The chain of stage functions ``fns`` with its undifferentiated forward pass
    (``chunk_inference``) and/or its backward pass (``chunk_training``) over batch chunks.

    A ``custom_vjp``. The primal rule is inference. The forward rule keeps every stage's input:
    it runs the stages whole when the backward pass is chunked (cp3 at ≈ 1/4, C = 128, 32×32:
    87 → 102 ms with a chunked forward) and over batch chunks otherwise — the chunked inference
    that also writes out each intermediate (dsc's training steps, YNNPACK off, interleaved A/B:
    C = 128, 32×32, rank 2 115 → 97–100 ms, rank 1 68 → 58–62 ms; C = 64, 32×32 22.4 → 20.5;
    C = 256 within noise). The backward rule pulls the cotangent back through every stage from
    those inputs, the whole batch at once or, with ``chunk_training``, chunk by chunk, summing
    the kernel gradients over the chunks."""
    run = functools.partial(_run_stages, fns)

    @jax.custom_vjp
    def chain(x, factors):
        if chunk_inference:
            return ops.batch_chunked_map(lambda xc: run(xc, factors), x,
                                         chunk_bytes=_CHUNK_BYTES)
        return run(x, factors)

    def with_inputs(x, factors):
        """(the inputs of stages 1…, the chain's output)."""
        inputs = []
        for fn, kernel in zip(fns, factors, strict=True):
            inputs.append(x)
            x = fn(x, kernel)
        return inputs[1:], x

    def forward(x, factors):
        if chunk_training:
            later, y = with_inputs(x, factors)
        else:
            later, y = ops.batch_chunked_map(lambda xc: with_inputs(xc, factors), x,
                                             chunk_bytes=_CHUNK_BYTES)
        return y, ([x, *later], factors)

    def backward(res, g):
        inputs, factors = res

        def stages_vjp(*arrays):
            *acts, gc = arrays
            grads = [None] * len(fns)
            for k in reversed(range(len(fns))):
                gc, grads[k] = jax.vjp(fns[k], acts[k], factors[k])[1](gc)
            return gc, grads

        if chunk_training:
            return ops.chunk_loop(stages_vjp, (*inputs, g), _CHUNK_BYTES)
        return stages_vjp(*inputs, g)

    chain.defvjp(forward, backward)
    return chain(x, list(factors))


def _channel_major_layouts(
    stages: Sequence[Stage], factors: Sequence[jax.Array]
) -> tuple[list[jax.Array], dict[int, str]]:
    """Channel orders that spare the fast path a transpose of the activations, paid for by
    permuting a neighbouring 1×1 kernel (a tiny array) instead:

    * a 1×1 stage followed by a grouped stage with ``I > 1`` inputs and one output per group
      (BSConv's ``r → 1``): the 1×1 kernel's output columns go from lax's ``g·I + i`` to
      ``i·G + g``, so the grouped stage reads each input slice contiguously
      (``"inputs_major"``, :func:`ops.grouped_inputs_major`);
    * a depthwise stage with multiplier ``m > 1`` followed by a 1×1 stage (``dsc`` with rank
      > 1): the depthwise kernel's columns and the 1×1 kernel's rows go from ``c·m + t`` to
      ``t·C + c`` (``"multiplier_major"``, :func:`ops.depthwise_multiplier_major`).

    Returns the new factors and the layout of each marked stage (by index)."""
    factors = list(factors)
    layouts = {}
    for k in range(1, len(stages)):
        a, b = stages[k - 1], stages[k]
        cin_g, cout = b.shape[2:]
        if (
            a.kind == "pointwise" and b.kind == "grouped" and cout == b.groups
            and ops.fast_kind(b.in_channels, b.shape, b.groups) == "shift"
        ):
            factors[k - 1] = transpose_channels(factors[k - 1], 3, b.groups, cin_g)
            layouts[k] = "inputs_major"
        if (
            a.kind == "depthwise" and a.shape[3] > a.groups and b.kind == "pointwise"
            and ops.fast_kind(a.in_channels, a.shape, a.groups) == "shift"
        ):
            m = a.shape[3] // a.groups
            factors[k - 1] = transpose_channels(factors[k - 1], 3, a.groups, m)
            factors[k] = transpose_channels(factors[k], 2, a.groups, m)
            layouts[k - 1] = "multiplier_major"
    return factors, layouts


def transpose_channels(a: jax.Array, axis: int, rows: int, cols: int) -> jax.Array:
    """``a`` with axis ``axis`` (of length ``rows·cols``) reordered so that index ``j·rows + i``
    holds what index ``i·cols + j`` held: a reshape and a transpose, which XLA keeps in the
    kernel's own layout (a gather made XLA:CPU lay a permuted depthwise kernel out
    channel-major, and reading it strided doubled dsc's time at C = 128, 16×16)."""
    shape = a.shape
    split = a.reshape(*shape[:axis], rows, cols, *shape[axis + 1:])
    return jnp.swapaxes(split, axis, axis + 1).reshape(shape)


def _merge_separable_depthwise(
    stages: Sequence[Stage], factors: Sequence[jax.Array]
) -> tuple[list[Stage], list[jax.Array]]:
    """Consecutive depthwise ``kh×1`` and ``1×kw`` stages (cp4's middle) as one ``kh×kw``
    depthwise stage with the outer-product kernel ``a[i, c] · b[j, c]``: the same conv, in one
    pass over the activations instead of two (forward, input and kernel gradients alike)."""
    out_stages, out_factors = [], []
    i = 0
    while i < len(stages):
        a, b = stages[i], stages[i + 1] if i + 1 < len(stages) else None
        if (
            b is not None and a.kind == b.kind == "depthwise"
            and a.owns == (True, False) and b.owns == (False, True)
            and a.shape[1] == b.shape[0] == 1 and a.shape[3] == a.groups == b.groups
            and b.shape[3] == b.groups
        ):
            col, row = factors[i][:, 0, 0, :], factors[i + 1][0, :, 0, :]  # (kh, C), (kw, C)
            out_stages.append(Stage((a.shape[0], b.shape[1], 1, a.shape[3]), a.groups,
                                    (True, True)))
            out_factors.append((col[:, None, :] * row[None, :, :])[:, :, None, :])
            i += 2
            continue
        out_stages.append(a)
        out_factors.append(factors[i])
        i += 1
    return out_stages, out_factors


def compose(stages: Sequence[Stage], factors: Sequence[jax.Array]) -> jax.Array:
    """The full kernel ``(kh, kw, C, N)`` equal to the chain (stride 1, no nonlinearity).

    Keeps a running dense kernel ``T`` of shape ``(th, tw, C, M)`` and applies each stage as a
    grouped contraction; since at most one of ``T`` and the stage has extent along each axis, the
    spatial composition is an outer product, flattened.
    """
    c = stages[0].in_channels
    dtype = jnp.result_type(*factors)
    t = jnp.eye(c, dtype=dtype).reshape(1, 1, c, c)
    for st, kernel in zip(stages, factors, strict=True):
        sh, sw, cin_g, cout = st.shape
        g = st.groups
        th, tw = t.shape[:2]
        t = t.reshape(th, tw, c, g, cin_g)
        k = kernel.reshape(sh, sw, cin_g, g, cout // g)
        t = jnp.einsum("abcgi,xyigo->axbycgo", t, k)
        t = t.reshape(th * sh, tw * sw, c, cout)
    return t
