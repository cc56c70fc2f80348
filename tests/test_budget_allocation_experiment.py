"""experiments/budget_allocation.py on a tiny config: rows, budget check, resume, rebuilt tables."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from experiment_scripts import load
from flax import nnx

ba = load("budget_allocation")


def _tiny_baseline(root, seed: int = 0):
    """An untrained small CNN saved under ``root/base`` (the pipeline, not the accuracy, is
    under test) and a one-family digits setup that reads it."""
    from factorize.models import CNN, ModelSpec
    from factorize.training import checkpoint

    model = CNN(10, 1, widths=(8, 16, 16), rngs=nnx.Rngs(seed))
    checkpoint.save(root / "base" / "checkpoint", model,
                    ModelSpec("cnn", 10, 1, {"widths": [8, 16, 16]}),
                    metadata={"dataset": "digits", "image_shape": [8, 8, 1]})
    return ba.Setup("digits", {0: str(root / "base")}, fractions=(0.25,),
                    families=("lowrank_out",), mixed=("lowrank_out",),
                    projections=("data-free",), holdout=32, calibrate=32, grid=(0.25, 0.5),
                    n_train=200, n_test=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ba")
    setup = _tiny_baseline(root)
    out = root / "out"
    records = ba.run({"digits": setup}, out, stage="digits")
    return setup, out, records


def test_rows_meet_the_budget_and_tables_are_built(tiny):
    setup, out, records = tiny
    conv = [r for r in records if r["kind"] == "convert"]
    # lowrank_out and mixed, each uniform / knapsack / greedy (greedy at 1/4)
    assert sorted((r["family"], r["allocation"]) for r in conv) == [
        (f, a) for f in ("lowrank_out", "mixed") for a in ("greedy", "knapsack", "uniform")]
    for r in conv:
        assert r["status"] == "ok" and r["budget_met"]
        assert r["alloc_macs"] <= r["target_macs"]
        assert r["macs"] <= r["baseline_macs"] - r["alloc_macs"] / r["converted_fraction"] \
            + r["target_macs"] + 1
    assert {p.name for p in out.iterdir()} >= {"results.jsonl", "results.csv", "results.md",
                                               "accuracy_vs_macs.png", "sensitivity.json"}
    md = (out / "results.md").read_text()
    assert "| mixed |" in md and "data-free knapsack" in md
    assert "Budget met (count_macs of the built model ≤ limit) in 6 of 6" in md


def test_resume_does_nothing_and_rebuild_restores_tables(tiny, capsys):
    setup, out, _ = tiny
    before = (out / "results.jsonl").read_text()
    md, csv = (out / "results.md").read_text(), (out / "results.csv").read_text()
    capsys.readouterr()
    ba.run({"digits": setup}, out, stage="digits")
    assert "6 of 6 rows done, 0 to run" in capsys.readouterr().out
    assert (out / "results.jsonl").read_text() == before
    (out / "results.md").unlink()
    (out / "results.csv").unlink()
    assert ba.main(["--rebuild", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == md and (out / "results.csv").read_text() == csv


def test_plan_puts_the_cheapest_most_important_rows_first():
    rows = ba.plan(ba.SETUPS)
    first = [r for r in rows[:27]]
    assert all((r.dataset, r.seed, r.fraction, r.finetune_epochs) ==
               ("fashion_mnist", 0, 0.25, 0) for r in first)
    kinds = [(r.dataset, r.finetune_epochs) for r in rows]
    assert kinds.index(("digits", 0)) < kinds.index(("fashion_mnist", 1))
    assert all(r.finetune_epochs == 0 for r in rows[: kinds.index(("fashion_mnist", 1))])
    assert len({r.run_id for r in rows}) == len(rows)
    with pytest.raises(ValueError, match="--stage must be one of"):
        ba.plan(ba.SETUPS, "nope")
    assert dataclasses.replace(rows[0], finetune_epochs=1).run_id.endswith("/ft1")
    # the re-scored knapsack: one row per one-round knapsack row of the arms it covers
    rescored = ba.plan(ba.SETUPS, "rounds2")
    assert {r.allocation for r in rescored} == {"knapsack-r2"}
    knap = {dataclasses.replace(r, allocation="knapsack-r2") for r in rows
            if r.allocation == "knapsack" and r.finetune_epochs == 0}
    assert set(rescored) <= knap and len(set(rescored)) == len(rescored)
    seq = ba.plan(ba.SETUPS, "rounds2-asym")
    assert {(r.allocation, r.projection) for r in seq} == {("knapsack-r2-asym", "asymmetric")}
    assert {dataclasses.replace(r, allocation="knapsack") for r in seq} <= {
        r for r in rows if r.allocation == "knapsack"} and len(set(seq)) == len(seq)
    assert seq[0].seed == 0 and seq[0].fraction == 0.125
    best = ba.plan(ba.SETUPS, "best")
    assert {r.allocation for r in best} == {"knapsack-best"} and len(set(best)) == len(best)
    assert {r.projection for r in best} == set(ba.PROJECTIONS)
    order = list(dict.fromkeys((r.seed, r.fraction) for r in best))
    assert order == [(0, 0.125), (0, 0.25), (1, 0.25), (1, 0.125)]
    tuned = ba.plan(ba.SETUPS, "fm-finetune")
    symmetric = [r.projection == "symmetric" for r in tuned]
    assert symmetric == sorted(symmetric) and {r.seed for r in tuned[:symmetric.index(True)]} \
        == set(ba.SETUPS["fashion_mnist"].checkpoints)


def test_unseen_holdout_baselines_never_train_on_the_scoring_images(tmp_path, monkeypatch):
    import factorize.training as training

    seen = []

    def fake_train(config, workdir):
        seen.append(config)
        (workdir / "checkpoint").mkdir(parents=True)

    monkeypatch.setattr(training, "train_and_evaluate", fake_train)
    setup = dataclasses.replace(ba.SETUPS["digits_heldout"], checkpoints={0: str(tmp_path / "b")})
    ctx = ba.Context({"digits_heldout": setup}, tmp_path / "out")
    assert ctx.checkpoint("digits_heldout", 0) == tmp_path / "b" / "checkpoint"
    (config,) = seen
    n = len(ctx.data("digits_heldout").x_train)
    assert (config.dataset, config.n_train, config.seed) == ("digits", n - setup.holdout, 0)
    rows = ba.plan(ba.SETUPS, "digits-heldout")
    assert {r.dataset for r in rows} == {"digits_heldout"}
    assert len(rows) == len(ba.plan(ba.SETUPS, "digits")) == 2 * (54 + 81 + 54)


def test_rescored_knapsack_row_scores_the_curves_again(tiny):
    setup, out, _ = tiny
    ctx = ba.Context({"digits": setup}, out)
    n_before = len(json.loads((out / "sensitivity.json").read_text())["entries"])
    row = ba.Row("digits", 0, 0.25, "lowrank_out", "data-free", "knapsack-r2")
    rec = ba.run_row(row, ctx)
    assert rec["status"] == "ok" and rec["budget_met"] and rec["alloc_macs"] <= rec["target_macs"]
    # round two scores each layer with the other converted: new cache entries
    assert len(json.loads((out / "sensitivity.json").read_text())["entries"]) > n_before


def test_rows_on_another_network_than_the_recorded_baseline_are_refused(tmp_path):
    setup = _tiny_baseline(tmp_path)
    out = tmp_path / "out"
    records = ba.run({"digits": setup}, out, stage="digits", limit=1)
    (base,) = [r for r in records if r["kind"] == "baseline"]
    (row,) = [r for r in records if r["kind"] == "convert"]
    assert row["model"] == base["model"]
    before = (out / "results.jsonl").read_text()
    shutil.rmtree(tmp_path / "base")
    _tiny_baseline(tmp_path, seed=1)  # the same path, another network
    with pytest.raises(ValueError, match="measured on " + base["model"]):
        ba.run({"digits": setup}, out, stage="digits")
    assert (out / "results.jsonl").read_text() == before
