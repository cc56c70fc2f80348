"""Checkpoint path forms (RUN, RUN/checkpoint, zoo:NAME) on every command that takes one, the
error for a directory that is none of them, and ``--json``: one JSON object on stdout, nothing
else there. The run directory is a copy of the zoo's digits CNN (no training needed)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from factorize import zoo
from factorize.cli import main
from factorize.training import CheckpointError, read_meta
from factorize.training.checkpoint import resolve_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    shutil.copytree(zoo.path("digits-cnn"), root / "run")
    return root / "run"


def _json(capsys) -> dict:
    out = capsys.readouterr().out
    assert out.count("\n") == 1, f"stdout must be one JSON line, got {out!r}"
    return json.loads(out)


def test_resolver_forms(run, tmp_path):
    ckpt = run / "checkpoint"
    assert resolve_checkpoint(run) == ckpt
    assert resolve_checkpoint(ckpt) == ckpt
    assert resolve_checkpoint(str(run)) == ckpt
    assert resolve_checkpoint("zoo:digits-cnn") == zoo.ROOT / "digits-cnn" / "checkpoint"
    assert read_meta(run)["spec"] == read_meta(ckpt)["spec"]
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(tmp_path)
    msg = str(e.value)  # both places tried, and what was expected there
    assert str(tmp_path) in msg and str(tmp_path / "checkpoint") in msg and "factorize.json" in msg
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="unknown zoo model 'nope'; known: .*digits-cnn"):
        resolve_checkpoint("zoo:nope")


@pytest.mark.parametrize("argv, needle", [
    (["eval", "{empty}"], "not a factorize checkpoint: expected factorize.json"),
    (["inspect", "{empty}"], "or in {empty}/checkpoint"),
    (["convert", "{empty}", "--family", "dsc", "--out", "{out}"], "not a factorize checkpoint"),
    (["export", "{empty}", "--to", "torch", "--out", "{out}"], "not a factorize checkpoint"),
    (["eval", "zoo:nope", "--json"], "unknown zoo model 'nope'"),
    (["train", "--dataset", "digits", "--model", "cnn", "--init", "{empty}", "--out", "{out}"],
     "--init: {empty}: not a factorize checkpoint"),
])
def test_wrong_directory_is_one_line(tmp_path, capsys, argv, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [a.format(empty=empty, out=tmp_path / "out") for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1
    assert err[0].startswith(f"factorize {argv[0]}: error: ") and needle.format(empty=empty) in err[0]
    assert not (tmp_path / "out").exists()


def test_eval_accepts_every_form(run, capsys):
    results = []
    for form in (run, "zoo:digits-cnn"):  # RUN/checkpoint: every other test here
        assert main(["eval", str(form), "--json"]) == 0
        results.append(_json(capsys))
    assert results[0]["checkpoint"] == str(run / "checkpoint")
    strip = [{k: v for k, v in r.items() if k != "checkpoint"} for r in results]
    assert strip[0] == strip[1]
    assert strip[0]["accuracy"] == zoo.info("digits-cnn")["test_accuracy"]


def test_inspect_both_forms_and_json(run, capsys):
    results = []
    for form in (run, run / "checkpoint"):
        assert main(["inspect", str(form), "--families", "dsc", "--fractions", "0.5",
                     "--json"]) == 0
        results.append(_json(capsys))
    assert results[0] == results[1]
    res = results[0]
    assert res["macs"] == zoo.info("digits-cnn")["macs"]
    convs = [r for r in res["layers"] if r["errors"]]
    # the summary's mean is the MAC-weighted mean of the per-layer errors
    want = sum(r["macs"] * r["errors"]["dsc@0.5"] for r in convs) / sum(r["macs"] for r in convs)
    assert res["summary"]["dsc"]["0.5"] == {"error": pytest.approx(want), "layers": len(convs)}
    assert main(["inspect", str(run), "--families", "dsc", "--fractions", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "609,536 MACs" in text and f"| dsc | {want:.3f} |" in text and len(text.splitlines()) <= 6


def test_convert_from_run_dir_and_zoo(run, tmp_path, capsys):
    results = []
    for form, out in ((run, tmp_path / "a"), ("zoo:digits-cnn", tmp_path / "b")):
        assert main(["convert", str(form), "--family", "dsc", "--rank", "1", "--skip", "^conv1$",
                     "--workers", "1", "--out", str(out), "--json"]) == 0
        res = _json(capsys)
        report = json.loads((out / "report.json").read_text())
        assert res["macs_after"] == report["totals"]["model_macs_after"]
        assert res["layers_converted"] == sum(r["family"] == "dsc" for r in report["layers"]) == 2
        meta = read_meta(out)
        assert meta["metadata"]["converted_from"] == res["source"]
        results.append(res)
    assert results[0]["source"] == str((run / "checkpoint").absolute())
    assert results[1]["source"] == str(zoo.ROOT / "digits-cnn" / "checkpoint")
    keep = ("macs_before", "macs_after", "params_before", "params_after", "rel_error_mean")
    assert [results[0][k] for k in keep] == [results[1][k] for k in keep]
    # the human summary: a few lines naming the MACs before → after and where it wrote
    assert main(["convert", str(run), "--family", "dsc", "--rank", "1", "--skip", "^conv1$",
                 "--workers", "1", "--out", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    r = results[0]
    assert f"{r['macs_before']:,} → {r['macs_after']:,}" in text
    assert f"wrote {tmp_path / 'c'}" in text and len(text.strip().splitlines()) <= 5


def test_export_from_run_dir(run, tmp_path, capsys):
    pytest.importorskip("torch")
    assert main(["export", str(run), "--to", "torch", "--out", str(tmp_path / "e"), "--json"]) == 0
    res = _json(capsys)
    assert res["checkpoint"] == str((run / "checkpoint").absolute())
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == sorted(res["files"])


def test_train_init_from_run_dir_json(run, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["train", "--dataset", "digits", "--model", "cnn", "--init", str(run),
                 "--epochs", "1", "--limit-train", "256", "--limit-test", "100",
                 "--out", str(out), "--json"]) == 0  # progress bars on: they go to stderr
    res = _json(capsys)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert res["test_accuracy"] == last["test_accuracy"] and res["checkpoint"] == str(out / "checkpoint")
    config = json.loads((out / "config.json").read_text())
    assert config["init_checkpoint"] == str((run / "checkpoint").absolute())


def test_decompose_json(tmp_path, capsys):
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype(np.float32)
    np.savez(tmp_path / "w.npz", w=w)
    assert main(["decompose", str(tmp_path / "w.npz"), "--family", "dsc", "--rank", "1",
                 "--out", str(tmp_path / "f.npz"), "--json"]) == 0
    res = _json(capsys)
    assert res["kernel_params"] == w.size and res["params"] == 4 * 9 + 4 * 6
    with np.load(tmp_path / "f.npz") as f:
        assert sorted(f.files) == sorted([*res["keys"], "meta"])


def test_docs_cli_lists_every_command_and_option():
    """docs/cli.md documents each command's every option (a new flag needs its row)."""
    from pathlib import Path

    from factorize.cli import COMMANDS, build_parser

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert f"### `factorize {name}" in text, name
        section = text.split(f"### `factorize {name}", 1)[1].split("\n### ", 1)[0]
        flags = [o for a in parser._actions for o in a.option_strings
                 if o.startswith("--") and o not in ("--help", "--json")]
        missing = [f for f in flags if f"`{f}" not in section]
        assert not missing, f"docs/cli.md, factorize {name}: undocumented {missing}"
    assert set(sub.choices) == set(COMMANDS)


def test_json_stdout_is_only_the_object_in_a_real_process():
    """`python -m factorize`, real stdout and stderr (orbax's and JAX's logging included):
    stdout is the JSON line alone. (In-process, the tests above check that progress bars and
    per-epoch lines of train go to stderr under --json.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "factorize", "eval", "zoo:digits-cnn", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1
    assert json.loads(proc.stdout)["accuracy"] == zoo.info("digits-cnn")["test_accuracy"]
