"""Factorized <-> tensorly CPTensor / TuckerTensor, numpy backend, no global state changed."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tensorly as tl
from tensorly.decomposition import parafac, partial_tucker

import factorize


@pytest.mark.parametrize("family,rank", [("cp4", 5), ("cp3", 5), ("tucker2", (4, 3))])
def test_round_trip(family, rank):
    backend = tl.get_backend()
    f = factorize.random_factorized(jax.random.PRNGKey(0), (3, 3, 6, 7), family, rank)
    t = factorize.to_tensorly(f)
    with tl.backend_context("numpy"):
        dense = tl.cp_to_tensor(t) if family != "tucker2" else tl.tucker_to_tensor(t)
    k = np.asarray(f.to_kernel())
    want = k.transpose(2, 3, 0, 1) if family != "cp3" else k.reshape(9, 6, 7).transpose(1, 2, 0)
    np.testing.assert_allclose(dense, want, rtol=1e-4, atol=1e-5)
    g = factorize.from_tensorly(t, family, (3, 3, 6, 7))
    np.testing.assert_allclose(np.asarray(g.to_kernel()), k, rtol=1e-4, atol=1e-5)
    assert tl.get_backend() == backend and not jax.config.jax_enable_x64


def test_from_tensorly_decompositions():
    w = np.random.default_rng(0).standard_normal((3, 3, 6, 7)).astype(np.float32)
    x = w.transpose(2, 3, 0, 1)
    with tl.backend_context("numpy"):
        cp = parafac(x, 4, n_iter_max=10)
        (core, factors), _ = partial_tucker(x, rank=[3, 4], modes=[0, 1], n_iter_max=5)
        cp_dense = tl.cp_to_tensor(cp)
        tk_dense = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    f = factorize.from_tensorly(cp, "cp4", w.shape)
    np.testing.assert_allclose(np.asarray(f.to_kernel()).transpose(2, 3, 0, 1), cp_dense,
                               rtol=1e-4, atol=1e-5)
    g = factorize.from_tensorly((core, factors), "tucker2", w.shape)
    np.testing.assert_allclose(np.asarray(g.to_kernel()).transpose(2, 3, 0, 1), tk_dense,
                               rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="cp3, cp4 and tucker2"):
        factorize.to_tensorly(factorize.decompose(np.ones((3, 3, 2, 2), np.float32), "dsc", 1))
    with pytest.raises(ValueError, match="rows"):
        factorize.from_tensorly((None, [np.ones((5, 2))] * 4), "cp4", (3, 3, 6, 7))
