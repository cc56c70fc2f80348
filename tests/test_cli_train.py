"""The ``factorize train`` / ``factorize eval`` commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from factorize.cli import COMMANDS, main


def test_train_then_eval_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--dataset",
            "digits",
            "--model",
            "cnn",
            "--epochs",
            "3",
            "--seed",
            "1",
            "--batch-size",
            "64",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "config.json", "metrics.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temp dirs left
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()

    assert main(["eval", str(out / "checkpoint"), "--dataset", "digits", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] == final["test_accuracy"] and res["accuracy"] > 0.9
    # Hand counts for the 3-conv CNN on 8×8×1 (see test_models): weights and conventional MACs.
    assert res["params"] == 9 * 32 + 9 * 32 * 64 + 9 * 64 * 128 + 2 * 224 + 1290
    assert res["macs"] == 64 * 9 * 32 + 16 * 9 * 32 * 64 + 4 * 9 * 64 * 128 + 1280
    assert res["n_test"] == 360

    assert main(["eval", str(out / "checkpoint")]) == 0  # dataset from the checkpoint
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--dataset", "imagenet", "--model", "cnn"], "digits, fashion_mnist, cifar10"),
        (["train", "--dataset", "digits", "--model", "vgg"], "cnn, resnet18, mobilenet"),
        (["train", "--dataset", "digits", "--model", "cnn", "--family", "nope"], "dsc"),
        (["train", "--dataset", "digits", "--model", "cnn", "--batch-size", "5000"], "exceeds"),
        (["eval", "MISSING"], "no such checkpoint"),
        (["eval", "MISSING", "--dataset", "svhn"], "unknown dataset"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(tmp_path, capsys, argv, needle):
    argv = [a.replace("MISSING", str(tmp_path / "nope")) for a in argv]
    if argv[0] == "train":
        argv += ["--epochs", "1", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("factorize ")
    assert not (tmp_path / "out").exists()  # no partial output
    assert [p.name for p in tmp_path.iterdir()] == []


def test_refuses_non_empty_out(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    rc = main(["train", "--dataset", "digits", "--model", "cnn", "--out", str(tmp_path)])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_help_has_examples():
    assert set(COMMANDS) >= {"train", "eval"}
    for cmd in ([], ["train"], ["eval"]):
        proc = subprocess.run(
            [sys.executable, "-m", "factorize.cli", *cmd, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0 and "example:" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "factorize.cli", "train"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "required" in proc.stderr


def test_train_resnet18_on_cifar_shaped_files(tmp_path, capsys):
    # Small files in CIFAR-10's python-pickle format (real CIFAR-10 is not shipped here).
    import pickle

    import numpy as np

    d = tmp_path / "data" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, 8)),
        }
        (d / name).write_bytes(pickle.dumps(batch))
    out = tmp_path / "run"
    argv = [
        "train",
        "--dataset",
        "cifar10",
        "--model",
        "resnet18",
        "--model-arg",
        "width=4",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 2  # the fakes fail the official checksums...
    assert "checksum mismatch" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--no-verify"]) == 0  # ...and train with --no-verify
    assert (
        main(
            [
                "eval",
                str(out / "checkpoint"),
                "--data-dir",
                str(tmp_path / "data"),
                "--no-verify",
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["model"] == "resnet18" and res["n_test"] == 8 and 0 <= res["accuracy"] <= 1
    assert (
        main(
            [
                "train",
                "--dataset",
                "digits",
                "--model",
                "cnn",
                "--model-arg",
                "width=4",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "cnn has no argument(s) ['width']" in capsys.readouterr().err
