"""Physical label rules and the frequencies of label combinations.

Every simulated shot gets its 11-class multi-hot label from its physical
parameters (:func:`physical_labels`), never from what the sampler aimed for; the
sampler (:mod:`.scene`) draws parameters until the rules give the wanted
combination, so labels and physics always agree. The rules, in words (angles in
degrees; *tilt* is the angle between the droplet's symmetry axis and the
detector plane, *misalignment* the smallest angle between any principal axis of
the droplet and the beam):

- Empty: no droplet in the focus.
- Spherical/Oblate: the droplet is a sphere, an oblate spheroid or a (flattened)
  triaxial ellipsoid.
- Round: Spherical/Oblate and the droplet's shadow has axis ratio <= 1.05.
- Elliptical: Spherical/Oblate and shadow axis ratio >= 1.10.
- Prolate: the droplet is a prolate spheroid, a pill (capsule) or a dumbbell.
- Streak: a pill (flat cylindrical sides) with tilt <= 35: its side scatters a
  strong streak perpendicular to the long axis.
- Bent: wide-angle profile, Prolate and tilt >= 6: the Ewald sphere cuts the
  tilted streak / elongated rings along a curve.
- Asymmetric: wide-angle profile, a non-spherical droplet and misalignment >= 20:
  the Ewald sphere sees the non-centro-symmetric side of the 3D transform (and
  absorption adds to it).
- DoubleRings: a second droplet in the focus whose radius is <= 0.8 of the main
  one: two ring systems of different spacing beat.
- NewtonRings: a second droplet behind or in front of the main one (shadows
  overlapping, axial separation d) whose interference gives concentric fringes
  ``cos(q_z d)``, resolved on the detector (period >= 3 pixels at the edge).
- Layered: a xenon cluster (radius >= 25 nm) inside the droplet superimposes its
  own broad ring system on the droplet's rings.

Label combinations are drawn with the real frequencies of taxonomy.md (the 12
most frequent combinations plus a small documented remainder so that every class,
Layered included, has about its real total); labels that the profile's physics
cannot produce (Bent and Asymmetric need a wide-angle profile) are dropped from
the drawn combination.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.taxonomy import CLASS_NAMES, REAL_COMBINATIONS, coarse_group, multi_hot

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.simulate.scene import Shot

#: Thresholds of the rules (see the module docstring).
ROUND_MAX_RATIO = 1.05
ELLIPTICAL_MIN_RATIO = 1.10
STREAK_MAX_TILT = 35.0
BENT_MIN_TILT = 6.0
ASYMMETRIC_MIN_MISALIGNMENT = 20.0
DOUBLE_MAX_RATIO = 0.8
NEWTON_MIN_FRINGE_PIXELS = 3.0
LAYERED_MIN_CORE = 25.0

#: The rest of the real set (185 of 7,264 patterns) spread over combinations that
#: bring every class close to its real total (taxonomy.md), Layered included.
REMAINDER_COMBINATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (16, ("Prolate",)),
    (22, ("Prolate", "Streak")),
    (25, ("Prolate", "Streak", "Bent", "NewtonRings")),
    (20, ("Spherical/Oblate", "Elliptical", "DoubleRings")),
    (19, ("Spherical/Oblate", "Elliptical", "Layered")),
    (16, ("Spherical/Oblate", "Elliptical", "Asymmetric", "NewtonRings")),
    (15, ("Prolate", "Streak", "Bent", "Layered")),
    (13, ("Spherical/Oblate", "Round", "Layered")),
    (11, ("Prolate", "Bent", "Asymmetric", "DoubleRings")),
    (10, ("Prolate", "Streak", "Bent", "Asymmetric", "DoubleRings")),
    (10, ("Prolate", "Streak", "Asymmetric", "Bent", "NewtonRings")),
    (8, ("Spherical/Oblate", "Round", "NewtonRings", "Layered")),
)
COMBINATIONS = REAL_COMBINATIONS + REMAINDER_COMBINATIONS

_WIDE_ANGLE_ONLY = ("Bent", "Asymmetric")


def feasible(names: tuple[str, ...], *, wide_angle: bool, newton: bool = True) -> tuple[str, ...]:
    """The combination with the labels the profile's physics cannot produce removed.

    Bent and Asymmetric need a wide-angle model; NewtonRings need a frame fine
    enough to resolve the fringes of two droplets just apart (``newton``).
    """
    dropped = set() if wide_angle else set(_WIDE_ANGLE_ONLY)
    if not newton:
        dropped.add("NewtonRings")
    return tuple(name for name in names if name not in dropped)


def combination_table(*, wide_angle: bool, balanced: bool, newton: bool = True) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """Label combinations and the probability of drawing each.

    Parameters
    ----------
    wide_angle : bool
        Whether the profile can produce Bent and Asymmetric.
    newton : bool, default=True
        Whether the frame resolves Newton fringes of touching droplet pairs.
    balanced : bool
        False: real frequencies. True: every coarse group of taxonomy.md (empty,
        double, prolate, elliptical, round, other) equally likely, with real
        frequencies inside each group.

    Returns
    -------
    combinations : list of tuple of str
    probabilities : ndarray of shape (n_combinations,)
    """
    counts: dict[tuple[str, ...], float] = {}
    for count, names in COMBINATIONS:
        key = feasible(names, wide_angle=wide_angle, newton=newton)
        counts[key] = counts.get(key, 0.0) + count
    combos = list(counts)
    weights = np.array([counts[c] for c in combos], dtype=float)
    if balanced:
        groups = coarse_group(np.stack([multi_hot(c) for c in combos]))
        for group in np.unique(groups):
            members = groups == group
            weights[members] /= weights[members].sum()
    return combos, weights / weights.sum()


def physical_labels(shot: Shot, *, wide_angle: bool, newton_fringe_pixels: float) -> np.ndarray:
    """The 11-class multi-hot label of a shot from its physical parameters.

    Parameters
    ----------
    shot : Shot
        Parameters of the shot (:class:`.scene.Shot`).
    wide_angle : bool
        Whether the forward model includes the Ewald-sphere curvature.
    newton_fringe_pixels : float
        Period (pixels) of the shot's Newton fringes at the edge of the detector,
        ``inf`` without an axially separated companion (:meth:`.scene.Shot.newton_period`).

    Returns
    -------
    ndarray of int8, shape (11,)
    """
    names: list[str] = []
    if shot.shape is None:
        return multi_hot(["Empty"])
    if shot.shape in ("sphere", "oblate", "triaxial"):
        names.append("Spherical/Oblate")
        ratio = shot.outline_ratio()
        if ratio <= ROUND_MAX_RATIO:
            names.append("Round")
        elif ratio >= ELLIPTICAL_MIN_RATIO:
            names.append("Elliptical")
    else:
        names.append("Prolate")
        if shot.shape == "capsule" and shot.tilt() <= STREAK_MAX_TILT:
            names.append("Streak")
        if wide_angle and shot.tilt() >= BENT_MIN_TILT:
            names.append("Bent")
    if wide_angle and shot.shape != "sphere" and shot.misalignment() >= ASYMMETRIC_MIN_MISALIGNMENT:
        names.append("Asymmetric")
    if shot.companion_radius > 0:
        if shot.companion_radius <= DOUBLE_MAX_RATIO * shot.radius:
            names.append("DoubleRings")
        if shot.shadows_overlap() and newton_fringe_pixels >= NEWTON_MIN_FRINGE_PIXELS:
            names.append("NewtonRings")
    if shot.core_radius >= LAYERED_MIN_CORE:
        names.append("Layered")
    return multi_hot(names)


def label_names(labels: np.ndarray) -> tuple[str, ...]:
    """Class names set in a multi-hot vector, in taxonomy order."""
    return tuple(name for name, value in zip(CLASS_NAMES, labels) if value == 1)
