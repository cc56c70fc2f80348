"""The main job's verdict against the committed reference, on hand-made rows (no training), and
its default output directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from experiment_scripts import load

avf = load("accuracy_vs_flops")
ROOT = Path(__file__).resolve().parents[1]


def _rows(accs: dict[str, tuple[float, ...]], macs: int = 100) -> list[dict]:
    """Rows of a two-seed sweep of one family; ``accs`` gives each cell's accuracy per seed."""
    rows = []
    for seed in (0, 1):
        rows.append(dict(run_id=f"baseline/full/1.0/seed{seed}", kind="baseline", family="full",
                         mac_fraction=1.0, seed=seed, accuracy=accs["baseline"][seed],
                         macs=400, params=40, mac_ratio=1.0))
        rows.append(dict(run_id=f"convert/dsc/0.25/seed{seed}", kind="convert", family="dsc",
                         mac_fraction=0.25, seed=seed, accuracy=accs["after"][seed],
                         accuracy_before_finetune=accs["before"][seed], macs=macs, params=10,
                         mac_ratio=macs / 400, infeasible_layers=[]))
        rows.append(dict(run_id=f"scratch/dsc/0.25/seed{seed}", kind="scratch", family="dsc",
                         mac_fraction=0.25, seed=seed, accuracy=accs["scratch"][seed],
                         macs=macs, params=10, mac_ratio=macs / 400))
    return rows


# 100 test images, so the 3-image floor is 0.03; the converted cell's seeds are 0.20 apart.
REF = dict(baseline=(0.95, 0.95), before=(0.50, 0.70), after=(0.90, 0.91), scratch=(0.92, 0.92))


def test_identical_rows_agree_and_the_rule_is_stated():
    text, agree = avf.compare(_rows(REF), _rows(REF), n_test=100)
    assert agree
    assert "**AGREES with the reference**: 6 runs" in text
    assert "8 of 8 accuracies of single runs are identical" in text
    assert "3 of the 100 test images (3.00 points)" in text
    assert "| dsc | 0.25 | 100 | 60.00 / 60.00 | 90.50 / 90.50 | 92.00 / 92.00 |" in text
    assert "| full (baseline) | 1 | 400 | – | 95.00 / 95.00 | – |" in text


def test_means_within_the_seed_range_or_the_image_floor_agree():
    # converted mean 0.695 (0.095 off, inside its own 0.20 seed range); scratch mean 0.935
    # (0.015 off, inside the 3-image floor) although one of its runs is 4 images off
    run = dict(REF, before=(0.69, 0.70), scratch=(0.95, 0.92))
    text, agree = avf.compare(_rows(run), _rows(REF), n_test=100)
    assert agree, text
    assert "6 of 8 accuracies of single runs are identical" in text


def test_a_mean_beyond_the_tolerance_differs_and_names_the_cell():
    run = dict(REF, scratch=(0.96, 0.96))  # 4 images off where the seeds agree exactly
    text, agree = avf.compare(_rows(run), _rows(REF), n_test=100)
    assert not agree
    assert "**DIFFERS from the reference**" in text
    assert "- dsc at 0.25, from scratch: 96.00% against 92.00% (tolerance ± 3.00 points)" in text
    # converted: 0.21 off where the seeds are 0.20 apart
    run = dict(REF, before=(0.71, 0.91))
    text, agree = avf.compare(_rows(run), _rows(REF), n_test=100)
    assert not agree and "dsc at 0.25, converted: 81.00% against 60.00% (tolerance ± 20.00" in text
    # a 1000-image test set lowers the floor to 0.3 points: 1 point off now differs
    run = dict(REF, baseline=(0.96, 0.96))
    assert avf.compare(_rows(run), _rows(REF), n_test=100)[1]
    assert not avf.compare(_rows(run), _rows(REF), n_test=1000)[1]


def test_other_macs_or_missing_runs_differ():
    text, agree = avf.compare(_rows(REF, macs=101), _rows(REF), n_test=100)
    assert not agree
    assert "convert/dsc/0.25/seed0: macs 101 against 100" in text
    assert "| 101 / 100 |" in text
    partial = [r for r in _rows(REF) if r["seed"] == 0]
    text, agree = avf.compare(partial, _rows(REF), n_test=100)
    assert not agree and "runs in the reference only: baseline/full/1.0/seed1" in text


def test_refresh_reference_copies_every_output(tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    out.mkdir()
    for name in avf.OUTPUTS:
        (out / name).write_bytes(f"new {name}".encode())
    ref.mkdir()
    (ref / "results.md").write_text("old")
    avf.refresh_reference(out, ref)
    assert {p.name: p.read_bytes() for p in ref.iterdir()} == {
        name: f"new {name}".encode() for name in avf.OUTPUTS}


def test_default_output_is_a_git_ignored_run_directory():
    """The main job writes ``runs/digits`` by default, which git ignores; the committed
    reference in ``results/digits`` is not its output."""
    assert avf.default_out("digits") == ROOT / "runs" / "digits"
    assert avf.default_out("digits", quick=True) == ROOT / "runs" / "digits-quick"
    for out in (avf.default_out("digits"), avf.default_out("fashion_mnist", quick=True)):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "results.jsonl")],
                                 cwd=ROOT, capture_output=True)
        if ignored.returncode == 128:
            pytest.skip("not a git checkout")
        assert ignored.returncode == 0, f"{out} must be git-ignored"
