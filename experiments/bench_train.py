"""Training throughput (images/s): full vs factorized convs in the same architecture.

Runs the library's own jitted training step (``factorize.training.make_train_step``: functional
``jax.jit`` over the split model) on random data of the dataset's shape, for each conv variant,
and reports the median of ``--repeats`` timings of ``--steps`` steps (compilation excluded).
With ``--nnx-jit`` it also times the same step written with ``nnx.jit`` on the module, to show
what the functional step saves.

    python experiments/bench_train.py                       # cnn, 28×28×1, batch 128
    python experiments/bench_train.py --model resnet18 --hw 32 --channels 3 --width 16
    python experiments/bench_train.py --variants full dsc:1 cp3:0.25 --json results/train.json

Expected runtime: about 1–2 minutes for the default (two variants × 5 repeats × 20 steps plus
compilation) on 2 CPU cores. The numbers depend on XLA's CPU flags: docs/benchmarks.md found
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` faster for dense convs; set it in the
environment to compare.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from factorize.costs import count_macs
from factorize.models import count_params, make_model
from factorize.training import TrainConfig, make_optimizer, make_train_step


def parse_variant(text: str) -> tuple[str, object]:
    """``full`` | ``family:rank`` (rank int, fraction, or r1,r2)."""
    if text == "full":
        return "full", "full"
    family, _, rank = text.partition(":")
    if "," in rank:
        return family, tuple(int(r) for r in rank.split(","))
    return family, (int(rank) if rank.isdigit() else float(rank))


def build(args, variant: str) -> nnx.Module:
    from factorize.layers import conv_factory

    family, rank = parse_variant(variant)
    conv = nnx.Conv if family == "full" else conv_factory(family, rank)
    kw = {"cnn": {}, "resnet18": {"width": args.width}, "mobilenet": {"alpha": args.alpha}}
    return make_model(
        args.model,
        num_classes=10,
        in_channels=args.channels,
        conv=conv,
        rngs=nnx.Rngs(0),
        **kw[args.model],
    )


def time_functional(model, x, y, steps: int, repeats: int) -> list[float]:
    tx = make_optimizer(TrainConfig(optimizer="sgd", learning_rate=0.01, epochs=1), steps)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)
    params, rest, opt_state, loss, _ = step(params, rest, opt_state, x, y, jnp.int32(0))
    loss.block_until_ready()  # compiled
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            params, rest, opt_state, loss, _ = step(params, rest, opt_state, x, y, jnp.int32(i))
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    return times


def time_nnx_jit(model, x, y, steps: int, repeats: int) -> list[float]:
    model.train()
    opt = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9, nesterov=True), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    step(model, opt, x, y).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step(model, opt, x, y)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="cnn", choices=("cnn", "resnet18", "mobilenet"))
    p.add_argument("--variants", nargs="+", default=["full", "dsc:1"])
    p.add_argument("--hw", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--width", type=int, default=64, help="resnet18 base width")
    p.add_argument("--alpha", type=float, default=1.0, help="mobilenet width multiplier")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nnx-jit", action="store_true", help="also time an nnx.jit step")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((args.batch_size, args.hw, args.hw, args.channels), np.float32))
    y = jnp.asarray(rng.integers(0, 10, args.batch_size), jnp.int32)
    rows = []
    for variant in args.variants:
        impls = {"functional": time_functional}
        if args.nnx_jit:
            impls["nnx.jit"] = time_nnx_jit
        for impl, fn in impls.items():
            model = build(args, variant)
            model.eval()
            macs = count_macs(model, x[:1])
            params = count_params(model)
            times = fn(model, x, y, args.steps, args.repeats)
            med = statistics.median(times)
            row = {
                "variant": variant,
                "step_impl": impl,
                "images_per_s": args.batch_size * args.steps / med,
                "ms_per_step": 1000 * med / args.steps,
                "macs_per_image": int(macs),
                "params": params,
                "repeats_s": [round(t, 4) for t in times],
            }
            rows.append(row)
            print(
                f"{args.model:9s} {variant:12s} {impl:10s} {row['images_per_s']:9.1f} img/s  "
                f"{row['ms_per_step']:8.2f} ms/step  {macs / 1e6:8.2f} MMACs/img  "
                f"{params:,} params",
                flush=True,
            )
    base = next(
        (r for r in rows if r["variant"] == "full" and r["step_impl"] == "functional"), None
    )
    if base:
        for r in rows:
            r["speedup_vs_full"] = r["images_per_s"] / base["images_per_s"]
            r["mac_reduction"] = base["macs_per_image"] / r["macs_per_image"]
    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.machine(),
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.json)
    return result


if __name__ == "__main__":
    main()
