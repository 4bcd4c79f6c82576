"""Progress under distributed: one step per parallel task, plain lines in log files."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from pipeline.progress import LogProgress, compute_with_progress, parallel_keys


def test_a_store_write_counts_one_step_per_chunk_written(tmp_path, dask_threads, capsys):
    """``to_zarr(compute=False)`` ends in one finalising task; the bar counts the chunk
    writes below it (a bar of 0/1 told nothing for the whole stage), and the values written
    are those of the array."""
    values = np.arange(5 * 256 * 3, dtype=np.float32).reshape(-1, 3)
    dataset = xr.Dataset({"a": (("pattern", "z"), da.from_array(values, chunks=(256, 3)))})
    writes = dataset.to_zarr(tmp_path / "w.zarr", mode="w", compute=False, zarr_format=3)
    assert len(parallel_keys(dict(writes.__dask_graph__()), writes.__dask_keys__())) == 5
    compute_with_progress(writes, "writing")
    lines = capsys.readouterr().err.splitlines()  # pytest's stderr is no terminal: plain lines
    assert lines[0].startswith("writing: 0/5 chunks") and lines[-1].startswith("writing: 5/5 chunks")
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "w.zarr")["a"].values, values)
    # Several variables: each ends in a finalising task of its own; still one step per chunk.
    dataset["b"] = dataset["a"] * 2
    writes = dataset.to_zarr(tmp_path / "w2.zarr", mode="w", compute=False, zarr_format=3)
    assert len(parallel_keys(dict(writes.__dask_graph__()), writes.__dask_keys__())) == 10
    compute_with_progress(writes, "two")
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "w2.zarr")["b"].values, values * 2)
    # A reduction and an array come back as their values.
    assert compute_with_progress(da.arange(1000, chunks=100).sum(), "sum") == 499500
    np.testing.assert_array_equal(compute_with_progress(da.arange(10, chunks=3) * 2, "double"), np.arange(10) * 2)


def test_log_progress_speaks_at_start_end_and_every_interval(capsys):
    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0])
    with LogProgress(interval=30.0, clock=lambda: next(clock)) as bar:
        task = bar.add_task("stage", total=4, unit="shards")  # t = 0: said
        bar.advance(task)  # t = 1: quiet
        bar.advance(task)  # t = 2: quiet
        bar.advance(task)  # t = 40: 30 s passed, said
        bar.advance(task)  # t = 41: done, said
    assert capsys.readouterr().err.splitlines() == [
        "stage: 0/4 shards, 0 s", "stage: 3/4 shards, 40 s, about 13 s left", "stage: 4/4 shards, 41 s"]
