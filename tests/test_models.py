"""Models: parameter and MAC counts against hand-computed formulas and published figures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from factorize.costs import count_macs
from factorize.layers import FactorizedConv, conv_factory
from factorize.models import (
    MODELS,
    ModelSpec,
    build,
    conv_layers,
    count_params,
    make_model,
    record_layers,
)
from factorize.models.mobilenet import MOBILENET_BLOCKS


def _abstract(name, **kw):
    # eval_shape: counts parameters without allocating or initialising them.
    return nnx.eval_shape(lambda: make_model(name, rngs=nnx.Rngs(0), **kw))


def _mobilenet_counts(alpha=1.0, num_classes=10, cin=3, hw=32):
    """MobileNet v1 (CIFAR stem) params and MACs from the paper's per-layer formulas."""
    c0 = int(round(32 * alpha))
    params = 9 * cin * c0 + 2 * c0
    macs = hw * hw * 9 * cin * c0
    c = c0
    for cout, s in MOBILENET_BLOCKS:
        cout = int(round(cout * alpha))
        hw //= s
        params += 9 * c + 2 * c + c * cout + 2 * cout  # depthwise + BN + pointwise + BN
        macs += hw * hw * 9 * c + hw * hw * c * cout
        c = cout
    return params + c * num_classes + num_classes, macs + c * num_classes


def _resnet18_macs(width=64, hw=32, num_classes=10):
    macs = hw * hw * 9 * 3 * width  # stem
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        for j in range(2):
            s = 2 if (i > 0 and j == 0) else 1
            hw //= s
            macs += hw * hw * 9 * cin * cout + hw * hw * 9 * cout * cout
            if s != 1 or cin != cout:
                macs += hw * hw * cin * cout  # 1×1 projection shortcut
            cin = cout
    return macs + cin * num_classes


def test_cnn_counts():
    w = (32, 64, 128)
    bn = 2 * sum(w)
    params = 9 * 1 * 32 + 9 * 32 * 64 + 9 * 64 * 128 + bn + 128 * 10 + 10
    m = make_model("cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    assert count_params(m) == params == 94186
    m.eval()
    for hw in (8, 28):  # stride-2 SAME convs: hw, hw/2, hw/4 output positions
        a, b, c = hw * hw, (hw // 2) ** 2, (hw // 4) ** 2
        want = a * 9 * 32 + b * 9 * 32 * 64 + c * 9 * 64 * 128 + 128 * 10
        assert count_macs(m, jnp.zeros((1, hw, hw, 1))) == want


def test_cnn_four_convs_counts():
    """The Fashion-MNIST CNN (training default): an extra stride-1 conv at 7×7."""
    from factorize.training import get_config

    kw = get_config("fashion_mnist", "cnn").model_kwargs
    assert kw == {"widths": [32, 64, 128, 128], "strides": [1, 2, 2, 1]}
    m = make_model("cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(0), **kw)
    convs = 9 * 1 * 32 + 9 * 32 * 64 + 9 * 64 * 128 + 9 * 128 * 128
    assert count_params(m) == convs + 2 * (32 + 64 + 128 + 128) + 128 * 10 + 10 == 241_898
    m.eval()
    want = (28 * 28 * 9 * 32 + 14 * 14 * 9 * 32 * 64 + 7 * 7 * 9 * 64 * 128
            + 7 * 7 * 9 * 128 * 128 + 128 * 10)
    assert count_macs(m, jnp.zeros((1, 28, 28, 1))) == want == 14_677_760


def test_cnn_rejects_mismatched_widths_and_strides():
    with pytest.raises(ValueError, match="widths and strides"):
        make_model("cnn", num_classes=10, in_channels=1, widths=(8, 16), strides=(1,),
                   rngs=nnx.Rngs(0))


def test_cnn_dsc_counts():
    # Depthwise-separable rank 1: depthwise k×k at the output resolution, then 1×1.
    m = make_model(
        "cnn", num_classes=10, in_channels=1, conv=conv_factory("dsc", 1), rngs=nnx.Rngs(0)
    )
    params = (9 + 32) + (9 * 32 + 32 * 64) + (9 * 64 + 64 * 128) + 2 * 224 + 1290
    assert count_params(m) == params
    m.eval()
    want = 64 * (9 + 32) + 16 * (9 * 32 + 32 * 64) + 4 * (9 * 64 + 64 * 128) + 1280
    assert count_macs(m, jnp.zeros((1, 8, 8, 1))) == want


def test_resnet18_counts():
    m = _abstract("resnet18", num_classes=10, in_channels=3)
    # Published figure for the CIFAR ResNet-18 (e.g. kuangliu/pytorch-cifar): 11,173,962.
    assert count_params(m) == 11_173_962
    m = make_model("resnet18", num_classes=10, in_channels=3, width=8, rngs=nnx.Rngs(0))
    m.eval()
    assert count_macs(m, jnp.zeros((1, 32, 32, 3))) == _resnet18_macs(width=8)
    assert _resnet18_macs() == 555_422_720  # ≈ 0.56 GMACs, the usual CIFAR ResNet-18 figure


def test_mobilenet_counts():
    m = _abstract("mobilenet", num_classes=10, in_channels=3)
    params, macs = _mobilenet_counts()
    assert count_params(m) == params == 3_217_226
    m = make_model("mobilenet", num_classes=10, in_channels=3, alpha=0.25, rngs=nnx.Rngs(0))
    m.eval()
    params, macs = _mobilenet_counts(alpha=0.25)
    assert count_params(m) == params
    assert count_macs(m, jnp.zeros((1, 32, 32, 3))) == macs


def test_mobilenet_factory_routes_pointwise_only():
    m = make_model(
        "mobilenet",
        num_classes=10,
        in_channels=3,
        alpha=0.25,
        conv=conv_factory("lowrank_in", 0.5),
        rngs=nnx.Rngs(0),
    )
    kinds = {p: type(c).__name__ for p, c in conv_layers(m).items()}
    assert kinds["stem"] == "FactorizedConv"
    assert all(kinds[f"blocks/{i}/pointwise"] == "FactorizedConv" for i in range(13))
    assert all(kinds[f"blocks/{i}/depthwise"] == "Conv" for i in range(13))
    m2 = make_model(
        "mobilenet",
        num_classes=10,
        in_channels=3,
        alpha=0.25,
        conv=conv_factory("dsc", 1),
        factorize_first=False,
        rngs=nnx.Rngs(0),
    )
    assert type(m2.stem) is nnx.Conv


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'vgg'") as err:
        make_model("vgg", num_classes=10, in_channels=3, rngs=nnx.Rngs(0))
    assert {"cnn", "resnet18", "mobilenet", "tv_resnet18", "tv_mobilenet_v2"} <= set(MODELS)
    listed = str(err.value).split("valid names: ")[1].split(", ")
    assert listed == list(MODELS)


SMALL = {
    "cnn": dict(kw={}, shape=(4, 8, 8, 1)),
    "resnet18": dict(kw={"width": 4}, shape=(4, 32, 32, 3)),
    "mobilenet": dict(kw={"alpha": 0.125}, shape=(4, 32, 32, 3)),
}
# Each compile costs seconds on CPU (20-45 s for a ResNet-18 or MobileNet training step): the
# CNN full and in two families, the larger models factorized only: a factorized step runs the
# same stem, shortcuts, BatchNorm and head as the full one (full ResNet-18 also trains in
# test_cli_train). lowrank_in cannot reduce a 1-input-channel stem, so keep it full.
CASES = [
    ("cnn", None),
    ("cnn", ("dsc", 1)),
    ("cnn", ("lowrank_in", 0.5)),
    ("resnet18", ("dsc", 1)),
    ("mobilenet", ("lowrank_in", 0.5)),
]


@pytest.mark.parametrize("name,factory", CASES)
def test_every_model_trains_a_step(name, factory):
    cfg = SMALL[name]
    conv = nnx.Conv if factory is None else conv_factory(*factory)
    first = factory is None or factory[0] == "dsc"
    m = make_model(
        name,
        num_classes=10,
        in_channels=cfg["shape"][-1],
        conv=conv,
        factorize_first=first,
        rngs=nnx.Rngs(0),
        **cfg["kw"],
    )
    x = jax.random.uniform(jax.random.key(1), cfg["shape"])
    y = jnp.arange(cfg["shape"][0]) % 10
    opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
    m.train()

    @nnx.jit
    def step(m, opt):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, g = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, g)
        return loss

    before = jax.tree.leaves(nnx.state(m, nnx.Param))
    before = [np.array(a) for a in before]
    l0 = step(m, opt)
    step(m, opt)
    assert np.isfinite(float(l0))
    after = jax.tree.leaves(nnx.state(m, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    m.eval()
    assert m(x).shape == (cfg["shape"][0], 10)


def test_batchnorm_train_and_eval_modes():
    m = make_model("cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1))
    mean0 = np.array(m.bn1.mean[...])
    m.eval()
    y1, y2 = m(x), m(x[:4])
    np.testing.assert_array_equal(m.bn1.mean[...], mean0)  # eval: running stats untouched
    np.testing.assert_allclose(y1[:4], y2, rtol=1e-5, atol=1e-6)  # eval: per-example
    m.train()
    m(x)
    assert not np.array_equal(m.bn1.mean[...], mean0)  # train: running stats updated


def test_model_spec_json_roundtrip_and_layer_overrides():
    spec = ModelSpec(
        "resnet18",
        10,
        3,
        {"width": 4},
        {"family": "tucker2", "rank": (2, 2)},
        {"blocks/2/conv1": {"family": "dsc", "rank": 1}},
    )
    again = ModelSpec.from_dict(__import__("json").loads(spec.to_json()))
    assert again == spec
    m = build(again, rngs=nnx.Rngs(0))
    layers = record_layers(m)
    assert layers["blocks/2/conv1"] == {"family": "dsc", "rank": 1}
    assert layers["blocks/0/conv1"] == {"family": "tucker2", "rank": (2, 2)}
    assert isinstance(m.blocks[2].conv1, FactorizedConv)
    assert m.blocks[2].conv1.strides == (2, 2)  # geometry kept from the replaced layer
    bad = ModelSpec("cnn", 10, 1, layers={"conv9": {"family": "dsc", "rank": 1}})
    with pytest.raises(ValueError, match="conv9.*conv1, conv2, conv3"):
        build(bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown model spec keys"):
        ModelSpec.from_dict({**spec.to_dict(), "colour": 1})
