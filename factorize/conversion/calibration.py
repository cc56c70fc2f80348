"""Calibration statistics: per-layer second moments of the input patches, for data-aware fits.

A conv's output at one position is ``Wᵀ p`` with ``p`` the im2col patch (``kh·kw·C`` values in
HWIO order, the rows of ``W.reshape(kh·kw·C, N)``), so the output error of any replacement
kernel depends on the data only through ``S = E[p pᵀ]`` (and, for asymmetric reconstruction,
the cross moment with the original network's patches). :class:`InputStats` holds these moments;
:func:`collect_input_stats` runs a model over calibration batches and accumulates them per
layer, batch by batch: memory is one ``P × P`` matrix per layer, never the activations.

Accumulation is float32: each batch contributes its own mean (``pᵀp / n``), merged into the
running mean with weight ``n / (count + n)``, so no sum grows with the number of patches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from factorize._checks import normalize_padding, pair

# patches per chunk of a batch (rows × P floats), so a large batch never builds one huge
# im2col matrix: 2^23 floats = 32 MiB
_CHUNK_FLOATS = 1 << 23


class InputStats(NamedTuple):
    """Moments of one layer's input patches (a pytree of float32 arrays).

    Attributes:
      second: ``(P, P)``, ``E[p pᵀ]`` over every output position of every calibration image
        (``P = kh·kw·C``; zero-padded taps included, as the conv sees them).
      mean: ``(P,)``, ``E[p]``.
      count: ``()``, the number of patches averaged.
      cross: ``(P, P)``, ``E[p pᵀ_ref]``: this network's patches against the reference
        (original) network's at the same layer (asymmetric reconstruction), or ``None``.
      ref_second: ``(P, P)``, ``E[p_ref p_refᵀ]``, or ``None``.
      ref_mean: ``(P,)``, ``E[p_ref]``, or ``None``.

    Example::

        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
        stats = factorize.InputStats.from_inputs(x, (3, 3, 3, 16), strides=2)
        stats.second.shape, float(stats.count)     # ((27, 27), 64.0): 4 images × 4×4 outputs
        w = jax.random.normal(jax.random.key(1), (3, 3, 3, 16))
        f = factorize.decompose(w, "lowrank_out", 4, inputs=stats)   # output error, not ‖W − Ŵ‖
    """

    second: jax.Array
    mean: jax.Array
    count: jax.Array
    cross: jax.Array | None = None
    ref_second: jax.Array | None = None
    ref_mean: jax.Array | None = None

    @property
    def patch_size(self) -> int:
        """``P = kh·kw·C``."""
        return int(self.second.shape[0])

    @property
    def asymmetric(self) -> bool:
        """Whether the statistics pair this network's inputs with a reference network's."""
        return self.cross is not None

    @classmethod
    def from_inputs(
        cls,
        x: Any,
        kernel_shape: Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        dilation: int | Sequence[int] = 1,
        reference: Any = None,
    ) -> InputStats:
        """The statistics of one input batch ``x`` (NHWC; ``(..., C)`` for a 1×1 kernel) of a
        layer with kernel ``(kh, kw, C, N)`` and the given geometry. ``reference``: the original
        network's input to the same layer (same shape), for asymmetric statistics."""
        shape = tuple(int(s) for s in kernel_shape)
        x = jnp.asarray(x)
        _check_layer_input(x, shape, "x")
        if reference is not None:
            reference = jnp.asarray(reference)
            if reference.shape != x.shape:
                raise ValueError(f"reference must have the shape of x {tuple(x.shape)}, "
                                 f"got {tuple(reference.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"x is empty: got shape {tuple(x.shape)}")
        geometry = _static_geometry(x, shape, strides, padding, dilation)
        if geometry is None:  # (..., C) rows of a 1×1 layer
            step = x.shape[0]
        else:  # chunks of at most _CHUNK_FLOATS patch entries
            per_image = _patch_rows(x[:1], shape, geometry) * shape[0] * shape[1] * shape[2]
            step = max(1, _CHUNK_FLOATS // max(per_image, 1))
        out = None
        for lo in range(0, x.shape[0], step):
            ref = None if reference is None else reference[lo:lo + step]
            part = _batch_stats(x[lo:lo + step], ref, shape[:3], geometry)
            out = part if out is None else out.merge(part)
        return out

    def merge(self, other: InputStats) -> InputStats:
        """The statistics of both sets of patches (count-weighted means)."""
        total = self.count + other.count
        w = jnp.where(total > 0, other.count / jnp.where(total > 0, total, 1.0), 0.0)

        def mix(a, b):
            if a is None or b is None:
                if (a is None) != (b is None):
                    raise ValueError("cannot merge symmetric with asymmetric statistics")
                return None
            return a + (b - a) * w

        return InputStats(
            mix(self.second, other.second), mix(self.mean, other.mean), total,
            mix(self.cross, other.cross), mix(self.ref_second, other.ref_second),
            mix(self.ref_mean, other.ref_mean),
        )

    def moments(self, centered: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(S_hh, S_hx, S_xx)``: this network's second moment, the cross moment with the
        reference and the reference's (all three ``second`` for symmetric statistics).
        ``centered`` subtracts the means (covariances): the objective when a bias absorbs
        the mean error."""
        s_hh = self.second
        s_hx = self.second if self.cross is None else self.cross
        s_xx = self.second if self.ref_second is None else self.ref_second
        if centered:
            m_h = self.mean
            m_x = self.mean if self.ref_mean is None else self.ref_mean
            s_hh = s_hh - jnp.outer(m_h, m_h)
            s_hx = s_hx - jnp.outer(m_h, m_x)
            s_xx = s_xx - jnp.outer(m_x, m_x)
        return s_hh, s_hx, s_xx


def output_error(
    kernel: Any, approx: Any, stats: InputStats, *, centered: bool = False
) -> jax.Array:
    """Relative output error ``E‖Wᵀx − Ŵᵀx̂‖² / E‖Wᵀx‖²`` on the statistics (``x̂ = x`` for
    symmetric statistics), for kernels ``W`` (``kernel``) and ``Ŵ`` (``approx``) of shape
    ``(kh, kw, C, N)``; ``centered`` measures it without the mean (a refitted bias absorbs it).

    Example::

        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
        w = jax.random.normal(jax.random.key(1), (3, 3, 3, 16))
        stats = factorize.InputStats.from_inputs(x, w.shape)
        f = factorize.decompose(w, "lowrank_out", 4)
        float(factorize.conversion.output_error(w, f.to_kernel(), stats))   # ≈ 0.4
    """
    return _output_error(jnp.asarray(kernel, jnp.float32), jnp.asarray(approx, jnp.float32),
                         stats, centered)


@functools.partial(jax.jit, static_argnames="centered")
def _output_error(kernel, approx, stats, centered):
    s_hh, s_hx, s_xx = stats.moments(centered)
    p = stats.patch_size
    w = kernel.reshape(p, -1)
    a = approx.reshape(p, -1)
    ref = jnp.sum(w * (s_xx @ w))
    err = ref - 2 * jnp.sum(a * (s_hx @ w)) + jnp.sum(a * (s_hh @ a))
    return jnp.maximum(err, 0.0) / jnp.where(ref > 0, ref, 1.0)


def _check_layer_input(x: jax.Array, kernel_shape, name: str) -> None:
    kh, kw, c, _ = kernel_shape
    if x.ndim == 4 or (kh == kw == 1 and x.ndim >= 2):
        if x.shape[-1] != c:
            raise ValueError(f"{name}: a layer with kernel {kernel_shape} takes {c} input "
                             f"channels, got shape {tuple(x.shape)}")
        return
    raise ValueError(f"{name} must be an NHWC batch (or (..., C) for a 1×1 kernel), got shape "
                     f"{tuple(x.shape)}")


def _static_geometry(x, kernel_shape, strides, padding, dilation):
    if x.ndim != 4:
        return None
    strides, dilation = pair(strides, "strides"), pair(dilation, "dilation")
    pads = normalize_padding(padding, x.shape[1:3], kernel_shape[:2], strides, dilation)
    return strides, pads, dilation


def _patch_rows(x, kernel_shape, geometry) -> int:
    if geometry is None:
        return int(np.prod(x.shape[:-1]))
    strides, pads, dilation = geometry
    rows = x.shape[0]
    for a in (0, 1):
        eff = (kernel_shape[a] - 1) * dilation[a] + 1
        size = x.shape[1 + a] + sum(pads[a])
        rows *= max(0, (size - eff) // strides[a] + 1)
    return int(rows)


def patches(x: jax.Array, kernel_hwc: tuple[int, int, int], geometry) -> jax.Array:
    """The im2col rows ``(B·OH·OW, kh·kw·C)`` of an NHWC batch, HWIO order (so
    ``patches @ W.reshape(-1, N)`` is the conv); ``geometry`` = ``(strides, pads, dilation)``,
    or ``None`` for a ``(..., C)`` input of a 1×1 layer."""
    kh, kw, c = kernel_hwc
    if geometry is None:
        return x.reshape(-1, c)
    strides, pads, dilation = geometry
    p = lax.conv_general_dilated_patches(
        x, (kh, kw), strides, pads, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)
    # lax orders each patch's features channel-major, (C, kh, kw); HWIO rows are (kh, kw, C)
    return p.reshape(-1, c, kh, kw).transpose(0, 2, 3, 1).reshape(-1, kh * kw * c)


@functools.partial(jax.jit, static_argnames=("kernel_hwc", "geometry"))
def _batch_stats(x, reference, kernel_hwc, geometry) -> InputStats:
    x = x.astype(jnp.float32)
    p = patches(x, kernel_hwc, geometry)
    n = p.shape[0]
    inv = 1.0 / max(n, 1)
    hi = lax.Precision.HIGHEST
    second = jnp.matmul(p.T, p, precision=hi) * inv
    count = jnp.asarray(n, jnp.float32)
    if reference is None:
        return InputStats(second, p.mean(0), count)
    q = patches(reference.astype(jnp.float32), kernel_hwc, geometry)
    return InputStats(second, p.mean(0), count, jnp.matmul(p.T, q, precision=hi) * inv,
                      jnp.matmul(q.T, q, precision=hi) * inv, q.mean(0))


# --- calibration batches ---------------------------------------------------------------------

CALIBRATION_BATCH = 128


def check_calibration(calibration: Any, sample_input: Any = None,
                      name: str = "calibration") -> list[np.ndarray]:
    """The calibration batches as a list of arrays, checked: non-empty, each ``(B, *shape)``
    with the shape and dtype of ``sample_input``'s examples (or of the first batch), finite.

    An array (not a list of them) is a whole calibration set, split into batches of 128.
    """
    if isinstance(calibration, (np.ndarray, jax.Array)):
        arr = np.asarray(calibration)
        batches = [arr[i:i + CALIBRATION_BATCH] for i in range(0, len(arr), CALIBRATION_BATCH)]
        if arr.ndim == 0:
            batches = [arr]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes, dict)):
        batches = list(calibration)
    else:
        raise TypeError(f"{name} must be an iterable of input batches or an array, got "
                        f"{type(calibration).__name__}")
    if not batches or all(np.asarray(b).size == 0 for b in batches):
        raise ValueError(f"{name} is empty: expected at least one input batch")
    if sample_input is not None:
        ref = np.asarray(jax.tree.leaves(sample_input)[0])
        shape, dtype = tuple(ref.shape[1:]), ref.dtype
    else:
        first = np.asarray(batches[0])
        shape, dtype = tuple(first.shape[1:]), first.dtype
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, (np.ndarray, jax.Array)):
            raise TypeError(f"{name}[{i}] must be an array, got {type(b).__name__}")
        a = np.asarray(b)
        if a.ndim != len(shape) + 1 or tuple(a.shape[1:]) != shape or a.dtype != dtype:
            raise ValueError(
                f"{name}[{i}]: expected a batch of shape (B, {', '.join(map(str, shape))}) and "
                f"dtype {dtype}, got shape {tuple(a.shape)} and dtype {a.dtype}")
        if a.shape[0] == 0:
            continue
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name}[{i}] has NaN/Inf entries")
        out.append(a)
    return out


def collect_input_stats(
    model: nnx.Module,
    batches: Any,
    layers: Iterable[str] | Callable[[nnx.Module], dict[str, nnx.Module]] | None = None,
    *,
    reference: nnx.Module | None = None,
    sample_input: Any = None,
) -> dict[str, InputStats]:
    """Per-layer :class:`InputStats` of ``model``'s conv/linear layers over calibration batches.

    The model runs in eval mode on a copy (BatchNorm uses and keeps its running statistics);
    each layer's input is caught by the probes of :func:`factorize.conversion.layer_inputs`,
    turned into patch moments and merged batch by batch.

    Args:
      model: an NNX model.
      batches: an iterable of input batches (or one array, split into batches of 128).
      layers: the layer paths to collect (default: every ``nnx.Conv`` / ``nnx.Linear``), or a
        function ``model -> {path: layer}`` as in ``layer_inputs``.
      reference: a second model with the same layer paths (the original network) run on the
        same batches: the statistics are asymmetric (:attr:`InputStats.cross`), pairing
        ``model``'s inputs with ``reference``'s.
      sample_input: if given, every batch must match its example shape and dtype.

    Returns:
      ``{path: InputStats}`` in forward order.

    Raises:
      ValueError: an empty calibration set, a batch of the wrong shape or dtype, NaN/Inf inputs,
        or a layer whose inputs are not finite (named).

    Example::

        from factorize.models import CNN

        model = CNN(10, 1, rngs=nnx.Rngs(0))
        x = jax.random.uniform(jax.random.key(0), (64, 8, 8, 1))
        stats = factorize.collect_input_stats(model, [x[:32], x[32:]])
        {k: v.second.shape for k, v in stats.items()}
        # {'conv1': (9, 9), 'conv2': (288, 288), 'conv3': (576, 576), 'head': (128, 128)}
    """
    from factorize.conversion.convert import _geometry, _kernel, _Log, _Probe, candidate_layers
    from factorize.models.spec import set_submodule

    batches = check_calibration(batches, sample_input)
    found = candidate_layers(model)
    if layers is None:
        paths = list(found)
    elif callable(layers):
        found = layers(model)
        paths = list(found)
    else:
        paths = list(layers)
        missing = [p for p in paths if p not in found]
        if missing:
            raise ValueError(f"layers: {missing} are not conv/linear layers of the model; "
                             f"it has {list(found)}")
    specs = {}
    for path in paths:
        strides, padding, dilation, _ = _geometry(found[path])
        specs[path] = (tuple(int(s) for s in _kernel(found[path]).shape), strides, padding,
                       dilation)

    def catcher(m: nnx.Module):
        probe = nnx.clone(m)
        probe.eval()
        log = _Log()
        table = candidate_layers(probe) if not callable(layers) else layers(probe)
        for path in paths:
            if path not in table:
                raise ValueError(f"reference has no layer {path!r}; it has {list(table)}")
            set_submodule(probe, path, _Probe(table[path], path, log))
        graphdef, state = nnx.split(probe)

        @jax.jit
        def run(state, x):
            log.inputs = {}
            try:
                nnx.merge(graphdef, state)(x)
                return dict(log.inputs)
            finally:
                log.inputs = None

        return lambda x: run(state, x)

    run_model = catcher(model)
    run_ref = catcher(reference) if reference is not None else None
    acc: dict[str, InputStats] = {}
    for x in batches:
        got = run_model(jnp.asarray(x))
        ref = run_ref(jnp.asarray(x)) if run_ref is not None else {}
        for path in paths:
            if path not in got:
                continue  # a layer the forward pass never calls
            shape, strides, padding, dilation = specs[path]
            part = InputStats.from_inputs(got[path], shape, strides=strides, padding=padding,
                                          dilation=dilation, reference=ref.get(path))
            acc[path] = acc[path].merge(part) if path in acc else part
    for path, st in acc.items():
        if not all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(st)):
            raise ValueError(f"calibration: layer {path!r} gets NaN/Inf inputs (its input "
                             f"statistics are not finite)")
    return {p: acc[p] for p in paths if p in acc}
