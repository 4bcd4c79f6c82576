"""How fast training batches come out of the store: :class:`jaxmodels.data.PatternBatches`
reading the selected patterns every epoch (streaming) against reading them once and keeping
them (``TrainConfig.input_cache_mib``, the default for sets up to 1 GiB), same run.

    .venv/bin/python benchmarks/train_input.py              # 8000 patterns of 128², 10 epochs
    .venv/bin/python benchmarks/train_input.py --n 2048 --epochs 3

The benchmark writes an ``image``-like array with the store's frame encoding (shards of
``PATTERN_CHUNK`` patterns, inner chunks of ``RAW_INNER_CHUNK``, the store's Blosc codec)
filled with ring patterns plus noise, then, for a labelled fraction of 5 %, 20 % and 100 %
of the patterns (scattered at random, as a researcher's labels are), times whole shuffled
epochs of batches of 32 as patterns per second. A labelled subset touches almost every
shard (20 % of 8-pattern inner chunks: 83 % hold a labelled pattern), so streaming decodes
nearly the whole array per epoch, however few patterns it trains on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmodels.data import PatternBatches  # noqa: E402
from pipeline import store  # noqa: E402


def write_images(path: Path, n: int, size: int, seed: int = 0) -> zarr.Array:
    """``n`` float32 images of ring patterns plus noise, encoded like the store's ``image``."""
    array = zarr.create_array(
        str(path), shape=(n, size, size), dtype="float32",
        chunks=(store.RAW_INNER_CHUNK, size, size), shards=(store.PATTERN_CHUNK, size, size),
        compressors=store.compressors(np.dtype("float32")))
    rng = np.random.default_rng(seed)
    r = np.hypot(*np.mgrid[:size, :size] - (size - 1) / 2)
    for start in range(0, n, store.PATTERN_CHUNK):
        stop = min(n, start + store.PATTERN_CHUNK)
        period = rng.uniform(3, 12, size=(stop - start, 1, 1))
        rings = np.log1p(100 * np.cos(np.pi * r / period) ** 2 / (1 + r / 8) ** 3)
        array[start:stop] = (rings + rng.normal(0, 0.1, rings.shape)).astype(np.float32)
    return array


def patterns_per_second(batches: PatternBatches, epochs: int) -> float:
    start, n = time.perf_counter(), 0
    for epoch in range(epochs):
        for batch in batches.epoch(epoch):
            n += int(batch["valid"].sum())
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8000, help="patterns in the array")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp) / "image.zarr", args.n, args.size)
        image_mb = args.n * args.size**2 * 4 / 1e6
        print(f"{args.n} patterns of {args.size}² float32 ({image_mb:.0f} MB decoded), "
              f"{args.epochs} shuffled epochs of batches of {args.batch}")
        print(f"{'labelled':>9}{'patterns':>10}{'streaming /s':>14}{'cached /s':>11}{'ratio':>7}")
        rng = np.random.default_rng(1)
        for fraction in (0.05, 0.2, 1.0):
            selected = np.sort(rng.choice(args.n, int(fraction * args.n), replace=False))
            rates = []
            for cache_bytes in (0, 1 << 30):
                batches = PatternBatches(images, selected, batch_size=args.batch, shuffle=True,
                                         chunk=store.PATTERN_CHUNK, cache_bytes=cache_bytes)
                rates.append(patterns_per_second(batches, args.epochs))
            print(f"{fraction:>9.0%}{len(selected):>10}{rates[0]:>14.0f}{rates[1]:>11.0f}"
                  f"{rates[1] / rates[0]:>7.1f}")
        print("ratio = cached / streaming; the first epoch reads the same shards either way")


if __name__ == "__main__":
    main()
