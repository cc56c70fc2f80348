"""Tucker-2 on the channel modes of a conv kernel (Kim et al. 2016).

``W[k, c, n] ≈ Σ U[c, i] G[k, i, j] V[n, j]`` with orthonormal ``U`` (C×R1), ``V`` (N×R2) and
the core ``G`` (kh·kw × R1 × R2), i.e. the chain 1×1 C→R1, kh×kw R1→R2, 1×1 R2→N.

Fitted by HOSVD (the leading left singular vectors of the mode-C and mode-N unfoldings) and then
HOOI (De Lathauwer, De Moor & Vandewalle 2000, "On the best rank-(R1,…,RN) approximation…",
Alg. 4.2): alternately, ``U`` is the dominant R1-dimensional left subspace of ``W ×_N Vᵀ``
unfolded along C, and ``V`` likewise with ``U`` fixed. With orthonormal factors the best core is
``W ×_C Uᵀ ×_N Vᵀ`` and ``‖W − Ŵ‖² = ‖W‖² − ‖G‖²`` (the error HOOI maximises ‖G‖ to reduce).
The whole loop is one jit-compiled ``lax.while_loop``; the dominant subspaces come from the
eigenvectors of the small C×C / N×N Gram matrices, never from an SVD of a long unfolding.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from factorize.decompositions.cp import _error_capacity


def _dominant_subspace(m: jax.Array, rank: int) -> jax.Array:
    """An orthonormal basis of the leading ``rank`` left singular vectors of ``m``."""
    _, vecs = jnp.linalg.eigh(m @ m.T)
    return vecs[:, ::-1][:, :rank]


@functools.partial(jax.jit, static_argnames=("r1", "r2", "capacity"))
def _tucker_fit(kernel: jax.Array, tol: jax.Array, n_iter: jax.Array, *, r1: int, r2: int,
                capacity: int):
    """Scaling, HOSVD, up to ``n_iter`` HOOI sweeps and the exact error, as one program.

    ``tol`` and ``n_iter`` are traced (the error history has the static length ``capacity``,
    see ``cp._error_capacity``), so one compilation serves every budget in a bucket.
    """
    kh, kw, c, n = kernel.shape
    k = kh * kw
    w0 = kernel.reshape(k, c, n)
    norm = jnp.linalg.norm(w0)
    scale = jnp.where(norm > 0, norm, 1.0)
    w = w0 / scale
    w_c = w.transpose(1, 0, 2).reshape(c, k * n)
    w_n = w.transpose(2, 0, 1).reshape(n, k * c)
    u = _dominant_subspace(w_c, r1)
    v = _dominant_subspace(w_n, r2)
    sq_norm = jnp.sum(w * w)
    tol = jnp.asarray(tol, w.dtype)

    def sweep(carry):
        i, u, v, errors = carry
        y = jnp.einsum("kcn,nj->ckj", w, v).reshape(c, k * r2)
        u = _dominant_subspace(y, r1)
        z = jnp.einsum("kcn,ci->nki", w, u)
        v = _dominant_subspace(z.reshape(n, k * r1), r2)
        core = jnp.einsum("nki,nj->kij", z, v)
        err = jnp.sqrt(jnp.maximum(sq_norm - jnp.sum(core * core), 0.0))
        return i + 1, u, v, errors.at[i].set(err)

    def keep_going(carry):
        i, errors = carry[0], carry[-1]
        prev = errors[jnp.maximum(i - 2, 0)]
        last = errors[jnp.maximum(i - 1, 0)]
        return (i < n_iter) & ~((i >= 2) & (jnp.abs(prev - last) < tol))

    errors = jnp.full((capacity,), jnp.nan, w.dtype)
    i, u, v, errors = lax.while_loop(
        keep_going, sweep, (jnp.asarray(0, jnp.int32), u, v, errors))
    core = jnp.einsum("kcn,ci,nj->kij", w, u, v)
    approx = jnp.einsum("ci,kij,nj->kcn", u, core, v)
    rel_error = jnp.linalg.norm(w - approx)  # w has unit norm (or is zero)
    core = core * scale
    factors = (u.reshape(1, 1, c, r1), core.reshape(kh, kw, r1, r2), v.T.reshape(1, 1, r2, n))
    return factors, errors, i, rel_error


def tucker2_project(
    kernel: jax.Array,
    rank: tuple[int, int],
    *,
    n_iter: int = 100,
    tol: float | None = 1e-6,
):
    """Tucker-2 of a kernel ``(kh, kw, C, N)`` on its channel modes: HOSVD, then HOOI.

    Args:
      kernel: ``(kh, kw, C, N)``, finite.
      rank: ``(R1, R2)`` with ``1 ≤ R1 ≤ C`` and ``1 ≤ R2 ≤ N``.
      n_iter: the HOOI sweep budget (default 100); the HOSVD is the starting point.
      tol: stop once the relative error changes by less than ``tol`` between sweeps (default
        1e-6; ``None`` or 0 runs all ``n_iter`` sweeps).

    Returns:
      ``((U as 1×1 C→R1, core kh×kw R1→R2, Vᵀ as 1×1 R2→N), info)``; ``info["errors"]`` is the
      relative error after each sweep (from ``‖W‖² − ‖G‖²``, accurate to ~1e-3 in float32),
      ``info["n_iter"]`` the sweeps run, ``info["rel_error"]`` the exact final error.
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
    tol = 0.0 if tol is None else tol
    if not isinstance(tol, (int, float)) or not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be None or a finite float >= 0, got {tol!r}")
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be 4-D (kh, kw, C, N), got shape {tuple(kernel.shape)}")
    kh, kw, c, n = kernel.shape
    if not (isinstance(rank, (tuple, list)) and len(rank) == 2):
        raise ValueError(f"rank must be a pair (R1, R2), got {rank!r}")
    r1, r2 = rank
    for name, r, size, mode in (("rank[0]", r1, c, "C"), ("rank[1]", r2, n, "N")):
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= size:
            raise ValueError(f"{name} must be an int in [1, {mode}={size}], got {r!r}")
    if not np.all(np.isfinite(np.asarray(kernel))):
        raise ValueError("kernel must be finite, got NaN/Inf entries")
    dtype = kernel.dtype if kernel.dtype in (jnp.float32, jnp.float64) else jnp.float32
    factors, errors, done, rel_error = _tucker_fit(
        kernel.astype(dtype), float(tol), int(n_iter), r1=int(r1), r2=int(r2),
        capacity=_error_capacity(int(n_iter)),
    )
    done = int(done)
    info: dict[str, Any] = {
        "errors": np.asarray(errors[:done]),
        "n_iter": done,
        "converged": bool(tol > 0 and done < n_iter),
        "rel_error": float(rel_error),
    }
    return factors, info
