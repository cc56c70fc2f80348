"""The CLI round trip train → convert → eval → inspect, `decompose` on raw kernels, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import factorize as fz
from factorize.cli import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factorize.cli", *args], capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["train", "--dataset", "digits", "--model", "cnn", "--epochs", "3",
                 "--out", str(root / "base"), "--no-progress"]) == 0
    return root, root / "base" / "checkpoint"


def test_train_convert_eval_inspect_round_trip(trained, capsys):
    root, ckpt = trained
    out = root / "conv"
    assert main(["convert", str(ckpt), "--family", "dsc", "--macs", "0.3", "--skip", "^conv1$",
                 "--finetune-epochs", "1", "--workers", "1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"checkpoint", "report.json", "report.md",
                                               "report.csv", "finetune.json"}
    report = json.loads((out / "report.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint"), "--dataset", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the restored converted model's MACs (count_macs) are the report's whole-model total
    assert result["macs"] == report["totals"]["model_macs_after"]
    assert result["params"] == report["totals"]["model_params_after"]
    finetuned = json.loads((out / "finetune.json").read_text())
    assert result["accuracy"] == pytest.approx(finetuned["accuracy_after"], abs=1e-6)
    by_path = {r["path"]: r for r in report["layers"]}
    assert by_path["conv1"]["family"] is None and by_path["conv2"]["family"] == "dsc"
    assert by_path["conv2"]["macs_after"] <= 0.3 * by_path["conv2"]["macs_before"]

    assert main(["inspect", str(ckpt), "--families", "dsc,spatial", "--fractions", "0.5,0.25",
                 "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [r["path"] for r in layers] == ["conv1", "conv2", "conv3", "head"]
    conv2 = layers[1]
    e50, e25 = conv2["errors"]["dsc@0.5"], conv2["errors"]["dsc@0.25"]
    assert 0 <= e50 <= e25 <= 1  # less budget, more error
    # the dsc error at 0.3 of the MACs is what the conversion reported
    assert e50 <= by_path["conv2"]["rel_error"] <= e25 + 1e-6


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "missing/checkpoint", "--family", "dsc", "--out", "{out}"], "no such checkpoint"),
        (["convert", "{ckpt}", "--family", "dsc", "--rank", "12", "--out", "{out}"],
         "rank for 'dsc' must be in [1, 9], got 12"),
        (["convert", "{ckpt}", "--rules", "{rules}", "--out", "{out}"], "matched no convertible layer"),
        (["convert", "{ckpt}", "--out", "{out}"], "--family (or --rules) is required"),
        (["convert", "{ckpt}", "--family", "dsc", "--workers", "0", "--out", "{out}"],
         "workers must be an int >= 1, got 0"),
        (["inspect", "{ckpt}", "--fractions", "0,2"], "--fractions must lie in (0, 1]"),
    ],
)
def test_bad_input_one_line_and_no_output(trained, tmp_path, capsys, args, message):
    _, ckpt = trained
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [{"family": "dsc", "path": "^nothing$"}]}))
    out = tmp_path / "out"
    argv = [a.format(ckpt=ckpt, out=out, rules=rules) for a in args]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any cleared progress bar
    assert last.startswith(f"factorize {argv[0]}: error: ") and message in last
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rules.json"]  # no partial output


def test_unknown_family_is_refused_by_the_parser(trained):
    _, ckpt = trained
    res = _cli("convert", str(ckpt), "--family", "mobilenet", "--out", "x")
    assert res.returncode == 2 and "invalid choice: 'mobilenet'" in res.stderr


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_decompose_raw_kernel(tmp_path, capsys, suffix):
    rng = np.random.default_rng(0)
    w_oihw = rng.normal(size=(8, 6, 3, 3)).astype(np.float32)  # PyTorch layout
    src = tmp_path / f"conv{suffix}"
    if suffix == ".npz":
        np.savez(src, weight=w_oihw, bias=np.zeros(8, np.float32))
    else:
        from safetensors.numpy import save_file
        save_file({"weight": w_oihw, "bias": np.zeros(8, np.float32)}, src)
    before = src.read_bytes()
    out = tmp_path / f"factors{suffix}"
    assert main(["decompose", str(src), "--key", "weight", "--layout", "OIHW", "--family", "dsc",
                 "--rank", "full", "--out", str(out)]) == 0
    assert src.read_bytes() == before  # the input is never touched
    if suffix == ".npz":
        with np.load(out) as f:
            stages = [f["stage0"], f["stage1"]]
            groups = [f["stage0_groups"].item(), f["stage1_groups"].item()]
    else:
        from safetensors.numpy import load_file
        f = load_file(out)
        stages, groups = [f["stage0"], f["stage1"]], [f["stage0_groups"].item(), f["stage1_groups"].item()]
    assert groups == [6, 1]
    # factors are OIHW like the input: compose them back (in HWIO) and compare
    hwio = [s.transpose(2, 3, 1, 0) for s in stages]
    value = fz.from_factors("dsc", "full", (3, 3, 6, 8), hwio)
    np.testing.assert_allclose(value.to_kernel(), w_oihw.transpose(2, 3, 1, 0), atol=1e-5)
    # refuses to overwrite, and names what is wrong
    assert main(["decompose", str(src), "--key", "weight", "--family", "dsc", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["decompose", str(src), "--family", "dsc", "--out", str(tmp_path / "o.npz")]) == 2
    assert "holds 2 arrays" in capsys.readouterr().err
