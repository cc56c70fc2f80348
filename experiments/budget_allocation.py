"""Per-layer allocation against uniform under one whole-model MAC budget, data-free and
data-aware, before and after one epoch of fine-tuning. No retraining: the baselines are trained
checkpoints (digits ones are trained here in seconds).

For each dataset, seed, MAC fraction, family (and one mixed-family row that may pick any family
per layer), projection (``data-free``; ``symmetric`` / ``asymmetric``: data-aware on calibration
images of the training split) and allocation (``uniform``: every layer within the fraction, the
``--macs`` rule; ``knapsack``: exact DP over per-layer loss-vs-MACs curves; ``greedy``: AIMET's
threshold search, at 1/4; ``knapsack-r2``: the knapsack with ``rounds=2``, its curves scored again
with the other layers converted as the first knapsack chose; ``knapsack-r2-asym``: the same with
the round-two candidates and context fitted asymmetrically, as the conversion fits them;
``knapsack-best``: of both rounds' knapsacks and uniform, the network with the lowest held-out
loss, every layer fitted as the conversion fits it), the converted network's test accuracy.
Allocation curves come from the loss on held-out training images (the last ``holdout`` of the
split) with one layer converted at a time, cached in ``sensitivity.json``. Every row asserts the
budget on the built model with ``count_macs``. Rows are append-only JSON lines; a rerun skips
finished rows; CSV, Markdown table and plot are rebuilt from them.

Commands and expected runtimes (2 shared CPU cores):

    python experiments/budget_allocation.py                  # everything: hours
    python experiments/budget_allocation.py --stage fm-quarter     # FM seed 0 at 1/4: ≈ 30 min
    python experiments/budget_allocation.py --stage digits         # digits grid: ≈ 20 min
    python experiments/budget_allocation.py --stage fm-finetune    # FM, 1 epoch: ≈ 1.5 min a row
    python experiments/budget_allocation.py --stage digits-heldout  # unseen curve images: ≈ 25 min
    python experiments/budget_allocation.py --stage fm-finetune-rest  # FM 1/2, 1/8 tuned: ≈ 5 h
    python experiments/budget_allocation.py --stage rounds2        # FM knapsack-r2 rows: ≈ 1.5 h
    python experiments/budget_allocation.py --stage rounds2-asym   # knapsack-r2-asym: ≈ 1 h
    python experiments/budget_allocation.py --stage best           # knapsack-best: ≈ 2 h
    python experiments/budget_allocation.py --rebuild              # tables and plot only
    python experiments/budget_allocation.py --quick --out /tmp/q   # tests: < 1 min

Outputs in ``--out`` (default ``results/allocation``): ``results.jsonl``, ``results.csv``,
``results.md``, ``accuracy_vs_macs.png``, ``sensitivity.json``; digits baselines in
``runs/allocation/``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("dsc", "bsconv", "spatial", "lowrank_in", "lowrank_out", "tucker2", "cp3", "cp4")
PROJECTIONS = ("data-free", "symmetric", "asymmetric")
MIXED = "mixed"
@dataclasses.dataclass(frozen=True)
class Rescored:
    """A re-scored allocation row label: ``allocate(allocation, rounds=, keep_best=)``, round
    two's candidates fitted on the original network's statistics (``as_converted=False``) or,
    in asymmetric rows, on the network round one chose, as the asymmetric conversion fits."""

    allocation: str
    rounds: int
    as_converted: bool
    keep_best: bool = False


ROUNDS = {"knapsack-r2": Rescored("knapsack", 2, as_converted=False),
          "knapsack-r2-asym": Rescored("knapsack", 2, as_converted=True),
          # rounds one and two and uniform, the best on the held-out images kept
          "knapsack-best": Rescored("knapsack", 2, as_converted=True, keep_best=True)}
ALLOCATIONS = ("uniform", "greedy", "knapsack", *ROUNDS)


@dataclasses.dataclass(frozen=True)
class Setup:
    """One dataset's part of the experiment, as code. ``dataset`` labels its rows; ``source``
    is the dataset loaded (default: the label)."""

    dataset: str
    checkpoints: dict[int, str]  # seed -> run dir (with checkpoint/) or checkpoint dir
    fractions: tuple[float, ...] = (0.5, 0.25, 0.125)
    families: tuple[str, ...] = FAMILIES
    mixed: tuple[str, ...] = FAMILIES  # the families the mixed row chooses from
    projections: tuple[str, ...] = PROJECTIONS
    greedy_fractions: tuple[float, ...] = (0.25,)
    skip: str = "^conv1$"  # as the uniform --macs runs of accuracy_vs_flops: first conv full
    holdout: int = 1000  # last training images, scoring the allocation curves
    calibrate: int = 512  # training images (seeded subset) for the data-aware fits
    grid: tuple[float, ...] = (0.06, 0.09, 0.125, 0.18, 0.25, 0.36, 0.5, 0.7)
    train_epochs: int | None = None  # digits baselines trained here (None: given checkpoints)
    n_test: int | None = None
    n_train: int | None = None
    source: str | None = None
    # True: baselines trained here without the last ``holdout`` training images, so the
    # allocation curves are scored on images the network has never seen
    unseen_holdout: bool = False

    @property
    def data_name(self) -> str:
        return self.source or self.dataset


SETUPS = {
    "fashion_mnist": Setup("fashion_mnist", {0: "zoo/fm-cnn-seed0",
                                             1: "zoo/fm-cnn-seed1"}),
    "digits": Setup("digits", {0: "runs/allocation/digits-seed0",
                               1: "runs/allocation/digits-seed1"},
                    holdout=300, calibrate=256, train_epochs=15),
    # digits' network fits its training images almost perfectly, so curves scored on them say
    # little; this arm trains the baselines on the first 1137 of the 1437 and scores on the rest
    "digits_heldout": Setup("digits_heldout", {0: "runs/allocation/digits-heldout-seed0",
                                               1: "runs/allocation/digits-heldout-seed1"},
                            holdout=300, calibrate=256, train_epochs=15, source="digits",
                            unseen_holdout=True),
}
QUICK = Setup("digits", {0: "runs/allocation-quick/digits-seed0"}, fractions=(0.25,),
              families=("dsc", "lowrank_out"), mixed=("dsc", "lowrank_out"),
              projections=("data-free", "symmetric"), holdout=64, calibrate=64,
              grid=(0.125, 0.25, 0.5), train_epochs=2, n_train=400, n_test=128)


# --- the plan: cheapest, most important rows first ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    dataset: str
    seed: int
    fraction: float
    family: str  # a family or "mixed"
    projection: str
    allocation: str
    finetune_epochs: int = 0

    @property
    def run_id(self) -> str:
        return (f"{self.dataset}/seed{self.seed}/{self.fraction:g}/{self.family}/"
                f"{self.projection}/{self.allocation}/ft{self.finetune_epochs}")


def _rows(s: Setup, seeds, fractions, finetune: int = 0) -> list[Row]:
    out = []
    for seed in seeds:
        for fraction in fractions:
            for family in (*s.families, MIXED):
                for projection in s.projections:
                    allocs = ["uniform", "knapsack"]
                    if fraction in s.greedy_fractions:
                        allocs.append("greedy")
                    out += [Row(s.dataset, seed, fraction, family, projection, a, finetune)
                            for a in allocs]
    return out


STAGES = ("fm-quarter", "digits", "fm-rest", "fm-finetune", "digits-finetune", "digits-heldout",
          "fm-finetune-rest", "rounds2", "rounds2-asym", "best")


def plan(setups: dict[str, Setup], stage: str = "all") -> list[Row]:
    """Before fine-tuning: FM seed 0 at 1/4, digits' full grid, FM's other fractions and seed;
    then the fine-tuned rows in the same order (FM ones only at 1/4, uniform and knapsack);
    ``rounds2``: the knapsack re-scored once (``knapsack-r2``), FM seed 0 at 1/8 and 1/4 before
    fine-tuning (the digits baselines under ``runs/`` are retrained on a fresh checkout and
    need not be the networks the committed digits rows measured)."""
    stages: dict[str, list[Row]] = defaultdict(list)
    fm, dg = setups.get("fashion_mnist"), setups.get("digits")
    if fm:
        stages["fm-quarter"] = _rows(fm, [0], [0.25])
    if dg:
        stages["digits"] = _rows(dg, sorted(dg.checkpoints), dg.fractions)
    if fm:
        seeds = sorted(fm.checkpoints)
        # seed 0's other fractions, then the other seeds (1/4 first)
        rest = [r for seed in seeds for f in sorted(fm.fractions, key=lambda f: f != 0.25)
                for r in _rows(fm, [seed], [f])]
        stages["fm-rest"] = [r for r in sorted(rest, key=lambda r: r.seed != seeds[0])
                             if r not in set(stages["fm-quarter"])]
        # the fine-tuned rows the summary table needs first: data-free and asymmetric for
        # every seed (the mixed row first), then symmetric
        def tuned(fractions):
            rows = [dataclasses.replace(r, finetune_epochs=1)
                    for r in _rows(fm, seeds, fractions) if r.allocation != "greedy"]
            return sorted(rows, key=lambda r: (r.projection == "symmetric", r.seed,
                                               r.fraction, r.family != MIXED))

        stages["fm-finetune"] = tuned([0.25])
        stages["fm-finetune-rest"] = tuned([f for f in fm.fractions if f != 0.25])
    if dg:
        stages["digits-finetune"] = [dataclasses.replace(r, finetune_epochs=1)
                                     for r in stages["digits"] if r.allocation != "greedy"]
    dh = setups.get("digits_heldout")
    if dh:
        stages["digits-heldout"] = _rows(dh, sorted(dh.checkpoints), dh.fractions)

    def rescored(rows):
        return [dataclasses.replace(r, allocation="knapsack-r2") for r in rows
                if r.allocation == "knapsack"]

    if fm:  # 1/8 first: where the one-round knapsack lost most
        first = min(fm.checkpoints)
        stages["rounds2"] = sorted(rescored(_rows(fm, [first], [0.125, 0.25])),
                                   key=lambda r: (r.fraction, r.projection != "asymmetric"))
        # the asymmetric rows again, round two fitted as the conversion fits (seed 0 at 1/8
        # and 1/4, then the other seeds at 1/8)
        stages["rounds2-asym"] = [
            dataclasses.replace(r, allocation="knapsack-r2-asym")
            for r in sorted(rescored(_rows(fm, sorted(fm.checkpoints), [0.125, 0.25])),
                            key=lambda r: (r.seed != first, r.fraction))
            if r.projection == "asymmetric" and (r.seed == first or r.fraction == 0.125)]
        # every projection: seed 0 at 1/8 and 1/4 (its round two is cached), then the other
        # seeds at 1/4 (the README's fraction) before 1/8
        stages["best"] = [
            dataclasses.replace(r, allocation="knapsack-best")
            for r in sorted(rescored(_rows(fm, sorted(fm.checkpoints), [0.125, 0.25])),
                            key=lambda r: (r.seed, r.fraction if r.seed == first
                                           else -r.fraction))]
    order = STAGES
    if stage != "all":
        if stage not in order:
            raise ValueError(f"--stage must be one of {order} or 'all', got {stage!r}")
        order = (stage,)
    return [r for name in order for r in stages.get(name, [])]


# --- one row -----------------------------------------------------------------------------------


class Context:
    """Loaded datasets, models, calibration sets and projections, shared between rows."""

    def __init__(self, setups: dict[str, Setup], out: Path):
        from factorize.conversion.allocation import CurveCache

        self.setups, self.out = setups, out
        self.cache = CurveCache(out / "sensitivity.json")
        self._memo: dict[tuple, Any] = {}

    def memo(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def data(self, dataset: str):
        from factorize import data

        s = self.setups[dataset]
        return self.memo(("data", dataset),
                         lambda: data.load(s.data_name).subset(s.n_train, s.n_test))

    def checkpoint(self, dataset: str, seed: int) -> Path:
        s = self.setups[dataset]
        path = Path(s.checkpoints[seed])
        path = path if path.is_absolute() else ROOT / path
        if s.train_epochs is not None and not (path / "checkpoint").exists():
            from factorize.training import get_config, train_and_evaluate

            n_train = s.n_train
            if s.unseen_holdout:
                n_train = len(self.data(dataset).x_train) - s.holdout
            train_and_evaluate(get_config(s.data_name, "cnn", epochs=s.train_epochs, seed=seed,
                                          n_train=n_train, n_test=s.n_test, progress=False),
                               path)
        ckpt = path / "checkpoint" if (path / "checkpoint").exists() else path
        if not ckpt.exists():
            raise FileNotFoundError(f"baseline {ckpt} does not exist (train it first)")
        return ckpt

    def model(self, dataset: str, seed: int):
        from factorize.conversion import layer_builder
        from factorize.training import restore

        return self.memo(("model", dataset, seed), lambda: restore(
            self.checkpoint(dataset, seed), layer_builder=layer_builder))

    def model_hash(self, dataset: str, seed: int) -> str:
        from factorize.conversion.allocation import model_hash

        return self.memo(("hash", dataset, seed),
                         lambda: model_hash(self.model(dataset, seed)))

    def calibration(self, dataset: str):
        import numpy as np

        s = self.setups[dataset]
        x = self.data(dataset).x_train
        idx = np.random.default_rng(0).choice(len(x) - s.holdout, s.calibrate, replace=False)
        return self.memo(("calib", dataset), lambda: x[np.sort(idx)])

    def scorer(self, dataset: str, seed: int):
        from factorize.conversion.allocation import eval_scorer

        s, ds = self.setups[dataset], self.data(dataset)
        return self.memo(("scorer", dataset, seed), lambda: eval_scorer(
            self.model(dataset, seed), ds.x_train[-s.holdout:], ds.y_train[-s.holdout:]))

    def projection(self, dataset: str, seed: int, projection: str,
                   rescore: str = "symmetric"):
        from factorize.conversion.allocation import (
            convertible_layers,
            data_aware_projection,
            data_free_projection,
        )

        if projection == "data-free":
            return self.memo(("proj", "free"), lambda: data_free_projection(OPTIONS))
        model, s = self.model(dataset, seed), self.setups[dataset]

        def make():
            x = self.data(dataset).x_test[:1]
            paths = [sl.path for sl in convertible_layers(model, x, skip=s.skip)]
            return data_aware_projection(model, self.calibration(dataset), paths, OPTIONS,
                                         reconstruction=rescore)

        # symmetric and asymmetric rows share the one-layer fits; ``rescore`` says how
        # re-scoring rounds fit (see ROUNDS)
        return self.memo(("proj", dataset, seed, rescore), make)


OPTIONS = {"cp3": {"n_iter": 50}, "cp4": {"n_iter": 50}}


def run_row(row: Row, ctx: Context) -> dict[str, Any]:
    import factorize as fz
    from factorize.conversion import convert
    from factorize.conversion.allocation import allocate
    from factorize.conversion.convert import check_budget
    from factorize.training import evaluate

    t0 = time.perf_counter()
    s, ds = ctx.setups[row.dataset], ctx.data(row.dataset)
    model = ctx.model(row.dataset, row.seed)
    x = ds.x_test[:8]
    families = list(s.mixed) if row.family == MIXED else [row.family]
    spec = ROUNDS.get(row.allocation, Rescored(row.allocation, 1, as_converted=False))
    rescore = row.projection if spec.as_converted and row.projection != "data-free" \
        else "symmetric"
    try:
        a = allocate(model, x, families, row.fraction, spec.allocation, rounds=spec.rounds,
                     keep_best=spec.keep_best,
                     scorer=ctx.scorer(row.dataset, row.seed),
                     projection=ctx.projection(row.dataset, row.seed, row.projection, rescore),
                     skip=s.skip, options=OPTIONS, cache=ctx.cache, grid=s.grid)
    except ValueError as e:
        if not str(e).startswith("macs:"):
            raise
        return dict(status="infeasible", note=str(e), wall_time_s=time.perf_counter() - t0)
    calibration = None if row.projection == "data-free" else ctx.calibration(row.dataset)
    reconstruction = row.projection if calibration is not None else "asymmetric"
    converted, report = convert(model, a.policy, x, calibration=calibration,
                                reconstruction=reconstruction, workers=1)
    check_budget(report, a.policy)  # convert checked too; the row records it
    macs = fz.count_macs(converted, x[:1])
    before = evaluate(converted, ds.x_test, ds.y_test)["accuracy"]
    out = dict(status="ok", accuracy_before_finetune=before, accuracy=before, macs=macs,
               baseline_macs=report.model_macs_before, target_macs=a.target, alloc_macs=a.macs,
               converted_fraction=a.macs / a.policy.convertible_macs,
               budget_met=macs <= report.model_macs_before - a.policy.convertible_macs
               + a.target,
               threshold=a.threshold, scorer=a.scorer,
               **({"whole_loss": a.whole, "selected": a.selected} if a.selected else {}),
               layers={p: {k: v for k, v in d.items() if k != "curve"}
                       for p, d in a.to_dict()["layers"].items()})
    if row.finetune_epochs:
        from factorize.conversion.finetune import finetune
        from factorize.training import get_config

        config = get_config(s.data_name, "cnn", epochs=row.finetune_epochs, learning_rate=1e-3,
                            warmup_epochs=0.0, seed=row.seed, n_train=s.n_train,
                            n_test=s.n_test, progress=False)
        out["accuracy"] = finetune(converted, ds, config)["accuracy_after"]
    out["wall_time_s"] = time.perf_counter() - t0
    return out


def baseline(dataset: str, seed: int, ctx: Context) -> dict[str, Any]:
    import factorize as fz
    from factorize.training import evaluate

    ds, model = ctx.data(dataset), ctx.model(dataset, seed)
    return dict(run_id=f"{dataset}/seed{seed}/baseline", kind="baseline", dataset=dataset,
                seed=seed, accuracy=evaluate(model, ds.x_test, ds.y_test)["accuracy"],
                macs=fz.count_macs(model, ds.x_test[:1]), model=ctx.model_hash(dataset, seed))


def run(setups: dict[str, Setup], out: Path, stage: str = "all", limit: int | None = None
        ) -> list[dict]:
    from factorize._io import append_jsonl, read_jsonl

    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = {r["run_id"]: r for r in read_jsonl(path)}
    rows = plan(setups, stage)
    todo = [r for r in rows if r.run_id not in done]
    print(f"{out}: {len(rows) - len(todo)} of {len(rows)} rows done, {len(todo)} to run",
          flush=True)
    ctx = Context(setups, out)
    for i, row in enumerate(todo[:limit]):
        bid = f"{row.dataset}/seed{row.seed}/baseline"
        if bid not in done:
            done[bid] = baseline(row.dataset, row.seed, ctx)
            append_jsonl(path, done[bid])
        mid = ctx.model_hash(row.dataset, row.seed)
        if done[bid].get("model", mid) != mid:
            # new rows on another network than the recorded ones would mix two experiments
            raise ValueError(
                f"{ctx.checkpoint(row.dataset, row.seed)}: the baseline's parameters hash to "
                f"{mid}, but the rows in {path} were measured on {done[bid]['model']}; "
                f"restore that checkpoint or write to another --out")
        rec = dict(run_id=row.run_id, kind="convert", **dataclasses.asdict(row),
                   **run_row(row, ctx), model=mid)
        append_jsonl(path, rec)
        done[row.run_id] = rec
        acc = rec.get("accuracy")
        print(f"[{i + 1}/{len(todo)}] {row.run_id}: {rec['status']}"
              + (f" {100 * acc:.2f}%" if acc is not None else "")
              + f" ({rec['wall_time_s']:.1f} s)", flush=True)
    rebuild(out)
    return list(done.values())


# --- tables and plot, rebuilt from the JSON lines ----------------------------------------------

CSV_FIELDS = ("run_id", "dataset", "seed", "fraction", "family", "projection", "allocation",
              "finetune_epochs", "status", "accuracy_before_finetune", "accuracy", "macs",
              "baseline_macs", "target_macs", "alloc_macs", "converted_fraction", "budget_met",
              "threshold", "wall_time_s", "model")


def to_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        if r.get("kind") == "convert":
            w.writerow(r)
    return buf.getvalue()


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    m = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.2f}"
    return f"{m:.2f} ± {100 * (max(values) - min(values)) / 2:.2f}"


def _methods(records) -> list[tuple[str, str]]:
    have = {(r["projection"], r["allocation"]) for r in records if r.get("kind") == "convert"}
    return [(p, a) for p in PROJECTIONS for a in ALLOCATIONS if (p, a) in have]


def to_markdown(records: list[dict]) -> str:
    conv = [r for r in records if r.get("kind") == "convert"]
    base = defaultdict(list)
    for r in records:
        if r.get("kind") == "baseline":
            base[r["dataset"], r["seed"]].append(r["accuracy"])
    lines = ["Test accuracy (%) of the converted network, mean ± half-range over the seeds "
             "present (n = seeds). Budget: the converted convs' MACs ≤ fraction × theirs "
             "(first conv and head kept), checked on every built model with `count_macs`; "
             "– : no row; ✗ : the budget is below what the method can reach; † : fewer seeds "
             "than the heading's.", ""]
    groups = sorted({(r["dataset"], r["fraction"], r["finetune_epochs"]) for r in conv},
                    key=lambda g: (g[0] != "fashion_mnist", g[0], g[2], -g[1]))
    for dataset, fraction, ft in groups:
        rows = [r for r in conv if (r["dataset"], r["fraction"], r["finetune_epochs"])
                == (dataset, fraction, ft)]
        methods = _methods(rows)
        key = "accuracy"
        seeds = sorted({r["seed"] for r in rows})
        when = "before fine-tuning" if ft == 0 else f"after {ft} epoch of fine-tuning"
        lines += [f"### {dataset}, ≤ {fraction:g} of the conv MACs, {when} (seeds {seeds}; "
                  f"baseline {_cell([a for s in seeds for a in base[dataset, s]])})", "",
                  "| family | " + " | ".join(f"{p} {a}" for p, a in methods) + " |",
                  "|---|" + "---:|" * len(methods)]
        for family in (*FAMILIES, MIXED):
            cells = []
            for p, a in methods:
                sel = [r for r in rows if (r["family"], r["projection"], r["allocation"])
                       == (family, p, a)]
                ok = [r[key] for r in sel if r["status"] == "ok"]
                short = "†" if sel and len({r["seed"] for r in sel}) < len(seeds) else ""
                cells.append((_cell(ok) if ok else ("✗" if sel else "–")) + short)
            if any(c != "–" for c in cells):
                lines.append(f"| {family} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += verdict(records)
    met = [r for r in conv if r["status"] == "ok"]
    n_met = sum(r["budget_met"] for r in met)
    lines.append(f"Budget met (count_macs of the built model ≤ limit) in {n_met} of "
                 f"{len(met)} converted rows.")
    return "\n".join(lines) + "\n"


def _mean(rows: list[dict], key: str = "accuracy") -> float | None:
    vals = [r[key] for r in rows if r["status"] == "ok"]
    return statistics.fmean(vals) if vals else None


def verdict(records: list[dict]) -> list[str]:
    """The acceptance checks, computed from the rows, for each dataset and fraction before
    fine-tuning: the best data-aware allocated row against the baseline; each family's best
    data-aware allocated row against data-free uniform (+20 points) or the baseline (−5); and
    allocated (knapsack) against uniform at the same projection."""
    conv = [r for r in records if r.get("kind") == "convert" and r["finetune_epochs"] == 0]
    out = ["### Verdict (computed from the rows above, before fine-tuning)", ""]
    for dataset, fraction in sorted({(r["dataset"], r["fraction"]) for r in conv},
                                    key=lambda g: (g[0] != "fashion_mnist", g[0], -g[1])):
        rows = [r for r in conv if (r["dataset"], r["fraction"]) == (dataset, fraction)]
        base = [r["accuracy"] for r in records if r.get("kind") == "baseline"
                and r["dataset"] == dataset and r["seed"] in {x["seed"] for x in rows}]
        if not base:
            continue
        b = statistics.fmean(base)

        def pick(family, projections, allocations, rows=rows):
            cands = [(_mean([r for r in rows if (r["family"], r["projection"],
                                                 r["allocation"]) == (family, p, a)]), p, a)
                     for p in projections for a in allocations]
            cands = [c for c in cands if c[0] is not None]
            return max(cands) if cands else None

        aware, alloc = ("symmetric", "asymmetric"), ("knapsack", "greedy", *ROUNDS)
        best = [(pick(f, aware, alloc), f) for f in (*FAMILIES, MIXED)]
        best = [(c, f) for c, f in best if c is not None]
        head = f"- {dataset} at ≤ {fraction:g} (baseline {100 * b:.2f}):"
        if best:
            (acc, p, a), f = max(best)
            ok = "within" if b - acc <= 0.02 else "not within"
            out.append(f"{head} best data-aware allocated: {f} ({p} {a}) {100 * acc:.2f}, "
                       f"{100 * (b - acc):.2f} points below the baseline: {ok} 2 points.")
        else:
            out.append(f"{head} no data-aware allocated row.")
        short = []
        for family in FAMILIES:
            c = pick(family, aware, alloc)
            free = _mean([r for r in rows if (r["family"], r["projection"], r["allocation"])
                          == (family, "data-free", "uniform")])
            if c is None or free is None:
                continue
            if not (c[0] >= free + 0.20 or c[0] >= b - 0.05):
                short.append(f"{family} ({100 * free:.1f} → {100 * c[0]:.1f})")
        n_fam = sum(1 for f in FAMILIES if pick(f, aware, alloc) is not None)
        never = [f for f in FAMILIES if any(r["family"] == f for r in rows)
                 and all(r["status"] != "ok" for r in rows if r["family"] == f)]
        if never:
            short.append(f"{', '.join(never)} cannot reach the budget at all")
        out.append(f"  Families ≥ 20 points above data-free uniform or within 5 of the "
                   f"baseline: {n_fam - len(short) + bool(never)} of {n_fam + len(never)}"
                   + (f"; short: {', '.join(short)}." if short else "."))
        for allocated in ("knapsack", *ROUNDS):
            wins = ties = total = 0
            for family in (*FAMILIES, MIXED):
                for p in PROJECTIONS:
                    u, k = ([r for r in rows if (r["family"], r["projection"],
                                                 r["allocation"]) == (family, p, a)]
                            for a in ("uniform", allocated))
                    both = {r["seed"] for r in u} & {r["seed"] for r in k}  # like for like
                    u, k = (_mean([r for r in x if r["seed"] in both]) for x in (u, k))
                    if u is None or k is None:
                        continue
                    total += 1
                    wins += k > u
                    ties += k == u
            if total:
                out.append(f"  {allocated.capitalize()} above uniform at the same projection "
                           f"in {wins} of {total} (family, projection) cells, equal in {ties}.")
    return out + [""]


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = [r for r in records if r.get("kind") == "convert" and r["status"] == "ok"
            and r["finetune_epochs"] == 0]
    datasets = sorted({r["dataset"] for r in conv}, key=lambda d: d != "fashion_mnist")
    if not datasets:
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = [r for r in conv if r["dataset"] == dataset]
        base = [r["accuracy"] for r in records if r.get("kind") == "baseline"
                and r["dataset"] == dataset]
        if base:
            ax.axhline(100 * statistics.fmean(base), color="black", ls="--", lw=1,
                       label="baseline")
        for p, a in _methods(rows):
            pts = []
            for fraction in sorted({r["fraction"] for r in rows}):
                # the method's best family at this fraction (seed-averaged)
                by_fam = defaultdict(list)
                for r in rows:
                    if (r["projection"], r["allocation"], r["fraction"]) == (p, a, fraction):
                        by_fam[r["family"]].append(r)
                if not by_fam:
                    continue
                best = max(by_fam.values(), key=lambda rs: statistics.fmean(
                    x["accuracy"] for x in rs))
                pts.append((statistics.fmean(x["macs"] for x in best),
                            100 * statistics.fmean(x["accuracy"] for x in best)))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o",
                        ls="-" if a != "uniform" else ":", label=f"{p} {a}")
        ax.set_xscale("log")
        ax.set_xlabel("MACs per image (count_macs, whole model)")
        ax.set_ylabel("test accuracy before fine-tuning (%), best family")
        ax.set_title(f"{dataset}: uniform vs allocated")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rebuild(out: Path) -> None:
    from factorize._io import atomic_write_text, read_jsonl

    records = read_jsonl(out / "results.jsonl")
    atomic_write_text(out / "results.csv", to_csv(records))
    atomic_write_text(out / "results.md", to_markdown(records))
    plot(records, out / "accuracy_vs_macs.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "allocation")
    p.add_argument("--stage", default="all",
                   help=f"{', '.join(STAGES)} or all")
    p.add_argument("--datasets", default=",".join(SETUPS))
    p.add_argument("--limit", type=int, help="run at most this many rows")
    p.add_argument("--quick", action="store_true", help="a tiny digits config (tests)")
    p.add_argument("--rebuild", action="store_true", help="tables and plot only")
    args = p.parse_args(argv)
    if args.rebuild:
        rebuild(args.out)
        return 0
    if args.quick:
        setups = {"digits": dataclasses.replace(QUICK, checkpoints={
            0: str(args.out / "runs" / "digits-seed0")})}
    else:
        names = [d.strip() for d in args.datasets.split(",")]
        bad = [d for d in names if d not in SETUPS]
        if bad:
            raise SystemExit(f"--datasets: unknown {bad}; valid: {', '.join(SETUPS)}")
        setups = {d: SETUPS[d] for d in names}
    run(setups, args.out, args.stage, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
