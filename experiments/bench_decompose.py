"""factorize vs tensorly on conv kernels: CP-ALS (cp3, cp4) and Tucker-2, side by side.

Both run in this one process on the same float32 kernels with the same rank, the same iteration
budget (no early stop on either side) and the same initialisation kind: tensorly 0.10 with its
numpy backend (``parafac`` on the kernel as ``(C, N, kh, kw)`` for cp4 and ``(C, N, kh·kw)`` for
cp3, ``partial_tucker`` on modes C, N for tucker2) and ``factorize.decompose``. For each row it
prints the first-call time (factorize: including jit compilation), the steady-state time (median
of ``--repeats`` further calls), the relative error ``‖W − Ŵ‖/‖W‖`` of each (computed here, in
float64, from the returned factors) and the ratios. Kernels: ``random`` (i.i.d. normal),
``planted`` (exact CP rank R, or Tucker ranks (R1, R2), plus 10 % Gaussian noise) and, with
``--kernel PATH.npy`` (HWIO) or ``--checkpoint CKPT --layer PATH`` (a conv of a factorize
checkpoint, e.g. the Fashion-MNIST CNN's ``conv4``), a trained kernel.

``--resnet18`` instead times the whole-model check: cp4 at a quarter of the parameters on every
3×3 conv kernel of a ResNet-18-sized set (11.0M parameters, random kernels); with
``--convert``, ``factorize.convert`` does the same to the library's ResNet-18 model.

Command (the table in docs/benchmarks.md):

    python experiments/bench_decompose.py --json results/benchmarks/bench_decompose.json \
        --checkpoint results/fashion_mnist/runs/baseline-seed0/checkpoint --layer conv4
    python experiments/bench_decompose.py --resnet18

Expected runtime on 2 quiet CPU cores: about an hour for the full table (35 minutes with
``--tl-repeats 0``), almost all of it tensorly's (its cp4 on (512,512,3,3) at rank 256 takes
7.5 minutes per kernel); 50–55 s for ``--resnet18`` (45–66 s with ``--convert``); ~20 s
for ``--quick`` (one small shape, used by the tests). The JSON is rewritten after every row
and a rerun with the same ``--json`` measures only the missing rows, so the table can be
built in pieces (e.g. ``--families tucker2`` on a quiet machine: its many small steps suffer
most from other jobs, 1.2 s quiet vs 10–40 s at load average 5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

import factorize
from factorize._io import atomic_write_json

SHAPES = ((64, 64, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3))  # (N, C, kh, kw), as papers list
CP_RANKS = (64, 256)
TUCKER_RANKS = ((64, 64),)
ROUND_OFF = 1e-5  # relative errors below this are float32 round-off of an exact fit
RESNET18_3X3 = (  # (C, N, count) of ResNet-18's 3×3 convs
    (64, 64, 4), (64, 128, 1), (128, 128, 3), (128, 256, 1), (256, 256, 3),
    (256, 512, 1), (512, 512, 3),
)


def make_kernel(shape_oihw, kind: str, family: str, rank, seed: int) -> np.ndarray:
    """An HWIO float32 kernel of unit Frobenius norm."""
    n, c, kh, kw = shape_oihw
    rng = np.random.default_rng(seed)
    if kind == "random":
        w = rng.standard_normal((kh, kw, c, n))
    elif kind == "planted":
        if family == "tucker2":
            r1, r2 = rank
            core = rng.standard_normal((kh, kw, r1, r2))
            u = np.linalg.qr(rng.standard_normal((c, r1)))[0]
            v = np.linalg.qr(rng.standard_normal((n, r2)))[0]
            w = np.einsum("hwij,ci,nj->hwcn", core, u, v)
        elif family == "cp3":
            f = [rng.standard_normal((s, rank)) for s in (kh * kw, c, n)]
            w = np.einsum("kr,cr,nr->kcn", *f).reshape(kh, kw, c, n)
        else:
            f = [rng.standard_normal((s, rank)) for s in (kh, kw, c, n)]
            w = np.einsum("hr,wr,cr,nr->hwcn", *f)
        w /= np.linalg.norm(w)
        noise = rng.standard_normal(w.shape)
        w = w + 0.1 * noise / np.linalg.norm(noise)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return (w / np.linalg.norm(w)).astype(np.float32)


def checkpoint_kernel(path: str, layer: str) -> np.ndarray:
    """The HWIO kernel of conv ``layer`` (a path such as ``conv4``) of a factorize checkpoint."""
    from factorize.models import conv_layers
    from factorize.training import restore

    convs = conv_layers(restore(path))
    if layer not in convs or not hasattr(convs[layer], "kernel"):
        raise ValueError(f"--layer {layer!r} is not a plain conv of {path}; convs: "
                         + ", ".join(convs))
    return np.asarray(convs[layer].kernel[...], np.float32)


def rel_error(w: np.ndarray, approx: np.ndarray) -> float:
    w = w.astype(np.float64)
    return float(np.linalg.norm(w - approx) / np.linalg.norm(w))


def run_factorize(w, family, rank, n_iter, init, line_search=True):
    options = {} if family == "tucker2" else {"init": init, "line_search": line_search}
    f = factorize.decompose(w, family, rank, n_iter=n_iter, tol=None, **options)
    jax.block_until_ready(f.factors)
    return f


def run_tensorly(w, family, rank, n_iter, init):
    """tensorly's result as an HWIO float64 reconstruction (numpy backend, scoped)."""
    import tensorly as tl
    from tensorly.decomposition import parafac, partial_tucker

    kh, kw, c, n = w.shape
    with tl.backend_context("numpy"):
        if family == "tucker2":
            x = w.transpose(2, 3, 0, 1)  # (C, N, kh, kw)
            (core, factors), _ = partial_tucker(
                x, rank=list(rank), modes=[0, 1], n_iter_max=n_iter, init=init, tol=0
            )
            approx = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
            return approx.astype(np.float64).transpose(2, 3, 0, 1)
        x = w.transpose(2, 3, 0, 1) if family == "cp4" else w.reshape(kh * kw, c, n).transpose(
            1, 2, 0)
        cp = parafac(x, rank, n_iter_max=n_iter, init=init, tol=0, random_state=0)
        approx = tl.cp_to_tensor(cp).astype(np.float64)
        if family == "cp4":
            return approx.transpose(2, 3, 0, 1)
        return approx.transpose(2, 0, 1).reshape(kh, kw, c, n)


def timed(fn: Callable, repeats: int):
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, first, (statistics.median(times) if times else first)


def line_search_used(family: str, line_search: bool) -> bool:
    """Whether a row ran CP-ALS's line search (tucker2's HOOI has none)."""
    return line_search and family != "tucker2"


def row_key(family: str, shape, rank, kind: str, n_iter: int, init: str,
            line_search: bool = False) -> tuple:
    """What identifies a measurement: a rerun with the same ``--json`` skips rows it holds."""
    rank = tuple(rank) if isinstance(rank, (list, tuple)) else rank
    return family, tuple(shape), rank, kind, n_iter, init, line_search_used(family, line_search)


def bench_row(w, kind, family, rank, shape, args) -> dict:
    load_before = os.getloadavg()[0]
    f, fz_first, fz_time = timed(
        lambda: run_factorize(w, family, rank, args.n_iter, args.init, args.line_search),
        args.repeats)
    fz_err = rel_error(w, np.asarray(f.to_kernel(), np.float64))
    approx, tl_first, tl_time = timed(
        lambda: run_tensorly(w, family, rank, args.n_iter, args.init), args.tl_repeats)
    tl_err = rel_error(w, approx)
    row = {
        "family": family, "shape": list(shape), "rank": list(rank) if isinstance(rank, tuple)
        else rank, "kind": kind, "n_iter": args.n_iter, "init": args.init,
        "line_search": line_search_used(family, args.line_search),
        "fz_first_s": fz_first, "fz_time_s": fz_time, "tl_first_s": tl_first,
        "tl_time_s": tl_time, "fz_rel_error": fz_err, "tl_rel_error": tl_err,
        "speedup": tl_time / fz_time,
        # errors below 1e-5 count as equal: both fits are exact up to float32 round-off (e.g.
        # tucker2 at full rank (64, 64) of a 64-channel kernel: 1.0e-6 here, 3e-7 tensorly)
        "error_ratio": max(fz_err, ROUND_OFF) / max(tl_err, ROUND_OFF),
        # the machines are shared: the 1-minute load average before and after the row
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(
        f"{family:8s} {str(tuple(shape)):17s} {str(rank):10s} {kind:8s} "
        f"{fz_first:8.2f} {fz_time:8.2f} {tl_time:8.2f} {row['speedup']:7.1f}x "
        f"{fz_err:9.5f} {tl_err:9.5f} {row['error_ratio']:7.4f}",
        flush=True,
    )
    return row


def markdown_table(rows: list[dict]) -> str:
    """The table of docs/benchmarks.md, rebuilt from the JSON rows (``--render PATH``)."""
    lines = ["| shape (N, C, kh, kw) | family | rank | kernel | factorize (s) | tensorly (s) "
             "| speed-up | factorize error | tensorly error | error ratio |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    order = {f: i for i, f in enumerate(("cp4", "cp3", "tucker2"))}
    kinds = {k: i for i, k in enumerate(("random", "planted", "trained"))}
    rows = sorted(rows, key=lambda r: (r["kind"] == "trained", tuple(r["shape"]),
                                       order.get(r["family"], 9), tuple(np.atleast_1d(r["rank"])),
                                       kinds.get(r["kind"], 9)))
    for r in rows:
        rank = tuple(r["rank"]) if isinstance(r["rank"], list) else r["rank"]
        plain = r["family"] != "tucker2" and not r.get("line_search", False)
        family = r["family"] + (" (plain ALS)" if plain else "")  # no line search
        lines.append(
            f"| {tuple(r['shape'])} | {family} "
            f"| {rank} | {r['kind']} "
            f"| {r['fz_time_s']:.2f} | {r['tl_time_s']:.1f} | {r['speedup']:.0f}× "
            f"| {r['fz_rel_error']:.4f} | {r['tl_rel_error']:.4f} | {r['error_ratio']:.3f} |")
    return "\n".join(lines)


def resnet18_convert(args) -> None:
    """``factorize.convert`` on the library's ResNet-18 (CIFAR layout, width 64, random init):
    every 3×3 conv but the stem to cp4 at 1/4 of its parameters, with ``--workers`` threads."""
    from flax import nnx

    from factorize.conversion import Policy, Rule, convert
    from factorize.models import make_model

    model = make_model("resnet18", num_classes=10, in_channels=3, rngs=nnx.Rngs(0))
    x = jax.numpy.zeros((1, 32, 32, 3))
    policy = Policy((
        Rule(None, path="^stem$"),
        Rule("cp4", 0.25, kernel_size=(3, 3), options={"n_iter": args.n_iter, "tol": None}),
        Rule(None),
    ))
    t0 = time.perf_counter()
    _, report = convert(model, policy, x, workers=args.workers)
    total = time.perf_counter() - t0
    print(f"factorize.convert ResNet-18: {len(report.converted)} convs to cp4 at 0.25, "
          f"{args.n_iter} ALS sweeps each; total {total:.1f} s ({args.workers} worker threads)",
          flush=True)


def resnet18(args) -> None:
    if args.convert:
        return resnet18_convert(args)
    rng = np.random.default_rng(0)
    kernels = [
        (rng.standard_normal((3, 3, c, n)) / np.sqrt(9 * c)).astype(np.float32)
        for c, n, count in RESNET18_3X3 for _ in range(count)
    ]
    params = sum(k.size for k in kernels)
    t0 = time.perf_counter()
    fs = factorize.decompose_many(kernels, "cp4", 0.25, n_iter=args.n_iter, tol=None,
                                  workers=args.workers)
    jax.block_until_ready([f.factors for f in fs])
    total = time.perf_counter() - t0
    fparams = sum(f.params for f in fs)
    errs = [float(factorize.relative_error(k, f)) for k, f in zip(kernels, fs, strict=True)]
    print(
        f"ResNet-18 3x3 kernels: {len(kernels)} convs, {params / 1e6:.2f}M parameters -> cp4 at "
        f"0.25: {fparams / 1e6:.2f}M; {args.n_iter} ALS sweeps each; total {total:.1f} s "
        f"(including jit compilation; {args.workers} worker threads); mean rel. error "
        f"{np.mean(errs):.4f}",
        flush=True,
    )
    if args.json:
        atomic_write_json(args.json, {
            "convs": len(kernels), "params": params, "factorized_params": fparams,
            "n_iter": args.n_iter, "workers": args.workers, "time_s": total,
            "mean_rel_error": float(np.mean(errs)),
            "load_avg": round(os.getloadavg()[0], 2)})


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the rows as a JSON list to this path (after every row; "
                   "a rerun with the same path keeps its rows and measures only the missing ones)")
    p.add_argument("--quick", action="store_true", help="one small shape, few iterations")
    p.add_argument("--resnet18", action="store_true", help="the whole-model timing instead")
    p.add_argument("--convert", action="store_true",
                   help="--resnet18: time factorize.convert on the library's ResNet-18 model")
    p.add_argument("--workers", type=int, default=2,
                   help="--resnet18: threads for decompose_many or convert (1: one at a time)")
    p.add_argument("--shapes", default=None, help="e.g. 256x256x3x3,512x512x3x3 (N×C×kh×kw)")
    p.add_argument("--families", default="cp4,cp3,tucker2")
    p.add_argument("--kinds", default="random,planted")
    p.add_argument("--kernel", help="a trained HWIO kernel (.npy) to add as kind 'trained'")
    p.add_argument("--checkpoint", help="a factorize checkpoint to take a trained kernel from")
    p.add_argument("--layer", default="conv4", help="the conv of --checkpoint (default conv4)")
    p.add_argument("--n-iter", type=int, default=100)
    p.add_argument("--init", default="svd", choices=("svd", "random"))
    p.add_argument("--line-search", action=argparse.BooleanOptionalAction, default=True,
                   help="factorize's cp with Bro's line search, its default (tensorly's side "
                   "unchanged; --no-line-search: plain ALS)")
    p.add_argument("--repeats", type=int, default=3, help="factorize steady-state calls")
    p.add_argument("--tl-repeats", type=int, default=1,
                   help="tensorly steady-state calls (0: time the one first call; tensorly has no "
                   "compilation, so its first call is already steady state)")
    p.add_argument("--render", metavar="JSON", help="only print the markdown table of a --json")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as fh:
            print(markdown_table(json.load(fh)))
        return []
    if args.resnet18:
        resnet18(args)
        return []
    shapes = SHAPES
    cp_ranks, tucker_ranks = CP_RANKS, TUCKER_RANKS
    if args.quick:
        shapes, cp_ranks, tucker_ranks = ((32, 24, 3, 3),), (8,), ((8, 6),)
        args.n_iter, args.repeats = min(args.n_iter, 20), 1
    if args.shapes:
        shapes = tuple(tuple(int(x) for x in s.split("x")) for s in args.shapes.split(","))
    families = args.families.split(",")
    kinds = args.kinds.split(",")
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s); "
          f"n_iter={args.n_iter}, init={args.init}; times in s", flush=True)
    print(f"{'family':8s} {'shape (N,C,kh,kw)':17s} {'rank':10s} {'kind':8s} {'fz 1st':>8s} "
          f"{'fz':>8s} {'tl':>8s} {'speedup':>8s} {'fz err':>9s} {'tl err':>9s} {'ratio':>7s}")
    rows = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as fh:
            rows = json.load(fh)
        if not isinstance(rows, list):
            p.error(f"--json {args.json} holds {type(rows).__name__}, not a list of rows")
    done = {row_key(r["family"], r["shape"], r["rank"], r["kind"], r["n_iter"], r["init"],
                    r.get("line_search", False))
            for r in rows}

    def measure(make_kernel_, kind, family, rank, shape):
        if row_key(family, shape, rank, kind, args.n_iter, args.init, args.line_search) in done:
            return
        rows.append(bench_row(make_kernel_(), kind, family, rank, shape, args))
        if args.json:
            atomic_write_json(args.json, rows)

    if args.kernel and args.checkpoint:
        p.error("--kernel and --checkpoint are alternatives; pass one")
    trained = np.load(args.kernel).astype(np.float32) if args.kernel else None
    if args.checkpoint:
        trained = checkpoint_kernel(args.checkpoint, args.layer)
    for shape in shapes:
        for family in families:
            for rank in tucker_ranks if family == "tucker2" else cp_ranks:
                r = rank if family != "tucker2" else tuple(min(a, b) for a, b in
                                                           zip(rank, shape[1::-1], strict=True))
                for seed, kind in enumerate(kinds):
                    measure(lambda: make_kernel(shape, kind, family, r, seed),  # noqa: B023
                            kind, family, r, shape)
    if trained is not None:
        kh, kw, c, n = trained.shape
        for family in families:
            for rank in tucker_ranks if family == "tucker2" else cp_ranks:
                r = rank if family != "tucker2" else (min(rank[0], c), min(rank[1], n))
                measure(lambda: trained, "trained", family, r, (n, c, kh, kw))
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
