"""Small input files for tests: CXI (both layouts), written with h5py as a beamline would."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py
import numpy as np

from pipeline.taxonomy import N_CLASSES

#: The checkout the tests belong to.
REPO = Path(__file__).resolve().parents[1]


def repo_env(**overrides: str) -> dict[str, str]:
    """The environment for a subprocess that imports this checkout: the repository first on
    ``PYTHONPATH``, whatever was there kept after it (packages installed by path, as on a
    machine without pip access), then ``overrides``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **overrides}


#: The suite compiles XLA's CPU programs without LLVM optimisation (tests/conftest.py).
UNOPTIMISED_XLA = "--xla_backend_optimization_level=0"


def xla_flags(*flags: str) -> str:
    """``XLA_FLAGS`` for a test's subprocess: ``flags`` and :data:`UNOPTIMISED_XLA`."""
    return " ".join((*flags, UNOPTIMISED_XLA))


def cli_with_ctrl_c(*args: str) -> list[str]:
    """The command line of ``airysort ARGS...`` in a subprocess where Ctrl-C (SIGINT) acts as
    in a terminal. A test run started in the background inherits SIGINT ignored, and Python
    then keeps it ignored in every subprocess (``train`` rightly leaves an ignored SIGINT
    alone), so the signal is given its default handler before the CLI starts."""
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv[0] = 'airysort'; runpy.run_module('pipeline.cli.main', run_name='__main__')")
    return [sys.executable, "-c", start, *map(str, args)]


def write_stacked_cxi(path: Path, frames: np.ndarray, *, labels: np.ndarray | None = None, mask: np.ndarray | None = None,
                      pulse_energy: np.ndarray | None = None, shot_ids: list[str] | None = None) -> Path:
    """A stacked-layout CXI file (interface.md) with geometry, as a beamline would write it."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("entry_1/data_1/data", data=frames, chunks=(1, *frames.shape[1:]))
        det = h5.create_group("entry_1/instrument_1/detector_1")
        det["distance"] = 0.37
        det["x_pixel_size"] = det["y_pixel_size"] = 75e-6
        if mask is not None:
            det["mask"] = mask.astype(np.uint32)
        src = h5.create_group("entry_1/instrument_1/source_1")
        src["wavelength"] = 13.5e-9
        if pulse_energy is not None:
            src["pulse_energy"] = pulse_energy
        if shot_ids is not None:
            h5["entry_1/experiment_identifier"] = np.array(shot_ids, dtype=h5py.string_dtype())
        if labels is not None:
            h5["entry_1/result_1/labels"] = labels.astype(np.int8)
    return path


def write_entries_cxi(path: Path, frames: np.ndarray, *, labels: np.ndarray | None = None) -> Path:
    """The one-frame-per-entry layout of CXIDB entry 94."""
    with h5py.File(path, "w") as h5:
        for k, frame in enumerate(frames, start=1):
            entry = h5.create_group(f"entry_{k}")
            entry["instrument_1/detector_1/data"] = frame
            entry["instrument_1/detector_1/distance"] = 0.37
            entry["instrument_1/source_1/energy"] = 91.8 * 1.602176634e-19
            entry["experiment_identifier"] = f"run7-shot{k:05d}"
            if labels is not None:
                entry["note_1/data"] = labels[k - 1].astype(np.int8)
    return path


def random_frames(n: int, shape=(24, 32), dtype=np.uint16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=(n, *shape)).astype(dtype)


def random_labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(n, N_CLASSES)).astype(np.int8)
