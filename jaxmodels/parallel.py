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
import sys
from typing import Any, Callable

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
    if not _in_srun_step():
        if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
            # salloc -n 4, or an sbatch script without srun: one process of several tasks.
            # JAX would fail looking for the step's node list; train here, alone, and say so.
            print(f"NOTE: this SLURM job has {os.environ['SLURM_NTASKS']} tasks but this process was not "
                  "started by srun: it trains alone; start it with srun to train on every task",
                  file=sys.stderr, flush=True)
        return False
    if _slurm_task_count() <= 1 or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize()
    return True


def first_process_only(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on process 0, a no-op on the others: the tasks of one ``srun`` job train
    together, and their log is one (the job's output file would show every line once per
    task otherwise)."""
    return log if jax.process_index() == 0 else (lambda line: None)


def _in_srun_step() -> bool:
    """Whether this process is a task of an ``srun`` job step: JAX's own SLURM detection
    (:class:`jax._src.clusters.SlurmCluster`) needs exactly these variables."""
    return all(name in os.environ for name in
               ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"))


def use_cpu_cores_as_devices(max_devices: int = 8) -> int:
    """Let JAX see each CPU core as a device, so that CPU training shards batches over them.

    XLA's CPU backend runs a YNNPACK convolution on one thread whatever the core count
    (measured: CPU time / wall time 1.00 for a 3×3 convolution, 2.00 for a matrix product
    on two cores), so a ResNet trained on one CPU device leaves the other cores mostly
    idle. With one device per core the data-parallel mesh of :func:`make_data_mesh` runs a
    shard of every batch on each. :func:`use_every_cpu_core` prefers XLA's own kernels,
    which run one convolution on every core, and calls this only where they are missing.
    On a GPU machine this changes nothing: the CPU devices are not the default ones.

    Only effective before JAX starts its backends (the first array or device query), so
    call it at the start of a command. It sets ``--xla_force_host_platform_device_count``
    in ``XLA_FLAGS`` unless that flag is already there (the user's choice wins), and does
    nothing for a process of a multi-task SLURM job. ``train_classifier`` and ``train_vae``
    call it first, so a notebook that trains before any other JAX work gets one device
    per core for the rest of the session.

    Parameters
    ----------
    max_devices : int, default=8
        At most this many CPU devices, since each takes an equal share of the batch.

    Returns
    -------
    int
        The number of CPU devices set, or 0 when nothing was changed.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or _slurm_task_count() > 1 or _jax_backends_started():
        return 0
    n = max(1, min(max_devices, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1))
    if n > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    return n if n > 1 else 0


#: XLA flag that leaves CPU convolutions (and the other ops) to XLA's own kernels instead of
#: the YNNPACK library, which jaxlib 0.10 uses by default. YNNPACK computes a convolution's
#: weight gradient as a convolution whose window is the whole image: a 3×3, 64→64 layer at
#: 32², batch 32, took 240–780 ms for it against 26–35 ms in XLA's kernels, which also run
#: one convolution on every core (CPU time / wall time 1.98 against 1.00).
XLA_CPU_CONVOLUTIONS_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def use_every_cpu_core(max_devices: int = 8) -> str:
    """Make CPU work use every core: XLA's own convolution kernels where the installed XLA
    offers them (:func:`use_xla_cpu_convolutions`), else one device per core
    (:func:`use_cpu_cores_as_devices`).

    On this project's 2-core CPU (ResNet-18, 128², batch 32, images/s, one process per
    setting, two rounds): width 16 trained at 166–167 (YNNPACK, one device per core),
    143–205 (XLA's kernels, one device per core) and 186–200 (XLA's kernels, one device),
    and inferred at 720–759, 675–1016 and 963–1000; width 64 trained at 14–16, 20–23 and
    22–25. So XLA's kernels on one device, which also spares the all-reduce. Call it at
    the start of a command, before JAX starts its backends.

    Returns
    -------
    str
        ``"xla kernels"``, ``"one device per core"`` or ``""`` (nothing changed).
    """
    if use_xla_cpu_convolutions():
        return "xla kernels"
    return "one device per core" if use_cpu_cores_as_devices(max_devices) else ""


def use_xla_cpu_convolutions() -> bool:
    """Let XLA's own kernels, not YNNPACK, run CPU convolutions (:data:`XLA_CPU_CONVOLUTIONS_FLAG`).

    It sets ``XLA_FLAGS``, so it only works before JAX starts its backends. It leaves the
    flags alone when they already name the flag (the user's choice wins), and when the
    installed XLA does not know it (XLA aborts the process on an unknown flag). GPU
    computations are unaffected.

    Returns
    -------
    bool
        Whether ``XLA_FLAGS`` now selects XLA's kernels (set by this call or before it).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    name = XLA_CPU_CONVOLUTIONS_FLAG.strip("-=")
    if name in flags:
        return XLA_CPU_CONVOLUTIONS_FLAG in flags.split()
    if _jax_backends_started() or not _xla_knows_flag(name):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_CONVOLUTIONS_FLAG}".strip()
    return True


def _jax_backends_started() -> bool:
    """Whether JAX has started its backends, after which ``XLA_FLAGS`` is read no more
    (True when this JAX cannot tell)."""
    from jax._src import xla_bridge  # backends_are_initialized is not public API yet

    return getattr(xla_bridge, "backends_are_initialized", lambda: True)()


def _xla_knows_flag(name: str) -> bool:
    """Whether jaxlib's XLA library defines the flag ``name`` (its name is in the binary)."""
    import mmap
    from pathlib import Path

    import jaxlib

    needle = name.encode()
    for library in sorted(Path(jaxlib.__file__).parent.glob("*.so")):
        with open(library, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(needle) >= 0:
                return True
    return False


def _slurm_task_count() -> int:
    """Tasks of the ``srun`` job step this process belongs to (1 outside one)."""
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) if _in_srun_step() else 1


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
    """Place every leaf of ``tree`` (e.g. ``nnx.state(model)``) on all devices of the mesh.

    With several processes each passes the same values (same seed, same checkpoint), and
    each leaf is built from this process's copy. ``jax.device_put`` would first compare
    every leaf across processes, one compiled all-gather per leaf shape: half a minute
    for a small network's parameters and optimiser state on a 2-core node.
    """
    sharding = replicated_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def place(leaf):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            return jax.device_put(leaf, sharding)  # typed keys have no NumPy form
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)
