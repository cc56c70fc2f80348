"""Command-line jobs of the conversion: ``factorize convert``, ``inspect`` and ``decompose``.

Registered in :data:`factorize.cli.COMMANDS`; each ``_run_*`` raises ``ValueError`` /
``FileNotFoundError`` / ``FileExistsError`` for bad input, which the CLI turns into a one-line
message and exit status 2. Outputs are written under a temporary name and renamed into place,
so a failed command leaves nothing behind.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------- convert


def add_convert(p: argparse.ArgumentParser) -> None:
    from factorize.cli import checkpoint_arg, parse_rank
    from factorize.families import FAMILIES

    checkpoint_arg(p)
    p.add_argument("--family", choices=FAMILIES, help="family for every conv (or --rules)")
    p.add_argument("--rank", type=parse_rank, default="full",
                   help="int, r1,r2 (tucker2), parameter fraction in (0, 1], full, evbmf")
    p.add_argument("--macs", type=float, help="instead of --rank: MAC fraction per conv")
    p.add_argument("--skip", help="regex of layer paths to keep, e.g. '^conv1$'")
    p.add_argument("--rules", help="JSON rules file (see factorize.conversion.Policy)")
    p.add_argument("--budget", type=float, metavar="FRACTION",
                   help="whole-model budget: the converted convs' MACs at most this fraction of "
                        "theirs, allocated per layer (instead of --family/--macs)")
    p.add_argument("--allocation", choices=("uniform", "greedy", "knapsack"),
                   help="with --budget: how ranks are allocated (default knapsack)")
    p.add_argument("--families", help="with --budget: comma-separated families each layer may "
                                      "take (default: --family)")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="with --budget: score candidates by the loss on the last N training "
                        "images (default 0: by the kernel error, no data)")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --budget: score and allocate again with the other layers converted")
    p.add_argument("--keep-best", action="store_true",
                   help="with --budget and --holdout: score each round's allocation and the "
                        "uniform one on the whole converted network, keep the best")
    p.add_argument("--sensitivity-cache", metavar="FILE",
                   help="with --budget: JSON file of per-layer scores, read and extended")
    p.add_argument("--workers", type=int, default=2,
                   help="threads decomposing the layers (grouped by kernel shape; 1: in order)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="data-aware conversion: fit each layer's output error on N training "
                        "images of the checkpoint's dataset (a seeded subset; default 0: "
                        "data-free)")
    p.add_argument("--reconstruction", choices=("symmetric", "asymmetric"),
                   default="asymmetric",
                   help="with --calibrate: fit each layer to the original network's outputs "
                        "given the converted network's inputs (asymmetric, default) or to its "
                        "own (symmetric)")
    p.add_argument("--calibration-seed", type=int, default=0,
                   help="seed of the calibration subset")
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--freeze-factors", action="store_true",
                   help="fine-tune everything but the factors")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--dataset", help="dataset for fine-tuning (default: the checkpoint's)")
    p.add_argument("--data-dir")
    p.add_argument("--out", required=True, help="new directory for checkpoint/ and report.*")


BUDGET_ONLY = ("allocation", "families", "sensitivity_cache", "keep_best")


def _check_budget_args(args: argparse.Namespace) -> list[str] | None:
    """The families of a ``--budget`` run (``None`` without one); bad combinations raise."""
    from factorize.families import FAMILIES

    if args.budget is None:
        given = [f"--{a.replace('_', '-')}" for a in BUDGET_ONLY if getattr(args, a)]
        given += [f"--{a}" for a in ("holdout", "rounds")
                  if getattr(args, a) != {"holdout": 0, "rounds": 1}[a]]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise ValueError(f"{', '.join(given)} {verb} --budget")
        return None
    if not 0.0 < args.budget <= 1.0:
        raise ValueError(f"--budget must be a fraction in (0, 1], got {args.budget}")
    clash = [f for f, v in (("--rules", args.rules), ("--macs", args.macs is not None),
                            ("--rank", args.rank != "full")) if v]
    if clash:
        raise ValueError(f"--budget replaces {', '.join(clash)}; give one or the other")
    if args.holdout < 0:
        raise ValueError(f"--holdout must be >= 0, got {args.holdout}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.keep_best and not args.holdout:
        raise ValueError("--keep-best needs --holdout N (whole networks are scored by their "
                         "loss on held-out training images)")
    if args.families and args.family:
        raise ValueError("give either --families or --family with --budget, not both")
    families = ([f.strip() for f in args.families.split(",") if f.strip()] if args.families
                else [args.family] if args.family else [])
    if not families:
        raise ValueError("--budget needs --families (or --family)")
    bad = [f for f in families if f not in FAMILIES or f == "full"]
    if bad:
        raise ValueError(f"--families: unknown {bad}; valid: "
                         + ", ".join(f for f in FAMILIES if f != "full"))
    return families


def _budget_policy(args, families, model, image_shape, dataset, calibration, load_data):
    """The allocated policy and its :class:`Allocation` for ``--budget`` (candidates fitted
    data-aware on ``calibration`` when given)."""
    import jax.numpy as jnp

    from factorize.conversion.allocation import (
        allocate,
        convertible_layers,
        data_aware_projection,
        eval_scorer,
    )

    options = {f: {"n_iter": 50} for f in families if f.startswith("cp")}
    projection = None
    if calibration is not None:
        paths = [s.path for s in convertible_layers(model, jnp.zeros((1, *image_shape)),
                                                    skip=args.skip)]
        # re-scoring rounds fit the candidates as this conversion will
        projection = data_aware_projection(model, calibration, paths, options,
                                           reconstruction=args.reconstruction)

    scorer = None
    if args.holdout:
        if not dataset:
            raise ValueError("--holdout needs --dataset (the checkpoint names none)")
        ds = load_data()
        if args.holdout > len(ds.x_train):
            raise ValueError(f"--holdout {args.holdout} exceeds the {len(ds.x_train)} training "
                             f"images of {dataset}")
        scorer = eval_scorer(model, ds.x_train[-args.holdout:], ds.y_train[-args.holdout:])
    try:
        a = allocate(model, jnp.zeros((1, *image_shape)), families, args.budget,
                     args.allocation or "knapsack", scorer=scorer, skip=args.skip,
                     options=options, projection=projection, cache=args.sensitivity_cache,
                     rounds=args.rounds, keep_best=args.keep_best)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("macs:"):
            msg = f"--budget {args.budget:g}:" + msg[len("macs:"):]
        raise ValueError(msg) from None
    return a.policy, a


def _policy(args: argparse.Namespace):
    from factorize.conversion import Policy

    if args.rules:
        if args.family:
            raise ValueError("give either --rules or --family, not both")
        return Policy.from_file(args.rules)
    if not args.family:
        raise ValueError("--family (or --rules) is required")
    rank = "full" if args.macs is not None else args.rank
    return Policy.uniform(args.family, rank, macs=args.macs, skip=args.skip)


def _new_output_dir(out: str) -> Path:
    path = Path(out)
    if path.exists():
        raise FileExistsError(f"--out {out!r} already exists; choose a new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_convert(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from factorize import data
    from factorize.cli import emit
    from factorize.conversion import convert, layer_builder
    from factorize.conversion.finetune import finetune
    from factorize.conversion.summary import convert_summary
    from factorize.training import checkpoint, get_config

    out = _new_output_dir(args.out)
    families = _check_budget_args(args)
    policy = _policy(args) if families is None else None
    ckpt = checkpoint.resolve_checkpoint(args.checkpoint)
    model, meta = checkpoint.restore(ckpt, layer_builder=layer_builder, return_meta=True)
    metadata = meta.get("metadata", {})
    image_shape = metadata.get("image_shape")
    dataset = args.dataset or metadata.get("dataset")
    if image_shape is None:
        raise ValueError(f"{args.checkpoint}: checkpoint metadata lacks image_shape")
    # calibration, the holdout and fine-tuning all read the same dataset: load it once
    load_data = functools.cache(lambda: data.load(dataset, data_dir=args.data_dir))
    calibration = None
    if args.calibrate:
        calibration = _calibration_images(args.calibrate, dataset, load_data,
                                          args.calibration_seed)
    allocation = None
    if families is not None:
        policy, allocation = _budget_policy(args, families, model, image_shape, dataset,
                                            calibration, load_data)
    converted, report = convert(model, policy, jnp.zeros((1, *image_shape)), progress=True,
                                workers=args.workers, calibration=calibration,
                                reconstruction=args.reconstruction)
    if not report.converted:
        what = f"rules file {args.rules!r}" if args.rules else "the policy"
        raise ValueError(f"{what} matched no convertible layer; layers: "
                         + ", ".join(r.path for r in report.rows))
    extra: dict[str, Any] = {}
    if args.finetune_epochs > 0:
        if not dataset:
            raise ValueError("--dataset is required to fine-tune (the checkpoint names none)")
        ds = load_data()
        config = get_config(dataset, meta["spec"].model, epochs=args.finetune_epochs,
                            learning_rate=args.learning_rate, warmup_epochs=0.0)
        result = finetune(converted, ds, config, freeze_factors=args.freeze_factors)
        extra = {k: result[k] for k in ("accuracy_before", "accuracy_after", "freeze_factors")}
    spec = meta["spec"]
    calibrated = {} if calibration is None else {"calibration": {
        "images": len(calibration), "split": "train", "seed": args.calibration_seed,
        "reconstruction": args.reconstruction}}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        report.save(tmp)
        if allocation is not None:
            from factorize._io import atomic_write_json, atomic_write_text

            atomic_write_json(tmp / "allocation.json", allocation.to_dict())
            atomic_write_text(tmp / "allocation.md", allocation.to_markdown())
        checkpoint.save(tmp / "checkpoint", converted, spec, metadata={
            **metadata, "converted_from": os.path.abspath(ckpt),
            "policy": policy.to_dict(), "mac_ratio": report.mac_ratio, **extra, **calibrated,
        })
        if extra:
            (tmp / "finetune.json").write_text(json.dumps(extra, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result, text = convert_summary(report, out, source=ckpt.absolute(),
                                   extra={**extra, **calibrated})
    if allocation is not None:
        a = allocation.to_dict()
        result["allocation"] = {k: a[k] for k in ("method", "fraction", "target_macs", "macs",
                                                  "scorer", "projection", "threshold")}
        result["allocation"]["layers"] = {p: {k: v for k, v in d.items() if k != "curve"}
                                          for p, d in a["layers"].items()}
        text = (allocation.to_markdown() + "\n" + text
                + f"\nallocation (curves and choices): {out}/allocation.json, allocation.md")
    emit(args, result, text)
    return 0


def _calibration_images(n: int, dataset: str | None, load_data: Callable[[], Any],
                        seed: int) -> np.ndarray:
    """``n`` training images of ``dataset`` (``load_data()`` returns it), a subset drawn with
    ``seed``."""
    if n < 0:
        raise ValueError(f"--calibrate must be a number of images >= 1, got {n}")
    if not dataset:
        raise ValueError("--calibrate needs --dataset (the checkpoint names none)")
    x = load_data().x_train
    if n > len(x):
        raise ValueError(f"--calibrate {n}: the {dataset} training split has only {len(x)} "
                         f"images")
    return x[np.sort(np.random.default_rng(seed).permutation(len(x))[:n])]


# --------------------------------------------------------------------------------- inspect


def add_inspect(p: argparse.ArgumentParser) -> None:
    from factorize.cli import checkpoint_arg

    checkpoint_arg(p)
    p.add_argument("--fractions", default="0.5,0.25,0.125",
                   help="MAC fractions at which to project each layer (comma-separated)")
    p.add_argument("--families", help="comma-separated subset (default: every family)")
    p.add_argument("--per-layer", action="store_true",
                   help="also print each layer's errors (always in --json)")


def inspect_model(model, image_shape, families, fractions) -> list[dict[str, Any]]:
    """Per conv layer: shape, MACs, params, and each family's relative error at each MAC
    fraction (``None`` where the family cannot get that low)."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from factorize.conversion import Policy, convert

    _, report = convert(model, Policy(()), jnp.zeros((1, *image_shape)))
    rows = []
    layers = {p: m for p, m in _layers(model).items()}
    for r in tqdm(report.rows, desc="inspect", unit="layer"):
        row = dict(path=r.path, kernel_shape=list(r.kernel_shape), input_hw=list(r.input_hw),
                   macs=r.macs_before, params=r.params_before, errors={})
        if r.layer_type == "conv" and "grouped" not in r.note:
            for fam in families:
                for frac in fractions:
                    row["errors"][f"{fam}@{frac:g}"] = _error_at(layers[r.path], r, fam, frac)
        rows.append(row)
    return rows


def _layers(model):
    from factorize.conversion import candidate_layers

    return candidate_layers(model)


def _error_at(layer, row, family: str, fraction: float) -> float | None:
    from factorize.factorized import decompose, relative_error
    from factorize.families import get_family, rank_for_fraction

    try:
        rank = rank_for_fraction(get_family(family), row.kernel_shape, fraction,
                                 input_hw=row.input_hw, strides=row.strides,
                                 padding=layer.padding)
    except ValueError:
        return None
    kernel = layer.kernel[...]
    return float(relative_error(kernel, decompose(kernel, family, rank)))


def run_inspect(args: argparse.Namespace) -> int:
    from factorize.cli import emit
    from factorize.conversion import layer_builder
    from factorize.conversion.summary import inspect_summary
    from factorize.families import FAMILIES
    from factorize.training import checkpoint

    families = [f.strip() for f in args.families.split(",")] if args.families else [
        f for f in FAMILIES if f != "full"]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"--families: unknown {unknown}; valid: {', '.join(FAMILIES)}")
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        raise ValueError(f"--fractions must be numbers, got {args.fractions!r}") from None
    if not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"--fractions must lie in (0, 1], got {args.fractions!r}")
    ckpt = checkpoint.resolve_checkpoint(args.checkpoint)
    model, meta = checkpoint.restore(ckpt, layer_builder=layer_builder, return_meta=True)
    image_shape = meta.get("metadata", {}).get("image_shape")
    if image_shape is None:
        raise ValueError(f"{args.checkpoint}: checkpoint metadata lacks image_shape")
    rows = inspect_model(model, image_shape, families, fractions)
    emit(args, *inspect_summary(rows, families, fractions, model=model, name=meta["spec"].model,
                                source=ckpt, image_shape=image_shape,
                                per_layer=args.per_layer))
    return 0


# ------------------------------------------------------------------------------- decompose


def add_decompose(p: argparse.ArgumentParser) -> None:
    from factorize.cli import parse_rank
    from factorize.families import FAMILIES

    p.add_argument("kernel", help="a .npz (one array, or pick with --key) or .safetensors file")
    p.add_argument("--key", help="the array's name inside the file")
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--rank", type=parse_rank, default="full")
    p.add_argument("--layout", choices=("HWIO", "OIHW"), default="HWIO",
                   help="kernel layout (PyTorch exports OIHW); the factors are written in it too")
    p.add_argument("--out", required=True, help="new .npz or .safetensors file for the factors")


def _load_kernel(path: str, key: str | None) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"kernel file {path!r} does not exist")
    if p.suffix == ".npz":
        with np.load(p) as f:
            arrays = {k: f[k] for k in f.files}
    elif p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        arrays = load_file(p)
    else:
        raise ValueError(f"kernel file must end in .npz or .safetensors, got {p.name!r}")
    if key is None:
        if len(arrays) != 1:
            raise ValueError(f"{p.name} holds {len(arrays)} arrays {sorted(arrays)}; pick one "
                             f"with --key")
        return next(iter(arrays.values()))
    if key not in arrays:
        raise ValueError(f"--key {key!r} is not in {p.name}; it holds {sorted(arrays)}")
    return arrays[key]


def run_decompose(args: argparse.Namespace) -> int:
    from factorize.factorized import decompose, relative_error

    out = Path(args.out)
    if out.suffix not in (".npz", ".safetensors"):
        raise ValueError(f"--out must end in .npz or .safetensors, got {out.name!r}")
    if out.exists():
        raise FileExistsError(f"--out {args.out!r} already exists; it is never overwritten")
    kernel = _load_kernel(args.kernel, args.key)
    f = decompose(kernel, args.family, args.rank, layout=args.layout)
    factors = {}
    for i, (stage, a) in enumerate(zip(f.stages, f.factors, strict=True)):
        a = np.asarray(a)
        factors[f"stage{i}"] = a.transpose(3, 2, 0, 1) if args.layout == "OIHW" else a
        factors[f"stage{i}_groups"] = np.asarray([stage.groups], np.int64)
    meta = {"family": f.family, "rank": f.rank, "kernel_shape": list(f.kernel_shape),
            "layout": args.layout, "stages": len(f.stages)}
    error = float(relative_error(kernel, f, layout=args.layout))
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent or ".")
    os.close(fd)
    try:
        if out.suffix == ".npz":
            np.savez(tmp, **factors, meta=np.asarray(json.dumps(meta)))
        else:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in factors.items()}, tmp,
                      metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    from factorize.cli import emit

    full = int(np.prod(f.kernel_shape))
    emit(args, {**meta, "out": str(out), "params": f.params, "kernel_params": full,
                "rel_error": error, "keys": sorted(factors)},
         f"{f.family} rank {f.rank}: {f.params:,} of {full:,} parameters, relative error "
         f"{error:.4f}; wrote {out} ({len(f.stages)} stages)")
    return 0
