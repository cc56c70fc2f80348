"""Data-aware projections: factors that minimise a layer's output error, not its kernel error.

For a layer with kernel ``W`` (``(kh, kw, C, N)``, read as the ``(P, N)`` matrix with
``P = kh·kw·C`` rows in HWIO order) and input patches ``p`` (the im2col rows of its input), the
output error of a factorized kernel ``Ŵ`` is

    E‖(W − Ŵ)ᵀ p‖² = tr((W − Ŵ)ᵀ S (W − Ŵ)),    S = E[p pᵀ]  (P × P),

the weighted least-squares problem of Zhang et al. (TPAMI 2016, "Accelerating Very Deep
Convolutional Networks for Classification and Detection", Sec. 3.1). Their asymmetric
reconstruction (Sec. 3.3) fits the original layer's response given the *converted* network's
input ``p̂``: ``E‖Wᵀp − Ŵᵀp̂‖² = tr((Ŵ − W*)ᵀ S_hh (Ŵ − W*)) + const`` with ``S_hh = E[p̂ p̂ᵀ]``,
``S_hx = E[p̂ pᵀ]`` and ``W* = S_hh⁻¹ S_hx W``: the same problem with ``S = S_hh`` and target
``W*``. Everything here takes ``(S, target)``.

``S`` is damped, ``S + damp · mean(diag S) · I``, so it is positive definite and the fit does not
chase directions the calibration data never excites.

The fit (:func:`fit`) has two steps:

1. *Initialisation*: the family's data-free projection of ``W`` and, where the family has one,
   its closed form ``Family.project_whitened`` (whitened SVD with the structured part of ``S``
   for which it is exact); the one with the lower objective is kept, so the result is never
   worse than the data-free projection on the objective.
2. *Refinement*: block-coordinate descent on the true objective with the full ``S``. The composed
   kernel (:func:`factorize.chain.compose`) is linear in each factor, so with the others fixed
   each block is a linear least-squares problem; a few conjugate-gradient iterations on its
   normal equations (matrix-vector products by ``compose`` and its transpose,
   ``jax.linear_transpose``) start from the current factor, and an update is kept only if it
   lowers the objective, which therefore never increases.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import solve_triangular

from factorize import chain as chain_lib

DEFAULT_DAMP = 1e-2
DEFAULT_SWEEPS = 10
DEFAULT_CG_ITERS = 8


# --- the structured parts of S (P = kh·kw·C, HWIO order: index (i·kw + j)·C + c) -----------


def damped(s: jax.Array, damp: float) -> jax.Array:
    """``S + damp · mean(diag S) · I`` (plain ``damp · I`` if ``S`` is zero)."""
    scale = jnp.mean(jnp.diag(s))
    scale = jnp.where(scale > 0, scale, 1.0)
    return s + damp * scale * jnp.eye(s.shape[0], dtype=s.dtype)


def _blocks(s: jax.Array, kernel_shape) -> jax.Array:
    kh, kw, c, _ = kernel_shape
    return s.reshape(kh, kw, c, kh, kw, c)


def channel_covariance(s: jax.Array, kernel_shape) -> jax.Array:
    """``(C, C)``: the channel blocks of ``S`` averaged over the kh·kw positions."""
    kh, kw, c, _ = kernel_shape
    b = _blocks(s, kernel_shape).reshape(kh * kw, c, kh * kw, c)
    return jnp.einsum("kckd->cd", b) / (kh * kw)


def per_channel_blocks(s: jax.Array, kernel_shape) -> jax.Array:
    """``(C, kh·kw, kh·kw)``: the position × position block of each input channel."""
    kh, kw, c, _ = kernel_shape
    b = s.reshape(kh * kw, c, kh * kw, c)
    return jnp.einsum("kclc->ckl", b)


def row_channel_blocks(s: jax.Array, kernel_shape) -> jax.Array:
    """``(kh·C, kh·C)`` indexed ``(i, c)``: the blocks of ``S`` at equal column offset ``j``,
    averaged over ``j`` (the row side of the spatial family's ``(kh·C) × (kw·N)`` unfolding)."""
    kh, kw, c, _ = kernel_shape
    b = _blocks(s, kernel_shape)
    return jnp.einsum("ijcxjd->icxd", b).reshape(kh * c, kh * c) / kw


def whitened_svd(m: jax.Array, rank: int, left: jax.Array | None = None):
    """Best rank-``rank`` ``(A, B)`` for ``min ‖Lᵀ (M − A B)‖_F`` (batched over leading axes).

    ``left`` is the Cholesky factor ``L`` of the row weight ``S = L Lᵀ``:
    ``‖Lᵀ(M − AB)‖² = tr((M − AB)ᵀ S (M − AB))``, minimised by the truncated SVD of ``Lᵀ M``
    (Eckart–Young) un-whitened, ``A ← L⁻ᵀ A``. ``left=None`` is the plain truncated SVD.
    """
    from factorize.families.svd import truncated_svd

    if left is None:
        return truncated_svd(m, rank)
    lt = jnp.swapaxes(left, -1, -2)
    a, b = truncated_svd(lt @ m, rank)
    return solve_triangular(lt, a, lower=False), b


def cholesky(s: jax.Array) -> jax.Array:
    """Lower Cholesky factor (batched); ``s`` is symmetrised first."""
    return jnp.linalg.cholesky(0.5 * (s + jnp.swapaxes(s, -1, -2)))


def channel_whitened(project: Callable) -> Callable:
    """A ``project_whitened`` for a family whose first stage is a 1×1 conv on the C inputs.

    Projects ``W' = Lᵀ ×_C W`` (``L Lᵀ`` = :func:`channel_covariance` of ``S``) and maps the first
    factor back, ``F₁ ← L⁻ᵀ F₁``: since the composed kernel is linear in the first factor's
    input axis, ``Ŵ = L⁻ᵀ ×_C Ŵ'``. For ``S = I_{kh·kw} ⊗ S_C`` (every position has the same
    channel covariance and positions are uncorrelated) the objective is ``‖W' − Ŵ'‖²``, so the
    result is exactly as optimal as ``project`` is for the Frobenius norm: exact for the SVD
    families (``lowrank_in``, ``bsconv``), HOOI/ALS-quality for ``tucker2``/``cp3``/``cp4``.
    """

    def project_whitened(kernel, rank, s, **options):
        l_c = cholesky(channel_covariance(s, kernel.shape))
        factors, _ = project(jnp.einsum("hwcn,cd->hwdn", kernel, l_c), rank, **options)
        first = factors[0]  # (1, 1, C, M)
        mapped = solve_triangular(l_c.T, first[0, 0], lower=False)
        return (mapped.reshape(first.shape), *factors[1:])

    return project_whitened


@functools.partial(jax.jit, static_argnames=("damp", "asymmetric"))
def weight_and_target(kernel, moments, damp: float, asymmetric: bool):
    """``(S, target)`` from ``(S_hh, S_hx, S_xx)`` (``InputStats.moments``): ``S`` the damped
    ``S_hh``; the target ``W``, or ``W* = S⁻¹ S_hx W`` for asymmetric statistics (Zhang et al.
    2016, Sec. 3.3, with the damped ``S``)."""
    s_hh, s_hx, _ = moments
    s = damped(s_hh, damp)
    if not asymmetric:
        return s, kernel
    p = s.shape[0]
    w = kernel.reshape(p, -1)
    target = jax.scipy.linalg.cho_solve((cholesky(s), True), s_hx @ w)
    return s, target.reshape(kernel.shape)


# --- the objective and the refinement --------------------------------------------------------


def objective(s: jax.Array, target: jax.Array, kernel: jax.Array) -> jax.Array:
    """``tr((K − T)ᵀ S (K − T))`` for kernels ``K``, ``T`` of shape ``(kh, kw, C, N)``."""
    d = (kernel - target).reshape(s.shape[0], -1)
    return jnp.sum(d * (s @ d))


@functools.partial(jax.jit, static_argnames="stages")
def _score(factors, s, target, *, stages):
    return objective(s, target, chain_lib.compose(stages, factors))


@functools.partial(jax.jit, static_argnames=("stages", "sweeps", "cg_iters"))
def refine(factors, s, target, *, stages, sweeps: int, cg_iters: int):
    """Block-coordinate descent on :func:`objective` over the factors of a chain.

    Each sweep visits every factor; the block problem ``min_F tr((K(F) − T)ᵀ S (K(F) − T))`` is
    linear least squares in ``F`` (``K`` = :func:`factorize.chain.compose` with the other factors
    fixed); ``cg_iters`` conjugate-gradient steps on its normal equations ``Kᵀ S K F = Kᵀ S T``
    start from the current ``F``, and the step is kept only if the objective drops.

    Returns ``(factors, objectives)``: the objective before the first sweep and after each.
    """
    n_out = target.shape[-1]

    def composed(fs):
        return chain_lib.compose(stages, fs).reshape(-1, n_out)

    t = target.reshape(-1, n_out)

    def value(fs):
        d = composed(fs) - t
        return jnp.sum(d * (s @ d))

    def sweep(k, carry):
        fs, history = carry
        fs = list(fs)
        current = value(fs)
        for i in range(len(fs)):
            def block(v, i=i, fixed=tuple(fs)):
                return composed(fixed[:i] + (v,) + fixed[i + 1:])

            transpose = jax.linear_transpose(block, fs[i])

            def normal(v, block=block, transpose=transpose):
                return transpose(s @ block(v))[0]

            rhs = transpose(s @ t)[0]
            x, _ = jax.scipy.sparse.linalg.cg(normal, rhs, x0=fs[i], maxiter=cg_iters)
            trial = fs[:i] + [x] + fs[i + 1:]
            new = value(trial)
            better = jnp.isfinite(new) & (new < current)
            fs[i] = jnp.where(better, x, fs[i])
            current = jnp.where(better, new, current)
        return tuple(fs), history.at[k + 1].set(current)

    history = jnp.full((sweeps + 1,), jnp.nan, target.dtype).at[0].set(value(list(factors)))
    return lax.fori_loop(0, sweeps, sweep, (tuple(factors), history))


def fit(
    kernel: jax.Array,
    family: Any,
    rank: Any,
    s: jax.Array,
    target: jax.Array,
    *,
    sweeps: int = DEFAULT_SWEEPS,
    cg_iters: int = DEFAULT_CG_ITERS,
    options: dict[str, Any] | None = None,
) -> tuple[tuple[jax.Array, ...], dict[str, Any]]:
    """Factors of ``family`` at ``rank`` minimising :func:`objective` ``(s, target, Ŵ)``.

    ``s`` is the damped (positive definite) weight, ``target`` the kernel to fit (``W``, or
    ``W*`` in asymmetric mode); ``kernel`` is the layer's own kernel, whose data-free projection
    is one of the two initialisations (see the module docstring).

    Returns ``(factors, info)`` with ``info["init"]`` (``"data-free"`` or ``"whitened"``),
    ``info["objectives"]`` (the objective after initialisation and after each sweep).
    """
    options = dict(options or {})
    stages = family.chain(tuple(kernel.shape), rank)
    candidates = {"data-free": tuple(family.project(kernel, rank, **options)[0])}
    if family.project_whitened is not None:
        candidates["whitened"] = tuple(family.project_whitened(target, rank, s, **options))
    scores = {name: float(_score(fs, s, target, stages=stages))
              for name, fs in candidates.items()}
    finite = {k: v for k, v in scores.items() if jnp.isfinite(v)}
    init = min(finite, key=finite.get) if finite else "data-free"
    factors = candidates[init]
    history = [scores[init]]
    if sweeps > 0:
        factors, objectives = refine(factors, s, target, stages=stages, sweeps=sweeps,
                                     cg_iters=cg_iters)
        history = [float(v) for v in objectives]
    return tuple(factors), {"init": init, "init_objectives": scores, "objectives": history}
