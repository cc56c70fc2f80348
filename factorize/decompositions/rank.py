"""Choosing a family's rank for a kernel: energy, parameter/MAC budgets, EVBMF.

:func:`select_rank` takes one criterion and returns a rank in the form ``decompose`` takes (an
int, or ``(R1, R2)`` for ``tucker2``). What each returns for a typical kernel — a trained
3×3 kernel has a decaying channel spectrum, a random (untrained) one a flat one:

* ``energy=e`` — the smallest rank whose truncated SVD keeps a fraction ``e`` of ``‖W‖²``
  (SVD families: the family's unfolding; ``dsc``/``bsconv``: summed over the per-channel
  slices; ``tucker2``: each channel unfolding on its own, as Kim et al. 2016 do). For a
  random kernel ``energy=0.9`` keeps most of the rank (e.g. ~0.75·C for ``lowrank_in``); for a
  trained kernel far less. Not defined for ``cp3``/``cp4`` (CP has no nested truncation).
* ``params_fraction=f`` — the largest rank with at most ``f`` of the full kernel's parameters
  (the same as ``rank=f`` in ``decompose``); ``macs_fraction=f`` with ``input_hw`` — the
  largest rank with at most ``f`` of the full conv's conventional MACs at that input size
  (differs from the parameter fraction when a 1×1 stage runs before a strided spatial stage).
  Both depend only on the shape; for a (3,3,256,256) kernel at 0.25, ``cp4`` → rank 126,
  ``tucker2`` → (103, 103).
* ``method="evbmf"`` (the default when no criterion is given) — the number of components that
  empirical variational Bayesian matrix factorisation keeps (Nakajima, Sugiyama, Babacan &
  Tomioka 2013, "Global analytic solution of fully-observed variational Bayesian matrix
  factorization", JMLR 14, Thm. 2 and the noise-variance estimate of §5), applied to the
  family's unfolding (``tucker2``: to the mode-C and mode-N unfoldings, Kim et al. 2016). It
  estimates the noise level itself, so it needs no threshold: on pure noise it keeps almost
  nothing (the result is clamped to rank 1), on a planted rank-r matrix plus noise it returns
  r, and on trained kernels it typically keeps 20–50 % of the channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from factorize._checks import Padding, check_kernel
from factorize.chain import chain_macs
from factorize.families import Rank, get_family, resolve_rank

# τ̄ of Nakajima et al. 2013 (eq. 31): the root of log(τ+1) + α log(τ/α+1) = τ at α = 1;
# the threshold bound uses τ̄·√α (their code's approximation, also used by Kim et al.).
_TAU_BAR = 2.5129


def _unfolding(w: np.ndarray, family: str) -> np.ndarray | None:
    """The one matrix whose truncated SVD is the family's projection (None if batched)."""
    kh, kw, c, n = w.shape
    if family == "spatial":
        return w.transpose(0, 2, 1, 3).reshape(kh * c, kw * n)
    if family == "lowrank_in":
        return w.transpose(2, 0, 1, 3).reshape(c, kh * kw * n)
    if family == "lowrank_out":
        return w.reshape(kh * kw * c, n)
    return None


def _channel_unfoldings(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kh, kw, c, n = w.shape
    return (
        w.transpose(2, 0, 1, 3).reshape(c, kh * kw * n),
        w.transpose(3, 0, 1, 2).reshape(n, kh * kw * c),
    )


def _energy_rank(sq_sv: np.ndarray, energy: float) -> int:
    """Smallest r with ``sum(sq_sv[..., :r]) >= energy · total`` (summed over leading axes)."""
    per_rank = sq_sv.reshape(-1, sq_sv.shape[-1]).sum(axis=0)
    total = per_rank.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(per_rank) / total
    return int(min(np.searchsorted(kept, energy * (1 - 1e-12)) + 1, per_rank.size))


def _evbmf_objective(sigma2, l, m, s, residual, x_bar):
    # Free energy of EVBMF as a function of the noise variance (Nakajima et al. 2013, eq. 35).
    h = s.size
    alpha = l / m
    x = s**2 / (m * sigma2)
    z1, z2 = x[x > x_bar], x[x <= x_bar]
    tau = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
    return (
        np.sum(z2 - np.log(z2))
        + np.sum(z1 - tau)
        + np.sum(np.log((tau + 1) / z1))
        + alpha * np.sum(np.log(tau / alpha + 1))
        + residual / (m * sigma2)
        + (l - h) * np.log(sigma2)
    )


def evbmf(matrix: Any, sigma2: float | None = None) -> tuple[int, float]:
    """EVBMF's rank of a matrix and its noise variance (Nakajima et al. 2013).

    The analytic solution keeps the singular values above
    ``√(M σ² (1 + τ̄)(1 + α/τ̄))`` (α = L/M ≤ 1, Thm. 2); when ``sigma2`` is not given it is
    the minimiser of the free energy over the range of §5 (a log-grid search refined by golden
    section, so no optimiser dependency).

    Returns:
      ``(rank, sigma2)``; ``rank`` may be 0 (pure noise).

    Example::

        rng = np.random.default_rng(0)
        signal = rng.normal(size=(40, 3)) @ rng.normal(size=(3, 60))   # rank 3
        factorize.evbmf(signal + 0.1 * rng.normal(size=(40, 60)))      # (3, ≈ 0.0099 = 0.1²)
    """
    y = np.asarray(matrix, dtype=np.float64)
    if y.ndim != 2 or min(y.shape) < 1:
        raise ValueError(f"matrix must be a non-empty 2-D array, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("matrix must be finite")
    if y.shape[0] > y.shape[1]:
        y = y.T
    l, m = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    if s[0] <= 0:
        return 0, 0.0
    alpha = l / m
    tau_bar = _TAU_BAR * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    if sigma2 is None:
        # Noise bounds of §5: the largest H̄ components cannot all be signal.
        h_ub = max(min(math.ceil(l / (1 + alpha)) - 1, l) - 1, 0)
        upper = np.sum(s**2) / (l * m)
        tail = s[h_ub:] if h_ub < l else s[-1:]
        lower = max(tail[0] ** 2 / (m * x_bar), np.mean(tail**2) / m)
        lower = max(min(lower, upper), upper * 1e-12)
        sigma2 = _minimise_log(
            lambda v: _evbmf_objective(v, l, m, s, 0.0, x_bar), lower, upper
        )
    threshold = math.sqrt(m * sigma2 * x_bar)
    return int(np.sum(s > threshold)), float(sigma2)


def _minimise_log(f, lo: float, hi: float, grid: int = 200, steps: int = 60) -> float:
    """Minimum of ``f`` on ``[lo, hi]``: a log-spaced grid, then golden section around the best."""
    if hi <= lo:
        return hi
    xs = np.geomspace(lo, hi, grid)
    vals = [f(x) for x in xs]
    i = int(np.nanargmin(vals))
    a, b = math.log(xs[max(i - 1, 0)]), math.log(xs[min(i + 1, grid - 1)])
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(math.exp(d))
    best = math.exp((a + b) / 2)
    return best if f(best) <= vals[i] else float(xs[i])


def _budget_rank(family, shape, cost, budget: float, what: str) -> Rank:
    path = family.rank_path(shape)
    costs = [cost(family.chain(shape, r)) for r in path]
    fitting = [r for r, k in zip(path, costs, strict=True) if k <= budget]
    if not fitting:
        raise ValueError(
            f"{what}: the smallest {family.name!r} rank {path[0]} of a {shape} kernel already "
            f"costs {costs[0]}, above the budget {budget:.0f}"
        )
    return fitting[-1]


def select_rank(
    kernel: Any,
    family: str,
    *,
    energy: float | None = None,
    params_fraction: float | None = None,
    macs_fraction: float | None = None,
    input_hw: int | Sequence[int] | None = None,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    method: str = "evbmf",
    layout: str = "HWIO",
) -> Rank:
    """A rank for ``decompose(kernel, family, rank)`` chosen by one criterion.

    Args:
      kernel: ``(kh, kw, C, N)`` (or OIHW with ``layout="OIHW"``).
      family: a family with a rank (see ``factorize.FAMILIES``; not ``full``).
      energy: in (0, 1]: the smallest rank keeping that fraction of ``‖W‖²`` (SVD families
        and ``tucker2``).
      params_fraction: in (0, 1]: the largest rank with at most that fraction of the full
        kernel's parameters (any family).
      macs_fraction: in (0, 1], with ``input_hw``: the largest rank whose chain has at most that
        fraction of the full conv's conventional MACs on an ``input_hw`` input at ``strides``
        and ``padding`` (any family).
      method: used when no criterion above is given; ``"evbmf"`` (SVD families with one
        unfolding, i.e. ``spatial``, ``lowrank_in``, ``lowrank_out``, and ``tucker2``).

    Returns:
      The rank: an int, or ``(R1, R2)`` for ``tucker2``. See the module docstring for what each
      criterion gives on typical kernels.

    Example::

        w = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
        factorize.select_rank(w, "tucker2", energy=0.9)                # (14, 25)
        factorize.select_rank(w, "lowrank_out", params_fraction=0.25)  # 6
        factorize.select_rank(w, "dsc", macs_fraction=0.25, input_hw=32)   # 1
        factorize.select_rank(w, "tucker2")      # EVBMF: (1, 1), a random kernel is noise
    """
    fam = get_family(family)
    w = check_kernel(kernel, layout=layout)
    shape = tuple(int(s) for s in w.shape)
    if fam.max_rank(shape) is None:
        raise ValueError(f"family {fam.name!r} has no rank to select")
    given = {
        k: v
        for k, v in (
            ("energy", energy), ("params_fraction", params_fraction),
            ("macs_fraction", macs_fraction),
        )
        if v is not None
    }
    if len(given) > 1:
        raise ValueError(f"give at most one criterion, got {sorted(given)}")
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if macs_fraction is None and input_hw is not None:
        raise ValueError("input_hw is only used with macs_fraction")

    if params_fraction is not None:
        return resolve_rank(fam, shape, float(params_fraction))
    if macs_fraction is not None:
        if input_hw is None:
            raise ValueError("macs_fraction needs input_hw, the layer's input size")
        full = chain_macs(get_family("full").chain(shape, None), input_hw, strides, padding)
        return _budget_rank(
            fam, shape, lambda st: chain_macs(st, input_hw, strides, padding),
            macs_fraction * full, "macs_fraction",
        )

    wn = np.asarray(w, dtype=np.float64)
    if energy is not None:
        return _select_by_energy(wn, fam, float(energy))
    if method != "evbmf":
        raise ValueError(f"method must be 'evbmf', got {method!r}")
    return _select_by_evbmf(wn, fam)


RANK_NAME_FORMS = "'evbmf' or 'energy:<fraction in (0, 1]>' (e.g. 'energy:0.9')"


def select_rank_by_name(kernel: Any, family: str, name: str, *, layout: str = "HWIO") -> Rank:
    """The rank that a policy's rank string names, chosen from the layer's own kernel.

    Args:
      kernel: ``(kh, kw, C, N)`` (or OIHW with ``layout="OIHW"``).
      family: the family to decompose into.
      name: ``"evbmf"`` (:func:`select_rank` with ``method="evbmf"``) or ``"energy:<e>"``
        (:func:`select_rank` with ``energy=e``, ``e`` in (0, 1]). Case and surrounding
        spaces are ignored. (``"full"`` is not a selection: ``decompose`` takes it directly.)

    Returns:
      The rank, in the form ``decompose`` takes (an int, or ``(R1, R2)`` for ``tucker2``).

    Raises:
      ValueError: for any other string, listing the valid forms; or when the criterion is not
        defined for ``family`` (e.g. ``evbmf`` for ``cp4``), as :func:`select_rank` does.
    """
    if not isinstance(name, str):
        raise ValueError(f"rank name must be a string, {RANK_NAME_FORMS}; got {name!r}")
    text = name.strip().lower()
    if text == "evbmf":
        return select_rank(kernel, family, method="evbmf", layout=layout)
    if text.startswith("energy:"):
        value = text[len("energy:"):].strip()
        try:
            energy = float(value)
        except ValueError:
            energy = math.nan
        if not 0.0 < energy <= 1.0:  # also rejects NaN
            raise ValueError(
                f"rank name {name!r}: the energy must be a number in (0, 1], got {value!r}; "
                f"valid forms: {RANK_NAME_FORMS}"
            )
        return select_rank(kernel, family, energy=energy, layout=layout)
    raise ValueError(f"unknown rank name {name!r}; valid forms: {RANK_NAME_FORMS}")


def _select_by_energy(w: np.ndarray, fam, energy: float) -> Rank:
    kh, kw, c, n = w.shape
    name = fam.name
    if name == "tucker2":
        ranks = tuple(
            _energy_rank(np.linalg.svd(m, compute_uv=False) ** 2, energy)
            for m in _channel_unfoldings(w)
        )
        return ranks  # type: ignore[return-value]
    if name == "dsc":
        slices = w.reshape(kh * kw, c, n).transpose(1, 0, 2)
    elif name == "bsconv":
        slices = w.reshape(kh * kw, c, n).transpose(2, 0, 1)
    else:
        slices = _unfolding(w, name)
    if slices is None:
        raise ValueError(
            f"energy is defined for the SVD families and tucker2, not {name!r}; "
            "use params_fraction or macs_fraction"
        )
    r = _energy_rank(np.linalg.svd(slices, compute_uv=False) ** 2, energy)
    return min(r, int(fam.max_rank(w.shape)))


def _select_by_evbmf(w: np.ndarray, fam) -> Rank:
    name = fam.name
    if name == "tucker2":
        return tuple(max(evbmf(m)[0], 1) for m in _channel_unfoldings(w))  # type: ignore
    m = _unfolding(w, name)
    if m is None:
        raise ValueError(
            f"method='evbmf' is defined for spatial, lowrank_in, lowrank_out and tucker2, not "
            f"{name!r}; use energy, params_fraction or macs_fraction"
        )
    return min(max(evbmf(m)[0], 1), int(fam.max_rank(w.shape)))


__all__ = ["evbmf", "select_rank", "select_rank_by_name"]
