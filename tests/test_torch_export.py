"""Export to PyTorch and StableHLO, and the import-torch / export commands: the exported PyTorch
model's outputs equal the NNX model's, the deserialized StableHLO module's too, bad input is a
one-line error that leaves nothing behind."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import factorize as fz
from factorize.cli import main
from factorize.conversion import Policy, Rule, convert
from factorize.interop import export_stablehlo, export_torch
from factorize.models import ModelSpec, from_torch, make_model
from factorize.training import checkpoint

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torch_helpers import (  # noqa: E402
    hook_macs,
    images,
    jitted,
    randomize_batchnorm,
    torch_logits,
    torchvision_model,
)


def load_exported(out):
    """The exported directory's own load.py, imported as a user would."""
    spec = importlib.util.spec_from_file_location(f"load_{abs(hash(str(out)))}", out / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(out)


def assert_same(ours: np.ndarray, theirs: np.ndarray, tol: float = 1e-5) -> None:
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= tol * max(1.0, np.abs(theirs).max())


def call_stablehlo(out, x):
    from jax import export

    return np.asarray(export.deserialize((out / "model.jax_export").read_bytes()).call(x))


# ------------------------------------------------------------------------ the small CNN


@pytest.fixture(scope="module")
def cnn():
    """The README's CNN on 8×8×1 digits, random weights and BatchNorm statistics."""
    model = make_model("cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    key = jax.random.PRNGKey(1)
    for _, bn in nnx.iter_graph(model):
        if isinstance(bn, nnx.BatchNorm):
            k1, k2, key = jax.random.split(key, 3)
            bn.mean[...] = 0.3 * jax.random.normal(k1, bn.mean.shape)
            bn.var[...] = jax.random.uniform(k2, bn.var.shape, minval=0.2, maxval=2.0)
    model.eval()
    return model, ModelSpec("cnn", 10, 1)


@pytest.mark.parametrize("rules", [
    (),  # the full CNN
    (Rule("dsc", 1, path="conv[23]"), Rule("lowrank_in", 4, layer_type="linear")),
    # spatial: the H and W paddings belong to different stages; dsc on the head: a grouped
    # 1×1 stage in a linear layer
    (Rule("spatial", 2), Rule("dsc", 1, layer_type="linear")),
])
def test_cnn_export_equals_nnx(cnn, tmp_path, rules):
    model, spec = cnn
    x = images(8, batch=3, channels=1)
    converted, _ = convert(model, Policy(rules), x)
    out = export_torch(converted, spec, tmp_path / "cnn", image_shape=(8, 8, 1))
    assert sorted(os.listdir(out)) == ["architecture.json", "load.py", "model.safetensors"]
    net = load_exported(out)
    assert_same(torch_logits(net, x), np.asarray(converted(jnp.asarray(x))))
    layers = json.loads((out / "architecture.json").read_text())["layers"]
    # Flax's SAME at stride 2 on an even input pads (0, 1): an explicit ZeroPad2d
    pads = [m for m in layers["conv2"]["modules"] if m["type"] == "ZeroPad2d"]
    spatial = any(r.family == "spatial" for r in rules)
    assert [p["padding"] for p in pads] == ([[0, 0, 0, 1], [0, 1, 0, 0]] if spatial
                                            else [[0, 1, 0, 1]])
    if rules:
        assert isinstance(net.conv2, torch.nn.Sequential)
        assert isinstance(net.head, torch.nn.Sequential)


def test_stablehlo_equals_nnx(cnn, tmp_path):
    model, _ = cnn
    converted, _ = convert(model, Policy.uniform("lowrank_in", 8, skip="conv1"), images(8, channels=1))
    out = export_stablehlo(converted, tmp_path / "hlo", image_shape=(8, 8, 1))
    meta = json.loads((out / "model.json").read_text())
    assert meta["input_shape"] == ["b", 8, 8, 1] and meta["output_shape"] == ["b", 10]
    assert meta["input_layout"] == "NHWC" and meta["implementation"] == "lax"
    for batch in (1, 5):  # the batch size is symbolic
        x = images(8, batch=batch, seed=batch, channels=1)
        assert_same(call_stablehlo(out, x), np.asarray(converted(jnp.asarray(x))))


# --------------------------------------------------------- torchvision: import → export


@pytest.fixture(scope="module")
def resnet18():
    net = torchvision_model("resnet18", seed=5, num_classes=10)
    model, spec = from_torch(net.state_dict(), arch="resnet18", return_spec=True)
    return net, model, spec


@pytest.mark.parametrize("policy", [
    Policy.uniform("dsc", 1),
    # 1/4 of the MACs; the 64-channel stage only, few sweeps: the path is the same for all
    Policy.uniform("tucker2", macs=0.25, skip="^(conv1|layer[234])", options={"n_iter": 3}),
], ids=["dsc", "tucker2"])
def test_resnet18_converted_round_trip(resnet18, tmp_path, policy):
    net, model, spec = resnet18
    x = images(32, batch=2, seed=7)
    converted, report = convert(model, policy, x)
    assert report.mac_ratio < 1
    out = export_torch(converted, spec, tmp_path / "r18", image_shape=(32, 32, 3))
    exported = load_exported(out)
    assert isinstance(exported, torchvision.models.ResNet)
    assert isinstance(exported.layer1[0].conv1, torch.nn.Sequential)
    assert_same(torch_logits(exported, x), jitted(converted)(x))
    # the exported PyTorch model counts the converted model's MACs (forward hooks)
    assert hook_macs(exported, torch.zeros(1, 3, 32, 32)) == fz.count_macs(converted,
                                                                          jnp.asarray(x[:1]))


def test_mobilenet_v2_export_keeps_grouped_convs(tmp_path):
    net = torchvision_model("mobilenet_v2", seed=2, num_classes=10)
    model, spec = from_torch(net.state_dict(), arch="mobilenet_v2", return_spec=True)
    out = export_torch(model, spec, tmp_path / "mnv2", image_shape=(32, 32, 3))
    exported = load_exported(out)
    assert exported.features[2].conv[1][0].groups == 96  # the depthwise conv
    x = images(32, batch=2, seed=8)
    assert_same(torch_logits(exported, x), torch_logits(net, x))


# ------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def gray_resnet(tmp_path_factory):
    """A torchvision ResNet-18 for 1-channel images and 10 classes, as .pth and .safetensors,
    imported with the CLI at digits' 8×8×1."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("interop")
    torch.manual_seed(11)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    randomize_batchnorm(net, 12)
    net.eval()
    state = net.state_dict()
    torch.save(state, root / "gray.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, root / "gray.safetensors")
    return root, net


def test_import_torch_then_eval_convert_inspect_export(gray_resnet, capsys):
    root, net = gray_resnet
    pth = root / "gray.pth"
    assert main(["import-torch", str(pth), "--arch", "resnet18", "--image-shape", "8,8,1",
                 "--out", str(root / "imp"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert (info["num_classes"], info["in_channels"]) == (10, 1)
    assert info["macs"] == hook_macs(net, torch.zeros(1, 1, 8, 8))
    ckpt = root / "imp" / "checkpoint"
    meta = checkpoint.read_meta(ckpt)
    assert meta["spec"].model == "tv_resnet18" and meta["metadata"]["image_shape"] == [8, 8, 1]

    # eval: the accuracy PyTorch's own model gets on the same test images
    from factorize import data

    ds = data.load("digits").subset(None, 60)
    assert main(["eval", str(ckpt), "--dataset", "digits", "--limit-test", "60", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    theirs = torch_logits(net, np.asarray(ds.x_test, np.float32)).argmax(1)
    assert result["accuracy"] == pytest.approx(float(np.mean(theirs == ds.y_test)))
    assert result["macs"] == info["macs"]

    assert main(["inspect", str(ckpt), "--families", "dsc", "--fractions", "0.5", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["layers"]) == 21  # 20 convs and fc

    # the first stage only (one kernel shape): the rest of the path is the whole model's
    assert main(["convert", str(ckpt), "--family", "dsc", "--rank", "1",
                 "--skip", "^(conv1|layer[234]/.*)$", "--workers", "1",
                 "--out", str(root / "dsc")]) == 0
    capsys.readouterr()
    converted = checkpoint.restore(root / "dsc" / "checkpoint",
                                   layer_builder=fz.conversion.layer_builder)
    x = images(8, batch=4, seed=3, channels=1)
    ours = np.asarray(converted(jnp.asarray(x)))
    for to in ("torch", "stablehlo"):
        out = root / f"export-{to}"
        assert main(["export", str(root / "dsc" / "checkpoint"), "--to", to, "--out", str(out),
                     "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["to"] == to
        got = torch_logits(load_exported(out), x) if to == "torch" else call_stablehlo(out, x)
        assert_same(got, ours)


def _listing(path):
    return sorted(p.name for p in path.iterdir())


@pytest.fixture(scope="module")
def bad_inputs(gray_resnet):
    root, _ = gray_resnet
    for name in ("gray.pth", "gray.safetensors"):
        data = (root / name).read_bytes()
        (root / f"cut-{name}").write_bytes(data[: len(data) // 3])
    model = make_model("mobilenet", num_classes=10, in_channels=1, alpha=0.25, rngs=nnx.Rngs(0))
    checkpoint.save(root / "mobilenet", model, ModelSpec("mobilenet", 10, 1, {"alpha": 0.25}),
                    metadata={"image_shape": [8, 8, 1]})
    return root


@pytest.mark.parametrize("args, message", [
    (["import-torch", "{root}/gray.pth", "--arch", "resnet19", "--out", "{out}"],
     "unknown arch 'resnet19'; known: resnet18, resnet50, vgg16, vgg16_bn, mobilenet_v2"),
    (["import-torch", "{root}/cut-gray.pth", "--arch", "resnet18", "--image-shape", "8,8,1",
      "--out", "{out}"], "cannot read PyTorch file, truncated or corrupt"),
    (["import-torch", "{root}/cut-gray.safetensors", "--arch", "resnet18", "--image-shape",
      "8,8,1", "--out", "{out}"], "cannot read safetensors file, truncated or corrupt"),
    (["import-torch", "{root}/gray.safetensors", "--arch", "resnet50", "--out", "{out}"],
     "does not match torchvision resnet50"),
    (["import-torch", "{root}/missing.pth", "--arch", "resnet18", "--out", "{out}"],
     "does not exist"),
    (["import-torch", "{root}/gray.pth", "--arch", "resnet18", "--image-shape", "8,8",
      "--out", "{out}"], "--image-shape must be H,W,C"),
    (["import-torch", "{root}/gray.pth", "--arch", "resnet18", "--out", "{out}"],
     "--image-shape 224,224,3 has 3 channels; the state dict's first conv takes 1"),
    (["export", "{root}/mobilenet", "--to", "torch", "--out", "{out}"],
     "export to torch supports the models cnn, tv_resnet18, tv_resnet50, tv_vgg16, "
     "tv_vgg16_bn, tv_mobilenet_v2"),
    (["export", "{root}/nothing", "--to", "torch", "--out", "{out}"], "no such checkpoint"),
    (["export", "{root}/mobilenet", "--to", "stablehlo", "--out", "{root}"], "already exists"),
])
def test_bad_input_one_line_and_nothing_left(bad_inputs, tmp_path, capsys, args, message):
    root = bad_inputs
    out = tmp_path / "out"
    before = _listing(root)
    argv = [a.format(root=root, out=out) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and _listing(root) == before and _listing(tmp_path) == []


def test_import_pth_without_torch_is_one_line(bad_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    out = tmp_path / "out"
    assert main(["import-torch", str(bad_inputs / "gray.pth"), "--arch", "resnet18",
                 "--image-shape", "8,8,1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs PyTorch: pip install 'factorize[torch]'" in err[0]
    assert not out.exists()
