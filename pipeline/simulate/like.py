"""``--like FILE.cxi``: a profile that copies the geometry and count range of a real file.

What is copied: wavelength (or photon energy), detector distance, pixel size, frame
shape, the detector mask (hole, gaps, dead areas) and the data type. The photon
count range is matched by scaling the fluence so that the median over frames of
each frame's 99.5th-percentile count equals the real file's. The forward model
follows the geometry: MSFT when the detector reaches beyond 10 degrees, the
projection model otherwise (MSFT keeps the base profile's slice thickness). Everything
the file does not say (source
fluctuations, noise model, droplet sizes) comes from the base profile.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipeline.errors import AirysortError
from pipeline.simulate.profile import Profile

#: Frames read from the real file to measure its count range.
SAMPLE_FRAMES = 64
#: Shots simulated (noise-free) to measure the profile's count range.
SAMPLE_SHOTS = 12
WIDE_ANGLE_LIMIT = np.radians(10.0)


def _percentile_level(frames: np.ndarray, mask: np.ndarray | None) -> float:
    levels = []
    for frame in frames:
        values = frame[~mask] if mask is not None else frame.ravel()
        levels.append(np.percentile(values, 99.5))
    return float(np.median(levels))


def profile_like(path: str | Path, *, base: Profile) -> Profile:
    """A profile with the geometry, mask and count range of a real CXI/HDF5 file.

    Parameters
    ----------
    path : str or Path
        The real file (any layout ``airysort ingest`` reads).
    base : Profile
        Supplies everything the file does not describe.

    Returns
    -------
    Profile
        Named ``like-<file stem>``.
    """
    from pipeline.sources import open_source

    source = open_source(path)
    if len(source.frame_shape) != 2:
        raise AirysortError(f"{path}: frames have shape {source.frame_shape!r}; --like needs 2-D frames")
    geometry = source.geometry
    wavelength = geometry.get("wavelength") or base.wavelength
    distance = geometry.get("detector_distance") or base.detector["distance"]
    pixel_size = geometry.get("pixel_size") or base.detector["pixel_size"]
    ny, nx = (int(v) for v in source.frame_shape)
    factor = max(ny, nx) / max(base.frame_shape)
    det = dict(base.detector)
    det.update(frame_shape=[ny, nx], distance=float(distance), pixel_size=float(pixel_size),
               beam_center_offset=[0.0, 0.0], center_jitter=det["center_jitter"] * factor,
               stray_light_scale=det["stray_light_scale"] * factor)
    if source.mask is not None:
        # The file's mask already holds the hole, the gaps and the dead area.
        det.update(central_hole_radius=0.0, gaps=[], active_radius=None)
    else:
        det.update(central_hole_radius=det["central_hole_radius"] * factor,
                   active_radius=None if det["active_radius"] is None else det["active_radius"] * factor,
                   gaps=[dict(g, position=g["position"] * factor, width=g["width"] * factor) for g in det["gaps"]])
    integer = np.issubdtype(np.dtype(source.dtype), np.integer)
    det["dtype"] = "uint16" if integer else "float32"
    picks = np.unique(np.linspace(0, source.n_frames - 1, min(SAMPLE_FRAMES, source.n_frames)).astype(int))
    readable = [_readable_frame(source, int(i)) for i in picks]
    frames = [frame for frame in readable if frame is not None and frame.shape == source.frame_shape]
    if not frames:
        raise AirysortError(f"{path}: none of the frames sampled could be read; --like needs real frames")
    frames = np.stack(frames).astype(np.float64)
    det["saturation"] = float(max(frames.max(), 1.0))
    half = 0.5 * np.hypot(ny, nx) * pixel_size
    model = "msft" if np.arctan(half / distance) > WIDE_ANGLE_LIMIT else "projection"
    # Slices only exist in MSFT: a small-angle file turns the default (MSFT) profile into a
    # projection one, without them.
    slice_thickness = base.slice_thickness if model == "msft" else None
    profile = dataclasses.replace(
        base, name=f"like-{Path(path).stem}", description=f"geometry of {Path(path).name}",
        model=model, wavelength=float(wavelength), detector=det, bad_pixels=source.mask,
        slice_thickness=slice_thickness,
    )
    real_level = _percentile_level(frames, source.mask)
    simulated_level = _simulated_level(profile)
    if simulated_level > 0 and real_level > det["dark_level"]:
        scale = (real_level - det["dark_level"]) / simulated_level
        source_section = dict(profile.source, fluence=profile.source["fluence"] * scale)
        profile = dataclasses.replace(profile, source=source_section,
                                      count_range=(real_level, float(frames.max())))
    return profile


def _readable_frame(source, index: int) -> np.ndarray | None:
    """Frame ``index`` of ``source``, or None where it cannot be read (``ingest`` rejects
    those, and the frames of another shape)."""
    try:
        return source.read(index, index + 1)[0]
    except (KeyError, OSError, ValueError):
        return None


def _simulated_level(profile: Profile) -> float:
    """Median 99.5th-percentile of noise-free counts (signal x gain) of a few droplet shots."""
    from pipeline.simulate.render import Setup, expected_photons
    from pipeline.simulate.scene import sample_shot

    setup = Setup.build(profile, seed=0)
    rng = np.random.default_rng(0)
    levels = []
    gain = profile.detector["gain"] * profile.detector["quantum_efficiency"]
    for _ in range(SAMPLE_SHOTS):
        shot = sample_shot(("Spherical/Oblate", "Round"), rng, profile)
        photons = expected_photons(shot, setup)
        levels.append(np.percentile(photons[~setup.mask], 99.5) * gain)
    return float(np.median(levels))
