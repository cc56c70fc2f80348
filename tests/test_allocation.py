"""Per-layer budget allocation: allocators on hand-made curves against brute force and worked
examples, the sensitivity cache, Policy.budget on a tiny model (count_macs), CLI errors."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import factorize as fz
from factorize.conversion import Policy, Rule, convert
from factorize.conversion.allocation import (
    CurveCache,
    Point,
    _fit_context,
    allocate,
    convertible_layers,
    data_aware_projection,
    eval_scorer,
    greedy,
    kernel_error_scorer,
    knapsack,
    uniform,
)
from factorize.conversion.convert import check_budget
from factorize.models import CNN

GRID = (0.2, 0.4)
FAMS = ["lowrank_out", "spatial"]  # SVD families: cheap, deterministic projections


def _curves(rng, layers=3, points=4, scale=100):
    """Random curves: a keep point (cost = the layer's full MACs, no loss) and cheaper points
    whose loss grows as the cost falls."""
    out = {}
    for i in range(layers):
        full = int(rng.integers(5, 10)) * scale
        costs = sorted(rng.choice(np.arange(1, full // scale) * scale // 1, points - 1,
                                  replace=False), reverse=True)
        losses = np.cumsum(rng.uniform(0.01, 1.0, points - 1))
        out[f"l{i}"] = [Point(None, None, full)] + [
            Point("f", int(c), int(c), float(x)) for c, x in zip(costs, losses, strict=True)]
    return out


def _brute(curves, budget):
    paths = list(curves)
    best = None
    for combo in itertools.product(*(range(len(curves[p])) for p in paths)):
        cost = sum(curves[p][i].macs for p, i in zip(paths, combo, strict=True))
        loss = sum(curves[p][i].loss for p, i in zip(paths, combo, strict=True))
        if cost <= budget and (best is None or loss < best):
            best = loss
    return best


def _cost(curves, choice):
    return sum(curves[p][i].macs for p, i in choice.items())


def _loss(curves, choice):
    return sum(curves[p][i].loss for p, i in choice.items())


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_equals_brute_force_and_meets_the_budget(seed):
    rng = np.random.default_rng(seed)
    curves = _curves(rng, layers=3, points=5, scale=1)  # integer MACs <= grid: exact DP
    total = sum(p[0].macs for p in curves.values())
    smallest = sum(min(x.macs for x in p) for p in curves.values())
    for budget in range(smallest, total + 1):
        choice = knapsack(curves, budget)
        assert _cost(curves, choice) <= budget
        assert _loss(curves, choice) == pytest.approx(_brute(curves, budget))
        g, _ = greedy(curves, budget)
        assert _cost(curves, g) <= budget
        assert _loss(curves, g) >= _loss(curves, choice) - 1e-12  # DP is the optimum


def test_quantised_knapsack_is_feasible_and_near_optimal():
    rng = np.random.default_rng(7)
    curves = _curves(rng, layers=4, points=5, scale=10_007)  # MACs far above the DP grid
    total = sum(p[0].macs for p in curves.values())
    for frac in (0.3, 0.5, 0.8):
        budget = int(frac * total)
        choice = knapsack(curves, budget, grid=50)
        unit = -(-budget // 50)
        assert _cost(curves, choice) <= budget
        # rounding each cost up loses at most one unit per layer
        assert _loss(curves, choice) <= _brute(curves, budget - len(curves) * unit) + 1e-12


def test_greedy_follows_aimets_rule_on_a_worked_example():
    a = [Point(None, None, 100), Point("f", 1, 50, 0.1), Point("f", 2, 25, 0.3)]
    b = [Point(None, None, 100), Point("f", 1, 50, 0.05), Point("f", 2, 25, 0.5)]
    curves = {"a": a, "b": b}
    # t = 0.05: a kept, b at 50 → 150 > 100; t = 0.1: 50 + 50 = 100 ≤ 100
    choice, t = greedy(curves, 100)
    assert (choice, t) == ({"a": 1, "b": 1}, 0.1)
    # 75: t = 0.3 lets a drop to 25 (25 + 50); b's 25 needs t = 0.5
    assert greedy(curves, 75) == ({"a": 2, "b": 1}, 0.3)
    assert greedy(curves, 200) == ({"a": 0, "b": 0}, 0.0)  # no budget pressure: keep all
    # the knapsack finds the same at 100, and 0.35 < 0.55 at 75 (a at 25, b at 50)
    assert knapsack(curves, 75) == {"a": 2, "b": 1}


def test_uniform_is_todays_rule_and_infeasible_budgets_name_macs():
    a = [Point(None, None, 100), Point("x", 1, 20, 0.9), Point("x", 2, 40, 0.5),
         Point("y", 1, 45, 0.2), Point("y", 2, 60, 0.1)]
    b = [Point(None, None, 200), Point("x", 1, 60, 0.5), Point("x", 2, 100, 0.1)]
    curves = {"a": a, "b": b}
    # fraction 0.5: a's largest x is 40, largest y 45 (lower loss: y); b's largest x is 100
    assert uniform(curves, 150) == {"a": 3, "b": 2}
    with pytest.raises(ValueError, match=r"macs: layer 'b' cannot get within 0\.2500"):
        uniform(curves, 75)
    for alloc in (greedy, knapsack):
        with pytest.raises(ValueError, match=r"macs: the target 79 MACs .* below the smallest "
                                             r"reachable 80"):
            alloc(curves, 79)


@pytest.fixture(scope="module")
def tiny():
    model = CNN(10, 1, widths=(8, 16, 16), rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (64, 8, 8, 1))
    y = jax.random.randint(jax.random.key(2), (64,), 0, 10)
    return model, x, y


def test_kernel_error_curve_is_the_relative_error(tiny):
    model, x, _ = tiny
    a = allocate(model, x[:1], FAMS, 0.3, "knapsack", skip="^conv1$", grid=GRID)
    slots = {s.path: s for s in convertible_layers(model, x[:1], skip="^conv1$")}
    assert list(a.curves) == ["conv2", "conv3"]
    for path, pts in a.curves.items():
        for p in pts[1:]:
            f = fz.decompose(slots[path].kernel, p.family, p.rank)
            assert p.loss == pytest.approx(float(fz.relative_error(slots[path].kernel, f)),
                                           rel=1e-5)
            assert p.macs == f.macs(slots[path].input_hw, slots[path].strides)


def test_policy_budget_meets_the_target_by_count_macs(tiny):
    model, x, _ = tiny
    convs = ("conv2", "conv3")
    for alloc in ("uniform", "greedy", "knapsack"):
        policy, a = Policy.budget(FAMS, 0.3, alloc, model=model, sample_input=x[:1],
                                  skip="^conv1$", grid=GRID, return_allocation=True)
        small, report = convert(model, policy, x[:1])
        full = sum(r.macs_before for r in report.rows if r.path in convs)
        assert policy.convertible_macs == full and policy.target_macs == int(0.3 * full)
        rest = fz.count_macs(model, x[:1]) - full
        assert fz.count_macs(small, x[:1]) <= rest + 0.3 * full
        assert fz.count_macs(small, x[:1]) - rest == a.macs  # the allocator's own count
        assert {r.path for r in report.converted} <= set(convs)
    # a policy whose target the built model misses is refused
    tight = Policy(policy.rules, target_macs=policy.target_macs // 10,
                   convertible_macs=policy.convertible_macs)
    with pytest.raises(ValueError, match="above the budget"):
        check_budget(report, tight)
    with pytest.raises(ValueError, match=r"macs: the target .* below the smallest reachable"):
        Policy.budget(FAMS, 0.01, model=model, sample_input=x[:1], skip="^conv1$", grid=GRID)
    with pytest.raises(ValueError, match="allocation must be one of"):
        Policy.budget(FAMS, 0.3, "random", model=model, sample_input=x[:1])


def test_eval_scorer_equals_the_converted_model(tiny):
    """The kernel swap scores what the converted network (a real FactorizedConv) computes."""
    from factorize.training import evaluate

    model, x, y = tiny
    score = eval_scorer(model, x, y)
    w = model.conv2.kernel[...]
    f = fz.decompose(w, "lowrank_out", 3)
    small, _ = convert(model, Policy((fz.conversion.Rule("lowrank_out", 3, path="^conv2$"),)),
                       x[:1])
    assert score("conv2", f.to_kernel()) == pytest.approx(evaluate(small, x, y)["loss"],
                                                          rel=1e-5)
    assert score("conv2", w) == pytest.approx(evaluate(model, x, y)["loss"], rel=1e-6)
    assert model.conv2.kernel[...] is w or np.array_equal(model.conv2.kernel[...], w)


class Counting(kernel_error_scorer):
    def __init__(self, kernels):
        super().__init__(kernels)
        self.calls = 0

    def __call__(self, path, kernel_hat):
        self.calls += 1
        return super().__call__(path, kernel_hat)


def test_cache_second_run_reads_and_corrupt_file_is_an_error(tiny, tmp_path):
    model, x, _ = tiny
    kernels = {s.path: s.kernel for s in convertible_layers(model, x[:1], skip="^conv1$")}
    cache = tmp_path / "curves.json"
    first = Counting(kernels)
    a1 = allocate(model, x[:1], FAMS, 0.3, "greedy", scorer=first, skip="^conv1$", grid=GRID,
                  cache=cache)
    n_points = sum(len(p) for p in a1.curves.values())
    assert first.calls == n_points  # every point once, the kept layer included
    second = Counting(kernels)
    a2 = allocate(model, x[:1], FAMS, 0.3, "knapsack", scorer=second, skip="^conv1$",
                  grid=GRID, cache=cache)
    assert second.calls == 0 and a2.curves == a1.curves
    # another model (other weights) is another key: scored again
    other = CNN(10, 1, widths=(8, 16, 16), rngs=nnx.Rngs(5))
    third = Counting({s.path: s.kernel for s in convertible_layers(other, x[:1],
                                                                  skip="^conv1$")})
    allocate(other, x[:1], FAMS, 0.3, "knapsack", scorer=third, skip="^conv1$", grid=GRID,
             cache=cache)
    assert third.calls == n_points
    assert len(json.loads(cache.read_text())["entries"]) == 2 * n_points
    cache.write_text('{"version": 1, "entries": {"k": "not a number"')
    with pytest.raises(ValueError, match=r"sensitivity cache .*curves\.json.* is not a valid"):
        CurveCache(cache)
    cache.write_text('{"version": 99, "entries": {}}')
    with pytest.raises(ValueError, match="expected version 1"):
        allocate(model, x[:1], FAMS, 0.3, cache=cache, skip="^conv1$", grid=GRID)


def test_two_runs_sharing_a_cache_file_keep_each_others_scores(tmp_path):
    path = tmp_path / "curves.json"
    a, b = CurveCache(path), CurveCache(path)
    a.entries["x"] = 1.0
    a.save()
    b.entries["y"] = 2.0
    b.save()  # b never read "x", but the file keeps it
    assert CurveCache(path).entries == {"x": 1.0, "y": 2.0} == b.entries


def test_rounds_rescore_with_the_other_layers_converted(tiny):
    model, x, y = tiny
    score = eval_scorer(model, x, y)
    a1 = allocate(model, x[:1], FAMS, 0.3, "knapsack", scorer=score, skip="^conv1$",
                  grid=GRID)
    a2 = allocate(model, x[:1], FAMS, 0.3, "knapsack", scorer=score, skip="^conv1$",
                  grid=GRID, rounds=2)
    assert a2.rounds == 2 and a2.macs <= a2.target
    # round 2 scores conv3's points with conv2 as round 1 chose (a different loss level)
    c2 = a1.curves["conv2"][a1.choice["conv2"]]
    if c2.family is not None:
        assert a2.curves["conv3"] != a1.curves["conv3"]


def test_asymmetric_projection_fits_the_context_as_convert_does(tiny):
    # the reference: convert(reconstruction="asymmetric") collects its statistics layer by
    # layer on the model it is building; the projection swaps composed kernels into a copy
    model, _, y = tiny
    x = jax.random.normal(jax.random.key(1), (64, 8, 8, 1))  # no dead channel: S is full rank
    batches = [x[:32], x[32:]]
    slots = convertible_layers(model, x[:1], skip="^conv1$")
    paths = [s.path for s in slots]
    chosen = {"conv2": Point("lowrank_out", 3, 0), "conv3": Point("lowrank_out", 4, 0)}
    policy = Policy(tuple(Rule(c.family, c.rank, path=f"^{p}$") for p, c in chosen.items()))
    built, _ = convert(model, policy, x[:1], calibration=batches, reconstruction="asymmetric")
    asym = data_aware_projection(model, batches, paths, reconstruction="asymmetric")
    context = _fit_context(slots, chosen, asym)
    for p in chosen:
        np.testing.assert_allclose(context[p], getattr(built, p).to_factorized().to_kernel(),
                                   rtol=1e-4, atol=1e-4)
    sym = data_aware_projection(model, batches, paths)
    assert sym.with_context(context) is sym
    assert sym.name == asym.name  # one-layer fits agree, so round one shares its cache
    w3 = slots[1].kernel
    assert not np.allclose(sym("conv3", w3, "lowrank_out", 4), context["conv3"], atol=1e-4)
    assert ":asymmetric:" in asym.with_context(context).name
    with pytest.raises(ValueError, match="reconstruction must be 'symmetric' or 'asymmetric', "
                                         "got 'both'"):
        data_aware_projection(model, batches, paths, reconstruction="both")
    # rounds=2 scores conv3's round-two points fitted on the network round one chose
    score = eval_scorer(model, x, y)
    kw = dict(scorer=score, projection=asym, skip="^conv1$", grid=GRID)
    a1 = allocate(model, x[:1], ["lowrank_out"], 0.3, "knapsack", **kw)
    a2 = allocate(model, x[:1], ["lowrank_out"], 0.3, "knapsack", rounds=2, **kw)
    assert a2.rounds == 2 and a2.macs <= a2.target
    first = _fit_context(slots, {p: a1.curves[p][a1.choice[p]] for p in paths}, asym)
    fitted, others = asym.with_context(first), score.with_context({"conv2": first["conv2"]})
    for p in a2.curves["conv3"][1:]:
        expected = others("conv3", fitted("conv3", w3, p.family, p.rank)) - others("conv3", w3)
        assert p.loss == pytest.approx(expected, abs=1e-6)


def test_keep_best_scores_whole_networks_as_convert_builds_them(tiny):
    # the reference: convert() the kept and the uniform policy, evaluate on the scorer's data;
    # the three projections share one cache (their one-layer fits share names)
    from factorize.training import evaluate

    model, _, y = tiny
    x = jax.random.normal(jax.random.key(1), (64, 8, 8, 1))
    batches = [x[:32], x[32:]]
    paths = [s.path for s in convertible_layers(model, x[:1], skip="^conv1$")]
    cache = CurveCache()
    for reconstruction in (None, "symmetric", "asymmetric"):
        proj = None if reconstruction is None else data_aware_projection(
            model, batches, paths, reconstruction=reconstruction)
        kw = dict(scorer=eval_scorer(model, x, y), projection=proj, skip="^conv1$", grid=GRID,
                  cache=cache)
        a = allocate(model, x[:1], ["lowrank_out"], 0.3, "knapsack", rounds=2, keep_best=True,
                     **kw)
        assert set(a.whole) == {"round 1", "round 2", "uniform"} and a.macs <= a.target
        assert a.whole[a.selected] == min(a.whole.values())
        assert f"Kept the best on the whole network: {a.selected}" in a.to_markdown()
        u = allocate(model, x[:1], ["lowrank_out"], 0.3, "uniform", **kw)
        for name, policy in ((a.selected, a.policy), ("uniform", u.policy)):
            built, _ = convert(model, policy, x[:1],
                               calibration=None if proj is None else batches,
                               reconstruction=reconstruction or "asymmetric")
            assert a.whole[name] == pytest.approx(evaluate(built, x, y)["loss"], abs=1e-4)
    with pytest.raises(ValueError, match="keep_best needs a scorer that sees the other layers"):
        allocate(model, x[:1], ["lowrank_out"], 0.3, "knapsack", keep_best=True,
                 skip="^conv1$", grid=GRID)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from factorize.models import ModelSpec
    from factorize.training import checkpoint

    root = tmp_path_factory.mktemp("alloc")
    spec = ModelSpec("cnn", 10, 1, {"widths": [8, 16, 16]})
    model = CNN(10, 1, widths=(8, 16, 16), rngs=nnx.Rngs(0))
    checkpoint.save(root / "ckpt", model, spec,
                    metadata={"dataset": "digits", "image_shape": [8, 8, 1]})
    return root / "ckpt"


@pytest.mark.parametrize("args, message", [
    (["--budget", "0.01", "--families", "lowrank_out"],
     "--budget 0.01: the target"),
    (["--budget", "1.5", "--families", "dsc"], "--budget must be a fraction in (0, 1], got 1.5"),
    (["--budget", "0.3", "--families", "dsc,nope"], "--families: unknown ['nope']"),
    (["--budget", "0.3"], "--budget needs --families (or --family)"),
    (["--allocation", "greedy", "--family", "dsc"], "--allocation needs --budget"),
    (["--budget", "0.3", "--family", "dsc", "--macs", "0.3"], "--budget replaces --macs"),
    (["--budget", "0.3", "--families", "dsc", "--holdout", "-1"], "--holdout must be >= 0"),
    (["--budget", "0.3", "--families", "dsc", "--keep-best"], "--keep-best needs --holdout N"),
    (["--keep-best", "--family", "dsc"], "--keep-best needs --budget"),
    (["--budget", "0.3", "--families", "dsc", "--holdout", "100000"],
     "--holdout 100000 exceeds the 1437 training images of digits"),
])
def test_cli_budget_errors_are_one_line_and_write_nothing(ckpt, tmp_path, capsys, args,
                                                          message):
    from factorize.cli import main

    out = tmp_path / "out"
    assert main(["convert", str(ckpt), *args, "--skip", "^conv1$", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("factorize convert: error: ") and message in last, last
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_budget_writes_the_allocation(ckpt, tmp_path, capsys):
    from factorize.cli import main

    out = tmp_path / "out"
    assert main(["convert", str(ckpt), "--budget", "0.3", "--families", "lowrank_out",
                 "--allocation", "greedy", "--skip", "^conv1$", "--workers", "1",
                 "--sensitivity-cache", str(tmp_path / "c.json"), "--out", str(out)]) == 0
    alloc = json.loads((out / "allocation.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert alloc["method"] == "greedy" and alloc["macs"] <= alloc["target_macs"]
    after = {r["path"]: r["macs_after"] for r in report["layers"]}
    assert sum(after[p] for p in ("conv2", "conv3")) == alloc["macs"]
    assert "Allocation `greedy`" in capsys.readouterr().out
    assert jnp.isfinite(report["totals"]["model_macs_after"])


def test_cli_budget_with_calibration_fits_data_aware(ckpt, tmp_path, capsys):
    """--budget with --calibrate: the candidates and the installed layers are fitted to the
    layers' outputs (rows carry an output error), and the budget still holds."""
    from factorize.cli import main

    out = tmp_path / "aware"
    assert main(["convert", str(ckpt), "--budget", "0.3", "--families", "lowrank_out",
                 "--skip", "^conv1$", "--calibrate", "32", "--workers", "1",
                 "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    alloc = json.loads((out / "allocation.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert alloc["macs"] <= alloc["target_macs"]
    converted = [r for r in report["layers"] if r["family"] not in (None, "full")]
    assert converted and all(r["output_error"] is not None for r in converted)
    assert res["calibration"]


def test_cli_keep_best_records_the_whole_network_scores(ckpt, tmp_path):
    from factorize.cli import main

    out = tmp_path / "best"
    assert main(["convert", str(ckpt), "--budget", "0.3", "--families", "lowrank_out",
                 "--skip", "^conv1$", "--calibrate", "32", "--holdout", "64", "--rounds", "2",
                 "--keep-best", "--workers", "1", "--out", str(out)]) == 0
    alloc = json.loads((out / "allocation.json").read_text())
    assert set(alloc["whole"]) == {"round 1", "round 2", "uniform"}
    assert alloc["whole"][alloc["selected"]] == min(alloc["whole"].values())
    assert alloc["macs"] <= alloc["target_macs"]
