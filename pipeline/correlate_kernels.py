"""Pure NumPy / SciPy kernels of angular cross-correlation analysis: no Dask here.

The angular two-point cross-correlation of a diffraction pattern ``I(q, φ)``,

``C(q1, q2, Δ) = ⟨δI(q1, φ) δI(q2, φ + Δ)⟩_φ``,   ``δI = I − ⟨I⟩_φ``,

measures how intensity fluctuations on two rings repeat as one of them is turned by
``Δ``; it is unchanged when the pattern is rotated in the detector plane, which makes
it a rotation-invariant description of the particle's shape (Kam, Macromolecules 10,
927 (1977); Kurta et al., Adv. Chem. Phys. 161, 1 (2016)).

Steps (:func:`correlate_frame`):

1. **Polar resampling** (:func:`polar_resample`) around the frame's refined centre:
   ``n_q`` rings between ``r_min`` and ``r_max`` pixels, ``n_phi`` angular bins, each
   polar cell the mean of bilinear samples spaced at most ``max_spacing`` pixels
   apart, with the fraction of those samples that touch no masked pixel as its weight.
2. **Correlation with mask correction** (:func:`angular_correlation`): with weights
   ``w`` and weighted fluctuations ``d = w (I − Ī)``, both the data and the mask are
   correlated along φ with FFTs, and the data's correlation is divided by the mask's,
   ``C = IFFT(F*(d1) F(d2)) / IFFT(F*(w1) F(w2))``: the average over the valid pairs
   only, so the mask's own angular structure does not enter. Lags with less than
   ``min_overlap`` of the ring valid are set to 0.
3. **Normalisation** to a correlation coefficient, ``C(q1, q2, Δ) /
   sqrt(C(q1, q1, 0) C(q2, q2, 0))`` in [−1, 1], so that bright and faint patterns (and
   empty frames, whose rings average to ~0 after background subtraction) are on one
   scale.

The default network input is the autocorrelation ``q1 = q2`` (``(n_q, n_phi)``); the
cross-q variant keeps all ring pairs (``(n_q, n_q, n_phi)``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import AirysortError
from pipeline.preprocess_kernels import sub_blocks

VARIANTS = ("auto", "cross")
#: Frames resampled together. One: a frame's gathers (4 × n_q n_phi sub samples) and their
#: temporaries then stay in cache; measured 950-1000 frames per CPU second against 675
#: with 4 and 444 with 8 (64 rings × 128 angles of 512² frames).
SUB_BLOCK = 1


def polar_resample(
    frame: np.ndarray,
    bad: np.ndarray,
    *,
    centre: tuple[float, float],
    r_min: float,
    r_max: float,
    n_q: int,
    n_phi: int,
    max_spacing: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a frame onto polar cells around ``centre``.

    Parameters
    ----------
    frame : ndarray of float, shape (y, x)
        Intensity (background-subtracted counts).
    bad : ndarray of bool, shape (y, x)
        True at masked pixels.
    centre : (float, float)
        Centre (row, column), pixels.
    r_min, r_max : float
        Inner and outer radius of the rings, pixels.
    n_q, n_phi : int
        Number of rings and of angular bins; angle ``φ = 2π j / n_phi`` measured from the
        +column axis towards +row.
    max_spacing : float, default=3.0
        Largest distance in pixels between the bilinear samples averaged into a cell.

    Returns
    -------
    values : ndarray of float64, shape (n_q, n_phi)
        Mean intensity of the valid samples in each cell (0 where none).
    weight : ndarray of float64, shape (n_q, n_phi)
        Fraction of a cell's samples that touch no masked pixel, in [0, 1].
    """
    grid = polar_grid(r_min=r_min, r_max=r_max, n_q=n_q, n_phi=n_phi, max_spacing=max_spacing)
    masked = np.where(np.asarray(bad, bool), np.float32(np.nan), np.asarray(frame, np.float32))
    values, weight = polar_resample_block(masked[None], np.array([centre], np.float64), grid=grid)
    return values[0].astype(np.float64), weight[0].astype(np.float64)


@dataclass(frozen=True)
class PolarGrid:
    """Sample positions of :func:`polar_resample` relative to the centre, fixed per run.

    ``dy``, ``dx`` (float32, shape ``(n_q n_phi sub,)``) are the offsets in pixels of the
    ``sub = sub_q × sub_phi`` bilinear samples of each of the ``n_q × n_phi`` cells, the
    samples of one cell consecutive (so they reshape to ``(n_q, n_phi, sub)``); ``extent``
    is the largest ``|dy|`` or ``|dx|``.
    """

    dy: np.ndarray
    dx: np.ndarray
    n_q: int
    n_phi: int
    sub: int
    extent: float


@functools.lru_cache(maxsize=8)
def polar_grid(*, r_min: float, r_max: float, n_q: int, n_phi: int, max_spacing: float = 3.0) -> PolarGrid:
    """The :class:`PolarGrid` of rings ``r_min..r_max`` (pixels), cached: the sines and
    cosines are computed once per run, not per frame."""
    if not 0 <= r_min < r_max:
        raise AirysortError(f"ring radii r_min={r_min!r}, r_max={r_max!r} px must satisfy 0 <= r_min < r_max")
    if n_q < 1 or n_phi < 4:
        raise AirysortError(f"need n_q >= 1 and n_phi >= 4, got n_q={n_q!r}, n_phi={n_phi!r}")
    sub_q = max(int(np.ceil((r_max - r_min) / n_q / max_spacing)), 1)
    sub_phi = max(int(np.ceil(2 * np.pi * r_max / n_phi / max_spacing)), 1)
    # Sub-samples at the middles of equal sub-intervals of every cell.
    radii = r_min + (np.arange(n_q * sub_q) + 0.5) * (r_max - r_min) / (n_q * sub_q)
    angles = (np.arange(n_phi * sub_phi) + 0.5) * 2 * np.pi / (n_phi * sub_phi) - np.pi / n_phi
    # (q, sub_q, phi, sub_phi) → (q, phi, sub_q, sub_phi): a cell's samples side by side.
    order = (0, 2, 1, 3)
    dy = (radii[:, None] * np.sin(angles)[None, :]).reshape(n_q, sub_q, n_phi, sub_phi).transpose(order)
    dx = (radii[:, None] * np.cos(angles)[None, :]).reshape(n_q, sub_q, n_phi, sub_phi).transpose(order)
    dy, dx = (np.ascontiguousarray(d, np.float32).ravel() for d in (dy, dx))
    for offsets in (dy, dx):
        offsets.flags.writeable = False
    extent = float(max(np.abs(dy).max(), np.abs(dx).max()))
    return PolarGrid(dy=dy, dx=dx, n_q=n_q, n_phi=n_phi, sub=sub_q * sub_phi, extent=extent)


def polar_resample_block(masked: np.ndarray, centres: np.ndarray, *, grid: PolarGrid) -> tuple[np.ndarray, np.ndarray]:
    """:func:`polar_resample` of a block of frames whose masked pixels hold NaN.

    Every sample is a bilinear interpolation; one that touches a NaN (masked) pixel or
    falls outside the frame is left out of its cell. All frames' samples are gathered
    with one index array, so there is no loop over frames; a cell's samples are summed
    with one matrix product.

    Parameters
    ----------
    masked : ndarray of float32, shape (n, y, x)
        Intensity, NaN at masked pixels.
    centres : ndarray of float, shape (n, 2)
        (row, column) per frame, pixels.
    grid : PolarGrid

    Returns
    -------
    values, weight : ndarray of float32, shape (n, n_q, n_phi)
        As in :func:`polar_resample`.
    """
    n, ny, nx = masked.shape
    centres = np.asarray(centres, np.float64).reshape(n, 2)
    rows = centres[:, :1].astype(np.float32) + grid.dy
    cols = centres[:, 1:].astype(np.float32) + grid.dx
    lowest, highest = centres.min(axis=0) - grid.extent, centres.max(axis=0) + grid.extent
    fits = lowest.min() >= 0 and highest[0] < ny - 1 and highest[1] < nx - 1
    # Integer parts as int32 (float → int32 converts fast, float → int64 does not);
    # fractional parts in float32 (subtracting the int32 array itself would promote the
    # whole sample grid to float64).
    r0 = (rows if fits else np.floor(rows)).astype(np.int32)  # truncation = floor when fits
    c0 = (cols if fits else np.floor(cols)).astype(np.int32)
    rows -= r0.astype(np.float32)  # fractional parts, in place
    cols -= c0.astype(np.float32)
    inside = None if fits else (r0 >= 0) & (c0 >= 0) & (r0 < ny - 1) & (c0 < nx - 1)
    index = r0 if n * ny * nx < 2**31 else r0.astype(np.intp)  # flat indices, reusing r0
    index *= nx
    index += c0
    if inside is not None:
        index[~inside] = 0
    index += (np.arange(n, dtype=index.dtype) * (ny * nx))[:, None]
    flat = masked.reshape(-1)
    # Shifted views stand for the right, lower and lower-right neighbours: no index copies
    # (np.take gathers faster than fancy indexing).
    top, right = np.take(flat, index), np.take(flat[1:], index)
    right -= top
    right *= cols
    top += right
    bottom, corner = np.take(flat[nx:], index), np.take(flat[nx + 1 :], index)
    corner -= bottom
    corner *= cols
    bottom += corner
    bottom -= top
    bottom *= rows
    samples = top
    samples += bottom
    good = np.isfinite(samples)
    if inside is not None:
        good &= inside
    samples[~good] = 0
    ones = np.ones(grid.sub, np.float32)
    cells = (n, grid.n_q, grid.n_phi, grid.sub)
    counts = good.reshape(cells).astype(np.float32) @ ones
    sums = samples.reshape(cells) @ ones
    values = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return values, counts / np.float32(grid.sub)


def angular_correlation(
    values: np.ndarray, weight: np.ndarray, *, cross: bool = False, min_overlap: float = 0.25
) -> np.ndarray:
    """Mask-corrected, normalised angular correlation of polar intensities.

    Parameters
    ----------
    values, weight : ndarray, shape (..., n_q, n_phi)
        From :func:`polar_resample` (or a block of frames from
        :func:`polar_resample_block`).
    cross : bool, default=False
        All ring pairs ``(q1, q2)`` instead of ``q1 = q2`` only.
    min_overlap : float, default=0.25
        Smallest fraction of the ring where both lagged weights overlap for a lag to be
        kept; other lags are 0.

    Returns
    -------
    ndarray of float32, shape (..., n_q, n_phi) or (..., n_q, n_q, n_phi)
        Correlation coefficient in [−1, 1] at lag ``Δ = 2π k / n_phi``; 0 for rings
        without valid data or without fluctuations.
    """
    values = np.asarray(values, np.float64)
    weight = np.asarray(weight, np.float64)
    n_phi = values.shape[-1]
    total = weight.sum(axis=-1, keepdims=True)
    mean = np.divide((weight * values).sum(axis=-1, keepdims=True), total, out=np.zeros_like(total), where=total > 0)
    fluctuation = weight * (values - mean)
    spectrum = np.fft.rfft(fluctuation, axis=-1)
    spectrum_w = np.fft.rfft(weight, axis=-1)
    if cross:
        # C[q1, q2, Δ] = Σ_φ d(q1, φ) d(q2, φ + Δ)
        numerator = np.fft.irfft(np.conj(spectrum)[..., :, None, :] * spectrum[..., None, :, :], n=n_phi, axis=-1)
        overlap = np.fft.irfft(np.conj(spectrum_w)[..., :, None, :] * spectrum_w[..., None, :, :], n=n_phi, axis=-1)
    else:
        numerator = np.fft.irfft(np.abs(spectrum) ** 2, n=n_phi, axis=-1)
        overlap = np.fft.irfft(np.abs(spectrum_w) ** 2, n=n_phi, axis=-1)
    keep = overlap > min_overlap * n_phi
    correlation = np.divide(numerator, overlap, out=np.zeros_like(numerator), where=keep)
    # Zero-lag autocorrelation of each ring: its weighted variance.
    if cross:
        variance = np.diagonal(correlation[..., 0], axis1=-2, axis2=-1)
        scale = np.sqrt(np.maximum(variance[..., :, None] * variance[..., None, :], 0.0))[..., None]
    else:
        scale = correlation[..., :1]
    out = np.divide(correlation, scale, out=np.zeros_like(correlation), where=scale > 1e-30)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class CorrelateSettings:
    """Per-run settings of :func:`correlate_block`.

    Attributes
    ----------
    mask : ndarray of bool, shape (y, x)
        Run mask (file mask and hot pixels); saturation is added per frame.
    background : ndarray of float32, shape (y, x)
        Subtracted from every frame.
    r_min, r_max : float
        Ring radii, pixels.
    n_q, n_phi : int
        Rings and angular bins.
    variant : {"auto", "cross"}
        ``q1 = q2`` autocorrelation or all ring pairs.
    saturation : float or None
        Counts at or above which a pixel is masked in that frame.
    min_overlap : float
        See :func:`angular_correlation`.
    """

    mask: np.ndarray
    background: np.ndarray
    r_min: float
    r_max: float
    n_q: int = 64
    n_phi: int = 128
    variant: str = "auto"
    saturation: float | None = None
    min_overlap: float = 0.25
    #: The background with NaN at the run mask's pixels, float32 (derived).
    masked_background: np.ndarray = field(init=False, repr=False)
    #: Sample offsets of the polar cells (derived).
    grid: PolarGrid = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise AirysortError(f"unknown correlation variant {self.variant!r}; use one of {VARIANTS}")
        background = np.asarray(self.background, np.float32)
        # raw - NaN = NaN: one subtraction both removes the background and masks.
        masked = np.where(np.asarray(self.mask, bool), np.float32(np.nan), background)
        object.__setattr__(self, "masked_background", masked)
        grid = polar_grid(r_min=float(self.r_min), r_max=float(self.r_max), n_q=int(self.n_q), n_phi=int(self.n_phi))
        object.__setattr__(self, "grid", grid)

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.variant == "cross":
            return (self.n_q, self.n_q, self.n_phi)
        return (self.n_q, self.n_phi)


def correlate_frame(frame: np.ndarray, *, centre: tuple[float, float], settings: CorrelateSettings) -> np.ndarray:
    """Angular correlation of one raw frame around its centre (:func:`correlate_block` on
    a block of one frame).

    Returns
    -------
    ndarray of float32, shape ``settings.output_shape``
    """
    return correlate_block(np.asarray(frame)[None], np.array([centre], np.float64), settings=settings)[0]


def correlate_block(frames: np.ndarray, centres: np.ndarray, *, settings: CorrelateSettings) -> np.ndarray:
    """Angular correlations of a block of raw frames, vectorised over the frames.

    Background subtraction and masking are one float32 subtraction (the run mask is NaN
    in ``settings.masked_background``); saturated pixels become NaN only in the frames
    that have any. Frames are taken :data:`SUB_BLOCK` at a
    time, so temporaries stay small whatever the block size.

    Parameters
    ----------
    frames : ndarray, shape (n, y, x)
    centres : ndarray of float, shape (n, 2)
        (row, column) per frame, pixels.

    Returns
    -------
    ndarray of float32, shape (n, *settings.output_shape)
    """
    centres = np.asarray(centres, np.float64).reshape(-1, 2)
    out = np.empty((frames.shape[0], *settings.output_shape), np.float32)
    for part in sub_blocks(frames.shape[0], SUB_BLOCK):
        raw = np.asarray(frames[part])
        masked = raw.astype(np.float32)
        masked -= settings.masked_background
        if settings.saturation is not None:
            for i in np.flatnonzero(raw.max(axis=(1, 2)) >= settings.saturation):  # rare
                masked[i][raw[i] >= settings.saturation] = np.nan
        values, weight = polar_resample_block(masked, centres[part], grid=settings.grid)
        out[part] = angular_correlation(
            values, weight, cross=settings.variant == "cross", min_overlap=settings.min_overlap
        )
    return out
