"""Latency of ``airysort watch``: seconds from a file landing to its patterns classified.

    .venv/bin/python benchmarks/watch.py              # 4 files of 256 frames of 512x512 (lcls)
    .venv/bin/python benchmarks/watch.py --files 8 --frames 512

Simulates FILES files of FRAMES ``lcls`` frames (512², float32 photons) and trains the
README's classifier (ResNet-18, width 16, 128² input) for one epoch on the first file's
labels: its accuracy does not matter here, only its cost. Then, on a default local
cluster (worker processes, as ``airysort watch`` runs by default):

- online: :func:`pipeline.watch.process_batch` once per file, which is what ``watch``
  does when a file lands (the first also finds the run's hot pixels, background and hit
  threshold); seconds per stage;
- offline baseline, in the same run: all files ingested at once, then ``preprocess``
  and ``predict`` over the whole store.

Prints a table of seconds per stage and patterns/s, and the online throughput (files
after the first) as a ratio of the offline one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Benchmark the source tree this script belongs to, whatever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--frames", type=int, default=256, help="frames per file")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    if args.files < 2:
        raise SystemExit("--files must be at least 2 (the first file also sets up the run)")

    from pipeline.classify import predict_store, train_classifier
    from pipeline.dask_cluster import dask_client
    from pipeline.ingest import ingest
    from pipeline.preprocess import preprocess_store
    from pipeline.simulate import simulate_beamtime
    from pipeline.watch import process_batch

    work = args.work or Path(tempfile.mkdtemp(prefix="airysort-watch-"))
    daq, model = work / "daq", work / "model"
    daq.mkdir(parents=True, exist_ok=True)
    quiet = lambda line: None  # noqa: E731
    rows = []
    with dask_client("local") as client:
        files = [daq / f"run_{i:04d}.cxi" for i in range(args.files)]
        for i, path in enumerate(files):
            simulate_beamtime(path, args.frames, size=512, seed=100 + i, profile="lcls", client=client)
        print(f"simulated {args.files} files of {args.frames} frames in {work}", file=sys.stderr)
        train = work / "train.zarr"
        ingest(train, [files[0]], log=quiet)
        preprocess_store(train, size=128)
        train_classifier(train, model, depth=18, width=16, epochs=1, batch_size=32, patience=0, log=quiet)

        online = work / "online.zarr"
        for i, path in enumerate(files):
            batch = process_batch([str(path)], online, model, log=quiet)
            rows.append((f"online, file {i + 1}" + (" (sets up the run)" if i == 0 else ""), batch["predicted"],
                         batch["seconds"]))

        offline = work / "offline.zarr"
        start = time.perf_counter()
        ingest(offline, files, log=quiet)
        seconds = {"ingest": time.perf_counter() - start}
        preprocess_store(offline, size=128)
        seconds["preprocess"] = time.perf_counter() - start - seconds["ingest"]
        predict_store(offline, model)
        seconds["predict"] = time.perf_counter() - start - seconds["ingest"] - seconds["preprocess"]
        rows.append(("offline, all files at once (baseline)", args.files * args.frames, seconds))

    print("\n| run | patterns | ingest s | preprocess s | predict s | total s | patterns/s |")
    print("|---|---|---|---|---|---|---|")
    for name, n, stage in rows:
        total = sum(stage.values())
        print(f"| {name} | {n} | {stage['ingest']:.2f} | {stage['preprocess']:.2f} | {stage['predict']:.2f} "
              f"| {total:.2f} | {n / total:.0f} |")
    steady = rows[1:-1]
    online_rate = sum(n for _, n, _ in steady) / sum(sum(s.values()) for _, _, s in steady)
    offline_rate = rows[-1][1] / sum(rows[-1][2].values())
    print(f"\nonline (files 2..{args.files}) {online_rate:.0f} patterns/s = {online_rate / offline_rate:.2f} x offline "
          f"({offline_rate:.0f} patterns/s)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
