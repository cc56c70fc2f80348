"""torchvision state dicts into the NNX models: logits equal PyTorch's, MACs equal the published
and a forward-hook count, full-rank conversion changes nothing, bad input is named."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import factorize as fz
from factorize.conversion import Policy, Rule, convert
from factorize.models import from_torch, read_state_dict

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torch_helpers import (  # noqa: E402
    assert_logits_close,
    hook_macs,
    images,
    jitted,
    torch_logits,
    torchvision_model,
)

# torchvision's docs list these as "GFLOPS"; they are multiply-adds (conventional MACs of the
# convs and linear layers, padding taps included) at 224×224, rounded to 2 decimals.
PUBLISHED_GMACS = {"resnet18": 1.81, "resnet50": 4.09, "mobilenet_v2": 0.30, "vgg16": 15.47,
                   "vgg16_bn": 15.47}
WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights",
           "mobilenet_v2": "MobileNet_V2_Weights", "vgg16": "VGG16_Weights",
           "vgg16_bn": "VGG16_BN_Weights"}


@pytest.fixture(scope="module", params=list(PUBLISHED_GMACS))
def imported(request):
    arch = request.param
    # VGG's classifier is 120M of its 138M parameters and does not change what is tested
    # (the flatten order and the 7×7 pool); 10 classes keep its last layer small.
    kwargs = {"num_classes": 10} if arch.startswith("vgg") else {}
    net = torchvision_model(arch, **kwargs)
    model = from_torch(net.state_dict(), arch=arch)
    return arch, net, model, jitted(model)


@pytest.mark.parametrize("hw", [224, 32])
def test_logits_equal_pytorch(imported, hw):
    arch, net, model, run = imported
    x = images(hw, seed=hw)
    assert_logits_close(run(x), torch_logits(net, x))


def test_macs_match_published_and_forward_hooks(imported):
    arch, net, model, _ = imported
    x = images(224)
    ours = fz.count_macs(model, jnp.asarray(x))
    assert ours == hook_macs(net, torch.from_numpy(x).permute(0, 3, 1, 2))
    if not arch.startswith("vgg"):  # VGG here has 10 classes, the published figure 1000
        assert round(ours / 1e9, 2) == PUBLISHED_GMACS[arch]
        weights = getattr(torchvision.models, WEIGHTS[arch])
        assert ours / 1e9 == pytest.approx(weights.DEFAULT.meta["_ops"], abs=5e-4)
    else:  # the 1000-class head adds 4096 × 990 MACs
        assert round((ours + 4096 * 990) / 1e9, 2) == PUBLISHED_GMACS[arch]


# One of each kind of conv (the 7×7/2 stem, a strided 3×3, 1×1s, a projection shortcut, a
# conv with bias): converting every layer costs a compiled SVD per kernel shape and a compile of
# the converted model, minutes on 2 cores. ResNet-50 and VGG-16-BN have no other kinds.
FULL_RANK_LAYERS = {
    "resnet18": "^(conv1|layer2/0/.*)$", "vgg16": "^features/[01]$",
    "mobilenet_v2": "^(stem|blocks/[12]/.*|last)$",
}


def test_full_rank_conversion_equals_imported(imported):
    arch, net, model, run = imported
    if arch not in FULL_RANK_LAYERS:
        pytest.skip(f"{arch}: no conv kind the other architectures lack")
    x = images(32, seed=32)  # the input of the logits test: its compiled forward is reused
    rule = Rule("lowrank_out", "full", path=FULL_RANK_LAYERS[arch])
    converted, report = convert(model, Policy((rule,)), x)
    assert len(report.converted) >= 2
    ours, theirs = jitted(converted)(x), run(x)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


# ------------------------------------------------------------------------ files, bad input


@pytest.fixture(scope="module")
def resnet18_state():
    return torchvision_model("resnet18", seed=3, num_classes=7).state_dict()


def test_pth_and_safetensors_files_equal_the_dict(resnet18_state, tmp_path):
    from safetensors.torch import save_file

    torch.save(resnet18_state, tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in resnet18_state.items()}, tmp_path / "r18.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet18_state.items()}, "epoch": 3},
               tmp_path / "wrapped.pt")
    ref = nnx.state(from_torch(resnet18_state, arch="resnet18"))
    for name in ("r18.pth", "r18.safetensors", "wrapped.pt"):
        model = from_torch(tmp_path / name, arch="tv_resnet18")
        assert model.fc.kernel.shape == (512, 7)  # num_classes read from fc.weight
        jax.tree.map(np.testing.assert_array_equal, nnx.state(model), ref)


def test_weights_land_where_pytorch_has_them(resnet18_state):
    model = from_torch(resnet18_state, arch="resnet18")
    np.testing.assert_array_equal(model.conv1.kernel[...],
                                  resnet18_state["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.fc.kernel[...], resnet18_state["fc.weight"].numpy().T)
    bn = model.layer2[0].downsample[1]
    np.testing.assert_array_equal(bn.var[...],
                                  resnet18_state["layer2.0.downsample.1.running_var"].numpy())
    assert model.bn1.use_running_average  # eval mode


@pytest.mark.parametrize("edit, message", [
    (lambda s: (s.pop("fc.bias"), s.pop("layer1.0.bn1.running_mean")),
     "2 missing keys: "),
    (lambda s: s.update({"head.weight": torch.zeros(3)}), "1 unexpected key: head.weight"),
    (lambda s: s.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}),
     "1 mis-shaped key: conv1.weight expected (64, 3, 7, 7) float, got (64, 3, 3, 3)"),
    (lambda s: [s.pop(k) for k in [k for k in s if k.startswith("layer4.")]],
     "25 missing keys: layer4.0."),
])
def test_mismatched_state_dict_names_keys(resnet18_state, edit, message):
    state = dict(resnet18_state)
    edit(state)
    with pytest.raises(ValueError, match="does not match torchvision resnet18") as e:
        from_torch(state, arch="resnet18")
    assert message in str(e.value)
    gone = [k for k in resnet18_state if k not in state and "num_batches" not in k]
    assert sum(f"{k}," in str(e.value) or f"{k};" in str(e.value) or str(e.value).endswith(k)
               or f"{k}, …" in str(e.value) for k in gone) == min(5, len(gone))
    assert (f"… ({len(gone) - 5} more)" in str(e.value)) == (len(gone) > 5)


def test_wrong_arch_and_unknown_arch(resnet18_state):
    with pytest.raises(ValueError, match=r"does not match torchvision resnet50 .*missing keys"):
        from_torch(resnet18_state, arch="resnet50")
    with pytest.raises(ValueError, match="unknown arch 'resnet19'; known: resnet18, resnet50, "
                                         "vgg16, vgg16_bn, mobilenet_v2"):
        from_torch(resnet18_state, arch="resnet19")


def test_truncated_and_wrong_files(resnet18_state, tmp_path):
    from safetensors.torch import save_file

    torch.save(resnet18_state, tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in resnet18_state.items()}, tmp_path / "r18.safetensors")
    for name in ("r18.pth", "r18.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            from_torch(tmp_path / f"cut-{name}", arch="resnet18")
    (tmp_path / "r18.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="must end in .pth, .pt, .bin, .safetensors"):
        from_torch(tmp_path / "r18.npz", arch="resnet18")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_torch(tmp_path / "nothing.pth", arch="resnet18")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a non-empty state dict"):
        from_torch(tmp_path / "list.pth", arch="resnet18")


def test_pth_without_torch_says_how_to_install(resnet18_state, tmp_path, monkeypatch):
    from factorize.models.torch_import import TorchNotInstalledError

    torch.save(resnet18_state, tmp_path / "r18.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(TorchNotInstalledError, match=r"pip install 'factorize\[torch\]'"):
        read_state_dict(tmp_path / "r18.pth")


def test_import_factorize_never_imports_torch():
    code = ("import sys, factorize, factorize.models, factorize.interop, factorize.cli; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_adaptive_avg_pool_uses_pytorch_bins():
    from factorize.models.torchvision import adaptive_avg_pool

    for hw, out in [(10, 7), (1, 7), (5, 3), (7, 7), (9, 2), (3, 4)]:
        x = images(hw, batch=2, seed=hw, channels=4)
        theirs = torch.nn.functional.adaptive_avg_pool2d(
            torch.from_numpy(x).permute(0, 3, 1, 2), out).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(x), out)), theirs,
                                   rtol=1e-6, atol=1e-6)
