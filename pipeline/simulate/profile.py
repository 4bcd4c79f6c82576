"""Experiment profiles: source, detector and sample parameters of a simulated beamtime.

A profile is a YAML file (see ``profiles/fermi.yaml`` and ``profiles/lcls.yaml``,
whose comments document every field and its unit). :func:`load_profile` reads a
shipped profile by name or any YAML file by path; :meth:`Profile.at_size` gives
the same experiment read out with a coarser (binned) or finer frame, keeping the
angular range, so small demo frames show the same physics as full frames.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.errors import AirysortError, check_seed

PROFILE_NAMES = ("fermi", "lcls")
_REQUIRED = {
    "detector": ("frame_shape", "pixel_size", "distance", "central_hole_radius", "gain",
                 "read_noise", "saturation", "dtype"),
    "source": ("fluence", "pulse_energy", "pulse_energy_spread", "focus_sigma"),
    "particles": ("radius_median", "radius_log_sigma", "radius_range"),
}
_DETECTOR_DEFAULTS: dict[str, Any] = {
    "beam_center_offset": [0.0, 0.0], "center_jitter": 0.0, "active_radius": None, "gaps": [],
    "kind": "pixel", "gain_shape": 0.0, "quantum_efficiency": 1.0, "dark_level": 0.0,
    "hot_pixel_fraction": 0.0, "hot_pixel_counts": [0, 0], "stray_light": 0.0,
    "stray_light_scale": 50.0, "hot_pixel_seed": None,
}


@dataclass(frozen=True)
class Profile:
    """A simulated experiment. Lengths in m, pixel quantities in pixels of ``frame_shape``.

    Attributes
    ----------
    name, description : str
    model : {"projection", "born", "msft"}
        Forward model used for every shot.
    wavelength : float
        m.
    polarization : {"horizontal", "vertical", "none"}
    detector, source, particles : dict
        Sections of the YAML file (see the shipped profiles for the fields).
    bad_pixels : ndarray of bool, shape frame_shape, or None
        Extra bad pixels (from ``--like``), True = bad.
    count_range : tuple of float or None
        (typical, high) counts per frame maximum measured in a real file (``--like``),
        used to rescale the fluence.
    slice_thickness : float or None
        m. MSFT only: propagate the incoming wave through each droplet in slices
        this thick (refraction and diffraction inside the droplet, see
        ``pipeline/simulate/propagation.py``); None lets it travel in straight lines
        (faster, less exact beyond ~15 degrees).
    """

    name: str
    description: str
    model: str
    wavelength: float
    polarization: str
    detector: dict
    source: dict
    particles: dict
    bad_pixels: np.ndarray | None = field(default=None, compare=False, repr=False)
    count_range: tuple[float, float] | None = None
    slice_thickness: float | None = None

    @property
    def frame_shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.detector["frame_shape"])

    @property
    def wide_angle(self) -> bool:
        """True when the forward model includes the Ewald-sphere curvature."""
        return self.model in ("born", "msft")

    def max_angle(self) -> float:
        """Largest scattering angle (rad) on the detector's active area."""
        det = self.detector
        ny, nx = self.frame_shape
        half = 0.5 * np.hypot(ny, nx)
        if det["active_radius"] is not None:
            half = min(half, float(det["active_radius"]))
        half += float(np.hypot(*det["beam_center_offset"]))
        return float(np.arctan(half * det["pixel_size"] / det["distance"]))

    def with_slice_thickness(self, slice_thickness: float | None, *, origin: str = "profile") -> Profile:
        """The same profile with MSFT's incoming wave propagated in slices this thick (m; None: straight lines)."""
        return dataclasses.replace(self, slice_thickness=_checked_slice_thickness(slice_thickness, self.model, origin))

    def with_detector_seed(self, seed: int | None) -> Profile:
        """The same profile with its hot pixels drawn from ``seed`` (None: from each
        beamtime's seed), so that several beamtimes share one detector."""
        if seed is not None:
            check_seed(seed, "detector seed")
        return dataclasses.replace(self, detector={**self.detector, "hot_pixel_seed": seed})

    def at_size(self, size: int | None) -> Profile:
        """The same experiment read out as ``size`` x ``size`` pixels over the same angles.

        Parameters
        ----------
        size : int or None
            Pixels along the longer frame axis; None keeps the profile's frame.

        Returns
        -------
        Profile
            Pixel size, pixel-unit lengths, per-pixel saturation and stray light
            scaled by the binning factor; the frame keeps its aspect ratio.
        """
        if size is None or size == max(self.frame_shape):
            return self
        if int(size) < 16:
            raise AirysortError(f"frame size {size!r} is too small; use at least 16 pixels")
        factor = max(self.frame_shape) / int(size)  # native pixels per new pixel
        det = dict(self.detector)
        det["frame_shape"] = [max(1, round(n / factor)) for n in self.frame_shape]
        det["pixel_size"] = det["pixel_size"] * factor
        for key in ("center_jitter", "central_hole_radius", "stray_light_scale"):
            det[key] = det[key] / factor
        det["beam_center_offset"] = [v / factor for v in det["beam_center_offset"]]
        if det["active_radius"] is not None:
            det["active_radius"] = det["active_radius"] / factor
        det["gaps"] = [dict(g, position=g["position"] / factor, width=g["width"] / factor)
                       for g in det["gaps"]]
        # A binned pixel collects `factor^2` native pixels' photons and full wells.
        det["saturation"] = det["saturation"] * factor**2
        det["stray_light"] = det["stray_light"] * factor**2
        # A binned pixel is hot when any of its native pixels is.
        det["hot_pixel_fraction"] = min(det["hot_pixel_fraction"] * factor**2, 0.01)
        bad = None
        if self.bad_pixels is not None:
            from scipy.ndimage import zoom

            bad = zoom(self.bad_pixels.astype(float), [n / o for n, o in zip(det["frame_shape"], self.frame_shape)],
                       order=0) > 0.5
        return dataclasses.replace(self, detector=det, bad_pixels=bad)


def load_profile(name_or_path: str | Path | Profile) -> Profile:
    """Read a shipped profile by name (``"fermi"``, ``"lcls"``) or a YAML file by path.

    Parameters
    ----------
    name_or_path : str, Path or Profile
        A name from :data:`PROFILE_NAMES`, a path to a YAML profile, or a profile.

    Returns
    -------
    Profile

    Raises
    ------
    AirysortError
        If the name is unknown, the file is missing or a required field is absent.
    """
    if isinstance(name_or_path, Profile):
        return name_or_path
    text_name = str(name_or_path)
    if text_name in PROFILE_NAMES:
        text = resources.files("pipeline.simulate").joinpath("profiles", f"{text_name}.yaml").read_text()
        origin = f"shipped profile {text_name!r}"
    else:
        path = Path(text_name)
        if not path.is_file():
            raise AirysortError(
                f"profile {text_name!r} is neither a shipped profile ({', '.join(PROFILE_NAMES)}) "
                "nor an existing YAML file; give one of those names or a path"
            )
        text = path.read_text()
        origin = f"profile file {text_name!r}"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise AirysortError(f"{origin} is not valid YAML: {error}") from None
    return profile_from_dict(raw, origin=origin)


def _numbers(value):
    """Strings that are numbers become floats: YAML 1.1 reads ``2.0e4`` (no exponent sign) as text."""
    if isinstance(value, dict):
        return {key: _numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _checked_slice_thickness(value, model: str, origin: str) -> float | None:
    if value is None:
        return None
    if model != "msft" or isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e-6:
        raise AirysortError(f"{origin}: slice_thickness {value!r} needs model msft (this is {model}) and a "
                            "thickness in m between 0 and 1e-6 (e.g. 10.0e-9), or null")
    return float(value)


def profile_from_dict(raw: dict, *, origin: str = "profile") -> Profile:
    """Validate a profile given as nested dicts (the YAML structure) and build it."""
    if not isinstance(raw, dict):
        raise AirysortError(f"{origin} must be a mapping with sections detector, source, particles")
    for section, keys in _REQUIRED.items():
        missing = [key for key in keys if key not in (raw.get(section) or {})]
        if missing:
            raise AirysortError(f"{origin} lacks {section}.{', '.join(missing)}; see profiles/fermi.yaml for every field")
    model = raw.get("model", "msft")
    if model not in ("projection", "born", "msft"):
        raise AirysortError(f"{origin}: model {model!r} is unknown; use projection, born or msft")
    raw = _numbers(raw)
    slice_thickness = _checked_slice_thickness(raw.get("slice_thickness"), model, origin)
    detector = {**_DETECTOR_DEFAULTS, **raw["detector"]}
    if detector["dtype"] not in ("uint16", "float32"):
        raise AirysortError(f"{origin}: detector.dtype {detector['dtype']!r} is unsupported; use uint16 or float32")
    return Profile(
        name=str(raw.get("name", "custom")),
        description=str(raw.get("description", "")),
        model=model,
        wavelength=float(raw["wavelength"]),
        polarization=str(raw.get("polarization", "horizontal")),
        detector=detector,
        source=dict(raw["source"]),
        particles=dict(raw["particles"]),
        slice_thickness=slice_thickness,
    )
