"""Readers for the input files ingest accepts, one class per layout.

Each source describes a file without loading its frames (``n_frames``, ``frame_shape``,
``dtype``, geometry, mask and the small per-frame metadata) and reads frames on demand
with :meth:`Source.read`, so memory stays bounded whatever the file size. Frames are
read in the workers; a :class:`Source` is cheap to pickle (it holds a path, not a handle).

Layouts (interface.md):

- CXI stacked: ``/entry_1/data_1/data`` (N, y, x) with optional detector, source,
  ``experiment_identifier`` and labels at ``/entry_1/result_1/labels`` (N, 11);
- CXI one frame per entry (CXIDB entry 94): ``/entry_k/instrument_1/detector_1/data``;
- plain HDF5 with ``dataset=`` the path of an (N, y, x) or (y, x) dataset;
- ``.npy`` stacks (memory-mapped).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import AirysortError
from pipeline.taxonomy import N_CLASSES

H_TIMES_C = 6.62607015e-34 * 299792458.0  # J·m, converts photon energy to wavelength

STACKED_DATA_PATHS = ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data")
DETECTOR = "instrument_1/detector_1"
SOURCE = "instrument_1/source_1"


class SourceError(AirysortError):
    """The whole file cannot be used (unreadable, missing dataset, not a frame stack)."""


@dataclass
class Source:
    """One input file: its description and the per-frame metadata ingest stores."""

    path: str
    layout: str  # "cxi-stacked", "cxi-entries", "hdf5", "npy"
    n_frames: int
    frame_shape: tuple[int, ...]
    dtype: np.dtype
    dataset: str | None = None  # HDF5 path of the stack (stacked / hdf5 layouts)
    entries: list[str] = field(default_factory=list)  # entry groups (entries layout)
    geometry: dict[str, float | None] = field(default_factory=dict)
    mask: np.ndarray | None = None  # bool, True = bad pixel
    shot_ids: np.ndarray | None = None  # (n_frames,) str
    pulse_energy: np.ndarray | None = None  # (n_frames,) float64, J
    labels: np.ndarray | None = None  # (n_frames, 11) int8, -1 = unlabelled
    warnings: list[str] = field(default_factory=list)  # one line each, for the user

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` as an array of shape (stop - start, *frame_shape).

        Raises ``OSError``/``ValueError`` when the bytes cannot be read (e.g. truncated file);
        callers isolate the bad frames by reading one at a time.
        """
        if self.layout == "npy":
            stack = np.load(self.path, mmap_mode="r")
            stack = stack[None] if stack.ndim == 2 else stack
            return np.array(stack[start:stop])
        with h5py.File(self.path, "r") as h5:
            if self.layout == "cxi-entries":
                frames = [_entry_frame(h5, entry) for entry in self.entries[start:stop]]
                return np.stack(frames) if frames else np.zeros((0, *self.frame_shape), self.dtype)
            data = h5[self.dataset]
            if data.ndim == 2:
                return data[()][None][start:stop]
            return data[start:stop]


def fingerprint(path: str | os.PathLike) -> dict:
    """What identifies an ingested file: absolute path, size and modification time."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def open_source(path: str | os.PathLike, *, dataset: str | None = None) -> Source:
    """Describe the input file at ``path`` (reads metadata only).

    Raises
    ------
    SourceError
        When the file cannot be opened or holds no usable frame stack; the message names
        the file and says what was expected.
    """
    source = _open_any(str(path), dataset)
    if source.n_frames == 0:
        raise SourceError(f"{source.path}: holds no frames (an empty stack of {source.frame_shape!r} frames)")
    return source


def _open_any(path: str, dataset: str | None) -> Source:
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file")
    if path.endswith(".npy"):
        return _open_npy(path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise SourceError(f"{path}: cannot open as HDF5/CXI ({error})") from None
    with h5:
        try:
            return _open_hdf5_layout(path, h5, dataset)
        except SourceError:
            raise
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, OSError) as error:
            # Metadata of an unexpected kind (a group where a dataset belongs, text where a
            # number belongs, a link to a missing file): the file cannot be described, so it
            # is rejected whole and the other inputs go on.
            raise SourceError(f"{path}: unreadable metadata ({type(error).__name__}: {error}); "
                              "--dataset PATH reads the frames alone") from None


def _open_hdf5_layout(path: str, h5: h5py.File, dataset: str | None) -> Source:
    if dataset is not None:
        return _open_hdf5(path, h5, dataset)
    for candidate in STACKED_DATA_PATHS:
        data = _dataset(h5, candidate)
        if data is not None and data.ndim == 3:
            return _open_cxi_stacked(path, h5, candidate)
    entries = _frame_entries(h5)
    if entries:
        return _open_cxi_entries(path, h5, entries)
    shapes = {name: data.shape for name in STACKED_DATA_PATHS if (data := _dataset(h5, name)) is not None}
    found = "".join(f"; /{name} has shape {shape!r}" for name, shape in shapes.items())
    raise SourceError(
        f"{path}: no frames found; expected /entry_1/data_1/data (N, y, x), "
        f"/entry_k/instrument_1/detector_1/data per entry, or pass --dataset PATH{found}"
    )


def _dataset(h5: h5py.File, name: str) -> h5py.Dataset | None:
    """The dataset at ``name``, or None where there is none (or a group, or a dangling link)."""
    try:
        item = h5.get(name)
    except (KeyError, OSError):  # a soft or external link whose target is missing
        return None
    return item if isinstance(item, h5py.Dataset) else None


def _check_frame_shape(path: str, where: str, frame_shape: tuple[int, ...]) -> None:
    if 0 in frame_shape:
        raise SourceError(f"{path}: {where} holds frames of shape {frame_shape!r}; a frame needs pixels")


def _open_npy(path: str) -> Source:
    try:
        stack = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise SourceError(f"{path}: cannot read as .npy ({error})") from None
    if stack.ndim not in (2, 3):
        raise SourceError(f"{path}: expected an (N, y, x) or (y, x) array, got shape {stack.shape!r}")
    n_frames = 1 if stack.ndim == 2 else stack.shape[0]
    return Source(path, "npy", n_frames, tuple(stack.shape[-2:]), stack.dtype)


def _open_hdf5(path: str, h5: h5py.File, dataset: str) -> Source:
    data = _dataset(h5, dataset)
    if data is None:
        what = "is a group, not a dataset" if isinstance(h5.get(dataset, getlink=True), h5py.HardLink) else "not found"
        raise SourceError(f"{path}: dataset {dataset!r} {what}")
    if data.ndim not in (2, 3):
        raise SourceError(f"{path}: dataset {dataset!r} has shape {data.shape!r}; expected (N, y, x) or (y, x)")
    _check_frame_shape(path, dataset, tuple(data.shape[-2:]))
    n_frames = 1 if data.ndim == 2 else data.shape[0]
    return Source(path, "hdf5", n_frames, tuple(data.shape[-2:]), data.dtype, dataset=dataset)


def _open_cxi_stacked(path: str, h5: h5py.File, data_path: str) -> Source:
    data = h5[data_path]
    _check_frame_shape(path, data_path, tuple(data.shape[1:]))
    n_frames = data.shape[0]
    detector, source = h5.get(f"entry_1/{DETECTOR}"), h5.get(f"entry_1/{SOURCE}")
    shot_ids = _optional(h5, "entry_1/experiment_identifier", n_frames)
    pulse = _optional(h5, f"entry_1/{SOURCE}/pulse_energy", n_frames)
    labels, warnings = _checked_labels(_optional(h5, "entry_1/result_1/labels", n_frames), path)
    return Source(
        path,
        "cxi-stacked",
        n_frames,
        tuple(data.shape[1:]),
        data.dtype,
        dataset=data_path,
        geometry=_geometry(detector, source),
        mask=_mask(detector, tuple(data.shape[1:])),
        shot_ids=None if shot_ids is None else np.array([_as_str(s) for s in shot_ids], dtype=object),
        pulse_energy=None if pulse is None else np.asarray(pulse, np.float64),
        labels=labels,
        warnings=warnings,
    )


def _frame_entries(h5: h5py.File) -> list[str]:
    """``entry_1 … entry_N``, N the largest k whose ``entry_k`` holds a detector frame;
    empty when none does. Frame k - 1 of the file is ``entry_k``, also where an entry is
    missing or has no frame (that frame is then rejected, not silently skipped)."""
    numbers = [int(match.group(1)) for name in h5
               if (match := re.fullmatch(r"entry_(\d+)", name)) and f"{name}/{DETECTOR}/data" in h5]
    return [f"entry_{k}" for k in range(1, max(numbers) + 1)] if numbers else []


def _entry_frame(h5: h5py.File, entry: str) -> np.ndarray:
    if f"{entry}/{DETECTOR}/data" not in h5:
        raise KeyError(f"no {entry}/{DETECTOR}/data")
    return h5[f"{entry}/{DETECTOR}/data"][()]


def _open_cxi_entries(path: str, h5: h5py.File, entries: list[str]) -> Source:
    first_entry = next(entry for entry in entries if f"{entry}/{DETECTOR}/data" in h5)
    first = h5[f"{first_entry}/{DETECTOR}/data"]
    if first.ndim != 2:
        raise SourceError(f"{path}: {first_entry}/{DETECTOR}/data has shape {first.shape!r}; expected (y, x)")
    _check_frame_shape(path, f"{first_entry}/{DETECTOR}/data", tuple(first.shape))
    shot_ids, pulse, labels, warnings = [], [], [], []
    for frame, entry in enumerate(entries):
        group = h5.get(entry, {})
        shot_ids.append(_as_str(group["experiment_identifier"][()]) if "experiment_identifier" in group else None)
        value = group.get(f"{SOURCE}/pulse_energy")
        pulse.append(float(np.asarray(value[()]).ravel()[0]) if value is not None else np.nan)
        note = group.get("note_1/data")
        row = np.asarray(note[()]).ravel() if note is not None else None
        if row is not None and row.shape != (N_CLASSES,):
            warnings.append(f"{path}: frame {frame} ({entry}): label has {row.size} values, not {N_CLASSES}; "
                            "stored as unlabelled")
            row = None
        labels.append(row if row is not None else np.full(N_CLASSES, -1))
    labels = np.stack(labels)
    checked, label_warnings = _checked_labels(labels, path) if (labels != -1).any() else (None, [])
    return Source(
        path,
        "cxi-entries",
        len(entries),
        tuple(first.shape),
        first.dtype,
        entries=entries,
        geometry=_geometry(h5[first_entry].get(DETECTOR), h5[first_entry].get(SOURCE)),
        mask=_mask(h5[first_entry].get(DETECTOR), tuple(first.shape)),
        shot_ids=None if all(s is None for s in shot_ids) else np.array(
            [s if s is not None else f"{Path(path).name}:{frame}" for frame, s in enumerate(shot_ids)], dtype=object),
        pulse_energy=np.asarray(pulse, np.float64),
        labels=checked,
        warnings=warnings + label_warnings,
    )


def _optional(h5: h5py.File, name: str, n_frames: int) -> np.ndarray | None:
    """A per-frame dataset if present with one value (or row) per frame, else None."""
    if name not in h5:
        return None
    values = h5[name][()]
    values = np.atleast_1d(values)
    return values if len(values) == n_frames else None


def _as_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return _as_str(value.ravel()[0]) if value.size == 1 else str(value.tolist())
    return str(value)


def _scalar(group, name: str) -> float | None:
    if group is None or name not in group:
        return None
    value = np.asarray(group[name][()], dtype=np.float64).ravel()
    return float(value[0]) if value.size else None


def _geometry(detector, source) -> dict[str, float | None]:
    wavelength = _scalar(source, "wavelength")
    energy = _scalar(source, "energy")  # photon energy, J
    if wavelength is None and energy:
        wavelength = H_TIMES_C / energy
    return {
        "wavelength": wavelength,
        "detector_distance": _scalar(detector, "distance"),
        "pixel_size": _scalar(detector, "x_pixel_size"),
    }


def _mask(detector, frame_shape: tuple[int, ...]) -> np.ndarray | None:
    if detector is None or "mask" not in detector:
        return None
    mask = np.asarray(detector["mask"][()])
    if mask.shape != frame_shape:
        return None
    return mask != 0  # CXI: any set bit flags the pixel


def _checked_labels(labels: np.ndarray | None, path: str) -> tuple[np.ndarray | None, list[str]]:
    """Labels as int8 multi-hot rows, -1 where a row is not exactly 0/1 (unlabelled), and
    a warning for each kind of row or array that could not be used. Values are checked
    before the cast: 0.7, 1.9, NaN or 257 would otherwise turn into valid labels."""
    if labels is None:
        return None, []
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != N_CLASSES:
        return None, [f"{path}: labels have shape {labels.shape!r}, not (frames, {N_CLASSES}); "
                      "the frames are stored as unlabelled"]
    if labels.dtype.kind not in "biuf":
        return None, [f"{path}: labels are of type {labels.dtype}, not numbers 0 or 1; "
                      "the frames are stored as unlabelled"]
    multi_hot = np.isin(labels, (0, 1)).all(axis=1)
    checked = np.full(labels.shape, -1, np.int8)
    checked[multi_hot] = labels[multi_hot].astype(np.int8)
    # Rows of -1 are frames without labels (one-frame-per-entry files fill them in).
    bad = np.flatnonzero(~multi_hot & ~(labels == -1).all(axis=1))
    warnings = []
    if bad.size:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if bad.size > 5 else "")
        warnings.append(f"{path}: {bad.size} frame(s) have labels other than 0 and 1 (frame {shown}); "
                        "they are stored as unlabelled")
    return checked, warnings
