"""The ``factorize`` command line.

Subcommands live in :data:`COMMANDS`: name → (add_arguments, run). To add one, write
``_add_x(parser)`` and ``_run_x(args) -> int`` and add a row. ``run`` raises an exception for
bad input; :func:`main` turns the expected ones into a one-line message and exit status 2.
Every command gets ``--json``: ``run`` reports through :func:`emit`, and while it runs anything
else it prints goes to stderr, so stdout holds one JSON object and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from factorize.conversion import commands as _conv_cmd
from factorize.interop import commands as _interop_cmd

# Errors that mean "bad input" (message for the user, no traceback). Kept as names so that
# importing the CLI stays cheap; resolved lazily in main().
_USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError)


def parse_rank(text: str) -> Any:
    """``full`` | ``evbmf`` | ``energy:E`` | int | float in (0, 1] | ``r1,r2`` (tucker2)."""
    if text == "full" or text == "evbmf" or text.startswith("energy:"):
        return text  # names resolved per layer by factorize.decompositions.select_rank_by_name
    try:
        if "," in text:
            return tuple(int(t) for t in text.split(","))
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid rank {text!r}: use 'full', an int, a fraction like 0.25, or r1,r2"
        ) from None


def emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """Report a command's outcome: ``text`` for people, or with ``--json`` ``result`` as one
    JSON object on stdout (the only thing written there)."""
    if getattr(args, "json", False):
        out = getattr(args, "_stdout", None) or sys.stdout
        out.write(json.dumps(result) + "\n")
        out.flush()
    else:
        print(text)


def checkpoint_arg(p: argparse.ArgumentParser, name: str = "checkpoint") -> None:
    """The positional checkpoint argument every command takes, with its accepted forms."""
    p.add_argument(name, metavar="CKPT",
                   help="run directory (RUN, as train/convert/import-torch write it), its "
                        "RUN/checkpoint, or zoo:NAME")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


# --------------------------------------------------------------------------------- train


def _add_train(p: argparse.ArgumentParser) -> None:
    from factorize.data import DATASETS
    from factorize.models import MODELS

    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model constructor argument, e.g. width=16 (resnet18), alpha=0.5 (mobilenet)",
    )
    p.add_argument("--epochs", type=int, help="training epochs (default: per dataset/model)")
    p.add_argument("--out", required=True, help="new directory for checkpoint/ and metrics.jsonl")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order, augmentation")
    p.add_argument("--batch-size", type=int, help="global batch size (split over devices)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), help="default: per dataset/model")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--family", help="conv family for every factorizable conv (default: full)")
    p.add_argument("--rank", type=parse_rank, default="full", help="rank for --family")
    p.add_argument("--init", metavar="CKPT",
                   help="fine-tune from this checkpoint (RUN, RUN/checkpoint or zoo:NAME)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--data-dir", help="directory holding the dataset files")
    p.add_argument(
        "--no-verify", action="store_true", help="skip official checksums (your own files)"
    )
    p.add_argument("--limit-train", type=int, metavar="N", help="use the first N train images")
    p.add_argument("--limit-test", type=int, metavar="N", help="use the first N test images")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["width=16", "widths=[8,16,32]"]`` → ``{"width": 16, "widths": [8, 16, 32]}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-arg {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _run_train(args: argparse.Namespace) -> int:
    from factorize.data import DATASETS
    from factorize.models import MODELS
    from factorize.training import get_config, train_and_evaluate
    from factorize.training.checkpoint import CheckpointError, resolve_checkpoint

    # Validate names before touching the disk: bad input leaves nothing behind.
    if args.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {args.dataset!r}; valid names: {', '.join(DATASETS)}")
    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; valid names: {', '.join(MODELS)}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not empty; choose a new one")
    try:
        init = resolve_checkpoint(args.init).absolute() if args.init else None
    except CheckpointError as e:
        raise CheckpointError(f"--init: {e}") from None
    if args.family is None and args.rank != "full":
        raise ValueError("--rank needs --family (e.g. --family dsc --rank 1)")
    family = None if args.family in (None, "full") and args.rank == "full" else args.family
    if family is not None:
        from factorize.families import FAMILIES

        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; valid names: {', '.join(FAMILIES)}")
    config = get_config(
        args.dataset,
        args.model,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        family=family,
        rank=args.rank if family else "full",
        augment=args.augment,
        init_checkpoint=str(init) if init else None,
        data_dir=args.data_dir,
        verify_data=not args.no_verify,
        model_kwargs=parse_model_args(args.model_arg),
        n_train=args.limit_train,
        n_test=args.limit_test,
        progress=not args.no_progress,
    )
    # Train into a hidden sibling and rename at the end: a failed run leaves no partial --out.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent.absolute(), prefix=f".{out.name}.tmp-"))
    try:
        _, history = train_and_evaluate(config, tmp / "run")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp / "run", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    final = history[-1] if history else {}
    acc = final.get("test_accuracy")
    msg = f"test accuracy {acc:.4f}" if acc is not None else "no evaluation"
    result = {"out": str(out), "checkpoint": str(out / "checkpoint"),
              "metrics": str(out / "metrics.jsonl"), "dataset": config.dataset,
              "model": config.model, "epochs": config.epochs, **final}
    emit(args, result, f"{msg}; checkpoint {out / 'checkpoint'}; metrics {out / 'metrics.jsonl'}")
    return 0


# ---------------------------------------------------------------------------------- eval


def _add_eval(p: argparse.ArgumentParser) -> None:
    checkpoint_arg(p)
    p.add_argument("--dataset", help="dataset to evaluate on (default: the one it was trained on)")
    p.add_argument("--data-dir", help="directory holding the dataset files")
    p.add_argument(
        "--no-verify", action="store_true", help="skip official checksums (your own files)"
    )
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--limit-test", type=int, metavar="N", help="use the first N test images")


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    dataset: str | None = None,
    *,
    data_dir: str | None = None,
    batch_size: int = 500,
    limit_test: int | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Test accuracy/loss, conventional MACs per image and parameter count of a checkpoint
    (``RUN``, ``RUN/checkpoint`` or ``zoo:NAME``)."""
    import jax.numpy as jnp

    from factorize import data as data_lib
    from factorize.conversion import layer_builder
    from factorize.costs import count_macs
    from factorize.models import count_params
    from factorize.training import evaluate, restore
    from factorize.training.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)
    model, meta = restore(checkpoint, layer_builder=layer_builder, return_meta=True)
    spec = meta["spec"]
    name = dataset or meta["metadata"].get("dataset")
    if not name:
        raise ValueError(f"{checkpoint} does not record its dataset; pass --dataset")
    ds = data_lib.load(name, data_dir=data_dir, verify=verify).subset(None, limit_test)
    if ds.in_channels != spec.in_channels or ds.num_classes != spec.num_classes:
        raise ValueError(
            f"checkpoint model takes {spec.in_channels} channels / {spec.num_classes} classes; "
            f"{name} has {ds.in_channels} / {ds.num_classes}"
        )
    res = evaluate(model, ds.x_test, ds.y_test, batch_size=batch_size)
    macs = count_macs(model, jnp.zeros((1, *ds.image_shape), jnp.float32))
    return {
        "checkpoint": str(checkpoint),
        "model": spec.model,
        "dataset": name,
        "n_test": len(ds.x_test),
        "accuracy": res["accuracy"],
        "loss": res["loss"],
        "macs": int(macs),
        "params": count_params(model),
    }


def _run_eval(args: argparse.Namespace) -> int:
    from factorize.data import DATASETS

    if args.dataset is not None and args.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {args.dataset!r}; valid names: {', '.join(DATASETS)}")
    res = evaluate_checkpoint(
        args.checkpoint,
        args.dataset,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        limit_test=args.limit_test,
        verify=not args.no_verify,
    )
    emit(args, res, f"{res['model']} on {res['dataset']} ({res['n_test']} test images): "
                    f"accuracy {res['accuracy']:.4f}, loss {res['loss']:.4f}, "
                    f"{res['macs']:,} MACs/image, {res['params']:,} params")
    return 0


# ------------------------------------------------------------------------------ registry

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]

# name -> (one-line help, example shown in --help, add_arguments, run)
COMMANDS: dict[str, Command] = {
    "train": (
        "train a model and save its checkpoint and metrics",
        "factorize train --dataset digits --model cnn --epochs 20 --out runs/digits-cnn\n"
        "  factorize train --dataset fashion_mnist --model cnn --family dsc --rank 2 "
        "--out runs/fm-dsc",
        _add_train,
        _run_train,
    ),
    "eval": (
        "evaluate a checkpoint: accuracy, MACs, params",
        "factorize eval runs/digits-cnn --json\n  factorize eval zoo:fm-cnn-seed0",
        _add_eval,
        _run_eval,
    ),
}

# The conversion jobs (factorize.conversion.commands).
COMMANDS.update({
    "convert": (
        "convert a checkpoint's convs into a factorized family, optionally fine-tune",
        "factorize convert runs/digits-cnn --family dsc --macs 0.25 --skip '^conv1$' "
        "--finetune-epochs 2 --out runs/digits-dsc",
        _conv_cmd.add_convert,
        _conv_cmd.run_convert,
    ),
    "inspect": (
        "per-layer shapes, MACs, params and each family's error at a few MAC fractions",
        "factorize inspect runs/digits-cnn --fractions 0.5,0.25",
        _conv_cmd.add_inspect,
        _conv_cmd.run_inspect,
    ),
    "decompose": (
        "decompose one raw kernel (.npz or .safetensors) into a family's factors",
        "factorize decompose conv.safetensors --key weight --layout OIHW --family cp4 --rank 0.25 "
        "--out conv_cp4.safetensors",
        _conv_cmd.add_decompose,
        _conv_cmd.run_decompose,
    ),
})


# PyTorch/StableHLO interop (factorize.interop.commands).
COMMANDS.update({
    "import-torch": (
        "import a torchvision state dict (.pth or .safetensors) as a factorize checkpoint",
        "factorize import-torch resnet18.pth --arch resnet18 --out runs/tv-resnet18",
        _interop_cmd.add_import_torch,
        _interop_cmd.run_import_torch,
    ),
    "export": (
        "export a checkpoint to PyTorch (state dict + loader) or StableHLO (jax.export)",
        "factorize export runs/tv-resnet18-dsc --to torch --out exports/resnet18-dsc",
        _interop_cmd.add_export,
        _interop_cmd.run_export,
    ),
})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="factorize",
        description="Efficient conv blocks as low-rank factorizations of full conv kernels.",
        epilog="example:\n  " + COMMANDS["train"][1],
        formatter_class=_formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, example, add, run) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_,
            description=help_[:1].upper() + help_[1:] + ".",
            epilog=f"example:\n  {example}",
            formatter_class=_formatter,
        )
        add(p)
        p.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout (messages and progress: stderr)")
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``factorize`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from factorize.data import DatasetError
    from factorize.training import CheckpointError

    args._stdout = sys.stdout  # emit() writes the JSON here; all else goes to stderr
    try:
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            return int(args._run(args) or 0)
    except (*_USER_ERRORS, DatasetError, CheckpointError) as e:
        reason = " ".join(str(e).split())  # one line, whatever the exception's layout
        print(f"factorize {args.command}: error: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"factorize {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
