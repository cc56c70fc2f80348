"""select_rank: energy, parameter/MAC budgets and EVBMF on planted kernels."""

from __future__ import annotations

import numpy as np
import pytest

import factorize
from factorize.chain import chain_macs
from factorize.families import get_family


def lowrank_in_kernel(c=32, n=24, r=5, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    w = np.einsum("cr,rhwn->hwcn", rng.standard_normal((c, r)), rng.standard_normal((r, 3, 3, n)))
    w += noise * np.linalg.norm(w) / np.sqrt(w.size) * rng.standard_normal(w.shape)
    return w.astype(np.float32)


def test_energy_finds_planted_rank_and_is_monotone():
    w = lowrank_in_kernel()
    assert factorize.select_rank(w, "lowrank_in", energy=0.99999) == 5
    ranks = [factorize.select_rank(w, "lowrank_in", energy=e) for e in (0.5, 0.8, 0.95, 1.0)]
    assert ranks == sorted(ranks) and ranks[-1] == 5


def test_energy_tucker2_and_dsc():
    rng = np.random.default_rng(1)
    core = rng.standard_normal((3, 3, 4, 6))
    w = np.einsum("hwij,ci,nj->hwcn", core, rng.standard_normal((16, 4)),
                  rng.standard_normal((20, 6))).astype(np.float32)
    assert factorize.select_rank(w, "tucker2", energy=0.99999) == (4, 6)
    r = factorize.select_rank(w, "dsc", energy=0.9)
    assert 1 <= r <= 9


def test_budgets():
    w = np.zeros((3, 3, 64, 64), np.float32)
    assert factorize.select_rank(w, "cp4", params_fraction=0.25) == factorize.decompose(
        np.ones((3, 3, 64, 64), np.float32), "lowrank_in", 0.25).rank * 0 + int(
        0.25 * w.size // (3 + 3 + 64 + 64))
    fam = get_family("tucker2")
    r = factorize.select_rank(w, "tucker2", macs_fraction=0.3, input_hw=16, strides=2)
    full = chain_macs(get_family("full").chain(w.shape, None), 16, 2)
    assert chain_macs(fam.chain(w.shape, r), 16, 2) <= 0.3 * full
    bigger = (r[0] + 1, r[1] + 1)
    assert chain_macs(fam.chain(w.shape, bigger), 16, 2) > 0.3 * full


def test_evbmf_planted_and_noise():
    rng = np.random.default_rng(2)
    m = rng.standard_normal((40, 4)) @ rng.standard_normal((4, 90))
    noisy = m + 0.05 * rng.standard_normal(m.shape) * np.abs(m).mean()
    assert factorize.evbmf(noisy)[0] == 4
    assert factorize.evbmf(rng.standard_normal((40, 90)))[0] <= 2
    w = lowrank_in_kernel(noise=0.05)
    assert factorize.select_rank(w, "lowrank_in") == 5
    assert factorize.select_rank(w, "lowrank_in", method="evbmf") == 5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"energy": 0.9, "params_fraction": 0.5}, "at most one"),
        ({"energy": 1.5}, "energy"),
        ({"macs_fraction": 0.5}, "input_hw"),
        ({"method": "vbmf"}, "method"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        factorize.select_rank(lowrank_in_kernel(), "lowrank_in", **kwargs)


def test_criteria_not_defined_for_cp():
    with pytest.raises(ValueError, match="energy"):
        factorize.select_rank(lowrank_in_kernel(), "cp4", energy=0.9)
    with pytest.raises(ValueError, match="evbmf"):
        factorize.select_rank(lowrank_in_kernel(), "cp3")


def test_select_rank_by_name_forms():
    w = lowrank_in_kernel(noise=0.05)
    assert factorize.decompositions.select_rank_by_name(w, "lowrank_in", "evbmf") == \
        factorize.select_rank(w, "lowrank_in", method="evbmf") == 5
    assert factorize.decompositions.select_rank_by_name(w, "tucker2", " Energy:0.9 ") == \
        factorize.select_rank(w, "tucker2", energy=0.9)
    for bad in ("vbmf", "energy", "energy:", "energy:1.5", "energy:nan", "energy:x", "full"):
        with pytest.raises(ValueError, match="valid forms: 'evbmf' or 'energy:"):
            factorize.decompositions.select_rank_by_name(w, "tucker2", bad)
    with pytest.raises(ValueError, match="evbmf"):  # not defined for CP
        factorize.decompositions.select_rank_by_name(w, "cp4", "evbmf")


@pytest.mark.parametrize("name", ["evbmf", "energy:0.95"])
def test_convert_with_a_named_rank_uses_select_rank(name):
    """``Policy.uniform("tucker2", "evbmf")`` through ``convert``: the layer's ranks are the
    ones ``select_rank`` picks from that layer's kernel (a planted Tucker-(4, 6) kernel plus
    noise, so the choice is not the trivial one)."""
    import jax.numpy as jnp
    from flax import nnx

    from factorize.conversion import Policy, convert

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(16, 20, (3, 3), rngs=rngs)

        def __call__(self, x):
            return self.conv(x)

    rng = np.random.default_rng(3)
    w = np.einsum("hwij,ci,nj->hwcn", rng.standard_normal((3, 3, 4, 6)),
                  rng.standard_normal((16, 4)), rng.standard_normal((20, 6)))
    w += 0.05 * np.linalg.norm(w) / np.sqrt(w.size) * rng.standard_normal(w.shape)
    w = w.astype(np.float32)
    model = Tiny(nnx.Rngs(0))
    model.conv.kernel[...] = jnp.asarray(w)
    want = (factorize.select_rank(w, "tucker2") if name == "evbmf"
            else factorize.select_rank(w, "tucker2", energy=0.95))
    if name == "evbmf":
        assert want == (4, 6)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    converted, report = convert(model, Policy.uniform("tucker2", name), x)
    (row,) = report.rows
    assert row.family == "tucker2" and tuple(row.rank) == tuple(want)
    assert [tuple(p[...].shape) for p in converted.conv.factors] == [
        (1, 1, 16, want[0]), (3, 3, *want), (1, 1, want[1], 20)]
    if name == "evbmf":  # the planted ranks keep all but the noise
        assert row.rel_error < 0.1
    with pytest.raises(ValueError, match=r"layer 'conv'.*valid forms"):
        convert(model, Policy.uniform("tucker2", "energy=0.9"), x)
