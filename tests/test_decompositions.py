"""CP-ALS (cp3, cp4) and HOOI Tucker-2: recovery, parity with tensorly, degenerate and bad input.

tensorly (numpy backend, scoped with ``backend_context``) is the independent reference: its
error on the same kernel with the same rank, iteration budget and initialisation kind.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import tensorly as tl
from tensorly.decomposition import parafac, partial_tucker

import factorize


def planted_cp(shape, rank, four_way, seed=0):
    kh, kw, c, n = shape
    rng = np.random.default_rng(seed)
    if four_way:
        f = [rng.standard_normal((s, rank)) for s in shape]
        w = np.einsum("hr,wr,cr,nr->hwcn", *f)
    else:
        f = [rng.standard_normal((s, rank)) for s in (kh * kw, c, n)]
        w = np.einsum("kr,cr,nr->kcn", *f).reshape(shape)
    return (w / np.linalg.norm(w)).astype(np.float32)


def planted_tucker(shape, ranks, seed=0):
    kh, kw, c, n = shape
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((kh, kw, *ranks))
    u = rng.standard_normal((c, ranks[0]))
    v = rng.standard_normal((n, ranks[1]))
    return np.einsum("hwij,ci,nj->hwcn", core, u, v).astype(np.float32)


def with_noise(w, level, seed=1):
    noise = np.random.default_rng(seed).standard_normal(w.shape)
    return (w + level * np.linalg.norm(w) * noise / np.linalg.norm(noise)).astype(np.float32)


def rel(w, approx):
    w = np.asarray(w, np.float64)
    return float(np.linalg.norm(w - np.asarray(approx, np.float64)) / np.linalg.norm(w))


def tensorly_error(w, family, rank, n_iter, init):
    kh, kw, c, n = w.shape
    with tl.backend_context("numpy"):
        if family == "tucker2":
            x = w.transpose(2, 3, 0, 1)
            (core, factors), _ = partial_tucker(
                x, rank=list(rank), modes=[0, 1], n_iter_max=n_iter, init=init, tol=0
            )
            return rel(x, tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]))
        x = w.transpose(2, 3, 0, 1) if family == "cp4" else w.reshape(kh * kw, c, n).transpose(
            1, 2, 0)
        with warnings.catch_warnings():  # "n_eigenvecs larger than the mode" for kh, kw < rank
            warnings.simplefilter("ignore", UserWarning)
            cp = parafac(x, rank, n_iter_max=n_iter, init=init, tol=0, random_state=0)
        return rel(x, tl.cp_to_tensor(cp))


@pytest.mark.parametrize(
    "family,shape,rank",
    [
        ("cp4", (3, 3, 16, 24), 5),
        ("cp4", (3, 3, 32, 32), 12),
        ("cp4", (5, 5, 8, 12), 4),
        ("cp3", (3, 3, 16, 24), 5),
        ("cp3", (3, 3, 32, 32), 12),
        ("cp3", (5, 5, 8, 12), 4),
    ],
)
def test_planted_cp_recovered(family, shape, rank):
    w = planted_cp(shape, rank, four_way=family == "cp4")
    f, info = factorize.decompose(w, family, rank, n_iter=300, return_info=True)
    err = float(factorize.relative_error(w, f))
    assert err < 1e-4
    assert abs(err - info["rel_error"]) < 1e-5
    # the factors compose, through the family's chain, to the kernel that was fitted
    assert rel(w, f.to_kernel()) < 1e-4


@pytest.mark.parametrize(
    "shape,ranks", [((3, 3, 16, 24), (5, 7)), ((3, 3, 32, 20), (12, 4)), ((1, 1, 8, 8), (3, 3))]
)
def test_planted_tucker_recovered(shape, ranks):
    w = planted_tucker(shape, ranks)
    f, info = factorize.decompose(w, "tucker2", ranks, return_info=True)
    assert float(factorize.relative_error(w, f)) < 1e-4
    assert info["n_iter"] >= 1 and np.all(np.isfinite(info["errors"]))


@pytest.mark.parametrize("family", ["cp4", "cp3"])
@pytest.mark.parametrize("kind", ["random", "planted"])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_cp_error_at_most_tensorly(family, kind, init, request):
    if init == "random" and kind == "planted" and family == "cp4":
        # different random draws can land in different ALS local minima (seen: 0.16 vs 0.096)
        request.applymarker(pytest.mark.xfail(reason="random init: different draws", strict=False))
    shape, rank, n_iter = (3, 3, 24, 32), 8, 50
    if kind == "random":
        w = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    else:
        w = with_noise(planted_cp(shape, rank, family == "cp4", seed=4), 0.1)
    f = factorize.decompose(w, family, rank, n_iter=n_iter, init=init)
    ours = rel(w, f.to_kernel())
    ref = tensorly_error(w, family, rank, n_iter, init)
    assert ours <= ref * 1.01, (ours, ref)


@pytest.mark.parametrize("kind", ["random", "planted"])
def test_tucker2_error_at_most_tensorly(kind):
    shape, ranks, n_iter = (3, 3, 24, 32), (6, 9), 10
    if kind == "random":
        w = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    else:
        w = with_noise(planted_tucker(shape, ranks, seed=6), 0.1)
    f = factorize.decompose(w, "tucker2", ranks, n_iter=n_iter, tol=None)
    assert rel(w, f.to_kernel()) <= tensorly_error(w, "tucker2", ranks, n_iter, "svd") * 1.01


def test_error_history_and_tol_stop():
    w = np.random.default_rng(7).standard_normal((3, 3, 16, 16)).astype(np.float32)
    _, info = factorize.decompose(w, "cp4", 6, n_iter=40, return_info=True)
    errs = info["errors"]
    assert errs.shape == (40,) and info["n_iter"] == 40
    assert np.all(np.diff(errs) <= 1e-4)  # ALS never increases the error (up to round-off)
    assert abs(errs[-1] - info["rel_error"]) < 1e-3
    _, info = factorize.decompose(w, "cp4", 6, n_iter=500, tol=1e-3, return_info=True)
    assert info["converged"] and info["n_iter"] < 500 and len(info["errors"]) == info["n_iter"]


def test_ranks_larger_than_modes_and_jit_reuse():
    w = np.random.default_rng(8).standard_normal((3, 3, 4, 5)).astype(np.float32)
    for family in ("cp3", "cp4"):
        f, info = factorize.decompose(w, family, 15, n_iter=20, return_info=True)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in f.factors)
        assert info["rel_error"] < 0.5


@pytest.mark.parametrize("family,rank", [("cp4", 40), ("cp3", 40), ("tucker2", (8, 8))])
@pytest.mark.parametrize("kind", ["zero", "rank1", "deficient"])
def test_degenerate_kernels_give_finite_factors(family, rank, kind):
    shape = (3, 3, 8, 10)
    rng = np.random.default_rng(9)
    if kind == "zero":
        w = np.zeros(shape, np.float32)
    elif kind == "rank1":
        w = planted_cp(shape, 1, four_way=True)
    else:
        w = planted_cp(shape, 3, four_way=True) + 0 * rng.standard_normal(shape)
        w[..., 5:] = 0  # half the outputs dead
        w = w.astype(np.float32)
    f, info = factorize.decompose(w, family, rank, n_iter=30, return_info=True)
    for x in f.factors:
        assert np.all(np.isfinite(np.asarray(x)))
    assert np.all(np.isfinite(info["errors"]))
    if kind == "zero":
        assert np.allclose(np.asarray(f.to_kernel()), 0)
    else:
        assert float(factorize.relative_error(w, f)) < 0.1  # slow ALS at R ≫ true rank


@pytest.mark.parametrize(
    "family,rank,options,match",
    [
        ("cp4", 0, {}, "rank"),
        ("cp4", 10**6, {}, "rank"),
        ("cp3", 4, {"n_iter": 0}, "n_iter"),
        ("cp4", 4, {"n_iter": 2.5}, "n_iter"),
        ("cp4", 4, {"tol": -1.0}, "tol"),
        ("cp4", 4, {"init": "hosvd"}, "init"),
        ("cp4", 4, {"l2_reg": -1.0}, "l2_reg"),
        ("cp4", 4, {"seed": "x"}, "seed"),
        ("tucker2", (9, 4), {}, r"rank\[0\]"),
        ("tucker2", (4, 11), {}, r"rank\[1\]"),
        ("tucker2", (4, 4), {"n_iter": 0}, "n_iter"),
    ],
)
def test_bad_options_raise_naming_the_argument(family, rank, options, match):
    w = np.random.default_rng(0).standard_normal((3, 3, 8, 10)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        factorize.decompose(w, family, rank, **options)


@pytest.mark.parametrize("family,rank", [("cp4", 3), ("cp3", 3), ("tucker2", (2, 2))])
def test_non_finite_kernel_and_unknown_option(family, rank):
    w = np.ones((3, 3, 4, 4), np.float32)
    w[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        factorize.decompose(w, family, rank)
    with pytest.raises(TypeError):
        factorize.decompose(np.ones((3, 3, 4, 4), np.float32), family, rank, n_iters=3)


def test_projections_leave_x64_off():
    factorize.decompose(np.ones((3, 3, 4, 4), np.float32), "cp4", 2, n_iter=2)
    assert not jax.config.jax_enable_x64
