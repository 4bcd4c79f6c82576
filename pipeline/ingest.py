"""Ingest raw detector frames into the store, resumably and without losing anything.

An ingest runs in three steps, each safe to interrupt:

1. **Scan** the inputs (metadata only), skip files already in the store, and **journal**
   the plan (which file and frame becomes which pattern) in the store.
2. **Write** the frames, one Dask task per shard. Each task reads its frames once,
   checks them while it writes (unreadable, wrong shape, a dtype that does not convert
   losslessly, NaN/inf) and returns the bad ones with a one-line reason naming file and
   frame. Bad frames are rare, so the plan assumes every frame is good; if some are not,
   they are dropped from the journaled plan and the shards from the first of them on are
   written again (a second pass only where data was bad).
3. **Finalize**: coordinates, labels, mask, the file list, the reject log and provenance;
   consolidate the metadata; delete the journal.

The journal makes the ingest resumable: a run killed at any point leaves either no journal
(the store is as before) or a journal that the next ``airysort ingest`` completes first,
ending with the same store an uninterrupted run gives. The store's writer lock refuses a
second ingest while one is running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from pipeline import store
from pipeline.errors import AirysortError, consecutive_runs
from pipeline.sources import Source, SourceError, fingerprint, open_source
from pipeline.taxonomy import N_CLASSES


@dataclasses.dataclass
class Reject:
    file: str
    frame: int | None  # None: the whole file
    reason: str

    def line(self) -> str:
        where = "whole file" if self.frame is None else f"frame {self.frame}"
        return f"{self.file}: {where}: {self.reason}"


def reject_lines(rejects: Sequence[Reject | dict]) -> list[str]:
    """One line per run of rejects that share file and reason over consecutive frames.

    A file from another detector has every frame rejected for the same reason; the user
    needs one line saying so, not one per frame (the store's reject log keeps each frame).
    """
    rejects = [r if isinstance(r, Reject) else Reject(r["file"], r["frame"], r["reason"]) for r in rejects]
    runs = consecutive_runs(rejects, key=lambda r: (r.file, r.reason), number=lambda r: r.frame)
    return [run[0].line() if len(run) == 1 else
            f"{run[0].file}: frames {run[0].frame}-{run[-1].frame} ({len(run)} frames): {run[0].reason}"
            for run in runs]


# --------------------------------------------------------------------------- kernels (workers)


def _frame_problem(frame: np.ndarray, frame_shape: tuple, dtype: np.dtype) -> str | None:
    """Why ``frame`` cannot be stored in a store of ``frame_shape``/``dtype``, or None."""
    if frame.shape != tuple(frame_shape):
        return f"shape {frame.shape!r} differs from the store's {tuple(frame_shape)!r}"
    if frame.dtype.kind not in "biuf":
        return f"dtype {frame.dtype} is not numeric"
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        return f"{int((~np.isfinite(frame)).sum())} NaN/inf pixel values"
    if not _converts(frame, dtype):
        return f"values of dtype {frame.dtype} do not fit the store's dtype {dtype} losslessly"
    return None


def _converts(values: np.ndarray, dtype: np.dtype) -> bool:
    """Whether finite ``values`` can be stored as ``dtype``: exactly, or, between float
    types, rounded to the store's precision (float32 keeps 7 digits, far below any photon
    noise) when within its range."""
    if np.can_cast(values.dtype, dtype, "safe"):
        return True
    if values.dtype.kind == "f" and dtype.kind == "f":
        return values.size == 0 or float(np.abs(values).max()) <= float(np.finfo(dtype).max)
    return bool(np.array_equal(values.astype(dtype).astype(values.dtype), values))


def _block_is_clean(block: np.ndarray, frame_shape: tuple, dtype: np.dtype) -> bool:
    """Fast path: the whole block is storable (one vectorised check instead of one per frame)."""
    if block.ndim != len(frame_shape) + 1 or block.shape[1:] != tuple(frame_shape) or block.dtype.kind not in "biuf":
        return False
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        return False
    return _converts(block, dtype)


def read_checked(source: Source, start: int, stop: int, frame_shape: tuple, dtype: str) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Read frames ``start:stop`` of ``source`` once and check them.

    Returns the frames as ``dtype`` (bad frames as zeros) and ``(frame, reason)`` for
    each bad one.
    """
    dtype = np.dtype(dtype)
    try:
        block = np.asarray(source.read(start, stop))
        if _block_is_clean(block, frame_shape, dtype):
            return block.astype(dtype, copy=False), []
        readable = list(zip(range(start, stop), block))
        problems: list[tuple[int, str]] = []
    except Exception:  # isolate the unreadable frames one at a time
        readable, problems = [], []
        for index in range(start, stop):
            try:
                readable.append((index, source.read(index, index + 1)[0]))
            except Exception as error:
                problems.append((index, f"unreadable ({type(error).__name__}: {error})".replace("\n", " ")))
    frames = np.zeros((stop - start, *frame_shape), dtype)
    for index, frame in readable:
        problem = _frame_problem(np.asarray(frame), frame_shape, dtype)
        if problem:
            problems.append((index, problem))
        else:
            frames[index - start] = frame
    return frames, sorted(problems)


def write_shard(store_path: str, runs: list[tuple[int, Source, int, int, int]], dtype: str) -> list[tuple[int, int, str]]:
    """Read, check and write runs of frames into the store's ``raw``; all runs lie in one shard.

    Each run is ``(source_index, source, first_frame, n_frames, first_pattern)``. Returns
    ``(source_index, frame, reason)`` for every bad frame (written as zeros).
    """
    # Raw frames are never all-zero in practice: skipping the per-chunk "is it empty?"
    # comparison halves zarr's write time.
    raw = zarr.open_array(f"{store_path}/raw", mode="r+").with_config({"write_empty_chunks": True})
    frame_shape = raw.shape[1:]
    problems = []
    for source_index, source, first_frame, n_frames, first_pattern in runs:
        frames, bad = read_checked(source, first_frame, first_frame + n_frames, frame_shape, dtype)
        raw[first_pattern : first_pattern + n_frames] = frames
        problems += [(source_index, frame, reason) for frame, reason in bad]
    return problems


# --------------------------------------------------------------------------- planning (client)


def _scan(inputs: Sequence[str], dataset: str | None) -> tuple[list[Source], list[Reject]]:
    sources, rejects = [], []
    for path in inputs:
        try:
            sources.append(open_source(path, dataset=dataset))
        except SourceError as error:
            rejects.append(Reject(str(Path(path).resolve()), None, str(error).split(": ", 1)[-1]))
    return sources, rejects


def _lightweight(source: Source) -> Source:
    """The source without its per-frame metadata, cheap to send to every task."""
    return dataclasses.replace(source, shot_ids=None, pulse_energy=None, labels=None, mask=None, warnings=[])


def _plan(sources: list[Source], start: int, frame_shape: tuple[int, ...], *, with_labels: bool = True) -> dict[str, Any]:
    """Which frame of which file becomes which pattern, with the per-pattern metadata.

    Every frame is assumed good, except those of a file whose frames have another shape
    than the store's: they are rejected here (``rejects``), without a pass that reads them.
    """
    source_index, frame_index, shot_ids, pulse, labels, files, rejects = [], [], [], [], [], [], []
    next_pattern = start
    for index, source in enumerate(sources):
        good = np.arange(source.n_frames, dtype=np.int64)
        if tuple(source.frame_shape) != tuple(frame_shape):
            reason = f"shape {tuple(source.frame_shape)!r} differs from the store's {tuple(frame_shape)!r}"
            rejects += [Reject(str(Path(source.path).resolve()), int(frame), reason) for frame in good]
            good = good[:0]
        name = Path(source.path).name
        ids = source.shot_ids if source.shot_ids is not None else np.array([f"{name}:{f}" for f in range(source.n_frames)], dtype=object)
        energy = source.pulse_energy if source.pulse_energy is not None else np.full(source.n_frames, np.nan)
        rows = (source.labels if source.labels is not None and with_labels
                else np.full((source.n_frames, N_CLASSES), -1, np.int8))
        source_index.append(np.full(len(good), index, np.int64))
        frame_index.append(good)
        shot_ids.append(np.asarray(ids, dtype=object)[good])
        pulse.append(np.asarray(energy, np.float64)[good])
        labels.append(np.asarray(rows, np.int8)[good])
        files.append(
            {
                **fingerprint(source.path),
                "layout": source.layout,
                "dataset": source.dataset,
                "frames": source.n_frames,
                "stored": int(len(good)),
                "rejected": source.n_frames - int(len(good)),
                "first_pattern": next_pattern,
                "geometry": source.geometry,
                "has_labels": source.labels is not None and with_labels,
            }
        )
        next_pattern += len(good)
    concat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    return {
        "source_index": concat(source_index, np.int64),
        "frame": concat(frame_index, np.int64),
        "shot_id": concat(shot_ids, str),
        "pulse_energy": concat(pulse, np.float64),
        "label": np.concatenate(labels) if labels else np.zeros((0, N_CLASSES), np.int8),
        "files": files,
        "rejects": rejects,
    }


# --------------------------------------------------------------------------- journal


def _pending(path: Path) -> Path:
    return path / store.PENDING_DIR


#: Plan entries with one row per planned pattern.
PLAN_ROWS = ("source_index", "frame", "shot_id", "pulse_energy", "label")


def _write_journal(path: Path, journal: dict, plan: dict) -> None:
    """Write the journal atomically.

    A new journal is a temporary directory renamed into place. A revised one (bad frames
    dropped) writes its plan to a new file, then atomically replaces ``journal.json``, which
    names the plan file to use.
    """
    pending = _pending(path)
    revision = json.loads((pending / "journal.json").read_text())["revision"] + 1 if pending.exists() else 0
    folder = pending if revision else path / f"{store.PENDING_DIR}.tmp"
    if not revision:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    journal = {**journal, "revision": revision}
    np.savez(
        folder / f"plan-{revision}.npz",
        **{k: plan[k] for k in PLAN_ROWS if k != "shot_id"},
        **({"mask": plan["mask"]} if plan.get("mask") is not None else {}),
        shot_id=plan["shot_id"].astype(str),
    )
    (folder / "journal.json.tmp").write_text(json.dumps(journal))
    os.replace(folder / "journal.json.tmp", folder / "journal.json")
    if revision:
        (pending / f"plan-{revision - 1}.npz").unlink(missing_ok=True)
    else:
        os.replace(folder, pending)


def _read_journal(path: Path) -> tuple[dict, dict] | None:
    pending = _pending(path)
    if not (pending / "journal.json").exists():
        shutil.rmtree(path / f"{store.PENDING_DIR}.tmp", ignore_errors=True)
        return None
    journal = json.loads((pending / "journal.json").read_text())
    with np.load(pending / f"plan-{journal['revision']}.npz") as npz:
        plan = {key: npz[key] for key in npz.files}
    return journal, plan


def _write_frames(path: Path, journal: dict, plan: dict, sources: list[Source], first_pattern: int, client) -> list:
    """Write the planned frames from ``first_pattern`` on, one Dask task per shard.

    Returns ``(source_index, frame, reason)`` for every bad frame met.
    """
    from pipeline.progress import wait_with_progress

    skip = first_pattern - journal["start"]
    shard_runs: dict[int, list] = {}
    rows = zip(plan["source_index"][skip:], plan["frame"][skip:])
    for pattern, (src, frame) in enumerate(rows, start=first_pattern):
        runs = shard_runs.setdefault(pattern // store.PATTERN_CHUNK, [])
        if runs and runs[-1][0] == src and runs[-1][2] + runs[-1][3] == frame:
            runs[-1][3] += 1
        else:
            runs.append([int(src), sources[src], int(frame), 1, pattern])
    tasks = [
        client.submit(write_shard, str(path), [tuple(r) for r in runs], journal["dtype"], pure=False)
        for runs in shard_runs.values()
    ]
    return sorted(p for found in wait_with_progress(tasks, "ingest: reading, checking and writing frames", unit="shards") for p in found)


def _warn_repeated_shot_ids(new_ids: np.ndarray, stored_ids, log) -> None:
    """One WARNING line when shot ids repeat, within the new frames or against the store:
    label CSVs and ``evaluate --truth`` match patterns by shot id."""
    # tolist(): the store's strings come back as NumPy StringDType, which .astype(str) rejects.
    new = np.array([str(i) for i in np.asarray(new_ids).tolist()], dtype=object)
    stored = {str(i) for i in np.asarray(stored_ids).tolist()}
    unique, counts = np.unique(new, return_counts=True)
    repeated = [i for i, c in zip(unique.tolist(), counts.tolist()) if c > 1 or i in stored]
    if repeated:
        log(f"WARNING: {len(repeated)} shot id(s) of these frames are repeated or already in the store "
            f"(e.g. {repeated[0]!r}); a label row for such an id labels every pattern that has it")


def _drop_bad_frames(journal: dict, plan: dict, problems: list) -> tuple[dict, dict, int]:
    """The journal and plan without the bad frames, and the first pattern that moved."""
    bad = {(src, frame) for src, frame, _ in problems}
    keep = np.array([(int(s), int(f)) not in bad for s, f in zip(plan["source_index"], plan["frame"])], bool)
    plan = {key: value[keep] if key in PLAN_ROWS else value for key, value in plan.items()}
    files = [dict(record) for record in journal["files"]]
    next_pattern = journal["start"]
    for index, record in enumerate(files):
        dropped = sum(1 for src, _, _ in problems if src == index)
        record.update(stored=record["stored"] - dropped, rejected=record["rejected"] + dropped, first_pattern=next_pattern)
        next_pattern += record["stored"]
    rejects = journal["rejects"] + [
        dataclasses.asdict(Reject(files[src]["path"], frame, reason)) for src, frame, reason in problems
    ]
    journal = {**journal, "files": files, "rejects": rejects, "n_new": int(keep.sum())}
    return journal, plan, journal["start"] + int(np.argmin(keep))


def _run_journal(path: Path, journal: dict, plan: dict, client, log) -> dict:
    """Write frames and metadata, finalize; returns the final journal. Idempotent: safe to repeat."""
    sources = [
        _lightweight(open_source(f["path"], dataset=f["dataset"] if f["layout"] == "hdf5" else None))
        for f in journal["files"]
    ]
    first_pattern = journal["start"]
    while True:
        store.resize_patterns(path, journal["start"] + journal["n_new"])
        problems = _write_frames(path, journal, plan, sources, first_pattern, client)
        if not problems:
            break
        for line in reject_lines([Reject(journal["files"][src]["path"], frame, reason) for src, frame, reason in problems]):
            log(f"ERROR: {line}")
        journal, plan, first_pattern = _drop_bad_frames(journal, plan, problems)
        _write_journal(path, journal, plan)
    start, stop = journal["start"], journal["start"] + journal["n_new"]

    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    group["pattern"][start:stop] = np.arange(start, stop)
    group["shot_id"][start:stop] = plan["shot_id"].astype(object)
    group["source_file"][start:stop] = np.array([journal["files"][i]["path"] for i in plan["source_index"]], dtype=object)
    group["frame"][start:stop] = plan["frame"]
    group["pulse_energy"][start:stop] = plan["pulse_energy"]
    group["label"][start:stop] = plan["label"]
    if plan.get("mask") is not None:
        group["mask"][...] = np.asarray(group["mask"][...]) | np.asarray(plan["mask"], bool)

    attrs = dict(group.attrs)
    ingest_id = journal["ingest_id"]
    geometry = {k: attrs.get(k) for k in ("wavelength", "detector_distance", "pixel_size")}
    for record in journal["files"]:
        for key, value in record["geometry"].items():
            if geometry.get(key) is None and value is not None:
                geometry[key] = value
    files = list(attrs.get("ingested_files", []))
    if not any(f.get("ingest_id") == ingest_id for f in files):
        files += [{**f, "ingest_id": ingest_id} for f in journal["files"]]
    rejects = list(attrs.get("rejects", []))
    if not any(r.get("ingest_id") == ingest_id for r in rejects):
        rejects += [{**r, "ingest_id": ingest_id} for r in journal["rejects"]]
    group.attrs.update({**geometry, "ingested_files": files, "rejects": rejects})
    store.append_provenance(path, "ingest", journal["parameters"], extra={"ingest_id": ingest_id}, once=True)
    store.consolidate(path)
    shutil.rmtree(_pending(path))
    return journal


# --------------------------------------------------------------------------- public API


def ingested_fingerprints(store_path: str | os.PathLike) -> set[tuple[str, int, int]]:
    """``(absolute path, size, mtime in ns)`` of every file the store holds
    (:func:`pipeline.sources.fingerprint`); empty when there is no store yet."""
    if not store.is_store(store_path):
        return set()
    return {(f["path"], f["size"], f["mtime_ns"]) for f in store.read_attrs(store_path).get("ingested_files", [])}


def ingest(
    store_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    dataset: str | None = None,
    force: bool = False,
    labels: bool = True,
    client=None,
    cluster: str = "local",
    log=None,
) -> dict[str, int]:
    """Ingest frames from ``inputs`` into the store at ``store_path`` (created if missing).

    Parameters
    ----------
    store_path : path-like
        Zarr v3 store directory.
    inputs : sequence of path-like
        CXI (stacked or one frame per entry), HDF5 (with ``dataset``) or ``.npy`` files.
    dataset : str, optional
        HDF5 path of the frame stack in plain HDF5 files.
    force : bool, default=False
        Ingest files again even if the store already holds them (their frames are appended).
    labels : bool, default=True
        Store the labels found in the files (False: every pattern unlabelled, e.g. a
        simulated beamtime to be labelled by hand as a rehearsal).
    client : distributed.Client, optional
        Defaults to the current client, else one of ``cluster`` started for the call.
    cluster : str, default="local"
        Where Dask runs when neither ``client`` nor a current client is there (``--cluster``).
    log : callable, optional
        Receives one line per rejected frame or skipped file (default: print to stderr).

    Returns
    -------
    dict
        ``ingested`` (patterns added), ``rejected`` (frames, or whole unreadable files,
        rejected in this run), ``skipped_files`` (already ingested) and ``patterns`` (total
        in the store).
    """
    from pipeline.dask_cluster import dask_client

    if client is None:
        with dask_client(cluster) as client:
            return ingest(store_path, inputs, dataset=dataset, force=force, labels=labels, client=client, log=log)
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    path = Path(store_path)
    if path.is_file():
        raise AirysortError(f"{str(path)!r} is a file, not a store; the store comes first: "
                            "airysort ingest STORE.zarr FILES...")
    if store.is_store(path):  # another program's Zarr store is refused before anything is written
        store.check_store(path)
    inputs = [str(p) for p in dict.fromkeys(str(p) for p in inputs)]  # drop repeats, keep order
    parameters = {"inputs": [str(Path(p).resolve()) for p in inputs], "dataset": dataset, "force": force,
                  "labels": labels}

    with store.write_lock(path, "ingest"):
        resumed = _read_journal(path) if store.is_store(path) else None
        if resumed is not None:
            log(f"completing an interrupted ingest of {len(resumed[0]['files'])} file(s) first")
            _run_journal(path, *resumed, client, log)

        sources, rejects = _scan(inputs, dataset)
        for source in sources:
            for line in source.warnings:
                log(f"WARNING: {line}")
        known = ingested_fingerprints(path)
        skipped = 0
        if not force:
            fresh = []
            for source in sources:
                fp = fingerprint(source.path)
                if (fp["path"], fp["size"], fp["mtime_ns"]) in known:
                    log(f"{source.path}: already in the store, skipped (use --force to ingest it again)")
                    skipped += 1
                else:
                    fresh.append(source)
            sources = fresh

        if not store.is_store(path):
            if not sources:
                for reject in rejects:
                    log(f"ERROR: {reject.line()}")
                raise AirysortError(f"nothing to ingest: none of the {len(inputs)} input(s) could be read")
            first = sources[0]
            store.create_store(path, frame_shape=first.frame_shape, dtype=store.raw_dtype(first.dtype), mask=first.mask,
                               geometry=first.geometry)

        group = zarr.open_group(path, mode="r", use_consolidated=False)
        frame_shape, dtype = tuple(group["raw"].shape[1:]), np.dtype(group["raw"].dtype)
        start = int(group["pattern"].shape[0])

        for source in sources:
            if source.dtype.kind == dtype.kind == "f" and source.dtype.itemsize > dtype.itemsize:
                log(f"WARNING: {source.path}: frames are {source.dtype}, the store's raw is {dtype}: "
                    f"values are rounded to {dtype}")
        plan = _plan(sources, start, frame_shape, with_labels=labels)
        rejects += plan.pop("rejects")
        for line in reject_lines(rejects):
            log(f"ERROR: {line}")
        _warn_repeated_shot_ids(plan["shot_id"], group["shot_id"][:start] if start else [], log)
        plan["mask"] = None
        masks = [s.mask for s in sources if s.mask is not None and s.mask.shape == frame_shape]
        if masks:
            plan["mask"] = np.logical_or.reduce(masks)
        journal = {
            "ingest_id": uuid.uuid4().hex,
            "start": start,
            "n_new": int(len(plan["frame"])),
            "dtype": dtype.str,
            "files": plan["files"],
            "rejects": [dataclasses.asdict(r) for r in rejects],
            "parameters": parameters,
        }
        if sources or rejects:
            _write_journal(path, journal, plan)
            journal = _run_journal(path, journal, plan, client, log)

    return {
        "ingested": journal["n_new"],
        "rejected": len(journal["rejects"]),
        "skipped_files": skipped,
        "patterns": store.n_committed(path),
    }
