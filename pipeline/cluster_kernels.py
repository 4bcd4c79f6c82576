"""Pure NumPy / scikit-learn pieces of clustering: no Dask here.

Two methods, both fitted on a sample that fits in memory and then applied to every
pattern block by block (the Dask wiring in :mod:`pipeline.cluster` maps the
``*_block`` functions below over chunks):

* **GMM on latents** — :func:`fit_gmm` picks the number of components by the Bayesian
  information criterion (BIC) and :func:`gmm_posterior_block` gives each row's
  posterior probabilities.
* **Spectral baseline on images** — spectral clustering (Ng, Jordan & Weiss 2001)
  scaled to millions of rows with the Nyström approximation and the one-shot
  normalisation of Fowlkes, Belongie, Chung & Malik, "Spectral grouping using the
  Nyström method", IEEE TPAMI 26, 214 (2004). With ``m`` random landmarks ``L`` and
  the RBF kernel ``C = K(X, L)`` (n × m), the affinity is approximated by
  ``W ≈ Φ Φᵀ`` with Nyström features ``Φ = C P`` and ``P = K(L, L)^(-1/2)``. Then

  1. degrees without forming ``W``: ``d = Φ (Φᵀ 1)``, one pass summing ``Φ`` rows;
  2. normalised features ``Ψ = D^(-1/2) Φ``, so ``D^(-1/2) W D^(-1/2) ≈ Ψ Ψᵀ``; its
     leading eigenvectors come from the small ``G = Ψᵀ Ψ = U Λ Uᵀ`` (a second pass
     summing ``φ φᵀ / d`` per row) as ``V = Ψ U Λ^(-1/2)``, orthonormal by
     construction (the one-shot orthogonalisation);
  3. the rows of the leading ``k`` columns of ``V``, scaled to unit length, are
     clustered with k-means (fitted on a sample, applied to every row).

  Every row — landmark or not — is treated the same way, so the embedding of a new
  row needs only ``s = Φᵀ 1``, ``P`` and ``U Λ^(-1/2)`` (:func:`spectral_embed_block`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics.pairwise import euclidean_distances, rbf_kernel
from sklearn.mixture import GaussianMixture
from threadpoolctl import ThreadpoolController

from pipeline.errors import AirysortError

_THREADPOOLS = ThreadpoolController()


def one_thread(function):
    """Run ``function`` with BLAS and OpenMP limited to one thread.

    Why: parallelism comes from Dask (one block per core). The matrices here are small
    (10-D latents, a few hundred landmarks), and on a busy 2-core machine BLAS/OpenMP
    threads that spin-wait for each other made GMM and k-means fits 40× slower.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _THREADPOOLS.limit(limits=1):
            return function(*args, **kwargs)

    return wrapper

# --------------------------------------------------------------------------------------
# Gaussian mixture on latents
# --------------------------------------------------------------------------------------


@one_thread
def fit_gmm(
    sample: np.ndarray,
    *,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 12),
    n_init: int = 2,
    seed: int = 0,
) -> tuple[GaussianMixture, dict[int, float]]:
    """Fit a full-covariance Gaussian mixture, choosing the number of components by BIC.

    Mixtures are fitted for ``k = 1, 2, …`` in turn. Each ``k`` keeps the more likely of
    two fits: ``n_init`` k-means++ initialisations, and the previous ``k - 1`` solution
    with its broadest component (largest covariance eigenvalue) split in two along
    that axis. Why: with groups as imbalanced as helium patterns (80 % round), k-means
    initialisations split the dominant group and never find a small group that the
    previous mixture merged with a neighbour; the split step does (a divisive scheme
    in the spirit of split-and-merge EM, Ueda et al., Neural Comput. 12, 2109 (2000)).

    Parameters
    ----------
    sample : ndarray of shape (n_samples, n_features)
        Latent vectors (units of the latent space) used for fitting.
    k : int, optional
        Number of components. If given, BIC is reported for this ``k`` only.
    k_range : (int, int), default=(2, 12)
        Inclusive range of ``k`` compared when ``k`` is None; the lowest BIC wins.
    n_init : int, default=2
        k-means++ restarts per ``k``.
    seed : int, default=0
        Random seed of the initialisations.

    Returns
    -------
    gmm : GaussianMixture
        The fitted mixture with the lowest BIC.
    bic : dict of int to float
        BIC of every compared ``k`` (lower is better), evaluated on ``sample``.

    Examples
    --------
    >>> from sklearn.datasets import make_blobs
    >>> x, _ = make_blobs(600, centers=3, n_features=4, random_state=0)
    >>> gmm, bic = fit_gmm(x, k_range=(1, 5))
    >>> gmm.n_components
    3
    """
    sample = np.asarray(sample, dtype=np.float64)
    if sample.ndim != 2 or not np.isfinite(sample).all():
        raise AirysortError(
            f"GMM input must be a finite 2-D array (patterns, features), got shape "
            f"{sample.shape!r} with {np.size(sample) - np.isfinite(sample).sum()} non-finite "
            "values; re-run `airysort embed` on the store"
        )
    # A searched range stops at the sample size, as the eigengap's does at its spectrum:
    # the default 2-12 must not fail a store of a few patterns.
    candidates = [k] if k is not None else list(range(k_range[0], min(k_range[1], len(sample)) + 1))
    _check_k_values(candidates or list(range(k_range[0], k_range[1] + 1)), n_rows=len(sample))
    options = {"covariance_type": "full", "reg_covar": 1e-5, "random_state": seed}
    best, bic, previous = None, {}, None
    for n_components in range(1, max(candidates) + 1):
        fits = [GaussianMixture(n_components, n_init=n_init, init_params="k-means++", **options).fit(sample)]
        if previous is not None:
            fits.append(GaussianMixture(n_components, means_init=_split_broadest(previous), **options).fit(sample))
        previous = max(fits, key=lambda fit: fit.lower_bound_)
        if n_components in candidates:
            bic[n_components] = float(previous.bic(sample))
            if best is None or bic[n_components] < bic[best.n_components]:
                best = previous
    return best, bic


def _split_broadest(gmm: GaussianMixture) -> np.ndarray:
    """Means of ``gmm`` with the broadest component replaced by two, ±1 sigma along its axis."""
    values, vectors = np.linalg.eigh(gmm.covariances_)  # ascending: (k, d), (k, d, d)
    broadest = int(np.argmax(values[:, -1]))
    step = np.sqrt(values[broadest, -1]) * vectors[broadest, :, -1]
    centre = gmm.means_[broadest]
    return np.vstack([np.delete(gmm.means_, broadest, axis=0), centre + step, centre - step])


@one_thread
def gmm_posterior_block(block: np.ndarray, *, gmm: GaussianMixture) -> np.ndarray:
    """Posterior component probabilities of one block of rows.

    Parameters
    ----------
    block : ndarray of shape (n_rows, n_features)
        Latent vectors.
    gmm : GaussianMixture
        A fitted mixture with ``k`` components.

    Returns
    -------
    ndarray of float32, shape (n_rows, k)
        Rows sum to 1; ``argmax`` along axis 1 is ``gmm.predict``.
    """
    if len(block) == 0:
        return np.zeros((0, gmm.n_components), dtype=np.float32)
    return gmm.predict_proba(np.asarray(block, dtype=np.float64)).astype(np.float32)


def _check_k_values(candidates: list[int], *, n_rows: int) -> None:
    bad = [k for k in candidates if not (1 <= k <= n_rows)]
    if not candidates or bad:
        raise AirysortError(
            f"number of clusters {bad or candidates!r} is impossible for {n_rows} sampled "
            f"patterns; choose k between 1 and {n_rows} (--k or a smaller k range)"
        )


# --------------------------------------------------------------------------------------
# Nyström spectral clustering
# --------------------------------------------------------------------------------------


def _require_two(landmarks: np.ndarray) -> None:
    if len(landmarks) < 2:
        raise AirysortError(
            f"spectral clustering needs at least 2 patterns, got {len(landmarks)}; ingest more"
        )


@one_thread
def median_gamma(landmarks: np.ndarray) -> float:
    """RBF ``gamma`` by the median heuristic: ``1 / (2 median|a - b|²)`` over landmark pairs.

    The default for images. Why not a local scale: distances between noisy
    high-dimensional image features concentrate, so the distance to the 7th nearest
    neighbour sits near the noise floor; such a narrow kernel cuts off atypical
    patterns as tiny clusters of their own (on a simulated balanced beamtime, one cluster
    of 80 % of the patterns plus outliers, ARI 0.13 against the coarse groups, against
    ARI 0.30 with this scale).

    Parameters
    ----------
    landmarks : ndarray of shape (m, n_features)

    Returns
    -------
    float
        ``gamma`` in inverse squared feature units.
    """
    _require_two(landmarks)
    distances = euclidean_distances(landmarks)
    sigma = float(np.median(distances[np.triu_indices(len(landmarks), k=1)]))
    return _rbf_gamma(sigma, scale="median distance")


@one_thread
def knn_gamma(landmarks: np.ndarray, *, n_neighbors: int = 7) -> float:
    """RBF ``gamma`` from the local scale of the data (Zelnik-Manor & Perona 2004).

    ``sigma`` is the median, over landmarks, of the distance to their
    ``n_neighbors``-th nearest other landmark, and ``gamma = 1 / (2 sigma²)``. Suits
    low-dimensional data with clusters of any shape (nested rings); pass it as
    ``gamma`` explicitly.

    Parameters
    ----------
    landmarks : ndarray of shape (m, n_features)
    n_neighbors : int, default=7

    Returns
    -------
    float
        ``gamma`` in inverse squared feature units.
    """
    _require_two(landmarks)
    distances = euclidean_distances(landmarks)
    np.fill_diagonal(distances, np.inf)
    rank = min(n_neighbors, len(landmarks) - 1) - 1
    sigma = float(np.median(np.partition(distances, rank, axis=1)[:, rank]))
    return _rbf_gamma(sigma, scale="median neighbour distance")


def _rbf_gamma(sigma: float, *, scale: str) -> float:
    """``gamma = 1 / (2 sigma²)`` of the RBF kernel; refuses a zero length scale."""
    if not sigma > 0:
        raise AirysortError(
            f"spectral landmarks are all identical ({scale} 0); the features carry "
            "no information — check that `image` is not constant"
        )
    return 1.0 / (2.0 * sigma**2)


@one_thread
def landmark_basis(landmarks: np.ndarray, *, gamma: float, rtol: float = 1e-8) -> np.ndarray:
    """Nyström factor ``P`` with ``P Pᵀ = K(L, L)⁺`` (rank-truncated pseudo-inverse).

    Eigenvalues below ``rtol`` times the largest are dropped rather than clipped:
    the near-singular directions of an RBF kernel on close landmarks would otherwise
    amplify rounding noise by up to ``1/sqrt(rtol)``.

    Parameters
    ----------
    landmarks : ndarray of shape (m, n_features)
    gamma : float
        RBF parameter, ``K(a, b) = exp(-gamma |a - b|²)``.
    rtol : float, default=1e-8

    Returns
    -------
    ndarray of float64, shape (m, r)
        ``r <= m`` kept directions; Nyström features are ``K(X, L) @ P``.
    """
    kernel = rbf_kernel(landmarks, gamma=gamma)
    values, vectors = scipy.linalg.eigh(kernel)
    keep = values > rtol * values.max()
    return vectors[:, keep] / np.sqrt(values[keep])


def nystrom_features_block(
    block: np.ndarray, *, landmarks: np.ndarray, basis: np.ndarray, gamma: float
) -> np.ndarray:
    """Nyström features ``Φ = K(block, L) P`` of one block of rows.

    Parameters
    ----------
    block : ndarray of shape (n_rows, n_features)
    landmarks : ndarray of shape (m, n_features)
    basis : ndarray of shape (m, r)
        From :func:`landmark_basis`.
    gamma : float

    Returns
    -------
    ndarray of float64, shape (n_rows, r)
    """
    return rbf_kernel(np.asarray(block, dtype=np.float64), landmarks, gamma=gamma) @ basis


@one_thread
def feature_sum_block(block: np.ndarray, *, landmarks: np.ndarray, basis: np.ndarray, gamma: float) -> np.ndarray:
    """Column sums of the Nyström features of one block (first pass, for degrees).

    Returns
    -------
    ndarray of float64, shape (1, r)
        Summed over blocks this is ``s = Φᵀ 1 = Pᵀ Cᵀ 1``.
    """
    # Sum the kernel rows before applying P: one (m,) @ (m, r) product instead of n.
    kernel = rbf_kernel(np.asarray(block, dtype=np.float64), landmarks, gamma=gamma)
    return (kernel.sum(axis=0) @ basis)[None]


def _scaled_kernel(block: np.ndarray, *, landmarks, basis, gamma, feature_sum) -> np.ndarray:
    """``D^(-1/2) C`` for one block: kernel rows divided by the square root of the degrees.

    The degrees ``d = Φ s = C (P s)`` need only a matrix-vector product. Nyström
    degrees can come out tiny or negative for rows far from every landmark
    (approximation error); Fowlkes et al. take them as they are, we keep them positive.
    """
    kernel = rbf_kernel(np.asarray(block, dtype=np.float64), landmarks, gamma=gamma)
    degrees = kernel @ (basis @ feature_sum)
    degrees = np.maximum(degrees, 1e-12 * max(float(np.abs(feature_sum).sum()), 1.0))
    return kernel / np.sqrt(degrees)[:, None]


@one_thread
def weighted_gram_block(block: np.ndarray, *, feature_sum: np.ndarray, **nystrom) -> np.ndarray:
    """``Σ φ φᵀ / d`` over the rows of one block (second pass).

    Parameters
    ----------
    block : ndarray of shape (n_rows, n_features)
    feature_sum : ndarray of shape (r,)
        ``s = Φᵀ 1`` over all rows.
    **nystrom
        ``landmarks``, ``basis``, ``gamma`` as for :func:`nystrom_features_block`.

    Returns
    -------
    ndarray of float64, shape (1, r, r)
        Summed over blocks this is ``G = Ψᵀ Ψ = Pᵀ (Cᵀ D⁻¹ C) P``.
    """
    scaled = _scaled_kernel(block, feature_sum=feature_sum, **nystrom)
    basis = nystrom["basis"]
    return (basis.T @ (scaled.T @ scaled) @ basis)[None]


def spectral_projection(gram: np.ndarray, *, n_vectors: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decompose ``G = Ψᵀ Ψ`` and return the projection onto its leading vectors.

    Parameters
    ----------
    gram : ndarray of shape (r, r)
    n_vectors : int
        Number of leading eigenvectors kept (at least the number of clusters).

    Returns
    -------
    eigenvalues : ndarray of shape (r,)
        All eigenvalues of the normalised affinity, descending (the first is ≈ 1).
    projection : ndarray of shape (r, n_vectors)
        ``U_k Λ_k^(-1/2)``, so that ``V = Ψ @ projection`` has orthonormal columns.
    """
    values, vectors = scipy.linalg.eigh((gram + gram.T) / 2)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    lead = np.maximum(values[:n_vectors], 1e-12)
    return values, vectors[:, :n_vectors] / np.sqrt(lead)


def eigengap_k(eigenvalues: np.ndarray, *, k_range: tuple[int, int]) -> int:
    """Number of clusters at the largest gap ``λ_k - λ_(k+1)`` with ``k`` in ``k_range``.

    Parameters
    ----------
    eigenvalues : ndarray of shape (r,)
        Descending eigenvalues of the normalised affinity.
    k_range : (int, int)
        Inclusive range of allowed ``k``.

    Returns
    -------
    int
    """
    low, high = k_range[0], min(k_range[1], len(eigenvalues) - 1)
    if high < low:
        raise AirysortError(
            f"k range {k_range!r} needs more than {len(eigenvalues)} spectral directions; "
            "use more landmarks or a smaller --k"
        )
    ks = np.arange(low, high + 1)
    gaps = eigenvalues[ks - 1] - eigenvalues[ks]
    return int(ks[np.argmax(gaps)])


@one_thread
def spectral_embed_block(
    block: np.ndarray, *, feature_sum: np.ndarray, projection: np.ndarray, **nystrom
) -> np.ndarray:
    """Row-normalised spectral embedding of one block of rows (third pass).

    Parameters
    ----------
    block : ndarray of shape (n_rows, n_features)
    feature_sum : ndarray of shape (r,)
    projection : ndarray of shape (r, k)
        From :func:`spectral_projection`.
    **nystrom
        ``landmarks``, ``basis``, ``gamma``.

    Returns
    -------
    ndarray of float64, shape (n_rows, k)
        Unit-length rows (Ng, Jordan & Weiss), ready for k-means.
    """
    scaled = _scaled_kernel(block, feature_sum=feature_sum, **nystrom)
    vectors = scaled @ (nystrom["basis"] @ projection)  # (m, k) folded first: cheap per row
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@one_thread
def spectral_assign_block(block: np.ndarray, *, kmeans: KMeans, **embedding) -> np.ndarray:
    """Cluster index of every row of one block.

    Parameters
    ----------
    block : ndarray of shape (n_rows, n_features)
    kmeans : KMeans
        Fitted on embedded sample rows.
    **embedding
        Arguments of :func:`spectral_embed_block`.

    Returns
    -------
    ndarray of int32, shape (n_rows,)
    """
    if len(block) == 0:
        return np.zeros(0, dtype=np.int32)
    return kmeans.predict(spectral_embed_block(block, **embedding)).astype(np.int32)


@dataclass
class NystromSpectralModel:
    """Everything needed to assign new rows: fitted on landmarks plus two data passes.

    Attributes
    ----------
    landmarks : ndarray of shape (m, n_features)
    gamma : float
    basis : ndarray of shape (m, r)
    feature_sum : ndarray of shape (r,)
    eigenvalues : ndarray of shape (r,)
    projection : ndarray of shape (r, k)
    kmeans : KMeans or None
    """

    landmarks: np.ndarray
    gamma: float
    basis: np.ndarray
    feature_sum: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None
    projection: np.ndarray | None = None
    kmeans: KMeans | None = None

    @property
    def nystrom(self) -> dict:
        """Keyword arguments of :func:`nystrom_features_block`."""
        return {"landmarks": self.landmarks, "basis": self.basis, "gamma": self.gamma}

    @property
    def embedding(self) -> dict:
        """Keyword arguments of :func:`spectral_embed_block`."""
        return {**self.nystrom, "feature_sum": self.feature_sum, "projection": self.projection}


def start_spectral_model(
    landmarks: np.ndarray, *, gamma: float | None = None
) -> NystromSpectralModel:
    """Landmark kernel and basis; ``gamma`` from :func:`median_gamma` if not given."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if gamma is None:
        gamma = median_gamma(landmarks)
    basis = landmark_basis(landmarks, gamma=gamma)
    return NystromSpectralModel(landmarks=landmarks, gamma=float(gamma), basis=basis)


@one_thread
def finish_spectral_model(
    model: NystromSpectralModel,
    *,
    gram: np.ndarray,
    sample: np.ndarray,
    k: int | None,
    k_range: tuple[int, int],
    seed: int,
) -> NystromSpectralModel:
    """Choose ``k`` (eigengap unless given), project, and fit k-means on ``sample`` rows."""
    eigenvalues, _ = spectral_projection(gram, n_vectors=1)
    if k is None:
        k = eigengap_k(eigenvalues, k_range=k_range)
    _check_k_values([k], n_rows=min(len(sample), len(eigenvalues)))
    model.eigenvalues, model.projection = spectral_projection(gram, n_vectors=k)
    embedded = spectral_embed_block(sample, **model.embedding)
    model.kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(embedded)
    return model


def draw_sample(n_rows: int, *, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(size, n_rows)`` rows drawn at random without replacement.

    Sorted so that reading them from a chunked store touches each chunk once.
    """
    if n_rows < 1:
        raise AirysortError("the store has no patterns to cluster; ingest some first")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, min(int(size), n_rows), replace=False))


def choose_landmarks(sample: np.ndarray, *, n_landmarks: int, seed: int) -> np.ndarray:
    """``n_landmarks`` rows of ``sample`` at random (all of them if fewer), shape (m, n_features)."""
    rng = np.random.default_rng(seed + 1)
    return np.asarray(sample)[np.sort(rng.permutation(len(sample))[:n_landmarks])]


def nystrom_spectral_clustering(
    features: np.ndarray,
    *,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 12),
    sample_size: int = 20000,
    n_landmarks: int = 500,
    gamma: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, NystromSpectralModel]:
    """In-memory Nyström spectral clustering: the oracle of the Dask version.

    Parameters
    ----------
    features : ndarray of shape (n, n_features)
    k : int, optional
        Number of clusters; chosen by the eigengap over ``k_range`` if None.
    k_range : (int, int), default=(2, 12)
    sample_size : int, default=20000
        Rows drawn at random to fit k-means on (and to draw the landmarks from).
    n_landmarks : int, default=500
        Landmarks, drawn at random from the sample (all of it if smaller).
    gamma : float, optional
        RBF parameter; the median heuristic :func:`median_gamma` if None.
    seed : int, default=0

    Returns
    -------
    labels : ndarray of int32, shape (n,)
    model : NystromSpectralModel

    Examples
    --------
    >>> from sklearn.datasets import make_blobs
    >>> x, _ = make_blobs(300, centers=3, random_state=0)
    >>> labels, model = nystrom_spectral_clustering(x, k=3, n_landmarks=100)
    >>> sorted(set(labels.tolist()))
    [0, 1, 2]
    """
    features = np.asarray(features, dtype=np.float64)
    sample = features[draw_sample(len(features), size=sample_size, seed=seed)]
    model = start_spectral_model(choose_landmarks(sample, n_landmarks=n_landmarks, seed=seed), gamma=gamma)
    model.feature_sum = feature_sum_block(features, **model.nystrom)[0]
    gram = weighted_gram_block(features, feature_sum=model.feature_sum, **model.nystrom)[0]
    model = finish_spectral_model(model, gram=gram, sample=sample, k=k, k_range=k_range, seed=seed)
    return spectral_assign_block(features, kmeans=model.kmeans, **model.embedding), model


# --------------------------------------------------------------------------------------
# Image features for the spectral baseline
# --------------------------------------------------------------------------------------


def downsample_flatten_block(block: np.ndarray, *, factor: int) -> np.ndarray:
    """Average ``factor`` × ``factor`` pixel cells of each image and flatten.

    Parameters
    ----------
    block : ndarray of shape (n_rows, iy, ix)
        Preprocessed images.
    factor : int
        Cell size in pixels; trailing rows/columns that do not fill a cell are dropped.

    Returns
    -------
    ndarray of float32, shape (n_rows, (iy // factor) * (ix // factor))
    """
    n, ny, nx = block.shape
    cy, cx = ny // factor, nx // factor
    cells = np.asarray(block[:, : cy * factor, : cx * factor], dtype=np.float32)
    cells = cells.reshape(n, cy, factor, cx, factor).mean(axis=(2, 4))
    return cells.reshape(n, cy * cx)


@one_thread
def image_features_block(block: np.ndarray, *, factor: int, pca: PCA) -> np.ndarray:
    """Spectral-clustering features of one block of images: downsample, flatten, PCA.

    Returns
    -------
    ndarray of float64, shape (n_rows, pca.n_components_)
    """
    if len(block) == 0:
        return np.zeros((0, pca.n_components_))
    return pca.transform(downsample_flatten_block(block, factor=factor)).astype(np.float64)


def downsample_factor(shape: tuple[int, int], *, max_side: int = 32) -> int:
    """Smallest integer factor that brings both sides of ``shape`` to ``<= max_side``."""
    return max(1, -(-max(shape) // max_side))


@one_thread
def fit_image_pca(flat_sample: np.ndarray, *, n_components: int, seed: int) -> PCA:
    """PCA of downsampled, flattened sample images (``n_components`` capped by their rank).

    Parameters
    ----------
    flat_sample : ndarray of shape (n_samples, n_cells)
        Output of :func:`downsample_flatten_block` for a random sample of images.
    n_components : int
    seed : int

    Returns
    -------
    PCA
        Fitted; ``n_components_`` may be smaller than asked for tiny samples.
    """
    n_components = max(1, min(n_components, flat_sample.shape[0] - 1, flat_sample.shape[1]))
    return PCA(n_components=n_components, random_state=seed).fit(flat_sample)
