"""Droplet shapes as unions of convex bodies, and their chords along the beam.

Every shape the simulator knows (sphere, oblate/prolate spheroid, triaxial
ellipsoid, pill/capsule, dumbbell, droplet with a dopant core) is built from two
convex primitives, an ellipsoid and a capsule, each made of one material. The
forward models only need, for every column ``(x, y)`` parallel to the beam
(``+z``), the intervals of ``z`` inside each body: these chords are computed here
analytically, vectorised over columns.

Lengths are in nanometres throughout this module and in :mod:`.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Body:
    """One convex body of uniform material.

    Attributes
    ----------
    kind : {"ellipsoid", "capsule"}
        Ellipsoid with semi-axes ``size = (a, b, c)`` along the body axes, or a
        capsule (cylinder with hemispherical caps) with ``size = (half_length,
        radius, radius)``: the cylinder part spans ``-half_length..half_length``
        along the first body axis.
    center : ndarray of shape (3,)
        Centre in the droplet frame (nm); ``z`` is the beam direction.
    rotation : ndarray of shape (3, 3)
        Columns are the body axes expressed in the lab frame.
    size : tuple of 3 floats
        See ``kind`` (nm).
    material : int
        Index into the material list handed to the forward model. Where bodies
        overlap, the later body's material wins (a dopant core listed after the
        droplet replaces helium).
    """

    kind: str
    center: np.ndarray
    rotation: np.ndarray
    size: tuple[float, float, float]
    material: int = 0

    def half_extent_xy(self) -> tuple[float, float]:
        """Half widths (nm) of the body's shadow along x and y."""
        r = self.rotation
        if self.kind == "ellipsoid":
            s2 = np.square(self.size)
            return float(np.sqrt(r[0] ** 2 @ s2)), float(np.sqrt(r[1] ** 2 @ s2))
        half_length, radius = self.size[0], self.size[1]
        return abs(r[0, 0]) * half_length + radius, abs(r[1, 0]) * half_length + radius

    def volume(self) -> float:
        """Volume (nm^3)."""
        if self.kind == "ellipsoid":
            return 4 / 3 * np.pi * float(np.prod(self.size))
        half_length, radius = self.size[0], self.size[1]
        return np.pi * radius**2 * 2 * half_length + 4 / 3 * np.pi * radius**3


def rotation_matrix(axis_polar: float, axis_azimuth: float, spin: float = 0.0) -> np.ndarray:
    """Rotation whose first column (the body's first axis) points along a direction.

    Parameters
    ----------
    axis_polar : float
        Angle (rad) between the body's first axis and the beam (+z).
    axis_azimuth : float
        Azimuth (rad) of that axis in the detector plane, from +x towards +y.
    spin : float, default=0
        Rotation (rad) of the body about its first axis.

    Returns
    -------
    ndarray of shape (3, 3)
        Orthonormal matrix; column 0 is the first body axis in the lab frame.
    """
    st, ct = np.sin(axis_polar), np.cos(axis_polar)
    sp, cp = np.sin(axis_azimuth), np.cos(axis_azimuth)
    first = np.array([st * cp, st * sp, ct])
    # Any vector perpendicular to `first`, then rotate it by `spin` about `first`. The
    # cross products are written out: np.cross costs ~100x more on 3-vectors, and
    # shots rebuild their bodies several times.
    fx, fy, fz = first
    if abs(ct) < 0.9:  # first x e_z
        second = np.array([fy, -fx, 0.0])
    else:  # first x e_x
        second = np.array([0.0, fz, -fy])
    second /= np.sqrt(second @ second)
    sx, sy, sz = second
    third = np.array([fy * sz - fz * sy, fz * sx - fx * sz, fx * sy - fy * sx])
    second, third = (np.cos(spin) * second + np.sin(spin) * third,
                     -np.sin(spin) * second + np.cos(spin) * third)
    return np.stack([first, second, third], axis=1)


def _ellipsoid_chords(body: Body, x: np.ndarray, y: np.ndarray):
    inv = body.rotation @ np.diag(1.0 / np.square(body.size)) @ body.rotation.T
    d = np.stack([x - body.center[0], y - body.center[1], np.full_like(x, -body.center[2])])
    # (d + t e_z)^T M (d + t e_z) = 1, a quadratic in t.
    a = inv[2, 2]
    b = inv[2] @ d
    c = np.einsum("in,ij,jn->n", d, inv, d) - 1
    return _quadratic_interval(a, b, c)


def _quadratic_interval(a, b, c):
    """Roots of a t^2 + 2 b t + c = 0 as an interval; NaN where there is none."""
    disc = b * b - a * c
    hit = disc > 0
    root = np.sqrt(np.where(hit, disc, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.where(hit, (-b - root) / a, np.nan)
        hi = np.where(hit, (-b + root) / a, np.nan)
    return lo, hi


def _sphere_chords(center, radius, x, y):
    dx, dy = x - center[0], y - center[1]
    half = np.sqrt(np.maximum(radius**2 - dx * dx - dy * dy, 0.0))
    hit = dx * dx + dy * dy < radius**2
    return np.where(hit, center[2] - half, np.nan), np.where(hit, center[2] + half, np.nan)


def _capsule_chords(body: Body, x: np.ndarray, y: np.ndarray):
    half_length, radius = body.size[0], body.size[1]
    w = body.rotation[:, 0]
    d = np.stack([x - body.center[0], y - body.center[1], np.full_like(x, -body.center[2])])
    e = np.array([0.0, 0.0, 1.0])
    d_par = w @ d
    d_perp = d - np.outer(w, d_par)
    e_perp = e - w[2] * w
    a = float(e_perp @ e_perp)
    if a < 1e-12:  # axis along the beam: the cylinder is a disc-shaped shadow
        inside = np.einsum("in,in->n", d_perp, d_perp) < radius**2
        lo = np.where(inside, (-half_length - d_par), np.nan)
        hi = np.where(inside, (half_length - d_par), np.nan)
        cyl = (np.minimum(lo, hi), np.maximum(lo, hi))
    else:
        lo, hi = _quadratic_interval(a, e_perp @ d_perp, np.einsum("in,in->n", d_perp, d_perp) - radius**2)
        # Clip the infinite cylinder to the slab |(p - c) . w| <= half_length.
        if abs(w[2]) > 1e-12:
            s1, s2 = (-half_length - d_par) / w[2], (half_length - d_par) / w[2]
            lo, hi = np.maximum(lo, np.minimum(s1, s2)), np.minimum(hi, np.maximum(s1, s2))
        else:
            inside = np.abs(d_par) <= half_length
            lo, hi = np.where(inside, lo, np.nan), np.where(inside, hi, np.nan)
        empty = ~(hi > lo)
        cyl = (np.where(empty, np.nan, lo), np.where(empty, np.nan, hi))
    caps = [_sphere_chords(body.center + sign * half_length * w, radius, x, y) for sign in (-1, 1)]
    # The capsule is convex, so its chord is the hull of its pieces' chords.
    los = np.stack([cyl[0], caps[0][0], caps[1][0]])
    his = np.stack([cyl[1], caps[0][1], caps[1][1]])
    any_hit = ~np.all(np.isnan(los), axis=0)
    lo = np.where(any_hit, np.nanmin(np.where(np.isnan(los), np.inf, los), axis=0), np.nan)
    hi = np.where(any_hit, np.nanmax(np.where(np.isnan(his), -np.inf, his), axis=0), np.nan)
    return lo, hi


def chords(body: Body, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit ``z`` (nm) of the columns ``(x, y)`` through a body.

    Parameters
    ----------
    body : Body
    x, y : ndarray of shape (n_columns,)
        Column positions (nm).

    Returns
    -------
    z_in, z_out : ndarray of shape (n_columns,)
        NaN where the column misses the body.
    """
    if body.kind == "ellipsoid":
        return _ellipsoid_chords(body, x, y)
    if body.kind == "capsule":
        return _capsule_chords(body, x, y)
    raise ValueError(f"unknown body kind {body.kind!r}; use 'ellipsoid' or 'capsule'")


def column_segments(bodies: tuple[Body, ...] | list[Body], x: np.ndarray, y: np.ndarray):
    """Split every column into segments of uniform material.

    Parameters
    ----------
    bodies : sequence of Body
        Later bodies take precedence where bodies overlap.
    x, y : ndarray of shape (n_columns,)
        Column positions (nm).

    Returns
    -------
    z_start, z_end : ndarray of shape (n_columns, n_segments)
        Segment limits (nm), ordered along the beam; ``z_end >= z_start``.
    material : ndarray of int, shape (n_columns, n_segments)
        Material index of each segment, -1 for vacuum (gaps and misses).
    """
    limits = [chords(body, x, y) for body in bodies]
    if len(bodies) == 1:  # one body, one segment: nothing to sort or overwrite
        lo, hi = limits[0]
        hit = ~np.isnan(lo)
        material = np.where(hit, bodies[0].material, -1)[:, None]
        return np.where(hit, lo, 0.0)[:, None], np.where(hit, hi, 0.0)[:, None], material
    z_in = np.stack([lo for lo, _ in limits], axis=1)
    z_out = np.stack([hi for _, hi in limits], axis=1)
    events = np.sort(np.where(np.isnan(np.concatenate([z_in, z_out], axis=1)), np.inf,
                              np.concatenate([z_in, z_out], axis=1)), axis=1)
    start, end = events[:, :-1], events[:, 1:]
    finite = np.isfinite(end)
    mid = np.where(finite, 0.5 * (start + end), np.nan)
    material = np.full(start.shape, -1, dtype=np.int64)
    for b, body in enumerate(bodies):  # later bodies overwrite earlier ones
        inside = (mid >= z_in[:, b, None]) & (mid <= z_out[:, b, None])
        material[inside] = body.material
    start = np.where(finite, start, 0.0)
    end = np.where(finite, end, 0.0)
    material[~finite] = -1
    return start, end, material


#: Shapes the simulator builds, see :func:`droplet_bodies`.
SHAPES = ("sphere", "oblate", "triaxial", "prolate", "capsule", "dumbbell")


def droplet_bodies(
    shape: str,
    radius: float,
    *,
    aspect: float = 1.0,
    triaxial: float = 1.0,
    axis_polar: float = 0.0,
    axis_azimuth: float = 0.0,
    spin: float = 0.0,
    core_radius: float = 0.0,
    core_offset: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> tuple[Body, ...]:
    """Bodies of one helium droplet (material 0), optionally with a dopant core (material 1).

    Parameters
    ----------
    shape : str
        One of :data:`SHAPES`.
    radius : float
        Volume-equivalent radius (nm): every shape has the volume of a sphere of this radius.
    aspect : float, default=1
        Ratio of the symmetry-axis length to the perpendicular size: < 1 for oblate,
        > 1 for prolate, capsule (total length over diameter) and dumbbell (centre
        distance plus diameter over diameter).
    triaxial : float, default=1
        For ``"triaxial"``: ratio of the two axes perpendicular to the short one (>= 1).
    axis_polar, axis_azimuth, spin : float
        Orientation of the symmetry (first) axis, see :func:`rotation_matrix` (rad).
    core_radius : float, default=0
        Radius (nm) of a spherical xenon cluster inside the droplet; 0 for none.
    core_offset : tuple of 3 floats
        Position (nm) of the core relative to the droplet centre.

    Returns
    -------
    tuple of Body
    """
    rotation = rotation_matrix(axis_polar, axis_azimuth, spin)
    centre = np.zeros(3)
    if shape == "sphere":
        bodies = [Body("ellipsoid", centre, rotation, (radius, radius, radius))]
    elif shape in ("oblate", "prolate"):
        # a = c * aspect along the axis, with a * c^2 = radius^3.
        c = radius / aspect ** (1 / 3)
        bodies = [Body("ellipsoid", centre, rotation, (c * aspect, c, c))]
    elif shape == "triaxial":
        # Short axis along the first axis (like an oblate droplet), other two unequal.
        b = radius / (aspect * triaxial) ** (1 / 3)
        bodies = [Body("ellipsoid", centre, rotation, (b * aspect, b, b * triaxial))]
    elif shape == "capsule":
        # Total length 2 (h + r) = aspect * 2 r  ->  h = (aspect - 1) r; volume fixes r.
        h_over_r = max(aspect - 1.0, 0.0)
        r = radius / (1 + 1.5 * h_over_r) ** (1 / 3)
        bodies = [Body("capsule", centre, rotation, (h_over_r * r, r, r))]
    elif shape == "dumbbell":
        # Two equal overlapping spheres of radius r, centres 2 s apart, s = (aspect - 1) r.
        s_over_r = max(aspect - 1.0, 0.0)
        # Union volume: 2 * sphere - lens (overlap) volume, lens for centre distance d = 2 s.
        d = 2 * s_over_r
        lens = np.pi * (4 + d) * (2 - d) ** 2 / 12 if d < 2 else 0.0
        r = radius * (4 / 3 * np.pi / (8 / 3 * np.pi - lens)) ** (1 / 3)
        axis = rotation[:, 0]
        bodies = [Body("ellipsoid", centre + sign * s_over_r * r * axis, rotation, (r, r, r))
                  for sign in (-1, 1)]
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    if core_radius > 0:
        bodies.append(Body("ellipsoid", np.asarray(core_offset, float), np.eye(3),
                           (core_radius, core_radius, core_radius), material=1))
    return tuple(bodies)
