"""Data parallelism with ``jax.sharding``: a 1-D mesh over devices, batches split on ``'data'``.

Parameters and optimizer state are replicated; each batch is split along its first axis over the
mesh, and ``jax.jit`` inserts the cross-device reductions (gradient means, BatchNorm batch
statistics), so the maths is that of one big batch on one device. The same code runs on one CPU,
several GPUs, or several hosts: on a multi-host cluster call ``jax.distributed.initialize()``
(coordinator address, process count and id, or auto-detected on SLURM/TPU/…) in every process
*before* any other JAX call; ``jax.devices()`` then lists the devices of all hosts and the mesh
spans them. (Each host must then feed its own slice of the global batch, e.g. with
``jax.make_array_from_process_local_data``; this module covers the single-host case, where
``jax.device_put`` of the global batch does it.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``'data'`` over ``devices`` (default: all devices)."""
    devs = np.array(jax.devices() if devices is None else list(devices))
    return Mesh(devs, (AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raise if ``batch_size`` does not split evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} does not divide over {n} devices; use a multiple of {n} "
            f"(e.g. {max(n, batch_size // n * n)})"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every leaf of ``tree`` on all devices of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Split every leaf of ``tree`` along its first axis over ``mesh``."""
    return jax.device_put(tree, batch_sharded(mesh))
