"""Forward models: the far-field scattering amplitude of a droplet (pure NumPy + finufft).

Beam along ``+z``, wave number ``k = 2 pi / lambda``, refractive index
``n = 1 - delta + i beta`` and ``dn = n - 1`` per material. A detector direction
with unit vector ``s`` has momentum transfer ``q = k (s - e_z)`` (on the Ewald
sphere). The three models differ in the effective density that is Fourier
transformed (see ``shared/design/physics.md`` and ``docs/simulator.md``):

``projection``
    ``A(q) = int dn(x, y, z) exp(-i (qx x + qy y)) d^3r``: the 2D Fourier
    transform of the projected density, ``q_z`` ignored. Centro-symmetric,
    small-angle only.
``born``
    ``A(q) = int dn(r) exp(-i q . r) d^3r`` evaluated on the Ewald sphere:
    wide-angle curvature, no absorption or refraction.
``msft``
    The multi-slice Fourier transform (Barke et al., Nat. Commun. 6, 6187
    (2015)) in the limit of infinitely thin slices: the density carries the
    phase and attenuation ``exp(i k int_{-inf}^z dn dz')`` of the incoming wave.
    With ``slice_thickness`` the density carries the incoming wave propagated
    through the droplet instead (refraction, diffraction; :mod:`.propagation`).

All three are evaluated column by column: every column ``(x, y)`` parallel to
the beam crosses the particle in a few segments ``[a, b]`` of uniform material
(:func:`.particles.column_segments`). Along such a segment the integrand is an
exponential in ``z``, so its integral is exact:

    int_a^b dn exp(i Phi(z)) exp(-i qz z) dz
        = dn [exp(i Phi_b - i qz b) - exp(i Phi_a - i qz a)] / (i u),    u = kappa dn - qz,

with ``kappa = k`` (MSFT) or ``0`` (Born); a Taylor series replaces it where
``|u T|`` is tiny. The column integrals ``G(x, y; qz)`` are band-limited in
``qz`` (their support in ``z`` is the droplet's depth), so they are computed
(:func:`_column_integrals`, Numba) on equally spaced ``qz`` nodes 3x finer than
Nyquist; for each node a 2D type-2 non-uniform FFT (finufft) sums the columns at
the transverse momentum ``(qx, qy)`` of the targets whose ``qz`` is near that
node, and a Kaiser-windowed sinc interpolates between nodes. The cost grows with
the number of columns and targets, not with a voxel grid. The column spacing
follows the largest transverse momentum transfer among the targets (2x finer
than Nyquist); 2 x 2 sub-columns per cell are averaged (a box filter that
suppresses aliasing from the sharp droplet edge) and the filter's response is
divided out. In the projection model only the projected density matters: it is
sampled at cell centres where it is smooth and averaged over 4 x 4 sub-columns only
in the cells an outline crosses (:func:`_projection_amplitude`), and an ellipsoid
(with ellipsoidal clusters inside) uses its exact form factor, in float32 when the
momentum transfers are float32.

Lengths are in nm and wave numbers in 1/nm in this module.
"""

from __future__ import annotations

import cmath
from typing import Sequence

import finufft
import numba
import numpy as np
from scipy import special

from pipeline.simulate import projected, propagation
from pipeline.simulate.particles import Body, column_segments

MODELS = ("projection", "born", "msft")

#: q_z nodes: oversampling relative to Nyquist, interpolation half-width (nodes) and
#: Kaiser-Bessel shape. Against 8 taps at 4x, amplitudes are within 3e-3 (1.5e-3 dex in
#: intensity; MSFT itself is 0.04 dex from exact Mie theory). 4 taps at 3x gave 8e-4
#: for 20 % more simulation time: each target is interpolated from 2 * _TAPS nodes.
_Z_OVERSAMPLE = 2.5
_TAPS = 3
_KAISER_BETA = 7.5
#: Projection model: column grid sampling relative to Nyquist, and sub-columns per
#: axis averaged in the cells that an outline crosses.
_PROJECTION_OVERSAMPLE = 2.0
_PROJECTION_REFINE = 4
#: finufft's upsampling in the projection model: its FFT (on the upsampled grid)
#: dominates the cost, and the wider spreading kernel that 1.25 needs is cheaper.
_PROJECTION_UPSAMPFAC = 1.25
#: Refuse column grids larger than this (memory); reached only by absurd sizes.
_MAX_COLUMNS = 6_000_000


def ewald_q(x: np.ndarray, y: np.ndarray, *, distance: float, wavelength: float):
    """Momentum transfer and solid-angle factor of detector positions.

    Parameters
    ----------
    x, y : ndarray, broadcastable against each other
        Detector positions relative to the direct beam (m). float32 inputs give
        float32 results (enough for the small-angle projection model).
    distance : float
        Sample-detector distance (m).
    wavelength : float
        Wavelength (m).

    Returns
    -------
    q : ndarray of shape (x * y).shape + (3,)
        Momentum transfer ``k (x/r, y/r, L/r - 1)`` (1/nm). A view whose components
        ``q[..., i]`` are each contiguous.
    solid_angle_per_area : ndarray of shape (x * y).shape
        ``L / r^3`` (1/m^2): multiply by the pixel area (m^2) to get its solid angle (sr).
    """
    rho2 = x * x + y * y  # broadcasting a row and a column gives the full grid
    r = np.sqrt(rho2 + distance**2)
    k = 2 * np.pi / (wavelength * 1e9)
    k_over_r = k / r
    q = np.empty((3,) + rho2.shape, dtype=rho2.dtype)
    np.multiply(x, k_over_r, out=q[0])
    np.multiply(y, k_over_r, out=q[1])
    # L/r - 1 = -rho^2 / (r (r + L)) without the cancellation near the beam.
    np.multiply(rho2, -k_over_r / (r + distance), out=q[2])
    return np.moveaxis(q, 0, -1), distance / (r * r * r)


def flat_detector_weight(x: np.ndarray, y: np.ndarray, *, distance: float, polarization: str):
    """Solid angle per area times polarisation factor of a separable grid of detector positions.

    The same quantities as ``ewald_q``'s ``L / r^3`` times :func:`polarization_factor`,
    written with ``1 / r^2`` so that a row and a column of positions give them in
    a few full-grid operations (the projection model's fast path).

    Parameters
    ----------
    x : ndarray of shape (1, nx)
    y : ndarray of shape (ny, 1)
        Detector positions relative to the direct beam (m); float32 gives float32.
    distance : float
        Sample-detector distance (m).
    polarization : {"horizontal", "vertical", "none"}

    Returns
    -------
    weight : ndarray of shape (ny, nx)
        ``L / r^3 * P`` (1/m^2): multiply by the pixel area (m^2) for solid angle (sr) times ``P``.
    inverse_r2 : ndarray of shape (ny, nx)
        ``1 / r^2`` (1/m^2), ``r^2 = x^2 + y^2 + L^2``.
    """
    x2, y2 = x * x, y * y
    inverse_r2 = x2 + (y2 + distance**2)
    np.reciprocal(inverse_r2, out=inverse_r2)
    weight = np.sqrt(inverse_r2)
    weight *= inverse_r2
    # P * L: 1 - (x/r)^2, 1 - (y/r)^2 or (1 + (L/r)^2) / 2, times L.
    if polarization == "horizontal":
        factor = np.multiply(x2 * -distance, inverse_r2)
        factor += distance
    elif polarization == "vertical":
        factor = np.multiply(y2 * -distance, inverse_r2)
        factor += distance
    elif polarization == "none":
        factor = np.multiply(inverse_r2, 0.5 * distance**3)
        factor += 0.5 * distance
    else:
        raise ValueError(f"unknown polarization {polarization!r}; use 'horizontal', 'vertical' or 'none'")
    weight *= factor
    return weight, inverse_r2


def ellipsoid_terms(droplets, index_minus_one: Sequence[complex]):
    """A group of droplets as a sum of ellipsoid form factors, if it is one (projection model).

    Projection is linear in the density: a droplet that is one ellipsoid with
    ellipsoids of other materials wholly inside it is the outer form factor plus
    each inner one with the density difference.

    Parameters
    ----------
    droplets : sequence of (bodies, offset)
        As :meth:`.Shot.droplets`; offsets in nm.
    index_minus_one : sequence of complex
        ``n - 1`` of each material.

    Returns
    -------
    list of (Body, complex, (float, float, float)) or None
        Each ellipsoid, ``dn V`` (nm^3) and its position (nm: the droplet's offset plus the
        body's transverse centre; a body's own depth does not enter the projection).
        None if a droplet is not made of nested ellipsoids.
    """
    terms = []
    for bodies, offset in droplets:
        if not _nested_ellipsoids(bodies):
            return None
        outer = bodies[0]
        dn_outer = index_minus_one[outer.material]
        for body in bodies:
            dn = dn_outer if body is outer else index_minus_one[body.material] - dn_outer
            # Python numbers: numpy float64 scalars would promote float32 arrays.
            position = tuple(float(v) for v in np.add(offset, (body.center[0], body.center[1], 0.0)))
            terms.append((body, complex(dn * body.volume()), position))
    return terms


def ellipsoids_intensity(terms, x: np.ndarray, y: np.ndarray, inverse_r2: np.ndarray, *,
                         distance: float, wavelength: float) -> np.ndarray:
    """``|A(q)|^2`` (nm^6) of a sum of ellipsoid form factors in the projection model, on a separable grid.

    ``A = sum_t c_t f_t(q) exp(-i q . o_t)`` with ``q = k (x/r, y/r, L/r - 1)`` as
    :func:`ewald_q` (the phases of droplets apart along the beam make Newton rings),
    ``f_t`` from :func:`ellipsoid_shape`. Real and imaginary parts are summed as
    float arrays (no complex temporaries); one term needs no phase at all.

    Parameters
    ----------
    terms : list of (Body, complex, (float, float, float))
        From :func:`ellipsoid_terms`.
    x : ndarray of shape (1, nx)
    y : ndarray of shape (ny, 1)
        Detector positions relative to the direct beam (m).
    inverse_r2 : ndarray of shape (ny, nx)
        ``1 / r^2`` from :func:`flat_detector_weight` (1/m^2).
    distance, wavelength : float
        m.

    Returns
    -------
    ndarray of shape (ny, nx), dtype of ``inverse_r2``
    """
    if len(terms) == 1:
        body, coefficient, _ = terms[0]
        shape = ellipsoid_shape(body, x, y, inverse_r2, wavelength=wavelength)
        np.square(shape, out=shape)
        shape *= abs(coefficient) ** 2
        return shape
    k = 2 * np.pi / (wavelength * 1e9)
    inverse_r = np.sqrt(inverse_r2)
    real, imag = np.zeros_like(inverse_r2), np.zeros_like(inverse_r2)
    qz_over_k = None
    for body, coefficient, position in terms:
        shape = ellipsoid_shape(body, x, y, inverse_r2, wavelength=wavelength)
        if not np.any(position):
            real += coefficient.real * shape
            imag += coefficient.imag * shape
            continue
        phase = (k * position[0]) * x + (k * position[1]) * y
        phase *= inverse_r  # q_x o_x + q_y o_y
        if position[2]:
            if qz_over_k is None:
                # L/r - 1 = -rho^2 / (r (r + L)) = -rho^2 / r^2 / (1 + L / r), without cancellation.
                qz_over_k = (x * x + y * y) * inverse_r2
                qz_over_k /= -(1 + distance * inverse_r)
            phase += qz_over_k * (k * position[2])
        # c exp(-i phase) = (c_r cos + c_i sin) + i (c_i cos - c_r sin)
        cos, sin = np.cos(phase), np.sin(phase, out=phase)
        cos *= shape
        sin *= shape
        real += coefficient.real * cos + coefficient.imag * sin
        imag += coefficient.imag * cos - coefficient.real * sin
    np.square(real, out=real)
    np.square(imag, out=imag)
    real += imag
    return real


def ellipsoid_shape(body: Body, x: np.ndarray, y: np.ndarray, inverse_r2: np.ndarray, *,
                    wavelength: float) -> np.ndarray:
    """Form factor ``A(q) / A(0)`` of a uniform ellipsoid centred on the axis, projection model, on a separable grid.

    The sphere's form factor ``f(u) = 3 (sin u - u cos u) / u^3`` at ``u^2 = q^T S q``
    with ``q = k (x, y) / r`` (as :func:`ewald_q`) and ``S`` the shadow's quadratic
    form (as :func:`_ellipsoid_projection`). ``u^2`` is a quadratic form in the
    detector coordinates times ``1 / r^2``, so no momentum-transfer grid is built.

    Parameters
    ----------
    body : Body
        An ellipsoid (its centre is ignored: a shift is a phase, see :func:`ellipsoids_intensity`).
    x : ndarray of shape (1, nx)
    y : ndarray of shape (ny, 1)
        Detector positions relative to the direct beam (m).
    inverse_r2 : ndarray of shape (ny, nx)
        ``1 / r^2`` from :func:`flat_detector_weight` (1/m^2).
    wavelength : float
        Wavelength (m).

    Returns
    -------
    ndarray of shape (ny, nx), dtype of ``inverse_r2``
        Real, 1 at ``q = 0``.
    """
    k2 = (2 * np.pi / (wavelength * 1e9)) ** 2
    sxx, sxy, syy = _shadow_form(body)
    u2 = (k2 * sxx) * (x * x) + (k2 * syy) * (y * y)
    if sxy:
        u2 += ((2 * k2 * sxy) * x) * y
    u2 *= inverse_r2
    # 3 (sin u - u cos u) / u^3 cancels badly for small u: its Taylor series, exact
    # to the working precision there, takes over (and covers u = 0).
    small = np.flatnonzero(u2 < _SMALL_U2[u2.dtype.type])
    series = u2.flat[small]
    series = 1 - series / 10 + series * series / 280
    u = np.sqrt(u2)
    shape = np.sin(u)
    shape -= np.cos(u) * u
    u2 *= u
    with np.errstate(divide="ignore", invalid="ignore"):
        shape /= u2
    shape *= 3
    shape.flat[small] = series
    return shape


#: Below these ``u^2`` the ellipsoid form factor uses its Taylor series (u < 0.3 in
#: float32, 0.01 in float64).
_SMALL_U2 = {np.float32: 0.09, np.float64: 1e-4}


def polarization_factor(q: np.ndarray, *, wavelength: float, polarization: str) -> np.ndarray:
    """Dipole polarisation factor of each scattering direction.

    Parameters
    ----------
    q : ndarray of shape (..., 3)
        Momentum transfer (1/nm) on the Ewald sphere.
    wavelength : float
        Wavelength (m).
    polarization : {"horizontal", "vertical", "none"}
        Linear polarisation along x or y (FEL undulators), or unpolarised.

    Returns
    -------
    ndarray of shape q.shape[:-1]
        ``1 - (s . e)^2`` for polarisation ``e`` and unit direction ``s``, or
        ``(1 + cos^2 theta) / 2`` when unpolarised.
    """
    k = 2 * np.pi / (wavelength * 1e9)
    if polarization == "horizontal":
        return 1 - np.square(q[..., 0] / k)
    if polarization == "vertical":
        return 1 - np.square(q[..., 1] / k)
    if polarization == "none":
        return 0.5 * (1 + np.square(q[..., 2] / k + 1))
    raise ValueError(f"unknown polarization {polarization!r}; use 'horizontal', 'vertical' or 'none'")


def _column_grid(bodies: Sequence[Body], spacing: float):
    """Column centres (nm) covering the bodies' shadow, on a grid of the given spacing."""
    lows, highs = [], []
    for body in bodies:
        hx, hy = body.half_extent_xy()
        lows.append((body.center[0] - hx, body.center[1] - hy))
        highs.append((body.center[0] + hx, body.center[1] + hy))
    lo, hi = np.min(lows, axis=0), np.max(highs, axis=0)
    centre = 0.5 * (lo + hi)
    counts = np.ceil((hi - lo) / spacing).astype(int) + 2
    counts += counts % 2  # even sizes keep the type-2 mode ordering simple
    if counts[0] * counts[1] > _MAX_COLUMNS:
        raise ValueError(
            f"particle of extent {hi - lo!r} nm needs {counts[0] * counts[1]} columns at "
            f"spacing {spacing:.3g} nm; reduce its size or the maximum scattering angle"
        )
    gx = centre[0] + (np.arange(counts[0]) - counts[0] // 2) * spacing
    gy = centre[1] + (np.arange(counts[1]) - counts[1] // 2) * spacing
    return centre, gx, gy


@numba.njit(cache=True, nogil=True)
def _column_integrals(cell, start, thickness, material, phase, dn_table, nodes, kappa, n_cells):  # pragma: no cover
    """Column integrals ``int dn exp(i Phi(z)) exp(-i qz z) dz`` at each node ``qz``, summed per cell.

    ``start``, ``thickness`` (nm), ``material`` (index into ``dn_table``, -1 for
    vacuum) and ``phase`` (complex, rad: the incoming wave's phase and attenuation
    at the segment entry) have shape (n_columns, n_segments); ``cell`` (n_columns,)
    is the grid cell each column belongs to; ``nodes`` are equally spaced.
    Returns (n_nodes, n_cells). Inside a segment ``[a, a + T]`` the integrand is
    ``exp(i u z)`` with ``u = kappa dn - qz``; its integral
    ``(exp(i kappa dn T) exp(-i qz (a + T)) - exp(-i qz a)) / (i u)`` is replaced by
    a short Taylor series where ``|u T|`` is tiny (near the forward direction). The
    phases ``exp(-i qz a)`` of successive nodes follow by one multiplication each.
    """
    n_nodes = nodes.shape[0]
    n_columns, n_segments = start.shape
    step = nodes[1] - nodes[0] if n_nodes > 1 else 0.0
    inv_iu = np.empty((dn_table.shape[0], n_nodes), dtype=np.complex128)
    abs_u = np.empty((dn_table.shape[0], n_nodes))
    for m in range(dn_table.shape[0]):
        for j in range(n_nodes):
            u = kappa * dn_table[m] - nodes[j]
            abs_u[m, j] = abs(u)
            inv_iu[m, j] = 1.0 / (1j * u) if abs(u) > 0 else 0.0
    out = np.zeros((n_nodes, n_cells), dtype=np.complex128)
    for c in range(n_columns):
        k = cell[c]
        for s in range(n_segments):
            m = material[c, s]
            t = thickness[c, s]
            if m < 0 or t <= 0.0:
                continue
            d = dn_table[m]
            a = start[c, s]
            b = a + t
            prefactor = d * cmath.exp(1j * phase[c, s])
            transmitted = cmath.exp(1j * kappa * d * t)
            ea = cmath.exp(-1j * nodes[0] * a)
            eb = cmath.exp(-1j * nodes[0] * b)
            da = cmath.exp(-1j * step * a)
            db = cmath.exp(-1j * step * b)
            for j in range(n_nodes):
                if abs_u[m, j] * t < 1e-4:
                    x = (kappa * d - nodes[j]) * t
                    out[j, k] += prefactor * ea * t * (1 + 0.5j * x - x * x / 6)
                else:
                    out[j, k] += prefactor * (transmitted * eb - ea) * inv_iu[m, j]
                ea *= da
                eb *= db
    return out


def droplet_amplitude(
    bodies: Sequence[Body],
    q: np.ndarray,
    *,
    wavelength: float,
    index_minus_one: Sequence[complex],
    model: str = "msft",
    oversample: float = 2.0,
    supersample: int = 2,
    eps: float = 1e-4,
    slice_thickness: float | None = None,
) -> np.ndarray:
    """Scattering amplitude ``A(q)`` (nm^3) of one droplet made of convex bodies.

    Parameters
    ----------
    bodies : sequence of Body
        The droplet (positions in nm, relative to the droplet's own origin).
    q : ndarray of shape (..., 3)
        Momentum transfers (1/nm); for ``model="projection"`` only ``qx, qy`` are used.
        float32 values are kept where an exact form factor is used (projection of
        ellipsoids), otherwise computed in float64.
    wavelength : float
        Wavelength (m).
    index_minus_one : sequence of complex
        ``n - 1 = -delta + i beta`` of each material index used by the bodies.
    model : {"projection", "born", "msft"}, default="msft"
        Forward model, see the module docstring.
    oversample : float, default=2
        Column-grid sampling relative to the Nyquist spacing ``pi / max|q_perp|``
        (Born, MSFT; the projection model uses ``_PROJECTION_OVERSAMPLE``).
    supersample : int, default=2
        Columns per grid cell along x and y whose column integrals are averaged: a
        box filter that suppresses aliasing of the sharp droplet edge (undone
        exactly for the unaliased part by dividing by its transfer function).
        Born and MSFT only.
    eps : float, default=1e-4
        Relative precision of the non-uniform FFTs.
    slice_thickness : float, optional
        MSFT only. None (default): the incoming wave travels in straight lines
        (Barke et al.'s MSFT). A thickness (nm): the incoming wave is propagated
        through the droplet slice by slice (:mod:`.propagation`), which adds its
        refraction and diffraction inside the droplet; slower, and more accurate
        at wide angles (about 10 nm with ``oversample=3`` matches exact Mie theory
        to 0.02 dex up to 30 degrees for a 500 nm helium droplet at 13.5 nm; 0.04 with the
        default ``oversample``).

    Returns
    -------
    ndarray of complex128 (complex64 for float32 ``q`` on the exact path), shape q.shape[:-1]
        ``int dn_eff(r) exp(-i q . r) d^3r`` (nm^3). The differential cross-section
        is ``(k^2 / 2 pi)^2 |A|^2`` (nm^2/sr).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; use one of {MODELS}")
    if slice_thickness is not None and (model != "msft" or not slice_thickness > 0):
        raise ValueError(f"slice_thickness={slice_thickness!r} needs model='msft' and a positive thickness (nm)")
    q = np.asarray(q)
    if model == "projection" and _nested_ellipsoids(bodies):
        # Exact form factors keep float32 momentum transfers in float32 (complex64 result).
        if q.dtype != np.float32:
            q = q.astype(np.float64, copy=False)
        # Projection is linear in the density: a droplet plus the clusters inside it is
        # the droplet's form factor plus each cluster's with the density difference.
        outer = bodies[0]
        dn_outer = index_minus_one[outer.material]
        amplitude = _ellipsoid_projection(outer, q, dn_outer)
        for inner in bodies[1:]:
            amplitude += _ellipsoid_projection(inner, q, index_minus_one[inner.material] - dn_outer)
        return amplitude
    shape = q.shape[:-1]
    if model == "projection":
        if q.dtype != np.float32:
            q = q.astype(np.float64, copy=False)
        return _projection_amplitude(bodies, q.reshape(-1, 3), index_minus_one=index_minus_one,
                                     eps=eps).reshape(shape)
    return _column_amplitude(bodies, q.reshape(-1, 3).astype(np.float64, copy=False), wavelength=wavelength,
                             index_minus_one=index_minus_one, model=model, oversample=oversample,
                             supersample=supersample, eps=eps, slice_thickness=slice_thickness).reshape(shape)


def _projection_amplitude(bodies, q, *, index_minus_one, eps):
    """Projection-model amplitude of any bodies: a 2D NUFFT of cell-averaged projected density.

    ``q`` has shape (n_targets, 3), float32 or float64 (only ``qx, qy`` are used;
    float32 runs the single-precision NUFFT and returns complex64). The grid is
    centred on the droplet's origin (so no phase factor is needed);
    :func:`.projected.cell_averaged_density` gives each cell's mean projected
    density (from centre samples where it is smooth, sub-columns where an outline
    crosses): a box filter whose sinc response is divided out.
    """
    float32 = q.dtype == np.float32
    # The largest |q_perp| (a detector corner) sets the spacing along both axes: a
    # spacing from max |qx| and max |qy| alone lets the corners alias (measured).
    # In q's precision: a grid spacing needs no more (5x cheaper than float64 on 1M targets).
    q_perp = float(np.sqrt(np.max(np.square(q[:, 0]) + np.square(q[:, 1]))))
    spacing = np.full(2, np.pi / max(q_perp, 1e-6) / _PROJECTION_OVERSAMPLE)  # (x, y), nm
    gx, gy = _centred_grid(bodies, spacing)
    force = np.zeros((len(gy), len(gx)), dtype=bool)
    for body in bodies:
        # Small bodies may fall between the centres, and a centre sample misses their
        # curvature (relative error ~ (spacing / size)^2 / 12): refine their whole box.
        half = np.asarray(body.half_extent_xy())
        if np.any(half < 8 * spacing):
            ix = np.searchsorted(gx, body.center[0] + np.array([-1, 1]) * (half[0] + spacing[0]))
            iy = np.searchsorted(gy, body.center[1] + np.array([-1, 1]) * (half[1] + spacing[1]))
            force[iy[0]:iy[1] + 1, ix[0]:ix[1] + 1] = True
    density = projected.cell_averaged_density(*projected.pack(bodies), np.asarray(index_minus_one, np.complex128),
                                              gx, gy, force, _PROJECTION_REFINE)
    density *= spacing[0] * spacing[1]

    real = np.float32 if float32 else np.float64
    qx = np.multiply(q[:, 0], real(spacing[0]), dtype=real)
    qy = np.multiply(q[:, 1], real(spacing[1]), dtype=real)
    plan = finufft.Plan(2, density.shape, eps=eps, isign=-1, nthreads=1, upsampfac=_PROJECTION_UPSAMPFAC,
                        dtype=np.complex64 if float32 else np.complex128)
    plan.setpts(qy, qx)
    amplitude = plan.execute(density.astype(plan.dtype, copy=False))
    # Undo the cell average (a box of one cell) on the unaliased spectrum.
    amplitude /= np.sinc(qx * real(0.5 / np.pi)) * np.sinc(qy * real(0.5 / np.pi))
    return amplitude


def _centred_grid(bodies: Sequence[Body], spacing):
    """Cell centres (nm) along x and y covering the bodies' shadow, symmetric about the origin.

    ``spacing`` is (x, y) in nm. Even counts put the origin on a cell centre
    (index n // 2), which is also where the type-2 NUFFT puts mode 0.
    """
    reach = np.zeros(2)
    for body in bodies:
        reach = np.maximum(reach, np.abs(body.center[:2]) + np.asarray(body.half_extent_xy()))
    counts = 2 * (np.ceil(reach / spacing).astype(int) + 1)
    if counts[0] * counts[1] > _MAX_COLUMNS:
        raise ValueError(
            f"particle of half extent {reach!r} nm needs {counts[0] * counts[1]} columns at "
            f"spacing {spacing!r} nm; reduce its size or the maximum scattering angle"
        )
    return tuple((np.arange(n) - n // 2) * h for n, h in zip(counts, spacing))


def _column_amplitude(bodies, q, *, wavelength, index_minus_one, model, oversample, supersample, eps,
                      slice_thickness=None):
    """:func:`droplet_amplitude` by the column engine (Born, MSFT), for q (n_targets, 3) in float64."""
    q_perp = float(np.sqrt(np.max(q[:, 0] ** 2 + q[:, 1] ** 2)))
    spacing = np.pi / max(q_perp, 1e-6) / oversample
    centre, gx, gy = _column_grid(bodies, spacing)
    # Sub-columns: `supersample` x `supersample` per cell, averaged below.
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    sx = (gx[:, None] + offsets[None, :] * spacing).ravel()
    sy = (gy[:, None] + offsets[None, :] * spacing).ravel()
    xx, yy = np.meshgrid(sx, sy, indexing="xy")  # (ny * s, nx * s)
    start, end, material = column_segments(bodies, xx.ravel(), yy.ravel())
    # Keep only the columns that cross the droplet; `cell` says which grid cell each
    # sub-column (iy * s + sy, ix * s + sx) belongs to: cell (iy, ix).
    ny, nx = len(gy), len(gx)
    cell = ((np.arange(ny * supersample) // supersample)[:, None] * nx
            + (np.arange(nx * supersample) // supersample)[None, :]).ravel()
    hit = (material >= 0).any(axis=1)
    start, end, material, cell = start[hit], end[hit], material[hit], cell[hit]
    thickness = end - start
    dn_table = np.asarray(list(index_minus_one) + [0.0], dtype=np.complex128)
    dn = dn_table[material]  # material -1 (vacuum) picks the trailing 0

    k = 2 * np.pi / (wavelength * 1e9)
    kappa = k if model == "msft" else 0.0
    # The column integrals are band-limited in q_z (their z-extent is the droplet's
    # depth), so they are computed on a grid of q_z nodes _Z_OVERSAMPLE times finer
    # than Nyquist and interpolated to each target from its 2 * _TAPS nearest nodes.
    z_lo = np.min(np.where(dn != 0, start, np.inf))
    z_hi = np.max(np.where(dn != 0, end, -np.inf))
    z0 = 0.5 * (z_lo + z_hi)
    step = 2 * np.pi / (_Z_OVERSAMPLE * max(z_hi - z_lo, 1.0))
    qz_lo = float(q[:, 2].min()) - _TAPS * step
    count = int(np.ceil((float(q[:, 2].max()) - qz_lo) / step)) + _TAPS + 1
    nodes = qz_lo + step * np.arange(count)
    if slice_thickness is None:
        optical = dn * thickness
        phase_start = kappa * (np.cumsum(optical, axis=1) - optical)
        cells = _column_integrals(cell, start - z0, thickness, material, phase_start, dn_table[:-1], nodes, kappa,
                                  ny * nx)
    else:
        planes = propagation.slice_planes(z_lo - z0, z_hi - z0, slice_thickness)
        transmission, full = propagation.slice_transmission(cell, start - z0, thickness, material, dn_table[:-1], k,
                                                            planes, ny * nx, supersample**2)
        field = propagation.propagate(transmission.reshape(-1, ny, nx), planes, spacing=spacing, k=k)
        del transmission  # large for large droplets
        cells = propagation.propagated_column_integrals(cell, start - z0, thickness, material, dn_table[:-1], k,
                                                        planes, field, full, nodes)
    cells = cells.reshape(len(nodes), ny, nx)
    cells *= spacing * spacing / supersample**2

    # Undo the box filter's transfer function on the unaliased spectrum.
    filt = _box_response(q[:, 0] * spacing, supersample) * _box_response(q[:, 1] * spacing, supersample)
    # Targets sorted by q_z: each node's targets (|offset| < _TAPS) are one contiguous
    # slice of the sorted arrays (no gathers or scatters per node).
    position = (q[:, 2] - nodes[0]) / step
    order = np.argsort(position)
    position = position[order]
    qx = q[order, 0] * spacing
    qy = q[order, 1] * spacing
    lower = np.searchsorted(position, np.arange(len(nodes)) - _TAPS)
    upper = np.searchsorted(position, np.arange(len(nodes)) + _TAPS)
    by_qz = np.zeros(len(q), dtype=np.complex128)
    # One plan (one FFT set-up) for all nodes; each node sees only its targets.
    plan = finufft.Plan(2, (ny, nx), eps=eps, isign=-1, nthreads=1, upsampfac=1.25)
    for j in range(len(nodes)):
        if upper[j] == lower[j]:
            continue
        near = slice(lower[j], upper[j])
        plan.setpts(qy[near], qx[near])
        by_qz[near] += plan.execute(cells[j]) * _interpolation_weight(position[near] - j)
    amplitude = np.empty_like(by_qz)
    amplitude[order] = by_qz
    amplitude *= np.exp(-1j * q[:, 2] * z0)
    return amplitude / filt * np.exp(-1j * (q[:, 0] * centre[0] + q[:, 1] * centre[1]))


def _nested_ellipsoids(bodies: Sequence[Body]) -> bool:
    """True for one ellipsoid, optionally with ellipsoids of other materials wholly inside it."""
    outer = bodies[0]
    if outer.kind != "ellipsoid":
        return False
    for inner in bodies[1:]:
        reach = np.linalg.norm(inner.center - outer.center) + max(inner.size)
        if inner.kind != "ellipsoid" or inner.material == outer.material or reach > min(outer.size):
            return False
    return True


def _ellipsoid_projection(body: Body, q: np.ndarray, dn: complex) -> np.ndarray:
    """Exact projection-model amplitude (nm^3) of a uniform ellipsoid: the sphere form
    factor at the scaled momentum transfer, used instead of the column sum for speed.

    Works in the precision of ``q`` (float32 -> complex64, float64 -> complex128).
    """
    sxx, sxy, syy = _shadow_form(body)
    qx, qy = q[..., 0], q[..., 1]
    x2 = qx * (sxx * qx + 2 * sxy * qy) + syy * (qy * qy)
    x = np.sqrt(x2)
    # 3 (sin x - x cos x) / x^3 cancels badly for small x: its Taylor series takes over
    # where the series is exact to the working precision (x < 0.3 in float32).
    small = x < (0.3 if x.dtype == np.float32 else 1e-2)
    xs = np.where(small, 1, x)
    shape = 3 * (np.sin(xs) - xs * np.cos(xs)) / (xs * xs * xs)
    if small.any():
        shape[small] = 1 - x2[small] / 10 + x2[small] ** 2 / 280
    amplitude = shape * complex(dn * body.volume())  # a Python scalar keeps the dtype of `shape`
    if body.center[0] or body.center[1]:
        amplitude *= shift_phase(q, (body.center[0], body.center[1], 0.0))
    return amplitude


def _shadow_form(body: Body) -> tuple[float, float, float]:
    """``(Sxx, Sxy, Syy)`` (nm^2) with ``|diag(size) R^T q|^2 = q^T S q`` for ``q = (qx, qy, 0)``.

    Python floats, so that they keep the precision of the arrays they multiply.
    """
    shadow = (body.rotation @ np.diag(np.square(body.size)) @ body.rotation.T)[:2, :2]
    return float(shadow[0, 0]), float(shadow[0, 1]), float(shadow[1, 1])


def shift_phase(q: np.ndarray, offset) -> np.ndarray:
    """``exp(-i q . offset)`` (shift theorem) in the precision of ``q``.

    Parameters
    ----------
    q : ndarray of shape (..., 3)
        Momentum transfers (1/nm).
    offset : sequence of 3 floats
        Displacement (nm).

    Returns
    -------
    ndarray of complex64 (float32 ``q``) or complex128, shape q.shape[:-1]
    """
    phase = np.zeros(q.shape[:-1], dtype=q.dtype)
    for axis, length in enumerate(offset):
        if length:
            phase += q[..., axis] * float(length)
    # cos and sin are vectorised for float32; complex exp is not.
    out = np.empty(phase.shape, dtype=np.result_type(q.dtype, np.complex64))
    np.cos(phase, out=out.real)
    np.sin(phase, out=out.imag)
    np.negative(out.imag, out=out.imag)
    return out


def _interpolation_weight(offset: np.ndarray) -> np.ndarray:
    """Kaiser-Bessel-windowed sinc for band-limited interpolation (offset in node steps).

    Tabulated once on a fine grid and linearly interpolated (error < 1e-7).
    """
    return np.interp(offset, _WEIGHT_GRID, _WEIGHT_TABLE)


def _weight_table(samples: int = 20001):
    grid = np.linspace(-_TAPS, _TAPS, samples)
    window = special.i0(_KAISER_BETA * np.sqrt(np.clip(1 - (grid / _TAPS) ** 2, 0, None)))
    return grid, np.sinc(grid) * window / special.i0(_KAISER_BETA)


_WEIGHT_GRID, _WEIGHT_TABLE = _weight_table()


def _box_response(phase_step: np.ndarray, supersample: int) -> np.ndarray:
    """Frequency response of averaging ``supersample`` sub-columns spaced ``1/supersample`` of a cell."""
    if supersample == 1:
        return np.ones_like(phase_step)
    # The mean of cos(a o) over the offsets o = (j + 1/2) / s - 1/2 (a Dirichlet kernel).
    half = 0.5 * phase_step
    small = np.abs(half) < 1e-6
    ratio = np.sin(half) / np.where(small, 1.0, supersample * np.sin(half / supersample))
    return np.where(small, 1.0, ratio)
