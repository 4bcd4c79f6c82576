"""What is in the focus for one shot: droplet shape, size, orientation, companions.

:func:`sample_shot` draws the physical parameters of a shot for a wanted label
combination, redrawing until :func:`.labels.physical_labels` gives exactly that
combination. Sizes follow a log-normal distribution (profile ``particles``
section; taxonomy.md: median ~330 nm), orientations are random within the
ranges that the label rules allow, and the droplet's position in the focus and
the pulse energy vary per shot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import AirysortError
from pipeline.simulate import labels as rules
from pipeline.simulate.particles import droplet_bodies, rotation_matrix
from pipeline.simulate.profile import Profile

_MAX_TRIES = 400


@dataclass
class Shot:
    """Physical parameters of one shot (lengths in nm, angles in rad).

    ``shape`` is None for an empty shot. ``companion_radius`` > 0 adds a second
    (spherical) droplet at ``companion_offset`` relative to the main one.
    ``focus_fraction`` is the fluence at the droplet relative to the focus
    centre, ``pulse_energy`` in J, ``center_shift`` the beam-centre jitter (pixels).
    """

    shape: str | None
    radius: float = 0.0
    aspect: float = 1.0
    triaxial: float = 1.0
    axis_polar: float = 0.0
    axis_azimuth: float = 0.0
    spin: float = 0.0
    core_radius: float = 0.0
    core_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    companion_radius: float = 0.0
    companion_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    focus_fraction: float = 1.0
    pulse_energy: float = 0.0
    center_shift: tuple[float, float] = (0.0, 0.0)
    extras: dict = field(default_factory=dict)

    def bodies(self):
        """Bodies of the main droplet (:func:`.particles.droplet_bodies`)."""
        return droplet_bodies(
            self.shape, self.radius, aspect=self.aspect, triaxial=self.triaxial,
            axis_polar=self.axis_polar, axis_azimuth=self.axis_azimuth, spin=self.spin,
            core_radius=self.core_radius, core_offset=self.core_offset,
        )

    def droplets(self) -> list[tuple[tuple, np.ndarray]]:
        """(bodies, offset in nm) of every droplet in the focus; empty for an empty shot."""
        if self.shape is None:
            return []
        found = [(self.bodies(), np.zeros(3))]
        if self.companion_radius > 0:
            found.append((droplet_bodies("sphere", self.companion_radius), np.asarray(self.companion_offset, float)))
        return found

    def extent(self) -> float:
        """Diameter (nm) of the region holding all droplets (sets the finest fringes)."""
        if self.shape is None:
            return 0.0
        size = 2 * self.radius * max(self.aspect, 1 / self.aspect, self.triaxial) ** (2 / 3)
        if self.companion_radius > 0:
            size = max(size, float(np.hypot(*self.companion_offset[:2])) + self.radius + self.companion_radius)
        return size

    def tilt(self) -> float:
        """Angle (degrees) between the symmetry axis and the detector plane."""
        return float(np.degrees(abs(np.pi / 2 - self.axis_polar)))

    def misalignment(self) -> float:
        """Smallest angle (degrees) between a principal axis of the droplet and the beam.

        Bodies of revolution (all shapes but ``triaxial``) have every direction
        perpendicular to their axis as a principal axis.
        """
        axes = rotation_matrix(self.axis_polar, self.axis_azimuth, self.spin)
        if self.shape == "triaxial":
            return float(np.degrees(np.arccos(np.clip(np.abs(axes[2]).max(), 0, 1))))
        to_beam = float(np.degrees(np.arccos(np.clip(abs(axes[2, 0]), 0, 1))))
        return min(to_beam, 90.0 - to_beam)

    def outline_ratio(self) -> float:
        """Axis ratio of the main droplet's shadow (of its bounding ellipsoid)."""
        body = self.bodies()[0]
        if self.shape == "capsule":
            semi = (body.size[0] + body.size[1], body.size[1], body.size[1])
        elif self.shape == "dumbbell":
            r = body.size[0]
            semi = (float(np.linalg.norm(body.center)) + r, r, r)
        else:
            semi = body.size
        cov = (body.rotation @ np.diag(np.square(semi)) @ body.rotation.T)[:2, :2]
        eig = np.linalg.eigvalsh(cov)
        return float(np.sqrt(eig[-1] / eig[0]))

    def shadows_overlap(self) -> bool:
        """Whether the companion sits in front of or behind the main droplet."""
        return (self.companion_radius > 0
                and float(np.hypot(*self.companion_offset[:2])) < 0.5 * self.radius
                and abs(self.companion_offset[2]) > self.radius + self.companion_radius)

    def newton_period(self, profile: Profile) -> float:
        """Period (pixels) of the Newton fringes ``cos(q_z d)`` at the detector edge; inf if none."""
        if not self.shadows_overlap():
            return float("inf")
        theta = profile.max_angle()
        k = 2 * np.pi / (profile.wavelength * 1e9)
        d = abs(self.companion_offset[2])
        # d(q_z d)/d theta = k d sin(theta); one pixel spans p cos^2(theta) / L radians.
        pixel_angle = profile.detector["pixel_size"] / profile.detector["distance"] * np.cos(theta) ** 2
        return float(2 * np.pi / (k * d * np.sin(theta)) / pixel_angle)


def _radius(rng: np.random.Generator, profile: Profile, low: float = 0.0) -> float:
    part = profile.particles
    lo, hi = (v * 1e9 for v in part["radius_range"])
    lo = max(lo, low)
    for _ in range(100):
        r = float(np.exp(rng.normal(np.log(part["radius_median"] * 1e9), part["radius_log_sigma"])))
        if lo <= r <= hi:
            return r
    return float(np.clip(r, lo, hi))


def _axis_from_tilt(rng, tilt_range_deg):
    tilt = np.radians(rng.uniform(*tilt_range_deg))
    sign = rng.choice([-1.0, 1.0])  # axis tilted towards or away from the detector
    return np.pi / 2 - sign * tilt


def _propose(names: set[str], rng: np.random.Generator, profile: Profile) -> Shot:
    """One random shot aimed at a label combination (checked by the caller)."""
    wide = profile.wide_angle
    azimuth = rng.uniform(0, 2 * np.pi)
    spin = rng.uniform(0, 2 * np.pi)
    asym = "Asymmetric" in names
    if "Empty" in names:
        return Shot(shape=None)
    if "Prolate" in names:
        radius = _radius(rng, profile, low=120.0)
        streak = "Streak" in names
        if streak:
            shape, aspect = "capsule", rng.uniform(1.8, 3.0)
        else:
            shape = str(rng.choice(["prolate", "dumbbell"]))
            aspect = rng.uniform(1.5, 2.4) if shape == "prolate" else rng.uniform(1.6, 2.2)
        if not wide:
            tilt = (0.0, 30.0) if streak else (0.0, 45.0)
        elif asym:
            tilt = (23.0, 33.0) if streak else (23.0, 45.0)
        elif "Bent" in names:
            tilt = (8.0, 18.0)
        else:
            tilt = (0.0, 4.0)
        shot = Shot(shape, radius, aspect, 1.0, _axis_from_tilt(rng, tilt), azimuth, spin)
    else:
        radius = _radius(rng, profile, low=150.0 if asym else 0.0)
        if "Elliptical" in names:
            shape = str(rng.choice(["oblate", "triaxial"]))
            aspect = rng.uniform(0.5, 0.8)
            triaxial = rng.uniform(1.0, 1.25) if shape == "triaxial" else 1.0
            tilt = (25.0, 60.0) if asym else (0.0, 15.0)
            # For an oblate droplet the symmetry axis is the short one: the outline is
            # elongated when that axis lies close to the detector plane.
            shot = Shot(shape, radius, aspect, triaxial, _axis_from_tilt(rng, tilt), azimuth,
                        0.0 if shape == "oblate" else rng.choice([0.0, np.pi / 2]))
        else:  # Round: a sphere, or an oblate droplet seen along its axis
            if rng.uniform() < 0.5:
                shot = Shot("sphere", radius)
            else:
                polar = np.radians(rng.uniform(0, 10)) + (np.pi if rng.uniform() < 0.5 else 0.0)
                shot = Shot("oblate", radius, rng.uniform(0.6, 0.95), 1.0, polar, azimuth, spin)
    if "NewtonRings" in names:
        # The pair must fit within the largest separation whose fringes are resolved.
        largest = 0.5 * (_newton_max_distance(profile) - 100.0)
        if shot.radius > largest:
            shot.radius = rng.uniform(0.6, 1.0) * largest
    if "Layered" in names:
        core = rng.uniform(0.12, 0.25) * shot.radius
        shot.core_radius = max(core, rules.LAYERED_MIN_CORE + 5.0)
        offset = rng.normal(0, 0.2 * shot.radius, 3)
        shot.core_offset = tuple(offset)
    else:
        # Most droplets are pure; some carry a cluster too small to be seen.
        if rng.uniform() < 0.2:
            shot.core_radius = rng.uniform(3.0, 10.0)
    if "DoubleRings" in names or "NewtonRings" in names:
        if "DoubleRings" in names:
            shot.companion_radius = rng.uniform(0.4, 0.75) * shot.radius
        else:
            shot.companion_radius = rng.uniform(0.9, 1.0) * shot.radius
        if "NewtonRings" in names:
            gap = shot.radius + shot.companion_radius
            # Axial separation: from just apart up to what the detector still resolves.
            limit = _newton_max_distance(profile)
            d = rng.uniform(gap + 50.0, max(gap + 100.0, min(limit, gap + 3000.0)))
            transverse = rng.uniform(0, 0.1 * shot.radius)  # nearly coaxial
            angle = rng.uniform(0, 2 * np.pi)
            shot.companion_offset = (transverse * np.cos(angle), transverse * np.sin(angle),
                                     d * rng.choice([-1.0, 1.0]))
        else:
            distance = rng.uniform(1.5, 4.0) * (shot.radius + shot.companion_radius)
            angle = rng.uniform(0, 2 * np.pi)
            shot.companion_offset = (distance * np.cos(angle), distance * np.sin(angle),
                                     rng.normal(0, 200.0))
    return shot


def _newton_max_distance(profile: Profile) -> float:
    """Largest axial separation (nm) whose Newton fringes are >= 3.5 pixels apart at the edge."""
    theta = profile.max_angle()
    k = 2 * np.pi / (profile.wavelength * 1e9)
    pixel_angle = profile.detector["pixel_size"] / profile.detector["distance"] * np.cos(theta) ** 2
    return float(2 * np.pi / (k * np.sin(theta) * 3.5 * pixel_angle))


def newton_feasible(profile: Profile) -> bool:
    """Whether the frame resolves Newton fringes of the smallest droplet pairs."""
    smallest = profile.particles["radius_range"][0] * 1e9
    return 0.5 * (_newton_max_distance(profile) - 100.0) > 1.5 * smallest


def sample_shot(names: tuple[str, ...], rng: np.random.Generator, profile: Profile) -> Shot:
    """Draw a shot whose physical labels are exactly ``names``.

    Parameters
    ----------
    names : tuple of str
        Wanted label combination (already :func:`.labels.feasible` for the profile).
    rng : numpy.random.Generator
        The shot's own generator.
    profile : Profile
        At the frame size being simulated (Newton-fringe resolution depends on it).

    Returns
    -------
    Shot
        With source fluctuations (pulse energy, position in the focus, beam-centre
        jitter) drawn too.
    """
    wanted = set(names)
    for _ in range(_MAX_TRIES):
        shot = _propose(wanted, rng, profile)
        got = rules.physical_labels(shot, wide_angle=profile.wide_angle,
                                    newton_fringe_pixels=shot.newton_period(profile))
        if set(rules.label_names(got)) == wanted:
            break
    else:
        raise AirysortError(
            f"could not draw a shot with labels {names!r} for profile {profile.name!r}; "
            "the profile's geometry cannot show them (e.g. Newton rings need a finer frame)"
        )
    source = profile.source
    mean = source["pulse_energy"]
    spread = source["pulse_energy_spread"]
    # SASE / seeded pulse energies: a gamma distribution with the given relative rms.
    shape = 1.0 / spread**2
    shot.pulse_energy = float(rng.gamma(shape, mean / shape))
    # Droplets cross the focus anywhere within hit_radius sigma: uniform over that disc.
    rho = source.get("hit_radius", 2.0) * np.sqrt(rng.uniform())
    shot.focus_fraction = float(np.exp(-0.5 * rho**2))
    jitter = profile.detector["center_jitter"]
    shot.center_shift = tuple(rng.normal(0, jitter, 2)) if jitter > 0 else (0.0, 0.0)
    return shot
