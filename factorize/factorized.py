"""The factorized value: a family's chain of stage kernels, as a JAX pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from factorize import chain as chain_lib
from factorize._checks import Padding, check_kernel
from factorize.chain import Chain, KernelShape
from factorize.families import Rank, RankArg, get_family, resolve_rank
from factorize.families.data_aware import DEFAULT_DAMP, DEFAULT_SWEEPS


@jax.tree_util.register_pytree_node_class
class Factorized:
    """A conv kernel ``(kh, kw, C, N)`` held as the stage kernels of a family's chain.

    The factors are the pytree leaves; ``family``, ``rank`` and ``kernel_shape`` are static.

    Attributes:
      family: the family's name (see ``factorize.FAMILIES``).
      rank: the resolved rank (an int, a pair for ``tucker2``, ``None`` for ``full``).
      kernel_shape: the shape of the full kernel this chain equals, HWIO.
      factors: the stage kernels, HWIO with in-channels per group.

    Example::

        f = factorize.random_factorized(jax.random.key(0), (3, 3, 16, 32), "dsc", rank=1)
        [x.shape for x in f.factors]     # [(3, 3, 1, 16), (1, 1, 16, 32)]
        f.to_kernel().shape              # (3, 3, 16, 32): the full kernel it equals
        f.macs(8), f.params              # (41984, 656): 64·(9·16 + 16·32) MACs, 9·16 + 16·32
        f(jnp.ones((2, 8, 8, 16)), strides=2).shape     # (2, 4, 4, 32)
    """

    def __init__(
        self, family: str, rank: Rank, kernel_shape: Sequence[int], factors: Sequence[jax.Array]
    ):
        self.family = family
        self.rank = rank
        self.kernel_shape: KernelShape = tuple(int(s) for s in kernel_shape)  # type: ignore
        self.factors = tuple(factors)
        stages = self.stages
        if len(self.factors) != len(stages):
            raise ValueError(
                f"factors: {family!r} at rank {rank} has {len(stages)} stages, "
                f"got {len(self.factors)} factors"
            )
        for i, (st, f) in enumerate(zip(stages, self.factors, strict=True)):
            if tuple(f.shape) != st.shape:
                raise ValueError(f"factors[{i}] must have shape {st.shape}, got {tuple(f.shape)}")

    # pytree protocol: leaves are the factors; unflattening skips the shape checks because JAX
    # may rebuild the value with placeholder leaves.
    def tree_flatten(self):
        return self.factors, (self.family, self.rank, self.kernel_shape)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        obj = object.__new__(cls)
        obj.family, obj.rank, obj.kernel_shape = aux
        obj.factors = tuple(leaves)
        return obj

    @property
    def stages(self) -> Chain:
        """The chain's stages (shapes, groups, which stage owns stride/padding)."""
        return get_family(self.family).chain(self.kernel_shape, self.rank)

    @property
    def params(self) -> int:
        """Number of factor entries (no bias)."""
        return chain_lib.chain_params(self.stages)

    def to_kernel(self) -> jax.Array:
        """The full kernel ``(kh, kw, C, N)`` that the chain equals."""
        return chain_lib.compose(self.stages, self.factors)

    def macs(
        self,
        input_hw: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        padding: Padding = "SAME",
        dilation: int | Sequence[int] = 1,
        *,
        count_padding: bool = True,
    ) -> int:
        """Conventional MACs of the chain on one image of size ``input_hw``."""
        return chain_lib.chain_macs(
            self.stages, input_hw, strides, padding, dilation, count_padding=count_padding
        )

    def __call__(
        self,
        x: jax.Array,
        strides: int | Sequence[int] = 1,
        padding: Padding = "SAME",
        dilation: int | Sequence[int] = 1,
    ) -> jax.Array:
        """Runs the chain (never the composed kernel) on an NHWC batch ``x``."""
        c = self.kernel_shape[2]
        if x.ndim != 4 or x.shape[-1] != c:
            raise ValueError(f"x must be NHWC with {c} channels, got shape {tuple(x.shape)}")
        return chain_lib.run_chain(x, self.stages, self.factors, strides, padding, dilation)

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(f.shape)) for f in self.factors)
        return (
            f"Factorized(family={self.family!r}, rank={self.rank}, "
            f"kernel_shape={self.kernel_shape}, factors=[{shapes}])"
        )


def decompose(
    kernel: Any,
    family: str,
    rank: RankArg = "full",
    *,
    layout: str = "HWIO",
    return_info: bool = False,
    inputs: Any = None,
    damp: float = DEFAULT_DAMP,
    refine: int = DEFAULT_SWEEPS,
    centered: bool = False,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    dilation: int | Sequence[int] = 1,
    **options: Any,
) -> Factorized | tuple[Factorized, dict[str, Any]]:
    """Projects a conv kernel onto a family: the factorized conv closest to it.

    Closest in kernel error ``‖W − Ŵ‖_F`` (data-free), or, given the layer's ``inputs``, in
    output error ``E‖(W − Ŵ)ᵀ p‖² = tr((W − Ŵ)ᵀ S (W − Ŵ))`` over its input patches ``p``
    (data-aware; ``factorize.families.data_aware`` and docs/data_aware.md): the better of the
    data-free projection and the family's whitened closed form, then ``refine`` sweeps of
    block-coordinate descent on the output error. Statistics with a reference
    (``InputStats.asymmetric``) fit the reference layer's response ``Wᵀ p_ref`` from this
    layer's inputs ``p`` (asymmetric reconstruction, Zhang et al. TPAMI 2016, Sec. 3.3).

    Args:
      kernel: ``(kh, kw, C, N)`` (HWIO, Flax's layout) or ``(N, C, kh, kw)`` with
        ``layout="OIHW"`` (PyTorch's).
      family: one of ``factorize.FAMILIES``.
      rank: an int (a pair ``(R_in, R_out)`` for ``tucker2``), a float in (0, 1] — the largest
        rank with at most that fraction of the full kernel's parameters — or ``"full"``, the
        smallest rank at which the family is exact.
      return_info: also return the projection's diagnostics (e.g. an error history).
      inputs: ``None`` (data-free), a ``factorize.InputStats`` of the layer's input patches
        (its ``patch_size`` must be ``kh·kw·C``), or a raw NHWC input batch, read with
        ``strides``, ``padding`` and ``dilation`` (the layer's geometry; used only then).
      damp: data-aware only: the ridge ``S + damp · mean(diag S) · I`` (default 1e-2).
      refine: data-aware only: block-coordinate-descent sweeps after the initialisation
        (default 10; 0: the initialisation alone).
      centered: data-aware only: fit the covariance instead of the uncentered second moment,
        for a layer whose bias is refitted to absorb the mean error.
      **options: family-specific projection options (e.g. ``n_iter`` for CP).

    Returns:
      The :class:`Factorized` value (and the info dict if ``return_info``).

    Example::

        w = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))     # HWIO
        f = factorize.decompose(w, "dsc", rank=1)   # the MobileNet block closest to w
        y = f(jnp.ones((2, 8, 8, 16)))              # runs depthwise then pointwise
        factorize.relative_error(w, f)              # ≈ 0.88 for a random kernel
        factorize.decompose(w, "tucker2", rank=0.25)    # within 1/4 of the parameters
        factorize.decompose(jnp.transpose(w, (3, 2, 0, 1)), "spatial", rank=4,
                            layout="OIHW")          # a PyTorch-ordered (N, C, kh, kw) kernel
        x = jax.random.normal(jax.random.key(1), (8, 8, 8, 16))     # the layer's inputs
        g = factorize.decompose(w, "dsc", rank=1, inputs=x)         # fit to the outputs
    """
    fam = get_family(family)
    kernel = check_kernel(kernel, layout=layout)
    shape = tuple(int(s) for s in kernel.shape)
    r = resolve_rank(fam, shape, rank)
    if inputs is None:
        factors, info = fam.project(kernel, r, **options)
    else:
        factors, info = _data_aware(kernel, fam, r, inputs, damp=damp, refine=refine,
                                    centered=centered, geometry=(strides, padding, dilation),
                                    options=options)
    out = Factorized(fam.name, r, shape, factors)
    return (out, info) if return_info else out


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


def _data_aware(kernel, fam, rank, inputs, *, damp, refine, centered, geometry, options):
    """The data-aware fit of ``decompose``: statistics checked, ``(S, target)`` built."""
    from factorize.conversion.calibration import InputStats, output_error
    from factorize.families import data_aware

    shape = tuple(int(s) for s in kernel.shape)
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not damp > 0 \
            or not np.isfinite(damp):
        raise ValueError(f"damp must be a float > 0, got {damp!r}")
    if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)) or refine < 0:
        raise ValueError(f"refine must be an int >= 0 (sweeps), got {refine!r}")
    if not isinstance(inputs, InputStats):
        strides, padding, dilation = geometry
        inputs = InputStats.from_inputs(inputs, shape, strides=strides, padding=padding,
                                        dilation=dilation)
    p = shape[0] * shape[1] * shape[2]
    if inputs.patch_size != p or tuple(inputs.second.shape) != (p, p):
        raise ValueError(
            f"inputs: statistics of patch length {inputs.patch_size} do not fit a kernel "
            f"{shape}, whose patches have kh·kw·C = {p} entries")
    if not _all_finite(inputs):
        raise ValueError("inputs: the statistics have NaN/Inf entries")
    w = kernel.astype(jnp.float32)
    s, target = data_aware.weight_and_target(w, inputs.moments(centered), float(damp),
                                             inputs.asymmetric)
    factors, info = data_aware.fit(w, fam, rank, s, target, sweeps=int(refine),
                                   options=options)
    approx = chain_lib.compose(fam.chain(shape, rank), factors)
    info["output_error"] = float(output_error(w, approx, inputs, centered=centered))
    factors = tuple(f.astype(kernel.dtype) for f in factors)
    return factors, info


def decompose_many(
    kernels: Sequence[Any],
    family: str,
    rank: RankArg = "full",
    *,
    workers: int = 2,
    layout: str = "HWIO",
    **options: Any,
) -> list[Factorized]:
    """:func:`decompose` on each kernel (a whole model's convs), in order.

    Kernels are grouped by shape; the groups run on ``workers`` threads, so one group's jit
    compilation (single-threaded, GIL released) overlaps another's ALS sweeps, and each
    shape compiles once (docs/benchmarks.md: a ResNet-18's 3×3 convs to cp4, 2 workers
    against 1). ``workers=1`` runs sequentially.

    Returns:
      The :class:`Factorized` values, in the order of ``kernels`` (identical to
      ``[decompose(k, family, rank, **options) for k in kernels]``).

    Example::

        kernels = [jax.random.normal(jax.random.key(i), (3, 3, 16, c)) for i, c in
                   enumerate((16, 16, 32))]      # two shapes: two compilations, overlapped
        fs = factorize.decompose_many(kernels, "tucker2", rank=0.25)
        [f.rank for f in fs]                     # [(6, 6), (6, 6), (6, 12)]
    """
    kernels = [check_kernel(k, f"kernels[{i}]", layout) for i, k in enumerate(kernels)]
    jobs = [DecomposeJob(k, family, rank, options) for k in kernels]
    out, errors = decompose_jobs(jobs, workers=workers)
    if errors:
        raise errors[min(errors)]
    return out  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class DecomposeJob:
    """One :func:`decompose` call: a checked HWIO ``kernel``, its family, rank and options."""

    kernel: jax.Array
    family: str
    rank: RankArg
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def decompose_jobs(
    jobs: Sequence[DecomposeJob],
    *,
    workers: int = 2,
    on_done: Callable[[int], None] | None = None,
) -> tuple[list[Factorized | None], dict[int, Exception]]:
    """Runs ``decompose`` for every job, grouped by kernel shape and dtype on ``workers``
    threads (see :func:`decompose_many`).

    Returns ``(results, errors)`` by job index. After the first error no further job starts
    (a running one finishes), so ``errors`` holds the failures of the jobs that ran and
    ``results`` is ``None`` where a job failed or never ran. ``on_done(i)`` is called (from a
    worker thread) as job ``i`` finishes.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((tuple(job.kernel.shape), job.kernel.dtype), []).append(i)
    out: list[Factorized | None] = [None] * len(jobs)
    errors: dict[int, Exception] = {}

    def run(indices: list[int]) -> None:
        for i in indices:
            if errors:
                return
            job = jobs[i]
            try:
                out[i] = decompose(job.kernel, job.family, job.rank, **job.options)
            except Exception as e:  # reported by index to the caller, which names the input
                errors[i] = e
                return
            if on_done is not None:
                on_done(i)

    # largest kernels first: the longest groups start early and the short ones fill in
    order = sorted(groups.values(), key=lambda ix: -jobs[ix[0]].kernel.size * len(ix))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # one worker: in order, one at a time
        for fut in [pool.submit(run, ix) for ix in order]:
            fut.result()
    return out, errors


def from_factors(
    family: str, rank: RankArg, kernel_shape: Sequence[int], factors: Sequence[Any]
) -> Factorized:
    """A factorized value from given stage kernels (checked against the family's chain).

    Example::

        reduce = jnp.ones((1, 1, 8, 4))          # 1×1 8→4
        spatial = jnp.ones((3, 3, 4, 16))        # 3×3 4→16
        f = factorize.from_factors("lowrank_in", 4, (3, 3, 8, 16), [reduce, spatial])
        f.to_kernel()[0, 0, 0, 0]                # 4.0: the sum over the 4 reduced channels
    """
    fam = get_family(family)
    shape = tuple(int(s) for s in kernel_shape)
    r = resolve_rank(fam, shape, rank)  # type: ignore[arg-type]
    return Factorized(fam.name, r, shape, [jnp.asarray(f) for f in factors])


def random_factorized(
    key: jax.Array, kernel_shape: Sequence[int], family: str, rank: RankArg = "full",
    *, dtype: Any = jnp.float32,
) -> Factorized:
    """Random factors (each stage LeCun-normal over its own fan-in), e.g. to train from scratch.

    Example::

        f = factorize.random_factorized(jax.random.key(0), (3, 3, 64, 64), "cp3", rank=0.25)
        f.rank, f.params / (3 * 3 * 64 * 64)     # (67, 0.249): at most 1/4 of the parameters
    """
    fam = get_family(family)
    shape = tuple(int(s) for s in kernel_shape)
    r = resolve_rank(fam, shape, rank)
    stages = fam.chain(shape, r)
    init = jax.nn.initializers.lecun_normal()
    keys = jax.random.split(key, len(stages))
    factors = [init(k, st.shape, dtype) for k, st in zip(keys, stages, strict=True)]
    return Factorized(fam.name, r, shape, factors)


def relative_error(kernel: Any, f: Factorized, *, layout: str = "HWIO") -> jax.Array:
    """``‖W − f.to_kernel()‖_F / ‖W‖_F``.

    Example::

        w = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
        factorize.relative_error(w, factorize.decompose(w, "lowrank_in", rank="full"))  # ≈ 1e-6
        factorize.relative_error(w, factorize.decompose(w, "spatial", rank=4))          # ≈ 0.89
    """
    w = check_kernel(kernel, layout=layout)
    if tuple(w.shape) != f.kernel_shape:
        raise ValueError(
            f"kernel shape {tuple(w.shape)} does not match the factorized value's "
            f"kernel_shape {f.kernel_shape}"
        )
    return _relative_error(w, f)


@jax.jit
def _relative_error(w: jax.Array, f: Factorized) -> jax.Array:
    norm = jnp.linalg.norm(w)
    return jnp.linalg.norm(w - f.to_kernel()) / jnp.where(norm > 0, norm, 1.0)


