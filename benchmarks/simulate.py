"""Simulator throughput: patterns per second per core, per forward model and frame size.

Run: ``.venv/bin/python benchmarks/simulate.py [--quick] [--sizes 256] [--default-malloc]``

Each row renders shots with the real label mix (the real set's combination frequencies, ``pipeline.taxonomy``) in this
process on one core (finufft single-threaded, no Dask), in blocks of
``beamtime.BLOCK`` shots as a Dask worker does, timing CPU seconds so that other
load on the machine does not count. Targets (issue 3): projection >= 200
patterns/s per core at 256^2, MSFT >= 5 per core at 256^2, for MSFT as shipped (the
fermi profile: the wave propagated through each droplet in 15 nm slices,
``slice_thickness: 15.0e-9``, within 0.05 dex of exact Mie theory to 30 degrees),
shown beside 10 nm slices (``msft-10nm``) and the wave in straight lines
(``msft-straight``, ``slice_thickness: null``). The baseline for the ratios is the
projection model at 256^2 measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from pipeline.dask_cluster import worker_environ
from pipeline.simulate.beamtime import BLOCK, render_block
from pipeline.simulate.profile import load_profile

#: Rows: name -> (forward model, MSFT slice thickness in m, None for straight lines, or
#: PROFILE for the shipped profile's own setting).
PROFILE = "profile"
MODELS = {"projection": ("projection", None), "born": ("born", None), "msft": ("msft", PROFILE),
          "msft-10nm": ("msft", 10e-9), "msft-straight": ("msft", None)}
TARGETS = {("projection", 256): 200.0, ("msft", 256): 5.0}
#: Environment of airysort's Dask workers (pipeline.dask_cluster.worker_environ), split in
#: two. glibc settings: with the defaults, every frame-sized temporary is a fresh mmap
#: that page-faults (several times the arithmetic's CPU time at 256^2); workers keep
#: freed memory for reuse instead. Thread limits: one BLAS/OpenMP thread, as distributed
#: gives each worker; extra BLAS threads spin and would be charged as CPU time here.
_WORKER = {name: str(value) for name, value in worker_environ().items()}
WORKER_MALLOC = {name: value for name, value in _WORKER.items() if name.startswith("MALLOC_")}
WORKER_THREADS = {name: value for name, value in _WORKER.items() if name.endswith("_NUM_THREADS")}


def rate(name: str, size: int, n: int) -> float:
    """Patterns per CPU second for ``n`` shots of the given row of MODELS and frame size."""
    model, slice_thickness = MODELS[name]
    # Projection belongs to the small-angle geometry; Born and MSFT to the wide-angle one.
    base = load_profile("lcls" if model == "projection" else "fermi")
    if slice_thickness != PROFILE:
        base = dataclasses.replace(base, slice_thickness=slice_thickness)
    profile = dataclasses.replace(base, model=model).at_size(size)
    render_block(0, 8, seed=99, profile=profile, balanced=True)  # JIT compilation and set-up
    start = time.process_time()
    # Worker-sized blocks: one block of all n shots would also time page faults of its
    # output array (63 MB for 240 frames at 256^2), which no worker allocates.
    for first in range(0, n, BLOCK):
        render_block(first, min(first + BLOCK, n), seed=1, profile=profile, balanced=False)
    return n / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shots (noisier)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], choices=[256, 1024])
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's allocator defaults instead of the workers' settings")
    args = parser.parse_args()
    wanted = {**WORKER_THREADS, **({} if args.default_malloc else WORKER_MALLOC)}
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        # The allocator and BLAS read these at start-up: run again with them set.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})
    print("allocator:", "glibc defaults" if args.default_malloc else "Dask worker settings "
          + " ".join(f"{k}={v}" for k, v in WORKER_MALLOC.items()))
    print("threads:", " ".join(f"{k}={v}" for k, v in WORKER_THREADS.items()), "(as in a Dask worker)")
    counts = {256: 60, 1024: 4} if not args.quick else {256: 16, 1024: 1}
    rows = []
    for size in args.sizes:
        for name in MODELS:
            n = counts[size] * (4 if name == "projection" else 1)
            rows.append((name, size, rate(name, size, n)))
    baseline = rows[0][2]
    print(f"{'model':<12} {'frame':>6} {'patterns/s/core':>16} {'vs projection 256':>18} {'target':>7} {'met':>4}")
    for model, size, value in rows:
        target = TARGETS.get((model, size))
        met = "" if target is None else ("yes" if value >= target else "NO")
        print(f"{model:<12} {size:>5}² {value:>16.2f} {value / baseline:>18.3f} "
              f"{'' if target is None else f'{target:g}':>7} {met:>4}")


if __name__ == "__main__":
    main()
