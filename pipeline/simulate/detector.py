"""Detector and source effects: geometry, mask, photon statistics and read-out.

Pure NumPy kernels (and Numba loops for photon counting and read noise) working on one frame;
the per-shot random numbers come from the caller's ``numpy.random.Generator`` so
that every frame is reproducible from its own seed. Frame arrays have shape (ny, nx); pixel-unit quantities refer to the
profile's (possibly binned, see :meth:`.Profile.at_size`) frame.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from pipeline.simulate.profile import Profile

#: Mean photon count below which :func:`_faint_photon_counts` inverts the cumulative distribution
#: with one uniform number per pixel; brighter pixels use the generator's sampler.
INVERSION_LIMIT = 16.0


def beam_center(profile: Profile) -> tuple[float, float]:
    """Direct-beam position (y, x) in pixel coordinates (pixel centres at integers)."""
    ny, nx = profile.frame_shape
    dy, dx = profile.detector["beam_center_offset"]
    return (ny - 1) / 2 + dy, (nx - 1) / 2 + dx


def static_mask(profile: Profile) -> np.ndarray:
    """Bad pixels known to the experiment (True = bad): central hole, gaps, outside the sensor.

    Parameters
    ----------
    profile : Profile

    Returns
    -------
    ndarray of bool, shape (ny, nx)
        Also includes ``profile.bad_pixels`` (from ``--like``). Hot pixels are not
        listed: real masks miss most of them, and downstream code must cope.
    """
    det = profile.detector
    ny, nx = profile.frame_shape
    cy, cx = beam_center(profile)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    radius = np.hypot(yy - cy, xx - cx)
    bad = radius < det["central_hole_radius"]
    if det["active_radius"] is not None:
        # The round MCP is centred on the frame, not on the beam.
        bad |= np.hypot(yy - (ny - 1) / 2, xx - (nx - 1) / 2) > det["active_radius"]
    for gap in det["gaps"]:
        coordinate = yy - (ny - 1) / 2 if gap["axis"] == "y" else xx - (nx - 1) / 2
        bad |= np.abs(coordinate - gap["position"]) < gap["width"] / 2
    if profile.bad_pixels is not None:
        bad |= profile.bad_pixels
    return bad


def pixel_positions(profile: Profile, *, center_shift=(0.0, 0.0), supersample: int = 1,
                    dtype=np.float64):
    """Detector positions (m) of pixel sub-samples, relative to the direct beam.

    Parameters
    ----------
    profile : Profile
    center_shift : tuple of 2 floats, default=(0, 0)
        Extra shift (y, x) of the beam centre for this shot (pixels).
    supersample : int, default=1
        Sub-samples per pixel along each axis, at the centres of a regular
        ``s x s`` subdivision (pixel-area integration).
    dtype : numpy dtype, default=float64

    Returns
    -------
    y : ndarray of shape (ny * s, 1)
    x : ndarray of shape (1, nx * s)
        m. The positions are separable: ``y`` and ``x`` broadcast to the grid
        ``s`` times finer than the frame, whose element ``(i s + a, j s + b)`` is
        sub-sample ``(a, b)`` of pixel ``(i, j)``.
    """
    ny, nx = profile.frame_shape
    cy, cx = beam_center(profile)
    cy, cx = cy + center_shift[0], cx + center_shift[1]
    p = profile.detector["pixel_size"]
    fine_y = (np.arange(ny * supersample) + 0.5) / supersample - 0.5
    fine_x = (np.arange(nx * supersample) + 0.5) / supersample - 0.5
    return ((fine_y - cy) * p).astype(dtype)[:, None], ((fine_x - cx) * p).astype(dtype)[None, :]


def stray_light(profile: Profile, *, center_shift=(0.0, 0.0)) -> np.ndarray:
    """Mean stray-light photons per pixel (float32): a halo decaying away from the central hole."""
    det = profile.detector
    ny, nx = profile.frame_shape
    cy, cx = beam_center(profile)
    dy = (np.arange(ny, dtype=np.float32) - np.float32(cy + center_shift[0]))[:, None]
    dx = (np.arange(nx, dtype=np.float32) - np.float32(cx + center_shift[1]))[None, :]
    beyond = np.maximum(np.sqrt(dy * dy + dx * dx) - float(det["central_hole_radius"]), 0)
    return float(det["stray_light"]) * np.exp(beyond * (-1 / max(det["stray_light_scale"], 1e-9)))


def hot_pixels(profile: Profile, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed hot pixels of this detector: flat indices and their counts (same in every frame).

    Parameters
    ----------
    profile : Profile
    seed : int
        Beamtime seed: hot pixels belong to the detector, not to a shot.

    Returns
    -------
    index : ndarray of int, shape (n_hot,)
        Flat pixel indices.
    counts : ndarray of float, shape (n_hot,)
        Extra counts per frame, log-uniform in ``detector.hot_pixel_counts``.
    """
    det = profile.detector
    ny, nx = profile.frame_shape
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31 - 1,)))
    n_hot = int(round(det["hot_pixel_fraction"] * ny * nx))
    index = rng.choice(ny * nx, size=n_hot, replace=False) if n_hot else np.zeros(0, int)
    lo, hi = det["hot_pixel_counts"]
    counts = np.exp(rng.uniform(np.log(max(lo, 1e-3)), np.log(max(hi, 1e-3)), n_hot))
    return index, counts


def read_out(
    photons: np.ndarray,
    profile: Profile,
    rng: np.random.Generator,
    *,
    mask: np.ndarray,
    hot: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Turn expected photons per pixel into detector counts.

    Parameters
    ----------
    photons : ndarray of float, shape (ny, nx)
        Expected photons per pixel (signal plus stray light).
    profile : Profile
    rng : numpy.random.Generator
        The shot's generator.
    mask : ndarray of bool, shape (ny, nx)
        Pixels without sensor (hole, gaps, outside the MCP) read dark level and noise only.
    hot : (index, counts)
        From :func:`hot_pixels`.

    Returns
    -------
    ndarray, shape (ny, nx), dtype ``detector.dtype``
        Poisson photon counts times the gain
        (gamma-distributed per photon for an MCP), plus dark level, Gaussian read
        noise and hot pixels, clipped at the saturation level (and at 0 for
        unsigned types). Computed in float32.
    """
    det = profile.detector
    efficiency = float(det["quantum_efficiency"])
    counts = np.empty(photons.shape, dtype=np.float32)
    flat = counts.reshape(-1)
    flat_photons, flat_mask = np.ravel(photons), np.ravel(mask)
    bright = _faint_photon_counts(flat_photons, flat_mask, rng, efficiency, INVERSION_LIMIT, flat)
    if bright.size:
        flat[bright] = rng.poisson(flat_photons[bright] * efficiency)
    gain = float(det["gain"])
    if det["kind"] == "mcp" and det["gain_shape"] > 0:
        # The sum of n gamma(shape, gain/shape) pulse heights is gamma(n * shape, gain/shape).
        lit = np.flatnonzero(flat)
        flat[lit] = rng.gamma(flat[lit] * float(det["gain_shape"]), gain / det["gain_shape"])
        gain = 1.0
    _add_read_noise(flat, rng, gain, float(det["dark_level"]), float(det["read_noise"]))
    on_sensor = ~flat_mask[hot[0]]  # no sensor, no hot pixel (hole, gaps)
    flat[hot[0][on_sensor]] += hot[1][on_sensor].astype(np.float32)
    np.minimum(counts, np.float32(det["saturation"]), out=counts)
    if det["dtype"] == "uint16":
        return np.clip(np.rint(counts, out=counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return counts


# The two Numba loops draw scalars from the shot's generator, which is cheaper than
# numpy's vectorised samplers on a 256^2 frame (normals: 0.23 ms in Numba, 0.58 ms
# for numpy's float32 sampler, measured) and needs no frame-sized temporaries. The rarer
# Poisson (bright pixels) and gamma (MCP gain) draws stay in numpy: with them inside,
# Numba compiled the loops to code about twice as slow (measured).


@numba.njit(cache=True, nogil=True)
def _faint_photon_counts(photons, mask, rng, efficiency, limit, out):  # pragma: no cover (compiled)
    """Detected photons ``Poisson(efficiency * max(photons, 0))`` of the faint pixels, into ``out``.

    Masked pixels detect nothing. For means below ``limit`` the count is the
    smallest ``k`` whose cumulative probability reaches one float32 uniform
    number (probabilities resolved to 2^-24, far below what a frame can show): a
    faint pixel costs a comparison and rarely an exponential. Returns the indices
    of the brighter pixels (a few percent), which the caller draws.
    """
    bright = np.empty(photons.shape[0], dtype=np.int64)
    n_bright = 0
    for i in range(photons.shape[0]):
        lam = 0.0 if mask[i] else max(float(photons[i]), 0.0) * efficiency
        out[i] = 0.0
        if lam >= limit:
            bright[n_bright] = i
            n_bright += 1
        elif lam > 0.0:
            u = rng.random(dtype=np.float32)
            if u > 1.0 - lam:  # else u <= 1 - lam <= exp(-lam) = P(0): no photon, no exponential
                out[i] = _invert_poisson(lam, u)
    return bright[:n_bright]


@numba.njit(cache=True, nogil=True)
def _invert_poisson(lam, u):  # pragma: no cover (compiled)
    """Smallest ``k`` with ``P(X <= k) >= u`` for ``X ~ Poisson(lam)``."""
    term = math.exp(-lam)
    cumulative = term
    k = 0
    # The last terms of a truncated series can round below u = 1 - 2^-24: stop
    # where the remaining probability is below double precision.
    while u > cumulative and term > 1e-17 * cumulative:
        k += 1
        term *= lam / k
        cumulative += term
    return k


@numba.njit(cache=True, nogil=True)
def _add_read_noise(counts, rng, gain, dark, read_noise):  # pragma: no cover (compiled)
    """``counts <- gain * counts + dark + read_noise * N(0, 1)``, one normal number per pixel."""
    for i in range(counts.shape[0]):
        counts[i] = gain * counts[i] + dark + read_noise * rng.standard_normal()
