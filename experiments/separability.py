"""Separability of trained convs: "a 1×1 conv is a low-rank matrix", and what a k×k kernel is.

For every conv (and linear, i.e. 1×1-on-pooled-features) layer of a trained network:

- singular spectra of the unfoldings each family truncates (docs/design.md): per-input-channel
  slices ``W[:,:,c,:]`` (kh·kw × N; ``dsc``), per-output-channel slices ``W[:,:,:,n]``
  (kh·kw × C; ``bsconv``), the mode-C and mode-N unfoldings (``lowrank_in``/``lowrank_out``,
  ``tucker2``'s two modes) and the spatial (kh·C) × (kw·N) reshape (``spatial``); for a 1×1
  layer the N × C matrix itself;
- effective rank (Roy & Vetterli 2007: exp of the entropy of the L1-normalised singular values)
  and stable rank (‖W‖_F² / ‖W‖_2²) of each unfolding (per-slice unfoldings: mean over slices);
- the energy each family keeps, 1 − rel_error², against its MAC fraction at the layer's real
  input size, for ranks along the family's rank path (``decompose`` + ``relative_error``: the real
  projection, not a formula; for the SVD families the Eckart–Young value from the spectrum is
  recorded alongside as a check);
- BSConv's question (Haase & Amthor 2020): at equal MACs, is a trained kernel closer to a
  depthwise-first (``dsc``) or a pointwise-first (``bsconv``) block? A table per layer and a
  verdict computed from it.

Every layer is repeated with a random Gaussian kernel of the same shape (the control: what does
training add?). Energies are scale-invariant, so the init's scale does not matter.

Commands (2 shared CPU cores):
  python3 experiments/separability.py --out results/separability      # digits CNN, ≈ 5–8 min
  python3 experiments/separability.py --checkpoint CKPT --out DIR     # any saved model
  python3 experiments/separability.py --quick --out /tmp/sep          # tests, ≈ 20 s
  python3 experiments/separability.py --rebuild --out results/separability   # re-render only

Without ``--checkpoint`` the small CNN is trained on digits (seeded, ≈ 1 min) and cached in
``OUT/baseline_*``. Outputs in ``--out``: ``separability.jsonl`` (append-only; everything else
is rebuilt from it), ``separability.csv``, ``separability.md``, ``spectra.png``,
``energy_vs_macs.png``. A rerun into the same directory skips finished layers and points.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SVD_FAMILIES = ("dsc", "bsconv", "spatial", "lowrank_in", "lowrank_out")
TENSOR_FAMILIES = ("tucker2", "cp3", "cp4")
# Which unfolding's spectrum gives each SVD family's optimal energy (Eckart–Young).
FAMILY_UNFOLDING = {"dsc": "dsc", "bsconv": "bsconv", "spatial": "spatial",
                    "lowrank_in": "mode_C", "lowrank_out": "mode_N", "lowrank": "matrix"}
UNFOLDING_LABELS = {
    "dsc": "per-input-channel (kh·kw × N)", "bsconv": "per-output-channel (kh·kw × C)",
    "mode_C": "mode-C (C × kh·kw·N)", "mode_N": "mode-N (N × kh·kw·C)",
    "spatial": "spatial ((kh·C) × (kw·N))", "matrix": "1×1: the N × C matrix",
}
BUDGETS = (1 / 8, 1 / 4, 1 / 2, 3 / 4)
JSONL, CSV, MD = "separability.jsonl", "separability.csv", "separability.md"


# ---------------------------------------------------------------------------------------------
# spectra


def unfoldings(w: np.ndarray) -> dict[str, np.ndarray]:
    """The matrices each family truncates, as a batch ``(slices, m, n)`` (docs/design.md)."""
    kh, kw, c, n = w.shape
    if kh * kw == 1:
        return {"matrix": w.reshape(c, n).T[None]}
    taps = w.reshape(kh * kw, c, n)
    return {
        "dsc": taps.transpose(1, 0, 2),
        "bsconv": taps.transpose(2, 0, 1),
        "mode_C": w.transpose(2, 0, 1, 3).reshape(1, c, kh * kw * n),
        "mode_N": w.transpose(3, 0, 1, 2).reshape(1, n, kh * kw * c),
        "spatial": w.transpose(0, 2, 1, 3).reshape(1, kh * c, kw * n),
    }


def effective_rank(s: np.ndarray) -> float:
    """Roy & Vetterli (2007): exp(H(p)) with p = s / Σs; 0 for a zero matrix."""
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def stable_rank(s: np.ndarray) -> float:
    """‖W‖_F² / ‖W‖_2² (Rudelson & Vershynin 2007); 0 for a zero matrix."""
    return float((s**2).sum() / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def spectrum_stats(batch: np.ndarray) -> dict[str, Any]:
    """Singular values of every slice, mean effective and stable rank over slices."""
    s = np.linalg.svd(batch.astype(np.float64), compute_uv=False)  # (slices, min(m, n))
    nonzero = s[:, 0] > 0
    return {
        "shape": list(batch.shape),
        "min_dim": int(s.shape[1]),
        "singular_values": s.tolist(),
        "effective_rank": float(np.mean([effective_rank(x) for x in s[nonzero]] or [0.0])),
        "stable_rank": float(np.mean([stable_rank(x) for x in s[nonzero]] or [0.0])),
    }


def eckart_young_energy(singular_values: Sequence[Sequence[float]], rank: int) -> float:
    """Energy a rank-``rank`` truncation of every slice keeps: Σ top-r σ² / Σ σ²."""
    s2 = np.square(np.asarray(singular_values))
    total = s2.sum()
    return float(s2[:, :rank].sum() / total) if total > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# energy against MACs


def _families_for(shape: tuple[int, ...], families: Sequence[str]) -> list[str]:
    # For a 1×1 kernel every two-stage family is the same matrix factorization (or costs more
    # than the layer: dsc, bsconv), so one curve, lowrank_in, says it all.
    if shape[0] * shape[1] == 1:
        return ["lowrank_in"]
    return list(families)


def select_ranks(family: str, shape: tuple[int, ...], geom: dict[str, Any], max_fraction: float,
                 max_points: int, *, by_params: bool = False) -> list[Any]:
    """Up to ``max_points`` ranks, geometrically spaced along the family's rank path, whose MAC
    fraction at the layer's input size is at most ``max_fraction`` (the largest such included);
    with ``by_params`` also those within ``max_fraction`` of the parameters (a 1×1 stage before
    a strided stage costs more MACs than parameters, and the by-parameter comparison needs it)."""
    from factorize.families import get_family, rank_for_fraction

    fam = get_family(family)
    path = fam.rank_path(shape)
    last = -1
    for g in [geom, {}] if by_params else [geom]:
        try:
            last = max(last, path.index(rank_for_fraction(fam, shape, max_fraction, **g)))
        except ValueError:  # even the smallest rank costs more than the budget
            pass
    if last < 0:
        return []
    idx = np.unique(np.round(np.geomspace(1, last + 1, max_points)).astype(int) - 1)
    return [path[i] for i in idx]


def curve_point(w: np.ndarray, family: str, rank: Any, geom: dict[str, Any],
                options: dict[str, Any]) -> dict[str, Any]:
    """Project ``w`` on ``family`` at ``rank``: MAC and parameter fractions, error, energy."""
    import factorize

    shape = tuple(w.shape)
    opts = options if family in ("cp3", "cp4") else {}
    f = factorize.decompose(w, family, rank, **opts)
    err = float(factorize.relative_error(w, f))
    full_macs = factorize.conv_macs(shape, geom["input_hw"], geom["strides"], geom["padding"],
                                    geom["dilation"])
    macs = f.macs(geom["input_hw"], geom["strides"], geom["padding"], geom["dilation"])
    return {
        "family": family, "rank": list(rank) if isinstance(rank, tuple) else rank,
        "macs": int(macs), "full_macs": int(full_macs), "mac_fraction": macs / full_macs,
        "param_fraction": f.params / math.prod(shape), "rel_error": err, "energy": 1 - err**2,
    }


# ---------------------------------------------------------------------------------------------
# the network


def _train_baseline(out: Path, args) -> tuple[Path, str]:
    """The digits CNN, trained once per (dataset, seed, quick) and cached under ``out``."""
    from factorize.training import get_config, train_and_evaluate

    name = f"baseline_{args.dataset}_cnn_seed{args.seed}{'_quick' if args.quick else ''}"
    final = out / name
    if (final / "checkpoint").exists():
        return final / "checkpoint", name
    overrides: dict[str, Any] = dict(seed=args.seed, progress=True)
    if args.quick:  # a few seconds: tiny widths, few examples, one epoch
        overrides.update(epochs=1, n_train=256, n_test=128, batch_size=64,
                         model_kwargs={"widths": [4, 8, 8]})
    elif args.epochs is not None:
        overrides["epochs"] = args.epochs
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    train_and_evaluate(get_config(args.dataset, "cnn", **overrides), tmp)
    os.replace(tmp, final)  # a killed run leaves only a .tmp directory, never a half baseline
    return final / "checkpoint", name


def layer_table(model, image_shape: Sequence[int]) -> list[dict[str, Any]]:
    """Every ungrouped conv and every linear layer: kernel (HWIO; linear as 1×1) and geometry."""
    import jax.numpy as jnp
    from flax import nnx

    from factorize._checks import pair
    from factorize.conversion import candidate_layers, layer_inputs

    shapes = layer_inputs(model, jnp.zeros((1, *image_shape), jnp.float32))
    rows = []
    for path, layer in candidate_layers(model).items():
        k = np.asarray(layer.kernel[...], np.float32)
        if isinstance(layer, nnx.Linear):
            rows.append(dict(layer=path, kernel=k.reshape(1, 1, *k.shape), geom=dict(
                input_hw=(1, 1), strides=(1, 1), padding="VALID", dilation=(1, 1))))
            continue
        if layer.feature_group_count != 1:
            continue  # a depthwise/grouped conv is already factorized
        hw = tuple(int(s) for s in shapes[path][1:3])
        rows.append(dict(layer=path, kernel=k, geom=dict(
            input_hw=hw, strides=pair(layer.strides or 1, "strides"), padding=layer.padding,
            dilation=pair(layer.kernel_dilation or 1, "kernel_dilation"))))
    return rows


def load_network(out: Path, args):
    """(model, source name, image shape, test accuracy) from ``--checkpoint`` or the cache."""
    from factorize.training import restore

    if args.checkpoint:
        ckpt, source = Path(args.checkpoint), str(Path(args.checkpoint).resolve())
    else:
        ckpt, source = _train_baseline(out, args)
    # orbax wants absolute paths (restore() does not make them so)
    model, meta = restore(Path(ckpt).resolve(), return_meta=True)
    image_shape = meta["metadata"].get("image_shape")
    if image_shape is None:
        raise SystemExit(f"{ckpt}: checkpoint metadata has no image_shape; cannot trace inputs")
    return model, source, tuple(image_shape), meta["metadata"].get("test_accuracy")


# ---------------------------------------------------------------------------------------------
# records -> tables and figures


def _key(r: dict[str, Any]) -> tuple:
    return (r["type"], r["source"], r["layer"], r["kind"], r.get("family"), str(r.get("rank")))


def compare(points: list[dict], a: str, b: str, by: str,
            budgets: Sequence[float] = BUDGETS) -> list[dict[str, Any]]:
    """Per budget, each family's best point with ``by`` ≤ budget and which has the lower error."""
    rows = []
    for budget in budgets:
        best = {}
        for fam in (a, b):
            ok = [p for p in points if p["family"] == fam and p[by] <= budget + 1e-12]
            best[fam] = min(ok, key=lambda p: p["rel_error"]) if ok else None
        pa, pb = best[a], best[b]
        if pa is None or pb is None:
            winner = "n/a"
        elif abs(pa["rel_error"] - pb["rel_error"]) <= 1e-6:
            winner = "tie"
        else:
            winner = a if pa["rel_error"] < pb["rel_error"] else b
        rows.append({"budget": budget, a: pa, b: pb, "better": winner})
    return rows


def verdict(rows: list[dict[str, Any]], a: str = "dsc", b: str = "bsconv") -> str:
    """One line from the comparison rows: who wins more budgets, and the mean error ratio."""
    decided = [r for r in rows if r["better"] != "n/a"]
    if not decided:
        return "no budget where both families fit"
    wa = sum(r["better"] == a for r in decided)
    wb = sum(r["better"] == b for r in decided)
    ratio = float(np.exp(np.mean([
        np.log(max(r[b]["rel_error"], 1e-12) / max(r[a]["rel_error"], 1e-12)) for r in decided])))
    if wa == wb:
        who = "neither (tie)"
    else:
        who = f"{a} (depthwise-first)" if wa > wb else f"{b} (pointwise-first)"
    return (f"{who} is closer: lower error at {max(wa, wb)}/{len(decided)} budgets "
            f"({a} {wa}, {b} {wb}); geometric-mean error ratio {b}/{a} = {ratio:.3f}")


def _fmt_point(p: dict | None, by: str) -> str:
    if p is None:
        return "— | — | —"
    return f"{p['rank']} | {p[by]:.3f} | {p['rel_error']:.4f}"


def render(out: Path) -> None:
    """Rebuilds the CSV, markdown and figures from the JSON lines (the latest source only)."""
    from factorize._io import atomic_write_text, read_jsonl

    records = read_jsonl(out / JSONL)
    runs = [r for r in records if r["type"] == "run"]
    if not runs:
        raise SystemExit(f"{out / JSONL}: no records to render")
    run = runs[-1]
    src = run["source"]
    layers = [r for r in records if r["type"] == "layer" and r["source"] == src]
    points = [r for r in records if r["type"] == "point" and r["source"] == src]
    order = list(dict.fromkeys(r["layer"] for r in layers))

    # CSV: one row per curve point.
    cols = ["layer", "kind", "shape", "input_hw", "strides", "family", "rank", "macs",
            "full_macs", "mac_fraction", "param_fraction", "rel_error", "energy", "energy_svd"]
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(cols)
    for p in sorted(points, key=lambda p: (order.index(p["layer"]), p["kind"], p["family"],
                                           p["mac_fraction"])):
        wr.writerow(["x".join(map(str, p[c])) if c in ("shape", "input_hw", "strides")
                     else ("" if p.get(c) is None else p[c]) for c in cols])
    atomic_write_text(out / CSV, buf.getvalue())

    md = [f"# Separability of trained convs\n\nSource: `{src}`"
          + (f" (test accuracy {run['test_accuracy']:.4f})" if run.get("test_accuracy") else "")
          + f"; seed {run['seed']}. Control: an i.i.d. Gaussian kernel of the same shape.\n"]
    md.append("## Effective and stable rank of the unfoldings\n")
    md.append("Per-slice unfoldings: mean over slices. Effective rank: Roy & Vetterli 2007; "
              "stable rank: ‖W‖_F²/‖W‖_2². Both ≤ min dim.\n")
    md.append("| layer | kernel | input | unfolding | min dim | eff. rank trained | eff. rank "
              "random | stable rank trained | stable rank random |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    by_layer = {(r["layer"], r["kind"]): r for r in layers}
    for name in order:
        t, rnd = by_layer.get((name, "trained")), by_layer.get((name, "random"))
        if t is None:
            continue
        for u in (u for u in UNFOLDING_LABELS if u in t["unfoldings"]):
            st, sr = t["unfoldings"][u], rnd["unfoldings"][u] if rnd else None
            md.append(
                f"| {name} | {'×'.join(map(str, t['shape']))} | "
                f"{'×'.join(map(str, t['input_hw']))}/{t['strides'][0]} | "
                f"{UNFOLDING_LABELS[u]} | {st['min_dim']} | {st['effective_rank']:.2f} | "
                f"{sr['effective_rank'] if sr else float('nan'):.2f} | "
                f"{st['stable_rank']:.2f} | {sr['stable_rank'] if sr else float('nan'):.2f} |")

    md.append("\n## Energy kept at ≈ 1/4 of the MACs\n")
    md.append("Energy = 1 − rel_error² of each family's projection at its largest rank with MAC "
              "fraction ≤ 1/4 (at the layer's input size).\n")
    fams = _family_order(points)
    md.append("| layer | kind | " + " | ".join(fams) + " |")
    md.append("|---|---|" + "---|" * len(fams))
    for name in order:
        for kind in ("trained", "random"):
            cells = []
            for fam in fams:
                ok = [p for p in points if p["layer"] == name and p["kind"] == kind
                      and p["family"] == fam and p["mac_fraction"] <= 0.25 + 1e-12]
                cells.append(f"{max(p['energy'] for p in ok):.3f}" if ok else "—")
            md.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")

    md.append("\n## BSConv's question: depthwise-first (dsc) or pointwise-first (bsconv)?\n")
    md.append("For each budget, each family's largest rank within it; lower relative error wins. "
              "By MACs at the layer's real input size (a 1×1 stage before a strided spatial "
              "stage runs at the input resolution, docs/design.md), and by parameters (= MACs at "
              "stride 1, SAME).\n")
    summary: dict[tuple[str, str], list[dict]] = {}
    for by, title in (("mac_fraction", "MAC fraction"), ("param_fraction", "parameter fraction")):
        for name in order:
            kh, kw = by_layer[(name, "trained")]["shape"][:2]
            if kh * kw == 1:
                continue
            for kind in ("trained", "random"):
                pts = [p for p in points if p["layer"] == name and p["kind"] == kind]
                rows = compare(pts, "dsc", "bsconv", by)
                summary.setdefault((by, kind), []).extend(rows)
                if kind == "random" and by == "param_fraction":
                    continue
                md.append(f"**{name}** ({kind}, by {title}): {verdict(rows)}\n")
                md.append(f"| budget | dsc rank | dsc {title} | dsc error | bsconv rank | "
                          f"bsconv {title} | bsconv error | better |")
                md.append("|---|---|---|---|---|---|---|---|")
                for r in rows:
                    md.append(f"| ≤ {r['budget']:.3f} | {_fmt_point(r['dsc'], by)} | "
                              f"{_fmt_point(r['bsconv'], by)} | {r['better']} |")
                md.append("")
    md.append("### Verdict (all k×k layers)\n")
    for (by, kind), rows in summary.items():
        md.append(f"- {kind}, by {by.replace('_', ' ')}: {verdict(rows)}")
    md.append("")
    atomic_write_text(out / MD, "\n".join(md))
    _plots(out, layers, points, order)


def _family_order(points: list[dict]) -> list[str]:
    present = {p["family"] for p in points}
    return [f for f in SVD_FAMILIES + TENSOR_FAMILIES if f in present]


def _plots(out: Path, layers: list[dict], points: list[dict], order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; set here, never when the library is imported
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.25, not 2.5×10⁻¹
    n = len(order)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    colors = {u: f"C{i}" for i, u in enumerate(UNFOLDING_LABELS)}
    by_layer = {(r["layer"], r["kind"]): r for r in layers}

    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, order, strict=False):
        t = by_layer[(name, "trained")]
        for kind, style in (("trained", "-"), ("random", "--")):
            rec = by_layer.get((name, kind))
            if rec is None:
                continue
            for u in (u for u in UNFOLDING_LABELS if u in rec["unfoldings"]):
                s = np.asarray(rec["unfoldings"][u]["singular_values"])
                s = s[s[:, 0] > 0]
                curve = (s / s[:, :1]).mean(axis=0)  # mean over slices of σ_i / σ_1
                ax.plot(np.arange(1, len(curve) + 1), curve, style, color=colors[u],
                        marker="o" if len(curve) <= 12 else None, ms=3,
                        label=f"{UNFOLDING_LABELS[u]}" if kind == "trained" else None)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_title(f"{name} {'×'.join(map(str, t['shape']))} (solid trained, dashed random)",
                     fontsize=9)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("singular value index i (log)")
        ax.set_ylabel("σ_i / σ_1 (mean over slices)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "spectra.png", dpi=110)
    plt.close(fig)

    fams = _family_order(points)
    fcol = {f: f"C{i}" for i, f in enumerate(fams)}
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, order, strict=False):
        for fam in fams:
            for kind, style in (("trained", "-o"), ("random", "--x")):
                pts = sorted((p for p in points if p["layer"] == name and p["kind"] == kind
                              and p["family"] == fam), key=lambda p: p["mac_fraction"])
                if pts:
                    ax.plot([p["mac_fraction"] for p in pts], [p["energy"] for p in pts], style,
                            color=fcol[fam], ms=3, lw=1.4 if kind == "trained" else 0.9,
                            alpha=1.0 if kind == "trained" else 0.6,
                            label=fam if kind == "trained" else None)
        t = by_layer[(name, "trained")]
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name} {'×'.join(map(str, t['shape']))}, input "
                     f"{'×'.join(map(str, t['input_hw']))}, stride {t['strides'][0]} "
                     "(dashed: random)", fontsize=9)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("MAC fraction of the full conv (log)")
        ax.set_ylabel("energy kept, 1 − rel. error²")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "energy_vs_macs.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# driver


def run(out: Path, args) -> None:
    from tqdm.auto import tqdm

    from factorize._io import append_jsonl, read_jsonl

    model, source, image_shape, acc = load_network(out, args)
    path = out / JSONL
    done = {_key(r) for r in read_jsonl(path)}
    append_jsonl(path, {"type": "run", "source": source, "layer": None, "kind": None,
                        "seed": args.seed, "quick": args.quick, "test_accuracy": acc,
                        "image_shape": list(image_shape), "families": args.families})
    families = list(args.families)
    work = []
    for i, row in enumerate(layer_table(model, image_shape)):
        w = row["kernel"]
        rnd = np.random.default_rng([args.seed, i]).standard_normal(w.shape).astype(np.float32)
        for kind, kernel in (("trained", w), ("random", rnd)):
            work.append((row, kind, kernel))
    jobs = []
    for row, kind, kernel in work:
        shape = tuple(kernel.shape)
        for fam in _families_for(shape, families):
            svd = fam in SVD_FAMILIES
            for rank in select_ranks(fam, shape, row["geom"], 1.0 if svd else args.tensor_max,
                                     args.points if svd else args.tensor_points, by_params=svd):
                jobs.append((row, kind, kernel, fam, rank))

    base = {"source": source}
    for row, kind, kernel in work:
        rec = {**base, "type": "layer", "layer": row["layer"], "kind": kind}
        if _key(rec) in done:
            continue
        rec.update(shape=list(kernel.shape), input_hw=list(row["geom"]["input_hw"]),
                   strides=list(row["geom"]["strides"]),
                   unfoldings={u: spectrum_stats(m) for u, m in unfoldings(kernel).items()})
        append_jsonl(path, rec)
        done.add(_key(rec))
    spectra = {(r["layer"], r["kind"]): r for r in read_jsonl(path)
               if r["type"] == "layer" and r["source"] == source}

    def point_key(job) -> tuple:
        row, kind, _, fam, rank = job
        return _key({**base, "type": "point", "layer": row["layer"], "kind": kind,
                     "family": fam, "rank": _rank_json(rank)})

    todo = [j for j in jobs if point_key(j) not in done]
    cp_opts = {"n_iter": args.cp_iters, "seed": args.seed}
    for row, kind, kernel, fam, rank in tqdm(todo, desc="projections", unit="proj"):
        p = curve_point(kernel, fam, rank, row["geom"], cp_opts)
        unf = FAMILY_UNFOLDING.get(fam)
        sv = spectra[(row["layer"], kind)]["unfoldings"]
        if kernel.shape[0] * kernel.shape[1] == 1:
            unf = "matrix"
        ey = eckart_young_energy(sv[unf]["singular_values"], rank) if unf in sv and isinstance(
            rank, int) else None
        append_jsonl(path, {**base, "type": "point", "layer": row["layer"], "kind": kind,
                            "shape": list(kernel.shape), "input_hw": list(row["geom"]["input_hw"]),
                            "strides": list(row["geom"]["strides"]), "energy_svd": ey, **p})
    render(out)


def _rank_json(rank: Any) -> Any:
    return list(rank) if isinstance(rank, tuple) else rank


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/separability"),
                   help="results directory (default: %(default)s)")
    p.add_argument("--checkpoint", help="analyse this checkpoint instead of the digits CNN")
    p.add_argument("--dataset", default="digits", help="dataset of the default CNN")
    p.add_argument("--epochs", type=int, help="epochs of the default CNN (default: its config)")
    p.add_argument("--seed", type=int, default=0, help="training, control kernels and CP seed")
    p.add_argument("--families", nargs="+", default=list(SVD_FAMILIES + TENSOR_FAMILIES))
    p.add_argument("--points", type=int, default=10,
                   help="max ranks per SVD-family curve (all ranks up to MAC fraction 1)")
    p.add_argument("--tensor-points", type=int, default=3,
                   help="max ranks per tucker2/cp curve (CP-ALS is slow)")
    p.add_argument("--tensor-max", type=float, default=0.5,
                   help="largest MAC fraction for tucker2/cp curves")
    p.add_argument("--cp-iters", type=int, default=50, help="CP-ALS sweeps")
    p.add_argument("--quick", action="store_true", help="tiny CNN, few points (tests)")
    p.add_argument("--rebuild", action="store_true",
                   help="only re-render CSV/MD/PNG from the JSON lines")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rebuild:
        render(args.out)
        return
    if args.quick:
        # Each new (shape, rank) compiles a projection: keep the count small.
        args.families = [f for f in args.families if f in ("dsc", "bsconv", "lowrank_in")]
        args.points = 2
    run(args.out, args)
    print(f"wrote {args.out / MD}")
    print((args.out / MD).read_text().split("### Verdict (all k×k layers)")[-1].strip())


if __name__ == "__main__":
    main()
