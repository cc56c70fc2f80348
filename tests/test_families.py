"""The shared checks every family must pass (the optax way: one table, every family a row).

References are independent of the code under test: ``lax.conv_general_dilated`` with the
composed kernel, XLA's ``cost_analysis()``, numpy SVDs of the unfoldings, and hand-worked MAC
counts. Adding a family means adding a row to ``CASES``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import factorize as fz


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    ranks: tuple  # increasing test ranks (clipped to the family's maximum per shape)
    # numpy unfoldings (batch, rows, cols) whose truncated SVD is the optimal projection; None if
    # the family's projection is not an SVD.
    unfold: Callable[[np.ndarray], np.ndarray] | None = None


def _dsc_unfold(w):
    kh, kw, c, n = w.shape
    return np.stack([w[:, :, i, :].reshape(kh * kw, n) for i in range(c)])


def _bsconv_unfold(w):
    kh, kw, c, n = w.shape
    return np.stack([w[:, :, :, j].reshape(kh * kw, c) for j in range(n)])


def _spatial_unfold(w):
    kh, kw, c, n = w.shape
    m = np.zeros((kh * c, kw * n), w.dtype)
    for i in range(kh):
        for j in range(kw):
            m[i * c:(i + 1) * c, j * n:(j + 1) * n] = w[i, j]
    return m[None]


def _mode_c(w):
    return np.moveaxis(w, 2, 0).reshape(w.shape[2], -1)[None]


def _mode_n(w):
    return np.moveaxis(w, 3, 0).reshape(w.shape[3], -1)[None]


CASES = [
    Case("full", (None, None)),
    Case("dsc", (1, 2, 4, 9), _dsc_unfold),
    Case("bsconv", (1, 2, 4, 9), _bsconv_unfold),
    Case("spatial", (1, 3, 6, 12), _spatial_unfold),
    Case("lowrank_in", (1, 2, 4, 6), _mode_c),
    Case("lowrank_out", (1, 2, 3, 5), _mode_n),
    Case("tucker2", ((1, 1), (2, 2), (4, 3), (6, 5))),
    Case("cp3", (1, 3, 8, 20)),
    Case("cp4", (1, 3, 8, 20)),
]
IDS = [c.family for c in CASES]


def test_table_covers_every_family():
    assert tuple(c.family for c in CASES) == fz.FAMILIES


def _clip(rank, family, shape):
    upper = fz.get_family(family).max_rank(shape)
    if upper is None:
        return None
    if isinstance(upper, tuple):
        return tuple(min(r, u) for r, u in zip(rank, upper, strict=True))
    return min(rank, upper)


def _ref_conv(x, w, strides, padding, dilation=1):
    return lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


SHAPES = [(3, 3, 6, 5), (1, 1, 6, 5), (3, 5, 4, 7), (5, 3, 7, 4)]
GEOMETRIES = [
    ((1, 1), "SAME"),
    ((2, 2), "VALID"),
    ((2, 2), "SAME"),
    ((2, 1), ((1, 0), (2, 1))),
]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_chain_equals_conv_with_composed_kernel(case, shape):
    """The chain's forward equals one conv with f.to_kernel(), for every stride and padding."""
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (2, 11, 10, shape[2]))
    ranks = (case.ranks[0], case.ranks[-1]) if shape == SHAPES[0] else (case.ranks[-1],)
    for rank in ranks:
        f = fz.random_factorized(key, shape, case.family, _clip(rank, case.family, shape))
        w = f.to_kernel()
        assert w.shape == shape
        for strides, padding in GEOMETRIES:
            got = jax.jit(f.__call__, static_argnums=(1, 2))(x, strides, padding)
            want = _ref_conv(x, w, strides, padding)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chain_with_dilation_equals_dilated_conv(case):
    key = jax.random.PRNGKey(1)
    shape = (3, 3, 4, 6)
    f = fz.random_factorized(key, shape, case.family, _clip(case.ranks[1], case.family, shape))
    x = jax.random.normal(key, (1, 12, 12, 4))
    got = f(x, 1, "SAME", dilation=2)
    want = _ref_conv(x, f.to_kernel(), (1, 1), "SAME", dilation=2)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 3, 6, 5), (3, 5, 4, 7)], ids=str)
def test_macs_match_jaxpr_and_xla(case, shape):
    """f.macs == count_macs(chain) always; == XLA FLOPs / 2 where padding taps are excluded."""
    key = jax.random.PRNGKey(2)
    f = fz.random_factorized(key, shape, case.family, _clip(case.ranks[1], case.family, shape))
    x = jnp.ones((1, 9, 8, shape[2]))
    for strides, padding in GEOMETRIES:
        run = lambda x, s=strides, p=padding: f(x, s, p)
        conventional = f.macs((9, 8), strides, padding)
        assert conventional == fz.count_macs(run, x)
        xla = fz.xla_flops(run, x) / 2
        assert f.macs((9, 8), strides, padding, count_padding=False) == xla
        if padding == "VALID":  # no padding taps: every convention agrees
            assert conventional == xla


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_params_are_the_factor_entries(case):
    shape = (3, 3, 6, 5)
    f = fz.random_factorized(jax.random.PRNGKey(3), shape, case.family, case.ranks[1])
    assert f.params == sum(x.size for x in f.factors)
    assert f.params == sum(st.params for st in f.stages)


def _project_or_skip(kernel, family, rank, **kw):
    try:
        return fz.decompose(kernel, family, rank, **kw)
    except NotImplementedError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_projection_error_never_increases_with_rank(case):
    shape = (3, 3, 6, 5)
    w = jax.random.normal(jax.random.PRNGKey(4), shape)
    errors = [
        float(fz.relative_error(w, _project_or_skip(w, case.family, _clip(r, case.family, shape))))
        for r in case.ranks
    ]
    assert all(b <= a + 1e-5 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < errors[0] or case.family == "full"


@pytest.mark.parametrize("case", [c for c in CASES if c.unfold], ids=lambda c: c.family)
@pytest.mark.parametrize("shape", [(3, 3, 6, 5), (1, 1, 6, 5), (3, 5, 4, 7)], ids=str)
def test_svd_projection_is_optimal(case, shape):
    """Eckart–Young: the error equals the discarded singular values of the numpy unfolding."""
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(5), shape))
    s = np.linalg.svd(case.unfold(w), compute_uv=False)  # (batch, k)
    for rank in case.ranks:
        r = _clip(rank, case.family, shape)
        want = math.sqrt(float((s[:, r:] ** 2).sum())) / np.linalg.norm(w)
        got = float(fz.relative_error(w, fz.decompose(w, case.family, r)))
        assert got == pytest.approx(want, abs=2e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c.family not in ("cp3", "cp4")], ids=IDS[:7])
@pytest.mark.parametrize("shape", [(3, 3, 6, 5), (1, 1, 6, 5), (3, 5, 4, 7), (3, 3, 2, 40)], ids=str)
def test_full_rank_is_exact(case, shape):
    w = jax.random.normal(jax.random.PRNGKey(6), shape)
    f = fz.decompose(w, case.family, "full")
    assert float(fz.relative_error(w, f)) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_projecting_a_structured_kernel_returns_it(case):
    shape = (3, 3, 6, 5)
    rank = _clip(case.ranks[1], case.family, shape)
    structured = fz.random_factorized(jax.random.PRNGKey(7), shape, case.family, rank).to_kernel()
    f = _project_or_skip(structured, case.family, rank)
    assert float(fz.relative_error(structured, f)) < 1e-4
    np.testing.assert_allclose(f.to_kernel(), structured, atol=1e-4 * float(jnp.abs(structured).max()))


@pytest.mark.parametrize("case", [c for c in CASES if c.unfold], ids=lambda c: c.family)
def test_svd_projection_is_jittable(case):
    w = jax.random.normal(jax.random.PRNGKey(8), (3, 3, 6, 5))
    jitted = jax.jit(fz.decompose, static_argnames=("family", "rank"))
    f = jitted(w, family=case.family, rank=2)
    g = fz.decompose(w, case.family, 2)
    np.testing.assert_allclose(f.to_kernel(), g.to_kernel(), atol=1e-5)


def test_oihw_layout_is_pytorch_order():
    w = np.random.default_rng(0).normal(size=(3, 3, 6, 5)).astype(np.float32)
    oihw = w.transpose(3, 2, 0, 1)
    a = fz.decompose(oihw, "dsc", 2, layout="OIHW")
    b = fz.decompose(w, "dsc", 2)
    assert a.kernel_shape == (3, 3, 6, 5)
    np.testing.assert_allclose(a.to_kernel(), b.to_kernel(), atol=1e-6)


# --- worked numbers (docs/design.md) -----------------------------------------------------


def test_seed_example_macs():
    """6×6×3 input, five 3×3×3 filters, VALID → 4×4×5: full 2160, dsc 432 + 240 = 672."""
    assert fz.conv_macs((3, 3, 3, 5), 6, padding="VALID") == 27 * 16 * 5 == 2160
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 3, 5))
    f = fz.decompose(w, "dsc", 1)
    depthwise, pointwise = f.stages
    assert fz.conv_macs(depthwise.shape, 6, padding="VALID") == 9 * 16 * 3 == 432
    assert fz.conv_macs(pointwise.shape, 4, padding="VALID") == 3 * 16 * 5 == 240
    assert f.macs(6, padding="VALID") == 672
    x = jnp.ones((1, 6, 6, 3))
    assert fz.count_macs(lambda x: f(x, padding="VALID"), x) == 672


@pytest.mark.parametrize("n", [16, 64, 512, 1024])
def test_mobilenet_ratio(n):
    """dsc / full = 1/N + 1/(kh·kw) at SAME, stride 1 (Howard et al. 2017, eq. 5)."""
    shape = (3, 3, 32, n)
    full = fz.conv_macs(shape, 14)
    dsc = fz.random_factorized(jax.random.PRNGKey(0), shape, "dsc", 1).macs(14)
    assert dsc / full == pytest.approx(1 / n + 1 / 9, rel=1e-12)
    if n == 512:
        assert round(dsc / full, 4) == 0.1131


def test_conv_macs_by_hand():
    # 5×5 input, 3×3 kernel, stride 2, SAME: 3×3 outputs; 2 in, 4 out channels.
    assert fz.conv_macs((3, 3, 2, 4), 5, strides=2) == 9 * 9 * 2 * 4
    # Taps inside a 3×3 input for a 3×3 SAME stride-1 kernel: per axis 2+3+2 = 7 → 49 of 81.
    assert fz.conv_macs((3, 3, 1, 1), 3, count_padding=False) == 49
    assert fz.conv_macs((3, 3, 1, 1), 3) == 81


def test_count_macs_matmul_scan_and_cond():
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    assert fz.count_macs(jnp.matmul, a, b) == 60

    def scanned(a):
        return lax.scan(lambda c, _: (c @ jnp.ones((4, 4)), None), a, None, length=7)[0]

    assert fz.count_macs(scanned, a) == 7 * 3 * 4 * 4
    assert fz.count_macs(jax.jit(lambda a, b: a @ b), a, b) == 60
    pick = lambda p, a: lax.cond(p, lambda a: a @ jnp.ones((4, 9)), lambda a: jnp.zeros((3, 9)), a)
    assert fz.count_macs(pick, True, a) == 3 * 4 * 9


# --- NNX layers --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layer_agrees_with_factorized_value(case):
    from flax import nnx

    shape = (3, 3, 6, 5)
    rank = _clip(case.ranks[1], case.family, shape)
    layer = fz.FactorizedConv(6, 5, 3, family=case.family, rank=rank, strides=2, rngs=nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    f = layer.to_factorized()
    assert n_params == f.params + 5
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 10, 6))
    assert fz.count_macs(layer, x) == 2 * layer.macs(10) == 2 * f.macs(10, 2)
    bias = jnp.arange(5.0)
    rebuilt = fz.FactorizedConv.from_factorized(f, bias=bias, strides=2)
    np.testing.assert_allclose(rebuilt(x), _ref_conv(x, f.to_kernel(), (2, 2), "SAME") + bias,
                               rtol=1e-5, atol=1e-5)


def test_full_layer_matches_nnx_conv():
    from flax import nnx

    conv = nnx.Conv(4, 6, (3, 3), strides=2, padding="VALID", rngs=nnx.Rngs(0))
    f = fz.from_factors("full", None, conv.kernel.shape, [conv.kernel[...]])
    layer = fz.FactorizedConv.from_factorized(f, bias=conv.bias[...], strides=2, padding="VALID")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 4))
    np.testing.assert_allclose(layer(x), conv(x), rtol=1e-6, atol=1e-6)


def test_layer_dtype_and_jit():
    from flax import nnx

    layer = fz.FactorizedConv(4, 8, 3, family="dsc", rank=1, dtype=jnp.bfloat16,
                              param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(layer, jnp.ones((1, 5, 5, 4)))
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 5, 5, 8)
    assert layer.factors[0][...].dtype == jnp.float32


def test_conv_factory_float_rank_is_a_parameter_fraction():
    from flax import nnx

    layer = fz.conv_factory("cp4", 0.25)(64, 64, (3, 3), rngs=nnx.Rngs(0))
    full = 3 * 3 * 64 * 64
    assert layer.to_factorized().params <= 0.25 * full
    bigger = fz.get_family("cp4").chain((3, 3, 64, 64), layer.rank + 1)
    assert sum(s.params for s in bigger) > 0.25 * full


# --- bad input ---------------------------------------------------------------------------------

W = np.ones((3, 3, 4, 5), np.float32)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fz.decompose(np.ones((3, 3, 4)), "dsc", 1), r"kernel must be 4-D.*got shape \(3, 3, 4\)"),
        (lambda: fz.decompose(W, "mobilenet", 1), r"unknown family 'mobilenet'.*'dsc'"),
        (lambda: fz.decompose(W, "dsc", 0), r"rank for 'dsc' must be in \[1, 5\], got 0"),
        (lambda: fz.decompose(W, "dsc", 6), r"rank for 'dsc' must be in \[1, 5\], got 6"),
        (lambda: fz.decompose(W, "spatial", 1.5), r"float rank .* \(0, 1\], got 1.5"),
        (lambda: fz.decompose(W, "spatial", 0.0), r"float rank .* \(0, 1\], got 0.0"),
        (lambda: fz.decompose(W, "dsc", 0.01), r"rank=0.01 is below the smallest 'dsc'"),
        (lambda: fz.decompose(W, "tucker2", (5, 5)), r"rank\[0\] for 'tucker2' must be in \[1, 4\]"),
        (lambda: fz.decompose(W, "tucker2", 3), r"must be a pair"),
        (lambda: fz.decompose(W, "cp4", "full"), r"no smallest exact rank"),
        (lambda: fz.decompose(W, "dsc", "half"), r"rank must be an int, a float"),
        (lambda: fz.decompose(W, "full", 3), r"family 'full' has no rank"),
        (lambda: fz.decompose(W, "dsc", 1, layout="NCHW"), r"layout must be 'HWIO' or 'OIHW'"),
        (lambda: fz.decompose(W, "dsc", 1, n_iter=3), r"takes no projection options"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_kernel_is_rejected(bad):
    w = W.copy()
    w[1, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"kernel must be finite, got 1 NaN/Inf entries of 180"):
        fz.decompose(w, "dsc", 1)


def test_wrong_input_channels_is_named():
    f = fz.decompose(W, "dsc", 1)
    with pytest.raises(ValueError, match=r"x must be NHWC with 4 channels, got shape \(1, 8, 8, 3\)"):
        f(jnp.ones((1, 8, 8, 3)))


def test_wrong_factor_shapes_are_named():
    with pytest.raises(ValueError, match=r"factors\[1\] must have shape \(1, 1, 4, 5\)"):
        fz.from_factors("dsc", 1, (3, 3, 4, 5), [np.ones((3, 3, 1, 4)), np.ones((1, 1, 4, 6))])


def test_bad_padding_is_named():
    f = fz.decompose(W, "dsc", 1)
    with pytest.raises(ValueError, match=r"padding must be 'SAME', 'VALID'.*'CIRCULAR'"):
        f(jnp.ones((1, 8, 8, 4)), padding="CIRCULAR")


# --- property test -----------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    family=st.sampled_from([c.family for c in CASES]),
    kh=st.integers(1, 4), kw=st.integers(1, 4), c=st.integers(1, 5), n=st.integers(1, 5),
    stride=st.integers(1, 3), padding=st.sampled_from(["SAME", "VALID"]), seed=st.integers(0, 99),
)
def test_any_shape_rank_runs_like_its_kernel(family, kh, kw, c, n, stride, padding, seed):
    shape = (kh, kw, c, n)
    fam = fz.get_family(family)
    upper = fam.max_rank(shape)
    rank = None if upper is None else (
        tuple(1 + seed % u for u in upper) if isinstance(upper, tuple) else 1 + seed % upper
    )
    key = jax.random.PRNGKey(seed)
    f = fz.random_factorized(key, shape, family, rank)
    x = jax.random.normal(key, (1, 7, 6, c))
    want = _ref_conv(x, f.to_kernel(), (stride, stride), padding)
    got = jax.jit(lambda x: f(x, stride, padding))(x)  # one compile, not one per op
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-4 * (1 + float(jnp.abs(want).max())))
    assert f.macs((7, 6), stride, padding) == fz.count_macs(lambda x: f(x, stride, padding), x)
