"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dask_threads():
    """An in-process Dask cluster shared by the tests (fast to start)."""
    from pipeline.dask_cluster import dask_client

    with dask_client("local-threads") as client:
        yield client
