"""Pure NumPy / SciPy kernels of preprocessing: no Dask here.

Every function works on one frame ``(y, x)`` or one block of frames
``(n, y, x)`` held in memory; :mod:`pipeline.preprocess` maps the ``*_block``
functions over the store's shards with Dask and computes the per-run statistics
(hot pixels, background) that the block kernels take as arguments.

The steps, in the order they are applied to a frame:

1. **Mask** — the file's detector mask, hot pixels found per run by robust
   statistics (:func:`hot_pixels`) and, per frame, saturated pixels
   (``raw >= saturation``). True means bad, as in the store.
2. **Background** — subtract a per-pixel background (the median of non-hit frames,
   or a dark frame the user gives).
3. **Hit finding** — :func:`frame_statistics` measures the photon count and the
   excess of photons in an inner disc over a flat background; :func:`is_hit` flags a
   frame when that excess is significant (Poisson), so that no run-wide threshold
   is needed and runs with only hits or only empty frames are handled alike.
4. **Centre** — :func:`refine_centre` finds the point about which the masked frame is
   most centro-symmetric (Friedel symmetry of small-angle diffraction), to sub-pixel
   accuracy.
5. **Scaling** — ``log1p`` or ``asinh`` of the background-subtracted counts
   (:func:`scale_intensity`).
6. **Crop and resize** — the square inscribed in the disc that fits on the detector
   around the centre, anti-aliased (Gaussian pre-filter) and resampled to
   ``size × size`` with sub-pixel centring (:func:`resample_square`, separable weights
   that touch only the input rows and columns each output pixel needs). Masked pixels
   are set to 0 first and the result divided by the resampled valid fraction
   (normalised convolution), so the filter neither smears garbage from masked pixels
   nor darkens the mask's edges.
7. **Normalisation** — zero mean and unit standard deviation over the valid pixels;
   masked pixels are set to exactly 0, so they carry no signal into a network.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numba
import numpy as np
import scipy.fft
import scipy.ndimage

from pipeline.errors import AirysortError

SCALINGS = ("log", "asinh")


# --------------------------------------------------------------------------------------
# Geometry of the detector
# --------------------------------------------------------------------------------------


def nominal_centre(mask: np.ndarray) -> tuple[float, float]:
    """Beam position guessed from the detector mask: the centroid of the central hole.

    Parameters
    ----------
    mask : ndarray of bool, shape (y, x)
        True where the pixel is bad.

    Returns
    -------
    (cy, cx) : tuple of float
        Centre in pixels (row, column). The centroid of the masked region that does not
        touch the frame border and lies nearest to the frame's middle; the frame's
        middle ``((y-1)/2, (x-1)/2)`` when there is no such region.
    """
    mask = np.asarray(mask, bool)
    ny, nx = mask.shape
    middle = np.array([(ny - 1) / 2, (nx - 1) / 2])
    labels, n_regions = scipy.ndimage.label(mask)
    if n_regions == 0:
        return float(middle[0]), float(middle[1])
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inner = [i for i in range(1, n_regions + 1) if i not in set(border.tolist())]
    if not inner:
        return float(middle[0]), float(middle[1])
    centroids = np.array(scipy.ndimage.center_of_mass(mask, labels, inner))
    nearest = centroids[np.argmin(np.hypot(*(centroids - middle).T))]
    return float(nearest[0]), float(nearest[1])


def disc_radius(shape: tuple[int, int], centre: tuple[float, float]) -> float:
    """Radius in pixels of the largest disc around ``centre`` that lies on the frame."""
    ny, nx = shape
    cy, cx = centre
    return float(min(cy, cx, ny - 1 - cy, nx - 1 - cx))


def hole_radius(mask: np.ndarray, centre: tuple[float, float]) -> float:
    """Radius in pixels of the masked central hole around ``centre`` (0 if none).

    The largest radius ``r`` such that at least half of the pixels at integer radius
    ``r`` (rounded) are masked, scanning outwards from the centre.
    """
    mask = np.asarray(mask, bool)
    radius = _radius(mask.shape, centre).round().astype(np.int64)
    total = np.bincount(radius.ravel())
    masked = np.bincount(radius.ravel(), weights=mask.ravel().astype(float), minlength=total.size)
    populated = total > 0
    mostly_valid = populated & (masked < 0.5 * total)
    first_valid = np.flatnonzero(mostly_valid)
    if first_valid.size == 0:
        return float(total.size)
    innermost = np.flatnonzero(populated)[0]
    return 0.0 if first_valid[0] == innermost else float(first_valid[0])


def _radius(shape: tuple[int, int], centre: tuple[float, float]) -> np.ndarray:
    yy, xx = np.indices(shape, dtype=np.float32)
    return np.hypot(yy - np.float32(centre[0]), xx - np.float32(centre[1]))


# --------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------


def hot_pixels(
    mean_frame: np.ndarray,
    *,
    mask: np.ndarray,
    n_frames: int,
    n_sigma: float = 10.0,
    size: int = 5,
    min_excess: float = 1.0,
    frame_std: np.ndarray | None = None,
) -> np.ndarray:
    """Pixels much brighter on average than their neighbours: hot pixels.

    Diffraction averaged over many shots varies smoothly from pixel to pixel, while a
    hot pixel stands out alone. With the residual ``e = mean - median_filter(mean)`` over
    ``size × size`` neighbourhoods, a pixel is hot when ``e`` exceeds ``n_sigma`` robust
    standard deviations of the residuals *around it* (1.4826 × the local median of
    ``|e|`` over ``(2 size + 1)²`` pixels, but at least the shot noise of a mean of
    ``n_frames`` Poisson counts, ``sqrt((median + 1) / n_frames)``) and ``min_excess``
    counts. The local scale keeps steep but smooth regions (next to the beam stop,
    bright rings) from being flagged; one hot pixel does not move its neighbourhood's
    median; the shot-noise floor keeps a few lucky photons in a small sample from
    counting. With ``frame_std``, the excess must also exceed ``n_sigma`` standard
    errors of the mean, ``frame_std / sqrt(n_frames)``: a hot pixel is bright in every
    frame, while a speckle that is bright in a few shots only (next to the beam stop,
    in a small sample) varies from frame to frame far more than it stands out.

    Parameters
    ----------
    mean_frame : ndarray of float, shape (y, x)
        Per-pixel mean over a sample of the run's frames, in counts.
    mask : ndarray of bool, shape (y, x)
        Already-known bad pixels (excluded from the statistics, never reported hot).
    n_frames : int
        Number of frames averaged into ``mean_frame``.
    n_sigma : float, default=10.0
        Threshold in robust standard deviations.
    size : int, default=5
        Side in pixels of the median-filter neighbourhood.
    min_excess : float, default=1.0
        Smallest excess over the neighbourhood, counts, that can make a pixel hot.
    frame_std : ndarray of float, shape (y, x), optional
        Per-pixel standard deviation over the same frames, in counts
        (:func:`square_sums` gives the sums it is computed from).

    Returns
    -------
    ndarray of bool, shape (y, x)
        True at hot pixels.
    """
    if n_sigma <= 0:
        raise AirysortError(f"hot-pixel threshold n_sigma={n_sigma!r} must be positive")
    mean_frame = np.asarray(mean_frame, np.float64)
    mask = np.asarray(mask, bool)
    if mask.all():
        return np.zeros_like(mask)
    # Masked pixels (the central hole, gaps) take the value of the nearest valid pixel,
    # so the filters see neither an artificial edge nor a patch of zero residuals.
    nearest = scipy.ndimage.distance_transform_edt(mask, return_distances=False, return_indices=True)
    filled = mean_frame[tuple(nearest)]
    smooth = scipy.ndimage.median_filter(filled, size=size, mode="nearest")
    residual = (filled - smooth)[tuple(nearest)]
    local_sigma = 1.4826 * scipy.ndimage.median_filter(np.abs(residual), size=2 * size + 1, mode="nearest")
    shot_noise = np.sqrt((np.maximum(smooth, 0.0) + 1.0) / max(int(n_frames), 1))
    local_sigma = np.maximum(local_sigma, shot_noise)
    if frame_std is not None:
        local_sigma = np.maximum(local_sigma, np.asarray(frame_std, np.float64) / np.sqrt(max(int(n_frames), 1)))
    return (residual > n_sigma * local_sigma) & (residual > min_excess) & ~mask


def square_sums(frames: np.ndarray, *, step: int = 16) -> np.ndarray:
    """Per-pixel sum of squared counts over a block of frames, shape (1, y, x), float64.

    Converted ``step`` frames at a time, so no float64 copy of the whole block is made.
    """
    out = np.zeros(frames.shape[1:], np.float64)
    for start in range(0, frames.shape[0], step):
        part = np.asarray(frames[start:start + step], np.float64)
        out += np.einsum("ijk,ijk->jk", part, part)
    return out[None]


def saturated(frames: np.ndarray, level: float | None) -> np.ndarray:
    """True where a pixel reached the detector's saturation ``level`` (None: never)."""
    if level is None:
        return np.zeros(frames.shape, bool)
    return frames >= level


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """At most ``k`` distinct indices of ``range(n)`` spread evenly, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))


#: Robust standard deviation of a normal distribution from the median of its absolute
#: values: median(|N(0, σ)|) = 0.67449 σ.
_HALF_NORMAL_MEDIAN = 0.6744897501960817

#: Below this share of valid values under the zero level, read noise is not estimated:
#: the values then say nothing about the noise of a zero-photon pixel (frames offset by a
#: dark level, bright frames, detectors that clip at zero).
MIN_NEGATIVE_SHARE = 0.01


def negative_spread_block(
    frames: np.ndarray, *, valid: np.ndarray, dark: np.ndarray | None = None, max_frames: int = 16
) -> np.ndarray:
    """What one block of calibrated frames says about the detector's read noise.

    In frames of photons with Gaussian read noise σ, a pixel that saw no photon holds
    ``N(0, σ)``: half of those pixels are negative, and ``|x|`` over the negative values
    has median 0.67449 σ. A pixel that saw one photon or more goes below zero with
    probability ``Φ(-1/σ)`` only (3·10⁻⁴ at σ = 0.3 photons), so the negative values
    come from the zero-photon pixels whatever the signal, and hot pixels cannot reach
    them.

    Parameters
    ----------
    frames : ndarray, shape (n, y, x)
        Calibrated detector values (photons).
    valid : ndarray of bool, shape (y, x)
        Pixels to use (not masked, not hot).
    dark : ndarray of float, shape (y, x), optional
        Zero level, subtracted first.
    max_frames : int, default=16
        At most this many frames, evenly spaced through the block, are used.

    Returns
    -------
    ndarray of float64, shape (1, 3)
        Median of ``|x|`` over the negative values (NaN when there are none), the number
        of negative values and the number of values looked at.
    """
    values = np.asarray(frames[evenly_spaced(frames.shape[0], max_frames)], np.float32)[:, np.asarray(valid, bool)]
    if dark is not None:
        values -= np.asarray(dark, np.float32)[np.asarray(valid, bool)]
    negative = values[values < 0]
    spread = float(np.median(-negative)) if negative.size else np.nan
    return np.array([[spread, negative.size, values.size]], np.float64)


def read_noise_from_spreads(spreads: np.ndarray) -> float:
    """Read noise, photons rms, from the rows of :func:`negative_spread_block` (one per block).

    The median over the blocks of each block's median ``|x|`` of negative values, divided
    by 0.67449; 0 when fewer than :data:`MIN_NEGATIVE_SHARE` of all values are negative.
    """
    spreads = np.atleast_2d(np.asarray(spreads, np.float64))
    n_negative, n_values = spreads[:, 1].sum(), spreads[:, 2].sum()
    if n_values == 0 or n_negative < MIN_NEGATIVE_SHARE * n_values:
        return 0.0
    used = spreads[:, 1] > 0
    return float(np.median(spreads[used, 0]) / _HALF_NORMAL_MEDIAN)


# --------------------------------------------------------------------------------------
# Hit finding
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HitRegions:
    """Pixel regions used by hit finding: an inner disc and the annulus outside it.

    ``inner`` and ``outer`` are boolean (y, x) maps of valid pixels (not masked);
    ``indicator`` (derived) holds them as the two rows of a float32 ``(2, y x)``
    matrix (for the rare frames with saturated pixels), ``flat_inner`` and
    ``flat_outer`` as flat uint8 weights for the exact integer sums of :func:`_region_sums`.
    """

    inner: np.ndarray
    outer: np.ndarray
    indicator: np.ndarray = field(init=False, repr=False)
    flat_inner: np.ndarray = field(init=False, repr=False)
    flat_outer: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        indicator = np.stack([np.ravel(self.inner), np.ravel(self.outer)]).astype(np.float32)
        object.__setattr__(self, "indicator", indicator)
        object.__setattr__(self, "flat_inner", np.ravel(self.inner).astype(np.uint8))
        object.__setattr__(self, "flat_outer", np.ravel(self.outer).astype(np.uint8))

    @classmethod
    def around(
        cls, mask: np.ndarray, centre: tuple[float, float], *, inner_fraction: float = 0.35
    ) -> HitRegions:
        """Inner disc of ``inner_fraction`` × the on-detector disc radius, outer annulus to
        that radius, both without masked pixels."""
        radius = _radius(mask.shape, centre)
        r_max = disc_radius(mask.shape, centre)
        valid = ~np.asarray(mask, bool)
        inner = valid & (radius < inner_fraction * r_max)
        outer = valid & (radius >= inner_fraction * r_max) & (radius <= r_max)
        if not inner.any() or not outer.any():
            raise AirysortError(
                f"hit finding needs valid pixels both within and beyond {inner_fraction:.2f} × "
                f"the detector radius {r_max:.1f} px around the centre {centre!r}; check the mask"
            )
        return cls(inner=inner, outer=outer)


#: Frames processed together inside the block kernels: large enough that per-call
#: overheads vanish, small enough that float32 temporaries stay a few MB per frame array.
SUB_BLOCK = 8


def sub_blocks(n: int, step: int = SUB_BLOCK) -> list[slice]:
    """Consecutive slices of at most ``step`` frames covering ``range(n)``."""
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def frame_statistics_block(
    frames: np.ndarray,
    *,
    regions: HitRegions,
    dark: np.ndarray | None = None,
    saturation: float | None = None,
    read_noise: float = 0.0,
) -> np.ndarray:
    """Per-frame photon statistics for hit finding.

    Parameters
    ----------
    frames : ndarray, shape (n, y, x)
        Detector counts (photons).
    regions : HitRegions
        Inner disc and outer annulus of valid pixels.
    dark : ndarray of float, shape (y, x), optional
        Subtracted before counting.
    saturation : float, optional
        Pixels at or above this count are left out.
    read_noise : float, default=0.0
        Read noise per pixel, photons rms (calibrated detectors): added to the shot noise
        of every pixel summed. Without it, an empty frame's read noise summed over the
        inner disc looks like an excess (10 % of empty 1024² frames at 0.15 photons rms).

    Returns
    -------
    ndarray of float64, shape (n, 3)
        Columns: photon count over all valid pixels (inner + outer), the excess of photons
        in the inner disc over a flat background estimated from the outer annulus, and
        the Poisson standard deviation of that excess for an empty frame (``dark`` plus
        a flat level).
    """
    frames = np.asarray(frames)
    n = frames.shape[0]
    indicator = regions.indicator.T  # (y x, 2), a transposed view: BLAS reads rows
    flat = frames.reshape(n, indicator.shape[0])
    # One pass over the counts gives both region sums and each frame's largest count.
    raw_sums, largest = _region_sums_block(flat, regions)
    sizes = np.broadcast_to(indicator.sum(axis=0, dtype=np.float64), (n, 2)).copy()
    dark_weights = None if dark is None else np.asarray(dark, np.float64).reshape(-1, 1) * indicator
    dark_sums = np.zeros((n, 2)) if dark is None else np.broadcast_to(dark_weights.sum(axis=0), (n, 2)).copy()
    clipped = np.zeros(0, np.intp) if saturation is None else np.flatnonzero(largest >= saturation)
    if clipped.size:  # rare: leave the saturated pixels (and their dark) out
        keep = flat[clipped] < saturation
        raw_sums[clipped] = np.where(keep, flat[clipped], 0).astype(np.float64) @ indicator
        sizes[clipped] = keep.astype(np.float32) @ indicator
        if dark_weights is not None:
            dark_sums[clipped] = keep.astype(np.float64) @ dark_weights
    sums = raw_sums - dark_sums
    (inner, outer), (n_inner, n_outer) = sums.T, sizes.T
    n_outer = np.maximum(n_outer, 1)
    # Shot noise follows the counts as measured, before any dark is subtracted: under the
    # null (an empty frame: the dark plus a flat level), the inner disc holds its dark sum
    # plus the outer annulus's flat excess spread over it. A beam-on dark is not flat (stray
    # light peaks around the hole), so the inner disc's own dark counts must be in it.
    (dark_inner, dark_outer), raw_outer = dark_sums.T, np.maximum(raw_sums[:, 1], 0.0)
    null_inner = np.maximum(dark_inner + n_inner * (raw_sums[:, 1] - dark_outer) / n_outer, 0.0)
    reads = read_noise**2 * n_inner * (1.0 + n_inner / n_outer)  # inner sum, and the scaled outer one
    sigma = np.sqrt(null_inner + (n_inner / n_outer) ** 2 * raw_outer + reads + 1.0)
    expected = n_inner * outer / n_outer
    return np.stack([inner + outer, inner - expected, sigma], axis=1)


def _region_sums_block(flat: np.ndarray, regions: HitRegions) -> tuple[np.ndarray, np.ndarray]:
    """Sums of each frame of ``flat`` (n, pixels) over the inner disc and the outer annulus,
    float64 (n, 2), and each frame's largest value (n,).

    Integer counts of up to 32 bits are summed exactly in one compiled pass over the
    frame (:func:`_region_sums`); other data (calibrated float photons) by float32 matrix
    products, a few frames at a time.
    """
    if flat.dtype.kind in "iub" and flat.dtype.itemsize <= 4:
        return _region_sums(flat, regions.flat_inner, regions.flat_outer)
    sums, largest = np.empty((flat.shape[0], 2)), np.empty(flat.shape[0])
    for part in sub_blocks(flat.shape[0]):
        block = flat[part].astype(np.float32, copy=False)
        sums[part] = block @ regions.indicator.T
        largest[part] = block.max(axis=1)
    return sums, largest


@numba.njit(cache=True, nogil=True)
def _region_sums(flat, inner, outer):  # pragma: no cover - compiled
    """Per frame of integer counts ``flat`` (n, pixels): the exact sums over the pixels
    weighted by ``inner`` and by ``outer`` (0/1), as float64 (n, 2), and the largest
    count (n,)."""
    n = flat.shape[0]
    sums = np.zeros((n, 2))
    largest = np.empty(n)
    for i in range(n):
        frame = flat[i]
        a = np.int64(0)
        b = np.int64(0)
        top = frame[0]
        for p in range(frame.size):
            value = frame[p]
            a += value * inner[p]
            b += value * outer[p]
            top = max(top, value)
        sums[i, 0] = a
        sums[i, 1] = b
        largest[i] = top
    return sums, largest


def is_hit(
    statistics: np.ndarray, *, n_sigma: float = 5.0, min_photons: float = 50.0, threshold: float = 0.0
) -> np.ndarray:
    """Flag hits: the inner disc holds significantly more photons than a flat background.

    A frame is a hit when the inner excess (column 1 of :func:`frame_statistics_block`)
    exceeds ``n_sigma`` Poisson standard deviations, ``min_photons`` and ``threshold``
    (a run-level level from :func:`excess_threshold`, 0 when the run gives none). The
    first two are per frame, so a run of only hits or only empty frames is classified
    frame by frame like any other.

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    statistics = np.asarray(statistics)
    excess, sigma = statistics[:, 1], statistics[:, 2]
    return (excess > n_sigma * sigma) & (excess > min_photons) & (excess > threshold)


def excess_threshold(
    statistics: np.ndarray,
    *,
    n_sigma: float = 5.0,
    min_photons: float = 50.0,
    min_gap: float = 0.5,
    max_spread: float = 0.5,
    min_frames: int = 16,
) -> float:
    """Run-level excess threshold separating empty frames lit by stray light from hits.

    Beam-induced stray light (a halo around the beam stop) gives every frame, empty or
    not, an inner-disc excess that the per-frame Poisson test of :func:`is_hit` flags.
    Empty frames then form a low, tight group in ``log10(excess)`` (their excess only
    follows the pulse energy), well below the hits, which spread over decades with
    droplet size. Among the frames that pass the per-frame test, the widest gap between
    consecutive sorted ``log10(excess)`` values is taken as that separation when it is
    wider than ``min_gap`` decades and than twice the spread of the (at least two)
    values below it, which must stay within ``max_spread`` decades; the threshold is
    then the gap's middle (geometric mean of its ends). Otherwise (or with fewer than
    ``min_frames`` candidates) there is no separate empty group and the threshold is 0.
    This is a heuristic: a run of hits whose faintest few are tightly grouped and
    isolated by half a decade would lose them as "empty"; a ``--dark`` taken with the
    beam on but no sample (which then holds the stray light) avoids it.

    Parameters
    ----------
    statistics : ndarray, shape (n, 3)
        From :func:`frame_statistics_block`, for a sample of the run.
    n_sigma, min_photons : float
        The per-frame test of :func:`is_hit`.
    min_gap : float, default=0.5
        Narrowest gap, decades, taken as a separation.
    max_spread : float, default=0.5
        Widest spread, decades, of the empty group.
    min_frames : int, default=16
        Fewest candidate frames to look for a gap in.

    Returns
    -------
    float
        Photons; 0.0 when the sample shows no separate empty group.
    """
    candidates = is_hit(statistics, n_sigma=n_sigma, min_photons=min_photons)
    values = np.sort(np.log10(np.asarray(statistics)[candidates, 1]))
    # A few hits spread over decades show wide gaps by chance: judge only larger samples.
    if values.size < min_frames:
        return 0.0
    gaps = np.diff(values)
    widest = int(np.argmax(gaps))
    gap = gaps[widest]
    below = values[: widest + 1]
    spread = below[-1] - below[0]
    # One faint frame alone is as likely a faint hit as an empty frame: need a group,
    # and a tight one (stray light only follows the pulse energy).
    if gap < min_gap or below.size < 2 or spread > max_spread or gap <= 2 * spread:
        return 0.0
    return float(10 ** (0.5 * (values[widest] + values[widest + 1])))


@dataclass(frozen=True)
class HitSettings:
    """Settings of hit finding, fixed per run.

    Attributes
    ----------
    regions : HitRegions
        Inner disc and outer annulus of valid pixels.
    dark : ndarray of float, shape (y, x), or None
        Subtracted before counting (only a dark the user gave; the median background
        is itself computed from hit finding).
    saturation : float or None
        Counts at or above which a pixel is left out.
    n_sigma, min_photons, threshold : float
        Thresholds of :func:`is_hit`.
    read_noise : float
        Detector read noise, photons rms per pixel (:func:`frame_statistics_block`).
    """

    regions: HitRegions
    dark: np.ndarray | None = None
    saturation: float | None = None
    n_sigma: float = 5.0
    min_photons: float = 50.0
    threshold: float = 0.0
    read_noise: float = 0.0


def find_hits_block(frames: np.ndarray, *, hit_settings: HitSettings) -> tuple[np.ndarray, np.ndarray]:
    """Hit statistics and hit flags of a block of frames.

    Returns
    -------
    statistics : ndarray of float64, shape (n, 3)
        See :func:`frame_statistics_block`.
    hits : ndarray of bool, shape (n,)
    """
    statistics = frame_statistics_block(
        frames, regions=hit_settings.regions, dark=hit_settings.dark, saturation=hit_settings.saturation,
        read_noise=hit_settings.read_noise,
    )
    hits = is_hit(
        statistics, n_sigma=hit_settings.n_sigma, min_photons=hit_settings.min_photons, threshold=hit_settings.threshold
    )
    return statistics, hits


def empty_median_block(frames: np.ndarray, *, hit_settings: HitSettings) -> np.ndarray:
    """Per-pixel median of the non-hit frames of a block, after finding the hits.

    Returns
    -------
    ndarray of float32, shape (1, y, x)
        NaN everywhere when the block holds no non-hit frame.
    """
    _, hits = find_hits_block(frames, hit_settings=hit_settings)
    return background_median_block(frames, hits)


def background_median_block(frames: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """Per-pixel median of the non-hit frames of one block.

    Returns
    -------
    ndarray of float32, shape (1, y, x)
        NaN everywhere when the block holds no non-hit frame.
    """
    empty = np.asarray(frames)[~np.asarray(hits, bool)]
    if empty.shape[0] == 0:
        return np.full((1, *frames.shape[1:]), np.nan, np.float32)
    return np.median(empty, axis=0).astype(np.float32)[None]


# --------------------------------------------------------------------------------------
# Centre refinement
# --------------------------------------------------------------------------------------


def refine_centre(
    frame: np.ndarray,
    bad: np.ndarray,
    *,
    guess: tuple[float, float],
    search_radius: float = 8.0,
    window: int = 64,
) -> tuple[float, float]:
    """Centre of centro-symmetry of a masked frame, to sub-pixel accuracy.

    Small-angle diffraction obeys Friedel's law, ``I(c + d) = I(c - d)``. For every
    candidate centre ``c = s / 2`` on a half-pixel grid, the mean squared difference
    between the frame and its point reflection through ``c``, over pixel pairs that are
    both valid,

    ``D(s) = Σ w(r) w(s-r) (f(r) - f(s-r))² / Σ w(r) w(s-r)``
    ``     = 2 [(f² ⋆ w)(s) - (f ⋆ f)(s)] / (w ⋆ w)(s)``,

    is a sum of linear convolutions (⋆), computed with FFTs in a square window of
    half-side ``window`` around the guess; ``f = w · log1p(frame)`` compresses the
    dynamic range so that outer rings count too. The minimum of ``D`` within
    ``search_radius`` of the guess is refined with a parabola through its neighbours
    along each axis. :func:`refine_centres` does the same for a block of frames.

    Parameters
    ----------
    frame : ndarray, shape (y, x)
        Background-subtracted counts.
    bad : ndarray of bool, shape (y, x)
        True at masked pixels.
    guess : (float, float)
        Starting centre (row, column) in pixels.
    search_radius : float, default=8.0
        Largest offset from ``guess`` considered, in pixels.
    window : int, default=64
        Half-side in pixels of the square window used.

    Returns
    -------
    (cy, cx) : tuple of float
        Refined centre in pixels; ``guess`` when too few valid pixel pairs exist.
    """
    centres = refine_centres(
        np.asarray(frame)[None], np.asarray(bad, bool), guess=guess, search_radius=search_radius, window=window
    )
    return float(centres[0, 0]), float(centres[0, 1])


def refine_centres(
    frames: np.ndarray,
    bad: np.ndarray,
    *,
    guess: tuple[float, float],
    search_radius: float = 8.0,
    window: int = 64,
    which: np.ndarray | None = None,
    log_scaled: bool = False,
) -> np.ndarray:
    """:func:`refine_centre` for a block of frames, with batched FFTs.

    Parameters
    ----------
    frames : ndarray, shape (n, y, x)
        Background-subtracted counts.
    bad : ndarray of bool, shape (y, x) (shared by all frames) or (n, y, x)
        True at masked pixels.
    guess, search_radius, window
        As in :func:`refine_centre`, the guess shared by all frames.
    which : ndarray of bool, shape (n,), optional
        Refine only these frames (``frames[which]`` would copy them whole).
    log_scaled : bool, default=False
        The frames are already ``log(1 + max(counts, 0))`` (the log scaling's output at
        the valid pixels), which spares computing that logarithm again.

    Returns
    -------
    ndarray of float64, shape (n, 2), or (which.sum(), 2)
        Refined centres (row, column), pixels; the guess where too few valid pixel pairs
        exist.
    """
    frames = np.asarray(frames)
    _, ny, nx = frames.shape
    chosen = np.arange(frames.shape[0]) if which is None else np.flatnonzero(np.asarray(which, bool))
    centres = np.tile(np.asarray(guess, np.float64), (chosen.size, 1))
    gy, gx = int(round(guess[0])), int(round(guess[1]))
    half = int(min(window, gy, gx, ny - 1 - gy, nx - 1 - gx))
    if half < 4 or chosen.size == 0:
        return centres
    rows, cols = slice(gy - half, gy + half + 1), slice(gx - half, gx + half + 1)
    bad = np.asarray(bad, bool)
    # One validity window for all frames when they share the mask, else one per frame.
    valid = ~(bad[rows, cols][None] if bad.ndim == 2 else bad[:, rows, cols][chosen])
    side = 2 * half + 1
    # s = 2 (c - window origin); the guess sits at s = 2 * half = side - 1.
    reach = int(np.ceil(2 * search_radius))
    lo, hi = max(side - 1 - reach, 1), min(side - 1 + reach, 2 * side - 3)
    # Only lags lo..hi are needed: a circular correlation of length n >= hi + 1 and
    # > 2 side - 2 - lo equals the linear one there (no wrapped-around terms), about
    # half the padding a full linear correlation needs.
    n = scipy.fft.next_fast_len(max(hi + 1, 2 * side - 1 - lo), real=True)
    # float32 FFTs (4x faster than float64 here). D is unchanged when f shifts by a
    # constant on the valid pixels, so f is taken relative to its valid mean: the two
    # convolutions then stay small and their difference loses no float32 digits.
    terms = np.zeros((2, chosen.size, side, n), np.float32)  # rows zero-padded to n for the FFT
    weight = valid.astype(np.float32)
    if log_scaled:  # the windows are read in place
        _centring_terms(frames, chosen, rows.start, cols.start, weight, terms)
    else:
        logs = log1p_of_positive_part(frames[:, rows, cols][chosen])
        _centring_terms(logs, np.arange(chosen.size), 0, 0, weight, terms)
    # The 2-D transforms axis by axis: the zero padding is implicit in each 1-D transform,
    # and the inverse is taken only at rows lo..hi.
    spectra = scipy.fft.fft(scipy.fft.rfft(terms, axis=-1), n, axis=-2)
    spectrum_w, overlap = _mask_terms_block(valid, n)
    product = spectra[0] * spectra[0]
    product -= spectra[1] * spectrum_w
    product *= -2
    rows_at_lags = scipy.fft.ifft(product, axis=-2)[:, lo : hi + 1]
    d = scipy.fft.irfft(rows_at_lags, n, axis=-1)[:, :, lo : hi + 1]
    p = overlap[:, lo : hi + 1, lo : hi + 1]
    middle = overlap[:, side - 1, side - 1]
    enough = p > 0.25 * middle[:, None, None]
    score = np.where(enough, d / np.maximum(p, 1e-12), np.inf)
    usable = enough.any(axis=(1, 2)) & (middle >= 16)
    iy, ix = np.unravel_index(np.argmin(score.reshape(score.shape[0], -1), axis=1), score.shape[1:])
    sy = iy + _parabola_offsets(score.transpose(0, 2, 1), ix, iy)
    sx = ix + _parabola_offsets(score, iy, ix)
    refined = np.stack([gy - half + (lo + sy) / 2, gx - half + (lo + sx) / 2], axis=1)
    return np.where(np.broadcast_to(usable, chosen.shape)[:, None], refined, centres)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _centring_terms(logs, index, row0, col0, valid, out):  # pragma: no cover - compiled
    """``out[0, i] = f``, ``out[1, i] = f²`` (the first ``side`` columns of each row) with ``f``
    the log window of frame ``index[i]`` (rows and columns from ``row0``, ``col0``; ``valid``'s
    shape) less its mean over the valid pixels, and 0 at the others; ``valid`` float32 1/0
    (k, side, side), k = 1 (shared) or one per frame. Branch-free, so the loops vectorise."""
    side = valid.shape[1]
    for i in range(index.size):
        window = logs[index[i], row0 : row0 + side, col0 : col0 + side]
        weight = valid[0] if valid.shape[0] == 1 else valid[i]
        total = 0.0
        count = 0.0
        for r in range(side):
            for c in range(side):
                total += window[r, c] * weight[r, c]
                count += weight[r, c]
        mean = np.float32(total / max(count, 1.0))
        for r in range(side):
            for c in range(side):
                value = (window[r, c] - mean) * weight[r, c]
                out[0, i, r, c] = value
                out[1, i, r, c] = value * value


def _mask_terms_block(valid: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """FFT of each validity window and its autoconvolution, ``(k, ...)`` as ``valid``.

    Frames share the run mask unless a pixel saturates, so the terms are computed once
    per distinct window (and cached across blocks).
    """
    keys = [np.packbits(v).tobytes() for v in valid]
    terms = {key: _mask_terms(key, valid.shape[1], n) for key in dict.fromkeys(keys)}
    if len(keys) == 1:
        return terms[keys[0]][0][None], terms[keys[0]][1][None]
    spectrum_w = np.stack([terms[key][0] for key in keys])
    overlap = np.stack([terms[key][1] for key in keys])
    return spectrum_w, overlap


@functools.lru_cache(maxsize=4)
def _mask_terms(packed_valid: bytes, side: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """FFT of a window's validity and its autoconvolution (read-only, cached)."""
    valid = np.unpackbits(np.frombuffer(packed_valid, np.uint8), count=side * side).reshape(side, side)
    spectrum_w = scipy.fft.rfft2(valid.astype(np.float64), (n, n))
    # Pair counts, computed in float64 and rounded: exact integers, also in float32.
    overlap = np.round(scipy.fft.irfft2(spectrum_w * spectrum_w, (n, n))).astype(np.float32)
    spectrum_w = spectrum_w.astype(np.complex64)  # for the float32 FFTs of the frames
    spectrum_w.flags.writeable = False
    overlap.flags.writeable = False
    return spectrum_w, overlap


def _parabola_offsets(score: np.ndarray, at: np.ndarray, along: np.ndarray) -> np.ndarray:
    """Per frame, the offset in [-0.5, 0.5] of the vertex of the parabola through
    ``score[i, at[i], along[i] - 1 : along[i] + 2]``; 0 at the edge, where a sample is not
    finite, or where the three do not curve upwards."""
    frames = np.arange(score.shape[0])
    inside = (along > 0) & (along < score.shape[2] - 1)
    left, middle, right = (score[frames, at, np.clip(along + step, 0, score.shape[2] - 1)].astype(np.float64)
                           for step in (-1, 0, 1))
    with np.errstate(invalid="ignore", divide="ignore"):  # inf and nan rows are left out below
        curvature = left - 2 * middle + right
        offset = np.clip(0.5 * (left - right) / curvature, -0.5, 0.5)
    fit = inside & np.isfinite(left) & np.isfinite(middle) & np.isfinite(right) & (curvature > 0)
    return np.where(fit, offset, 0.0)


# --------------------------------------------------------------------------------------
# Scaling, cropping and resizing, normalising
# --------------------------------------------------------------------------------------


def log1p_of_positive_part(values: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``log(1 + max(values, 0))`` in float32 (``out`` may be ``values`` itself).

    NumPy's float32 ``log1p``, and its ``log`` too on CPUs without AVX-512, run one
    element at a time: 2.4 and 0.34 ms for a 360² frame on this project's CPU, the
    largest single cost of preprocessing. :func:`_log_in_place` computes the same in
    SIMD loops (0.1 ms). Rounding ``1 + x`` to float32 costs an absolute error below
    6e-8 (half a float32 ulp of 1), far under a single photon's log step.
    """
    if out is None:
        out = np.empty(np.shape(values), np.float32)
    np.maximum(values, np.float32(0), out=out)
    out += np.float32(1)
    if out.flags.c_contiguous:
        _log_in_place(out.reshape(-1), np.empty(out.size, np.float32))
        return out
    return np.log(out, out=out)


# log(y) = e ln 2 + log(m) with y = 2**e m, m in [sqrt(1/2), sqrt(2)): ln 2 split so that
# e * _LN2_HIGH is exact (Cody and Waite), and log(m) = 2 atanh(t), t = (m - 1) / (m + 1),
# |t| <= 0.172, whose series to t**9 is exact to float32 rounding.
_LN2_HIGH = np.float32(0.693145751953125)
_LN2_LOW = np.float32(1.428606765330187e-06)
_SQRT_HALF_BITS = np.int32(0x3F3504F3)  # float32 bit pattern of sqrt(1/2)
_ATANH_SERIES = tuple(np.float32(1 / k) for k in (3, 5, 7, 9))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _log_in_place(values, exponents):  # pragma: no cover - compiled
    """``values[:] = log(values)`` for a contiguous float32 vector of finite values >= 1,
    within 2 ulp (as NumPy's float32 ``log``); ``exponents`` is float32 scratch of the same length.

    The exponent and mantissa come from the bit pattern, so both loops are branch-free
    and vectorise (``error_model="numpy"``: no zero-division checks in the loop).
    """
    bits = values.view(np.int32)
    for i in range(values.size):
        exponent = (bits[i] - _SQRT_HALF_BITS) >> 23
        bits[i] -= exponent << 23
        exponents[i] = np.float32(exponent)
    c3, c5, c7, c9 = _ATANH_SERIES
    for i in range(values.size):
        mantissa = values[i]
        t = (mantissa - np.float32(1)) / (mantissa + np.float32(1))
        t2 = t * t
        atanh = t + t * (t2 * (c3 + t2 * (c5 + t2 * (c7 + t2 * c9))))
        exponent = exponents[i]
        values[i] = exponent * _LN2_HIGH + (atanh + atanh + exponent * _LN2_LOW)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _log_scaled_region(frames, row0, col0, background, weight, out):  # pragma: no cover - compiled
    """``out[f] = log(1 + max(frames[f, region] - background, 0)) * weight`` in one pass
    over the raw frames, the region starting at (``row0``, ``col0``) with ``background``'s
    shape; returns each frame's largest raw value there (for the saturation check).

    Fuses what took five NumPy passes (subtract, clip, add, log, multiply) and a
    reduction; the frames may be of any real dtype.
    """
    n = frames.shape[0]
    ny, nx = background.shape
    exponents = np.empty(nx, np.float32)
    peaks = np.empty(n, frames.dtype)
    for f in range(n):
        peak = frames[f, row0, col0]
        for r in range(ny):
            source = frames[f, row0 + r, col0 : col0 + nx]
            row = out[f, r]
            for x in range(nx):
                value = source[x]
                peak = max(peak, value)
                row[x] = np.float32(1) + max(np.float32(value) - background[r, x], np.float32(0))
            _log_in_place(row, exponents)
            for x in range(nx):
                row[x] *= weight[r, x]
        peaks[f] = peak
    return peaks


def scale_intensity(
    frame: np.ndarray, *, scaling: str = "log", asinh_scale: float = 1.0, out: np.ndarray | None = None
) -> np.ndarray:
    """Compress the dynamic range of background-subtracted counts.

    ``log``: ``log(1 + max(I, 0))``; ``asinh``: ``asinh(I / asinh_scale)``, linear for
    ``|I| ≪ asinh_scale`` (so noise around zero stays symmetric) and logarithmic above.
    The result is float32; ``out`` (float32, ``frame``'s shape, possibly ``frame``
    itself) receives it in place, which spares allocating frame-sized arrays.
    """
    if scaling not in SCALINGS:
        raise AirysortError(f"unknown scaling {scaling!r}; use one of {SCALINGS}")
    if scaling == "asinh" and asinh_scale <= 0:
        raise AirysortError(f"asinh_scale={asinh_scale!r} must be positive (counts)")
    if out is None:
        out = np.empty(np.shape(frame), np.float32)
    if scaling == "log":
        return log1p_of_positive_part(frame, out=out)
    np.divide(frame, np.float32(asinh_scale), out=out)
    return np.arcsinh(out, out=out)


def gaussian_taps(sigma: float, *, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1-D Gaussian of width ``sigma`` pixels, as ``scipy.ndimage.gaussian_filter``
    uses it (radius ``int(truncate sigma + 0.5)``); ``[1.0]`` for ``sigma = 0``."""
    if sigma <= 0:
        return np.ones(1)
    radius = int(truncate * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


def antialias_sigma(*, half_side: float, size: int) -> float:
    """Gaussian pre-filter width, input pixels, for shrinking ``2 half_side`` to ``size``.

    ``(scale - 1) / 2`` with ``scale`` input pixels per output pixel, the convention of
    ``skimage.transform.resize``; 0 when enlarging.
    """
    return max((2.0 * half_side / size - 1.0) / 2.0, 0.0)


def square_taps(
    centres: np.ndarray, *, half_side: float, size: int, sigma: float, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resampling weights along one axis: Gaussian pre-filter, then linear interpolation.

    Output pixel ``i`` covers ``[c - h + i s, c - h + (i + 1) s)`` with ``s = 2 h / size``
    and takes the value at its middle ``p``: the filtered input interpolated linearly
    between pixels ``floor(p)`` and ``floor(p) + 1``. Filtering and interpolating are
    both linear, so output pixel ``i`` is a weighted sum of ``K = 2 R + 2`` consecutive
    input pixels (``R`` the Gaussian's radius); indices beyond the input repeat its edge
    pixel (``mode="nearest"``).

    Parameters
    ----------
    centres : ndarray of float, shape (n,)
        Centre of the square along this axis per frame, input pixels.
    half_side : float
        Half the side of the square, input pixels.
    size : int
        Output pixels along the axis.
    sigma : float
        Gaussian width, input pixels (0: interpolation only).
    length : int
        Input pixels along the axis.

    Returns
    -------
    index : ndarray of intp, shape (n, size, K)
        Input pixels feeding each output pixel.
    weight : ndarray of float32, shape (n, size, K)
        Their weights (each row sums to 1).
    """
    taps = gaussian_taps(sigma)
    radius = taps.size // 2
    scale = 2.0 * half_side / size
    positions = np.asarray(centres, np.float64)[:, None] + (np.arange(size) + 0.5) * scale - half_side
    first = np.floor(positions).astype(np.intp)
    if first.min() < 0 or first.max() + 1 > length - 1:
        raise AirysortError(
            f"the square of half side {half_side:.1f} px around {np.asarray(centres).tolist()!r} leaves the "
            f"{length} px region; use a smaller crop or search radius"
        )
    fraction = (positions - first)[..., None]
    weight = (1 - fraction) * np.append(taps, 0.0) + fraction * np.insert(taps, 0, 0.0)
    index = np.clip(first[..., None] - radius + np.arange(taps.size + 1), 0, length - 1)
    return index, weight.astype(np.float32)


def resample_square(
    values: np.ndarray, centres: np.ndarray, *, half_side: float, size: int, sigma: float
) -> np.ndarray:
    """Squares ``centre ± half_side`` of a block of frames, filtered and resampled to ``size²``.

    Separable: the weights of :func:`square_taps` (``K`` per output pixel) are applied
    along rows, then along columns (:func:`_separable_taps`): no full-frame filtering,
    each frame read once, and only ``size × x`` intermediate values per frame. Compiled
    loops replaced the earlier sparse-matrix products (scipy.sparse), which spent as long
    building the matrices and transposing the results as multiplying.

    Parameters
    ----------
    values : ndarray of float, shape (n, y, x), or (y, x) shared by all frames
    centres : ndarray of float, shape (n, 2)
        Centre (row, column) of each frame's square, input pixels.
    half_side, size, sigma
        See :func:`square_taps`.

    Returns
    -------
    ndarray of float32, shape (n, size, size)
    """
    values = np.asarray(values, np.float32)
    centres = np.asarray(centres, np.float64).reshape(-1, 2)
    ny, nx = values.shape[-2:]
    row_index, row_weight = square_taps(centres[:, 0], half_side=half_side, size=size, sigma=sigma, length=ny)
    col_index, col_weight = square_taps(centres[:, 1], half_side=half_side, size=size, sigma=sigma, length=nx)
    frames = values.reshape(-1, ny, nx)  # one shared frame, or one per centre
    return _separable_taps(frames, row_index, row_weight, col_index, col_weight)


@numba.njit(cache=True, nogil=True)
def _separable_taps(frames, row_index, row_weight, col_index, col_weight):  # pragma: no cover - compiled
    """``out[f, i, j] = Σ_a Σ_b row_weight[f, i, a] col_weight[f, j, b] frames[f', row_index[f, i, a],
    col_index[f, j, b]]`` with ``f' = f``, or 0 for one shared frame; float32 (n, size, size)."""
    n, size, taps = row_index.shape
    nx = frames.shape[2]
    out = np.empty((n, size, col_index.shape[1]), np.float32)
    rows = np.empty(nx, np.float32)
    for f in range(n):
        frame = frames[f if frames.shape[0] > 1 else 0]
        for i in range(size):
            rows[:] = 0.0
            for a in range(taps):  # a weighted sum of whole input rows (vectorised)
                weight = row_weight[f, i, a]
                source = frame[row_index[f, i, a]]
                for x in range(nx):
                    rows[x] += weight * source[x]
            for j in range(col_index.shape[1]):
                total = np.float32(0.0)
                for b in range(col_index.shape[2]):
                    total += col_weight[f, j, b] * rows[col_index[f, j, b]]
                out[f, i, j] = total
    return out


def crop_resize(
    values: np.ndarray, *, centre: tuple[float, float], half_side: float, size: int
) -> np.ndarray:
    """Anti-aliased crop of the square ``centre ± half_side`` resampled to ``size × size``.

    A Gaussian pre-filter (:func:`antialias_sigma`, skimage's width) damps the frequencies
    the output grid cannot hold (to 0.42 of their amplitude at 1.2 times the output Nyquist
    frequency, 0.03 at twice it) while keeping the passband (0.96 at a quarter of it); the
    output pixel centres are then interpolated linearly
    (:func:`resample_square`), so a sub-pixel ``centre`` is honoured exactly.

    Parameters
    ----------
    values : ndarray of float, shape (y, x)
    centre : (float, float)
        Centre of the square in input pixels (row, column).
    half_side : float
        Half the side of the square, input pixels.
    size : int
        Output side, pixels.

    Returns
    -------
    ndarray of float32, shape (size, size)
    """
    sigma = antialias_sigma(half_side=half_side, size=size)
    return resample_square(np.asarray(values)[None], np.array([centre]), half_side=half_side, size=size, sigma=sigma)[0]


def normalise(image: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Zero mean and unit standard deviation over valid pixels; masked pixels exactly 0.

    Works on one image ``(y, x)`` or a block ``(n, y, x)``, each image on its own. An
    image whose valid pixels are all equal is only shifted to zero mean. Sums are taken
    in float64.
    """
    image = np.asarray(image, np.float32)
    bad = np.broadcast_to(np.asarray(bad, bool), image.shape)
    flat = image.reshape(-1, image.shape[-2] * image.shape[-1])
    return _normalise_rows(flat, bad.reshape(flat.shape)).reshape(image.shape)


@numba.njit(cache=True, nogil=True)
def _normalise_rows(values, bad):  # pragma: no cover - compiled
    """:func:`normalise` of each row of ``values`` (n, pixels) over its pixels not ``bad``."""
    out = np.zeros(values.shape, np.float32)
    for i in range(values.shape[0]):
        total = 0.0
        count = 0
        for p in range(values.shape[1]):
            if not bad[i, p]:
                total += values[i, p]
                count += 1
        count = max(count, 1)
        mean = np.float32(total / count)
        squares = 0.0
        for p in range(values.shape[1]):
            if not bad[i, p]:
                deviation = values[i, p] - mean
                out[i, p] = deviation
                squares += np.float64(deviation) * np.float64(deviation)
        std = np.sqrt(squares / count)
        scale = np.float32(std) if std > 1e-12 else np.float32(1.0)
        for p in range(values.shape[1]):
            out[i, p] /= scale
    return out


# --------------------------------------------------------------------------------------
# Whole frames and blocks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessSettings:
    """Per-run settings of :func:`preprocess_block`, fixed before the block kernels run.

    Attributes
    ----------
    mask : ndarray of bool, shape (y, x)
        Run mask: file mask and hot pixels (saturation is added per frame).
    background : ndarray of float32, shape (y, x)
        Subtracted from every frame (zeros when none).
    nominal_centre : (float, float)
        Centre used for non-hits and as the starting guess of refinement, pixels.
    half_side : float
        Half side of the cropped square, pixels; the same for every frame so that all
        images share one scale.
    size : int
        Output side, pixels.
    scaling : str
        ``"log"`` or ``"asinh"``.
    asinh_scale : float
        Counts at which ``asinh`` scaling turns logarithmic.
    saturation : float or None
        Counts at or above which a pixel is masked in that frame.
    search_radius : float
        Largest centre offset from the nominal centre, pixels.
    centre_window : int
        Half side of the window used for centre refinement, pixels.

    The derived attributes are computed once per run, so the block kernels only read them.
    """

    mask: np.ndarray
    background: np.ndarray
    nominal_centre: tuple[float, float]
    half_side: float
    size: int = 128
    scaling: str = "log"
    asinh_scale: float = 1.0
    saturation: float | None = None
    search_radius: float = 8.0
    centre_window: int = 64
    #: Width of the anti-aliasing Gaussian, input pixels.
    sigma: float = field(init=False, repr=False)
    #: Rows and columns (slices) of the part of the frame any crop can reach.
    region: tuple[slice, slice] = field(init=False, repr=False)
    #: The run mask over ``region`` (bool) and its complement as float32 (1 = valid).
    region_mask: np.ndarray = field(init=False, repr=False)
    region_valid: np.ndarray = field(init=False, repr=False)
    #: The background over ``region``, float32.
    region_background: np.ndarray = field(init=False, repr=False)
    #: ``region_mask`` after the anti-aliasing filter: sampled, the masked fraction of
    #: each output pixel.
    smoothed_mask: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise AirysortError(f"unknown scaling {self.scaling!r}; use one of {SCALINGS}")
        if self.size < 4:
            raise AirysortError(f"image size {self.size!r} is too small; use at least 4 pixels")
        if self.half_side <= 0:
            raise AirysortError(
                f"crop half side {self.half_side!r} px is not positive: the centre "
                f"{self.nominal_centre!r} is too close to the frame edge"
            )
        sigma = antialias_sigma(half_side=self.half_side, size=self.size)
        reach = self.half_side + self.search_radius + 4 * sigma + 3
        ny, nx = self.mask.shape
        cy, cx = self.nominal_centre
        rows = slice(max(int(cy - reach), 0), min(int(np.ceil(cy + reach)) + 1, ny))
        cols = slice(max(int(cx - reach), 0), min(int(np.ceil(cx + reach)) + 1, nx))
        mask = np.ascontiguousarray(np.asarray(self.mask, bool)[rows, cols])
        # The same taps and edge rule as the image's resampling, so that a constant image
        # stays constant next to the mask (the image is divided by the valid fraction).
        smoothed = mask.astype(np.float32)
        taps = gaussian_taps(sigma)
        for axis in (0, 1):
            smoothed = scipy.ndimage.correlate1d(smoothed, taps, axis=axis, mode="nearest")
        derived = {
            "sigma": sigma,
            "region": (rows, cols),
            "region_mask": mask,
            "region_valid": (~mask).astype(np.float32),
            "region_background": np.ascontiguousarray(np.asarray(self.background, np.float32)[rows, cols]),
            "smoothed_mask": smoothed,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)


def preprocess_frame(
    frame: np.ndarray, *, hit: bool, settings: PreprocessSettings
) -> tuple[np.ndarray, tuple[float, float]]:
    """Preprocess one raw frame into a normalised network input (:func:`preprocess_block`
    on a block of one frame).

    Parameters
    ----------
    frame : ndarray, shape (y, x)
        Raw detector counts.
    hit : bool
        Whether the frame is a hit; only hits get their centre refined (an empty frame
        has no symmetry to find and keeps the nominal centre).
    settings : PreprocessSettings

    Returns
    -------
    image : ndarray of float32, shape (size, size)
        Zero mean, unit standard deviation over valid pixels; masked pixels are 0.
    centre : (float, float)
        Centre used, raw pixels (row, column).
    """
    packed = preprocess_block(np.asarray(frame)[None], np.array([hit]), settings=settings)[0]
    image = packed[:-2].reshape(settings.size, settings.size)
    return image, (float(packed[-2]), float(packed[-1]))


def preprocess_block(
    frames: np.ndarray, hits: np.ndarray, *, settings: PreprocessSettings, out: np.ndarray | None = None
) -> np.ndarray:
    """Preprocess a block of raw frames into normalised network inputs, vectorised.

    Per frame, in float32: background subtraction, the saturation mask, centre refinement
    of hits (:func:`refine_centres`), scaling, then masked pixels set to 0 and the
    anti-aliased crop and resize (:func:`resample_square`) divided by the resampled valid
    fraction, so masked pixels neither leak into nor darken their neighbours (normalised
    convolution); output pixels more than half masked are masked. Frames are taken
    :data:`SUB_BLOCK` at a time, so temporaries stay small whatever the block size.

    Parameters
    ----------
    frames : ndarray, shape (n, y, x)
    hits : ndarray of bool, shape (n,) (or any shape with n elements)
    settings : PreprocessSettings
    out : ndarray of float32, shape (n, size * size + 2), optional
        Written in place and returned (a view of a wider array leaves room for more
        columns without a copy).

    Returns
    -------
    ndarray of float32, shape (n, size * size + 2)
        Each row is the flattened image followed by the centre (cy, cx) in raw pixels,
        packed in one array so that one Dask task yields both.
    """
    hits = np.asarray(hits, bool).reshape(-1)
    n = frames.shape[0]
    if out is None:
        out = np.empty((n, settings.size * settings.size + 2), np.float32)
    for part in sub_blocks(n):
        images, centres = _preprocess_sub_block(np.asarray(frames[part]), hits[part], settings)
        out[part, :-2] = images.reshape(images.shape[0], -1)
        out[part, -2:] = centres
    return out


def _preprocess_sub_block(
    frames: np.ndarray, hits: np.ndarray, settings: PreprocessSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, size, size)`` and centres ``(n, 2)`` (raw pixels) of a few frames."""
    rows, cols = settings.region
    offset = np.array([rows.start, cols.start], np.float64)
    n = frames.shape[0]
    log_scaling = settings.scaling == "log"
    if log_scaling:
        # One compiled pass: counts, their logarithm, the mask, the frames' peaks; the
        # centring takes the same logarithm.
        scaled = np.empty((n, *settings.region_mask.shape), np.float32)
        peaks = _log_scaled_region(
            frames, rows.start, cols.start, settings.region_background, settings.region_valid, scaled
        )
        centring_input = scaled
    else:
        counts = np.subtract(frames[:, rows, cols], settings.region_background, dtype=np.float32)
        peaks = frames[:, rows, cols].max(axis=(1, 2))
        centring_input = counts
    # Saturated pixels are rare: look for them per frame, mask them only where present.
    clipped, new_bad = np.zeros(0, np.intp), np.zeros((0, *settings.region_mask.shape), bool)
    if settings.saturation is not None:
        clipped = np.flatnonzero(peaks >= settings.saturation)
        new_bad = (frames[clipped][:, rows, cols] >= settings.saturation) & ~settings.region_mask
    bad = settings.region_mask
    if clipped.size:
        bad = np.repeat(settings.region_mask[None], n, axis=0)
        bad[clipped] |= new_bad
    guess = np.asarray(settings.nominal_centre, np.float64) - offset
    centres = np.tile(guess, (n, 1))
    if hits.any():
        centres[hits] = refine_centres(
            centring_input, bad, guess=tuple(guess), search_radius=settings.search_radius,
            window=settings.centre_window, which=hits, log_scaled=log_scaling,
        )
    if not log_scaling:  # the counts are not needed any more: scale them in place
        scaled = scale_intensity(counts, scaling=settings.scaling, asinh_scale=settings.asinh_scale, out=counts)
        scaled *= settings.region_valid
    scaled[clipped] *= ~new_bad
    square = {"half_side": settings.half_side, "size": settings.size}
    image = resample_square(scaled, centres, sigma=settings.sigma, **square)
    bad_fraction = resample_square(settings.smoothed_mask, centres, sigma=0.0, **square)
    if clipped.size:
        bad_fraction[clipped] += resample_square(new_bad, centres[clipped], sigma=settings.sigma, **square)
    valid_fraction = 1 - bad_fraction
    image = np.divide(image, valid_fraction, out=np.zeros_like(image), where=valid_fraction > 1e-6)
    return normalise(image, bad_fraction > 0.5), centres + offset


#: Columns after the flattened image in a row of :func:`analyse_block`'s output.
PACKED_COLUMNS = ("centre_y", "centre_x", "photon_count", "hit")


def analyse_block(
    frames: np.ndarray, *, hit_settings: HitSettings, settings: PreprocessSettings
) -> np.ndarray:
    """Hit finding and preprocessing of a block of frames, in one pass over the data.

    Returns
    -------
    ndarray of float32, shape (n, size * size + 4)
        Each row: the flattened image, then the centre (row, column) in raw pixels, the
        photon count and the hit flag (1.0 or 0.0) (:data:`PACKED_COLUMNS`).
    """
    statistics, hits = find_hits_block(frames, hit_settings=hit_settings)
    packed = np.empty((frames.shape[0], settings.size * settings.size + len(PACKED_COLUMNS)), np.float32)
    preprocess_block(frames, hits, settings=settings, out=packed[:, :-2])
    packed[:, -2] = statistics[:, 0]
    packed[:, -1] = hits
    return packed
