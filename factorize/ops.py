"""The conv primitive every chain stage runs through, and its fast CPU implementations.

All stages of all families call :func:`conv`, so a faster implementation of a stage type
(depthwise, pointwise, grouped) plugs in here once for every family.

Why a fast path (docs/design.md, "Fast paths on CPU"): on XLA:CPU a grouped conv
(``feature_group_count > 1``) runs at ~1 GFLOP/s, hundreds of times below the dense conv, and its
kernel gradient is lowered as a dense conv. A depthwise-separable block built from it is
*slower* than the full conv it replaces. So on CPU:

* pointwise 1×1 → pad, subsample by the stride, one matmul (``dot_general``);
* depthwise kh×kw / kh×1 / 1×kw (any channel multiplier) and grouped convs with one output per
  group (BSConv's ``r → 1``) → kh·kw shifted multiply-adds (pad, strided slice, multiply, add),
  with a ``custom_vjp`` whose input and kernel gradients are shifted multiply-adds too;
* dense kh×kw → ``lax.conv_general_dilated`` (XLA's own dense conv is the fastest we measured).

Two channel orders spare those paths a transpose of the activations, paid for by permuting a
neighbouring 1×1 kernel in ``chain.run_chain``: :func:`grouped_inputs_major` (BSConv's r → 1
stage) and :func:`depthwise_multiplier_major` (``dsc`` with rank > 1).

Implementations: ``"lax"`` (always ``lax.conv_general_dilated``), ``"fast"`` (the paths above),
``"auto"`` (default: ``"fast"`` on CPU, ``"lax"`` on GPU/TPU, where native convs are good).
Pick one for a block of code with :func:`implementation` (it applies at trace time, and JAX
caches traces per implementation), for a process with the environment variable
``FACTORIZE_CONV_IMPLEMENTATION`` or ``jax.config.update("factorize_conv_implementation", ...)``.

Note for users on CPU: ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` (set before JAX is
imported) makes XLA's dense and 1×1 convs faster (docs/benchmarks.md). On Linux with glibc,
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (set before Python starts; needs transparent huge
pages in "madvise" or "always" mode) puts XLA's buffers on huge pages: blocks over 32 MiB are
otherwise fresh mmaps faulted in 4 KiB at a time on every call, which costs the cheap
factorized layers most (docs/benchmarks.md, "The allocator"). This library sets neither.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from factorize._reductions import tree_sum

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], tuple[int, int]]
Pair = tuple[int, int]

IMPLEMENTATIONS = ("auto", "lax", "fast")


def _implementation_state():
    """Which implementation ``conv`` uses: a JAX config option (``factorize_conv_implementation``,
    thread-local, scoped by :func:`implementation`; registered at import, its value never
    changed there) that JAX puts in its trace and jit cache keys.

    The choice is read at trace time, so it must be part of those keys: with a plain context
    variable, a function traced once (``jax.jit(f)``, ``jax.make_jaxpr(f)``) was served from
    JAX's cache under the other implementation — ``count_macs`` then counted a fast-path trace
    and a fast-vs-lax comparison compared one implementation with itself. JAX has no public
    API for such options; ``jax._src.config.enum_state`` is what ``jax_default_prng_impl`` and
    friends use.
    """
    from jax._src import config as jax_config

    return jax_config.enum_state(
        "factorize_conv_implementation", list(IMPLEMENTATIONS), "auto",
        help="Implementation of factorize's convolutions: auto, lax or fast.",
        include_in_jit_key=True, include_in_trace_context=True,
    )


_IMPLEMENTATION = _implementation_state()


def implementation(name: str) -> contextlib.AbstractContextManager[None]:
    """Within the block (at trace time), stages run with implementation ``name``.

    Functions traced under different implementations are cached separately by JAX, so the
    same ``jax.jit(f)`` runs each implementation in its own block.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    return _IMPLEMENTATION(name)


def reference_implementation() -> contextlib.AbstractContextManager[None]:
    """Stages run as plain ``lax.conv_general_dilated`` (what :func:`count_macs` traces)."""
    return implementation("lax")


def current_implementation() -> str:
    """The implementation :func:`conv` would use now (``"auto"`` resolved for the backend)."""
    name = _IMPLEMENTATION.value
    if name == "auto":
        return "fast" if jax.default_backend() == "cpu" else "lax"
    return name


def conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    groups: int = 1,
    strides: tuple[int, int] = (1, 1),
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
    dilation: tuple[int, int] = (1, 1),
) -> jax.Array:
    """NHWC × HWIO convolution with explicit padding; equal to ``lax.conv_general_dilated``.

    ``kernel`` is ``(kh, kw, C // groups, N)``. Runs the implementation selected by
    :func:`implementation` (see the module docstring).
    """
    strides = (int(strides[0]), int(strides[1]))
    dilation = (int(dilation[0]), int(dilation[1]))
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)  # type: ignore[assignment]
    if current_implementation() == "fast":
        kind = fast_kind(x.shape[-1], kernel.shape, groups)
        if kind == "pointwise":
            return pointwise(x, kernel, strides, padding)
        if kind == "shift":
            return shifted(x, kernel, groups, strides, padding, dilation)
    return lax_conv(x, kernel, groups, strides, padding, dilation)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    **kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated``'s signature, running :func:`conv` where it can.

    Pass it to ``nnx.Conv(..., conv_general_dilated=factorize.ops.conv_general_dilated)`` so a
    plain depthwise ``nnx.Conv`` (e.g. MobileNet's) takes the fast path; anything :func:`conv`
    does not cover (not 2-D NHWC/HWIO, input dilation, precision or sharding options) goes to
    ``lax.conv_general_dilated`` unchanged.
    """
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS)
    plain = (
        lhs.ndim == 4
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
        and all(int(d) == 1 for d in (lhs_dilation or (1, 1)))
        and all(v is None for v in kwargs.values())
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, **kwargs,
        )
    dilation = tuple(rhs_dilation or (1, 1))
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation, strict=True)]
        padding = lax.padtype_to_pads(lhs.shape[1:3], dilated, window_strides, padding)
    return conv(lhs, rhs, groups=feature_group_count, strides=tuple(window_strides),
                padding=tuple(padding), dilation=dilation)


def lax_conv(
    x: jax.Array, kernel: jax.Array, groups: int, strides: Pair, padding: Pads, dilation: Pair
) -> jax.Array:
    """The reference: XLA's own convolution."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


def fast_kind(in_channels: int, kernel_shape: tuple[int, ...], groups: int) -> str:
    """Which fast path a conv takes: ``"pointwise"``, ``"shift"`` or ``"lax"``."""
    kh, kw, cin_g, cout = kernel_shape
    if groups == 1:
        return "pointwise" if kh == kw == 1 else "lax"
    cout_g = cout // groups
    # Shifted multiply-adds cost kh·kw·cin_g passes over the output; fine for depthwise
    # (cin_g = 1, any multiplier) and few-inputs-per-group convs (BSConv: cin_g = rank).
    if (cin_g == 1 or cout_g == 1) and kh * kw * cin_g <= _MAX_SHIFT_PASSES:
        return "shift"
    return "lax"


_MAX_SHIFT_PASSES = 64


# ---------------------------------------------------------------------------------------------
# pointwise 1×1: a matmul


def pointwise(x: jax.Array, kernel: jax.Array, strides: Pair, padding: Pads) -> jax.Array:
    """A 1×1 conv as pad → subsample → matmul (a 1×1 tap never reads between strided rows)."""
    if any(lo or hi for lo, hi in padding):
        x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0),
                                                (0, 0, 0)))
    if strides != (1, 1):
        x = x[:, :: strides[0], :: strides[1], :]
    # As a 2-D matmul over the flattened pixels: autodiff then takes the weight gradient as a
    # 2-D dot contracting the pixel axis, which XLA:CPU runs without copying the activations
    # into a transposed layout. Contracting (B, H, W) of the 4-D arrays instead made it
    # transpose both operands first: training steps (C = 64, 32×32, batch 32) of dsc 27.5 →
    # 17.5 ms and cp3 36.9 → 31.5 ms; cp3 at C = 128, 16×16 16.4 → 12.2 ms. Same numbers.
    b, h, w, c = x.shape
    flat = lax.dot_general(x.reshape(b * h * w, c), kernel[0, 0], (((1,), (0,)), ((), ())))
    return flat.reshape(b, h, w, kernel.shape[-1])


# ---------------------------------------------------------------------------------------------
# depthwise / grouped with one output per group: kh·kw shifted multiply-adds


def shifted(
    x: jax.Array,
    kernel: jax.Array,
    groups: int,
    strides: Pair,
    padding: Pads,
    dilation: Pair,
) -> jax.Array:
    """A grouped conv with ``cin_g == 1`` (depthwise, any multiplier) or ``cout_g == 1``.

    Both become depthwise convs (:func:`_depthwise`, ``(B, H, W, G)`` × ``(kh, kw, G)``):
    with a multiplier ``m`` the input is repeated ``m`` times; with ``I`` inputs per group and
    one output the result is a sum of ``I`` depthwise convs (:func:`grouped_inputs_major`).
    """
    b, h, w, c = x.shape
    kh, kw, cin_g, cout = kernel.shape
    if cin_g == 1:
        mult = cout // groups
        if mult > 1:  # lax's group c owns outputs c·m … c·m+m−1, all reading input c
            x = jnp.repeat(x, mult, axis=-1)
        return _depthwise(x, kernel[:, :, 0, :], strides, padding, dilation)
    # cout_g == 1: group g reads inputs g·I … g·I+I−1; reorder the channels input-major
    xt = x.reshape(b, h, w, groups, cin_g).transpose(0, 1, 2, 4, 3).reshape(b, h, w, c)
    return grouped_inputs_major(xt, kernel, strides, padding, dilation)


def _out_len(n: int, k: int, s: int, pad: tuple[int, int], d: int) -> int:
    return (n + pad[0] + pad[1] - (k - 1) * d - 1) // s + 1


def _pad_hw(x: jax.Array, config: list[tuple[int, int, int]]) -> jax.Array:
    if all(c == (0, 0, 0) for c in config):
        return x
    return lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *config, (0, 0, 0)])


def _weights(v: jax.Array, window: jax.Array) -> jax.Array:
    """A tap's per-channel weights ``(C,)`` laid out along ``window``'s minor axis."""
    return v if window.ndim == 4 else jnp.tile(v, window.shape[-1] // v.shape[-1])


def _unflatten(a: jax.Array, channels: int) -> jax.Array:
    """A tap window or sum of them back to ``(B, OH, OW, C)``."""
    return a if a.ndim == 4 else a.reshape(*a.shape[:2], -1, channels)


def _axis_window(n: int, out: int, s: int, d: int, lo: int, tap: int):
    """Along one axis of length ``n``: outputs ``low … out − high − 1`` of tap ``tap`` read
    inputs ``start, start + s, …`` (``count`` of them); the others fall in the padding.
    ``None`` if every output does."""
    delta = tap * d - lo  # output o reads input o·s + delta
    first = -(delta // s) if delta < 0 else 0  # ceil(−delta / s)
    count = min(out - 1, (n - 1 - delta) // s) - first + 1
    if count <= 0:
        return None
    return first * s + delta, count, first, out - first - count


def _window(
    x: jax.Array, i: int, j: int, out_hw: Pair, strides: Pair, padding: Pads, dilation: Pair,
    *, flat: bool,
) -> jax.Array | None:
    """The input window that kernel tap (i, j) multiplies, for every output position: a
    strided slice of ``x``, zero-filled to the output size where it falls in ``padding``
    (``None`` if it lies entirely there; with zero ``padding`` nothing is filled).

    ``flat`` and stride 1 along W: the window is ``(B, OH, OW·C)``, a slice of ``x`` viewed as
    ``(B, H, W·C)``; a tap's W offset is a shift by a multiple of C on one minor axis. XLA:CPU
    runs fused sums of such slices 3.5–4× faster than of the 4-D ``(B, OH, OW, C)`` windows
    when several inputs are summed (BSConv's r → 1 stage, C = 128, 32×32: 63 → 17 ms; a single
    depthwise conv: ~10 %). A strided W needs the 4-D window, and so does the kernel gradient's
    sum of products (flat windows made it 5× slower at C = 256, 16×16).
    """
    b, h, w, c = x.shape
    windows = [_axis_window(n, o, s, d, p[0], t) for n, o, s, d, p, t in
               zip((h, w), out_hw, strides, dilation, padding, (i, j), strict=True)]
    if None in windows:
        return None
    (h0, nh, hlo, hhi), (w0, nw, wlo, whi) = windows  # type: ignore[misc]
    sh, sw = strides
    if flat and sw == 1:
        view = x.reshape(b, h, w * c)
        window = lax.slice(view, (0, h0, w0 * c), (b, h0 + (nh - 1) * sh + 1, (w0 + nw) * c),
                           (1, sh, 1))
        fill = [(0, 0, 0), (hlo, hhi, 0), (wlo * c, whi * c, 0)]
    else:
        window = lax.slice(x, (0, h0, w0, 0),
                           (b, h0 + (nh - 1) * sh + 1, w0 + (nw - 1) * sw + 1, c),
                           (1, sh, sw, 1))
        fill = [(0, 0, 0), (hlo, hhi, 0), (wlo, whi, 0), (0, 0, 0)]
    if hlo or hhi or wlo or whi:
        window = lax.pad(window, jnp.zeros((), x.dtype), fill)
    return window


def _tap_sum(xs, kernels, out_hw: Pair, strides: Pair, padding: Pads, dilation: Pair):
    """``Σ_n Σ_{i,j} window_n(i, j) · kernels[n][i, j]``, one fused sum of shifted products.

    ``xs`` are ``(B, H, W, C)`` inputs, ``kernels`` the matching ``(kh, kw, C)``. At stride 1
    the windows (:func:`_window`) are slices of a zero-padded copy of each input. Strided, each
    is a strided slice of the input zero-filled to the output size: padding a copy of the
    whole, larger input was most of the time (stride 2, batch 32:
    C = 128 at 32×32 2.0 → 0.46 ms, C = 32 at 112×112 8.9 → 2.4 ms); at stride 1 the padded
    copy is the faster of the two (C = 256, 32×32: 21 vs 28 ms).
    """
    if strides == (1, 1):  # pad a copy once; its windows need no filling
        xs = [_pad_hw(x, [(*padding[0], 0), (*padding[1], 0)]) for x in xs]
        padding = ((0, 0), (0, 0))
    acc = None
    for x, kernel in zip(xs, kernels, strict=True):
        for i in range(kernel.shape[0]):
            for j in range(kernel.shape[1]):
                window = _window(x, i, j, out_hw, strides, padding, dilation, flat=True)
                if window is None:
                    continue
                term = window * _weights(kernel[i, j], window)
                acc = term if acc is None else acc + term
    if acc is None:  # every tap in the padding
        return jnp.zeros((xs[0].shape[0], *out_hw, xs[0].shape[-1]), xs[0].dtype)
    return _unflatten(acc, xs[0].shape[-1])


def _map_forward(fn, x: jax.Array, strides: Pair) -> jax.Array:
    """``fn(x)``; at stride 1 over batch chunks (:func:`batch_chunked_map`, cache-sized padded
    copies), strided in one piece (no padded copy to keep in cache; chunked was slower)."""
    return fn(x) if strides != (1, 1) else batch_chunked_map(fn, x)


def _out_hw(in_hw: Pair, kernel_hw: Pair, strides: Pair, padding: Pads, dilation: Pair) -> Pair:
    return tuple(  # type: ignore[return-value]
        _out_len(in_hw[a], kernel_hw[a], strides[a], padding[a], dilation[a]) for a in (0, 1)
    )


# Shifted multiply-adds are memory-bound: kh·kw passes over the input. Running them over a few
# images at a time keeps each chunk in cache (measured 1.8× forward, 2.5× kernel gradient, C=256,
# 32×32, batch 32, chunk of 4 images).
_CHUNK_BYTES = 4 << 20


def _chunk(batch: int, image_bytes: int, chunk_bytes: int = _CHUNK_BYTES) -> int:
    """Images per chunk: the largest divisor of ``batch`` whose chunk fits ``chunk_bytes``."""
    fit = max(1, chunk_bytes // max(1, image_bytes))
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= fit)


def _image_bytes(a: jax.Array) -> int:
    return a[0].size * a.dtype.itemsize


def _chunk_slices(arrays, cb: int, k):
    return [lax.dynamic_slice_in_dim(a, k * cb, cb, axis=0) for a in arrays]


def batch_chunked_map(
    fn: Callable[..., jax.Array], *arrays: jax.Array, chunk_bytes: int = _CHUNK_BYTES
) -> jax.Array:
    """``fn`` over batch chunks of ``arrays`` (sequentially), outputs concatenated on the batch.
    A chunk is the largest divisor of the batch whose images take at most ``chunk_bytes``.

    A ``fori_loop`` over dynamic slices of the inputs, writing into one output buffer: slicing
    inside the loop copies nothing (``lax.map`` over a reshaped batch did).
    """
    return chunk_loop(lambda *chunk: (fn(*chunk), None), arrays, chunk_bytes)[0]


def chunk_loop(fn: Callable, arrays: Sequence[jax.Array], chunk_bytes: int):
    """One pass over batch chunks of ``arrays`` (chunked as in :func:`batch_chunked_map`), where
    ``fn(*chunk)`` returns ``(mapped, summed)``, pytrees either of which may be ``None``.

    Returns ``(mapped, summed)`` for the whole batch: the mapped chunks concatenated on the
    batch axis, and the sum over the chunks."""
    b = arrays[0].shape[0]
    cb = _chunk(b, max(_image_bytes(a) for a in arrays), chunk_bytes)
    if cb == b:
        return fn(*arrays)
    first, total = fn(*_chunk_slices(arrays, cb, 0))
    out = jax.tree.map(
        lambda f: lax.dynamic_update_slice_in_dim(
            jnp.zeros((b, *f.shape[1:]), f.dtype), f, 0, axis=0), first)

    def body(k, carry):
        out, total = carry
        mapped, summed = fn(*_chunk_slices(arrays, cb, k))
        out = jax.tree.map(lambda o, m: lax.dynamic_update_slice_in_dim(o, m, k * cb, 0),
                           out, mapped)
        return out, jax.tree.map(jnp.add, total, summed)

    return lax.fori_loop(1, b // cb, body, (out, total))


def _shift_forward(x, kernel, strides, padding, dilation):
    return _map_forward(
        lambda x: _shift_forward_all(x, kernel, strides, padding, dilation), x, strides)


def _shift_forward_all(x, kernel, strides, padding, dilation):
    out_hw = _out_hw(x.shape[1:3], kernel.shape[:2], strides, padding, dilation)
    return _tap_sum([x], [kernel], out_hw, strides, padding, dilation)


# The kernel gradient reads two arrays per tap (window and cotangent): smaller chunks keep both in
# cache across the kh·kw taps (C = 256, 32×32, batch 32: 23–25 ms in 1 MiB chunks, 50–56 ms
# unchunked). The input gradient runs in the same loop, on the cotangent chunk already in cache.
_GRAD_CHUNK_BYTES = 1 << 20


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _sum_of_products(a: jax.Array, b: jax.Array, ways: int = 8) -> jax.Array:
    """``(a * b).sum((0, 1))`` for ``(B, H, W, C)`` arrays, giving ``(W, C)``.

    The first level sums ``ways`` blocks of products (split along B, then H) in one fused pass
    that writes no product array; :func:`tree_sum` halves what is left. The blocks are slices
    of the 4-D operands: reshaping a strided window first made XLA copy it (2–5× slower).
    """
    n, h = a.shape[:2]
    kb = _largest_divisor(n, ways)
    kh = _largest_divisor(h, ways // kb)
    nb, nh = n // kb, h // kh
    blocks = [(slice(i * nb, (i + 1) * nb), slice(j * nh, (j + 1) * nh))
              for i in range(kb) for j in range(kh)]
    first = functools.reduce(jnp.add, [a[s] * b[s] for s in blocks])
    return tree_sum(first.reshape(nb * nh, *a.shape[2:]))


def _chunked_grads(x, kernel, g, grad_input, grad_kernel):
    """A shifted conv's VJP from its per-chunk gradients, in one pass over small batch chunks:
    ``grad_input(g)`` mapped, ``grad_kernel(x, g)`` summed. One loop for both reads each
    cotangent chunk from memory once (two loops read it twice): training steps (YNNPACK off,
    interleaved A/B) cp3 at C = 64, 32×32 32.0 → 28.3 ms, cp4 25.7 → 24.8 ms, cp3 at C = 256,
    16×16 20.6 → 18.2 ms; dsc at C = 64, 16×16 3.2 → 3.6 ms and bsconv at C = 128, 32×32
    69 → 72 ms went the other way."""
    dx, dk = chunk_loop(lambda x, g: (grad_input(g), grad_kernel(x, g)), (x, g),
                        _GRAD_CHUNK_BYTES)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _shift_grad_kernel_all(x, g, kernel_hw, strides, padding, dilation):
    """dL/dk[i, j, :] = Σ_{b, positions} window(i, j) · g: one tree reduction per tap."""
    b, oh, ow, c = g.shape
    xp = _pad_hw(x, [(*padding[0], 0), (*padding[1], 0)])

    def tap_grad(i, j):
        window = _window(xp, i, j, (oh, ow), strides, ((0, 0), (0, 0)), dilation, flat=False)
        return tree_sum(_sum_of_products(window, g))

    rows = [[tap_grad(i, j) for j in range(kernel_hw[1])] for i in range(kernel_hw[0])]
    return jnp.stack([jnp.stack(r) for r in rows])


def _shift_grad_input_all(gs, kernels, in_hw, strides, padding, dilation):
    """``Σ_n`` dL/dx of depthwise convs with ``kernels[n]`` whose cotangents are ``gs[n]``: the
    transposed convs, shifted multiply-adds with the flipped kernels in one fused sum. Each
    ``g`` is dilated by the stride (interior padding) and padded so that a stride-1 correlation
    with the flipped kernel lands exactly on the input positions (negative pads crop)."""
    kh, kw = kernels[0].shape[:2]
    config = []
    for a, k in ((0, kh), (1, kw)):
        s, d, (lo, _), n, o = strides[a], dilation[a], padding[a], in_hw[a], gs[0].shape[1 + a]
        low = (k - 1) * d - lo
        high = n + lo - (o - 1) * s - 1
        config.append((low, high, s - 1))
    gps = [_pad_hw(g, config) for g in gs]
    return _tap_sum(gps, [k[::-1, ::-1] for k in kernels], in_hw, (1, 1), ((0, 0), (0, 0)),
                    dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise(x, kernel, strides, padding, dilation):
    """Depthwise conv ``(B, H, W, G)`` × ``(kh, kw, G)`` as shifted multiply-adds; its VJP is
    shifted multiply-adds too (XLA lowers a grouped conv's kernel gradient as a dense conv)."""
    return _shift_forward(x, kernel, strides, padding, dilation)


def _shift_conv_fwd(x, kernel, strides, padding, dilation):
    return _shift_forward(x, kernel, strides, padding, dilation), (x, kernel)


def _shift_conv_bwd(strides, padding, dilation, res, g):
    x, kernel = res
    return _chunked_grads(
        x, kernel, g,
        lambda g: _shift_grad_input_all([g], [kernel], x.shape[1:3], strides, padding, dilation),
        lambda x, g: _shift_grad_kernel_all(x, g, kernel.shape[:2], strides, padding, dilation),
    )


_depthwise.defvjp(_shift_conv_fwd, _shift_conv_bwd)


def _channel_slices(x: jax.Array, n: int) -> list[jax.Array]:
    """The ``n`` equal slices of the channel axis (input-major: slice ``i`` is input ``i``)."""
    g = x.shape[-1] // n
    return [x[..., i * g : (i + 1) * g] for i in range(n)]


def _depthwise_sum_forward_all(x, kernel, strides, padding, dilation):
    """``Σ_i depthwise(slice_i(x), kernel[:, :, i])`` as one fused sum of shifted products."""
    n_in = kernel.shape[2]
    out_hw = _out_hw(x.shape[1:3], kernel.shape[:2], strides, padding, dilation)
    return _tap_sum(_channel_slices(x, n_in), [kernel[:, :, i] for i in range(n_in)], out_hw,
                    strides, padding, dilation)


def _depthwise_sum_forward(x, kernel, strides, padding, dilation):
    return _map_forward(
        lambda x: _depthwise_sum_forward_all(x, kernel, strides, padding, dilation), x, strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def grouped_inputs_major(
    x: jax.Array, kernel: jax.Array, strides: Pair, padding: Pads, dilation: Pair
) -> jax.Array:
    """A grouped conv with ``I`` inputs and one output per group, ``kernel`` ``(kh, kw, I, G)``
    as lax has it, but with ``x``'s channels ordered input-major: input ``i`` of group ``g`` at
    channel ``i·G + g`` (lax: ``g·I + i``), so ``(B, H, W, I·G)`` → ``(B, OH, OW, G)``.

    Each input slice is then a contiguous depthwise input; the conv is a sum of ``I`` depthwise
    convs computed in one pass, whose input gradient is written as one array (separate
    depthwise convs wrote ``I`` outputs and, backwards, ``I`` zero-padded input gradients).
    ``run_chain`` feeds BSConv's grouped stage this way by permuting the preceding 1×1 stage's
    output columns, which saves the transpose of the activations (forward and backward).
    """
    return _depthwise_sum_forward(x, kernel, strides, padding, dilation)


def _depthwise_sum_fwd(x, kernel, strides, padding, dilation):
    return _depthwise_sum_forward(x, kernel, strides, padding, dilation), (x, kernel)


def _depthwise_sum_bwd(strides, padding, dilation, res, g):
    x, kernel = res
    n_in, in_hw = kernel.shape[2], x.shape[1:3]

    def grad_input(g):
        return jnp.concatenate([
            _shift_grad_input_all([g], [kernel[:, :, i]], in_hw, strides, padding, dilation)
            for i in range(n_in)
        ], axis=-1)

    def grad_kernel(x, g):
        return jnp.stack([
            _shift_grad_kernel_all(xs, g, kernel.shape[:2], strides, padding, dilation)
            for xs in _channel_slices(x, n_in)
        ], axis=2)

    return _chunked_grads(x, kernel, g, grad_input, grad_kernel)


grouped_inputs_major.defvjp(_depthwise_sum_fwd, _depthwise_sum_bwd)


def _multiplier_major_forward_all(x, kernel, strides, padding, dilation):
    """``concat_t depthwise(x, kernel slice t)``: every output slice from one padded ``x``."""
    out_hw = _out_hw(x.shape[1:3], kernel.shape[:2], strides, padding, dilation)
    slices = _channel_slices(kernel, kernel.shape[-1] // x.shape[-1])
    return jnp.concatenate(  # the slices' padded copies of x are one after CSE
        [_tap_sum([x], [k], out_hw, strides, padding, dilation) for k in slices], axis=-1)


def _multiplier_major_forward(x, kernel, strides, padding, dilation):
    return _map_forward(
        lambda x: _multiplier_major_forward_all(x, kernel, strides, padding, dilation), x,
        strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _multiplier_major(x, kernel, strides, padding, dilation):
    return _multiplier_major_forward(x, kernel, strides, padding, dilation)


def _multiplier_major_fwd(x, kernel, strides, padding, dilation):
    return _multiplier_major_forward(x, kernel, strides, padding, dilation), (x, kernel)


def _multiplier_major_bwd(strides, padding, dilation, res, g):
    x, kernel = res
    m, in_hw = kernel.shape[-1] // x.shape[-1], x.shape[1:3]
    kernels = _channel_slices(kernel, m)

    def grad_input(g):
        return _shift_grad_input_all(
            _channel_slices(g, m), kernels, in_hw, strides, padding, dilation)

    def grad_kernel(x, g):
        return jnp.concatenate([
            _shift_grad_kernel_all(x, gt, kernel.shape[:2], strides, padding, dilation)
            for gt in _channel_slices(g, m)
        ], axis=-1)

    return _chunked_grads(x, kernel, g, grad_input, grad_kernel)


_multiplier_major.defvjp(_multiplier_major_fwd, _multiplier_major_bwd)


def depthwise_multiplier_major(
    x: jax.Array, kernel: jax.Array, strides: Pair, padding: Pads, dilation: Pair
) -> jax.Array:
    """A depthwise conv with channel multiplier ``m``, ``kernel`` ``(kh, kw, 1, m·C)``, whose
    output channels are ordered multiplier-major: copy ``t`` of input ``c`` at channel
    ``t·C + c`` (lax: ``c·m + t``), in the kernel's columns and in the output alike.

    Each output slice is then a depthwise conv of the same ``x``, all computed from one padded
    copy, and the input gradient is one fused sum over the slices; lax's order needed ``x``
    repeated ``m`` times (an ``m``-times larger array written forwards, and a strided sum over
    its channels backwards). ``run_chain`` feeds the depthwise stage of ``dsc`` with rank > 1
    this way by permuting the next 1×1 stage's input rows.
    """
    return _multiplier_major(x, kernel[:, :, 0, :], strides, padding, dilation)
