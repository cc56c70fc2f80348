"""Checkpoints: orbax-saved model state plus a JSON architecture spec that rebuilds the model.

Layout of a checkpoint directory::

    CKPT/
      factorize.json   {"format": 1, "spec": ModelSpec, "manifest": {file: [bytes, sha256]}, ...}
      state/           orbax PyTree checkpoint of every nnx.Variable (params, BatchNorm stats)

``factorize train``, ``convert`` and ``import-torch`` write it as ``RUN/checkpoint``; every
reader takes ``RUN``, ``RUN/checkpoint`` or a model zoo name ``zoo:NAME``
(:func:`resolve_checkpoint`).

The whole directory is written under a temporary name next to the target and renamed into place,
so a crash never leaves a half-written checkpoint under the real name. The manifest (size and
sha256 of every state file) lets :func:`restore` name the file that was truncated or corrupted
instead of failing deep inside orbax.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from factorize._io import sha256_file
from factorize.models.spec import LayerBuilder, ModelSpec, build, record_layers

FORMAT = 1
META = "factorize.json"
STATE = "state"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or does not match its spec."""


def _variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    # '.'-joined paths: orbax uses the keys as names, and '/' would nest them.
    return {
        ".".join(str(k) for k in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Variable)
    }


def _manifest(root: Path) -> dict[str, list]:
    return {
        str(p.relative_to(root)): [p.stat().st_size, sha256_file(p)]
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def save(
    path: str | os.PathLike,
    model: nnx.Module,
    spec: ModelSpec,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model``'s variables and ``spec`` to directory ``path`` atomically.

    Every ``FactorizedConv`` in ``model`` is recorded in the spec's ``layers`` (its family and
    rank), so a converted model rebuilds with its per-layer factorization. ``metadata`` (JSON)
    is stored alongside, e.g. the dataset name and final accuracy. An existing ``path`` is only
    replaced with ``overwrite=True``.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    layers = {**spec.layers, **record_layers(model)}
    spec = ModelSpec(**{**spec.__dict__, "layers": layers})
    arrays = {k: np.asarray(jax.device_get(v[...])) for k, v in _variables(model).items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        ocp.PyTreeCheckpointer().save(tmp / STATE, arrays)
        meta = {
            "format": FORMAT,
            "spec": spec.to_dict(),
            "metadata": metadata or {},
            "manifest": _manifest(tmp / STATE),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if path.exists():  # overwrite=True: swap so the old one survives a failed rename
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "ckpt")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


ZOO_PREFIX = "zoo:"
CHECKPOINT_DIR = "checkpoint"  # the run directory's subfolder that train/convert/import write


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory that ``path`` names: ``path`` itself when it holds
    ``factorize.json``, else the run directory's ``path/checkpoint``; ``zoo:NAME`` is the model
    zoo's checkpoint ``NAME`` (checksums verified, :func:`factorize.zoo.path`).

    Raises :class:`CheckpointError` naming every path tried and what was expected there.

    Example::

        from factorize.training.checkpoint import resolve_checkpoint
        resolve_checkpoint("zoo:digits-cnn")      # .../zoo/digits-cnn/checkpoint
    """
    if isinstance(path, str) and path.startswith(ZOO_PREFIX):
        from factorize import zoo

        path = zoo.path(path[len(ZOO_PREFIX):])
    path = Path(path)
    candidates = (path, path / CHECKPOINT_DIR)
    for c in candidates:
        if (c / META).is_file():
            return c
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory (expected a run directory "
                              f"RUN, its RUN/{CHECKPOINT_DIR}, or zoo:NAME)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; expected a checkpoint directory")
    raise CheckpointError(
        f"{path}: not a factorize checkpoint: expected {META} and an orbax {STATE}/ in "
        f"{path} or in {path / CHECKPOINT_DIR} (the directory train, convert and import-torch "
        f"write)"
    )


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON (spec, metadata, manifest), validated; ``path`` as in
    :func:`resolve_checkpoint`."""
    path = resolve_checkpoint(path)
    meta_path = path / META
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{meta_path}: unsupported checkpoint format {meta.get('format')!r} "
                f"(this version reads {FORMAT})"
            )
        meta["spec"] = ModelSpec.from_dict(meta["spec"])
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata ({e})") from e
    return meta


def _verify(root: Path, manifest: dict[str, list]) -> None:
    for rel, (size, digest) in manifest.items():
        f = root / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: checkpoint file is missing")
        got = f.stat().st_size
        if got != size:
            raise CheckpointError(
                f"{f}: checkpoint file truncated or corrupt: expected {size} bytes, got {got}"
            )
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: checkpoint file corrupt: sha256 does not match")


def restore(
    path: str | os.PathLike,
    *,
    layer_builder: LayerBuilder | None = None,
    return_meta: bool = False,
) -> nnx.Module | tuple[nnx.Module, dict[str, Any]]:
    """Rebuild the model from ``path``'s spec and load its variables (bit-identical).

    ``path`` is a run directory, its ``checkpoint/`` or ``zoo:NAME``
    (:func:`resolve_checkpoint`). ``layer_builder`` is passed to
    :func:`factorize.models.build` for layers a conversion replaced with a type other than
    ``FactorizedConv``. With ``return_meta`` also returns the checkpoint's JSON (``spec``,
    ``metadata``).
    """
    import orbax.checkpoint as ocp

    path = resolve_checkpoint(path).absolute()  # orbax requires absolute paths
    meta = read_meta(path)
    _verify(path / STATE, meta["manifest"])
    model = build(meta["spec"], rngs=nnx.Rngs(0), layer_builder=layer_builder)
    variables = _variables(model)
    try:
        arrays = ocp.PyTreeCheckpointer().restore(path / STATE)
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(f"{path / STATE}: cannot read checkpoint state ({e})") from e
    if set(arrays) != set(variables):
        missing, extra = set(variables) - set(arrays), set(arrays) - set(variables)
        raise CheckpointError(
            f"{path}: state does not match the model spec (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]})"
        )
    for k, var in variables.items():
        a = np.asarray(arrays[k])
        want = var[...]
        if a.shape != want.shape or a.dtype != want.dtype:
            raise CheckpointError(
                f"{path}: variable {k}: expected {want.shape} {want.dtype}, got {a.shape} {a.dtype}"
            )
        var[...] = jax.numpy.asarray(a)
    model.eval()
    return (model, meta) if return_meta else model
