"""The cost model: MACs of factorized convs, and how far MACs are from measured CPU time.

Three parts, all computed by the library (``conv_macs``, ``Factorized.macs``):

1. The seed's example: a 6×6×3 input, five 3×3×3 filters, VALID: full conv 27·16·5 = 2160 MACs,
   depthwise-separable 432 + 240 = 672 (docs/design.md), printed with the arithmetic.
2. MobileNet's ratio (Howard et al. 2017, §3.1): dsc / full = 1/N + 1/k² at SAME, stride 1,
   against N for k = 3, 5, 7 — the library's count next to the formula
   (``cost_model_mobilenet.png``).
3. FLOPs are not time: per family, the MAC reduction of a layer against its measured CPU
   speed-up (forward and training step) — ``cost_model_speed.png``, diagonal = perfect
   efficiency.
   The timing is ``experiments/bench_latency.py``'s (imported, not rewritten): the dense baseline
   at its fastest XLA flag setting, each setting in its own subprocess.

Commands (2 shared CPU cores):
  python3 experiments/cost_model.py --out results/cost_model    # C=128, 32×32, b 32: ≈ 10 min
  python3 experiments/cost_model.py --from-json results/latency.json --out DIR   # ≈ 10 s
  python3 experiments/cost_model.py --quick --out /tmp/cost     # tests, ≈ 20 s
  python3 experiments/cost_model.py --rebuild --out results/cost_model    # re-render only

``--from-json`` reads ``bench_latency.py --json`` output (its layer rows).

Outputs in ``--out``: ``cost_model.jsonl`` (append-only; the rest is rebuilt from it),
``cost_model.csv`` (the speed rows), ``cost_model.md``, ``cost_model_mobilenet.png``,
``cost_model_speed.png``. A rerun into the same directory does not re-measure what is recorded.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

JSONL, CSV, MD = "cost_model.jsonl", "cost_model.csv", "cost_model.md"
NS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
KS = (3, 5, 7)
FAMILY_ORDER = ("dsc", "bsconv", "spatial", "lowrank_in", "lowrank_out", "tucker2", "cp3", "cp4")


def bench_latency():
    """``experiments/bench_latency.py`` as a module (experiments/ is not a package)."""
    if "bench_latency" in sys.modules:
        return sys.modules["bench_latency"]
    path = Path(__file__).resolve().parent / "bench_latency.py"
    spec = importlib.util.spec_from_file_location("bench_latency", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_latency"] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# 1. the seed's example


def seed_example() -> dict[str, Any]:
    """MACs of the seed's full conv and its depthwise-separable version, stage by stage."""
    import jax

    import factorize
    from factorize.chain import chain_macs

    shape, hw, pad = (3, 3, 3, 5), 6, "VALID"
    full, (oh, ow) = factorize.conv_macs(shape, hw, padding=pad, return_output_hw=True)
    f = factorize.random_factorized(jax.random.key(0), shape, "dsc", 1)
    total = f.macs(hw, padding=pad)
    depthwise = chain_macs(f.stages[:1], hw, padding=pad)
    return {
        "type": "seed", "kernel": list(shape), "input_hw": hw, "padding": pad,
        "output_hw": [oh, ow], "full": full, "depthwise": depthwise,
        "pointwise": total - depthwise, "dsc": total, "ratio": total / full,
    }


def seed_text(r: dict[str, Any]) -> str:
    kh, kw, c, n = r["kernel"]
    pos = r["output_hw"][0] * r["output_hw"][1]
    return "\n".join([
        f"Input {r['input_hw']}×{r['input_hw']}×{c}, {n} filters {kh}×{kw}×{c}, "
        f"{r['padding']}: output {r['output_hw'][0]}×{r['output_hw'][1]}×{n}.",
        f"- full conv: ({kh}·{kw}·{c} = {kh * kw * c} taps) · ({pos} positions) · ({n} filters) "
        f"= {r['full']} MACs",
        f"- depthwise {kh}×{kw}: {kh * kw} taps · {pos} positions · {c} channels = "
        f"{r['depthwise']} MACs",
        f"- pointwise 1×1: {c} in · {pos} positions · {n} out = {r['pointwise']} MACs",
        f"- depthwise-separable total: {r['depthwise']} + {r['pointwise']} = {r['dsc']} MACs "
        f"= {r['ratio']:.3f} of the full conv ({r['full'] / r['dsc']:.2f}× fewer)",
    ])


# ---------------------------------------------------------------------------------------------
# 2. MobileNet's 1/N + 1/k²


def mobilenet_ratio(k: int, n: int, c: int = 32, hw: int = 14) -> float:
    """dsc (multiplier 1) MACs over the full conv's, counted by the library (SAME, stride 1)."""
    import factorize
    from factorize.chain import chain_macs

    # Factorized.macs is chain_macs on the family's chain; the chain alone needs no arrays.
    stages = factorize.get_family("dsc").chain((k, k, c, n), 1)
    return chain_macs(stages, hw) / factorize.conv_macs((k, k, c, n), hw)


def mobilenet_rows() -> list[dict[str, Any]]:
    return [{"type": "mobilenet", "k": k, "n": n, "library": mobilenet_ratio(k, n),
             "formula": 1 / n + 1 / k**2} for k in KS for n in NS]


# ---------------------------------------------------------------------------------------------
# 3. MACs against measured time


def measure(args) -> tuple[str, list[dict[str, Any]]]:
    """(source tag, bench_latency's merged rows) from a JSON file, a quick in-process run, or
    bench_latency's per-XLA-flag subprocesses."""
    bl = bench_latency()
    if args.from_json:
        src = Path(args.from_json).resolve()
        return f"json:{src}", json.loads(src.read_text())
    if args.quick:  # in-process, current XLA flags only: a smoke run of the same code
        raw = bl.layer_group(16, 8, 4, 2, args.families, (1 / 4,), "auto")
        return "quick:C16-hw8-b4", bl.merge({"current": raw}, models=False)
    argv = ["--channels", str(args.channels), "--hw", str(args.hw), "--batch", str(args.batch),
            "--repeats", str(args.repeats), "--families", *args.families]
    per_config = {c: bl.run_config(c, argv) for c in bl.CONFIGS}
    return f"measured:C{args.channels}-hw{args.hw}-b{args.batch}", bl.merge(per_config, False)


SPEED_COLS = ["family", "rank", "channels", "hw", "batch", "target", "mac_ratio", "mac_reduction",
              "fwd_speedup", "train_speedup", "fwd_efficiency", "train_efficiency",
              "flops_overstate_fwd", "full_fwd_s", "fact_fwd_s", "full_train_s", "fact_train_s"]


def speed_record(source: str, r: dict[str, Any]) -> dict[str, Any]:
    """A bench_latency row with the derived columns: efficiency = speed-up / MAC reduction."""
    red = 1 / r["mac_ratio"]
    rec = {"type": "speed", "source": source, **{k: r[k] for k in SPEED_COLS if k in r}}
    rec["rank"] = str(r["rank"])
    rec.update(mac_reduction=red, fwd_efficiency=r["fwd_speedup"] / red,
               train_efficiency=r["train_speedup"] / red,
               flops_overstate_fwd=red / r["fwd_speedup"])
    return rec


# ---------------------------------------------------------------------------------------------
# rendering


def render(out: Path) -> None:
    """CSV, markdown and figures from the JSON lines alone (speed rows: the latest source)."""
    from factorize._io import atomic_write_text, read_jsonl

    recs = read_jsonl(out / JSONL)
    seed = next((r for r in reversed(recs) if r["type"] == "seed"), None)
    mob = {(r["k"], r["n"]): r for r in recs if r["type"] == "mobilenet"}
    # Speed rows of the latest run's source (several sources may share the directory).
    runs = [r["speed_source"] for r in recs if r["type"] == "run"]
    srcs = runs or [r["source"] for r in recs if r["type"] == "speed"]
    speed = [r for r in recs if r["type"] == "speed" and srcs and r["source"] == srcs[-1]]
    speed.sort(key=lambda r: (-r["target"], FAMILY_ORDER.index(r["family"])
                              if r["family"] in FAMILY_ORDER else 99))

    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(SPEED_COLS)
    for r in speed:
        wr.writerow([r.get(c, "") for c in SPEED_COLS])
    atomic_write_text(out / CSV, buf.getvalue())

    md = ["# Cost model: MACs, and MACs against measured time\n",
          "MAC = one multiply-accumulate (FLOPs = 2 × MACs); conventional count, padding taps "
          "included (docs/design.md).\n"]
    if seed:
        md += ["## The seed's example\n", seed_text(seed), ""]
    if mob:
        md += ["## MobileNet's ratio dsc / full = 1/N + 1/k² (SAME, stride 1)\n",
               "| k | " + " | ".join(f"N={n}" for n in NS) + " | max abs. diff. vs formula |",
               "|---|" + "---|" * (len(NS) + 1)]
        for k in KS:
            rows = [mob[(k, n)] for n in NS if (k, n) in mob]
            diff = max(abs(r["library"] - r["formula"]) for r in rows)
            md.append(f"| {k} | " + " | ".join(f"{r['library']:.4f}" for r in rows)
                      + f" | {diff:.1e} |")
        if (3, 512) in mob:
            r = mob[(3, 512)]
            md.append(f"\n3×3, N = 512: {r['library']:.4f} ({1 / r['library']:.1f}× fewer MACs).")
        md.append("")
    if speed:
        s0 = speed[0]
        md += [f"## MAC reduction against measured CPU speed-up ({s0['source']})\n",
               f"One 3×3 layer, C = N = {s0['channels']}, {s0['hw']}×{s0['hw']}, batch "
               f"{s0['batch']}, float32, CPU; jit-compiled, medians of interleaved repeats "
               "(experiments/bench_latency.py). Speed-up = fastest full-conv time over "
               + ("the XLA flag settings" if not s0["source"].startswith("quick") else
                  "the current XLA flags (quick mode)")
               + " / fastest factorized time. Efficiency = speed-up / MAC reduction "
               "(1 = time falls as fast as MACs). 'MACs overstate' = MAC reduction / forward "
               "speed-up.\n",
               "| family | rank | target | MAC ratio | MAC reduction × | fwd speed-up × | "
               "train speed-up × | fwd efficiency | train efficiency | MACs overstate fwd by × |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in speed:
            md.append(f"| {r['family']} | {r['rank']} | 1/{round(1 / r['target'])} | "
                      f"{r['mac_ratio']:.3f} | {r['mac_reduction']:.2f} | "
                      f"{r['fwd_speedup']:.2f} | {r['train_speedup']:.2f} | "
                      f"{r['fwd_efficiency']:.2f} | {r['train_efficiency']:.2f} | "
                      f"{r['flops_overstate_fwd']:.2f} |")
        eff = sorted(r["fwd_efficiency"] for r in speed)
        slower = [r["family"] for r in speed if r["fwd_speedup"] < 1]
        md.append(f"\nForward efficiency ranges {eff[0]:.2f}–{eff[-1]:.2f} (median "
                  f"{eff[len(eff) // 2]:.2f}): a MAC reduction of R× bought a speed-up of "
                  f"{eff[0]:.2f}·R–{eff[-1]:.2f}·R×."
                  + (f" Slower than the full conv despite fewer MACs: {', '.join(slower)}."
                     if slower else ""))
        md.append("")
    atomic_write_text(out / MD, "\n".join(md))
    _plots(out, mob, speed)


def _plots(out: Path, mob: dict, speed: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; set in the script, not when the library is imported
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.25 and 8, not 2⁻² and 2³
    if mob:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i, k in enumerate(KS):
            ns = [n for n in NS if (k, n) in mob]
            ax.plot(ns, [mob[(k, n)]["library"] for n in ns], "o", color=f"C{i}",
                    label=f"k={k}: library (conv_macs, chain MACs)")
            ax.plot(ns, [mob[(k, n)]["formula"] for n in ns], "-", color=f"C{i}", lw=1,
                    label=f"k={k}: 1/N + 1/k²")
            ax.axhline(1 / k**2, color=f"C{i}", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("output channels N")
        ax.set_ylabel("MACs of dsc / MACs of full conv")
        ax.set_title("MobileNet's cost ratio (dotted: asymptote 1/k²)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "cost_model_mobilenet.png", dpi=110)
        plt.close(fig)

    if speed:
        fig, ax = plt.subplots(figsize=(6.5, 5))
        fams = [f for f in FAMILY_ORDER if any(r["family"] == f for r in speed)]
        handles = []
        for i, fam in enumerate(fams):
            rs = [r for r in speed if r["family"] == fam]
            ax.plot([r["mac_reduction"] for r in rs], [r["fwd_speedup"] for r in rs], "o",
                    color=f"C{i}")
            ax.plot([r["mac_reduction"] for r in rs], [r["train_speedup"] for r in rs], "^",
                    color=f"C{i}", mfc="none")
            handles.append(Line2D([], [], color=f"C{i}", marker="s", ls="", label=fam))
        handles += [Line2D([], [], color="k", marker="o", ls="", label="forward"),
                    Line2D([], [], color="k", marker="^", mfc="none", ls="", label="train step")]
        vals = [r[k] for r in speed for k in ("fwd_speedup", "train_speedup", "mac_reduction")]
        lo, hi = min(1.0, *vals) / 1.2, max(vals) * 1.3
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        handles.append(Line2D([], [], color="k", ls="--", label="speed-up = MAC reduction"))
        ax.axhline(1, color="gray", lw=0.8, ls=":")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel("MAC reduction (full MACs / factorized MACs)")
        ax.set_ylabel("measured CPU speed-up (full time / factorized time)")
        s0 = speed[0]
        ax.set_title(f"FLOPs are not time: 3×3, C={s0['channels']}, {s0['hw']}×{s0['hw']}, "
                     f"batch {s0['batch']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(handles=handles, fontsize=7, ncol=2, loc="upper left")
        fig.tight_layout()
        fig.savefig(out / "cost_model_speed.png", dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# driver


def run(out: Path, args) -> None:
    from factorize._io import append_jsonl, read_jsonl

    path = out / JSONL
    recs = read_jsonl(path)
    if not any(r["type"] == "seed" for r in recs):
        append_jsonl(path, seed_example())
    have = {(r["k"], r["n"]) for r in recs if r["type"] == "mobilenet"}
    for r in mobilenet_rows():
        if (r["k"], r["n"]) not in have:
            append_jsonl(path, r)
    if not args.no_speed:
        sources = {r["source"] for r in recs if r["type"] == "speed"}
        want = ("quick:C16-hw8-b4" if args.quick else
                f"json:{Path(args.from_json).resolve()}" if args.from_json else
                f"measured:C{args.channels}-hw{args.hw}-b{args.batch}")
        if want in sources:  # measured already: a rerun only re-renders
            print(f"speed rows for {want} already recorded; not re-measuring", file=sys.stderr)
        else:
            source, rows = measure(args)
            for r in rows:
                append_jsonl(path, speed_record(source, r))
        append_jsonl(path, {"type": "run", "speed_source": want, "seed": args.seed})
    render(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/cost_model"),
                   help="results directory (default: %(default)s)")
    p.add_argument("--from-json", help="read bench_latency.py --json output instead of measuring")
    p.add_argument("--channels", type=int, default=128, help="C = N of the timed 3×3 layer")
    p.add_argument("--hw", type=int, default=32, help="input height = width")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (medians)")
    p.add_argument("--families", nargs="+", default=list(FAMILY_ORDER))
    p.add_argument("--seed", type=int, default=0,
                   help="seed (the MAC counts are exact; timing inputs are bench_latency's)")
    p.add_argument("--no-speed", action="store_true", help="MAC parts only, no timing")
    p.add_argument("--quick", action="store_true", help="tiny timing run in-process (tests)")
    p.add_argument("--rebuild", action="store_true",
                   help="only re-render CSV/MD/PNG from the JSON lines")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.families = [f for f in args.families if f == "dsc"]
    if not args.rebuild:
        run(args.out, args)
    render(args.out)
    print((args.out / MD).read_text())


if __name__ == "__main__":
    main()
