"""CP decompositions of conv kernels by alternating least squares (Lebedev et al. 2015).

``cp3`` fits the 3-way tensor ``(kh·kw, C, N)``; ``cp4`` fits the 4-way kernel
``(kh, kw, C, N)``. Both run one jit-compiled ALS loop (Kolda & Bader 2009, §3.4):
each factor in turn is the least-squares solution with the others fixed,

    F ← MTTKRP(W, others) · (⊛_{others} GᵀG + λ I)⁻¹,

where ⊛ is the Hadamard product of the other factors' R×R Gram matrices. Why it is fast on
conv kernels: the spatial modes are tiny (kh, kw ≈ 3), so all heavy work is in the channel
modes. One sweep (C, N, then the spatial factors) needs only two contractions of ``W`` with an
``(·, R)`` matrix, each a plain matmul ``(kh·kw·C, N) @ (N, R)``; no Khatri–Rao product of
size ``(kh·kw·C·N, R)`` is ever formed, and the three remaining MTTKRPs reuse those products.

Robustness: the kernel is scaled to unit norm before fitting (so ``l2_reg`` is scale-free),
the ridge ``λ = l2_reg · mean(diag(Gram))`` keeps the R×R systems solvable for rank-deficient
kernels and ranks larger than the modes, the columns are rebalanced across modes after each
sweep, and a non-finite solve keeps the previous factor, so the factors are always finite.

Compilation: scaling, initialisation, the ALS loop and the final error are one jitted program
(``_cp_fit``) whose static arguments are the kernel's shape, the rank, the mode count, the
init kind and the error-history length bucket; the sweep budget ``n_iter`` (a ``while_loop``
bound), ``tol``, ``l2_reg`` and the seed are traced, so changing them does not recompile.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from factorize._reductions import tree_sum

# A floor on the ridge so an all-zero kernel (Gram = 0) still gives a solvable system.
_TINY = 1e-30


def _check_options(
    n_iter: Any, tol: Any, init: Any, l2_reg: Any, seed: Any
) -> tuple[int, float, str, float, int]:
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
    if tol is None:
        tol = 0.0
    if not isinstance(tol, (int, float)) or not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be None or a finite float >= 0, got {tol!r}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    if not isinstance(l2_reg, (int, float)) or not np.isfinite(l2_reg) or l2_reg < 0:
        raise ValueError(f"l2_reg must be a finite float >= 0, got {l2_reg!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(n_iter), float(tol), init, float(l2_reg), int(seed)


def _check_rank(rank: Any, upper: int | None = None) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if upper is not None and rank > upper:
        raise ValueError(f"rank must be at most {upper} for this kernel, got {rank}")
    return int(rank)


def _unit_columns(x: jax.Array) -> jax.Array:
    norms = jnp.linalg.norm(x, axis=0, keepdims=True)
    return x / jnp.where(norms > 0, norms, 1.0)


def _leading_vectors(unfolding: jax.Array, rank: int, key: jax.Array) -> jax.Array:
    """The leading ``min(rank, rows)`` left singular vectors of ``unfolding``; any further
    columns (a rank larger than the mode) are random unit vectors.

    Computed from the eigenvectors of the small ``rows × rows`` Gram matrix, which is cheap for
    channel modes (≤ a few thousand) however long the unfolding is.
    """
    rows = unfolding.shape[0]
    k = min(rank, rows)
    _, vecs = jnp.linalg.eigh(unfolding @ unfolding.T)
    lead = vecs[:, ::-1][:, :k]
    if rank > rows:
        extra = _unit_columns(jax.random.normal(key, (rows, rank - rows), unfolding.dtype))
        lead = jnp.concatenate([lead, extra], axis=1)
    return lead


def _spd_leaf_inverse(a: jax.Array, ridge: jax.Array) -> jax.Array:
    """Inverse of a small SPD block by one Cholesky factorisation of the bordered matrix
    ``[[a, I], [I, d·I]]``, whose lower-left block is ``L⁻ᵀ`` (``d > ‖a⁻¹‖`` keeps it positive
    definite: ``a``'s eigenvalues are at least ``ridge``, the padding's are 1)."""
    n = a.shape[0]
    eye = jnp.eye(n, dtype=a.dtype)
    bordered = jnp.block([[a, eye], [eye, (4.0 / jnp.minimum(ridge, 1.0)) * eye]])
    l_inv = jnp.linalg.cholesky(bordered)[n:, :n].T
    return l_inv.T @ l_inv


_INVERSE_BLOCK = 64


def _spd_inverse(a: jax.Array, ridge: jax.Array) -> jax.Array:
    """Inverse of a symmetric positive-definite ``a`` whose eigenvalues are at least ``ridge``.

    Why not ``jnp.linalg.solve``: on XLA:CPU its triangular solves are lowered to a slow HLO
    loop (about 10 ms for a 64×64 system, 40× the matmuls of a whole ALS sweep), and jaxlib's
    Cholesky slows down sharply past ~128. So: block Gauss–Jordan elimination (no pivoting,
    stable for SPD matrices: every pivot block is a Schur complement of ``a``, eigenvalues ≥
    ``ridge``) in blocks of 64, each step one rank-64 update, as a ``fori_loop`` over the blocks
    (``a`` padded with an identity block to a multiple of 64). One loop body compiles in about
    half the time of the Schur-complement recursion it replaced (cp4 (512, 512, 3, 3), R = 572:
    6.8 s against 12.3 s), at the same run time and accuracy.
    """
    n, b = a.shape[0], _INVERSE_BLOCK
    if n <= b:
        return _spd_leaf_inverse(a, ridge)
    m = -(-n // b) * b
    g = jnp.eye(m, dtype=a.dtype).at[:n, :n].set(a)

    def eliminate(k, g):  # Gauss–Jordan on block column k, in place
        s = k * b
        col = lax.dynamic_slice(g, (0, s), (m, b))
        pivot = _spd_leaf_inverse(lax.dynamic_slice(g, (s, s), (b, b)), ridge)
        row = pivot @ lax.dynamic_slice(g, (s, 0), (b, m))
        g = g - col @ row
        g = lax.dynamic_update_slice(g, row, (s, 0))
        g = lax.dynamic_update_slice(g, -col @ pivot, (0, s))
        return lax.dynamic_update_slice(g, pivot, (s, s))

    inv = lax.fori_loop(0, m // b, eliminate, g)[:n, :n]
    return (inv + inv.T) / 2


def _solve(gram: jax.Array, mttkrp: jax.Array, l2_reg: float, old: jax.Array) -> jax.Array:
    """``mttkrp · (gram + λI)⁻¹`` with a relative ridge; keeps ``old`` if the solve fails.

    Multiplying by an explicit inverse is not backward stable: in float32, with the Gram
    matrix as ill-conditioned as the ridge allows (cond ≈ 1/l2_reg = 1e6, e.g. a rank-3 kernel
    fitted at R = 40), the update's residual was ~10 % and ALS's error jumped between 0.003 and
    0.9 from sweep to sweep. One step of iterative refinement, ``X += (M − X·A)·A⁻¹`` (two more
    ``(rows, R) @ (R, R)`` matmuls), brings it to the accuracy of a direct solve.
    """
    r = gram.shape[0]
    lam = l2_reg * jnp.trace(gram) / r + _TINY
    a = gram + lam * jnp.eye(r, dtype=gram.dtype)
    inv = _spd_inverse(a, lam)
    new = mttkrp @ inv
    new = new + (mttkrp - new @ a) @ inv
    return jnp.where(jnp.all(jnp.isfinite(new)), new, old)


def _balance(factors: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    """Rescales each component's columns to a common norm (the model is unchanged).

    Keeps the Gram matrices comparably scaled, so the relative ridge acts alike on every mode.
    Returns the rescaled factors and each factor's column multipliers.
    """
    norms = [jnp.linalg.norm(f, axis=0) for f in factors]
    alive = jnp.all(jnp.stack([n > 0 for n in norms]), axis=0)
    geo = jnp.exp(sum(jnp.log(jnp.where(alive, n, 1.0)) for n in norms) / len(factors))
    scales = [jnp.where(alive, geo / jnp.where(alive, n, 1.0), 1.0) for n in norms]
    return [f * s for f, s in zip(factors, scales, strict=True)], scales


def _spatial_update(
    g: jax.Array, spatial: list[jax.Array], uv_gram: jax.Array, l2_reg: float, kh: int, kw: int
) -> list[jax.Array]:
    """Updates the spatial factor(s) from ``g[k, r] = Σ_{c,n} W[k,c,n] U[c,r] V[n,r]``."""
    if len(spatial) == 1:  # cp3: one (kh·kw, R) factor
        return [_solve(uv_gram, g, l2_reg, spatial[0])]
    a, b = spatial
    g3 = g.reshape(kh, kw, -1)
    a = _solve(uv_gram * (b.T @ b), jnp.einsum("hwr,wr->hr", g3, b), l2_reg, a)
    b = _solve(uv_gram * (a.T @ a), jnp.einsum("hwr,hr->wr", g3, a), l2_reg, b)
    return [a, b]


def _spatial_from_channels(w, u, v, kh, kw, four_way):
    """Spatial factors fitted to the channel factors: component r's spatial kernel is the
    projection ``g[:, r] = Σ_{c,n} W[:, c, n] u[c, r] v[n, r]`` (cp4: its best rank-1 ``kh × kw``
    approximation, split evenly between the two factors).

    Why: with ``R > kh`` the SVD start has only ``kh`` singular vectors for a spatial mode and
    tensorly fills the other columns at random, which leaves ALS in a worse basin on planted
    kernels (cp4, (256, 256, 3, 3), R = 64: 0.1019 against 0.0987 with this start).
    """
    g = jnp.einsum("kcn,cr,nr->kr", w, u, v)
    if not four_way:
        return [g]
    g3 = g.T.reshape(-1, kh, kw)
    uu, ss, vvt = jnp.linalg.svd(g3, full_matrices=False)
    root = jnp.sqrt(ss[:, 0])
    a = (uu[:, :, 0] * root[:, None]).T
    b = (vvt[:, 0, :] * root[:, None]).T
    return [a, b]


def _khatri_rao(spatial: list[jax.Array]) -> jax.Array:
    if len(spatial) == 1:
        return spatial[0]
    a, b = spatial
    return (a[:, None, :] * b[None, :, :]).reshape(-1, a.shape[1])


def _error_capacity(n_iter: int) -> int:
    """The static length of the error-history buffer for a budget of ``n_iter`` sweeps.

    ``n_iter`` itself is a traced loop bound, so only this bucket (128, 256, 512, …) is part of
    the compiled program: every budget up to 128 sweeps reuses one compilation per kernel shape
    and rank.
    """
    return max(128, 1 << (n_iter - 1).bit_length())


def _als(w, u, v, spatial, tol, l2_reg, n_iter, capacity, kh, kw, line_search=False):
    """ALS on ``w`` of shape ``(kh·kw, C, N)`` (unit norm) from initial factors.

    One sweep updates C, N, then the spatial factor(s): the mode order of tensorly's
    ``parafac`` on the kernel as ``(C, N, kh, kw)``, so both start from the same kind of point.

    Returns the factors, the relative error after each sweep (NaN past the last one) and the
    number of sweeps run. The error uses ``‖W−Ŵ‖² = ‖W‖² − 2⟨W,Ŵ⟩ + ‖Ŵ‖²`` from quantities
    the sweep already has, so it costs no reconstruction (accurate to ~1e-3 in float32; the
    caller reports the exact final error separately).
    """
    k, c, n = w.shape
    rank = u.shape[1]
    w_kc_n = w.reshape(k * c, n)
    w_kn_c = w.transpose(0, 2, 1).reshape(k * n, c)
    sq_norm = jnp.sum(w * w)

    def model_error(g, uv_gram, kr):
        """‖W − Ŵ‖ from ``g[k, r] = Σ_{c,n} W[k,c,n] U[c,r] V[n,r]``, ``(UᵀU)∘(VᵀV)`` and the
        spatial Khatri–Rao product: ``‖W‖² − 2⟨W,Ŵ⟩ + ‖Ŵ‖²``."""
        fit_sq = jnp.sum(uv_gram * (kr.T @ kr))
        return jnp.sqrt(jnp.maximum(sq_norm - 2 * jnp.sum(g * kr) + fit_sq, 0.0))

    def fit_error(p, u, v, spatial):
        """:func:`model_error` from ``p = (W as (k·N, C)) @ u``: no product with ``W``."""
        g = tree_sum(jnp.swapaxes(p * v, 0, 1))
        return model_error(g, (u.T @ u) * (v.T @ v), _khatri_rao(spatial))

    def extrapolate(i, new, previous, err):
        """Bro's line search (Bro 1998, "Multi-way analysis in the food industry", §4.6):
        step on from the previous iterate along the sweep's change by ``i^(1/3)`` and keep the
        point if it fits better. ``new`` and ``previous`` are ``[p, u, v, *spatial]``; since
        ``p = W·u`` is linear in ``u``, the candidate's ``p`` is the same combination of the two
        ``p``s, so the step costs no product with ``W`` (only R×R Grams and one
        ``(k, N, R)`` elementwise sum)."""
        jump = jnp.asarray(i + 1, w.dtype) ** (1.0 / 3.0)
        cand = [b + (a - b) * jump for a, b in zip(new, previous, strict=True)]
        err_ls = fit_error(*cand[:3], cand[3:])
        take = (i >= 3) & (err_ls < err)
        out = [jnp.where(take, a, b) for a, b in zip(cand, new, strict=True)]
        return out, jnp.where(take, err_ls, err)

    def sweep(carry):
        i, p, u, v, spatial, errors = carry
        previous = [p, u, v, *spatial]
        kr = _khatri_rao(spatial)
        kr_gram = kr.T @ kr
        # C mode: MTTKRP = Σ_{k,n} W[k,c,n] V[n,r] KR[k,r]
        q = (w_kc_n @ v).reshape(k, c, rank)
        u = _solve((v.T @ v) * kr_gram, tree_sum(q * kr[:, None, :]), l2_reg, u)
        # N mode, and the spatial modes, from one product with the new u
        p = (w_kn_c @ u).reshape(k, n, rank)
        v = _solve((u.T @ u) * kr_gram, tree_sum(p * kr[:, None, :]), l2_reg, v)
        # g[k, r] = Σ_n p[k, n, r] v[n, r]; sums over major axes as trees (factorize._reductions:
        # 1 ms instead of einsum's 12–21 ms at (9, 512, 572), a fifth of a sweep)
        g = tree_sum(jnp.swapaxes(p * v, 0, 1))
        uv_gram = (u.T @ u) * (v.T @ v)
        spatial = _spatial_update(g, spatial, uv_gram, l2_reg, kh, kw)
        err = model_error(g, uv_gram, _khatri_rao(spatial))
        if line_search:
            (p, u, v, *spatial), err = extrapolate(i, [p, u, v, *spatial], previous, err)
        (u, v, *spatial), scales = _balance([u, v, *spatial])
        if line_search:  # keep p = W·u for the rescaled u (plain ALS never reads p back)
            p = p * scales[0]
        return i + 1, p, u, v, spatial, errors.at[i].set(err)

    def keep_going(carry):
        i, errors = carry[0], carry[-1]
        prev = errors[jnp.maximum(i - 2, 0)]
        last = errors[jnp.maximum(i - 1, 0)]
        converged = (i >= 2) & (jnp.abs(prev - last) < tol)
        return (i < n_iter) & ~converged

    errors = jnp.full((capacity,), jnp.nan, w.dtype)
    # p = W·u for the carried u: only the line search reads it from the carry
    p = (w_kn_c @ u).reshape(k, n, rank) if line_search else jnp.zeros((k, n, rank), w.dtype)
    init = (jnp.asarray(0, jnp.int32), p, u, v, spatial, errors)
    done, _, u, v, spatial, errors = lax.while_loop(keep_going, sweep, init)
    return done, u, v, spatial, errors


@functools.partial(
    jax.jit, static_argnames=("rank", "four_way", "init", "capacity", "line_search"))
def _cp_fit(kernel, key, tol, l2_reg, n_iter, *, rank, four_way, init, capacity,
            line_search=False):
    """The whole projection as one program: scaling, initialisation, ALS and the exact error.

    ``key``, ``tol``, ``l2_reg`` and ``n_iter`` are traced, so changing them never recompiles;
    the program depends only on the kernel's shape and dtype, ``rank``, the mode count, the
    initialisation kind and the error-buffer ``capacity`` (see :func:`_error_capacity`).
    """
    kh, kw, c, n = kernel.shape
    dtype = kernel.dtype
    w = kernel.reshape(kh * kw, c, n)
    norm = jnp.linalg.norm(w)
    scale = jnp.where(norm > 0, norm, 1.0)
    w = w / scale

    keys = list(jax.random.split(key, 4))
    unfold = {  # mode -> (rows, the mode's unfolding of the (kh, kw, C, N) kernel)
        "c": (c, w.transpose(1, 0, 2).reshape(c, -1)),
        "n": (n, w.transpose(2, 0, 1).reshape(n, -1)),
    }
    w4 = w.reshape(kh, kw, c, n)
    if four_way:
        unfold["h"] = (kh, w4.reshape(kh, -1))
        unfold["w"] = (kw, w4.transpose(1, 0, 2, 3).reshape(kw, -1))
    else:
        unfold["k"] = (kh * kw, w.reshape(kh * kw, -1))
    if init == "svd":
        init_factors = [
            _leading_vectors(m, rank, key)
            for (_, m), key in zip(unfold.values(), keys[: len(unfold)], strict=True)
        ]
    else:
        init_factors = [
            _unit_columns(jax.random.normal(key, (rows, rank), dtype))
            for (rows, _), key in zip(unfold.values(), keys[: len(unfold)], strict=True)
        ]
    u0, v0, *spatial0 = init_factors
    # cp4 only, and only when the channel factors are all genuine singular vectors (R ≤ C, N):
    # with random channel columns the projection carries no information (measured worse on
    # rank-deficient kernels at R = 40 > C, N); for cp3's 9-row spatial mode tensorly's start
    # was better on the planted (64, 64, 3, 3) kernel at R = 64 (0.087 against 0.109).
    if init == "svd" and four_way and min(kh, kw) < rank <= min(c, n):
        spatial0 = _spatial_from_channels(w, u0, v0, kh, kw, four_way)

    done, u, v, spatial, errors = _als(
        w, u0, v0, spatial0, jnp.asarray(tol, dtype), jnp.asarray(l2_reg, dtype), n_iter,
        capacity, kh, kw, line_search,
    )
    kr = _khatri_rao(spatial)
    approx = jnp.einsum("kr,cr,nr->kcn", kr, u, v)
    rel_error = jnp.linalg.norm(w - approx)  # w has unit norm (or is zero)
    v = v * scale  # undo the unit-norm scaling on the last stage
    pointwise_in = u.reshape(1, 1, c, rank)
    pointwise_out = v.T.reshape(1, 1, rank, n)
    if four_way:
        a, b = spatial
        factors = (pointwise_in, a.reshape(kh, 1, 1, rank), b.reshape(1, kw, 1, rank),
                   pointwise_out)
    else:
        factors = (pointwise_in, spatial[0].reshape(kh, kw, 1, rank), pointwise_out)
    return factors, errors, done, rel_error


def _cp_project(
    kernel: jax.Array,
    rank: int,
    four_way: bool,
    *,
    n_iter: int = 100,
    tol: float | None = None,
    init: str = "svd",
    seed: int = 0,
    l2_reg: float = 1e-6,
    line_search: bool = True,
):
    n_iter, tol, init, l2_reg, seed = _check_options(n_iter, tol, init, l2_reg, seed)
    if not isinstance(line_search, bool):
        raise ValueError(f"line_search must be a bool, got {line_search!r}")
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be 4-D (kh, kw, C, N), got shape {tuple(kernel.shape)}")
    rank = _check_rank(rank)
    if not np.all(np.isfinite(np.asarray(kernel))):
        raise ValueError("kernel must be finite, got NaN/Inf entries")
    dtype = kernel.dtype if kernel.dtype in (jnp.float32, jnp.float64) else jnp.float32
    factors, errors, done, rel_error = _cp_fit(
        kernel.astype(dtype), jax.random.PRNGKey(seed), tol, l2_reg, n_iter,
        rank=rank, four_way=four_way, init=init, capacity=_error_capacity(n_iter),
        line_search=line_search,
    )
    done = int(done)
    info = {
        "errors": np.asarray(errors[:done]),
        "n_iter": done,
        "converged": bool(tol > 0 and done < n_iter),
        "rel_error": float(rel_error),
        "init": init,
    }
    return factors, info


def cp3_project(kernel: jax.Array, rank: int, **options: Any):
    """CP of the 3-way tensor ``(kh·kw, C, N)``: pointwise C→R, depthwise kh×kw, pointwise R→N.

    Args:
      kernel: ``(kh, kw, C, N)``, finite.
      rank: the number of components ``R`` (may exceed every mode's size).
      n_iter: the ALS sweep budget (default 100, tensorly's ``n_iter_max``).
      tol: stop early once the relative error changes by less than ``tol`` between sweeps
        (tensorly's ``abs_rec_error`` criterion); ``None`` (default) runs all ``n_iter``.
      init: ``"svd"`` (default: the leading left singular vectors of each mode's unfolding,
        random unit columns past a mode's size, as tensorly; for cp4 with
        ``min(kh, kw) < R ≤ min(C, N)`` the spatial factors are instead fitted to the channel
        factors, see :func:`_spatial_from_channels`) or ``"random"`` (random normal).
      seed: PRNG seed for the random parts of the initialisation.
      l2_reg: ridge weight relative to the mean diagonal of each R×R Gram (default 1e-6).
      line_search: after each sweep, try stepping on along the sweep's change (Bro's line
        search; the step is kept only when it fits better, so the error history stays
        monotone). Default ``True``: on every kernel of ``experiments/bench_decompose.py`` it
        ends at or below plain ALS's error (cp4, (512, 512, 3, 3), R = 256, planted: 0.0945
        against 0.0975; tensorly 0.0952) for ~4 % more time per sweep. ``False`` is plain ALS.

    Returns:
      ``(factors, info)`` with ``info["errors"]`` the relative error after each sweep,
      ``info["n_iter"]`` the sweeps run, ``info["rel_error"]`` the exact final error.
    """
    return _cp_project(kernel, rank, four_way=False, **options)


def cp4_project(kernel: jax.Array, rank: int, **options: Any):
    """CP of the 4-way kernel: pointwise C→R, depthwise kh×1, depthwise 1×kw, pointwise R→N.

    Same options and info as :func:`cp3_project`.
    """
    return _cp_project(kernel, rank, four_way=True, **options)
