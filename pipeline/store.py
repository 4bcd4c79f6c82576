"""The airysort store: one xarray Dataset in a Zarr v3 directory.

Layout (interface.md)::

    dims      pattern, y, x (raw frame), iy, ix (model input), class, z, q1, q2/phi
    coords    pattern (0…N-1), shot_id, source_file, frame, pulse_energy [J], class
    raw       (pattern, y, x)   detector counts, dtype of the first ingested file
    mask      (y, x)            bool, True = bad pixel (union of the files' masks)
    label     (pattern, class)  int8, 1/0, -1 where unlabelled
    …         every later stage adds its own variables with :func:`write_variables`

Pattern-aligned arrays are sharded ``PATTERN_CHUNK`` patterns per shard (whole frames);
those with small rows (``prob``, ``latent``, ``hit``, ``cluster_*``…) ``COORD_CHUNK`` patterns
per shard, in inner chunks of ``PATTERN_CHUNK`` (:func:`pattern_shard`); all are
compressed with Blosc/LZ4 (bit-shuffled for detector counts); every Dask write touches exactly one shard per task because
concurrent writes into one shard silently lose data. Metadata is consolidated once, at the
end of each command. Global attributes hold geometry (SI units), the list of ingested
files, the reject log and the provenance of every command that wrote to the store.

A store is written by one process at a time: :func:`write_lock` takes an exclusive
``flock`` on a file inside the store (released by the kernel even after SIGKILL).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from pipeline import __version__
from pipeline.errors import AirysortError, StoreLockedError
from pipeline.taxonomy import CLASS_NAMES

#: Patterns per shard (and per Dask chunk) along ``pattern``.
PATTERN_CHUNK = 256
#: Patterns per inner (compression) chunk of ``raw`` inside a shard: small enough to
#: read a few frames at random, large enough to compress well.
RAW_INNER_CHUNK = 8
#: Length of the 1-D chunks of small per-pattern coordinates, and of the shards of
#: variables with small rows.
COORD_CHUNK = 65536
#: Bytes per pattern up to which a variable counts as small (:func:`pattern_shard`).
SMALL_ROW_BYTES = 1024
LOCK_FILE = ".airysort-writer.lock"
PENDING_DIR = ".ingest-pending"
#: Where :func:`create_store` builds a new store before moving it into place.
STAGING_DIR = ".airysort-creating"
PATTERN_COORDS = ("shot_id", "source_file", "frame", "pulse_energy")


def compressors(dtype: np.dtype) -> list:
    """Blosc with LZ4: bit-shuffle for detector counts (integers of up to 2 bytes), byte-shuffle otherwise.

    Bit-shuffle + LZ4 is the scheme X-ray detectors write natively (the HDF5
    bitshuffle/LZ4 filter). Measured on 512² photon-count frames it compresses about 30x
    (zstd: 50x) at twice zstd's speed, which keeps ingest near the I/O limit; on
    preprocessed float32 images every codec gets only 1.2-1.3x, and LZ4 encodes them 6x
    faster than zstd (0.04 vs 0.26 ms per 128² frame).
    """
    dtype = np.dtype(dtype)
    shuffle = "bitshuffle" if dtype.kind in "iu" and dtype.itemsize <= 2 else "shuffle"
    return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def is_store(path: str | os.PathLike) -> bool:
    return (Path(path) / "zarr.json").exists()


def check_store(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it holds an airysort store, else one clear error (a missing
    path, a directory without a store, or another program's Zarr store)."""
    path = Path(path)
    if not is_store(path):
        hint = "create it with 'airysort ingest STORE.zarr FILES...'"
        if path.exists():
            raise AirysortError(f"{str(path)!r} exists but is not an airysort Zarr store; {hint}")
        raise AirysortError(f"store {str(path)!r} does not exist; {hint}")
    try:
        attributes = json.loads((path / "zarr.json").read_text()).get("attributes") or {}
    except (ValueError, AttributeError):
        attributes = {}
    if "airysort_store_version" not in attributes:
        raise AirysortError(f"{str(path)!r} is a Zarr store, but not one airysort made (its root has no "
                            "'airysort_store_version' attribute); airysort ingest makes a new one: "
                            "airysort ingest NEW.zarr FILES...")
    return path


def check_output_dir(out_dir: str | os.PathLike, store_path: str | os.PathLike) -> Path:
    """``out_dir`` as a Path, where a command may write its files; else one clear error: an
    existing file in its place, or a directory inside the store (its files would sit among
    the store's arrays, and Zarr would warn about them at every open)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AirysortError(f"{str(out)!r} is a file, not a directory; give a directory for the output")
    resolved, root = out.resolve(), Path(store_path).resolve()
    if resolved == root or root in resolved.parents:
        raise AirysortError(f"{str(out)!r} is inside the store {str(store_path)!r}; give a directory outside it")
    return out


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def write_lock(path: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold the store's exclusive writer lock for the duration of the block.

    Raises :class:`StoreLockedError` at once (no waiting) when another process holds it.
    The lock is an ``flock``: the kernel releases it when the holder dies, even by SIGKILL.
    A process that already holds the lock may enter again (nested commands).
    """
    path = Path(path)
    key = str(path.resolve())
    if key in _HELD_LOCKS:
        yield
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock_path = path / LOCK_FILE
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StoreLockedError(
            f"store {str(path)!r} is being written by {holder}; wait until it finishes "
            "(two writers at once would corrupt it)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"airysort {command} (pid {os.getpid()} on {socket.gethostname()}, since {now()})")
    handle.flush()
    _HELD_LOCKS.add(key)
    try:
        yield
    finally:
        _HELD_LOCKS.discard(key)
        handle.seek(0)
        handle.truncate()
        if created and [entry.name for entry in path.iterdir()] == [LOCK_FILE]:
            # Nothing was written (every input rejected): leave no directory behind, which
            # later commands would take for a broken store. Removed while still locked.
            with contextlib.suppress(OSError):
                lock_path.unlink()
                path.rmdir()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


_HELD_LOCKS: set[str] = set()


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who holds the store's writer lock ("airysort preprocess (pid ...)"), or None when
    nobody does (a lock file left by a killed writer holds no lock)."""
    lock_path = Path(path) / LOCK_FILE
    if str(Path(path).resolve()) in _HELD_LOCKS or not lock_path.exists():
        return None
    with open(lock_path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


# zarr lists the lock file and the pending-ingest journal as unknown objects; they are ours.
warnings.filterwarnings("ignore", message=r"Object at \.(airysort|ingest)", category=UserWarning)


# --------------------------------------------------------------------------- creating


def raw_dtype(frame_dtype: np.dtype | str) -> np.dtype:
    """The dtype ``raw`` keeps for frames of ``frame_dtype``: their own, but float32 for
    half floats, which the compiled preprocessing kernels do not take (widening is exact)."""
    frame_dtype = np.dtype(frame_dtype)
    return np.dtype(np.float32) if frame_dtype == np.float16 else frame_dtype


def raw_frames(dataset: xr.Dataset):
    """``raw`` as a Dask array (one read task per shard), half floats of an older store as
    float32 (:func:`raw_dtype`)."""
    raw = dataset["raw"].data
    return raw.astype(raw_dtype(raw.dtype))  # the same array where nothing changes


def create_store(
    path: str | os.PathLike,
    *,
    frame_shape: tuple[int, int],
    dtype: np.dtype | str,
    mask: np.ndarray | None = None,
    geometry: Mapping[str, float | None] | None = None,
) -> None:
    """Create an empty store (zero patterns) for frames of ``frame_shape`` and ``dtype``.

    Parameters
    ----------
    path : path-like
        Directory of the new Zarr v3 store; must not hold a store yet.
    frame_shape : (int, int)
        Detector frame shape (y, x) in pixels.
    dtype : numpy dtype
        dtype of ``raw``; frames of other dtypes are stored if they convert losslessly.
    mask : ndarray of bool, shape frame_shape, optional
        True where the detector pixel is bad.
    geometry : mapping, optional
        ``wavelength`` [m], ``detector_distance`` [m], ``pixel_size`` [m]; None if unknown.
    """
    path = Path(path)
    if is_store(path):
        raise AirysortError(f"store {str(path)!r} already exists")
    ny, nx = (int(s) for s in frame_shape)
    dtype = np.dtype(dtype)
    mask = np.zeros((ny, nx), bool) if mask is None else np.asarray(mask, bool)
    geometry = dict(geometry or {})
    empty = np.zeros((0, ny, nx), dtype)
    dataset = xr.Dataset(
        {
            "raw": (("pattern", "y", "x"), empty, {"long_name": "detector frame", "units": "counts"}),
            "mask": (("y", "x"), mask, {"long_name": "bad-pixel mask", "flag_meanings": "True = bad pixel"}),
            "label": (
                ("pattern", "class"),
                np.zeros((0, len(CLASS_NAMES)), np.int8),
                {"long_name": "researcher labels", "flag_values": "1 = class present, 0 = absent, -1 = unlabelled"},
            ),
        },
        coords={
            "pattern": ("pattern", np.zeros(0, np.int64)),
            "shot_id": ("pattern", np.array([], dtype=np.dtypes.StringDType())),
            "source_file": ("pattern", np.array([], dtype=np.dtypes.StringDType())),
            "frame": ("pattern", np.zeros(0, np.int64), {"long_name": "frame index in the source file"}),
            "pulse_energy": ("pattern", np.zeros(0, np.float64), {"units": "J"}),
            "class": ("class", np.array(CLASS_NAMES, dtype=object)),
        },
        attrs={
            "title": "airysort store of single-shot diffraction patterns",
            "airysort_store_version": 1,
            "wavelength": geometry.get("wavelength"),
            "detector_distance": geometry.get("detector_distance"),
            "pixel_size": geometry.get("pixel_size"),
            "geometry_units": "m",
            # The `class` coordinate again, for readers without zarr-python's string type.
            "class_names": list(CLASS_NAMES),
            "ingested_files": [],
            "rejects": [],
            "provenance": [],
        },
    )
    encoding = {
        "raw": {
            "chunks": (RAW_INNER_CHUNK, ny, nx),
            "shards": (PATTERN_CHUNK, ny, nx),
            "compressors": compressors(dtype),
        },
        "label": {"chunks": (COORD_CHUNK, len(CLASS_NAMES))},
        **{name: {"chunks": (COORD_CHUNK,)} for name in ("pattern", *PATTERN_COORDS)},
    }
    # Zarr writes the root metadata first: a process killed while creating the store
    # left a store without `raw`. The store is built aside and moved in with the root
    # metadata last, so that until then there is no store, and leftovers of such a kill
    # (this function's own arrays only, never other files) are cleared first.
    staging = path / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    for name in dataset.variables:
        if (path / str(name) / "zarr.json").exists():
            shutil.rmtree(path / str(name))
    dataset.to_zarr(staging, mode="w", zarr_format=3, encoding=encoding, consolidated=False)
    for entry in staging.iterdir():
        if entry.name != "zarr.json":
            entry.rename(path / entry.name)
    (staging / "zarr.json").rename(path / "zarr.json")
    staging.rmdir()


def pattern_shard(row_shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Patterns per shard of a variable whose rows (one per pattern) have ``row_shape``.

    Frames, images and correlations (rows of two or more axes): ``PATTERN_CHUNK``, so that
    a task reads or writes a few hundred patterns. Numbers and short vectors of at most
    ``SMALL_ROW_BYTES`` (probabilities, latents, hits, cluster numbers): ``COORD_CHUNK``.
    In 256-pattern shards a 10^6-pattern store held 3,907 files per such variable, and
    reading one took about 5 s.
    """
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return COORD_CHUNK if len(row_shape) <= 1 and row_bytes <= SMALL_ROW_BYTES else PATTERN_CHUNK


def stored_shard(array: zarr.Array) -> int:
    """Patterns per shard (or per chunk, unsharded) of a stored pattern-aligned array."""
    return (array.shards or array.chunks)[0]


def pattern_arrays(group: zarr.Group) -> list[str]:
    """Names of the arrays whose first dimension is ``pattern``."""
    return [
        name
        for name, array in group.arrays()
        if (array.metadata.dimension_names or (None,))[0] == "pattern"
    ]


def resize_patterns(path: str | os.PathLike, n_patterns: int) -> None:
    """Set the length of every pattern-aligned array (new entries read as fill values)."""
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    for name in pattern_arrays(group):
        array = group[name]
        array.resize((n_patterns, *array.shape[1:]))


# --------------------------------------------------------------------------- reading


def n_committed(path: str | os.PathLike) -> int:
    """Patterns fully written (an interrupted ingest's partial patterns are excluded)."""
    group = zarr.open_group(path, mode="r", use_consolidated=False)
    pending = Path(path) / PENDING_DIR / "journal.json"
    if pending.exists():
        return int(json.loads(pending.read_text())["start"])
    return int(group["pattern"].shape[0])


def open_store(path: str | os.PathLike, *, warn: bool = True) -> xr.Dataset:
    """Open the store lazily: every variable dask-backed, one chunk per shard (per stored
    chunk for the unsharded per-pattern coordinates and ``label``): ``PATTERN_CHUNK``
    patterns for frames and images, ``COORD_CHUNK`` for small rows (:func:`pattern_shard`).

    Patterns of an interrupted ingest are hidden until ``airysort ingest`` completes it,
    and variables that an interrupted or failed command left half-written
    (:func:`incomplete_variables`) until that command runs again. With ``warn``, those,
    and variables out of date (:func:`stale_variables`) or covering fewer patterns than
    the store (:func:`partial_variables`), get a warning line on stderr (``info`` lists
    them itself).
    """
    path = check_store(path)
    # Every variable in its stored chunks: the per-pattern coordinates and labels in their
    # long ones (COORD_CHUNK), which commands read whole (``.values``) and none combines
    # chunk by chunk with the frame arrays. In 256-pattern pieces every piece decoded its
    # whole stored chunk: 83 s instead of 0.3 s for 10^6 shot ids.
    dataset = xr.open_zarr(path, consolidated=False, chunks={})
    # Sharded arrays are opened by xarray in their inner chunks (8 frames for raw, image,
    # ccf). Rechunking those built graphs that took a second per 100,000 patterns, and
    # sent 32 pieces per shard to one worker to be concatenated (a copy of every shard; on
    # 2048 frames it doubled the workers' CPU time of reading). Read each shard in one
    # task instead (same values: these arrays are not CF-encoded).
    group = zarr.open_group(path, mode="r", use_consolidated=False)
    for name, variable in dataset.data_vars.items():
        array = group[name]
        if variable.dims[:1] == ("pattern",) and array.shards is not None and array.dtype == variable.dtype:
            data = da.from_zarr(array, chunks=(stored_shard(array), *array.shape[1:]))
            dataset[name] = variable.copy(data=data)
    committed = n_committed(path)
    if committed < dataset.sizes.get("pattern", 0):
        dataset = dataset.isel(pattern=slice(0, committed))
    incomplete = {k: v for k, v in incomplete_variables(dataset.attrs).items() if k in dataset}
    if warn:
        _warn_about_variables(path, dataset, incomplete, committed)
    dataset = dataset.drop_vars(list(incomplete))
    # A clustering written before more patterns were ingested: the later ones would read
    # as cluster 0 (the fill value); -1 is "no cluster", as everywhere else.
    for name, stop in partial_variables(dataset.attrs, committed).items():
        if name in dataset and name.startswith("cluster_") and dataset[name].dtype.kind == "i":
            dataset[name] = dataset[name].where(dataset["pattern"] < stop, -1)
    return dataset


def _warn_about_variables(path: Path, dataset: xr.Dataset, incomplete: dict, committed: int) -> None:
    """:func:`open_store`'s warning lines: incomplete, out-of-date and partial variables."""
    if incomplete:
        first = incomplete[min(incomplete)]
        names = ", ".join(map(repr, sorted(incomplete)))
        writer = lock_holder(path)
        if writer is not None:
            _warn_once(f"WARNING: {names} in {str(path)!r} are being written by {writer} and are not used "
                       "until it finishes")
        else:
            _warn_once(f"WARNING: {names} in {str(path)!r} were left incomplete by an interrupted or failed "
                       f"'{first['command']}' (started {first['since']}) and are not used; run that command again")
    stale = {k: v for k, v in stale_variables(dataset.attrs).items() if k in dataset and k not in incomplete}
    by_input: dict[tuple[str, str, str], list[str]] = {}
    for name, mark in sorted(stale.items()):
        by_input.setdefault((mark["input"], mark["command"], mark["since"]), []).append(name)
    for (source, command, since), names in by_input.items():
        _warn_once(f"WARNING: {', '.join(map(repr, names))} in {str(path)!r} came from {source!r} "
                   f"before '{command}' rewrote it ({since}); run the commands that made them again")
    partial = {k: v for k, v in partial_variables(dataset.attrs, committed).items() if k in dataset}
    if partial:
        _warn_once(f"WARNING: {', '.join(f'{k!r} (patterns 0..{v - 1})' for k, v in sorted(partial.items()))} "
                   f"in {str(path)!r} do not cover all {committed} patterns; run the commands that made them again")


_WARNED: set[str] = set()


def _warn_once(line: str) -> None:
    """Print a warning line on stderr, once per process (commands open the store often)."""
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr, flush=True)


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    return dict(zarr.open_group(check_store(path), mode="r", use_consolidated=False).attrs)


def update_attrs(path: str | os.PathLike, **attrs: Any) -> None:
    zarr.open_group(path, mode="r+", use_consolidated=False).attrs.update(attrs)


def append_provenance(
    path: str | os.PathLike,
    command: str,
    parameters: Mapping[str, Any],
    *,
    extra: Mapping[str, Any] | None = None,
    once: bool = False,
) -> None:
    """Record that ``command`` wrote to the store, with its parameters and the time.

    ``extra`` fields (e.g. an ingest's id) go into the entry too; with ``once``, nothing is
    added when an entry with the same ``extra`` fields exists (a resumed run finalising again).
    A write of patterns that continues the ``command``'s last entry (``extra["patterns"]``
    starts where that entry's range ends, same parameters and version: ``airysort watch``,
    file after file) extends that entry's range and time instead of adding one, so the
    provenance of a long run stays short.
    """
    extra = dict(extra or {})
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    provenance = list(group.attrs.get("provenance", []))
    if once and any(all(entry.get(k) == v for k, v in extra.items()) for entry in provenance):
        return
    last = _last_index(provenance, command)
    if last is not None and _continues(provenance[last], extra, parameters):
        first = provenance[last]["patterns"][0]
        provenance[last] = {**provenance[last], "time": now(), "patterns": [first, extra["patterns"][1]]}
        group.attrs["provenance"] = provenance
        return
    provenance.append(
        {"command": command, "version": __version__, "time": now(), **extra, "parameters": _jsonable(dict(parameters))}
    )
    group.attrs["provenance"] = provenance


def last_entry(attrs: Mapping[str, Any], command: str) -> dict[str, Any]:
    """The latest ``command`` entry of a store's provenance (empty if none): its
    ``parameters``, time, and for writes of pattern variables the ``patterns`` range
    ``[start, stop)`` written."""
    provenance = attrs.get("provenance", [])
    last = _last_index(provenance, command)
    return {} if last is None else dict(provenance[last])


def _last_index(provenance: list[dict[str, Any]], command: str) -> int | None:
    """Index of the latest ``command`` entry of ``provenance`` (None if none)."""
    return next((i for i in range(len(provenance) - 1, -1, -1) if provenance[i].get("command") == command), None)


def last_parameters(attrs: Mapping[str, Any], command: str) -> dict[str, Any]:
    """Parameters of the latest ``command`` in a store's provenance (empty if none)."""
    return dict(last_entry(attrs, command).get("parameters", {}))


def _continues(entry: Mapping[str, Any], extra: Mapping[str, Any], parameters: Mapping[str, Any]) -> bool:
    """Whether a write of ``extra["patterns"]`` continues the pattern range of ``entry``,
    with the same parameters and airysort version."""
    if "patterns" not in extra or "patterns" not in entry or extra["patterns"][0] == 0:
        return False
    return (entry["patterns"][1] == extra["patterns"][0] and entry.get("version") == __version__
            and entry.get("parameters") == _jsonable(dict(parameters)))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def consolidate(path: str | os.PathLike) -> None:
    """Consolidate metadata once, at the end of a command, for remote readers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(str(path))


# --------------------------------------------------------------------------- writing


def write_variables(
    path: str | os.PathLike,
    variables: Mapping[str, xr.DataArray],
    *,
    command: str,
    parameters: Mapping[str, Any],
    description: str | None = None,
    start: int = 0,
) -> None:
    """Write pattern-aligned variables into the store, one Dask task per shard.

    Parameters
    ----------
    path : path-like
        An existing store.
    variables : mapping of name to DataArray
        Each has ``pattern`` as its first dimension with the store's full length; values
        may be NumPy- or Dask-backed. Variables of the same name are replaced. Coordinates
        of other dimensions (e.g. ``class``) are written along; ``pattern`` coordinates are
        the store's own and are not rewritten.
    command, parameters
        Recorded in the store's provenance.
    description : str, optional
        Text of the progress bar.
    start : int, default=0
        With ``start > 0``, only patterns ``start`` to the end are written, into the
        existing arrays (e.g. the patterns of a file just ingested, ``airysort watch``):
        each variable then has ``n - start`` patterns, and the store must already hold
        it over all ``n`` patterns (ingest lengthens every pattern array).

    Must run inside :func:`pipeline.dask_cluster.dask_client` (or any distributed client).
    """
    from pipeline.progress import compute_with_progress

    path = check_store(path)
    _require_client()  # before anything is replaced
    n_patterns = n_committed(path)
    if start:
        _write_region(path, variables, start=start, n_patterns=n_patterns, command=command,
                      parameters=parameters, description=description)
        return
    with write_lock(path, command):
        group = zarr.open_group(path, mode="r+", use_consolidated=False)
        arrays: dict[str, xr.DataArray] = {}
        encoding: dict[str, dict] = {}
        for name, array in variables.items():
            if array.dims[0] != "pattern" or array.sizes["pattern"] != n_patterns:
                raise AirysortError(
                    f"variable {name!r} must have 'pattern' first with length {n_patterns}, "
                    f"got dims {array.dims!r} and shape {array.shape!r}"
                )
            array = array.drop_vars([c for c in array.coords if "pattern" in array[c].dims])
            whole = tuple(array.shape[1:])
            shard = pattern_shard(whole, array.dtype)
            arrays[name] = _chunked_by_shard(array, shard)
            encoding[name] = {
                "chunks": (RAW_INNER_CHUNK if array.ndim >= 3 else PATTERN_CHUNK, *whole),
                "shards": (shard, *whole),
                "compressors": compressors(array.dtype),
            }
            if name in group:  # replaced, possibly with another shape
                del group[name]
        _mark_incomplete(group, variables, command)
        # xarray rewrites the group's attributes on every to_zarr: hand it the existing ones
        # (file list, reject log, provenance, geometry) so nothing is dropped.
        dataset = xr.Dataset(arrays, attrs=dict(group.attrs))
        for dim in list(dataset.coords):
            if dim in group and group[dim].shape == dataset[dim].shape:
                dataset = dataset.drop_vars(dim)  # an existing coordinate (e.g. ``class``) stays
            elif dim in group:
                del group[dim]  # a coordinate whose length changed (e.g. another --n-q)
        writes = dataset.to_zarr(
            path, mode="a", zarr_format=3, encoding=encoding, consolidated=False, compute=False, safe_chunks=True
        )
        compute_with_progress(writes, description or f"{command}: writing {', '.join(variables)}", unit="shards")
        append_provenance(path, command, parameters, extra={"patterns": [0, n_patterns], "variables": list(variables)})
        _mark_complete(path, variables)
        consolidate(path)


#: Store attribute: variables a command has started to write and not finished, with the
#: command and when it started. An interrupted or failed write leaves its variables there.
INCOMPLETE = "incomplete"


def _mark_incomplete(group: zarr.Group, names, command: str) -> None:
    marks = dict(group.attrs.get(INCOMPLETE, {}))
    marks.update({name: {"command": command, "since": now()} for name in names})
    group.attrs[INCOMPLETE] = marks


def _mark_complete(path: Path, names) -> None:
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    marks = {k: v for k, v in dict(group.attrs.get(INCOMPLETE, {})).items() if k not in names}
    group.attrs[INCOMPLETE] = marks


def incomplete_variables(attrs: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Variables left incomplete by an interrupted or failed command: name → ``command``
    and ``since`` (when it started writing)."""
    return dict(attrs.get(INCOMPLETE) or {})


def stale_variables(attrs: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Variables computed from another one that has been written again since: name →
    ``input``, and the ``command`` that rewrote it and when (``since``).

    The provenance says which command last wrote each variable, in order (an entry that
    ``airysort watch`` extends keeps its place); a classifier's or a VAE's outputs come
    from the model's input (``image`` or ``ccf``), a GMM clustering from ``latent``, a
    spectral one from ``image``, the cross-correlations from the refined centres. What
    comes from an out-of-date variable is out of date too.
    """
    last: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for index, entry in enumerate(attrs.get("provenance", [])):
        for name in entry.get("variables", []):
            last[name] = (index, entry)
    sources = {name: _source_of(entry) for name, (_, entry) in last.items()}
    stale: dict[str, dict[str, str]] = {}
    changed = True
    while changed:  # until what follows from out-of-date variables is marked too
        changed = False
        for name, (index, entry) in last.items():
            source = sources[name]
            if name in stale or source not in last:
                continue
            if last[source][0] > index or source in stale:
                rewrite = stale.get(source) or {"command": last[source][1]["command"], "since": last[source][1]["time"]}
                stale[name] = {"input": source, "command": rewrite["command"], "since": rewrite["since"]}
                changed = True
    return stale


def _source_of(entry: Mapping[str, Any]) -> str | None:
    """The store variable a command computed its output from (None: from ``raw``)."""
    parameters = entry.get("parameters", {})
    if entry["command"] in ("predict", "embed"):
        return parameters.get("input", "image")
    if entry["command"] == "cluster":
        return "latent" if parameters.get("method") == "gmm" else "image"
    if entry["command"] == "correlate":
        return "centre_y"  # polar resampling around the refined centres
    return None


def _require_client() -> None:
    """A store write computes with Dask: without a distributed client it would fail only
    after the variables it replaces were deleted."""
    from distributed import default_client

    try:
        default_client()
    except ValueError:
        raise AirysortError(
            "writing to the store needs a Dask client; call this inside "
            "'with pipeline.dask_cluster.dask_client():' (nothing was changed)") from None


def partial_variables(attrs: Mapping[str, Any], n_patterns: int) -> dict[str, int]:
    """Variables written for fewer patterns than the store holds (e.g. latents and
    clusterings after ``airysort watch`` added files): name → patterns covered, from 0."""
    covered: dict[str, int] = {}
    for entry in attrs.get("provenance", []):
        for name in entry.get("variables", []):
            covered[name] = max(covered.get(name, 0), int(entry.get("patterns", [0, n_patterns])[1]))
    return {name: stop for name, stop in covered.items() if stop < n_patterns}


def covered(dataset: xr.Dataset, name: str) -> np.ndarray:
    """Boolean per pattern: whether ``name`` was computed for it (False for patterns
    ingested after the command that wrote ``name``)."""
    n_patterns = int(dataset.sizes.get("pattern", 0))
    stop = partial_variables(dataset.attrs, n_patterns).get(name, n_patterns)
    return np.arange(n_patterns) < stop


def require_every_pattern(dataset: xr.Dataset, name: str, *, remedy: str) -> None:
    """Refuse to compute from ``name`` when it covers fewer patterns than the store (patterns
    ingested since it was written): their values are fill values (NaN images, cluster 0),
    not data. ``remedy`` is the command that covers them."""
    n_patterns = int(dataset.sizes.get("pattern", 0))
    stop = partial_variables(dataset.attrs, n_patterns).get(name)
    if stop is not None:
        raise AirysortError(
            f"{name!r} covers patterns 0..{stop - 1} of the {n_patterns} in the store (the others were "
            f"ingested since); run '{remedy}' first")


def _chunked_by_shard(array: xr.DataArray, shard: int, *, start: int = 0) -> xr.DataArray:
    """``array`` (patterns ``start`` to the end) in Dask chunks that each fill one shard."""
    if shard > PATTERN_CHUNK and array.chunks is not None:
        # A small row sliced out of a larger block (a column of preprocess's packed frame
        # block) is a view that keeps the whole block in memory while it waits for the
        # rest of its shard: copy it out in the task that computes it.
        array = array.copy(data=array.data.map_blocks(np.array, copy=True, dtype=array.dtype))
    chunks = region_chunks(start, start + array.sizes["pattern"], shard) if start else shard
    return array.chunk({"pattern": chunks, **{d: -1 for d in array.dims[1:]}})


def region_chunks(start: int, stop: int, shard: int = PATTERN_CHUNK) -> tuple[int, ...]:
    """Chunk lengths of patterns ``start:stop`` that end on shard boundaries: each chunk
    lies in one shard, so each task writes a shard no other task touches."""
    edges = [start, *range((start // shard + 1) * shard, stop, shard), stop]
    return tuple(b - a for a, b in zip(edges, edges[1:]) if b > a)


def _write_region(path: Path, variables: Mapping[str, xr.DataArray], *, start: int, n_patterns: int,
                  command: str, parameters: Mapping[str, Any], description: str | None) -> None:
    """:func:`write_variables` for patterns ``start`` to the end, into existing arrays."""
    from pipeline.progress import compute_with_progress

    if not 0 < start < n_patterns:
        raise AirysortError(f"start={start!r} must be between 1 and {n_patterns - 1} (patterns in the store)")
    with write_lock(path, command):
        group = zarr.open_group(path, mode="r+", use_consolidated=False)
        arrays: dict[str, xr.DataArray] = {}
        for name, array in variables.items():
            if name not in group:
                raise AirysortError(f"{name!r} is not in the store yet: write it for every pattern first")
            expected = (n_patterns, *array.shape[1:])
            if array.dims[0] != "pattern" or array.shape[0] != n_patterns - start or tuple(group[name].shape) != expected:
                raise AirysortError(
                    f"{name!r} for patterns {start}..{n_patterns - 1} has dims {array.dims!r} and shape "
                    f"{array.shape!r}, but the store holds shape {tuple(group[name].shape)!r}"
                )
            arrays[name] = _chunked_by_shard(array.drop_vars(list(array.coords)), stored_shard(group[name]),
                                             start=start)
        _mark_incomplete(group, variables, command)
        # safe_chunks=False: xarray flags the first chunk, which shares its shard with
        # patterns before ``start``; but that shard is written by this one task only.
        writes = xr.Dataset(arrays).to_zarr(
            path, region={"pattern": slice(start, n_patterns)}, mode="r+", zarr_format=3,
            consolidated=False, compute=False, safe_chunks=False,
        )
        compute_with_progress(writes, description or f"{command}: writing {', '.join(variables)}", unit="shards")
        append_provenance(path, command, parameters,
                          extra={"patterns": [start, n_patterns], "variables": list(variables)})
        _mark_complete(path, variables)
        consolidate(path)


def write_frame_variables(path: str | os.PathLike, variables: Mapping[str, xr.DataArray]) -> None:
    """Write small variables without a ``pattern`` dimension (e.g. a run's mask, (y, x)),
    replacing those of the same name and keeping the store's attributes."""
    path = check_store(path)
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    for name in variables:
        if name in group:
            del group[name]
    # as in write_variables: xarray rewrites the group's attributes, so hand them over
    xr.Dataset(dict(variables), attrs=dict(group.attrs)).to_zarr(path, mode="a", zarr_format=3, consolidated=False)


def read_pattern_values(path: str | os.PathLike, name: str, *, start: int = 0,
                        patterns: np.ndarray | None = None) -> np.ndarray:
    """A pattern-aligned variable, patterns ``start`` to the end (or the given
    ``patterns``, in their order), read straight from Zarr.

    For small results (``hit``, ``predicted``) summarised right after a write: no xarray
    dataset and no Dask graph, which cost about 0.4 s per call on a local cluster. For a
    few scattered ``patterns`` of a frame variable (gallery tiles): only the inner chunks
    that hold them are read, where the Dask-backed dataset reads whole shards.
    """
    array = zarr.open_group(check_store(path), mode="r", use_consolidated=False)[name]
    if patterns is None:
        return array[start:]
    patterns = np.asarray(patterns, np.int64).reshape(-1)
    if len(patterns) == 0:
        return np.zeros((0, *array.shape[1:]), array.dtype)
    return array.get_orthogonal_selection((patterns,) + (slice(None),) * (array.ndim - 1))


def write_pattern_variable_direct(path: str | os.PathLike, name: str, values: np.ndarray) -> None:
    """Overwrite a small pattern-aligned variable in place from the client (e.g. ``label``).

    For arrays that fit in memory and are written by one process; large data goes through
    :func:`write_variables`.
    """
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    group[name][...] = values
