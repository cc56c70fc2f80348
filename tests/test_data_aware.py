"""Data-aware conversion: patch statistics, the whitened closed forms against brute force, the
refinement, asymmetric reconstruction, bad input and the CLI.

One kernel shape for the family suite, so each family's fits compile once per test session.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from flax import nnx
from jax import lax

import factorize as fz
from factorize.chain import compose
from factorize.cli import main
from factorize.conversion import (
    InputStats,
    Policy,
    Rule,
    collect_input_stats,
    convert,
    output_error,
)
from factorize.conversion.calibration import patches
from factorize.families import data_aware, get_family

SHAPE = (3, 3, 4, 8)  # (kh, kw, C, N)
RANK = {"dsc": 2, "bsconv": 2, "spatial": 4, "lowrank_in": 2, "lowrank_out": 3,
        "tucker2": (2, 3), "cp3": 6, "cp4": 6}
FAMILIES = [f for f in fz.FAMILIES if f != "full"]
DIMS = ("NHWC", "HWIO", "NHWC")


def _correlated_inputs(key, n, hw=7, c=SHAPE[2]):
    """NHWC inputs with correlated channels, spatially smooth and with a non-zero mean."""
    # one distribution (a fixed channel mixing), samples drawn with ``key``
    mix = jax.random.normal(jax.random.key(99), (c, c)) + 2 * jnp.eye(c)
    x = jax.random.normal(key, (n, hw, hw, c)) @ mix + 0.5
    return x + 0.8 * jnp.roll(x, 1, axis=1) + 0.5 * jnp.roll(x, 1, axis=2)


@pytest.fixture(scope="module")
def problem():
    w = jax.random.normal(jax.random.key(1), SHAPE)
    calib = InputStats.from_inputs(_correlated_inputs(jax.random.key(2), 16), SHAPE)
    held_out = InputStats.from_inputs(_correlated_inputs(jax.random.key(3), 16), SHAPE)
    return w, calib, held_out


# --- statistics ------------------------------------------------------------------------------


def test_patches_reproduce_the_conv_in_hwio_order():
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
    w = jax.random.normal(jax.random.key(1), (3, 2, 3, 5))
    strides, pads, dilation = (2, 1), ((1, 2), (0, 1)), (1, 2)
    want = lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                    dimension_numbers=DIMS, precision=lax.Precision.HIGHEST)
    p = patches(x, (3, 2, 3), (strides, pads, dilation))
    got = (p @ w.reshape(-1, 5)).reshape(want.shape)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the second moment is pᵀp / rows, whatever the chunking of the batch
    st = InputStats.from_inputs(x, w.shape, strides=strides, padding=pads, dilation=dilation)
    pn = np.asarray(p, np.float64)
    np.testing.assert_allclose(st.second, pn.T @ pn / len(pn), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.mean, pn.mean(0), atol=1e-5)
    assert float(st.count) == len(pn)
    halves = InputStats.from_inputs(x[:1], w.shape, strides=strides, padding=pads,
                                    dilation=dilation).merge(
        InputStats.from_inputs(x[1:], w.shape, strides=strides, padding=pads, dilation=dilation))
    np.testing.assert_allclose(halves.second, st.second, rtol=1e-5, atol=1e-6)


def test_output_error_is_the_relative_output_error_of_the_conv(problem):
    w, _, _ = problem
    x = _correlated_inputs(jax.random.key(4), 3)
    st = InputStats.from_inputs(x, SHAPE)
    approx = fz.decompose(w, "lowrank_out", 3).to_kernel()

    def conv(k):
        return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DIMS,
                                        precision=lax.Precision.HIGHEST)

    want = jnp.sum((conv(w) - conv(approx)) ** 2) / jnp.sum(conv(w) ** 2)
    np.testing.assert_allclose(output_error(w, approx, st), want, rtol=1e-3)


# --- the family suite ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_data_aware_beats_data_free_on_its_objective(problem, family):
    w, calib, held_out = problem
    free = fz.decompose(w, family, RANK[family])
    aware, info = fz.decompose(w, family, RANK[family], inputs=calib, return_info=True)
    # the damped objective, minimised: never above the data-free projection's, never increasing
    s = data_aware.damped(calib.second, data_aware.DEFAULT_DAMP)
    obj = [float(data_aware.objective(s, w, f.to_kernel())) for f in (free, aware)]
    assert obj[1] <= obj[0] * (1 + 1e-6)
    assert np.all(np.diff(info["objectives"]) <= 1e-6 * info["objectives"][0])
    np.testing.assert_allclose(info["objectives"][-1], obj[1], rtol=1e-3)
    # the output error on the calibration data and on held-out data
    for st in (calib, held_out):
        e_free, e_aware = (float(output_error(w, f.to_kernel(), st)) for f in (free, aware))
        assert e_aware < 0.95 * e_free, (st is calib, e_free, e_aware)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_covariance_reduces_to_the_data_free_projection(problem, family):
    w, _, _ = problem
    p = int(np.prod(SHAPE[:3]))
    identity = InputStats(jnp.eye(p), jnp.zeros(p), jnp.asarray(1.0))
    free = fz.decompose(w, family, RANK[family])
    aware = fz.decompose(w, family, RANK[family], inputs=identity, refine=0)
    np.testing.assert_allclose(aware.to_kernel(), free.to_kernel(), rtol=1e-4, atol=1e-4)


def _structured_second_moment(kind: str, key) -> np.ndarray:
    """A positive definite S (P × P, HWIO order) with the structure a closed form is exact for."""
    kh, kw, c, _ = SHAPE
    k = kh * kw
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))

    def spd(n):
        g = rng.standard_normal((n, n + 2))
        return g @ g.T / n + 0.05 * np.eye(n)

    if kind == "full":
        return spd(k * c)
    if kind == "channel_blocks":  # channels uncorrelated, any position covariance per channel
        s = np.zeros((k, c, k, c))
        for ch in range(c):
            s[:, ch, :, ch] = spd(k)
        return s.reshape(k * c, k * c)
    if kind == "kron_channels":  # S = I_positions ⊗ S_C
        return np.kron(np.eye(k), spd(c))
    if kind == "rows_channels":  # S = δ_jj' A[(i, c), (i', c')]
        a = spd(kh * c).reshape(kh, c, kh, c)
        s = np.einsum("icxd,jy->ijcxyd", a, np.eye(kw))
        return s.reshape(k * c, k * c)
    raise AssertionError(kind)


def _brute_force(w, family, rank, s, restarts=3):
    """The lowest objective from L-BFGS over every factor from random starts (float64 driver,
    the objective and its gradient from the chain's composed kernel)."""
    stages = get_family(family).chain(SHAPE, rank)
    sizes = [int(np.prod(st.shape)) for st in stages]

    def unpack(v):
        out, i = [], 0
        for st, n in zip(stages, sizes, strict=True):
            out.append(v[i:i + n].reshape(st.shape))
            i += n
        return out

    f = jax.jit(jax.value_and_grad(
        lambda v: data_aware.objective(s, w, compose(stages, unpack(v)))))

    def fun(v):
        val, g = f(jnp.asarray(v, jnp.float32))
        return float(val), np.asarray(g, np.float64)

    rng = np.random.default_rng(0)
    best = np.inf
    for _ in range(restarts):
        v0 = rng.standard_normal(sum(sizes)) * 0.5
        res = scipy.optimize.minimize(fun, v0, jac=True, method="L-BFGS-B",
                                      options=dict(maxiter=2000, gtol=1e-9, ftol=1e-14))
        best = min(best, res.fun)
    return best


@pytest.mark.parametrize("family, structure", [
    ("lowrank_out", "full"),
    ("dsc", "channel_blocks"),
    ("lowrank_in", "kron_channels"),
    ("bsconv", "kron_channels"),
    ("spatial", "rows_channels"),
])
def test_closed_form_is_optimal_for_its_structured_objective(problem, family, structure):
    w, _, _ = problem
    s = jnp.asarray(_structured_second_moment(structure, jax.random.key(7)), jnp.float32)
    fam = get_family(family)
    closed = compose(fam.chain(SHAPE, RANK[family]), fam.project_whitened(w, RANK[family], s))
    closed_obj = float(data_aware.objective(s, w, closed))
    brute = _brute_force(w, family, RANK[family], s)
    # no local search does better, and the best of them reaches it (the closed form is the
    # optimum, not merely a good point)
    assert closed_obj <= brute * (1 + 1e-3)
    assert brute <= closed_obj * (1 + 2e-2)
    # and it beats the data-free projection on that objective
    free = fz.decompose(w, family, RANK[family]).to_kernel()
    assert closed_obj < float(data_aware.objective(s, w, free))


# --- asymmetric reconstruction and whole models ----------------------------------------------


class _TwoConvs(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(4, 4, (3, 3), use_bias=True, rngs=rngs)
        self.conv2 = nnx.Conv(4, 8, (3, 3), use_bias=False, rngs=rngs)  # SHAPE: compiled once

    def __call__(self, x):
        return self.conv2(nnx.relu(self.conv1(x)))


def test_asymmetric_beats_symmetric_on_the_final_output():
    model = _TwoConvs(nnx.Rngs(0))
    calib = _correlated_inputs(jax.random.key(10), 24)
    test = _correlated_inputs(jax.random.key(11), 24)
    policy = Policy((Rule("lowrank_out", 1, path="conv1"), Rule("lowrank_out", 3)))
    want = model(test)

    def final_error(m):
        return float(jnp.sum((m(test) - want) ** 2) / jnp.sum(want**2))

    free, _ = convert(model, policy, calib[:1])
    sym, _ = convert(model, policy, calib[:1], calibration=calib, reconstruction="symmetric")
    asym, report = convert(model, policy, calib[:1], calibration=[calib[:12], calib[12:]])
    errors = [final_error(m) for m in (free, sym, asym)]
    assert errors[2] < 0.95 * errors[1] < 0.9 * errors[0], errors
    assert all(r.output_error is not None and 0 <= r.output_error < 1 for r in report.rows)
    # conv1 has a bias: refitted so the output means match on the calibration data
    y0 = model.conv1(calib).mean(axis=(0, 1, 2))
    y1 = asym.conv1(calib).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(y1, y0, atol=1e-3 * float(jnp.abs(y0).max()) + 1e-4)
    assert "output error" in report.to_markdown()


def test_data_free_conversion_is_unchanged_without_calibration():
    model = _TwoConvs(nnx.Rngs(0))
    x = _correlated_inputs(jax.random.key(10), 2)
    converted, report = convert(model, Policy.uniform("lowrank_out", 3), x)
    f = fz.decompose(model.conv2.kernel[...], "lowrank_out", 3)
    np.testing.assert_array_equal(converted.conv2.factors[0][...], f.factors[0])
    assert all(r.output_error is None for r in report.rows)
    assert "output error" not in report.to_markdown()


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("calibration, message", [
    ([], "calibration is empty"),
    (np.zeros((0, 7, 7, 4), np.float32), "calibration is empty"),
    ([np.zeros((2, 7, 7, 3), np.float32)], "calibration[0]: expected a batch of shape "
                                           "(B, 7, 7, 4) and dtype float32, got shape (2, 7, 7, 3)"),
    ([np.zeros((2, 7, 7, 4), np.float32), np.zeros((2, 7, 7, 4), np.float64)],
     "calibration[1]: expected a batch of shape (B, 7, 7, 4) and dtype float32, got shape "
     "(2, 7, 7, 4) and dtype float64"),
    ([np.full((2, 7, 7, 4), np.nan, np.float32)], "calibration[0] has NaN/Inf entries"),
])
def test_bad_calibration_is_a_clear_error(calibration, message):
    model = _TwoConvs(nnx.Rngs(0))
    x = np.zeros((1, 7, 7, 4), np.float32)
    with pytest.raises(ValueError) as e:
        convert(model, Policy.uniform("lowrank_out", 3), x, calibration=calibration)
    assert message in str(e.value)


def test_nan_activations_name_the_layer():
    model = _TwoConvs(nnx.Rngs(0))
    model.conv1.bias[...] = model.conv1.bias[...].at[0].set(jnp.inf)
    x = np.ones((2, 7, 7, 4), np.float32)
    with pytest.raises(ValueError, match="calibration: layer 'conv2' gets NaN/Inf inputs"):
        collect_input_stats(model, [x])


def test_decompose_checks_the_statistics_against_the_kernel(problem):
    w, calib, _ = problem
    other = InputStats.from_inputs(jnp.ones((1, 5, 5, 3)), (3, 3, 3, 8))
    with pytest.raises(ValueError, match=r"patch length 27 do not fit a kernel \(3, 3, 4, 8\)"):
        fz.decompose(w, "dsc", 1, inputs=other)
    with pytest.raises(ValueError, match="damp must be a float > 0, got 0"):
        fz.decompose(w, "dsc", 1, inputs=calib, damp=0)
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        convert(_TwoConvs(nnx.Rngs(0)), Policy.uniform("dsc", 1), np.ones((1, 7, 7, 4)),
                calibration=[np.ones((1, 7, 7, 4))], reconstruction="both")


# --- a trained network and the CLI -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    assert main(["train", "--dataset", "digits", "--model", "cnn", "--epochs", "1",
                 "--out", str(root / "base"), "--no-progress"]) == 0
    return root, root / "base" / "checkpoint"


def test_cli_calibrate_end_to_end(trained, capsys):
    from factorize import data
    from factorize.conversion import layer_builder
    from factorize.training import checkpoint

    root, ckpt = trained
    out = root / "dsc"
    assert main(["convert", str(ckpt), "--family", "dsc", "--macs", "0.25", "--skip", "^conv1$",
                 "--calibrate", "128", "--json", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    rows = {r["path"]: r for r in report["layers"]}
    assert rows["conv1"]["output_error"] is None and 0 < rows["conv2"]["output_error"] < 1
    assert summary["output_error_max"] == max(rows["conv2"]["output_error"],
                                              rows["conv3"]["output_error"])
    assert summary["calibration"]["images"] == 128
    meta = checkpoint.restore(out / "checkpoint", layer_builder=layer_builder,
                              return_meta=True)[1]["metadata"]
    assert meta["calibration"] == {"images": 128, "split": "train", "seed": 0,
                                   "reconstruction": "asymmetric"}
    # the trained layers: data-aware output error below data-free, on held-out test images
    model = checkpoint.restore(ckpt, layer_builder=layer_builder)
    ds = data.load("digits")
    aware = checkpoint.restore(out / "checkpoint", layer_builder=layer_builder)
    free, _ = convert(model, Policy.uniform("dsc", macs=0.25, skip="^conv1$"), ds.x_test[:1])
    held = collect_input_stats(model, ds.x_test[:256], ["conv2"])["conv2"]
    kernel = model.conv2.kernel[...]
    errors = [float(output_error(kernel, m.conv2.to_factorized().to_kernel(), held)) for m in (free, aware)]
    assert errors[1] < 0.5 * errors[0], errors
    capsys.readouterr()
    # bad input: nothing written
    bad = root / "bad"
    assert main(["convert", str(ckpt), "--family", "dsc", "--calibrate", "99999",
                 "--out", str(bad)]) == 2
    assert "--calibrate 99999: the digits training split has only" in capsys.readouterr().err
    assert not bad.exists()
