"""Throughput and memory of ``preprocess`` and ``correlate`` against the I/O limit and a loop.

    .venv/bin/python benchmarks/preprocess.py            # 10,000 frames of 512x512 uint16
    .venv/bin/python benchmarks/preprocess.py --n 1000   # quicker

Builds its own stores through the store API (``create_store``, then whole shards of
diffraction-like frames: elliptical Airy patterns with jittered centres, Poisson noise,
a quarter of empty frames, a central hole, a gap and hot pixels), one of N/4 and one of
N frames, and measures in the same run, each store on a fresh default local cluster
(its workers warmed up by importing the pipeline first):

- read: reading and decompressing ``raw`` with Dask as the stages read it, whole shards
  (``store.open_store``), nothing else (the I/O limit),
- preprocess: ``preprocess_store`` (all of its passes and the writes),
- correlate: ``correlate_store`` (default q1 = q2 variant, writes included),

with wall and CPU seconds (this process and its workers; CPU time is the fairer
measure on a machine shared with other work),

plus a plain loop in this one process over the first frames of the N store: read a
block of frames with zarr, then per frame the same kernels with the run's settings
(``find_hits_block`` and ``preprocess_frame``; ``correlate_frame``: the block kernels
on a block of one frame). Prints frames/s, MB/s of raw data
(uncompressed) and peak memory (resident set of this process and its workers, sampled
every 50 ms), with ratios against the read limit; then the CPU cost per frame of the
preprocessing kernel alone (``analyse_block`` timed on one worker) next to that of reading.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import scipy.special
import zarr

from _common import PeakMemory

# Benchmark the source tree this script belongs to, whatever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = (512, 512)


def frame_bank(n_frames: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct noisy frames (uint16) to cycle through, and the detector mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(SHAPE, dtype=np.float32)
    frames = np.empty((n_frames, *SHAPE), np.uint16)
    for i in range(n_frames):
        if i % 4 == 3:  # empty frame: background only
            frames[i] = rng.poisson(0.05, SHAPE)
            continue
        cy, cx = 255.5 + rng.uniform(-4, 4, 2)
        angle, ellipticity = rng.uniform(0, np.pi), rng.uniform(1, 1.5)
        u = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
        v = (-np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy)) * ellipticity
        x = np.maximum(3.8317 * np.hypot(u, v) / rng.uniform(8, 30), 1e-6)
        intensity = (2 * scipy.special.j1(x) / x) ** 2
        frames[i] = np.minimum(rng.poisson(intensity / intensity.sum() * 10 ** rng.uniform(5, 6.5) + 0.05), 65535)
    frames[:, 100, 300] += 400  # hot pixels
    frames[:, 400, 77] += 900
    mask = np.hypot(yy - 255.5, xx - 255.5) < 12
    mask[:, 300:303] = True
    return frames, mask


def build_store(path: Path, n: int, bank: np.ndarray, mask: np.ndarray) -> None:
    from pipeline import store

    store.create_store(
        path, frame_shape=SHAPE, dtype=np.uint16, mask=mask,
        geometry={"wavelength": 13.5e-9, "detector_distance": 0.37, "pixel_size": 75e-6},
    )
    store.resize_patterns(path, n)
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    for start in range(0, n, store.PATTERN_CHUNK):  # whole shards, one at a time
        stop = min(start + store.PATTERN_CHUNK, n)
        group["raw"][start:stop] = bank[np.arange(start, stop) * 7 % len(bank)]
    group["pattern"][:] = np.arange(n)
    group["label"][:] = -1
    store.consolidate(path)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its (living) children."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def timed(function) -> tuple[float, float, int, object]:
    """Wall seconds, CPU seconds (this process and its workers), peak RSS, result."""
    with PeakMemory() as memory:
        cpu = cpu_seconds()
        start = time.perf_counter()
        result = function()
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu
    return seconds, cpu, memory.peak, result


def read_raw(path: Path) -> int:
    import dask.array as da

    from pipeline import store

    raw = store.open_store(path)["raw"].data  # as the stages read it
    counts = da.map_blocks(lambda b: np.array([b.shape[0]]), raw, drop_axis=[1, 2], chunks=((1,) * raw.numblocks[0],),
                           dtype=np.int64)
    return int(counts.sum().compute())


def _warm_up() -> None:
    import pipeline.correlate_kernels  # noqa: F401
    import pipeline.preprocess  # noqa: F401
    import pipeline.store  # noqa: F401


def _kernel_settings(path: Path):
    """The block kernels' settings of the store's last ``preprocess`` run."""
    from pipeline import store
    from pipeline.preprocess import run_settings

    group = zarr.open_group(path, mode="r", use_consolidated=False)
    parameters = store.last_parameters(store.read_attrs(path), "preprocess")
    return run_settings(parameters, run_mask=group["preprocess_mask"][:].astype(bool),
                        background=group["background"][:], dark=None)


def loop_preprocess(path: Path, n_frames: int) -> None:
    """One process, frame by frame, the same kernels as the preprocess graph."""
    from pipeline import preprocess_kernels as pk
    from pipeline import store

    hit_settings, settings = _kernel_settings(path)
    raw = zarr.open_group(path, mode="r", use_consolidated=False)["raw"]
    for start in range(0, n_frames, store.RAW_INNER_CHUNK):
        for frame in raw[start : min(start + store.RAW_INNER_CHUNK, n_frames)]:
            _, hit = pk.find_hits_block(frame[None], hit_settings=hit_settings)
            pk.preprocess_frame(frame, hit=bool(hit[0]), settings=settings)


def kernel_seconds_per_frame(path: Path, repeats: int = 3) -> float:
    """Seconds per frame of the preprocessing kernel alone (``analyse_block``: hits, centring,
    scaling, resampling, normalisation) on the store's first shard, best of ``repeats``;
    run on a Dask worker, it sees the workers' allocator settings."""
    from pipeline import preprocess_kernels as pk
    from pipeline import store

    hit_settings, settings = _kernel_settings(path)
    frames = zarr.open_group(path, mode="r", use_consolidated=False)["raw"][: store.PATTERN_CHUNK]
    pk.analyse_block(frames[:8], hit_settings=hit_settings, settings=settings)  # compiled loops loaded
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pk.analyse_block(frames, hit_settings=hit_settings, settings=settings)
        best = min(best, time.perf_counter() - start)
    return best / len(frames)


def loop_correlate(path: Path, n_frames: int) -> None:
    from pipeline import correlate_kernels as ck
    from pipeline import store

    group = zarr.open_group(path, mode="r", use_consolidated=False)
    parameters = store.read_attrs(path)["provenance"][-1]["parameters"]
    settings = ck.CorrelateSettings(
        mask=group["preprocess_mask"][:], background=group["background"][:], r_min=parameters["r_min"],
        r_max=parameters["r_max"], n_q=parameters["n_q"], n_phi=parameters["n_phi"],
        saturation=parameters["saturation"],
    )
    centres = np.stack([group["centre_y"][:n_frames], group["centre_x"][:n_frames]], axis=1)
    raw = group["raw"]
    for start in range(0, n_frames, store.RAW_INNER_CHUNK):
        block = raw[start : min(start + store.RAW_INNER_CHUNK, n_frames)]
        for i, frame in enumerate(block):
            ck.correlate_frame(frame, centre=tuple(centres[start + i]), settings=settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="frames in the large store (the small one has N/4)")
    parser.add_argument("--loop-frames", type=int, default=1024,
                        help="frames timed in the plain loop (enough for seconds, not a lucky moment of load)")
    parser.add_argument("--cluster", default="local", help="--cluster of the stages (default: local)")
    parser.add_argument("--keep", type=Path, default=None, help="build the stores here and keep them")
    args = parser.parse_args()

    from pipeline.correlate import correlate_store
    from pipeline.dask_cluster import dask_client
    from pipeline.preprocess import preprocess_store

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="airysort-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    frame_mb = np.prod(SHAPE) * 2 / 1e6
    rows = []
    try:
        t0 = time.perf_counter()
        bank, mask = frame_bank(256)
        sizes = sorted({max(args.n // 4, 1), args.n})
        for n in sizes:
            build_store(workdir / f"n{n}.zarr", n, bank, mask)
        print(f"built stores of {sizes} frames of {SHAPE[0]}x{SHAPE[1]} uint16 in {time.perf_counter() - t0:.0f} s "
              f"(cpus: {os.cpu_count()}, cluster: {args.cluster}, load: {os.getloadavg()[0]:.1f})", flush=True)
        for n in sizes:
            path = workdir / f"n{n}.zarr"
            with dask_client(args.cluster) as client:
                # Worker start-up (imports of zarr, xarray and the kernels) is not charged
                # to whichever stage happens to run first, the read limit.
                client.run(_warm_up)
                read_limit = None
                for stage, run in (
                    ("read raw (I/O limit)", lambda: read_raw(path)),
                    ("preprocess", lambda: preprocess_store(path)),
                    ("correlate", lambda: correlate_store(path)),
                ):
                    seconds, cpu, peak, result = timed(run)
                    rate = n / seconds
                    read_limit = read_limit or rate
                    rows.append((stage, n, seconds, cpu, rate, rate * frame_mb, rate / read_limit, peak / 1e6))
                    print(f"  {stage:<22} N={n:>6}: {seconds:7.1f} s", flush=True)
                    if stage == "preprocess":
                        print(f"    hits {result['hits']}/{n}, hot pixels {result['hot_pixels']}, "
                              f"background: {result['background']}", flush=True)
                if n == sizes[-1]:  # one worker times the kernel alone while the other idles
                    kernel = client.submit(kernel_seconds_per_frame, path, pure=False).result()
        big = workdir / f"n{sizes[-1]}.zarr"
        m = min(args.loop_frames, sizes[-1])
        limit = rows[3][4]  # read rate of the large store
        for stage, run in (("numpy loop: preprocess", lambda: loop_preprocess(big, m)),
                           ("numpy loop: correlate", lambda: loop_correlate(big, m))):
            seconds, cpu, peak, _ = timed(run)
            rate = m / seconds
            rows.append((stage, m, seconds, cpu, rate, rate * frame_mb, rate / limit, peak / 1e6))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("| stage | frames | wall s | CPU s | frames/s | MB/s (raw) | vs read | frames per CPU s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for stage, n, seconds, cpu, rate, mbs, ratio, peak in rows:
        print(f"| {stage} | {n} | {seconds:.1f} | {cpu:.1f} | {rate:.0f} | {mbs:.0f} | {ratio:.2f} | "
              f"{n / max(cpu, 1e-9):.0f} | {peak:.0f} |")
    by = {(r[0], r[1]): r for r in rows}
    small, large = sizes[0], sizes[-1]
    print()
    for stage in ("preprocess", "correlate"):
        graph, loop, read = by[(stage, large)], by[(f"numpy loop: {stage}", m)], by[("read raw (I/O limit)", large)]
        print(f"{stage}: {graph[4] / read[4]:.2f} x the read limit ({(graph[1] / graph[3]) / (read[1] / read[3]):.2f} "
              f"per CPU second), {graph[4] / loop[4]:.1f} x the plain loop; "
              f"peak memory at N / at N/4 = {graph[7] / by[(stage, small)][7]:.2f}")
    read = by[("read raw (I/O limit)", large)]
    print(f"preprocessing kernel alone (analyse_block on one worker, first {min(large, 256)} frames, best of 3): "
          f"{kernel * 1e3:.2f} ms per frame; reading and decompressing: {read[3] / read[1] * 1e3:.2f} ms of CPU per frame")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cpus)")


if __name__ == "__main__":
    main()
