"""Accuracy against MACs: convert a trained network into every family, or train it from scratch.

For each seed: train the full baseline; then for each family and MAC fraction, (a) convert the
baseline (every conv but the first within that fraction of its MACs, ``factorize.convert``),
evaluate, fine-tune, evaluate; (b) train the same factorized architecture from scratch for the
same total epochs (baseline + fine-tuning), the MobileNet way. Results are append-only JSON lines;
CSV, markdown table and plot are rebuilt from them. A rerun with the same ``--out`` resumes:
finished runs are skipped, nothing written is lost.

The run goes to ``runs/<dataset>/`` (git-ignored); at the end its table is printed beside the
committed reference ``results/<dataset>/`` with a verdict (see ``compare``): identical MACs and
parameters in every run, and every accuracy within the reference's seed-to-seed range for that
cell or 3 test images, whichever is larger. ``--refresh-reference`` copies a finished run's
results over the reference.

Commands and expected runtimes (2 CPU cores):

    python experiments/accuracy_vs_flops.py                     # digits, CNN: ≈ 2–4 min
    python experiments/accuracy_vs_flops.py --dataset fashion_mnist   # Fashion-MNIST: hours
    python experiments/accuracy_vs_flops.py --refresh-reference # rerun, then replace results/digits
    python experiments/accuracy_vs_flops.py --quick --out /tmp/q   # tests: < 1 min
    python experiments/accuracy_vs_flops.py --rebuild --out DIR    # tables and plot only

Outputs in ``--out`` (default ``runs/<dataset>``, ``runs/<dataset>-quick`` with ``--quick``):
``results.jsonl``, ``results.csv``, ``results.md``, ``accuracy_vs_macs.png``, ``sweep.json`` and
``runs/`` (baseline checkpoints, metrics).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # bench_latency's timing helpers

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("results.jsonl", "results.csv", "results.md", "accuracy_vs_macs.png", "sweep.json")
# The sweep settings that change results: a resumed or compared directory must match on these.
SETTINGS = ("dataset", "model", "model_kwargs", "epochs", "finetune_epochs", "n_train", "n_test",
            "augment")

FAMILIES = ("dsc", "bsconv", "spatial", "lowrank_in", "lowrank_out", "tucker2", "cp3", "cp4")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The experiment as code: one per dataset (``SWEEPS``), overridable from the command line."""

    dataset: str
    model: str
    epochs: int  # baseline training
    finetune_epochs: int  # after conversion; scratch runs train epochs + finetune_epochs
    fractions: tuple[float, ...]  # MAC fractions of each converted conv
    seeds: tuple[int, ...] = (0, 1)
    families: tuple[str, ...] = FAMILIES
    skip: str = "^conv1$|^stem$"  # keep the first conv full (MobileNet does too)
    finetune_lr: float = 1e-3
    n_train: int | None = None
    n_test: int | None = None
    augment: bool | None = None  # random crop + flip (None: the dataset's default)
    latency_batch: int = 32
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


SWEEPS = {
    "digits": Sweep("digits", "cnn", epochs=15, finetune_epochs=2, fractions=(0.25,)),
    # The four-conv CNN (training defaults for fashion_mnist): 92.1% after 8 epochs, seed 0.
    # The three-conv CNN stopped at 90.6% after 15 epochs (89.1% with crops and flips).
    "fashion_mnist": Sweep(
        "fashion_mnist", "cnn", epochs=8, finetune_epochs=2, fractions=(0.25,),
        model_kwargs={"widths": [32, 64, 128, 128], "strides": [1, 2, 2, 1]},
    ),
    "cifar10": Sweep("cifar10", "resnet18", epochs=30, finetune_epochs=5, fractions=(0.25,)),
}
QUICK = dict(epochs=2, finetune_epochs=1, fractions=(0.25,), seeds=(0,), families=("dsc", "cp3"),
             n_train=256, n_test=128)


# --- one run of each kind ----------------------------------------------------------------------


def _train_config(sweep: Sweep, seed: int, **overrides):
    from factorize.training import get_config

    kw = dict(epochs=sweep.epochs, seed=seed, n_train=sweep.n_train, n_test=sweep.n_test,
              augment=sweep.augment, model_kwargs=sweep.model_kwargs, progress=False)
    kw.update(overrides)
    return get_config(sweep.dataset, sweep.model, **kw)


def _dataset(sweep: Sweep, cache: dict):
    if "ds" not in cache:
        from factorize import data

        ds = data.load(sweep.dataset)
        if sweep.n_train or sweep.n_test:
            ds = ds.subset(sweep.n_train, sweep.n_test)
        cache["ds"] = ds
    return cache["ds"]


def _latency_ms(model, x) -> float:
    """Median inference time of one batch in ms (bench_latency's interleaved timing)."""
    from bench_latency import compiled, median_times
    from flax import nnx

    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    infer = compiled(lambda p, r, x: nnx.merge(graphdef, p, r)(x), params, rest, x)
    return 1e3 * median_times({"model": infer}, repeats=5)["model"]


def _model_costs(model, x) -> dict[str, int]:
    import factorize as fz
    from factorize.models import count_params

    return {"macs": fz.count_macs(model, x[:1]), "params": count_params(model)}


def baseline_run(sweep: Sweep, seed: int, out: Path, cache: dict) -> dict[str, Any]:
    from factorize.training import evaluate, restore, train_and_evaluate

    workdir = out / "runs" / f"baseline-seed{seed}"
    t0 = time.perf_counter()
    if not (workdir / "checkpoint").exists():
        shutil.rmtree(workdir, ignore_errors=True)  # our own half-finished run: redo it
        train_and_evaluate(_train_config(sweep, seed), workdir)
    model, meta = restore(workdir / "checkpoint", return_meta=True)
    ds = _dataset(sweep, cache)
    x = ds.x_test[: sweep.latency_batch]
    accuracy = meta["metadata"].get("test_accuracy")
    if accuracy is None:
        accuracy = evaluate(model, ds.x_test, ds.y_test)["accuracy"]
    return dict(
        accuracy=accuracy, **_model_costs(model, x), latency_ms=_latency_ms(model, x),
        wall_time_s=time.perf_counter() - t0,
    )


def convert_run(sweep: Sweep, family: str, fraction: float, seed: int, out: Path,
                cache: dict) -> dict[str, Any]:
    from factorize.conversion import Policy, convert
    from factorize.conversion.finetune import finetune
    from factorize.models import record_layers
    from factorize.training import restore

    t0 = time.perf_counter()
    ds = _dataset(sweep, cache)
    baseline = restore(out / "runs" / f"baseline-seed{seed}" / "checkpoint")
    policy = Policy.uniform(family, macs=fraction, skip=sweep.skip, on_infeasible="keep",
                            options={"n_iter": 50} if family.startswith("cp") else None)
    model, report = convert(baseline, policy, ds.x_test[:8])
    config = _train_config(sweep, seed, epochs=sweep.finetune_epochs,
                           learning_rate=sweep.finetune_lr, warmup_epochs=0.0)
    result = finetune(model, ds, config)
    x = ds.x_test[: sweep.latency_batch]
    return dict(
        accuracy=result["accuracy_after"], accuracy_before_finetune=result["accuracy_before"],
        **_model_costs(model, x), conv_mac_ratio=report.conv_mac_ratio,
        latency_ms=_latency_ms(model, x) if seed == sweep.seeds[0] else None,
        layers=_jsonable(record_layers(model)),
        mean_rel_error=statistics.fmean([r.rel_error for r in report.converted] or [0.0]),
        infeasible_layers=[r.path for r in report.rows if r.note.startswith("kept:")],
        wall_time_s=time.perf_counter() - t0,
    )


def scratch_run(sweep: Sweep, layers: dict, seed: int, cache: dict) -> dict[str, Any]:
    """The converted run's architecture (same per-layer family and rank), trained from a fresh
    initialisation for the same total epochs."""
    from flax import nnx

    from factorize.conversion import layer_builder
    from factorize.models import ModelSpec, build
    from factorize.training import fit

    t0 = time.perf_counter()
    ds = _dataset(sweep, cache)
    spec = ModelSpec(sweep.model, ds.num_classes, ds.in_channels, dict(sweep.model_kwargs),
                     layers=layers)
    model = build(spec, rngs=nnx.Rngs(seed), layer_builder=layer_builder)
    config = _train_config(sweep, seed, epochs=sweep.epochs + sweep.finetune_epochs)
    history = fit(model, ds, config)
    x = ds.x_test[: sweep.latency_batch]
    return dict(
        accuracy=history[-1]["test_accuracy"], **_model_costs(model, x),
        wall_time_s=time.perf_counter() - t0,
    )


def _jsonable(layers: dict) -> dict:
    return {p: {**v, "rank": list(v["rank"]) if isinstance(v["rank"], tuple) else v["rank"]}
            for p, v in layers.items()}


# --- the sweep ---------------------------------------------------------------------------------


def sweep_plan(sweep: Sweep) -> list[tuple]:
    """The runs of a sweep in order: ``(kind, family, fraction, seed)``; a scratch run follows the
    convert run whose per-layer ranks it reuses."""
    plan: list[tuple] = []
    for seed in sweep.seeds:
        plan.append(("baseline", None, None, seed))
        for fraction in sweep.fractions:
            for family in sweep.families:
                plan += [("convert", family, fraction, seed), ("scratch", family, fraction, seed)]
    return plan


def run_sweep(sweep: Sweep, out: Path) -> list[dict]:
    from tqdm.auto import tqdm

    from factorize._io import append_jsonl, atomic_write_json, read_jsonl

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", dataclasses.asdict(sweep))
    results = out / "results.jsonl"
    done = {r["run_id"]: r for r in read_jsonl(results)}
    plan = sweep_plan(sweep)
    have = sum(_run_id(*p) in done for p in plan)
    if have:
        print(f"resuming {out}: {have} of {len(plan)} runs are already in {results.name} and are "
              f"not rerun (remove {out} or pick another --out to start afresh)", flush=True)
    else:
        print(f"{out}: {len(plan)} runs to train and evaluate", flush=True)
    cache: dict = {}
    common = dict(dataset=sweep.dataset, model=sweep.model)
    bar = tqdm(plan, desc="accuracy_vs_flops", unit="run")
    for kind, family, fraction, seed in bar:
        run_id = _run_id(kind, family, fraction, seed)
        if run_id in done:
            continue
        bar.set_postfix_str(run_id)
        if kind == "baseline":
            row = baseline_run(sweep, seed, out, cache)
        elif kind == "convert":
            row = convert_run(sweep, family, fraction, seed, out, cache)
        else:
            layers = done[run_id.replace("scratch/", "convert/", 1)]["layers"]
            row = scratch_run(sweep, layers, seed, cache)
        base = done.get(f"baseline/full/1.0/seed{seed}")
        row = dict(run_id=run_id, kind=kind, family=family or "full", mac_fraction=fraction or 1.0,
                   seed=seed, **common, **row)
        row["mac_ratio"] = row["macs"] / base["macs"] if base else 1.0
        append_jsonl(results, row)
        done[run_id] = row
        tqdm.write(f"{run_id}: accuracy {row['accuracy']:.4f}, MACs {row['macs']:,}")
    return list(done.values())


def _run_id(kind: str, family: str | None, fraction: float | None, seed: int) -> str:
    return f"{kind}/{family or 'full'}/{fraction or 1.0}/seed{seed}"


# --- tables and plot, rebuilt from the JSON lines ----------------------------------------------


CSV_FIELDS = ("run_id", "kind", "dataset", "model", "family", "mac_fraction", "seed", "accuracy",
              "accuracy_before_finetune", "macs", "params", "mac_ratio", "conv_mac_ratio",
              "mean_rel_error", "latency_ms", "wall_time_s")


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return buf.getvalue()


def _half_range(values: list[float]) -> float:
    return (max(values) - min(values)) / 2


def _mean_spread(values: list[float]) -> str:
    """mean ± half the range (over seeds), in percent; a single seed has no spread to show."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (1 seed)"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * _half_range(values):.2f}"


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (family, fraction): accuracies over seeds for each kind."""
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        g = groups[(r["family"], r["mac_fraction"])]
        g["macs"].append(r["macs"])
        g["mac_ratio"].append(r["mac_ratio"])
        if r["kind"] == "convert":
            g["infeasible"].extend(r.get("infeasible_layers", []))
            g["before"].append(r["accuracy_before_finetune"])
            g["after"].append(r["accuracy"])
        else:
            g[r["kind"]].append(r["accuracy"])
    out = []
    for (family, fraction), g in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        out.append(dict(family=family, mac_fraction=fraction, macs=statistics.fmean(g["macs"]),
                        infeasible=sorted(set(g["infeasible"])),
                        mac_ratio=statistics.fmean(g["mac_ratio"]), **{
                            k: list(g[k]) for k in ("baseline", "before", "after", "scratch")}))
    return out


def to_markdown(rows: list[dict]) -> str:
    summary = summarize(rows)
    seeds = sorted({r["seed"] for r in rows})
    meta = rows[0] if rows else {}
    lines = [
        f"Accuracy (%) on {meta.get('dataset')} with `{meta.get('model')}`, mean ± half-range "
        f"over seeds {seeds}. MACs per image by `count_macs`; ratio vs the full baseline.",
        "",
        "| family | target MAC fraction | MACs | MAC ratio | converted | + fine-tuned "
        "| from scratch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        if s["family"] == "full":
            lines.append(f"| full (baseline) | 1 | {s['macs']:,.0f} | 1.000 | – "
                         f"| {_mean_spread(s['baseline'])} | – |")
            continue
        mark = " †" if s["infeasible"] else ""
        lines.append(
            f"| {s['family']}{mark} | {s['mac_fraction']:g} | {s['macs']:,.0f} "
            f"| {s['mac_ratio']:.3f} "
            f"| {_mean_spread(s['before'])} | {_mean_spread(s['after'])} "
            f"| {_mean_spread(s['scratch'])} |"
        )
    kept = [f"{s['family']} at {s['mac_fraction']:g}: {', '.join(s['infeasible'])}"
            for s in summary if s["infeasible"]]
    if kept:
        lines += ["", "† layers kept full because the family cannot get within the fraction "
                  "(e.g. a 1×1 stage that runs before a stride): " + "; ".join(kept) + "."]
    lines += ["", verdict(summary)]
    return "\n".join(lines) + "\n"


def verdict(summary: list[dict]) -> str:
    """Which family wins at each fraction, computed from the table."""
    out = []
    base = [s for s in summary if s["family"] == "full"]
    base_acc = statistics.fmean(base[0]["baseline"]) if base and base[0]["baseline"] else None
    for fraction in sorted({s["mac_fraction"] for s in summary if s["family"] != "full"},
                           reverse=True):
        # families that had to keep layers full did not meet the budget: not in the running
        cands = [s for s in summary if s["mac_fraction"] == fraction
                 and s["family"] != "full" and not s["infeasible"]]
        for label, key in (("converted + fine-tuned", "after"), ("from scratch", "scratch")):
            scored = sorted(((statistics.fmean(s[key]), s["family"], s[key]) for s in cands
                             if s[key]), reverse=True)
            if len(scored) < 2:
                continue
            (a1, f1, v1), (a2, f2, v2) = scored[0], scored[1]
            gap = f" (baseline {100 * base_acc:.2f})" if base_acc is not None else ""
            if min(len(v1), len(v2)) < 2:
                note = "one seed only, so no spread to compare the lead with"
            else:
                spread = 100 * max(_half_range(v1), _half_range(v2))
                note = (f"{'more' if 100 * (a1 - a2) > spread else 'no more'} than the "
                        f"seed-to-seed spread (± {spread:.2f})")
            if round(100 * (a1 - a2), 2) == 0:
                out.append(f"- At ≤ {fraction:g} of the MACs, {label}: **{f1}** and **{f2}** tie "
                           f"at {100 * a1:.2f}%{gap}.")
                continue
            out.append(f"- At ≤ {fraction:g} of the MACs, {label}: **{f1}** wins with "
                       f"{100 * a1:.2f}%, {100 * (a1 - a2):.2f} points ahead of {f2}{gap}; "
                       f"{note}.")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    base = [s for s in summary if s["family"] == "full" and s["baseline"]]
    if base:
        acc = 100 * statistics.fmean(base[0]["baseline"])
        ax.axhline(acc, color="black", lw=1, ls="--", label=f"full baseline ({acc:.2f}%)")
    families = [f for f in FAMILIES if any(s["family"] == f for s in summary)]
    colors = plt.get_cmap("tab10")
    for i, family in enumerate(families):
        pts = sorted((s for s in summary if s["family"] == family), key=lambda s: s["macs"])
        macs = [s["macs"] for s in pts]
        for key, marker, ls, alpha in (("after", "o", "-", 1.0), ("before", "x", ":", 0.6),
                                       ("scratch", "s", "--", 0.8)):
            acc = [100 * statistics.fmean(s[key]) if s[key] else math.nan for s in pts]
            ax.plot(macs, acc, marker=marker, ls=ls, color=colors(i), alpha=alpha,
                    label=family if key == "after" else None)
    ax.set_xscale("log")
    ax.set_xlabel("MACs per image (count_macs)")
    ax.set_ylabel("test accuracy (%)")
    meta = rows[0]
    ax.set_title(f"{meta['dataset']} / {meta['model']}: accuracy against MACs")
    from matplotlib.lines import Line2D

    kinds = [Line2D([], [], color="gray", marker="o", ls="-", label="converted + fine-tuned"),
             Line2D([], [], color="gray", marker="x", ls=":", label="converted, no fine-tuning"),
             Line2D([], [], color="gray", marker="s", ls="--", label="trained from scratch")]
    first = ax.legend(loc="lower right", fontsize=8, ncol=2)
    ax.add_artist(first)
    ax.legend(handles=kinds, loc="lower left", fontsize=8)
    ymin = min(100 * min(r["accuracy"], r.get("accuracy_before_finetune") or 1.0) for r in rows)
    ax.set_ylim(max(0, ymin - 5), 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def rebuild(out: Path) -> list[dict]:
    from factorize._io import atomic_write_text, read_jsonl

    rows = read_jsonl(out / "results.jsonl")
    if not rows:
        raise FileNotFoundError(f"{out / 'results.jsonl'} has no results to render")
    atomic_write_text(out / "results.csv", to_csv(rows))
    atomic_write_text(out / "results.md", to_markdown(rows))
    plot(rows, out / "accuracy_vs_macs.png")
    return rows


# --- the run beside the committed reference ----------------------------------------------------


TOLERANCE_IMAGES = 3
# (kind, key in a run's row, column of the table)
_METRICS = (("baseline", "accuracy", "baseline"),
            ("convert", "accuracy_before_finetune", "converted"),
            ("convert", "accuracy", "+ fine-tuned"), ("scratch", "accuracy", "from scratch"))


def _cells(rows: list[dict]) -> dict[tuple, dict[int, float]]:
    """(family, fraction, column) -> {seed: accuracy}: the table's cells before averaging."""
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        for kind, key, column in _METRICS:
            if r["kind"] == kind and r.get(key) is not None:
                out[(r["family"], r["mac_fraction"], column)][r["seed"]] = r[key]
    return out


def compare(rows: list[dict], reference: list[dict], n_test: int,
            images: int = TOLERANCE_IMAGES) -> tuple[str, bool]:
    """This run's table beside the reference's, and whether the two agree.

    They agree when both hold the same runs, each run has exactly the reference's MACs and
    parameter count, and each cell of the table (mean accuracy over seeds: baseline, converted,
    fine-tuned, from scratch) is within tolerance of the reference's. A cell's tolerance is the
    larger of its seed-to-seed range in the reference (max − min over seeds: two seeds differ
    by that much, so a rerun whose arithmetic differs in the last bits may too) and ``images``
    test images out of ``n_test``.

    Returns:
      The markdown text (side-by-side table, then the verdict and any disagreement), and the
      verdict as a bool.

    Example::

        text, agree = compare(read_jsonl("runs/digits/results.jsonl"),
                              read_jsonl("results/digits/results.jsonl"), n_test=360)
    """
    floor = images / n_test
    ref_by_id = {r["run_id"]: r for r in reference}
    run_by_id = {r["run_id"]: r for r in rows}
    problems = []
    missing = sorted(set(ref_by_id) - set(run_by_id))
    extra = sorted(set(run_by_id) - set(ref_by_id))
    if missing:
        problems.append(f"runs in the reference only: {', '.join(missing)}")
    if extra:
        problems.append(f"runs in this run only: {', '.join(extra)}")
    for run_id in sorted(set(ref_by_id) & set(run_by_id)):
        run, ref = run_by_id[run_id], ref_by_id[run_id]
        for key in ("macs", "params"):
            if run[key] != ref[key]:
                problems.append(f"{run_id}: {key} {run[key]:,} against {ref[key]:,}")

    here, there = _cells(rows), _cells(reference)
    singles = [(here.get(c, {}).get(seed), a) for c, v in there.items() for seed, a in v.items()]
    identical = sum(got == want for got, want in singles)

    def mean(cell: dict[int, float] | None) -> float | None:
        return statistics.fmean(cell.values()) if cell else None

    for cell in sorted(there, key=lambda c: (-c[1], c[0], c[2])):
        want, got = mean(there[cell]), mean(here.get(cell))
        tolerance = max(floor, max(there[cell].values()) - min(there[cell].values()))
        label = f"{cell[0]} at {cell[1]:g}, {cell[2]}"
        if got is None:
            problems.append(f"{label}: not in this run")
        elif abs(got - want) > tolerance + 1e-12:
            problems.append(f"{label}: {100 * got:.2f}% against {100 * want:.2f}% "
                            f"(tolerance ± {100 * tolerance:.2f} points)")

    def pair(family: str, fraction: float, column: str) -> str:
        key = (family, fraction, column)
        a, b = mean(here.get(key)), mean(there.get(key))
        return " / ".join("–" if v is None else f"{100 * v:.2f}" for v in (a, b))

    macs: dict[tuple, list] = defaultdict(lambda: [None, None])
    for i, rs in enumerate((rows, reference)):
        for r in rs:
            macs[(r["family"], r["mac_fraction"])][i] = r["macs"]
    lines = [
        "This run / the reference: accuracy (%), mean over seeds; MACs per image.",
        "",
        "| family | target MAC fraction | MACs | converted | + fine-tuned | from scratch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (family, fraction), (m_run, m_ref) in sorted(macs.items(),
                                                      key=lambda kv: (-kv[0][1], kv[0][0])):
        shown = [f"{m:,}" if m is not None else "–" for m in (m_run, m_ref)]
        mac_cell = shown[0] if m_run == m_ref else " / ".join(shown)
        if family == "full":
            lines.append(f"| full (baseline) | 1 | {mac_cell} | – "
                         f"| {pair(family, fraction, 'baseline')} | – |")
            continue
        lines.append(f"| {family} | {fraction:g} | {mac_cell} "
                     + "".join(f"| {pair(family, fraction, c)} "
                               for c in ("converted", "+ fine-tuned", "from scratch")) + "|")
    rule = (f"agree means: the same runs, identical MACs and parameters in each, and every mean "
            f"accuracy of the table within the larger of the reference's seed-to-seed range for "
            f"that cell and {images} of the {n_test} test images ({100 * floor:.2f} points)")
    lines.append("")
    if problems:
        lines.append(f"**DIFFERS from the reference** ({rule}):")
        lines += [f"- {p}" for p in problems]
    else:
        lines.append(f"**AGREES with the reference**: {len(run_by_id)} runs with identical MACs "
                     f"and parameters, every mean accuracy within tolerance ({rule}); "
                     f"{identical} of {len(singles)} accuracies of single runs are identical.")
    return "\n".join(lines) + "\n", not problems


def refresh_reference(out: Path, reference: Path) -> None:
    """Copies a finished run's outputs over the reference, each file atomically."""
    from factorize._io import atomic_write_text

    for name in OUTPUTS:
        src, dst = out / name, reference / name
        if name.endswith(".png"):
            tmp = dst.with_name(f".{name}.tmp")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
        else:
            atomic_write_text(dst, src.read_text())


def _enable_compilation_cache() -> None:
    """Seeds and reruns compile identical programs: let XLA reuse them (this script only)."""
    import os

    import jax

    cache = Path(os.environ.get("FACTORIZE_XLA_CACHE", Path.home() / ".cache/factorize/xla"))
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=sorted(SWEEPS))
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default runs/<dataset>, git-ignored; an "
                             "existing one is resumed)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="committed results to compare with (default results/<dataset>)")
    parser.add_argument("--refresh-reference", action="store_true",
                        help="after the run, copy its results over --reference")
    parser.add_argument("--families", help="comma-separated subset of " + ",".join(FAMILIES))
    parser.add_argument("--fractions", help="comma-separated MAC fractions, e.g. 0.5,0.25")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--epochs", type=int, help="baseline epochs")
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument("--n-train", type=int, help="use the first N training images")
    parser.add_argument("--quick", action="store_true", help="a tiny sweep (tests)")
    parser.add_argument("--rebuild", action="store_true",
                        help="only re-render CSV, table and plot from results.jsonl")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.dataset, args.quick)
    reference = args.reference or ROOT / "results" / args.dataset
    if args.rebuild:
        try:
            rows = rebuild(out)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        print((out / "results.md").read_text())
        return rows
    sweep = SWEEPS[args.dataset]
    if args.quick:
        sweep = dataclasses.replace(sweep, **QUICK)
    overrides: dict[str, Any] = {}
    if args.families:
        fams = tuple(f.strip() for f in args.families.split(","))
        unknown = [f for f in fams if f not in FAMILIES]
        if unknown:
            parser.error(f"--families: unknown {unknown}; valid: {','.join(FAMILIES)}")
        overrides["families"] = fams
    if args.fractions:
        overrides["fractions"] = tuple(float(f) for f in args.fractions.split(","))
        if not all(0 < f <= 1 for f in overrides["fractions"]):
            parser.error(f"--fractions must lie in (0, 1], got {args.fractions}")
    if args.seeds:
        overrides["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    for key in ("epochs", "finetune_epochs", "n_train"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    sweep = dataclasses.replace(sweep, **overrides)
    clash = _settings_clash(out, sweep)
    if clash:
        parser.error(f"{out} holds a sweep with {clash}: resume with the same settings or pick "
                     f"another --out")
    same_dir = out.resolve() == reference.resolve()
    if args.refresh_reference and same_dir:
        parser.error(f"--refresh-reference: --out and --reference are both {out}")
    out.mkdir(parents=True, exist_ok=True)
    _enable_compilation_cache()
    t0 = time.perf_counter()
    run_sweep(sweep, out)
    elapsed = time.perf_counter() - t0
    rows = rebuild(out)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.jsonl, results.csv, results.md, accuracy_vs_macs.png "
          f"({len(rows)} runs; {elapsed:.0f} s for this invocation's sweep)")
    if not same_dir:
        _print_comparison(sweep, rows, reference)
    if args.refresh_reference:
        refresh_reference(out, reference)
        print(f"copied {', '.join(OUTPUTS)} from {out} to {reference}")
    return rows


def default_out(dataset: str, quick: bool = False) -> Path:
    """``runs/<dataset>`` in the repository (git-ignored); quick sweeps get their own."""
    return ROOT / "runs" / (f"{dataset}-quick" if quick else dataset)


def _settings_clash(directory: Path, sweep: Sweep) -> str | None:
    """``"key=old, not new"`` for the first result-changing setting in which the sweep saved in
    ``directory`` differs from ``sweep``; ``None`` if they match or nothing is saved there."""
    import json

    saved = directory / "sweep.json"
    if not saved.exists():
        return None
    old = json.loads(saved.read_text())
    now = json.loads(json.dumps(dataclasses.asdict(sweep)))  # tuples as JSON lists
    for key in SETTINGS:
        if old.get(key, {} if key == "model_kwargs" else None) != now[key]:
            return f"{key}={old.get(key)!r}, not {getattr(sweep, key)!r}"
    return None


def _print_comparison(sweep: Sweep, rows: list[dict], reference: Path) -> None:
    from factorize._io import read_jsonl

    ref_rows = read_jsonl(reference / "results.jsonl")
    if not ref_rows:
        print(f"no reference results in {reference}: nothing to compare with")
        return
    clash = _settings_clash(reference, sweep)
    if clash:
        print(f"not compared with {reference}: its sweep has {clash}")
        return
    wanted = {_run_id(*p) for p in sweep_plan(sweep)}
    ref_rows = [r for r in ref_rows if r["run_id"] in wanted]
    rows = [r for r in rows if r["run_id"] in wanted]
    n_test = len(_dataset(sweep, {}).y_test)
    text, _ = compare(rows, ref_rows, n_test)
    print(f"\nThis run ({len(rows)} runs) beside the reference {reference}:\n")
    print(text)


if __name__ == "__main__":
    main()
