"""A persistent XLA compilation cache for airysort's commands, one per kind of machine.

Every ``train``, ``predict``, ``embed`` and ``explain`` compiles its network's programs
when it starts: 10–20 s on a 2-core CPU, every time. JAX can keep compiled programs on
disk and reuse them, but its cache key does not name the CPU's instruction set, so one
directory shared by the nodes of a heterogeneous cluster (a home directory) could hand a
node code built for another CPU. Here each kind of machine gets a directory of its own,
named by a hash of the CPU model and instruction-set flags and the jaxlib version:

    ~/.cache/airysort/xla/<hash>/        ($XDG_CACHE_HOME instead of ~/.cache if set)

``JAX_COMPILATION_CACHE_DIR``, when set, wins (JAX reads it itself), and
``AIRYSORT_XLA_CACHE=off`` turns the cache off. The directory is kept under
:data:`MAX_BYTES`; JAX drops the least recently used programs beyond that.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

#: Largest size of one machine's cache directory, bytes.
MAX_BYTES = 2 * 1024**3

#: Values of ``AIRYSORT_XLA_CACHE`` that turn the cache off.
OFF = ("0", "off", "no", "false")


def machine_key(cpuinfo: str | None = None) -> str:
    """A short hash of what compiled code depends on: the CPU's model and
    instruction-set flags (``/proc/cpuinfo``'s first processor, else
    :func:`platform.processor`), the machine type and the jaxlib version."""
    import jaxlib

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = platform.processor()
    first_processor = cpuinfo.strip().split("\n\n")[0]
    fields = [line for line in first_processor.splitlines()
              if line.split(":")[0].strip() in ("vendor_id", "model name", "flags", "Features", "CPU part")]
    text = "\n".join([platform.machine(), jaxlib.__version__, *fields])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_directory() -> Path:
    """This machine's cache directory (not created)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "airysort" / "xla" / machine_key()


def use_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at :func:`cache_directory`.

    Call before the process compiles anything (JAX looks at the setting once). Returns the
    directory, or None where the user chose another one (``JAX_COMPILATION_CACHE_DIR``),
    turned it off (``AIRYSORT_XLA_CACHE=off``), or it cannot be created (a read-only home):
    the command then compiles as without a cache.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return None
    if os.environ.get("AIRYSORT_XLA_CACHE", "").strip().lower() in OFF:
        return None
    directory = cache_directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    if jax.config.jax_compilation_cache_max_size == -1 and _have_filelock():  # JAX's default: no limit
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory


def _have_filelock() -> bool:
    """JAX needs ``filelock`` (a dependency of airysort) to keep the cache under a size
    limit; without it, setting one makes every cache read fail (with a warning)."""
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True
