"""Large allocations on transparent huge pages, for the ``airysort`` command's processes.

XLA's CPU backend allocates each training step's buffers (hundreds of MB for a
ResNet-18 batch) afresh. glibc serves allocations above 32 MB with ``mmap`` and returns
them with ``munmap``, so every step faults in new 4 KiB pages: about 50,000 page faults
and 0.19 s of system time per step on a 2-core machine, and the cache misses of memory
touched for the first time. glibc's ``glibc.malloc.hugetlb=1`` tunable (glibc 2.35 and
later) asks the kernel for transparent huge pages (2 MiB) on those allocations instead:
580 faults per step, and the ResNet-18 training step takes 14 % less time
(``benchmarks/cnn.py``, README). NumPy already does the same for its own arrays.

A glibc tunable is read once, when a process starts, so :func:`restart_with_huge_pages`
starts the command again (``exec``: same process id, arguments and environment) with
the tunable set. The Dask workers that the command starts inherit it. Setting
``GLIBC_TUNABLES`` yourself, for example ``glibc.malloc.hugetlb=0``, turns this off.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"

#: Set in the environment of the restarted process.
RESTARTED = "AIRYSORT_HUGE_PAGES_RESTART"

#: The kernel's transparent-huge-page mode (``always [madvise] never``).
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``),
    or None where the kernel does not say (not Linux)."""
    try:
        text = THP_MODE_FILE.read_text()
    except OSError:
        return None
    chosen = [word.strip("[]") for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


def glibc_version() -> tuple[int, ...] | None:
    """The C library's version where it is glibc, else None."""
    library, version = platform.libc_ver()
    if library != "glibc" or not version:
        return None
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def environ_with_huge_pages(
    environ: dict[str, str], *, glibc: tuple[int, ...] | None, thp_mode: str | None
) -> dict[str, str] | None:
    """``environ`` with :data:`TUNABLE` set to 1 in ``GLIBC_TUNABLES``, or None where that
    would change nothing: not glibc 2.35 or later, transparent huge pages off or
    unknown, or the tunable already given (the user's choice stands)."""
    if glibc is None or glibc < (2, 35) or thp_mode not in ("always", "madvise"):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=")[0] == TUNABLE for item in current.split(":")):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (current, f"{TUNABLE}=1")))}


def restart_with_huge_pages() -> None:
    """Start this process again with :data:`TUNABLE` set, where it helps (see
    :func:`environ_with_huge_pages`); return where nothing changes or ``exec`` fails.

    Call it first thing in a command-line entry point: nothing the process did before
    survives the restart.
    """
    # A script read from stdin ("-") or typed in could not be started again.
    if not sys.orig_argv or sys.argv[0] in ("", "-") or os.environ.get(RESTARTED):
        return
    environ = environ_with_huge_pages(dict(os.environ), glibc=glibc_version(), thp_mode=transparent_huge_pages())
    if environ is None:
        return
    environ[RESTARTED] = "1"  # never twice, whatever the C library makes of the tunable
    sys.stdout.flush()  # exec discards what Python still buffers
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError:  # go on with the default allocator
        return
