"""Ingest throughput and memory against the I/O limit and a naive xarray conversion.

    .venv/bin/python benchmarks/ingest.py            # 20,000 frames of 512x512 uint16
    .venv/bin/python benchmarks/ingest.py --n 2000   # quicker

Writes its own CXI files (diffraction-like frames with Poisson noise, 4 files), then
measures, in the same run:

- h5py read from disk: every frame read with h5py in blocks after the files were
  evicted from the page cache (``posix_fadvise(DONTNEED)``), by one process and by one
  process per core (each reading its share of the files, as ingest's workers do); the
  faster of the two is the I/O limit of the machine, the reference of the "vs disk" ratios;
- h5py read from the page cache: the same with the files in memory (a memory-copy
  limit, far above what any disk delivers; the one-process read is the reference of
  the "vs cache" ratios);
- naive: ``xarray.open_dataset(file, engine="h5netcdf").to_zarr(...)`` per file;
- airysort ingest at N/4 and at N frames from the page cache, and at N from disk, on the
  default local cluster,
- the ceiling that compression alone sets: the store's codec for ``raw`` encoding the same
  frames in its inner chunks on one thread (as in a Dask worker thread), times the cores,

and prints frames/s, MB/s and peak memory (resident set of this process and its worker
processes, sampled every 50 ms) with ratios against both h5py reads.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

from _common import PeakMemory


def diffraction_like_frames(n_templates: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Ring patterns of droplets of random size with Poisson noise (uint16 counts)."""
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape) - np.array(shape)[:, None, None] / 2
    r = np.hypot(y, x) + 1e-3
    frames = []
    for _ in range(n_templates):
        radius_px = rng.uniform(0.05, 0.2)
        envelope = 2e4 / (1 + (r / 12) ** 3)
        intensity = envelope * (np.sinc(2 * r * radius_px) ** 2 + 1e-3)
        frames.append(np.minimum(rng.poisson(intensity), 65535).astype(np.uint16))
    return np.stack(frames)


def write_inputs(directory: Path, n: int, shape: tuple[int, int], n_files: int = 4) -> list[Path]:
    templates = diffraction_like_frames(64, shape)
    paths, per_file = [], n // n_files
    for f in range(n_files):
        path = directory / f"run{f:03d}.cxi"
        count = per_file if f < n_files - 1 else n - per_file * (n_files - 1)
        with h5py.File(path, "w") as h5:
            data = h5.create_dataset("entry_1/data_1/data", shape=(count, *shape), dtype=np.uint16, chunks=(1, *shape))
            for start in range(0, count, 256):
                stop = min(start + 256, count)
                idx = (np.arange(start, stop) * 7 + f) % len(templates)
                data[start:stop] = np.roll(templates[idx], f, axis=-1)
            h5["entry_1/instrument_1/detector_1/distance"] = 0.37
            h5["entry_1/instrument_1/source_1/wavelength"] = 13.5e-9
        paths.append(path)
    return paths


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def h5py_read(paths: list[Path]) -> int:
    frames = 0
    for path in paths:
        with h5py.File(path, "r") as h5:
            data = h5["entry_1/data_1/data"]
            for start in range(0, data.shape[0], 256):
                frames += len(data[start : start + 256])
    return frames


def h5py_read_parallel(paths: list[Path], pool, processes: int) -> int:
    """Frames read by the ``processes`` processes of ``pool`` at once, each reading its
    share of the files (ingest's workers, too, read whole files in parallel)."""
    return sum(pool.map(h5py_read, [paths[i::processes] for i in range(processes)]))


def encode_seconds_per_frame(frames: np.ndarray, repeats: int = 20) -> float:
    """CPU seconds to compress one frame with the store's codec for ``raw``, on one thread.

    Dask workers call Blosc from non-main threads, where numcodecs does not use
    Blosc's own threads; the benchmark does the same.
    """
    from numcodecs import Blosc, blosc

    from pipeline.store import RAW_INNER_CHUNK, compressors

    codec = compressors(frames.dtype)[0]
    shuffle = {"bitshuffle": Blosc.BITSHUFFLE, "shuffle": Blosc.SHUFFLE, "noshuffle": Blosc.NOSHUFFLE}
    numcodec = Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=shuffle[codec.shuffle.value])
    chunk = np.ascontiguousarray(frames[:RAW_INNER_CHUNK])
    threads, blosc.use_threads = blosc.use_threads, False
    try:
        numcodec.encode(chunk)
        start = time.process_time()
        for _ in range(repeats):
            numcodec.encode(chunk)
        return (time.process_time() - start) / (repeats * len(chunk))
    finally:
        blosc.use_threads = threads


def naive_xarray(paths: list[Path], out: Path) -> None:
    import xarray as xr

    for i, path in enumerate(paths):
        ds = xr.open_dataset(path, engine="h5netcdf", phony_dims="sort", group="entry_1/data_1", chunks={})
        ds.to_zarr(out, mode="w" if i == 0 else "a", zarr_format=3, **({} if i == 0 else {"append_dim": ds["data"].dims[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="frames at the largest size (default 20000)")
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels (default 512)")
    parser.add_argument("--workdir", default=None, help="where to write inputs and stores (default: a temp dir)")
    args = parser.parse_args()

    from pipeline.dask_cluster import dask_client
    from pipeline.ingest import ingest

    work = Path(args.workdir or tempfile.mkdtemp(prefix="airysort-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = (args.size, args.size)
    frame_mb = args.size * args.size * 2 / 1e6
    rows = []
    try:
        (work / "small").mkdir()
        (work / "large").mkdir()
        small = write_inputs(work / "small", args.n // 4, shape)
        large = write_inputs(work / "large", args.n, shape)

        def row(name, n, seconds, peak):
            rows.append((name, n, seconds, n / seconds, n * frame_mb / seconds, peak / 2**20))

        cores = psutil.cpu_count()

        def timed_read(name, pool=None):
            with PeakMemory() as memory:
                t = time.perf_counter()
                n = h5py_read(large) if pool is None else h5py_read_parallel(large, pool, cores)
                row(name, n, time.perf_counter() - t, memory.peak)

        with multiprocessing.get_context("spawn").Pool(cores) as pool:
            pool.map(h5py_read, [[]] * cores)  # processes up, h5py imported, before timing
            evict(large)
            timed_read("h5py read, disk")
            evict(large)
            timed_read(f"h5py read, disk, {cores} proc", pool)
            h5py_read(large)  # now in the page cache
            timed_read("h5py read, page cache")
            timed_read(f"h5py read, cache, {cores} proc", pool)
        try:
            with PeakMemory() as memory:
                t = time.perf_counter()
                naive_xarray(large, work / "naive.zarr")
                row("naive xarray to_zarr", args.n, time.perf_counter() - t, memory.peak)
        except Exception as error:  # h5netcdf missing or the layout not understood
            print(f"naive xarray conversion skipped: {type(error).__name__}: {error}")
        with dask_client("local") as client:
            runs = (("ingest N/4, page cache", small, args.n // 4, False),
                    ("ingest N, page cache", large, args.n, False),
                    ("ingest N, disk", large, args.n, True))
            for index, (name, paths, n, cold) in enumerate(runs):
                h5py_read(paths)
                if cold:
                    evict(paths)
                client.run(lambda: None)  # workers up before timing
                with PeakMemory() as memory:
                    t = time.perf_counter()
                    result = ingest(work / f"ingest{index}.zarr", paths, client=client, log=lambda line: None)
                    row(name, n, time.perf_counter() - t, memory.peak)
                assert result["patterns"] == n, result
        with h5py.File(large[0], "r") as h5:
            sample = h5["entry_1/data_1/data"][:64]
        encode = encode_seconds_per_frame(sample)
        rows.append((f"compress only, {cores} cores", args.n, args.n * encode / cores, cores / encode,
                     cores / encode * frame_mb, float("nan")))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    disk, cache = max(rows[0][3], rows[1][3]), rows[2][3]
    print(f"\ningest benchmark: {args.n} frames of {args.size}x{args.size} uint16, {psutil.cpu_count()} cores")
    print(f"'vs disk': against the faster h5py read from disk ({disk:.0f} frames/s, the I/O limit); "
          f"'vs cache': against the one-process h5py read from the page cache ({cache:.0f} frames/s)")
    print(f"{'method':<24} {'frames':>8} {'seconds':>9} {'frames/s':>10} {'MB/s':>8} {'peak MiB':>9} "
          f"{'vs disk':>8} {'vs cache':>9}")
    for name, n, seconds, fps, mbps, peak in rows:
        print(f"{name:<24} {n:>8} {seconds:>9.1f} {fps:>10.0f} {mbps:>8.0f} {peak:>9.0f} "
              f"{fps / disk:>8.2f} {fps / cache:>9.2f}")
    ingest_disk = next(r for r in rows if r[0] == "ingest N, disk")
    print(f"target: ingest >= 60 % of the h5py read from disk (the I/O limit): "
          f"{ingest_disk[3] / disk:.2f} for the ingest of N frames from disk")
    print(f"compression alone: {encode * 1e3:.3f} ms of CPU per frame ({args.size}x{args.size} uint16) on one "
          f"thread, so no ingest that compresses with this codec exceeds {cores / encode:.0f} frames/s "
          f"on {cores} cores ({cores / encode / cache:.2f} of the page-cache read)")


if __name__ == "__main__":
    main()
