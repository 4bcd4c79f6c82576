"""Data parallelism: one device mesh, batches sharded along it, parameters replicated.

All of airysort's training and inference runs under ``jax.jit`` with a 1-D mesh
named ``"data"`` spanning every device of every process. Batches are sharded
along their first axis (:func:`batch_sharding`), model and optimiser state are
replicated (:func:`replicated_sharding`), and XLA inserts the gradient
all-reduce. Under SLURM with more than one task, :func:`maybe_initialize_distributed`
connects the processes first so that the mesh spans all nodes.

The mesh uses ``AxisType.Auto`` axes: the explicit-sharding default of recent
JAX rejects some ops (e.g. convolutions with batch statistics) that need no
annotation in auto mode.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> bool:
    """Call :func:`jax.distributed.initialize` when running as one of several SLURM tasks.

    JAX reads the coordinator address, process count and id from the SLURM
    environment itself. Outside SLURM, or with a single task, nothing happens.

    Returns
    -------
    bool
        True if the distributed runtime was initialised by this call.
    """
    n_tasks = int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1)
    if "SLURM_JOB_ID" not in os.environ or n_tasks <= 1:
        return False
    if jax.distributed.is_initialized():
        return False
    jax.distributed.initialize()
    return True


def make_data_mesh(devices: list | None = None) -> Mesh:
    """1-D mesh over ``devices`` (default: all devices of all processes) named ``"data"``."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shard the leading (batch) axis across the mesh, replicate the others."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the full array (parameters, optimiser state)."""
    return NamedSharding(mesh, P())


def round_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Smallest multiple of the mesh size that is >= ``batch_size``."""
    n = mesh.size
    return max(n, -(-batch_size // n) * n)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Move a host batch onto the mesh, split along the batch axis.

    In a single process ``batch`` is the global batch. With several processes
    each passes its own local part (``global_batch / process_count`` rows) and the
    global array is assembled without copying data between hosts.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, a), batch
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` (e.g. ``nnx.state(model)``) on all devices of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))
