"""Benchmark of the summary commands (`info`, `evaluate`, `sort`, `report`) on a large store.

Builds a store of N patterns holding what those commands read (shot ids, source files,
frames, 2 % labelled, `prob`, `predicted`, `cluster_gmm`; 2x2-pixel frames, since only
the gallery tiles read frames), then runs each command as users do (`airysort ...`, its
own process, the default local cluster) and reports wall time and the command process's
peak resident memory. The baseline, in the same run: reading the same per-pattern
variables straight from Zarr (no xarray, no Dask), the I/O floor of a summary.

    .venv/bin/python benchmarks/summary.py              # 10^6 patterns (about 6 minutes)
    .venv/bin/python benchmarks/summary.py --n 100000   # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COLUMNS = ("shot_id", "source_file", "frame", "label", "prob", "predicted", "cluster_gmm")


def build_store(path: Path, n: int, seed: int = 0) -> None:
    """A store of ``n`` patterns with every variable the summary commands read."""
    import dask.array as da
    import xarray as xr
    import zarr

    from pipeline import store
    from pipeline.dask_cluster import dask_client
    from pipeline.taxonomy import CLASS_NAMES

    rng = np.random.default_rng(seed)
    store.create_store(path, frame_shape=(2, 2), dtype="uint8")
    store.resize_patterns(path, n)
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    for start in range(0, n, store.COORD_CHUNK):
        stop = min(n, start + store.COORD_CHUNK)
        index = np.arange(start, stop)
        group["pattern"][start:stop] = index
        group["shot_id"][start:stop] = np.array([f"r0042_{i:09d}" for i in index], dtype=object)
        group["source_file"][start:stop] = np.array(
            [f"/data/beamtime/raw/run0042_{i // 10_000:04d}.cxi" for i in index], dtype=object)
        group["frame"][start:stop] = index % 10_000
        labels = np.full((stop - start, len(CLASS_NAMES)), -1, np.int8)
        labels[::50] = rng.integers(0, 2, labels[::50].shape)
        group["label"][start:stop] = labels
    prob = rng.random((n, len(CLASS_NAMES))).astype(np.float32)
    results = {"prob": (prob, ("pattern", "class")),
               "predicted": ((prob > 0.7).astype(np.int8), ("pattern", "class")),
               "cluster_gmm": (rng.integers(0, 6, n).astype(np.int32), ("pattern",))}
    with dask_client("local"):
        store.write_variables(path, {name: xr.DataArray(da.from_array(values, chunks=store.COORD_CHUNK), dims=dims)
                                     for name, (values, dims) in results.items()},
                              command="benchmark", parameters={"n": n})


def read_floor(path: Path) -> float:
    """Seconds to read every per-pattern variable the commands use, straight from Zarr."""
    import zarr

    group = zarr.open_group(path, mode="r", use_consolidated=False)
    start = time.perf_counter()
    for name in COLUMNS:
        group[name][...]
    return time.perf_counter() - start


def run_command(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of one `airysort` command's own process."""
    start = time.perf_counter()
    process = psutil.Popen([str(Path(sys.executable).with_name("airysort")), *args],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"airysort {' '.join(args)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="patterns in the store")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="airysort-bench-") as workdir:
        path = Path(workdir) / "big.zarr"
        start = time.perf_counter()
        build_store(path, args.n)
        print(f"built a {args.n:,}-pattern store in {time.perf_counter() - start:.0f} s "
              f"(load average before: {load:.1f} on {os.cpu_count()} cores)")
        floor = read_floor(path)
        rows = [("read the per-pattern variables with zarr (baseline)", floor, float("nan"))]
        for name, command in [("airysort info", ["info", str(path)]),
                              ("airysort evaluate", ["evaluate", str(path)]),
                              ("airysort sort", ["sort", str(path), f"{workdir}/sorted"]),
                              ("airysort report", ["report", str(path), f"{workdir}/report"])]:
            rows.append((name, *run_command(command)))
            shutil.rmtree(f"{workdir}/sorted", ignore_errors=True)
    print(f"{'step':<54}{'seconds':>9}{'peak MiB':>10}{'vs baseline':>13}")
    for name, seconds, peak in rows:
        print(f"{name:<54}{seconds:>9.1f}{peak:>10.0f}{seconds / floor:>12.1f}x")
    print(f"peak MiB: the command's own process (workers not counted); {args.n:,} patterns")


if __name__ == "__main__":
    main()
