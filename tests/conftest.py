"""Shared fixtures, and the float precision every test runs at."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

from tests.factories import UNOPTIMISED_XLA

# Full float32 in matrix products and convolutions on every backend, for this process and
# the subprocesses tests start. On NVIDIA GPUs JAX's default precision rounds their inputs to
# TensorFloat-32 (10-bit mantissa), so the tests' checks of determinism (a resumed run
# matches an uninterrupted one; a pattern encodes the same in batches of any size) would
# hold only to about 1e-3. CPUs compute float32 either way.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# One persistent XLA compilation cache for this test session, shared by the subprocesses tests
# start (they inherit the environment): the same small networks are trained, resumed and run in
# many tests, and on a 2-core CPU compiling them takes most of those tests' time. A fresh
# directory each session, so every program is still compiled once per run of the suite.
_XLA_CACHE = tempfile.mkdtemp(prefix="airysort-tests-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)

# XLA's CPU backend without LLVM's optimisation passes, for this process and the subprocesses
# (tests/factories.py ``xla_flags`` keeps it where a test sets its own flags). The tests check
# what programs compute, not how fast: compiling a small network's training step takes half
# the time (12 s -> 6 s for the test VAE) and the values are the same (the tests pass either
# way); the benchmarks run at XLA's default.
os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), UNOPTIMISED_XLA) if f)


@pytest.fixture(scope="session")
def dask_threads():
    """An in-process Dask cluster shared by the tests (fast to start)."""
    from pipeline.dask_cluster import dask_client

    with dask_client("local-threads") as client:
        yield client


@pytest.fixture(scope="session")
def chromium_path():
    """Debian's Chromium for browser checks, installed with apt-get when missing and root."""
    import os
    import shutil
    import subprocess

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"could not install chromium: {' '.join(command)} failed: {result.stderr[-300:]}")
    return shutil.which("chromium")
