"""Patterns from a Zarr store to device batches, one shard at a time; augmentation on device.

:class:`PatternBatches` never loads the store: each epoch it reads the shards
(``chunk`` consecutive patterns, the store's ``PATTERN_CHUNK``) that hold selected
patterns, a few shards at a time, shuffles inside that window, and yields fixed-size
host batches. When the selected patterns are few enough (``cache_bytes``), their rows are
read once, shard by shard, and kept, so later epochs read nothing: a labelled subset
scattered over the store otherwise costs a read of every shard it touches, every epoch.
The order of an epoch depends only on ``(seed, epoch)``, so a resumed
run can skip straight to batch ``k`` of an epoch without reading the batches before it.

Host batches are dicts of NumPy arrays:

``"x"``      float32, shape (B, H, W, 1) — the network input, channel last;
``"valid"``  bool, shape (B,) — False for padding rows of the last evaluation batch;
``"index"``  int64, shape (B,) — pattern index in the store (-1 for padding);
plus one entry per array in ``extras`` (e.g. ``"y"``, the labels).

:func:`augment` flips and rotates a device batch inside the jitted train step.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np


class PatternBatches:
    """Fixed-size batches of selected patterns, read shard by shard.

    Parameters
    ----------
    source : array-like, shape (n_patterns, H, W)
        Anything sliceable along the first axis: a ``zarr.Array``, a lazy
        ``xarray.DataArray`` or Dask array (each read computes one slice), or NumPy.
    indices : array of int, shape (n,)
        Patterns to iterate over (indices into ``source``).
    batch_size : int
        Rows per batch (global batch; see ``process_index``).
    extras : dict of str to ndarray, optional
        Per-pattern arrays aligned with ``indices`` (shape (n, ...)), e.g. labels,
        delivered alongside ``x`` under their key.
    shuffle : bool, default=False
        Shuffle every epoch (training). Without shuffling the patterns come in
        ``indices`` order and the last batch is padded (``valid`` False).
    drop_remainder : bool, default=None
        Drop the last incomplete batch; defaults to ``shuffle``. Training drops it so
        that every step sees a full batch (batch statistics, sharding).
    seed : int, default=0
        Shuffling seed; the order of epoch ``e`` is a function of ``(seed, e)``.
    chunk : int, default=256
        Patterns per shard of the store: the unit of reading.
    window : int, default=4
        Shards read and shuffled together (memory ≈ window × chunk × H × W × 4 bytes).
    cache_bytes : int, default=0
        Read the rows of all ``indices`` once and keep them in memory when they take at
        most this many bytes (n × H × W × 4); 0 reads them window by window every epoch.
        The batches are the same either way.
    process_index, process_count : int, default=0, 1
        In multi-process training each process reads only its own
        ``batch_size / process_count`` rows of every global batch.
    """

    def __init__(
        self,
        source: Any,
        indices: np.ndarray,
        *,
        batch_size: int,
        extras: dict[str, np.ndarray] | None = None,
        shuffle: bool = False,
        drop_remainder: bool | None = None,
        seed: int = 0,
        chunk: int = 256,
        window: int = 4,
        process_index: int = 0,
        process_count: int = 1,
        cache_bytes: int = 0,
    ) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {self.indices.shape!r}")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(
                f"batch_size must be a positive multiple of process_count={process_count}, "
                f"got {batch_size!r}"
            )
        self.extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
        for key, value in self.extras.items():
            if len(value) != len(self.indices):
                raise ValueError(
                    f"extras[{key!r}] has {len(value)} rows but there are "
                    f"{len(self.indices)} indices; pass one row per index"
                )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_remainder = shuffle if drop_remainder is None else drop_remainder
        self.seed = seed
        self.chunk = chunk
        self.window = window
        self.process_index = process_index
        self.process_count = process_count
        #: Bytes of the selected rows as float32, and whether they are kept in memory.
        self.nbytes = len(self.indices) * 4 * math.prod(np.shape(source)[1:])
        self.cached = self.nbytes <= cache_bytes
        self._rows: np.ndarray | None = None  # rows of all indices, once read when cached

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = len(self.indices)
        return n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions (into ``indices``) in emission order, and the window each belongs to."""
        shard_of = self.indices // self.chunk
        shards = np.unique(shard_of)
        if not self.shuffle:
            order = np.argsort(self.indices, kind="stable")
            window_of = np.searchsorted(shards, shard_of[order]) // self.window
            return order, window_of
        rng = np.random.default_rng([self.seed, epoch])
        shards = rng.permutation(shards)
        order_parts, window_parts = [], []
        for w, start in enumerate(range(0, len(shards), self.window)):
            members = np.flatnonzero(np.isin(shard_of, shards[start : start + self.window]))
            order_parts.append(rng.permutation(members))
            window_parts.append(np.full(len(members), w))
        return np.concatenate(order_parts), np.concatenate(window_parts)

    def _read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read the patterns at ``positions`` shard by shard.

        Returns the positions sorted ascending and their rows, shape (n, H, W).
        """
        positions = np.sort(positions)
        wanted = self.indices[positions]
        rows = np.empty((len(positions), *np.shape(self.source)[1:]), dtype=np.float32)
        for shard in np.unique(wanted // self.chunk):
            take = (wanted // self.chunk) == shard
            inside = wanted[take]
            # One contiguous read per shard: the store's unit of storage.
            lo, hi = int(inside.min()), int(inside.max()) + 1
            block = np.asarray(self.source[lo:hi], dtype=np.float32)
            rows[take] = block[inside - lo]
        return positions, rows

    def rows(self) -> np.ndarray:
        """Every selected pattern, in the order of ``indices``, float32 (n, H, W): the kept
        rows when cached, else read shard by shard."""
        if self._rows is not None:
            return self._rows
        positions, rows = self._read(np.arange(len(self.indices)))
        out = np.empty_like(rows)
        out[positions] = rows
        return out

    def epoch(self, epoch: int = 0, *, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield the host batches of ``epoch``, beginning at batch ``start_batch``."""
        order, window_of = self._epoch_order(epoch)
        n_batches = len(self)
        local = self.batch_size // self.process_count
        read_windows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # window -> (positions, rows)
        if self.cached and self._rows is None:
            self._rows = self._read(np.arange(len(self.indices)))[1]
        for b in range(start_batch, n_batches):
            sel = order[b * self.batch_size : (b + 1) * self.batch_size]
            sel_windows = window_of[b * self.batch_size : (b + 1) * self.batch_size]
            # Each process assembles only its slice of the global batch.
            mine = slice(self.process_index * local, (self.process_index + 1) * local)
            sel, sel_windows = sel[mine], sel_windows[mine]
            x = np.zeros((local, *np.shape(self.source)[1:]), dtype=np.float32)
            if self._rows is not None:
                x[: len(sel)] = self._rows[sel]
            else:
                for w in list(read_windows):
                    if w < sel_windows.min(initial=np.iinfo(np.int64).max):
                        del read_windows[w]  # windows are consumed in order: free memory
                for w in np.unique(sel_windows):
                    if w not in read_windows:
                        read_windows[w] = self._read(order[window_of == w])
                    positions, rows = read_windows[w]
                    take = sel_windows == w
                    x[np.flatnonzero(take)] = rows[np.searchsorted(positions, sel[take])]
            batch = {"x": x[..., None], "valid": np.zeros(local, dtype=bool),
                     "index": np.full(local, -1, dtype=np.int64)}
            filled = len(sel)
            batch["valid"][:filled] = True
            batch["index"][:filled] = self.indices[sel]
            for key, value in self.extras.items():
                out = np.zeros((local, *value.shape[1:]), dtype=value.dtype)
                out[:filled] = value[sel]
                batch[key] = out
            yield batch


def augment(key: jax.Array, x: jax.Array, *, rotate: bool = True, flip: bool = True) -> jax.Array:
    """Random mirror and rotation of a batch of images, on the device.

    Diffraction classes do not depend on the orientation of the droplet in the
    beam plane, so every image gets an independent random rotation about the image
    centre (bilinear interpolation, edge values extended into the corners) and a
    random left-right mirror; together they cover all in-plane orientations and
    both handednesses.

    Parameters
    ----------
    key : jax.Array
        PRNG key.
    x : jax.Array, shape (B, H, W, C)
        Images.
    rotate, flip : bool, default=True
        Which transformations to apply.

    Returns
    -------
    jax.Array, shape (B, H, W, C)
        Augmented images, same dtype.
    """
    batch, height, width, _ = x.shape
    key_flip, key_angle = jax.random.split(key)
    if flip:
        mirror = jax.random.bernoulli(key_flip, 0.5, (batch,))
        x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1, :], x)
    if not rotate:
        return x
    angles = jax.random.uniform(key_angle, (batch,), minval=0.0, maxval=2 * jnp.pi)
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(height) - cy, jnp.arange(width) - cx, indexing="ij")

    def rotate_one(image: jax.Array, angle: jax.Array) -> jax.Array:
        # Output pixel (y, x) samples the input at the inversely rotated position.
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        src_y = cos * yy - sin * xx + cy
        src_x = sin * yy + cos * xx + cx
        return jax.vmap(
            lambda channel: jax.scipy.ndimage.map_coordinates(
                channel, [src_y, src_x], order=1, mode="nearest"
            ),
            in_axes=-1,
            out_axes=-1,
        )(image)

    return jax.vmap(rotate_one)(x, angles).astype(x.dtype)
