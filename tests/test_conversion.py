"""Whole-model conversion: exactness at full rank, untouched input, report totals, policies."""

from __future__ import annotations

import csv
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import factorize as fz
from factorize.conversion import Policy, Rule, convert
from factorize.models import make_model

SVD_FAMILIES = ("dsc", "bsconv", "spatial", "lowrank_in", "lowrank_out", "tucker2")


def _params(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def _outputs_close(a, b, x):
    a.eval()
    b.eval()
    ya, yb = a(x), b(x)
    scale = float(jnp.abs(ya).max())
    np.testing.assert_allclose(yb, ya, atol=2e-5 * scale, rtol=0)


@pytest.fixture(scope="module")
def models():
    key = jax.random.PRNGKey(0)
    out = {
        "resnet18": (make_model("resnet18", num_classes=10, in_channels=3, width=8,
                                rngs=nnx.Rngs(0)), jax.random.normal(key, (2, 16, 16, 3))),
        "mobilenet": (make_model("mobilenet", num_classes=10, in_channels=3, alpha=0.25,
                                 rngs=nnx.Rngs(1)), jax.random.normal(key, (2, 16, 16, 3))),
    }
    for m, _ in out.values():
        m.eval()
    return out


@pytest.mark.parametrize("family", SVD_FAMILIES)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet"])
def test_full_rank_conversion_is_exact(models, name, family):
    model, x = models[name]
    before = _params(model)
    converted, report = convert(model, Policy.uniform(family, "full"), x)
    _outputs_close(model, converted, x)
    # the input model is never modified
    jax.tree.map(np.testing.assert_array_equal, before, _params(model))
    # the report's totals are what count_macs measures on each model
    assert report.model_macs_after == fz.count_macs(converted, x[:1])
    assert report.model_macs_before == fz.count_macs(model, x[:1])
    saved = sum(r.macs_before - r.macs_after for r in report.rows)
    assert report.model_macs_before - report.model_macs_after == saved
    assert all(r.rel_error < 1e-5 for r in report.converted)


def test_depthwise_convs_are_left_alone(models):
    model, x = models["mobilenet"]
    converted, report = convert(model, Policy.uniform("dsc", 1), x)
    depthwise = [r for r in report.rows if r.path.endswith("depthwise")]
    assert len(depthwise) == 13
    assert all(r.family is None and "grouped conv" in r.note for r in depthwise)
    assert type(converted.blocks[0].depthwise) is nnx.Conv
    np.testing.assert_array_equal(converted.blocks[0].depthwise.kernel[...],
                                  model.blocks[0].depthwise.kernel[...])


def test_rules_first_match_wins_and_skip(models):
    model, x = models["resnet18"]
    policy = Policy((
        Rule(None, path="^stem$"),
        Rule("cp4", 4, path="blocks/0/"),
        Rule("tucker2", (2, 2), kernel_size=(1, 1)),
        Rule("dsc", 1),
    ))
    converted, report = convert(model, policy, x)
    by_path = {r.path: r for r in report.rows}
    assert by_path["stem"].family is None
    assert by_path["blocks/0/conv1"].family == "cp4" and by_path["blocks/0/conv1"].rank == 4
    assert by_path["blocks/2/shortcut"].family == "tucker2"
    assert by_path["blocks/2/conv1"].family == "dsc"
    assert by_path["head"].family is None  # linear layers only when a rule asks for them
    assert isinstance(converted.blocks[2].conv1, fz.FactorizedConv)


def test_mac_budget_per_layer(models):
    model, x = models["resnet18"]
    converted, report = convert(model, Policy.uniform("dsc", macs=0.3, skip="^stem$|shortcut"), x)
    for r in report.converted:
        assert r.macs_after <= 0.3 * r.macs_before
        # the next rank would exceed the budget: the allocation is the largest that fits
        bigger = fz.get_family("dsc").chain(r.kernel_shape, r.rank + 1) if r.rank < 9 else None
        if bigger is not None:
            from factorize.chain import chain_macs
            assert chain_macs(bigger, r.input_hw, r.strides) > 0.3 * r.macs_before
    assert report.model_macs_after == fz.count_macs(converted, x[:1])


def test_infeasible_budget_errors_or_keeps(models):
    model, x = models["resnet18"]
    with pytest.raises(ValueError, match=r"layer 'stem'.*lowrank_in"):
        convert(model, Policy.uniform("lowrank_in", macs=0.1), x)
    _, report = convert(model, Policy.uniform("lowrank_in", macs=0.1, on_infeasible="keep"), x)
    stem = report.rows[0]
    assert stem.path == "stem" and stem.family is None and stem.note.startswith("kept:")


def test_parallel_conversion_equals_one_at_a_time_and_names_failing_layers(models):
    """Layers are decomposed on worker threads grouped by kernel shape; the result is the
    same model and report as converting them one by one in forward order."""
    model, x = models["resnet18"]
    policy = Policy((Rule("cp4", 3, path="blocks/[01]/", options={"n_iter": 5}), Rule("dsc", 1)))
    one, report_one = convert(model, policy, x, workers=1)
    two, report_two = convert(model, policy, x, workers=2)
    jax.tree.map(np.testing.assert_array_equal, _params(one), _params(two))
    assert report_one.rows == report_two.rows
    assert [r.path for r in report_two.rows] == list(fz.conversion.layer_inputs(model, x))
    # a rank out of range is caught while planning, named by layer
    too_big = Policy((Rule("cp4", 10**6, path="blocks/2/conv1"), Rule("dsc", 1)))
    with pytest.raises(ValueError, match=r"layer 'blocks/2/conv1'.*rank"):
        convert(model, too_big, x)
    # an error inside a decomposition (an unknown option) is named by layer too
    bad_option = Policy((Rule("dsc", 1, path="blocks/1/conv2", options={"colour": "red"}),
                         Rule("dsc", 1)))
    with pytest.raises(TypeError, match=r"layer 'blocks/1/conv2'.*colour"):
        convert(model, bad_option, x)
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        convert(model, policy, x, workers=0)


def test_linear_layer_is_the_1x1_case():
    class Head(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(12, 7, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.fc(x)

    model = Head()
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 12))
    exact, _ = convert(model, Policy((Rule("lowrank_in", "full", layer_type="linear"),)), x)
    np.testing.assert_allclose(exact(x), model(x), atol=1e-5)
    low, report = convert(model, Policy((Rule("lowrank_out", 3, layer_type="linear"),)), x)
    # reference: the best rank-3 approximation of the weight matrix by numpy's SVD
    w = np.asarray(model.fc.kernel[...])
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    w3 = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(low(x), np.asarray(x) @ w3 + np.asarray(model.fc.bias[...]),
                               atol=1e-4)
    assert report.rows[0].macs_after == 12 * 3 + 3 * 7
    assert fz.count_macs(low, x[:1]) == 12 * 3 + 3 * 7


def test_geometry_is_preserved():
    class Odd(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(4, 6, (3, 5), strides=(2, 1), kernel_dilation=(1, 2),
                                 padding=((1, 2), (0, 3)), rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.conv(x)

    model = Odd()
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 13, 11, 4))
    for family in SVD_FAMILIES:
        converted, report = convert(model, Policy.uniform(family, "full"), x)
        np.testing.assert_allclose(converted(x), model(x), atol=1e-4)
        assert report.rows[0].macs_after == fz.count_macs(converted, x[:1])
    f = fz.decompose(model.conv.kernel[...], "spatial", 2)
    converted, _ = convert(model, Policy.uniform("spatial", 2), x)
    want = lax.conv_general_dilated(
        x, f.to_kernel(), (2, 1), ((1, 2), (0, 3)), rhs_dilation=(1, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + model.conv.bias[...]
    np.testing.assert_allclose(converted(x), want, atol=1e-4)


def test_report_renders_as_markdown_csv_json(models, tmp_path):
    model, x = models["resnet18"]
    _, report = convert(model, Policy.uniform("tucker2", (4, 4), skip="^stem$"), x)
    md = report.to_markdown()
    assert md.count("\n| `") == len(report.rows)
    assert "| `blocks/3/conv2` | tucker2 | (4, 4) |" in md
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["path"] for r in rows] == [r.path for r in report.rows]
    assert int(rows[1]["macs_after"]) == report.rows[1].macs_after
    report.save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["totals"]["model_macs_after"] == report.model_macs_after
    assert len(data["layers"]) == len(report.rows)
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "report.csv"}


@pytest.mark.parametrize(
    "policy, match",
    [
        ({"rules": [{"family": "mobilenet"}]}, r"unknown family 'mobilenet'"),
        ({"rules": [{"family": "dsc", "rnak": 1}]}, r"rules\[0\] has unknown keys \['rnak'\]"),
        ({"rules": [{"rank": 1}]}, r"rules\[0\] needs a 'family'"),
        ({"rule": []}, r"an object with a 'rules' list"),
        ({"rules": [{"family": "dsc", "macs": 1.5}]}, r"macs must be a fraction in \(0, 1\]"),
        ({"rules": [{"family": "dsc", "path": "("}]}, r"path '\(' is not a regular expression"),
    ],
)
def test_bad_policies_are_named(policy, match):
    with pytest.raises(ValueError, match=match):
        Policy.from_dict(policy)


def test_policy_file_round_trip(tmp_path):
    policy = Policy((Rule(None, path="^stem$", layer_type="any"), Rule("tucker2", (8, 8))))
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(policy.to_dict()))
    assert Policy.from_file(path) == policy
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json' is not valid JSON"):
        Policy.from_file(tmp_path / "bad.json")
