"""A simulated beamtime: per-shot sampling, parallel rendering on Dask, CXI output.

Every shot ``i`` draws all its random numbers (label combination, droplet,
source fluctuations, noise) from its own generator seeded with
``SeedSequence(seed, spawn_key=(i,))``, so a beamtime is reproducible from its
seed whatever the number of workers or the block size. Workers render blocks of
shots (:func:`render_block`, pure NumPy); the client writes finished blocks to the
HDF5 file in order, keeping only a bounded number of blocks in flight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import AirysortError, check_seed
from pipeline.simulate import labels as rules
from pipeline.simulate.optics import HC
from pipeline.simulate.profile import Profile, load_profile
from pipeline.simulate.render import Setup, render_shot
from pipeline.simulate.scene import newton_feasible, sample_shot
from pipeline.taxonomy import CLASS_NAMES, N_CLASSES

#: Shots per Dask task: large enough to amortise task overhead, small for smooth progress.
BLOCK = 16
LAYOUTS = ("stacked", "entries")


def _shot_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def render_block(start: int, stop: int, *, seed: int, profile: Profile, balanced: bool):
    """Render shots ``start..stop-1`` of a beamtime.

    Parameters
    ----------
    start, stop : int
        Shot indices.
    seed : int
        Beamtime seed.
    profile : Profile
        At the simulated frame size.
    balanced : bool
        Equal coarse groups instead of real label frequencies.

    Returns
    -------
    frames : ndarray of shape (stop - start, ny, nx)
        Detector counts, dtype of the profile's detector.
    labels : ndarray of int8, shape (stop - start, 11)
    pulse_energy : ndarray of float64, shape (stop - start,)
        J.
    """
    setup = _setup(profile, seed)
    # Frames go straight into the block (no list of frames and a stacked copy of it).
    frames = np.empty((stop - start, *profile.frame_shape), dtype=profile.detector["dtype"])
    labels, energies = [], []
    for i, (shot, rng) in enumerate(draw_shots(start, stop, seed=seed, profile=profile, balanced=balanced)):
        labels.append(rules.physical_labels(shot, wide_angle=profile.wide_angle,
                                            newton_fringe_pixels=shot.newton_period(profile)))
        frames[i] = render_shot(shot, setup, rng)
        energies.append(shot.pulse_energy)
    return frames, np.stack(labels).astype(np.int8), np.asarray(energies)


def draw_shots(start: int, stop: int, *, seed: int, profile: Profile, balanced: bool):
    """The parameters of shots ``start..stop-1`` (ground truth such as the beam-centre
    shift) and, with each, the shot's generator in the state that renders its frame.

    Yields
    ------
    (Shot, numpy.random.Generator)
    """
    combos, probabilities = rules.combination_table(wide_angle=profile.wide_angle, balanced=balanced,
                                                    newton=newton_feasible(profile))
    for index in range(start, stop):
        rng = _shot_rng(seed, index)
        names = combos[rng.choice(len(combos), p=probabilities)]
        yield sample_shot(names, rng, profile), rng


_SETUP_CACHE: dict[tuple, Setup] = {}


def _setup(profile: Profile, seed: int) -> Setup:
    # Workers render many blocks of one beamtime: build the mask and hot pixels once.
    key = (id(profile), profile.name, profile.frame_shape, profile.detector.get("hot_pixel_seed"), seed)
    if key not in _SETUP_CACHE:
        _SETUP_CACHE.clear()
        _SETUP_CACHE[key] = Setup.build(profile, seed=seed)
    return _SETUP_CACHE[key]


def resolve_profile(profile: str | Path | Profile = "fermi", *, size: int | None = None,
                    like: str | Path | None = None) -> Profile:
    """The profile to simulate: a shipped name, a YAML path, or derived from a real file.

    Parameters
    ----------
    profile : str, Path or Profile, default="fermi"
        Base profile; with ``like`` it supplies what the file lacks.
    size : int or None
        Frame size (pixels along the longer axis); None keeps the profile's (or the
        file's) frame shape.
    like : path or None
        A real CXI file whose geometry, mask and count range the simulation copies.
    """
    base = load_profile(profile)
    if like is not None:
        from pipeline.simulate.like import profile_like

        base = profile_like(like, base=base)
    return base.at_size(size)


def simulate_patterns(
    n: int,
    *,
    seed: int = 0,
    profile: str | Path | Profile = "fermi",
    size: int | None = None,
    balanced: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Simulate shots in memory (no file, no Dask): for tests and notebooks.

    Parameters
    ----------
    n : int
        Number of shots.
    seed : int, default=0
    profile : str, Path or Profile, default="fermi"
    size : int or None, default=None
        Frame size; None = the profile's frame shape.
    balanced : bool, default=False

    Returns
    -------
    frames : ndarray of shape (n, ny, nx)
        Detector counts (uint16 or float32).
    labels : ndarray of int8, shape (n, 11)
    metadata : dict
        ``wavelength``, ``detector_distance``, ``pixel_size`` (m), ``mask`` (ny, nx)
        bool (True = bad), ``pulse_energy`` (n,) J, ``profile`` name, ``model``.
    """
    prof = resolve_profile(profile, size=size)
    _check_n(n)
    frames, labels, energies = render_block(0, n, seed=seed, profile=prof, balanced=balanced)
    return frames, labels, _metadata(prof, seed) | {"pulse_energy": energies}


def _metadata(profile: Profile, seed: int) -> dict[str, Any]:
    return {
        "wavelength": profile.wavelength,
        "detector_distance": profile.detector["distance"],
        "pixel_size": profile.detector["pixel_size"],
        "mask": _setup(profile, seed).mask.copy(),
        "profile": profile.name,
        "model": profile.model,
    }


def _check_n(n: int) -> None:
    if int(n) < 1:
        raise AirysortError(f"number of patterns must be at least 1, got {n!r}")


def simulate_beamtime(
    path: str | Path,
    n: int,
    *,
    size: int | None = None,
    seed: int = 0,
    profile: str | Path | Profile = "fermi",
    like: str | Path | None = None,
    layout: str = "stacked",
    balanced: bool = False,
    client=None,
) -> dict[str, Any]:
    """Simulate a labelled beamtime and write it as a CXI file.

    Parameters
    ----------
    path : str or Path
        Output CXI (HDF5) file; replaced if it exists.
    n : int
        Number of shots.
    size : int or None, default=None
        Frame size in pixels (longer axis); None = the profile's frame shape.
    seed : int, default=0
        Everything is reproducible from it, for any number of workers.
    profile : str, Path or Profile, default="fermi"
        ``"fermi"`` (wide-angle XUV, MSFT), ``"lcls"`` (small-angle X-ray,
        projection) or a YAML file.
    like : path or None, default=None
        Copy geometry, frame shape, mask and count range from this real CXI file.
    layout : {"stacked", "entries"}, default="stacked"
        One ``(N, y, x)`` dataset, or one entry per frame (CXIDB entry 94 layout).
    balanced : bool, default=False
        Equal coarse groups (taxonomy.md) instead of the real label frequencies.
    client : distributed.Client or None, default=None
        Render blocks of shots on this cluster; None renders in this process.

    Returns
    -------
    dict
        ``{"patterns": n, "path": str, "profile": name, "model": ..., "slice_thickness":
        m or None, "frame_shape": [ny, nx], "class_counts": {class name: count}}``.
    """
    if layout not in LAYOUTS:
        raise AirysortError(f"layout {layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
    _check_n(n)
    seed = check_seed(seed)
    if Path(path).is_dir():  # found only after the simulation, when the file is moved into place
        raise AirysortError(f"{str(path)!r} is a directory; give the CXI file to write, e.g. {str(Path(path) / 'beam.cxi')!r}")
    prof = resolve_profile(profile, size=size, like=like)
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise AirysortError(f"output directory {str(path.parent)!r} does not exist; create it first")
    blocks = [(start, min(start + BLOCK, n)) for start in range(0, n, BLOCK)]
    counts = np.zeros(N_CLASSES, dtype=np.int64)
    tmp = path.with_name(path.name + ".partial")
    with h5py.File(tmp, "w") as h5:
        writer = _Writer(h5, prof, n, layout, seed)
        for start, (frames, labels, energies) in _blocks(blocks, seed=seed, profile=prof,
                                                          balanced=balanced, client=client):
            writer.write(start, frames, labels, energies)
            counts += labels.sum(axis=0)
    tmp.replace(path)
    return {
        "patterns": int(n),
        "path": str(path),
        "profile": prof.name,
        "model": prof.model,
        "slice_thickness": prof.slice_thickness,
        "frame_shape": list(prof.frame_shape),
        "class_counts": {name: int(c) for name, c in zip(CLASS_NAMES, counts)},
    }


def _blocks(blocks, *, seed, profile, balanced, client):
    """Yield (start, result) in order; on a cluster, keep a bounded number of blocks in flight."""
    from pipeline.progress import progress_bar

    with progress_bar("simulate") as bar:
        task = bar.add_task("simulate", total=sum(stop - start for start, stop in blocks), unit="patterns")
        if client is None:
            for start, stop in blocks:
                yield start, render_block(start, stop, seed=seed, profile=profile, balanced=balanced)
                bar.advance(task, stop - start)
            return
        from distributed import as_completed

        workers = max(1, len(client.scheduler_info().get("workers", {})))
        in_flight = 3 * workers  # bounded memory: frames wait on the client only this long
        # hash=False: a key of its own. With the content's hash as key, a second beamtime
        # of the same profile on a shared client (a notebook, the test session) could get
        # the key of data being released after the first, and its tasks were cancelled
        # for "lost dependencies".
        remote_profile = client.scatter(profile, broadcast=True, hash=False)
        pending = iter(blocks)
        futures = {}
        done: dict[int, Any] = {}
        next_start = 0

        def submit_one() -> bool:
            block = next(pending, None)
            if block is None:
                return False
            future = client.submit(render_block, block[0], block[1], seed=seed, profile=remote_profile,
                                   balanced=balanced, pure=False)
            futures[future] = block
            return True

        for _ in range(in_flight):
            if not submit_one():
                break
        queue = as_completed(list(futures))
        for future in queue:
            start, stop = futures.pop(future)
            done[start] = future.result()
            bar.advance(task, stop - start)
            while next_start in done:
                result = done.pop(next_start)
                yield next_start, result
                next_start += len(result[1])
            if submit_one():
                queue.add(list(futures)[-1])


class _Writer:
    """Writes frames, labels and metadata into an open HDF5 file in either CXI layout."""

    def __init__(self, h5: h5py.File, profile: Profile, n: int, layout: str, seed: int):
        self.h5, self.profile, self.layout, self.seed = h5, profile, layout, seed
        det = profile.detector
        ny, nx = profile.frame_shape
        self.dtype = np.dtype(det["dtype"])
        self.mask = _setup(profile, seed).mask.astype(np.uint32)
        # Counts (integers) compress well with gzip; calibrated float photons with read
        # noise do not (1.05x), and gzip would only make every reader decode at ~150 MB/s.
        integer = np.issubdtype(self.dtype, np.integer)
        self.frame_compression = {"compression": "gzip", "compression_opts": 1} if integer else {}
        self.photon_energy = HC / profile.wavelength
        h5.attrs["creator"] = "airysort simulate"
        h5.attrs["profile"] = profile.name
        h5.attrs["model"] = profile.model
        if profile.slice_thickness is not None:
            h5.attrs["slice_thickness"] = profile.slice_thickness  # m
        h5.attrs["seed"] = seed
        if det.get("hot_pixel_seed") is not None:
            h5.attrs["detector_seed"] = int(det["hot_pixel_seed"])  # the hot pixels' own seed
        h5.attrs["class_names"] = list(CLASS_NAMES)
        if layout == "stacked":
            h5.create_dataset("cxi_version", data=150)
            self.data = h5.create_dataset("entry_1/data_1/data", shape=(n, ny, nx), dtype=self.dtype,
                                          chunks=(1, ny, nx), **self.frame_compression)
            self._geometry(h5.require_group("entry_1"))
            self.labels = h5.create_dataset("entry_1/result_1/labels", shape=(n, N_CLASSES), dtype=np.int8)
            h5["entry_1/result_1"].attrs["class_names"] = list(CLASS_NAMES)
            self.pulse = h5.create_dataset("entry_1/instrument_1/source_1/pulse_energy", shape=(n,),
                                           dtype=np.float64)
            self.pulse.attrs["units"] = "J"
            self.ids = h5.create_dataset("entry_1/experiment_identifier", shape=(n,),
                                         dtype=h5py.string_dtype())
        else:
            h5.create_dataset("cxi_version", data=150)

    def _geometry(self, entry: h5py.Group) -> None:
        det = self.profile.detector
        group = entry.require_group("instrument_1/detector_1")
        for name, value in (("distance", det["distance"]), ("x_pixel_size", det["pixel_size"]),
                            ("y_pixel_size", det["pixel_size"])):
            group.create_dataset(name, data=float(value)).attrs["units"] = "m"
        group.create_dataset("mask", data=self.mask, compression="gzip")
        source = entry.require_group("instrument_1/source_1")
        source.create_dataset("wavelength", data=float(self.profile.wavelength)).attrs["units"] = "m"
        source.create_dataset("energy", data=float(self.photon_energy)).attrs["units"] = "J"

    def write(self, start: int, frames: np.ndarray, labels: np.ndarray, energies: np.ndarray) -> None:
        stop = start + len(frames)
        # The seed is part of the id, so that beamtimes simulated apart never share one.
        ids = [f"sim-{self.profile.name}-s{self.seed}-{i:07d}" for i in range(start, stop)]
        if self.layout == "stacked":
            self.data[start:stop] = frames.astype(self.dtype, copy=False)
            self.labels[start:stop] = labels
            self.pulse[start:stop] = energies
            self.ids[start:stop] = ids
            return
        for i, frame in enumerate(frames):
            entry = self.h5.create_group(f"entry_{start + i + 1}")
            entry.create_dataset("instrument_1/detector_1/data", data=frame.astype(self.dtype, copy=False),
                                 **self.frame_compression)
            self._geometry(entry)
            entry["instrument_1/source_1"].create_dataset("pulse_energy", data=float(energies[i])).attrs["units"] = "J"
            entry.create_dataset("experiment_identifier", data=ids[i])
            entry.create_dataset("note_1/data", data=labels[i].astype(np.int8))


def summary_counts(labels: np.ndarray) -> dict[str, int]:
    """Per-class counts of a label array (n, 11)."""
    return {name: int(c) for name, c in zip(CLASS_NAMES, np.asarray(labels).sum(axis=0))}


