"""A model's inference as a serialized StableHLO module (``jax.export``).

The weights are constants of the module and the function takes one NHWC float32 batch, its
batch size symbolic by default, so the file runs anywhere JAX (or another StableHLO consumer)
runs, without this library::

    from jax import export
    exported = export.deserialize(open("model.jax_export", "rb").read())
    logits = exported.call(images)   # images: (B, H, W, C) float32
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import export

from factorize import ops

__all__ = ["export_stablehlo", "exported_forward"]


def exported_forward(
    model: nnx.Module,
    image_shape: Sequence[int],
    *,
    batch: int | None = None,
    platforms: Sequence[str] = ("cpu",),
    implementation: str = "lax",
) -> export.Exported:
    """``jax.export`` of ``model``'s forward pass on ``(batch, *image_shape)`` float32 images.

    ``batch=None`` exports a symbolic batch size. ``implementation="lax"`` (default) traces
    every conv as ``lax.conv_general_dilated``: the module is then portable, since each backend
    compiles plain (grouped) convolutions with its own native kernels. ``factorize.ops``' fast
    path is tuned for XLA:CPU (shifted multiply-adds for depthwise stages, batch-chunked chains
    that depend on the batch size) and would hold GPUs and TPUs to that CPU-shaped program;
    pass ``"fast"`` for a CPU-only module that keeps it.

    Example::

        exp = exported_forward(model, (224, 224, 3))
        exp.call(jnp.zeros((4, 224, 224, 3)))
    """
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
    if batch is not None and (isinstance(batch, bool) or int(batch) < 1):
        raise ValueError(f"batch must be a positive int or None (symbolic), got {batch!r}")
    if implementation == "fast" and batch is None:
        # its batch chunking is chosen from the batch size, which must then be known
        raise ValueError("implementation 'fast' needs a fixed batch size, got batch=None")
    graphdef, state = nnx.split(model)

    def forward(x):
        return nnx.merge(graphdef, state)(x)

    if batch is None:
        shape = export.symbolic_shape("b, " + ", ".join(map(str, image_shape)))
    else:
        shape = (int(batch), *image_shape)
    with ops.implementation(implementation):
        return export.export(jax.jit(forward), platforms=tuple(platforms))(
            jax.ShapeDtypeStruct(shape, jnp.float32)
        )


def export_stablehlo(
    model: nnx.Module,
    out: str | os.PathLike,
    *,
    image_shape: Sequence[int],
    batch: int | None = None,
    platforms: Sequence[str] = ("cpu",),
    implementation: str = "lax",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Writes ``out/model.jax_export`` (the serialized module) and ``out/model.json`` (input
    and output shapes, dtype, layout, how to load it).

    ``out`` must not exist; it is written under a temporary name and renamed into place. The
    model should be in eval mode (BatchNorm on its running statistics), as a restored
    checkpoint is. See :func:`exported_forward` for the arguments.

    Example::

        export_stablehlo(model, "resnet18-hlo", image_shape=(224, 224, 3))
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} already exists; choose a new directory")
    exp = exported_forward(model, image_shape, batch=batch, platforms=platforms,
                           implementation=implementation)
    spec = {
        "format": 1,
        "file": "model.jax_export",
        "input_shape": [str(d) if not isinstance(d, int) else d for d in exp.in_avals[0].shape],
        "input_dtype": "float32",
        "input_layout": "NHWC",
        "output_shape": [str(d) if not isinstance(d, int) else d
                         for d in exp.out_avals[0].shape],
        "platforms": list(exp.platforms),
        "implementation": implementation,
        "jax_version": jax.__version__,
        "load": "from jax import export; "
                "f = export.deserialize(open('model.jax_export', 'rb').read()); y = f.call(x)",
        "metadata": metadata or {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "model.jax_export").write_bytes(exp.serialize())
        (tmp / "model.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
