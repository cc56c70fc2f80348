"""The model zoo: trained checkpoints shipped in the repository's ``zoo/`` folder.

``zoo/MANIFEST.json`` lists each model (dataset, architecture, the command that trained it, test
accuracy, conventional MACs per image, parameters) and the size and sha256 of every file in
``zoo/NAME/`` (``checkpoint/`` and the training run's ``metrics.jsonl``). :func:`path` verifies
them before handing the directory out, so a damaged copy fails naming the file instead of
producing wrong numbers. Every command that takes a checkpoint accepts ``zoo:NAME``::

    factorize eval zoo:fm-cnn-seed0
    factorize convert zoo:fm-cnn-seed0 --family tucker2 --macs 0.25 --out runs/fm-tucker2
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from factorize._io import atomic_write_json, sha256_file
from factorize.training.checkpoint import CHECKPOINT_DIR, CheckpointError

__all__ = ["ROOT", "ZooError", "add", "info", "list_models", "load", "path"]

ROOT = Path(__file__).resolve().parents[1] / "zoo"
MANIFEST = "MANIFEST.json"
FORMAT = 1
# What a zoo entry keeps of a training run: what restore reads, and the training curve.
RUN_FILES = (CHECKPOINT_DIR, "metrics.jsonl")


class ZooError(CheckpointError):
    """An unknown zoo name, or a zoo file that is missing, truncated or corrupt."""


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else ROOT


def _manifest(root: Path) -> dict[str, Any]:
    f = root / MANIFEST
    if not f.is_file():
        raise ZooError(f"{f}: the model zoo manifest is missing")
    try:
        manifest = json.loads(f.read_text())
    except ValueError as e:
        raise ZooError(f"{f}: corrupt zoo manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ZooError(f"{f}: unsupported zoo format {manifest.get('format')!r} (reads {FORMAT})")
    return manifest


def list_models(root: str | os.PathLike | None = None) -> list[str]:
    """The names of the zoo's models, in manifest order.

    Example::

        from factorize import zoo
        assert "digits-cnn" in zoo.list_models()
    """
    return [m["name"] for m in _manifest(_root(root))["models"]]


def info(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest entry of model ``name``: dataset, model, training command, test accuracy,
    MACs, params, size and ``files`` ({relative path: {"size", "sha256"}}).

    Example::

        from factorize import zoo
        zoo.info("digits-cnn")["test_accuracy"]
    """
    models = {m["name"]: m for m in _manifest(_root(root))["models"]}
    if name not in models:
        raise ZooError(f"unknown zoo model {name!r}; known: {', '.join(models) or 'none'}")
    return models[name]


def _files(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def path(name: str, root: str | os.PathLike | None = None, *, verify: bool = True) -> Path:
    """The directory of zoo model ``name`` (a run directory: ``checkpoint/``,
    ``metrics.jsonl``), after checking every file's size and sha256 against the manifest.

    Raises :class:`ZooError` for an unknown name (listing the known ones) or a missing,
    truncated or corrupt file (naming it).

    Example::

        from factorize import zoo
        from factorize.training import restore
        model = restore(zoo.path("digits-cnn"))
    """
    root = _root(root)
    entry = info(name, root)
    directory = root / name
    if verify:
        for rel, want in entry["files"].items():
            f = directory / rel
            if not f.is_file():
                raise ZooError(f"{f}: zoo file is missing (model {name!r})")
            if f.stat().st_size != want["size"]:
                raise ZooError(f"{f}: zoo file truncated or corrupt: expected {want['size']} "
                               f"bytes, got {f.stat().st_size}")
            if sha256_file(f) != want["sha256"]:
                raise ZooError(f"{f}: zoo file corrupt: sha256 does not match {MANIFEST}")
    return directory


def load(name: str, root: str | os.PathLike | None = None):
    """The zoo model ``name`` restored (eval mode), checksums verified.

    Example::

        from factorize import zoo
        model = zoo.load("digits-cnn")
        model(jnp.zeros((1, 8, 8, 1))).shape       # (1, 10)
    """
    from factorize.conversion import layer_builder
    from factorize.training import restore

    return restore(path(name, root), layer_builder=layer_builder)


def add(
    run: str | os.PathLike,
    name: str,
    *,
    command: str,
    root: str | os.PathLike | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Copy training run ``run``'s checkpoint and metrics into the zoo as ``name`` and record
    it in the manifest: ``command`` (how it was trained), its test accuracy on the full test
    set, MACs, params and every file's checksum. Refuses an existing name; the entry's
    directory is written under a temporary name and renamed into place.
    """
    from factorize.cli import evaluate_checkpoint
    from factorize.training.checkpoint import resolve_checkpoint

    root = _root(root)
    run = Path(run)
    manifest = (_manifest(root) if (root / MANIFEST).exists()
                else {"format": FORMAT, "models": []})
    if any(m["name"] == name for m in manifest["models"]):
        raise ZooError(f"zoo model {name!r} already exists in {root / MANIFEST}")
    ckpt = resolve_checkpoint(run)
    if ckpt != run / CHECKPOINT_DIR:
        raise ValueError(f"{run}: expected a run directory holding {CHECKPOINT_DIR}/")
    missing = [f for f in RUN_FILES if not (run / f).exists()]
    if missing:
        raise FileNotFoundError(f"{run}: missing {missing}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        shutil.copytree(run / CHECKPOINT_DIR, tmp / CHECKPOINT_DIR)
        shutil.copy2(run / "metrics.jsonl", tmp / "metrics.jsonl")
        res = evaluate_checkpoint(tmp, data_dir=data_dir)
        files = _files(tmp)
        entry = {
            "name": name, "dataset": res["dataset"], "model": res["model"],
            "training_command": command, "test_accuracy": res["accuracy"],
            "n_test": res["n_test"], "macs": res["macs"], "params": res["params"],
            "size": sum(f["size"] for f in files.values()), "files": files,
        }
        os.replace(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["models"].append(entry)
    atomic_write_json(root / MANIFEST, manifest)
    return entry
