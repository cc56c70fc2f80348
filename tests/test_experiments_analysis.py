"""experiments/separability.py and experiments/cost_model.py in --quick mode: the content of their
outputs, checked against independent references (numpy SVD, hand formulas)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from experiment_scripts import load

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


# ---------------------------------------------------------------------------------------------
# separability


@pytest.fixture(scope="module")
def sep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sep")
    load("separability").main(["--quick", "--out", str(out)])
    return out


def test_effective_and_stable_rank_by_hand():
    m = load("separability")
    assert m.effective_rank(np.ones(4)) == pytest.approx(4.0)
    assert m.effective_rank(np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert m.stable_rank(np.array([2.0, 1.0])) == pytest.approx(5 / 4)
    assert m.effective_rank(np.zeros(3)) == 0.0


def test_separability_files(sep):
    for name in ("separability.jsonl", "separability.csv", "separability.md"):
        assert (sep / name).stat().st_size > 0
    for name in ("spectra.png", "energy_vs_macs.png"):
        _assert_png(sep / name)


def _kernels(sep: Path) -> dict[str, np.ndarray]:
    """The trained kernels, restored independently (HWIO; linear layers as 1×1)."""
    from factorize.training import restore

    (ckpt,) = sep.glob("baseline_*/checkpoint")
    model = restore(ckpt.resolve())
    ks = {f"conv{i}": np.asarray(getattr(model, f"conv{i}").kernel[...]) for i in (1, 2, 3)}
    h = np.asarray(model.head.kernel[...])
    ks["head"] = h.reshape(1, 1, *h.shape)
    return ks


def test_spectra_match_numpy_svd(sep):
    recs = _records(sep / "separability.jsonl")
    layers = {(r["layer"], r["kind"]): r for r in recs if r["type"] == "layer"}
    kernels = _kernels(sep)
    assert set(kernels) == {name for name, _ in layers}
    for name, w in kernels.items():
        kh, kw, c, n = w.shape
        u = layers[(name, "trained")]["unfoldings"]
        if kh * kw == 1:  # the 1×1 layer is the N × C matrix itself
            assert set(u) == {"matrix"}
            ref = {"matrix": [np.linalg.svd(w[0, 0].T, compute_uv=False)]}
        else:
            ref = {
                "dsc": [np.linalg.svd(w[:, :, i, :].reshape(kh * kw, n), compute_uv=False)
                        for i in range(c)],
                "bsconv": [np.linalg.svd(w[:, :, :, j].reshape(kh * kw, c), compute_uv=False)
                           for j in range(n)],
                "mode_C": [np.linalg.svd(np.moveaxis(w, 2, 0).reshape(c, -1), compute_uv=False)],
                "mode_N": [np.linalg.svd(np.moveaxis(w, 3, 0).reshape(n, -1), compute_uv=False)],
                "spatial": [np.linalg.svd(np.concatenate(  # rows (i, c), columns (j, n)
                    [np.concatenate([w[i, j] for j in range(kw)], axis=1) for i in range(kh)],
                    axis=0), compute_uv=False)],
            }
        assert set(u) == set(ref)
        for key, svals in ref.items():
            got = np.asarray(u[key]["singular_values"])
            np.testing.assert_allclose(got, np.asarray(svals), rtol=1e-4, atol=1e-6)
            md = u[key]["min_dim"]
            assert md == got.shape[1]
            for kind in ("trained", "random"):
                st = layers[(name, kind)]["unfoldings"][key]
                assert 1.0 - 1e-9 <= st["effective_rank"] <= md + 1e-9
                assert 1.0 - 1e-9 <= st["stable_rank"] <= md + 1e-9
            # Roy & Vetterli by hand, mean over slices
            er = np.mean([np.exp(-np.sum((s / s.sum()) * np.log(s / s.sum()))) for s in svals])
            assert u[key]["effective_rank"] == pytest.approx(er, rel=1e-4)
            sr = np.mean([np.sum(s**2) / s[0] ** 2 for s in svals])
            assert u[key]["stable_rank"] == pytest.approx(sr, rel=1e-4)


def test_random_control_is_the_seeded_gaussian(sep):
    recs = _records(sep / "separability.jsonl")
    layers = [r for r in recs if r["type"] == "layer" and r["kind"] == "random"]
    order = ["conv1", "conv2", "conv3", "head"]
    for r in layers:
        w = np.random.default_rng([0, order.index(r["layer"])]).standard_normal(r["shape"])
        c, n = r["shape"][2:]
        if r["shape"][0] * r["shape"][1] > 1:
            ref = np.linalg.svd(np.moveaxis(w, 2, 0).reshape(c, -1), compute_uv=False)
            got = r["unfoldings"]["mode_C"]["singular_values"][0]
            np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_energy_curves(sep):
    rows = _csv(sep / "separability.csv")
    assert rows and set(rows[0]) >= {"layer", "kind", "family", "rank", "mac_fraction",
                                     "param_fraction", "rel_error", "energy", "energy_svd"}
    points = [r for r in _records(sep / "separability.jsonl") if r["type"] == "point"]
    assert len(rows) == len(points)
    assert {r["kind"] for r in rows} == {"trained", "random"}
    assert {r["family"] for r in rows} == {"dsc", "bsconv", "lowrank_in"}
    curves: dict[tuple, list] = {}
    for r in rows:
        e, frac = float(r["energy"]), float(r["mac_fraction"])
        assert -1e-6 <= e <= 1 + 1e-6
        assert 0 < min(frac, float(r["param_fraction"])) <= 1 + 1e-9
        assert e == pytest.approx(1 - float(r["rel_error"]) ** 2, abs=1e-9)
        # Eckart–Young: the real projection keeps exactly the top-r spectrum's energy.
        assert e == pytest.approx(float(r["energy_svd"]), abs=2e-4)
        curves.setdefault((r["layer"], r["kind"], r["family"]), []).append(
            (int(r["rank"]), frac, e))
    for pts in curves.values():
        pts.sort()
        assert all(b[1] > a[1] and b[2] >= a[2] - 1e-6 for a, b in zip(pts, pts[1:], strict=False))
    # The 1×1 layer: only the matrix factorization, and MAC fraction = R(C + N) / (C·N).
    head = [p for p in points if p["layer"] == "head"]
    assert head and {p["family"] for p in head} == {"lowrank_in"}
    for p in head:
        c, n = p["shape"][2:]
        assert p["mac_fraction"] == pytest.approx(p["rank"] * (c + n) / (c * n))


def _tables(md: str):
    """(heading line, verdict text, table rows) of each per-layer dsc/bsconv table."""
    out = []
    for m in re.finditer(r"\*\*(\w+)\*\* \((\w+), by ([\w ]+)\): (.*)\n\n((?:\|.*\n)+)", md):
        rows = [line.split("|")[1:-1] for line in m.group(5).splitlines()[2:]]
        out.append((m.group(1), m.group(2), m.group(4), [[c.strip() for c in r] for r in rows]))
    return out


def test_bsconv_verdict_follows_the_table(sep):
    md = (sep / "separability.md").read_text()
    tables = _tables(md)
    assert len(tables) >= 4  # conv1..3, trained and random, by MACs (+ by parameters)
    for _layer, _kind, text, rows in tables:
        wins = {"dsc": 0, "bsconv": 0}
        for r in rows:
            better = r[-1]
            if r[3] == "—" or r[6] == "—":
                assert better == "n/a"
                continue
            e_dsc, e_bs = float(r[3]), float(r[6])
            assert better == ("dsc" if e_dsc < e_bs else "bsconv") or better == "tie"
            wins[better] = wins.get(better, 0) + 1
        if wins["dsc"] + wins["bsconv"] == 0:
            continue
        assert f"dsc {wins['dsc']}, bsconv {wins['bsconv']}" in text
        if wins["dsc"] != wins["bsconv"]:
            assert text.startswith("dsc" if wins["dsc"] > wins["bsconv"] else "bsconv")
    assert "### Verdict (all k×k layers)" in md


def test_rerun_does_no_work_and_rebuild_rerenders(sep):
    m = load("separability")
    before = _records(sep / "separability.jsonl")
    md = (sep / "separability.md").read_text()
    m.main(["--quick", "--out", str(sep)])
    after = _records(sep / "separability.jsonl")
    new = after[len(before):]
    assert [r["type"] for r in new] == ["run"]  # nothing recomputed, no retraining
    assert len(list(sep.glob("baseline_*"))) == 1
    for name in ("separability.md", "separability.csv", "spectra.png"):
        (sep / name).unlink()
    m.main(["--rebuild", "--out", str(sep)])
    assert (sep / "separability.md").read_text() == md
    _assert_png(sep / "spectra.png")


# ---------------------------------------------------------------------------------------------
# cost model


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost")
    load("cost_model").main(["--quick", "--out", str(out)])
    return out


def test_seed_example_numbers(cost):
    md = (cost / "cost_model.md").read_text()
    for s in ("= 2160 MACs", "= 432 MACs", "= 240 MACs", "432 + 240 = 672 MACs", "0.311"):
        assert s in md
    (seed,) = [r for r in _records(cost / "cost_model.jsonl") if r["type"] == "seed"]
    assert (seed["full"], seed["depthwise"], seed["pointwise"], seed["dsc"]) == (
        27 * 16 * 5, 9 * 16 * 3, 3 * 16 * 5, 672)


def test_mobilenet_ratio_is_the_formula(cost):
    rows = [r for r in _records(cost / "cost_model.jsonl") if r["type"] == "mobilenet"]
    m = load("cost_model")
    assert {(r["k"], r["n"]) for r in rows} == {(k, n) for k in m.KS for n in m.NS}
    for r in rows:
        assert r["library"] == pytest.approx(1 / r["n"] + 1 / r["k"] ** 2, rel=1e-12)
    assert "| 3 |" in (cost / "cost_model.md").read_text()
    assert m.mobilenet_ratio(3, 512) == pytest.approx(0.1131, abs=5e-5)
    _assert_png(cost / "cost_model_mobilenet.png")


def test_speed_rows(cost):
    rows = _csv(cost / "cost_model.csv")
    assert rows and {r["family"] for r in rows} == {"dsc"}
    for r in rows:
        ratio, red = float(r["mac_ratio"]), float(r["mac_reduction"])
        assert 0 < ratio <= 0.25 + 1e-9 and red == pytest.approx(1 / ratio)
        for k in ("fwd_speedup", "train_speedup", "full_fwd_s", "fact_fwd_s"):
            assert float(r[k]) > 0
        assert float(r["fwd_speedup"]) == pytest.approx(
            float(r["full_fwd_s"]) / float(r["fact_fwd_s"]))
        assert float(r["fwd_efficiency"]) == pytest.approx(float(r["fwd_speedup"]) * ratio)
    _assert_png(cost / "cost_model_speed.png")


def test_cost_rerun_and_from_json(cost, tmp_path):
    m = load("cost_model")
    n_speed = sum(r["type"] == "speed" for r in _records(cost / "cost_model.jsonl"))
    m.main(["--quick", "--out", str(cost)])  # recorded already: no re-measurement
    assert sum(r["type"] == "speed" for r in _records(cost / "cost_model.jsonl")) == n_speed
    # bench_latency's --json rows (merged format), read without measuring anything
    fake = [{"family": "cp3", "rank": 20, "channels": 64, "hw": 16, "batch": 32,
             "target": 0.25, "mac_ratio": 0.2, "full_fwd_s": 0.01, "fact_fwd_s": 0.004,
             "full_train_s": 0.03, "fact_train_s": 0.02, "fwd_speedup": 2.5,
             "train_speedup": 1.5, "efficiency": 0.5}]
    (tmp_path / "lat.json").write_text(json.dumps(fake))
    out = tmp_path / "out"
    m.main(["--from-json", str(tmp_path / "lat.json"), "--out", str(out)])
    (row,) = _csv(out / "cost_model.csv")
    assert row["family"] == "cp3" and float(row["mac_reduction"]) == pytest.approx(5.0)
    assert float(row["flops_overstate_fwd"]) == pytest.approx(2.0)
    assert "| cp3 | 20 | 1/4 | 0.200 | 5.00 | 2.50 | 1.50 | 0.50 | 0.30 | 2.00 |" in (
        out / "cost_model.md").read_text()


def test_help_has_command_and_runtime(capsys):
    for name in ("separability", "cost_model"):
        with pytest.raises(SystemExit) as e:
            load(name).main(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert f"python3 experiments/{name}.py --out results/{name}" in text
        assert "--quick" in text and "min" in text and "--rebuild" in text
