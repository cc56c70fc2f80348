"""Command-line jobs of the interop: ``factorize import-torch`` and ``factorize export``.

Registered in :data:`factorize.cli.COMMANDS`. Bad input raises ``ValueError`` /
``FileNotFoundError`` / ``FileExistsError`` (one line from the CLI, exit status 2); outputs are
written under a temporary name and renamed into place, so a failed command leaves nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["add_export", "add_import_torch", "parse_image_shape", "run_export",
           "run_import_torch"]

DEFAULT_IMAGE_SHAPE = (224, 224, 3)


def parse_image_shape(text: str) -> tuple[int, int, int]:
    """``"224,224,3"`` → ``(224, 224, 3)`` (H, W, C)."""
    try:
        shape = tuple(int(t) for t in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--image-shape must be H,W,C (three positive ints), got {text!r}")
    return shape  # type: ignore[return-value]


def _fresh(out: str) -> Path:
    path = Path(out)
    if path.exists():
        raise FileExistsError(f"--out {out!r} already exists; choose a new directory")
    return path


# --------------------------------------------------------------------------- import-torch


def add_import_torch(p: argparse.ArgumentParser) -> None:
    from factorize.models.torch_import import ARCHS

    p.add_argument("state_dict", metavar="FILE",
                   help="a torchvision state dict: .pth / .pt (needs torch) or .safetensors")
    p.add_argument("--arch", required=True, help=f"one of: {', '.join(ARCHS)}")
    p.add_argument("--out", required=True, help="new directory for checkpoint/")
    p.add_argument("--num-classes", type=int, help="default: the classifier weight's rows")
    p.add_argument("--image-shape", default=",".join(map(str, DEFAULT_IMAGE_SHAPE)),
                   help="H,W,C the checkpoint records for convert/inspect/export "
                        "(default: 224,224,3)")
    p.add_argument("--bn-eps", type=float, default=1e-5, help="BatchNorm epsilon")


def run_import_torch(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from factorize._io import sha256_file
    from factorize.cli import emit
    from factorize.costs import count_macs
    from factorize.models import count_params
    from factorize.models.torch_import import from_torch, resolve_arch
    from factorize.training import checkpoint

    arch = resolve_arch(args.arch)[0]  # names the known archs before any file is read
    image_shape = parse_image_shape(args.image_shape)
    out = _fresh(args.out)
    source = Path(args.state_dict)
    if not source.is_file():
        raise FileNotFoundError(f"state dict file {args.state_dict!r} does not exist")
    model, spec = from_torch(source, arch, num_classes=args.num_classes, bn_eps=args.bn_eps,
                             return_spec=True)
    if image_shape[2] != spec.in_channels:
        raise ValueError(f"--image-shape {args.image_shape} has {image_shape[2]} channels; the "
                         f"state dict's first conv takes {spec.in_channels}")
    macs = count_macs(model, jnp.zeros((1, *image_shape), jnp.float32))
    info = {
        "arch": arch, "model": spec.model, "num_classes": spec.num_classes,
        "in_channels": spec.in_channels, "image_shape": list(image_shape),
        "source": str(source.absolute()), "source_sha256": sha256_file(source),
        "params": count_params(model), "macs": int(macs),
    }
    metadata = {k: info[k] for k in ("arch", "image_shape", "source", "source_sha256")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        checkpoint.save(tmp / "checkpoint", model, spec,
                        metadata={**metadata, "imported_from": "torch"})
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info.update(out=str(out), checkpoint=str(out / "checkpoint"))
    h, w, c = image_shape
    emit(args, info, f"imported {arch} ({spec.model}, {spec.num_classes} classes, "
                     f"{info['params']:,} params, {info['macs']:,} MACs at {h}×{w}×{c}) from "
                     f"{source}; checkpoint {info['checkpoint']}")
    return 0


# --------------------------------------------------------------------------------- export


def add_export(p: argparse.ArgumentParser) -> None:
    from factorize.cli import checkpoint_arg

    checkpoint_arg(p)
    p.add_argument("--to", required=True, choices=("torch", "stablehlo"),
                   help="torch: safetensors + architecture.json + load.py; stablehlo: jax.export")
    p.add_argument("--out", required=True, help="new directory for the exported files")
    p.add_argument("--image-shape", help="H,W,C (default: the checkpoint's image_shape)")
    p.add_argument("--batch", type=int,
                   help="stablehlo: fixed batch size (default: symbolic)")
    p.add_argument("--platforms", default="cpu",
                   help="stablehlo: comma-separated jax.export platforms (cpu, cuda, rocm, tpu)")


def run_export(args: argparse.Namespace) -> int:
    from factorize.cli import emit
    from factorize.conversion import layer_builder
    from factorize.interop import export_stablehlo, export_torch
    from factorize.interop.torch_export import SUPPORTED_MODELS
    from factorize.training import checkpoint

    out = _fresh(args.out)
    ckpt = checkpoint.resolve_checkpoint(args.checkpoint)
    meta = checkpoint.read_meta(ckpt)
    spec, metadata = meta["spec"], meta.get("metadata", {})
    if args.to == "torch" and spec.model not in SUPPORTED_MODELS:
        raise ValueError(f"export to torch supports the models {', '.join(SUPPORTED_MODELS)}; "
                         f"{args.checkpoint} is {spec.model!r}")
    if args.image_shape:
        image_shape = parse_image_shape(args.image_shape)
    elif metadata.get("image_shape"):
        image_shape = tuple(int(s) for s in metadata["image_shape"])
    else:
        raise ValueError(f"{args.checkpoint}: checkpoint metadata lacks image_shape; pass "
                         f"--image-shape H,W,C")
    model = checkpoint.restore(ckpt, layer_builder=layer_builder)
    source: dict[str, Any] = {"checkpoint": os.path.abspath(ckpt),
                              "model": spec.model, "image_shape": list(image_shape)}
    if args.to == "torch":
        export_torch(model, spec, out, image_shape=image_shape, metadata=source)
        files = ["model.safetensors", "architecture.json", "load.py"]
    else:
        platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
        export_stablehlo(model, out, image_shape=image_shape, batch=args.batch,
                         platforms=platforms, metadata=source)
        files = ["model.jax_export", "model.json"]
    emit(args, {"out": str(out), "to": args.to, "files": files, **source},
         f"exported {spec.model} ({args.to}) to {out}: {', '.join(files)}")
    return 0
