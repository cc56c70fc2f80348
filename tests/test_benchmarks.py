"""The benchmark scripts in --quick mode: their JSON rows carry the keys the issues ask for and
hold values in range (timings are not checked: speed is measured by the benchmarks, not tests)."""

from __future__ import annotations

import json
import math

import pytest
from experiment_scripts import load


def test_bench_decompose_quick(tmp_path, capsys):
    out = tmp_path / "bd.json"
    rows = load("bench_decompose").main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert {(r["family"], r["kind"]) for r in rows} == {
        (f, k) for f in ("cp4", "cp3", "tucker2") for k in ("random", "planted")}
    for r in rows:
        assert {"family", "shape", "rank", "kind", "fz_time_s", "tl_time_s", "fz_rel_error",
                "tl_rel_error"} <= set(r)
        assert r["fz_time_s"] > 0 and r["tl_time_s"] > 0
        assert 0 <= r["fz_rel_error"] < 1 and 0 <= r["tl_rel_error"] < 1
        # same rank, budget and init kind as tensorly: never worse by more than 1 %
        assert r["error_ratio"] <= 1.01, r
    table = capsys.readouterr().out
    assert "| (32, 24, 3, 3) | cp4 | 8 | planted |" in table
    load("bench_decompose").main(["--render", str(out)])  # rebuilt from the JSON alone
    rendered = capsys.readouterr().out.strip()
    assert rendered.startswith("| shape") and table.rstrip().endswith(rendered)
    # a rerun with the same --json keeps every measured row and measures nothing again
    again = load("bench_decompose").main(["--quick", "--json", str(out), "--families", "cp3"])
    assert again == json.loads(out.read_text()) == json.loads(json.dumps(rows))


def test_bench_latency_quick(tmp_path):
    out = tmp_path / "bl.json"
    load("bench_latency").main(["--quick", "--configs", "default", "--families", "dsc", "cp3",
                                 "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {(r["family"], r["target"]) for r in rows} == {
        (f, t) for f in ("dsc", "cp3") for t in (1 / 4, 1 / 8)}
    for r in rows:
        assert {"family", "channels", "hw", "mac_ratio", "fwd_speedup", "train_speedup",
                "efficiency"} <= set(r)
        assert (r["channels"], r["hw"]) == (16, 8)
        assert 0 < r["mac_ratio"] <= r["target"] or r["rank"] == 1
        assert math.isclose(r["efficiency"], r["fwd_speedup"] * r["mac_ratio"])
        assert r["fwd_speedup"] > 0 and r["train_speedup"] > 0


def test_bench_latency_environments():
    """Each measuring subprocess gets exactly its config's variables: an inherited
    GLIBC_TUNABLES or XLA_FLAGS does not leak into a config that does not set it."""
    bl = load("bench_latency")
    base = {"PATH": "/bin", "XLA_FLAGS": "--inherited", "GLIBC_TUNABLES": "glibc.x=1"}
    assert bl.config_env("default", base) == {"PATH": "/bin", "XLA_FLAGS": ""}
    thp = bl.config_env("ynn_off_thp", base)
    assert thp == {"PATH": "/bin", "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=",
                   "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert "GLIBC_TUNABLES" not in bl.config_env("ynn_off", base)


def test_bench_latency_unknown_config_is_named(capsys):
    with pytest.raises(SystemExit):
        load("bench_latency").main(["--quick", "--configs", "default,fast_please"])
    err = capsys.readouterr().err
    assert "--configs" in err and "fast_please" in err and "ynn_off_thp" in err


def test_bench_latency_picks_the_environment_where_the_dense_conv_is_fastest():
    bl = load("bench_latency")

    def probe(fwd, train):
        return [{"channels": 128, "hw": 32, "full_fwd_s": fwd, "full_train_s": train},
                {"channels": 256, "hw": 16, "full_fwd_s": fwd, "full_train_s": train}]

    # default has the fastest forward pass, ynn_off the fastest sum of forward and training
    assert bl.fastest_config({"default": probe(0.010, 0.050), "ynn_off": probe(0.012, 0.030),
                              "ynn_off_thp": probe(0.011, 0.040)}) == "ynn_off"


def test_bench_latency_summary_names_the_slow_rows_and_the_lowest_efficiency():
    bl = load("bench_latency")

    def row(family, rank, channels, hw, ratio, fwd, train):
        return dict(family=family, rank=rank, channels=channels, hw=hw, mac_ratio=ratio,
                    fwd_speedup=fwd, train_speedup=train, efficiency=fwd * ratio)

    rows = [row("dsc", 1, 256, 32, 0.114, 5.0, 2.0), row("dsc", 2, 256, 32, 0.23, 3.0, 1.5),
            row("cp3", 60, 256, 32, 0.25, 3.2, 0.9), row("cp3", 30, 256, 32, 0.125, 6.0, 1.1),
            row("bsconv", 2, 64, 32, 0.46, 0.5, 0.5)]  # above 1/4 of the MACs: not counted
    text = bl.layer_summary(rows)
    assert text.splitlines()[0] == "Summary: 4 rows at ≤ 1/4 of the full conv's MACs"
    assert ("- forward: none slower than the dense conv (slowest 3.00×: dsc rank 2, "
            "C=256 32×32, MAC ratio 0.230)") in text
    assert ("- training step: 1 slower than the dense conv: 0.90× (cp3 rank 60, C=256 32×32, "
            "MAC ratio 0.250)") in text
    assert "of dsc at C=256, 32×32: 0.57 (rank 1, MAC ratio 0.114, 5.00× faster)" in text
    assert "of cp3 at C=256, 32×32: 0.75 (rank 30, MAC ratio 0.125, 6.00× faster)" in text
    assert "not measured in this run" in bl.layer_summary(rows[-1:])
