"""The command's restart with glibc's huge-page tunable (pipeline.allocator)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import allocator
from tests.factories import repo_env


@pytest.mark.parametrize(
    ("environ", "glibc", "thp", "expected"),
    [
        ({}, (2, 36), "madvise", "glibc.malloc.hugetlb=1"),
        ({}, (2, 35), "always", "glibc.malloc.hugetlb=1"),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise",
         "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # the user's choice stands
        ({}, (2, 34), "madvise", None),  # the tunable is not known there
        ({}, None, "madvise", None),  # not glibc (musl, macOS)
        ({}, (2, 36), "never", None),
        ({}, (2, 36), None, None),
    ],
)
def test_the_tunable_is_added_only_where_it_helps(environ, glibc, thp, expected):
    result = allocator.environ_with_huge_pages({"PATH": "/bin", **environ}, glibc=glibc, thp_mode=thp)
    if expected is None:
        assert result is None
    else:
        assert result == {"PATH": "/bin", "GLIBC_TUNABLES": expected}


def test_the_kernels_huge_page_mode_is_read_from_sysfs(tmp_path, monkeypatch):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    monkeypatch.setattr(allocator, "THP_MODE_FILE", mode_file)
    assert allocator.transparent_huge_pages() == "madvise"
    monkeypatch.setattr(allocator, "THP_MODE_FILE", tmp_path / "missing")
    assert allocator.transparent_huge_pages() is None


def _environ_without_the_tunable() -> tuple[dict[str, str], bool]:
    """A subprocess environment as a user's shell gives it (no tunable, never restarted),
    and whether the command restarts in it on this machine."""
    environ = {k: v for k, v in repo_env().items() if k not in ("GLIBC_TUNABLES", allocator.RESTARTED)}
    helps = allocator.environ_with_huge_pages(
        environ, glibc=allocator.glibc_version(), thp_mode=allocator.transparent_huge_pages()) is not None
    return environ, helps


def test_the_process_restarts_once_with_the_tunable_and_its_arguments():
    # What the airysort entry point does first, in a real process: the lines before the
    # restart run twice (same process id), the rest once, with the tunable in effect.
    script = (
        "import os, sys\n"
        "from pipeline.allocator import restart_with_huge_pages\n"
        "print('before', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n"
        "restart_with_huge_pages()\n"
        "print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n"
    )
    environ, helps = _environ_without_the_tunable()
    lines = subprocess.run([sys.executable, "-c", script, "one", "two"], env=environ, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    pid = lines[0].split()[1]
    if helps:
        assert lines == [f"before {pid} None ['one', 'two']",
                         f"before {pid} glibc.malloc.hugetlb=1 ['one', 'two']",
                         f"after {pid} glibc.malloc.hugetlb=1 ['one', 'two']"]
    else:  # nothing to gain here: no restart
        assert lines == [f"before {pid} None ['one', 'two']", f"after {pid} None ['one', 'two']"]


def test_the_airysort_entry_point_runs_with_the_tunable():
    # The console script's main(), in a real process; at its exit the process reports the
    # environment it ran with (an exec runs no exit handlers, so only the last one does).
    environ, helps = _environ_without_the_tunable()
    script = ("import atexit, os, sys; atexit.register(lambda: print('ran with', os.environ.get('GLIBC_TUNABLES'))); "
              "sys.argv = ['airysort', '--version']; from pipeline.cli.main import main; main()")
    lines = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert lines[0].startswith("airysort ")
    assert lines[1:] == [f"ran with {'glibc.malloc.hugetlb=1' if helps else None}"]
