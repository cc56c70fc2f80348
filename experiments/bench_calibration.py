"""Time data-aware conversion of a trained CNN: the calibration statistics pass and the fit.

For each family, on ``--calibrate`` training images of the checkpoint's dataset (a seeded
subset), at ``--macs`` of each conv's MACs (the first conv kept, as in
``experiments/accuracy_vs_flops.py``):

* ``stats``: :func:`factorize.collect_input_stats` over every conv of the original model (the
  pass a symmetric conversion makes once);
* ``convert``: the whole :func:`factorize.convert` with ``calibration`` (for asymmetric
  reconstruction this includes one statistics pass per converted layer, on the converted
  prefix);

each timed ``--repeats`` times (the first call includes jit compilation and is reported
separately; the table shows the median of the repeats), then the converted model's test accuracy
before any fine-tuning, next to the data-free conversion's.

Command (the figure in docs/data_aware.md):

    python experiments/bench_calibration.py --checkpoint zoo:fm-cnn-seed0 \\
        --families dsc --json results/benchmarks/calibration.json

The accuracy table of docs/data_aware.md (every family, both reconstructions, one call each):

    for r in symmetric asymmetric; do python experiments/bench_calibration.py \
        --checkpoint zoo:fm-cnn-seed0 --repeats 0 --reconstruction $r \
        --families dsc,bsconv,spatial,lowrank_in,lowrank_out,tucker2,cp3,cp4 \
        --json results/fashion_mnist/data_aware_$r.json; done

Expected runtime on 2 CPU cores: about 1 minute per family with the default 3 repeats (four
conversions, the first with compilation, plus two test-set evaluations); 20–40 s per family
with ``--repeats 0``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax.numpy as jnp
import numpy as np

import factorize as fz
from factorize import data
from factorize._io import atomic_write_json
from factorize.conversion import Policy, collect_input_stats, convert, layer_builder
from factorize.families.data_aware import DEFAULT_DAMP, DEFAULT_SWEEPS
from factorize.training import checkpoint, evaluate


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_family(model, ds, image_shape, family: str, calib: np.ndarray, *, macs: float,
                 reconstruction: str, repeats: int, fit: dict) -> dict:
    policy = Policy.uniform(family, macs=macs, skip="^conv1$", on_infeasible="keep")
    sample = jnp.zeros((1, *image_shape))
    stats_times, convert_times = [], []
    first_convert = None
    converted = None
    for i in range(repeats + 1):
        _, t_stats = _timed(lambda: collect_input_stats(model, calib))
        (converted, report), t_conv = _timed(lambda: convert(
            model, policy, sample, calibration=calib, reconstruction=reconstruction, **fit))
        if i == 0:
            first_convert = t_conv
        if i > 0 or repeats == 0:  # --repeats 0: one call, compilation included
            stats_times.append(t_stats)
            convert_times.append(t_conv)
    free, _ = convert(model, policy, sample)
    return {
        "family": family,
        "reconstruction": reconstruction,
        "calibration_images": len(calib),
        "macs": macs,
        "conv_mac_ratio": report.conv_mac_ratio,
        "stats_s": statistics.median(stats_times),
        "convert_s": statistics.median(convert_times),
        "convert_first_call_s": first_convert,
        "repeats": repeats,
        **fit,
        "accuracy_data_free": evaluate(free, ds.x_test, ds.y_test)["accuracy"],
        "accuracy_data_aware": evaluate(converted, ds.x_test, ds.y_test)["accuracy"],
        "output_errors": {r.path: r.output_error for r in report.converted},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--families", default="dsc", help="comma-separated")
    p.add_argument("--calibrate", type=int, default=512, help="training images")
    p.add_argument("--reconstruction", choices=("symmetric", "asymmetric"),
                   default="asymmetric")
    p.add_argument("--macs", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repeats after the first call (0: the first call only, for the "
                        "accuracy table)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    p.add_argument("--damp", type=float, default=DEFAULT_DAMP, help="convert's damp")
    p.add_argument("--refine", type=int, default=DEFAULT_SWEEPS, help="convert's refine sweeps")
    p.add_argument("--json", help="write the rows here (replaced atomically)")
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",")]
    for f in families:
        fz.get_family(f)
    model, meta = checkpoint.restore(args.checkpoint, layer_builder=layer_builder,
                                     return_meta=True)
    md = meta["metadata"]
    ds = data.load(md["dataset"])
    idx = np.sort(np.random.default_rng(args.seed).permutation(len(ds.x_train))[:args.calibrate])
    calib = ds.x_train[idx]
    baseline = evaluate(model, ds.x_test, ds.y_test)["accuracy"]
    rows = []
    print(f"baseline test accuracy {baseline:.4f}; {args.calibrate} calibration images, "
          f"{args.reconstruction}, median of {args.repeats}")
    print("| family | stats pass (s) | data-aware convert (s) | first call (s) | conv MACs "
          "| data-free acc. | data-aware acc. |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for family in families:
        r = bench_family(model, ds, md["image_shape"], family, calib, macs=args.macs,
                         reconstruction=args.reconstruction, repeats=args.repeats,
                         fit={"damp": args.damp, "refine": args.refine})
        rows.append(r)
        print(f"| {family} | {r['stats_s']:.2f} | {r['convert_s']:.2f} "
              f"| {r['convert_first_call_s']:.2f} | {r['conv_mac_ratio']:.3f} "
              f"| {100 * r['accuracy_data_free']:.2f} % | {100 * r['accuracy_data_aware']:.2f} % |",
              flush=True)
    if args.json:
        atomic_write_json(args.json, {
            "checkpoint": str(checkpoint.resolve_checkpoint(args.checkpoint)),
            "baseline_accuracy": baseline,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                     time.gmtime()),
            "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]),
            "rows": rows,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
