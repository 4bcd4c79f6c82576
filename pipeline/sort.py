"""Sort a classified store into per-class and per-cluster index lists and galleries.

``sort_store`` writes, under ``OUT_DIR``::

    classes/<class>.csv          pattern, shot_id, source_file, frame, probability
    classes/<class>.png          representative (most confident) and borderline patterns
    clusters/<method>/cluster_<k>.csv / .png   the same for every clustering in the store
    summary.json                 counts per class and per cluster

and ``export_patterns`` copies the raw frames of one class to a new stacked CXI file for
downstream phasing.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import xarray as xr

from pipeline import store
from pipeline.errors import AirysortError
from pipeline.gallery import contact_sheet, display_images
from pipeline.progress import progress_bar
from pipeline.taxonomy import CLASS_INDEX, CLASS_NAMES

N_REPRESENTATIVE = 16
N_BORDERLINE = 8


def safe_name(name: str) -> str:
    """A file name for a class name ('Spherical/Oblate' -> 'Spherical-Oblate')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def class_thresholds(dataset: xr.Dataset) -> np.ndarray:
    """Per-class decision thresholds recorded by ``predict`` (0.5 where none is recorded)."""
    thresholds = np.full(len(CLASS_NAMES), 0.5)
    recorded = dataset["predicted"].attrs.get("thresholds") if "predicted" in dataset else None
    for entry in reversed(dataset.attrs.get("provenance", [])):
        if recorded is None and entry.get("command") == "predict":
            recorded = entry.get("parameters", {}).get("thresholds")
    if recorded is not None:
        values = list(recorded.values()) if isinstance(recorded, dict) else list(recorded)
        if len(values) == len(CLASS_NAMES):
            thresholds = np.asarray(values, float)
    return thresholds


#: The store's per-pattern columns in every index list, between ``pattern`` and ``probability``.
INDEX_COLUMNS = ("shot_id", "source_file", "frame")


def _index_columns(dataset: xr.Dataset) -> dict[str, np.ndarray]:
    """The per-pattern columns of every index list, read once per ``sort`` and kept in
    the store's dtypes (NumPy strings, not a Python object per pattern: 190 against
    30 MiB at 10⁶ patterns)."""
    return {name: np.asarray(dataset[name].values) for name in INDEX_COLUMNS}


#: Rows of an index list turned into Python objects at a time.
ROWS_PER_WRITE = 65_536


def _write_index(path: Path, columns: dict[str, np.ndarray], patterns: np.ndarray,
                 probability: np.ndarray | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["pattern", *INDEX_COLUMNS, "probability"])
        for start in range(0, len(patterns), ROWS_PER_WRITE):
            rows = patterns[start : start + ROWS_PER_WRITE]
            shown = ([""] * len(rows) if probability is None
                     else [f"{value:.4f}" for value in probability[start : start + ROWS_PER_WRITE]])
            writer.writerows(zip(rows.tolist(), *(columns[name][rows].tolist() for name in INDEX_COLUMNS), shown))


def _gallery(path: Path, dataset: xr.Dataset, picks: list[tuple[int, str]], title: str) -> str:
    images = display_images(dataset, [p for p, _ in picks])
    return contact_sheet(images, path, captions=[c for _, c in picks], title=title)


def sort_store(path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write index lists and galleries per predicted class and per cluster.

    Parameters
    ----------
    path : path-like
        Store with ``predicted``/``prob`` (from ``airysort predict``) and/or
        ``cluster_<method>`` variables (from ``airysort cluster``).
    out_dir : path-like
        Output directory (created).

    Returns
    -------
    dict
        ``classes`` {name: count}, ``clusters`` {method: {cluster: count}}, ``out_dir``.
    """
    dataset = store.open_store(path)
    out = store.check_output_dir(out_dir, path)
    cluster_vars = sorted(v for v in dataset.data_vars if re.fullmatch(r"cluster_[a-z]+", str(v)))
    if "predicted" not in dataset and not cluster_vars:
        raise AirysortError(
            f"store {str(path)!r} has neither 'predicted' nor any 'cluster_*' variable; "
            "run 'airysort predict' or 'airysort cluster' first"
        )
    summary: dict[str, Any] = {"out_dir": str(out), "classes": {}, "clusters": {}}
    columns = _index_columns(dataset)
    assignments = {variable: np.asarray(dataset[variable].values) for variable in cluster_vars}
    n_groups = (len(CLASS_NAMES) if "predicted" in dataset else 0) + sum(
        len(np.unique(a[a >= 0])) for a in assignments.values())
    # A gallery per class and per cluster: seconds each on a large store.
    with progress_bar("sort: index lists and galleries") as bar:
        task = bar.add_task("sort: index lists and galleries", total=n_groups, unit="classes and clusters")
        done = functools.partial(bar.advance, task)
        if "predicted" in dataset:
            summary["classes"] = _sort_classes(dataset, out / "classes", columns, done=done)
        for variable in cluster_vars:
            method = variable.removeprefix("cluster_")
            summary["clusters"][method] = _sort_clusters(dataset, variable, out / "clusters" / method,
                                                         columns, assignments[variable], done=done)

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _sort_classes(
    dataset: xr.Dataset, directory: Path, columns: dict[str, np.ndarray], *, done: Callable[[], Any]
) -> dict[str, int]:
    """Index list and gallery of each predicted class: the most confident members, then
    the patterns nearest the class's threshold. Returns the count per class."""
    predicted = np.asarray(dataset["predicted"].values)
    prob = np.asarray(dataset["prob"].values) if "prob" in dataset else predicted.astype(float)
    thresholds = class_thresholds(dataset)
    counts = {}
    for c, name in enumerate(CLASS_NAMES):
        members = np.flatnonzero(predicted[:, c] == 1)
        members = members[np.argsort(-prob[members, c], kind="stable")]
        _write_index(directory / f"{safe_name(name)}.csv", columns, members, prob[members, c])
        representative = [(int(p), f"#{p} p={prob[p, c]:.2f}") for p in members[:N_REPRESENTATIVE]]
        nearest = np.argsort(np.abs(prob[:, c] - thresholds[c]), kind="stable")[:N_BORDERLINE]
        borderline = [(int(p), f"#{p} p={prob[p, c]:.2f} border") for p in nearest]
        _gallery(directory / f"{safe_name(name)}.png", dataset, representative + borderline,
                 f"{name}: {len(members)} patterns (top: most confident; 'border': near threshold {thresholds[c]:.2f})")
        counts[name] = int(len(members))
        done()
    return counts


def _sort_clusters(
    dataset: xr.Dataset, variable: str, directory: Path, columns: dict[str, np.ndarray], assignment: np.ndarray,
    *, done: Callable[[], Any],
) -> dict[int, int]:
    """Index list and gallery of each cluster of ``variable`` (most probable members first
    when the posteriors are stored). Returns the count per cluster."""
    method = variable.removeprefix("cluster_")
    posterior = np.asarray(dataset[f"{variable}_prob"].values) if f"{variable}_prob" in dataset else None
    counts = {}
    for k in np.unique(assignment[assignment >= 0]):
        members = np.flatnonzero(assignment == k)
        confidence = posterior[members, k] if posterior is not None and k < posterior.shape[1] else None
        if confidence is not None:
            order = np.argsort(-confidence, kind="stable")
            members, confidence = members[order], confidence[order]
        _write_index(directory / f"cluster_{k}.csv", columns, members, confidence)
        picks = [(int(p), f"#{p}") for p in members[:N_REPRESENTATIVE + N_BORDERLINE]]
        _gallery(directory / f"cluster_{k}.png", dataset, picks, f"{method} cluster {k}: {len(members)} patterns")
        counts[int(k)] = int(len(members))
        done()
    return counts


def export_patterns(path: str | os.PathLike, class_name: str, out_cxi: str | os.PathLike) -> int:
    """Copy the raw frames predicted as ``class_name`` into a new stacked CXI file.

    Frames are copied one shard at a time (bounded memory). The file carries the store's
    geometry and mask, shot ids, pulse energies, and the predicted classes at
    ``/entry_1/result_1/predicted`` (not at ``labels``: ``airysort ingest`` reads the file
    back as unlabelled patterns). Returns the count.
    """
    if class_name not in CLASS_INDEX:
        raise AirysortError(f"unknown class {class_name!r}; choose one of: {', '.join(CLASS_NAMES)}")
    dataset = store.open_store(path)
    if "predicted" not in dataset:
        raise AirysortError("the store has no 'predicted' variable; run 'airysort predict' first")
    predicted = np.asarray(dataset["predicted"].values)
    members = np.flatnonzero(predicted[:, CLASS_INDEX[class_name]] == 1)
    if len(members) == 0:
        raise AirysortError(f"no pattern is predicted as {class_name!r}; nothing to export")
    frame_shape = dataset["raw"].shape[1:]
    with h5py.File(out_cxi, "w") as h5:
        data = h5.create_dataset("entry_1/data_1/data", shape=(len(members), *frame_shape),
                                 dtype=dataset["raw"].dtype, chunks=(1, *frame_shape))
        for start in range(0, len(members), store.PATTERN_CHUNK):
            chunk = members[start : start + store.PATTERN_CHUNK]
            # Straight from Zarr: only the inner chunks holding these frames are decoded (a
            # Dask read of scattered members decodes every shard they touch, each time).
            data[start : start + len(chunk)] = store.read_pattern_values(path, "raw", patterns=chunk)
        detector = h5.create_group("entry_1/instrument_1/detector_1")
        source = h5.create_group("entry_1/instrument_1/source_1")
        for group, key, name in ((detector, "detector_distance", "distance"), (detector, "pixel_size", "x_pixel_size"),
                                 (detector, "pixel_size", "y_pixel_size"), (source, "wavelength", "wavelength")):
            if dataset.attrs.get(key) is not None:
                group[name] = dataset.attrs[key]
        detector["mask"] = np.asarray(dataset["mask"].values).astype(np.uint32)
        source["pulse_energy"] = np.asarray(dataset["pulse_energy"].values)[members]
        h5["entry_1/experiment_identifier"] = np.asarray(dataset["shot_id"].values).astype(object)[members].astype(str).astype(h5py.string_dtype())
        # Predictions, not labels: under result_1/labels, ingest would read them back as
        # ground truth (and a model trained on them would learn its own mistakes).
        h5["entry_1/result_1/predicted"] = predicted[members].astype(np.int8)
        h5["entry_1/result_1"].attrs["class_names"] = list(CLASS_NAMES)
    return int(len(members))
