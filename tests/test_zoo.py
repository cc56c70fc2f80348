"""The model zoo: the manifest's checksums and figures match the shipped files, a damaged copy
fails naming the file, and evaluating a zoo checkpoint gives what the model computes."""

from __future__ import annotations

import hashlib
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from factorize import data, zoo
from factorize.cli import main
from factorize.costs import count_macs
from factorize.models import count_params
from factorize.training import read_meta, restore

MANIFEST = json.loads((zoo.ROOT / "MANIFEST.json").read_text())
NAMES = [m["name"] for m in MANIFEST["models"]]


def test_list_models():
    assert zoo.list_models() == NAMES and "digits-cnn" in NAMES
    assert {"fm-cnn-seed0", "fm-cnn-seed1"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_manifest_checksums_match_the_files(name):
    entry = zoo.info(name)
    d = zoo.ROOT / name
    on_disk = {p.relative_to(d).as_posix(): p for p in d.rglob("*") if p.is_file()}
    assert set(on_disk) == set(entry["files"])  # nothing unlisted, nothing missing
    for rel, want in entry["files"].items():
        blob = on_disk[rel].read_bytes()
        assert (len(blob), hashlib.sha256(blob).hexdigest()) == (want["size"], want["sha256"]), rel
    assert entry["size"] == sum(f["size"] for f in entry["files"].values()) < 3_000_000


@pytest.mark.parametrize("name", NAMES)
def test_manifest_figures_are_the_checkpoints(name):
    entry = zoo.info(name)
    model, meta = restore(zoo.path(name), return_meta=True)
    image_shape = meta["metadata"]["image_shape"]
    assert entry["dataset"] == meta["metadata"]["dataset"] and entry["model"] == meta["spec"].model
    assert entry["macs"] == count_macs(model, jnp.zeros((1, *image_shape)))
    assert entry["params"] == count_params(model)
    # the full-test-set accuracy the training run measured, in its checkpoint and its log
    last = json.loads((zoo.ROOT / name / "metrics.jsonl").read_text().splitlines()[-1])
    assert entry["test_accuracy"] == pytest.approx(meta["metadata"]["test_accuracy"], abs=1e-6)
    assert entry["test_accuracy"] == pytest.approx(last["test_accuracy"], abs=1e-6)
    assert f"--dataset {entry['dataset']}" in entry["training_command"]


@pytest.fixture
def copy(tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(zoo.ROOT, root)
    return root


def _largest(root, name):
    return max((p for p in (root / name).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_corrupt_copy_names_the_file(copy):
    assert zoo.path("digits-cnn", copy) == copy / "digits-cnn"
    f = _largest(copy, "digits-cnn")
    blob = bytearray(f.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, one flipped byte
    f.write_bytes(bytes(blob))
    with pytest.raises(zoo.ZooError, match=f"{f}: zoo file corrupt: sha256 does not match"):
        zoo.path("digits-cnn", copy)
    f.write_bytes(bytes(blob[:100]))
    with pytest.raises(zoo.ZooError, match=f"{f}: zoo file truncated or corrupt: expected "
                                           f"{len(blob)} bytes, got 100"):
        zoo.path("digits-cnn", copy)
    f.unlink()
    with pytest.raises(zoo.ZooError, match=f"{f}: zoo file is missing"):
        zoo.load("digits-cnn", copy)


def test_unknown_name_lists_the_known(capsys):
    with pytest.raises(zoo.ZooError, match="unknown zoo model 'fm-cnn'; known: " + ", ".join(NAMES)):
        zoo.path("fm-cnn")
    assert main(["eval", "zoo:fm-cnn"]) == 2
    assert "unknown zoo model 'fm-cnn'" in capsys.readouterr().err


@pytest.mark.parametrize("name, limit", [("fm-cnn-seed0", 500)])
def test_eval_reproduces_the_model_on_a_test_subset(name, limit, capsys):
    argv = ["eval", f"zoo:{name}", "--json", "--limit-test", str(limit)]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    # independently: the restored model's argmax on the same first test images
    entry = zoo.info(name)
    ds = data.load(entry["dataset"]).subset(None, limit)
    model = restore(zoo.path(name))
    logits = np.concatenate([np.asarray(model(jnp.asarray(ds.x_test[i:i + 250])))
                             for i in range(0, len(ds.x_test), 250)])
    want = float(np.mean(logits.argmax(-1) == ds.y_test))
    assert res["n_test"] == len(ds.y_test) and res["accuracy"] == pytest.approx(want, abs=1e-9)
    assert res["macs"] == entry["macs"] and res["params"] == entry["params"]


def test_zoo_checkpoint_records_no_local_paths():
    for name in NAMES:
        text = (zoo.ROOT / name / "checkpoint" / "factorize.json").read_text()
        assert "/tmp/" not in text and "/work/" not in text, name
        assert read_meta(f"zoo:{name}")["metadata"]["dataset"] == zoo.info(name)["dataset"]
