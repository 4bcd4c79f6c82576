"""Shared fixtures."""

from __future__ import annotations

import pytest


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
