"""Training loop, checkpoints and data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from factorize import data
from factorize.layers import FactorizedConv
from factorize.models import ModelSpec, build, set_submodule
from factorize.training import (
    CheckpointError,
    TrainConfig,
    augment_batch,
    evaluate,
    fit,
    get_config,
    read_meta,
    restore,
    save,
    train_and_evaluate,
)


def _variables(model):
    return {
        "/".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Variable)
    }


def test_digits_training_and_checkpoint_roundtrip(tmp_path):
    # 4 epochs on 1437 images: a few seconds. Chance is 10%; a working CNN is far above 93%.
    cfg = get_config("digits", "cnn", epochs=4, progress=False)
    model, hist = train_and_evaluate(cfg, tmp_path / "run")
    assert hist[-1]["test_accuracy"] >= 0.93
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 4

    restored, meta = restore(tmp_path / "run" / "checkpoint", return_meta=True)
    assert meta["metadata"]["dataset"] == "digits"
    assert meta["spec"] == ModelSpec("cnn", 10, 1)
    a, b = _variables(model), _variables(restored)
    assert a.keys() == b.keys()
    for k in a:  # bit-identical, BatchNorm statistics included
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    ds = data.load("digits")
    res = evaluate(restored, ds.x_test, ds.y_test)
    assert res["accuracy"] == hist[-1]["test_accuracy"]

    with pytest.raises(FileExistsError, match="already holds a training run"):
        train_and_evaluate(cfg, tmp_path / "run")


def _small_run(seed=0, **kw):
    ds = data.load("digits").subset(256, 64)
    m = build(ModelSpec("cnn", 10, 1, {"widths": (8, 16, 16)}), rngs=nnx.Rngs(seed))
    cfg = TrainConfig(epochs=2, batch_size=32, seed=seed, progress=False, **kw)
    return m, ds, cfg


def test_fit_is_deterministic_and_can_freeze():
    m1, ds, cfg = _small_run()
    h1 = fit(m1, ds, cfg)
    m2, ds, cfg = _small_run()
    h2 = fit(m2, ds, cfg)
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]

    m3, ds, cfg = _small_run()
    before = _variables(m3)
    fit(m3, ds, cfg, wrt=nnx.All(nnx.Param, nnx.PathContains("head")))
    after = _variables(m3)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert {"head/kernel", "head/bias"} <= changed
    assert not any(k.startswith("conv") for k in changed)  # frozen convs untouched
    assert any(k.startswith("bn1/mean") for k in changed)  # BatchNorm statistics still run


def _tiny_checkpoint(path: Path) -> nnx.Module:
    m = build(ModelSpec("cnn", 10, 1, {"widths": (4, 8, 8)}), rngs=nnx.Rngs(0))
    save(path, m, ModelSpec("cnn", 10, 1, {"widths": (4, 8, 8)}), metadata={"dataset": "digits"})
    return m


def test_corrupt_checkpoints_give_clear_errors(tmp_path):
    ck = tmp_path / "ck"
    _tiny_checkpoint(ck)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left behind
    with pytest.raises(FileExistsError):
        _tiny_checkpoint(ck)  # never overwrites

    files = sorted(
        (p for p in (ck / "state").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size
    )
    big = files[0]
    blob = big.read_bytes()
    big.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError) as e:
        restore(ck)
    assert str(big) in str(e.value) and f"expected {len(blob)} bytes, got {len(blob) // 2}" in str(
        e.value
    )
    big.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256"):
        restore(ck)
    big.write_bytes(blob)
    restore(ck)  # intact again

    (ck / "factorize.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        restore(ck)
    (ck / "factorize.json").unlink()
    with pytest.raises(CheckpointError, match="not a factorize checkpoint"):
        restore(ck)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        restore(tmp_path / "missing")


def test_converted_model_checkpoint_and_finetune(tmp_path):
    spec = ModelSpec("cnn", 10, 1, {"widths": (8, 16, 16)})
    m = build(spec, rngs=nnx.Rngs(0))
    # What a conversion does: swap a layer for a factorized one with the same geometry.
    set_submodule(
        m,
        "conv2",
        FactorizedConv(
            8, 16, (3, 3), family="dsc", rank=2, strides=2, use_bias=False, rngs=nnx.Rngs(1)
        ),
    )
    save(tmp_path / "converted", m, spec, metadata={"dataset": "digits"})
    assert read_meta(tmp_path / "converted")["spec"].layers == {
        "conv2": {"family": "dsc", "rank": 2}
    }
    r = restore(tmp_path / "converted")
    assert isinstance(r.conv2, FactorizedConv) and r.conv2.strides == (2, 2)
    a, b = _variables(m), _variables(r)
    assert all(np.array_equal(a[k], b[k]) for k in a)

    cfg = TrainConfig(
        epochs=1,
        batch_size=32,
        n_train=128,
        n_test=64,
        progress=False,
        init_checkpoint=str(tmp_path / "converted"),
    )
    tuned, hist = train_and_evaluate(cfg, tmp_path / "ft")
    assert isinstance(tuned.conv2, FactorizedConv)
    assert read_meta(tmp_path / "ft" / "checkpoint")["spec"].layers["conv2"]["rank"] == 2
    assert not np.array_equal(_variables(tuned)["conv2/factors/0"], a["conv2/factors/0"])
    assert (tmp_path / "converted" / "factorize.json").exists()  # input untouched


def test_augment_batch_crops_and_flips():
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 2))
    out = augment_batch(x, jax.random.key(1))
    np.testing.assert_array_equal(out, augment_batch(x, jax.random.key(1)))
    xp = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(6):  # every image is one of the 81 crops of the padded image, maybe flipped
        crops = [xp[i, a : a + 8, b : b + 8] for a in range(9) for b in range(9)]
        crops += [c[:, ::-1] for c in crops]
        assert any(np.array_equal(np.asarray(out[i]), c) for c in crops)


SHARDING_SCRIPT = textwrap.dedent(
    """
    import json, jax, numpy as np
    from flax import nnx
    from factorize import data
    from factorize.models import ModelSpec, build
    from factorize.training import TrainConfig, fit, make_mesh
    assert len(jax.devices()) == 2, jax.devices()
    ds = data.load("digits").subset(256, 100)
    out = {}
    for n in (1, 2):
        m = build(ModelSpec("cnn", 10, 1, {"widths": (8, 16, 16)}), rngs=nnx.Rngs(0))
        cfg = TrainConfig(epochs=3, batch_size=32, progress=False)
        hist = fit(m, ds, cfg, mesh=make_mesh(jax.devices()[:n]))
        out[n] = {"loss": [h["train_loss"] for h in hist],
                  "acc": [h["test_accuracy"] for h in hist],
                  "kernel": np.asarray(m.head.kernel[...]).ravel().tolist()}
    try:
        fit(m, ds, TrainConfig(epochs=1, batch_size=33, progress=False), mesh=make_mesh())
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    print(json.dumps(out))
    """
)


def test_two_devices_match_one_device():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = out["1"], out["2"]
    # Same maths, different reduction order: equal to float32 rounding, not bit-for-bit.
    np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-4)
    np.testing.assert_allclose(one["kernel"], two["kernel"], rtol=1e-3, atol=1e-4)
    assert one["acc"] == pytest.approx(two["acc"], abs=0.02)
    assert "batch size 33 does not divide over 2 devices" in out["error"]
