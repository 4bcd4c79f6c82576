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

from dataclasses import dataclass

import numpy as np

from pipeline.errors import AirysortError
from pipeline.preprocess_kernels import bilinear

VARIANTS = ("auto", "cross")


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
    if not 0 <= r_min < r_max:
        raise AirysortError(f"ring radii r_min={r_min!r}, r_max={r_max!r} px must satisfy 0 <= r_min < r_max")
    if n_q < 1 or n_phi < 4:
        raise AirysortError(f"need n_q >= 1 and n_phi >= 4, got n_q={n_q!r}, n_phi={n_phi!r}")
    sub_q = max(int(np.ceil((r_max - r_min) / n_q / max_spacing)), 1)
    sub_phi = max(int(np.ceil(2 * np.pi * r_max / n_phi / max_spacing)), 1)
    # Sub-samples at the middles of equal sub-intervals of every cell.
    radii = r_min + (np.arange(n_q * sub_q) + 0.5) * (r_max - r_min) / (n_q * sub_q)
    angles = (np.arange(n_phi * sub_phi) + 0.5) * 2 * np.pi / (n_phi * sub_phi) - np.pi / n_phi
    rows = centre[0] + radii[:, None] * np.sin(angles)[None, :]
    cols = centre[1] + radii[:, None] * np.cos(angles)[None, :]
    samples, good = bilinear(frame, bad, rows, cols)
    good = good.astype(np.float64)
    shape = (n_q, sub_q, n_phi, sub_phi)
    counts = good.reshape(shape).sum(axis=(1, 3))
    sums = (samples * good).reshape(shape).sum(axis=(1, 3))
    values = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return values, counts / (sub_q * sub_phi)


def angular_correlation(
    values: np.ndarray, weight: np.ndarray, *, cross: bool = False, min_overlap: float = 0.25
) -> np.ndarray:
    """Mask-corrected, normalised angular correlation of polar intensities.

    Parameters
    ----------
    values, weight : ndarray, shape (n_q, n_phi)
        From :func:`polar_resample`.
    cross : bool, default=False
        All ring pairs ``(q1, q2)`` instead of ``q1 = q2`` only.
    min_overlap : float, default=0.25
        Smallest fraction of the ring where both lagged weights overlap for a lag to be
        kept; other lags are 0.

    Returns
    -------
    ndarray of float32, shape (n_q, n_phi) or (n_q, n_q, n_phi)
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
        numerator = np.fft.irfft(np.conj(spectrum)[:, None, :] * spectrum[None, :, :], n=n_phi, axis=-1)
        overlap = np.fft.irfft(np.conj(spectrum_w)[:, None, :] * spectrum_w[None, :, :], n=n_phi, axis=-1)
    else:
        numerator = np.fft.irfft(np.abs(spectrum) ** 2, n=n_phi, axis=-1)
        overlap = np.fft.irfft(np.abs(spectrum_w) ** 2, n=n_phi, axis=-1)
    keep = overlap > min_overlap * n_phi
    correlation = np.divide(numerator, overlap, out=np.zeros_like(numerator), where=keep)
    # Zero-lag autocorrelation of each ring: its weighted variance.
    if cross:
        variance = np.diagonal(correlation[..., 0]).copy()
        scale = np.sqrt(np.maximum(variance[:, None] * variance[None, :], 0.0))[..., None]
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

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise AirysortError(f"unknown correlation variant {self.variant!r}; use one of {VARIANTS}")

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.variant == "cross":
            return (self.n_q, self.n_q, self.n_phi)
        return (self.n_q, self.n_phi)


def correlate_frame(frame: np.ndarray, *, centre: tuple[float, float], settings: CorrelateSettings) -> np.ndarray:
    """Angular correlation of one raw frame around its centre.

    Returns
    -------
    ndarray of float32, shape ``settings.output_shape``
    """
    raw = np.asarray(frame)
    counts = raw.astype(np.float64) - settings.background
    bad = settings.mask if settings.saturation is None else settings.mask | (raw >= settings.saturation)
    values, weight = polar_resample(
        counts,
        bad,
        centre=centre,
        r_min=settings.r_min,
        r_max=settings.r_max,
        n_q=settings.n_q,
        n_phi=settings.n_phi,
    )
    return angular_correlation(values, weight, cross=settings.variant == "cross", min_overlap=settings.min_overlap)


def correlate_block(frames: np.ndarray, centres: np.ndarray, *, settings: CorrelateSettings) -> np.ndarray:
    """:func:`correlate_frame` for a block of frames.

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
    for i, frame in enumerate(frames):
        out[i] = correlate_frame(frame, centre=(centres[i, 0], centres[i, 1]), settings=settings)
    return out
