"""``airysort watch DIR STORE MODEL_DIR``: classify files as they land during a beamtime.

Every ``interval`` seconds the directory is listed. A file has *landed* once its size
and modification time are the same in two listings in a row (the DAQ may still be
writing it). The landed files of one listing form a batch, which goes through:

1. **ingest** into the store (appended; a file the store already holds is left out, so
   a watch that is stopped and started again carries on where it stopped);
2. **preprocess** of the new patterns: on a store not preprocessed yet, the whole store
   with the image size, crop and scaling the model was trained on
   (:func:`pipeline.preprocess.preprocess_store`, which also finds the run's hot pixels,
   background and hit threshold); afterwards only the new patterns, with those same
   run-level corrections (:func:`pipeline.preprocess.preprocess_new`), so that every
   image of the run is made alike;
3. **predict** of the new patterns with the model (:func:`pipeline.classify.predict_store`,
   written by region).

Steps 2 and 3 start from the end of the last preprocess and predict recorded in the
store's provenance, not from this batch alone: patterns left behind by a watch that was
killed between two steps are done by the next batch. One line per batch reports the new
patterns, their hits and the classes predicted for them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pipeline.errors import AirysortError, StoreLockedError
from pipeline.progress import StageClock

#: File names watched by default: the inputs ``airysort ingest`` reads without options.
DEFAULT_PATTERNS = ("*.cxi", "*.h5", "*.hdf5", "*.npy")


def snapshot(directory: str | os.PathLike, patterns: Iterable[str] = DEFAULT_PATTERNS) -> dict[str, tuple[int, int]]:
    """``{path: (size in bytes, modification time in ns)}`` of the matching files, not
    descending into sub-directories."""
    found: dict[str, tuple[int, int]] = {}
    for pattern in patterns:
        for path in Path(directory).glob(pattern):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed between listing and stat
                continue
            if path.is_file():
                found[str(path.resolve())] = (stat.st_size, stat.st_mtime_ns)
    return found


def landed(previous: dict[str, tuple[int, int]], current: dict[str, tuple[int, int]]) -> list[str]:
    """Files of ``current`` unchanged since ``previous`` (no longer being written), oldest
    first (then by name)."""
    steady = [path for path, stat in current.items() if previous.get(path) == stat]
    return sorted(steady, key=lambda path: (current[path][1], path))


def done_until(attrs: dict[str, Any], command: str, *, model_id: str | None = None) -> int:
    """End of the pattern range the last ``command`` wrote (0 if none, or if its model is
    not ``model_id``)."""
    from pipeline import store

    entry = store.last_entry(attrs, command)
    if not entry or (model_id is not None and entry.get("parameters", {}).get("model_id") != model_id):
        return 0
    return int(entry.get("patterns", [0, 0])[1])


def classifier_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of a finished classifier of ``image`` inputs, or a clear error."""
    from pipeline.classify import finished_classifier_info

    info = finished_classifier_info(model_dir)
    if info["input"] != "image":
        raise AirysortError(f"watch classifies 'image' inputs; the model in {str(model_dir)!r} reads {info['input']!r}")
    return info


def process_batch(
    files: list[str],
    store_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    dataset: str | None = None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Ingest ``files``, then preprocess and classify every pattern not done yet.

    Must run inside :func:`pipeline.dask_cluster.dask_client`.

    Returns
    -------
    dict
        ``files``, ``ingested``, ``rejected``, ``preprocessed`` and ``predicted``
        (patterns done now), ``hits`` and ``counts`` (hits and predicted classes among
        the patterns classified now), ``patterns`` (in the store), ``seconds`` (per stage: ``ingest``,
        ``preprocess``, ``predict``).
    """
    from pipeline import store
    from pipeline.classify import predict_store
    from pipeline.ingest import ingest
    from pipeline.model_dir import IMAGE_PREPROCESSING
    from pipeline.preprocess import preprocess_new, preprocess_store

    info = classifier_info(model_dir)
    clock = StageClock()
    try:
        ingested = ingest(store_path, files, dataset=dataset, log=log) if files else {"ingested": 0, "rejected": 0}
    except AirysortError as error:
        if store.is_store(store_path):
            raise
        # No store yet and not one readable frame in these files (each rejected with its
        # reason above): wait for the next files instead of stopping the watch.
        log(f"ERROR: {error}")
        return {"files": len(files), "ingested": 0, "rejected": len(files), "preprocessed": 0, "hits": 0,
                "predicted": 0, "counts": {}, "patterns": 0, "seconds": {}}
    clock.lap("ingest")
    n_patterns = store.n_committed(store_path)
    attrs = store.read_attrs(store_path)

    preprocessed_from = done_until(attrs, "preprocess")
    if preprocessed_from == 0:
        look = {**IMAGE_PREPROCESSING, **info.get("preprocessing", {})}
        preprocess_store(store_path, size=int(info["input_shape"][0]), crop=look["crop"],
                         scaling=look["scaling"], asinh_scale=look["asinh_scale"])
    elif preprocessed_from < n_patterns:
        preprocess_new(store_path, start=preprocessed_from)
    clock.lap("preprocess")

    predicted_from = done_until(attrs, "predict", model_id=info["model_id"])  # preprocess leaves it as it was
    counts: dict[str, int] = {}
    hits = 0
    if predicted_from < n_patterns:
        counts = predict_store(store_path, model_dir, start=predicted_from)["counts"]
        # Of the patterns classified now, also those a killed batch had preprocessed already.
        hits = int(store.read_pattern_values(store_path, "hit", start=predicted_from).sum())
    clock.lap("predict")
    return {
        "files": len(files),
        "ingested": int(ingested["ingested"]),
        "rejected": int(ingested["rejected"]),
        "preprocessed": n_patterns - preprocessed_from,
        "hits": int(hits),
        "predicted": n_patterns - predicted_from,
        "counts": counts,
        "patterns": n_patterns,
        "seconds": clock.laps,
    }


def watch(
    directory: str | os.PathLike,
    store_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    interval: float = 10.0,
    patterns: Iterable[str] = DEFAULT_PATTERNS,
    dataset: str | None = None,
    once: bool = False,
    max_batches: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Ingest, preprocess and classify the files landing in ``directory`` (see the module
    docstring) until Ctrl-C, which finishes the batch in hand and stops (a second Ctrl-C
    interrupts that batch; the next watch completes it).

    Must run inside :func:`pipeline.dask_cluster.dask_client`.

    Parameters
    ----------
    directory : path
        Where the DAQ writes its files (not searched recursively).
    store_path : path
        The run's store (created by the first file if missing).
    model_dir : path
        A classifier trained with ``airysort train --model cnn`` on ``image``.
    interval : float, default=10.0
        Seconds between two listings of the directory; a file must be unchanged over one
        interval to count as landed.
    patterns : iterable of str, default=DEFAULT_PATTERNS
        Glob patterns of the file names to take.
    dataset : str, optional
        HDF5 path of the frames in plain HDF5 files (as ``ingest --dataset``).
    once : bool, default=False
        Take the files present now as landed, process them in one batch and return
        (for a cron job, or to catch up after the beamtime).
    max_batches : int, optional
        Return after this many batches.
    log : callable, optional
        Receives one line per batch (and ingest's lines on rejects); default: stderr.

    Returns
    -------
    dict
        ``batches``, ``files``, ``ingested``, ``rejected``, ``predicted`` and ``hits`` (totals
        of this watch), ``counts`` (predicted classes of the patterns classified by it) and
        ``patterns`` (in the store at the end).
    """
    from pipeline import store
    from pipeline.ingest import ingested_fingerprints

    directory = Path(directory)
    if not directory.is_dir():
        raise AirysortError(f"{str(directory)!r} is not a directory to watch")
    if interval <= 0:
        raise AirysortError(f"--interval {interval!r} must be a positive number of seconds")
    classifier_info(model_dir)  # a wrong model directory fails now, not at the first file
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    patterns = tuple(patterns)
    totals: dict[str, Any] = {"batches": 0, "files": 0, "ingested": 0, "rejected": 0, "predicted": 0,
                              "hits": 0, "counts": {}, "patterns": 0}
    # (path, size, mtime) of the files handed to ingest, starting with those the store
    # holds: a watch started again does not list every file of the run as skipped.
    taken = ingested_fingerprints(store_path)
    previous = snapshot(directory, patterns) if not once else {}
    if not once:
        log(f"watching {directory} for {', '.join(patterns)} every {interval:g} s (Ctrl-C to stop)")
    with _stop_on_ctrl_c(log) as stop:
        while not stop.is_set():
            if not once and not _sleep(interval, stop):
                break
            current = snapshot(directory, patterns)
            # With --once, every file there now counts as landed.
            ready = landed(current if once else previous, current)
            previous = current
            files = [path for path in ready if (path, *current[path]) not in taken]
            if files or (once and store.is_store(store_path)):
                try:
                    batch = process_batch(files, store_path, model_dir, dataset=dataset, log=log)
                except StoreLockedError as error:
                    if once:
                        raise
                    log(f"{error}; trying again in {interval:g} s")
                    continue
                taken.update((path, *current[path]) for path in files)
                _add(totals, batch)
                log(_batch_line(batch))
            if once or (max_batches is not None and totals["batches"] >= max_batches):
                break
    if stop.is_set():
        log("stopped")
    return totals


@contextlib.contextmanager
def _stop_on_ctrl_c(log: Callable[[str], None]) -> Iterator[threading.Event]:
    """An event set by the first Ctrl-C (SIGINT), so that the batch in hand finishes
    and is counted; a second Ctrl-C interrupts at once. Outside the main thread (where
    Python cannot take signals) the event is only set by the caller."""
    from pipeline.dask_cluster import ctrl_c_handled_by

    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log("stopping after the batch in hand (Ctrl-C again to abort it)")

    with ctrl_c_handled_by(request_stop):
        yield stop


def _sleep(seconds: float, stop: threading.Event) -> bool:
    """Wait ``seconds`` in short steps; False as soon as ``stop`` is set.

    Not ``stop.wait(seconds)``: the Ctrl-C handler sets ``stop`` in this same thread, and
    if the signal came while ``wait`` held the event's lock, ``set`` would wait on it forever.
    """
    deadline = time.monotonic() + seconds
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, 0.1))
    return False


def _add(totals: dict[str, Any], batch: dict[str, Any]) -> None:
    totals["batches"] += 1
    for key in ("files", "ingested", "rejected", "predicted", "hits"):
        totals[key] += batch[key]
    for name, count in batch["counts"].items():
        totals["counts"][name] = totals["counts"].get(name, 0) + count
    totals["patterns"] = batch["patterns"]


def _batch_line(batch: dict[str, Any]) -> str:
    classes = ", ".join(f"{name} {count}" for name, count in batch["counts"].items() if count)
    return (
        f"{batch['files']} new file(s): {batch['ingested']} patterns ingested, {batch['rejected']} rejected; "
        f"{batch['predicted']} classified ({batch['hits']} hits): {classes or 'no class'}; "
        f"{batch['patterns']} patterns in the store; {sum(batch['seconds'].values()):.1f} s"
    )
