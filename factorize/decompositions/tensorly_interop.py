"""Conversions between :class:`factorize.Factorized` and tensorly's ``CPTensor`` / ``TuckerTensor``.

tensorly is imported lazily, inside the functions, and always used through
``tl.backend_context("numpy")``: the global backend is never switched and tensorly's JAX backend
(which turns on ``jax_enable_x64`` for the whole process when imported) is never loaded. The
tensorly side always holds numpy arrays in tensorly's mode order for a kernel, which is
``(C, N, kh, kw)`` for ``cp4`` and Tucker, and ``(C, N, kh·kw)`` for ``cp3``:

* ``cp4`` ↔ ``CPTensor((weights, [U (C×R), V (N×R), A (kh×R), B (kw×R)]))``;
* ``cp3`` ↔ ``CPTensor((weights, [U (C×R), V (N×R), S (kh·kw×R)]))``;
* ``tucker2`` ↔ ``TuckerTensor((core (R1, R2, kh, kw), [U (C×R1), V (N×R2), I_kh, I_kw]))``;
  ``from_tensorly`` also takes ``partial_tucker``'s ``(core, [U, V])`` on modes (0, 1).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from factorize.factorized import Factorized


def _tensorly():
    import tensorly as tl  # lazy: importing factorize never imports tensorly

    return tl


def to_tensorly(f: Factorized) -> Any:
    """A ``cp3``/``cp4``/``tucker2`` value as a tensorly ``CPTensor`` / ``TuckerTensor`` (numpy).

    ``tl.cp_to_tensor`` / ``tl.tucker_to_tensor`` of the result is the kernel in
    ``(C, N, kh, kw)`` order (``(C, N, kh·kw)`` for cp3), i.e. ``f.to_kernel()`` transposed.

    Example::

        import tensorly as tl

        w = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
        t = factorize.to_tensorly(factorize.decompose(w, "tucker2", rank=(8, 8)))
        tl.tucker_to_tensor(t).shape             # (16, 32, 3, 3)
    """
    tl = _tensorly()
    kh, kw, c, n = f.kernel_shape
    fs = [np.asarray(x) for x in f.factors]
    with tl.backend_context("numpy"):
        if f.family == "cp4":
            r = f.rank
            factors = [fs[0].reshape(c, r), fs[3].reshape(r, n).T, fs[1].reshape(kh, r),
                       fs[2].reshape(kw, r)]
            return tl.cp_tensor.CPTensor((np.ones(r, fs[0].dtype), factors))
        if f.family == "cp3":
            r = f.rank
            factors = [fs[0].reshape(c, r), fs[2].reshape(r, n).T, fs[1].reshape(kh * kw, r)]
            return tl.cp_tensor.CPTensor((np.ones(r, fs[0].dtype), factors))
        if f.family == "tucker2":
            r1, r2 = f.rank
            core = fs[1].transpose(2, 3, 0, 1)  # (R1, R2, kh, kw)
            # TuckerTensor wants one factor per mode: identity on the spatial modes
            factors = [fs[0].reshape(c, r1), fs[2].reshape(r2, n).T,
                       np.eye(kh, dtype=core.dtype), np.eye(kw, dtype=core.dtype)]
            return tl.tucker_tensor.TuckerTensor((core, factors))
    raise ValueError(f"to_tensorly converts cp3, cp4 and tucker2 values, got {f.family!r}")


def from_tensorly(value: Any, family: str, kernel_shape: tuple[int, int, int, int]) -> Factorized:
    """A tensorly ``CPTensor``/``TuckerTensor`` (or its ``(weights, factors)`` / ``(core,
    factors)`` tuple) in the mode order of :func:`to_tensorly` as a :class:`Factorized` value.

    CP weights are folded into the last stage; ``kernel_shape`` is HWIO ``(kh, kw, C, N)``.

    Example::

        import tensorly as tl

        w = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
        cp = tl.decomposition.parafac(np.asarray(w).transpose(2, 3, 0, 1), 8, n_iter_max=20,
                                      init="random", random_state=0)
        f = factorize.from_tensorly(cp, "cp4", w.shape)   # 1×1, 3×1, 1×3, 1×1 stages, rank 8
    """
    kh, kw, c, n = (int(s) for s in kernel_shape)
    try:
        first, factors = value
    except (TypeError, ValueError):
        raise ValueError(
            f"value must be a CPTensor/TuckerTensor or a pair, got {type(value).__name__}"
        ) from None
    factors = [np.asarray(x) for x in factors]
    if family in ("cp3", "cp4"):
        want = [c, n, kh, kw] if family == "cp4" else [c, n, kh * kw]
        got = [x.shape[0] for x in factors]
        if got != want or len({x.shape[1] for x in factors}) != 1:
            raise ValueError(
                f"{family} factors must have rows {want} and a common rank, got shapes "
                f"{[x.shape for x in factors]}"
            )
        r = factors[0].shape[1]
        weights = np.ones(r, factors[0].dtype) if first is None else np.asarray(first)
        u, v = factors[0], factors[1] * weights[None, :]
        if family == "cp4":
            stages = [u.reshape(1, 1, c, r), factors[2].reshape(kh, 1, 1, r),
                      factors[3].reshape(1, kw, 1, r), v.T.reshape(1, 1, r, n)]
        else:
            stages = [u.reshape(1, 1, c, r), factors[2].reshape(kh, kw, 1, r),
                      v.T.reshape(1, 1, r, n)]
        return Factorized(family, r, (kh, kw, c, n), [jnp.asarray(s) for s in stages])
    if family == "tucker2":
        core = np.asarray(first)
        if len(factors) == 4:  # a full Tucker with (near-)identity spatial factors
            core = np.einsum("ijab,ha,wb->ijhw", core, factors[2], factors[3])
            factors = factors[:2]
        if len(factors) != 2 or core.shape[2:] != (kh, kw):
            raise ValueError(
                f"tucker2 needs a core (R1, R2, {kh}, {kw}) and two factors, got core "
                f"{core.shape} and {len(factors)} factors"
            )
        r1, r2 = core.shape[:2]
        if factors[0].shape != (c, r1) or factors[1].shape != (n, r2):
            raise ValueError(
                f"tucker2 factors must be ({c}, {r1}) and ({n}, {r2}), got "
                f"{factors[0].shape} and {factors[1].shape}"
            )
        stages = [factors[0].reshape(1, 1, c, r1), core.transpose(2, 3, 0, 1),
                  factors[1].T.reshape(1, 1, r2, n)]
        return Factorized("tucker2", (r1, r2), (kh, kw, c, n), [jnp.asarray(s) for s in stages])
    raise ValueError(f"from_tensorly converts to cp3, cp4 and tucker2, got {family!r}")
