"""Latency of factorized convs vs the full conv they replace, per layer and for whole models.

Layer level: every family at the rank whose MAC ratio is closest to (at or below) 1/4 and 1/8 of
the full 3×3 conv, C ∈ {64, 128, 256}, 32×32 and 16×16, batch 32. Jit-compiled forward and
training step (gradient w.r.t. factors and input) of the factorized layer and of the full conv,
timed interleaved in one process (medians of repeats).

Model level (``--models``): images/s, inference and training (SGD step), full vs factorized, for
``factorize.models``' CNN and a MobileNet-style stack (MobileNet v1's channel plan where every
block is one 3×3 conv through the conv factory: full = VGG-style, ``dsc`` rank 1 = MobileNet).

Environments (``CONFIGS``), each measured in its own subprocess (XLA_FLAGS and GLIBC_TUNABLES are
read once per process): ``default``; ``ynn_off``, the one XLA flag that matters on CPU
(``--xla_cpu_experimental_ynn_fusion_type=``, YNNPACK fusion off); ``ynn_off_thp``, that plus
glibc's malloc on transparent huge pages. By default the script first times the dense conv
alone under every environment on two shapes (``PROBE_SHAPES``) and then measures every row once,
in the environment where the dense conv was fastest: the baseline gets its best setting.
``--all-configs`` (or ``--configs``) measures every row in each environment instead; speed-ups
then divide the *fastest* full-conv time over the environments by the fastest factorized time,
and the worst per-environment (same-process) speed-ups (``*_same``) are in the JSON too.

The layer run ends with its summary: the rows at ≤ 1/4 of the MACs that are slower than the
dense conv (forward, training step) and the lowest efficiency (speed-up × MAC ratio) of dsc and
cp3 at C = 256, 32×32.

Commands (2 CPU cores; docs/benchmarks.md shows their output):
  python3 experiments/bench_latency.py --json results/benchmarks/latency_default_run.json  # ≈ 5 min
  python3 experiments/bench_latency.py --all-configs --repeats 5 \
      --json results/benchmarks/latency.json                 # three environments: ≈ 15 min
  python3 experiments/bench_latency.py --models --all-configs --repeats 5 \
      --json results/benchmarks/latency_models.json          # ≈ 8 min
  python3 experiments/bench_latency.py --quick               # ≈ 1 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Environment of each measuring subprocess. XLA_FLAGS is read once per process; so is
# GLIBC_TUNABLES. ``glibc.malloc.hugetlb=1`` makes glibc's malloc back its blocks with
# transparent huge pages (madvise; needs THP in "madvise" or "always" mode): XLA:CPU's output
# and scratch buffers over 32 MiB are otherwise fresh mmaps, first-touched 4 KiB page by page
# on every call (8192 page faults, ≈ 10 ms on this VM, for a 32 MiB output).
_YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
CONFIGS = {
    "default": {"XLA_FLAGS": ""},
    "ynn_off": {"XLA_FLAGS": _YNN_OFF},
    "ynn_off_thp": {"XLA_FLAGS": _YNN_OFF, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}
FAMILIES = ("dsc", "bsconv", "spatial", "lowrank_in", "lowrank_out", "tucker2", "cp3", "cp4")
TARGETS = (1 / 4, 1 / 8)
# (C, hw) of the dense convs timed under every environment to pick the one to measure in.
PROBE_SHAPES = ((128, 32), (256, 16))


# ---------------------------------------------------------------------------------------------
# timing


def median_times(fns: dict[str, Callable[[], Any]], repeats: int, min_time: float = 0.05):
    """Median seconds per call of each thunk, run interleaved (round-robin) so that machine
    noise hits all of them alike. Each measurement loops enough calls to last ``min_time``."""
    import jax

    loops = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn())  # warm-up (compiled already; first-run allocations)
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        dt = time.perf_counter() - t0
        loops[name] = max(1, math.ceil(min_time / max(dt, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(loops[name]):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / loops[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def compiled(fn: Callable, *args, impl: str = "auto") -> Callable[[], Any]:
    """``fn`` jitted and compiled (traced under conv implementation ``impl``), as a thunk."""
    import jax

    from factorize import ops

    with ops.implementation(impl):
        exe = jax.jit(fn).lower(*args).compile()
    return lambda: exe(*args)


# ---------------------------------------------------------------------------------------------
# layer level


def pick_rank(family: str, shape: tuple[int, int, int, int], hw: int, target: float):
    """The family's largest rank within ``target`` of the full conv's MACs at ``hw`` (the
    smallest rank if even that costs more), and its MAC ratio."""
    import factorize
    from factorize.chain import chain_macs
    from factorize.costs import conv_macs
    from factorize.families import rank_for_fraction

    fam = factorize.get_family(family)
    try:
        rank = rank_for_fraction(fam, shape, target, input_hw=hw)
    except ValueError:  # even the smallest rank is above the target: report it anyway
        rank = fam.rank_path(shape)[0]
    return rank, chain_macs(fam.chain(shape, rank), hw) / conv_macs(shape, hw)


def _layer_inputs(channels: int, hw: int, batch: int):
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (batch, hw, hw, channels), jnp.float32)
    ct = jax.random.normal(jax.random.key(1), (batch, hw, hw, channels), jnp.float32)
    return x, ct


def _fwd(value, x):
    return value(x)


def _train(value, x, ct):
    import jax
    import jax.numpy as jnp

    return jax.grad(lambda v, x: jnp.vdot(v(x), ct), argnums=(0, 1))(value, x)


def dense_probe(shapes, batch: int, repeats: int, impl: str) -> list[dict]:
    """The full 3×3 conv's forward and training-step times at each ``(C, hw)`` of ``shapes``."""
    import jax

    import factorize

    thunks = {}
    for channels, hw in shapes:
        value = factorize.random_factorized(jax.random.key(0), (3, 3, channels, channels), "full")
        x, ct = _layer_inputs(channels, hw, batch)
        thunks[("fwd", channels, hw)] = compiled(_fwd, value, x, impl=impl)
        thunks[("train", channels, hw)] = compiled(_train, value, x, ct, impl=impl)
    times = median_times(thunks, repeats)
    return [{"channels": c, "hw": hw, "batch": batch, "full_fwd_s": times[("fwd", c, hw)],
             "full_train_s": times[("train", c, hw)]} for c, hw in shapes]


def fastest_config(probe: dict[str, list[dict]]) -> str:
    """The environment whose dense-conv times, forward plus training step summed over the probe
    shapes, are lowest."""
    return min(probe, key=lambda c: sum(r["full_fwd_s"] + r["full_train_s"] for r in probe[c]))


def layer_group(channels: int, hw: int, batch: int, repeats: int, families, targets, impl):
    """Rows for one (C, hw): all families and targets timed interleaved with the full conv."""
    import jax

    import factorize

    shape = (3, 3, channels, channels)
    key = jax.random.key(0)
    x, ct = _layer_inputs(channels, hw, batch)
    entries = {"full": factorize.random_factorized(key, shape, "full")}
    meta = {}
    for fam in families:
        for target in targets:
            rank, ratio = pick_rank(fam, shape, hw, target)
            name = f"{fam}@{target:.3f}"
            entries[name] = factorize.random_factorized(key, shape, fam, rank)
            meta[name] = (fam, rank, target, ratio)
    thunks = {}
    for name, value in entries.items():
        thunks[("fwd", name)] = compiled(_fwd, value, x, impl=impl)
        thunks[("train", name)] = compiled(_train, value, x, ct, impl=impl)
    times = median_times(thunks, repeats)
    rows = []
    for name, (fam, rank, target, ratio) in meta.items():
        rows.append({
            "family": fam, "rank": rank, "channels": channels, "hw": hw, "batch": batch,
            "target": target, "mac_ratio": ratio,
            "full_fwd_s": times[("fwd", "full")], "fact_fwd_s": times[("fwd", name)],
            "full_train_s": times[("train", "full")], "fact_train_s": times[("train", name)],
        })
    return rows


# ---------------------------------------------------------------------------------------------
# model level


def mobilenet_style(conv, *, alpha: float, num_classes: int, rngs):
    """MobileNet v1's plan (CIFAR stem, 13 blocks) where each block is one 3×3 conv through
    ``conv``: ``conv_factory('dsc', 1)`` makes it MobileNet, ``'full'`` the same net with full
    convs. The stem (3 input channels) stays a plain ``nnx.Conv`` as in MobileNet."""
    from flax import nnx

    from factorize.models.mobilenet import MOBILENET_BLOCKS

    class Net(nnx.Module):
        def __init__(self):
            cin = max(1, round(32 * alpha))
            self.stem = nnx.Conv(3, cin, (3, 3), use_bias=False, rngs=rngs)
            self.stem_bn = nnx.BatchNorm(cin, momentum=0.9, rngs=rngs)
            convs, bns = [], []
            for c, s in MOBILENET_BLOCKS:
                cout = max(1, round(c * alpha))
                convs.append(conv(cin, cout, (3, 3), strides=s, use_bias=False, rngs=rngs))
                bns.append(nnx.BatchNorm(cout, momentum=0.9, rngs=rngs))
                cin = cout
            self.convs, self.bns = nnx.List(convs), nnx.List(bns)
            self.head = nnx.Linear(cin, num_classes, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.stem_bn(self.stem(x)))
            for c, bn in zip(self.convs, self.bns, strict=True):
                x = nnx.relu(bn(c(x)))
            return self.head(x.mean(axis=(1, 2)))

    return Net()


def model_thunks(model, x, y, impl: str, lr: float = 0.01):
    """(inference thunk, training-step thunk) of an NNX model, compiled."""
    import jax
    import optax
    from flax import nnx

    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def train_step(params, rest, x, y):
        m = nnx.merge(graphdef, params, rest)

        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, g = nnx.value_and_grad(loss_fn)(m)
        _, params, rest = nnx.split(m, nnx.Param, ...)
        return jax.tree.map(lambda p, d: p - lr * d, params, g), rest, loss

    model.eval()
    egraph, eparams, erest = nnx.split(model, nnx.Param, ...)

    def infer(params, rest, x):
        return nnx.merge(egraph, params, rest)(x)

    return (compiled(infer, eparams, erest, x, impl=impl),
            compiled(train_step, params, rest, x, y, impl=impl))


def model_rows(repeats: int, quick: bool, impl: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import factorize
    from factorize.models import make_model

    setups = []
    b, hw = (16, 28) if quick else (128, 28)
    for fam, rank in (("full", "full"), ("dsc", 1), ("cp3", 0.25), ("tucker2", 0.25)):
        setups.append(("cnn", b, hw, 1, fam, rank, lambda conv: make_model(
            "cnn", num_classes=10, in_channels=1, conv=conv, rngs=nnx.Rngs(0))))
    b, hw, alpha = (8, 32, 0.25) if quick else (32, 32, 0.5)
    for fam, rank in (("full", "full"), ("dsc", 1), ("cp3", 0.25)):
        setups.append((f"mobilenet_style(alpha={alpha})", b, hw, 3, fam, rank,
                       lambda conv, a=alpha: mobilenet_style(
                           conv, alpha=a, num_classes=10, rngs=nnx.Rngs(0))))
    thunks, meta = {}, {}
    for model_name, b, hw, cin, fam, rank, build in setups:
        model = build(factorize.conv_factory(fam, rank))
        x = jax.random.normal(jax.random.key(0), (b, hw, hw, cin), jnp.float32)
        y = jax.random.randint(jax.random.key(1), (b,), 0, 10)
        inf, tr = model_thunks(model, x, y, impl)
        key = (model_name, fam)
        thunks[("infer", key)], thunks[("train", key)] = inf, tr
        model.eval()
        graphdef, state = nnx.split(model)
        macs = factorize.count_macs(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state, x)
        meta[key] = dict(model=model_name, family=fam, rank=str(rank), batch=b, hw=hw,
                         macs_per_image=macs // b)
    times = median_times(thunks, repeats)
    return [
        {**m, "infer_s": times[("infer", k)], "train_s": times[("train", k)]}
        for k, m in meta.items()
    ]


# ---------------------------------------------------------------------------------------------
# driver


def worker(args) -> list[dict]:
    if args.probe:
        return dense_probe(args.probe_shapes, args.batch, args.repeats, args.impl)
    if args.models:
        return model_rows(args.repeats, args.quick, args.impl)
    rows = []
    for channels in args.channels:
        for hw in args.hw:
            rows += layer_group(channels, hw, args.batch, args.repeats, args.families,
                                TARGETS, args.impl)
            print(f"  done C={channels} hw={hw}", file=sys.stderr, flush=True)
    return rows


def config_env(config: str, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with the variables of ``config``; the ones any config sets but this one does
    not are removed, so an inherited GLIBC_TUNABLES cannot leak into ``default``."""
    owned = {k for env in CONFIGS.values() for k in env}
    return {**{k: v for k, v in base.items() if k not in owned}, **CONFIGS[config]}


def run_config(config: str, argv: Sequence[str], keep: Path | None = None) -> list[dict]:
    """Runs the worker in a subprocess with the environment of ``config`` (rows also saved to
    ``keep``, so a long run's finished configs survive an interrupted later one)."""
    env = config_env(config, os.environ)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, *argv, "--worker-out", out]
    print(f"[{config}] {CONFIGS[config]}, transparent huge pages: {thp_mode()}", file=sys.stderr,
          flush=True)
    subprocess.run(cmd, env=env, check=True)
    rows = json.loads(Path(out).read_text())
    os.unlink(out)
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(json.dumps(rows, indent=1))
    return rows


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (the bracketed word), or ``"unknown"``."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else "unknown"


def merge(per_config: dict[str, list[dict]], models: bool) -> list[dict]:
    """One row per measurement: per-config times, best-vs-best and worst same-process ratios."""
    keys = ("model", "family") if models else ("family", "channels", "hw", "target")
    fields = ("infer_s", "train_s") if models else (
        "full_fwd_s", "fact_fwd_s", "full_train_s", "fact_train_s")
    merged: dict[tuple, dict] = {}
    for config, rows in per_config.items():
        for r in rows:
            m = merged.setdefault(tuple(r[k] for k in keys),
                                  {k: v for k, v in r.items() if k not in fields})
            for f in fields:
                m[f"{f}[{config}]"] = r[f]
    out = list(merged.values())
    for m in out:
        for f in fields:
            m[f] = min(m[f"{f}[{c}]"] for c in per_config)
        if models:
            m["infer_img_s"] = m["batch"] / m["infer_s"]
            m["train_img_s"] = m["batch"] / m["train_s"]
        else:
            m["fwd_speedup"] = m["full_fwd_s"] / m["fact_fwd_s"]
            m["train_speedup"] = m["full_train_s"] / m["fact_train_s"]
            m["efficiency"] = m["fwd_speedup"] * m["mac_ratio"]
            for what in ("fwd", "train"):
                m[f"{what}_speedup_same"] = min(
                    m[f"full_{what}_s[{c}]"] / m[f"fact_{what}_s[{c}]"] for c in per_config)
    return out


def print_layer_table(rows: list[dict]) -> None:
    print("| family | rank | C | hw | target | MAC ratio | full fwd ms | fact fwd ms | fwd ×"
          " | eff. | full train ms | fact train ms | train × | fwd × same | train × same |")
    print("|" + "---|" * 15)
    for r in sorted(rows, key=lambda r: (r["channels"], -r["hw"], -r["target"],
                                         FAMILIES.index(r["family"]))):
        print(f"| {r['family']} | {r['rank']} | {r['channels']} | {r['hw']} | "
              f"1/{round(1 / r['target'])} | {r['mac_ratio']:.3f} | "
              f"{1e3 * r['full_fwd_s']:.2f} | {1e3 * r['fact_fwd_s']:.2f} | "
              f"{r['fwd_speedup']:.2f} | {r['efficiency']:.2f} | "
              f"{1e3 * r['full_train_s']:.2f} | {1e3 * r['fact_train_s']:.2f} | "
              f"{r['train_speedup']:.2f} | {r['fwd_speedup_same']:.2f} | "
              f"{r['train_speedup_same']:.2f} |")


def print_model_table(rows: list[dict], configs: Sequence[str]) -> None:
    cols = " | ".join(f"train img/s [{c}]" for c in configs)
    print(f"| model | family | rank | batch | MMAC/img | infer img/s | train img/s | {cols} |")
    print("|" + "---|" * (7 + len(configs)))
    for r in rows:
        per = " | ".join(f"{r['batch'] / r[f'train_s[{c}]']:.0f}" for c in configs)
        print(f"| {r['model']} | {r['family']} | {r['rank']} | {r['batch']} | "
              f"{r['macs_per_image'] / 1e6:.1f} | {r['infer_img_s']:.0f} | "
              f"{r['train_img_s']:.0f} | {per} |")


def print_probe_table(probe: dict[str, list[dict]], chosen: str) -> None:
    print("Dense 3×3 conv per environment (ms, forward / training step):", file=sys.stderr)
    for config, rows in probe.items():
        cells = ", ".join(f"C={r['channels']} {r['hw']}²: {1e3 * r['full_fwd_s']:.1f} / "
                          f"{1e3 * r['full_train_s']:.1f}" for r in rows)
        mark = "  <- fastest: every row is measured here" if config == chosen else ""
        print(f"  {config:12} {cells}{mark}", file=sys.stderr)


def _row_label(r: dict) -> str:
    return (f"{r['family']} rank {r['rank']}, C={r['channels']} {r['hw']}×{r['hw']}, "
            f"MAC ratio {r['mac_ratio']:.3f}")


def layer_summary(rows: list[dict]) -> str:
    """Which rows at ≤ 1/4 of the MACs are slower than the dense conv (forward, training step),
    and the lowest efficiency of dsc and cp3 at C = 256, 32×32."""
    quarter = [r for r in rows if r["mac_ratio"] <= 0.25 + 1e-12]
    lines = [f"Summary: {len(quarter)} rows at ≤ 1/4 of the full conv's MACs"]
    for what, key in (("forward", "fwd_speedup"), ("training step", "train_speedup")):
        if not quarter:
            break
        slow = sorted((r for r in quarter if r[key] < 1), key=lambda r: r[key])
        if slow:
            lines.append(f"- {what}: {len(slow)} slower than the dense conv: " + "; ".join(
                f"{r[key]:.2f}× ({_row_label(r)})" for r in slow))
        else:
            worst = min(quarter, key=lambda r: r[key])
            lines.append(f"- {what}: none slower than the dense conv (slowest "
                         f"{worst[key]:.2f}×: {_row_label(worst)})")
    for family in ("dsc", "cp3"):
        sel = [r for r in rows if r["family"] == family and r["channels"] == 256 and r["hw"] == 32]
        if not sel:
            lines.append(f"- efficiency of {family} at C=256, 32×32: not measured in this run")
            continue
        worst = min(sel, key=lambda r: r["efficiency"])
        lines.append(f"- lowest efficiency (forward speed-up × MAC ratio) of {family} at C=256, "
                     f"32×32: {worst['efficiency']:.2f} (rank {worst['rank']}, MAC ratio "
                     f"{worst['mac_ratio']:.3f}, {worst['fwd_speedup']:.2f}× faster)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the merged rows here")
    p.add_argument("--quick", action="store_true", help="tiny run (tests, smoke)")
    p.add_argument("--models", action="store_true", help="whole-model images/s instead")
    p.add_argument("--configs", default=None,
                   help=f"environments (XLA flags, allocator) to measure every row in, from "
                        f"{list(CONFIGS)} (default: the one where the dense conv is fastest)")
    p.add_argument("--all-configs", action="store_true",
                   help="measure every row in every environment (the full sweep)")
    p.add_argument("--impl", default="auto", help="conv implementation of factorized layers")
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--channels", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--hw", nargs="+", type=int, default=[32, 16])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.probe_shapes = PROBE_SHAPES
    if args.quick:
        args.channels, args.hw, args.batch, args.repeats = [16], [8], 4, 2
        args.probe_shapes = ((16, 8),)
    if args.worker_out:
        args.worker_out.write_text(json.dumps(worker(args)))
        return
    t0 = time.perf_counter()
    raw = list(sys.argv[1:] if argv is None else argv)
    if args.configs is not None and args.all_configs:
        p.error("--configs and --all-configs: give one of them")
    if args.configs is not None:
        configs = [c for c in args.configs.split(",") if c]
        unknown = [c for c in configs if c not in CONFIGS]
        if unknown or not configs:
            p.error(f"--configs: expected names from {list(CONFIGS)}, got {args.configs!r}")
    elif args.all_configs:
        configs = list(CONFIGS)
    else:
        probe = {c: run_config(c, [*raw, "--probe"]) for c in CONFIGS}
        configs = [fastest_config(probe)]
        print_probe_table(probe, configs[0])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.with_suffix(".probe.json").write_text(
                json.dumps({"chosen": configs[0], "probe": probe}, indent=1))
    per_config = {
        c: run_config(c, raw, args.json.with_suffix(f".{c}.json") if args.json else None)
        for c in configs
    }
    rows = merge(per_config, args.models)
    if args.models:
        print_model_table(rows, configs)
    else:
        print_layer_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\nMeasured in {', '.join(configs)}; wall time {time.perf_counter() - t0:.0f} s.")
    if not args.models:
        print(layer_summary(rows))


if __name__ == "__main__":
    main()
