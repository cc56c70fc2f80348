"""The main experiment in --quick mode: killed mid-sweep, resumed, and its outputs checked."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from experiment_scripts import load

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "accuracy_vs_flops.py"


def _run(*args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A quick sweep that is killed after its first finished runs, then resumed."""
    out = tmp_path_factory.mktemp("avf")
    results = out / "results.jsonl"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while len(_lines(results)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before_kill = _lines(results)
    assert 2 <= len(before_kill) < 5, "the sweep should have been interrupted mid-way"
    resumed = _run("--quick", "--out", str(out), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return out, before_kill, resumed.stdout


def test_resume_keeps_finished_runs_and_completes(quick_run):
    out, before_kill, _ = quick_run
    after = _lines(out / "results.jsonl")
    assert after[: len(before_kill)] == before_kill  # nothing written was lost or rewritten
    ids = [json.loads(line)["run_id"] for line in after]
    assert len(ids) == len(set(ids)) == 5  # nothing redone, nothing missing
    assert sorted(ids) == sorted([
        "baseline/full/1.0/seed0",
        "convert/dsc/0.25/seed0", "scratch/dsc/0.25/seed0",
        "convert/cp3/0.25/seed0", "scratch/cp3/0.25/seed0",
    ])


def test_results_content(quick_run):
    out, _, stdout = quick_run
    rows = [json.loads(line) for line in _lines(out / "results.jsonl")]
    by_id = {r["run_id"]: r for r in rows}
    base = by_id["baseline/full/1.0/seed0"]
    # the CNN's MACs on one 8×8 digit, by hand: conv1 64·9·1·32, conv2 16·9·32·64 (stride 2),
    # conv3 4·9·64·128 (stride 2), head 128·10
    assert base["macs"] == 64 * 9 * 32 + 16 * 9 * 32 * 64 + 4 * 9 * 64 * 128 + 128 * 10
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["dataset"] == "digits" and r["model"] == "cnn"
        assert r["mac_ratio"] == pytest.approx(r["macs"] / base["macs"])
        if r["kind"] != "baseline":
            assert r["macs"] < 0.35 * base["macs"]  # ≤ 1/4 per converted conv, conv1 kept
    for family in ("dsc", "cp3"):
        conv, scratch = by_id[f"convert/{family}/0.25/seed0"], by_id[f"scratch/{family}/0.25/seed0"]
        assert conv["macs"] == scratch["macs"] and conv["params"] == scratch["params"]
        assert 0.0 <= conv["accuracy_before_finetune"] <= 1.0
        assert 0.0 <= conv["conv_mac_ratio"] <= 0.25 + 1e-9 or "conv1" not in conv["layers"]
        assert conv["latency_ms"] > 0
        assert set(conv["layers"]) == {"conv2", "conv3"}
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["run_id"] for t in table] == [r["run_id"] for r in rows]
    assert float(table[0]["accuracy"]) == pytest.approx(rows[0]["accuracy"])
    md = (out / "results.md").read_text()
    assert "| full (baseline) |" in md and "| dsc | 0.25 |" in md and "| cp3 | 0.25 |" in md
    assert "wins with" in md and md in stdout
    png = (out / "accuracy_vs_macs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_outputs_rebuild_from_json_lines_alone(quick_run):
    out, _, _ = quick_run
    md = (out / "results.md").read_text()
    csv_text = (out / "results.csv").read_text()
    for name in ("results.md", "results.csv", "accuracy_vs_macs.png"):
        (out / name).unlink()
    rebuilt = _run("--rebuild", "--out", str(out), timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert (out / "results.md").read_text() == md
    assert (out / "results.csv").read_text() == csv_text
    assert (out / "accuracy_vs_macs.png").stat().st_size > 10_000


def test_resuming_with_other_settings_is_refused(quick_run):
    out, _, _ = quick_run
    res = _run("--quick", "--epochs", "3", "--out", str(out), timeout=300)
    assert res.returncode != 0
    assert "holds a sweep with epochs=2, not 3" in res.stderr


def test_rebuild_without_results_names_the_file(tmp_path):
    res = _run("--rebuild", "--out", str(tmp_path), timeout=300)
    assert res.returncode != 0
    assert "results.jsonl has no results" in res.stderr


def test_verdict_weighs_the_lead_against_the_seed_spread():
    """Hand-made rows: the verdict names the winner and says whether its lead is more than the
    seed-to-seed spread (half-range), or that one seed gives no spread at all."""
    avf = load("accuracy_vs_flops")

    def row(family, kind, seed, acc):
        return dict(family=family, kind=kind, seed=seed, accuracy=acc, mac_fraction=0.25,
                    macs=100, mac_ratio=0.25, accuracy_before_finetune=0.5,
                    infeasible_layers=[], dataset="d", model="m")

    rows = [row("full", "baseline", s, 0.92) for s in (0, 1)]
    rows[0]["mac_fraction"] = rows[1]["mac_fraction"] = 1.0
    rows += [row("dsc", "convert", 0, 0.900), row("dsc", "convert", 1, 0.904),  # 90.20 ± 0.20
             row("cp3", "convert", 0, 0.880), row("cp3", "convert", 1, 0.890),  # 88.50 ± 0.50
             row("dsc", "scratch", 0, 0.900), row("dsc", "scratch", 1, 0.910),  # 90.50 ± 0.50
             row("cp3", "scratch", 0, 0.899), row("cp3", "scratch", 1, 0.905)]  # 90.20 ± 0.30
    md = avf.to_markdown(rows)
    assert "| dsc | 0.25 | 100 | 0.250 | 50.00 ± 0.00 | 90.20 ± 0.20 | 90.50 ± 0.50 |" in md
    assert ("converted + fine-tuned: **dsc** wins with 90.20%, 1.70 points ahead of cp3 "
            "(baseline 92.00); more than the seed-to-seed spread (± 0.50)") in md
    assert ("from scratch: **dsc** wins with 90.50%, 0.30 points ahead of cp3 (baseline "
            "92.00); no more than the seed-to-seed spread (± 0.50)") in md
    tie = [r for r in rows if r["kind"] != "scratch"]
    tie[-1] = {**tie[-1], "accuracy": 0.924}  # cp3 after fine-tuning: 88.00, 92.40 -> 90.20
    assert "**dsc** and **cp3** tie at 90.20%" in avf.to_markdown(tie)
    one_seed = [r for r in rows if r["seed"] == 0]
    md = avf.to_markdown(one_seed)
    assert "| 90.00 (1 seed) |" in md and "one seed only" in md
