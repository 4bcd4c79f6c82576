"""``airysort cluster``: Dask wiring of the clustering kernels.

Each method fits on a random sample held in memory and then maps a per-block kernel of
:mod:`pipeline.cluster_kernels` over every pattern with ``dask.array.map_blocks``, so
the cost of the full pass grows linearly with the number of patterns and runs on any
Dask cluster.

* ``gmm``: Gaussian mixture on the β-TCVAE ``latent`` → ``cluster_gmm`` (pattern) and
  ``cluster_gmm_prob`` (pattern, cluster).
* ``spectral``: the baseline, Nyström spectral clustering of the preprocessed
  ``image`` (downsampled, PCA-reduced) → ``cluster_spectral`` (pattern).
"""

from __future__ import annotations

import time
from typing import Any

import dask.array as da
import numpy as np

from pipeline import cluster_kernels as kernels
from pipeline.errors import AirysortError, check_seed

METHODS = ("gmm", "spectral")
#: Rows per Dask block in the clustering passes: the store's 256-pattern chunks are
#: merged so that each task does enough arithmetic to hide the scheduling overhead, and
#: so that the spectral (landmarks × landmarks) partial sums, one per block, stay few.
BLOCK_ROWS = 16384


def gmm_cluster_array(
    latent: da.Array,
    *,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 12),
    sample_size: int = 20000,
    seed: int = 0,
) -> tuple[da.Array, da.Array, dict[str, Any]]:
    """Fit a GMM on a sample of ``latent`` rows and assign every row.

    Parameters
    ----------
    latent : dask.array of shape (n_patterns, n_latent)
        Latent means, any chunking along rows (a single chunk along columns).
    k : int, optional
        Number of components; chosen by BIC over ``k_range`` if None.
    k_range : (int, int), default=(2, 12)
        Inclusive range of ``k`` scanned by BIC.
    sample_size : int, default=20000
        Rows drawn at random to fit on.
    seed : int, default=0

    Returns
    -------
    labels : dask.array of int32, shape (n_patterns,)
    probabilities : dask.array of float32, shape (n_patterns, k)
    info : dict
        ``k``, ``bic`` (k → BIC of the sample), ``sample_size``.
    """
    latent = latent.rechunk({1: -1})
    rows = kernels.draw_sample(latent.shape[0], size=sample_size, seed=seed)
    sample = _compute(latent[rows], "gmm: reading a sample")
    gmm, bic = kernels.fit_gmm(sample, k=k, k_range=k_range, seed=seed)
    probabilities = latent.map_blocks(
        kernels.gmm_posterior_block,
        gmm=gmm,
        chunks=(latent.chunks[0], (gmm.n_components,)),
        dtype=np.float32,
        meta=np.empty((0, 0), np.float32),
    )
    labels = probabilities.map_blocks(
        _most_probable, drop_axis=1, chunks=(probabilities.chunks[0],), dtype=np.int32,
        meta=np.empty((0,), np.int32),
    )
    info = {"k": int(gmm.n_components), "bic": bic, "sample_size": int(len(sample))}
    return labels, probabilities, info


def spectral_cluster_array(
    features: da.Array,
    *,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 12),
    sample_size: int = 20000,
    n_landmarks: int = 500,
    gamma: float | None = None,
    seed: int = 0,
) -> tuple[da.Array, dict[str, Any]]:
    """Nyström spectral clustering of every row of ``features`` (Fowlkes et al. 2004).

    Two reductions over all rows (feature sums for the degrees, then the normalised
    Gram matrix) and one assignment pass; see :mod:`pipeline.cluster_kernels`. The
    result equals :func:`pipeline.cluster_kernels.nystrom_spectral_clustering` on the
    same array in memory, up to the order of floating-point sums.

    Parameters
    ----------
    features : dask.array of shape (n_patterns, n_features)
        Best persisted (it is read three times).
    k : int, optional
        Number of clusters; largest eigengap over ``k_range`` if None.
    k_range : (int, int), default=(2, 12)
    sample_size : int, default=20000
        Rows drawn at random: k-means is fitted on them, landmarks drawn from them.
    n_landmarks : int, default=500
    gamma : float, optional
        RBF parameter in inverse squared feature units; median heuristic if None.
    seed : int, default=0

    Returns
    -------
    labels : dask.array of int32, shape (n_patterns,)
    info : dict
        ``k``, ``gamma``, ``n_landmarks``, leading ``eigenvalues``, ``sample_size``.
    """
    features = features.rechunk({1: -1})
    rows = kernels.draw_sample(features.shape[0], size=sample_size, seed=seed)
    sample = _compute(features[rows], "spectral: reading a sample")
    sample = np.asarray(sample, dtype=np.float64)
    model = kernels.start_spectral_model(
        kernels.choose_landmarks(sample, n_landmarks=n_landmarks, seed=seed), gamma=gamma
    )
    rank = model.basis.shape[1]
    # Each block contributes a (1, ...) partial sum; the sums are finished in the graph.
    one_per_block = (1,) * features.numblocks[0]
    model.feature_sum = _compute(features.map_blocks(
        kernels.feature_sum_block,
        **model.nystrom,
        chunks=(one_per_block, (rank,)),
        dtype=np.float64,
        meta=np.empty((0, 0), np.float64),
    ).sum(axis=0), "spectral: degrees (pass 1 of 3)")
    gram = _compute(features.map_blocks(
        kernels.weighted_gram_block,
        feature_sum=model.feature_sum,
        **model.nystrom,
        new_axis=2,
        chunks=(one_per_block, (rank,), (rank,)),
        dtype=np.float64,
        meta=np.empty((0, 0, 0), np.float64),
    ).sum(axis=0), "spectral: normalised affinity (pass 2 of 3)")
    model = kernels.finish_spectral_model(model, gram=gram, sample=sample, k=k, k_range=k_range, seed=seed)
    labels = features.map_blocks(
        kernels.spectral_assign_block,
        kmeans=model.kmeans,
        **model.embedding,
        drop_axis=1,
        chunks=(features.chunks[0],),
        dtype=np.int32,
        meta=np.empty((0,), np.int32),
    )
    info = {
        "k": int(model.kmeans.n_clusters),
        "gamma": model.gamma,
        "n_landmarks": int(len(model.landmarks)),
        "eigenvalues": [round(float(v), 6) for v in model.eigenvalues[: max(k_range[1], model.kmeans.n_clusters) + 1]],
        "sample_size": int(len(sample)),
    }
    return labels, info


def image_features(
    images: da.Array, *, sample_size: int, n_components: int = 50, max_side: int = 32, seed: int = 0
) -> tuple[da.Array, dict[str, Any]]:
    """Downsampled, PCA-reduced image features for the spectral baseline.

    Parameters
    ----------
    images : dask.array of shape (n_patterns, iy, ix)
        Preprocessed images.
    sample_size : int
        Images drawn at random to fit the PCA.
    n_components : int, default=50
    max_side : int, default=32
        Images are block-averaged until both sides are at most this many cells.
    seed : int, default=0

    Returns
    -------
    features : dask.array of float64, shape (n_patterns, n_components)
    info : dict
        ``downsample`` factor, ``pca_components``, ``pca_explained_variance``.
    """
    factor = kernels.downsample_factor(images.shape[1:], max_side=max_side)
    images = images.rechunk({1: -1, 2: -1})
    n_cells = (images.shape[1] // factor) * (images.shape[2] // factor)
    # Downsample inside the graph: a full-resolution sample could be gigabytes.
    picked = images[kernels.draw_sample(images.shape[0], size=sample_size, seed=seed)]
    flat_sample = _compute(picked.map_blocks(
        kernels.downsample_flatten_block,
        factor=factor,
        drop_axis=2,
        chunks=(picked.chunks[0], (n_cells,)),
        dtype=np.float32,
        meta=np.empty((0, 0), np.float32),
    ), "spectral: reading a sample of images")
    pca = kernels.fit_image_pca(flat_sample, n_components=n_components, seed=seed)
    features = images.map_blocks(
        kernels.image_features_block,
        factor=factor,
        pca=pca,
        drop_axis=2,
        chunks=(images.chunks[0], (pca.n_components_,)),
        dtype=np.float64,
        meta=np.empty((0, 0), np.float64),
    )
    info = {
        "downsample": factor,
        "pca_components": int(pca.n_components_),
        "pca_explained_variance": round(float(pca.explained_variance_ratio_.sum()), 4),
    }
    return features, info


def cluster_store(
    path: str,
    *,
    method: str = "gmm",
    k: int | None = None,
    k_range: tuple[int, int] = (2, 12),
    sample_size: int = 20000,
    n_landmarks: int = 500,
    gamma: float | None = None,
    seed: int = 0,
    cluster: str = "local",
) -> dict[str, Any]:
    """Cluster every pattern of a store and write ``cluster_<method>``.

    Parameters
    ----------
    path : str
        An airysort store holding ``latent`` (gmm) or ``image`` (spectral).
    method : {"gmm", "spectral"}, default="gmm"
    k : int, optional
        Number of clusters; BIC (gmm) or eigengap (spectral) over ``k_range`` if None.
    k_range : (int, int), default=(2, 12)
    sample_size : int, default=20000
        Patterns drawn at random to fit the mixture, the PCA and k-means on.
    n_landmarks : int, default=500
        Nyström landmarks (spectral only).
    gamma : float, optional
        RBF parameter of the spectral affinity, in inverse squared PCA-feature units;
        the median heuristic if None (spectral only).
    seed : int, default=0
    cluster : str, default="local"
        Dask cluster spec, see :func:`pipeline.dask_cluster.dask_client`; an existing
        client is reused.

    Returns
    -------
    dict
        ``method``, ``k``, ``n_patterns``, ``sizes`` (cluster → patterns), ``variables``
        written, ``seconds``, plus ``bic`` (gmm) or ``eigenvalues``/``gamma`` (spectral).
    """
    from pipeline import store
    from pipeline.dask_cluster import dask_client

    _check_options(
        method=method, k=k, k_range=k_range, sample_size=sample_size, n_landmarks=n_landmarks, gamma=gamma
    )
    seed = check_seed(seed)
    start = time.perf_counter()
    parameters = {
        "method": method, "k": k, "k_range": list(k_range), "sample_size": sample_size,
        "n_landmarks": n_landmarks, "gamma": gamma, "seed": seed,
    }
    with dask_client(cluster) as client:
        dataset = store.open_store(path)
        source = "latent" if method == "gmm" else "image"
        producer = "airysort embed STORE MODEL_DIR" if method == "gmm" else "airysort preprocess STORE"
        if source not in dataset:
            raise AirysortError(
                f"store {str(path)!r} has no {source!r} variable, which --method {method} clusters; "
                f"run `{producer}` first (variables present: {', '.join(sorted(dataset.data_vars))})"
            )
        store.require_every_pattern(dataset, source, remedy=producer.replace("STORE", str(path)))
        variables = {}
        if method == "gmm":
            # Latents are small (10 floats per pattern): read them once into cluster
            # memory in big blocks, for the sample and the assignment pass alike.
            latent = client.persist(dataset["latent"].data.rechunk({0: BLOCK_ROWS}))
            labels, probabilities, info = gmm_cluster_array(
                latent, k=k, k_range=k_range, sample_size=sample_size, seed=seed
            )
            labels, probabilities = client.persist([labels, probabilities])
            variables["cluster_gmm_prob"] = _pattern_array(
                probabilities, ("pattern", "cluster"), "posterior probability of each GMM component"
            )
        else:
            # Features from the store's own chunks (a few hundred images each); only
            # the small feature rows are merged into big blocks, and kept in cluster
            # memory (50 floats per pattern) because the spectral passes read them 3 times.
            features, feature_info = image_features(dataset["image"].data, sample_size=sample_size, seed=seed)
            features = client.persist(features.astype(np.float32).rechunk({0: BLOCK_ROWS}))
            labels, info = spectral_cluster_array(
                features, k=k, k_range=k_range, sample_size=sample_size, n_landmarks=n_landmarks,
                gamma=gamma, seed=seed,
            )
            info.update(feature_info)
            labels = client.persist(labels)
        name = f"cluster_{method}"
        variables[name] = _pattern_array(labels, ("pattern",), f"{method} cluster index (0…k-1)")
        variables[name].attrs.update({"method": method, "k": info["k"]})
        store.write_variables(
            path, variables, command="cluster", parameters=parameters,
            description=f"cluster: writing {name}",
        )
        sizes = np.bincount(labels.compute(), minlength=info["k"])
    return {
        "method": method,
        "n_patterns": int(dataset.sizes["pattern"]),
        **info,
        "sizes": {str(i): int(n) for i, n in enumerate(sizes)},
        "variables": sorted(variables),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _most_probable(probabilities: np.ndarray) -> np.ndarray:
    return probabilities.argmax(axis=1).astype(np.int32)


def _compute(collection: da.Array, description: str) -> np.ndarray:
    """Compute on the current distributed client with a progress bar, else locally."""
    try:
        from distributed import default_client

        default_client()
    except (ImportError, ValueError):
        return collection.compute()
    from pipeline.progress import compute_with_progress

    return compute_with_progress(collection, description)


def _pattern_array(data: da.Array, dims: tuple[str, ...], long_name: str):
    import xarray as xr

    return xr.DataArray(data, dims=dims, attrs={"long_name": long_name})


def _check_options(
    *, method: str, k: int | None, k_range: tuple[int, int], sample_size: int, n_landmarks: int, gamma: float | None
) -> None:
    if method not in METHODS:
        raise AirysortError(f"unknown clustering method {method!r}; use one of {', '.join(METHODS)}")
    if k is not None and k < 1:
        raise AirysortError(f"--k must be a positive number of clusters, got {k!r}")
    if len(k_range) != 2 or not 1 <= k_range[0] <= k_range[1]:
        raise AirysortError(f"k range must be (low, high) with 1 <= low <= high, got {tuple(k_range)!r}")
    if sample_size < 2:
        raise AirysortError(f"sample size must be at least 2 patterns, got {sample_size!r}")
    if n_landmarks < 2:
        raise AirysortError(f"need at least 2 Nyström landmarks, got {n_landmarks!r}")
    if gamma is not None and not gamma > 0:
        raise AirysortError(f"--gamma must be a positive number, got {gamma!r}; omit it for the median heuristic")
