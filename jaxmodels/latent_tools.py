"""Looking into the β-TCVAE latent space: traversals and 2-D maps, as PNG figures.

* A *traversal* decodes a reference latent vector while one factor moves across its
  range and the others stay fixed: one row of images per factor shows what that factor
  encodes (droplet size, ellipticity, streak direction, ...).
* A *map* projects the latent means of many patterns to 2-D (PCA or t-SNE from
  scikit-learn) and colours them by label group or cluster, to "discriminate
  characteristic features directly in latent space" (Zimmermann et al. 2019).

:func:`encode_patterns` is the per-block kernel of ``airysort embed``. Everything here
works on in-memory NumPy arrays; the store wiring is in
:mod:`pipeline.embed`. Figures are drawn with matplotlib's object API (no pyplot), which
is safe in threads and needs no display.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


def encode_patterns(
    model: Any, images: np.ndarray, *, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and log-variances of a block of patterns, in fixed-size batches.

    Parameters
    ----------
    model : jaxmodels.vae.BetaTCVAE
        Trained model (eval mode).
    images : array of shape (n, iy, ix)
        Preprocessed patterns.
    batch_size : int, default=128
        Patterns per forward pass; the last batch is zero-padded so that every call has
        the same shape and the encoder compiles once.

    Returns
    -------
    mean, logvar : ndarrays of shape (n, latent_dim), float32
    """
    import jax.numpy as jnp
    from flax import nnx

    images = np.asarray(images, np.float32)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (n, iy, ix), got {images.shape!r}")
    n = len(images)
    size = max(1, min(batch_size, n))
    means, logvars = [], []
    encode = nnx.cached_partial(_jitted_encode(), model)  # one graph walk for all batches
    for lo in range(0, n, size):
        batch = images[lo : lo + size]
        filled = len(batch)
        if filled < size:
            batch = np.concatenate([batch, np.zeros((size - filled, *batch.shape[1:]), np.float32)])
        mean, logvar = encode(jnp.asarray(batch))
        means.append(np.asarray(mean)[:filled])
        logvars.append(np.asarray(logvar)[:filled])
    if not means:
        z = model.latent_dim
        return np.zeros((0, z), np.float32), np.zeros((0, z), np.float32)
    return np.concatenate(means), np.concatenate(logvars)


def decode_latents(model: Any, z: np.ndarray) -> np.ndarray:
    """Decoded patterns (n, R, R) of latent vectors z (n, latent_dim), jit-compiled."""
    import jax.numpy as jnp

    return np.asarray(_jitted_decode()(model, jnp.asarray(z, jnp.float32)))


@functools.cache
def _jitted_decode() -> Callable:
    from flax import nnx

    return nnx.jit(lambda model, z: model.decode(z))


@functools.cache
def _jitted_encode() -> Callable:
    from flax import nnx

    return nnx.jit(lambda model, x: model.encode(x))


def traversal_latents(
    center: np.ndarray, *, scales: np.ndarray, n_steps: int = 7, span: float = 2.5
) -> np.ndarray:
    """Latent vectors of a traversal: each factor in turn swept around ``center``.

    Parameters
    ----------
    center : array of shape (D,)
        Reference latent vector (e.g. the median latent mean of the data).
    scales : array of shape (D,)
        Step unit of each factor, e.g. the spread of its latent means over the data.
    n_steps : int, default=7
        Images per factor.
    span : float, default=2.5
        The sweep goes from ``center - span * scale`` to ``center + span * scale``.

    Returns
    -------
    ndarray of shape (D, n_steps, D), float32
        ``out[d, s]`` is ``center`` with factor ``d`` replaced by its ``s``-th value.
    """
    center = np.asarray(center, np.float32)
    scales = np.asarray(scales, np.float32)
    if center.ndim != 1 or scales.shape != center.shape:
        raise ValueError(
            f"center and scales must be 1-D of equal length, got {center.shape!r} and "
            f"{scales.shape!r}"
        )
    if n_steps < 2:
        raise ValueError(f"n_steps must be >= 2, got {n_steps!r}")
    d = center.size
    offsets = np.linspace(-span, span, n_steps, dtype=np.float32)
    out = np.broadcast_to(center, (d, n_steps, d)).copy()
    for k in range(d):
        out[k, :, k] = center[k] + offsets * scales[k]
    return out


def traversal_grid(
    decode: Callable[[np.ndarray], np.ndarray],
    latents: np.ndarray,
    *,
    n_steps: int = 7,
    span: float = 2.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded traversal images around the median of ``latents``.

    Parameters
    ----------
    decode : callable
        ``decode(z)`` with z of shape (B, D) returns images of shape (B, R, R).
    latents : array of shape (n, D)
        Latent means of (a sample of) the patterns; their median is the reference point
        and their spread (inter-quartile range / 1.35, a robust standard deviation) the
        step unit of each factor.
    n_steps, span
        See :func:`traversal_latents`.

    Returns
    -------
    images : ndarray of shape (D, n_steps, R, R)
    spread : ndarray of shape (D,)
        The step unit used for each factor; near-zero values mark inactive factors.
    """
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 2 or len(latents) < 2:
        raise ValueError(f"latents must have shape (n >= 2, D), got {latents.shape!r}")
    center = np.median(latents, axis=0)
    q75, q25 = np.percentile(latents, [75, 25], axis=0)
    spread = np.maximum((q75 - q25) / 1.35, 1e-3).astype(np.float32)
    grid = traversal_latents(center, scales=spread, n_steps=n_steps, span=span)
    d = grid.shape[0]
    images = np.asarray(decode(grid.reshape(d * n_steps, d)))
    return images.reshape(d, n_steps, *images.shape[1:]), spread


def embed_2d(latents: np.ndarray, *, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D coordinates of latent vectors by PCA or t-SNE (scikit-learn).

    Parameters
    ----------
    latents : array of shape (n, D)
    method : {"pca", "tsne"}, default="pca"
        PCA is linear and instantaneous; t-SNE (on the standardised latents) separates
        clusters better but costs O(n log n) and should see at most a few thousand points.
    seed : int, default=0

    Returns
    -------
    ndarray of shape (n, 2), float32
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    latents = np.asarray(latents, np.float64)
    if latents.ndim != 2 or latents.shape[0] < 3:
        raise ValueError(f"latents must have shape (n >= 3, D), got {latents.shape!r}")
    if method == "pca":
        coords = PCA(n_components=2, random_state=seed).fit_transform(latents)
    elif method == "tsne":
        scaled = StandardScaler().fit_transform(latents)
        perplexity = float(min(30.0, (len(latents) - 1) / 3.0))
        coords = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed
        ).fit_transform(scaled)
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    return coords.astype(np.float32)


def save_traversal_png(
    images: np.ndarray,
    path: str | Path,
    *,
    spread: np.ndarray | None = None,
    title: str = "Latent traversals",
) -> Path:
    """Write a traversal grid (rows: factors, columns: steps) as a PNG.

    Parameters
    ----------
    images : array of shape (D, n_steps, R, R)
        From :func:`traversal_grid`.
    path : path
        Output PNG.
    spread : array of shape (D,), optional
        Printed next to each row: the data spread of that factor.
    title : str
    """
    from matplotlib.figure import Figure

    images = np.asarray(images)
    d, steps = images.shape[:2]
    figure = Figure(figsize=(1.1 * steps + 1.0, 1.1 * d + 0.6), dpi=100)
    axes = figure.subplots(d, steps, squeeze=False)
    # One colour scale per row: each factor's effect is visible even when it is small.
    for k in range(d):
        lo, hi = np.percentile(images[k], [1, 99])
        for s in range(steps):
            axis = axes[k, s]
            axis.imshow(images[k, s], cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1)
            axis.set_xticks([])
            axis.set_yticks([])
        label = f"z{k}" if spread is None else f"z{k}\n±{float(spread[k]):.2f}"
        axes[k, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle(title)
    path = Path(path)
    figure.savefig(path)
    return path


def save_map_png(
    coords: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    path: str | Path,
    *,
    title: str = "Latent space",
    xlabel: str = "component 1",
    ylabel: str = "component 2",
) -> Path:
    """Scatter plot of 2-D latent coordinates, one colour per group, as a PNG.

    Parameters
    ----------
    coords : array of shape (n, 2)
    groups : sequence of str, length n
        Group of each point (coarse label group or cluster id); "" is drawn in grey as
        "unlabelled".
    path : path
        Output PNG.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    coords = np.asarray(coords)
    groups = np.asarray(groups).astype(str)
    if coords.shape != (len(groups), 2):
        raise ValueError(
            f"coords must have shape ({len(groups)}, 2) to match groups, got {coords.shape!r}"
        )
    figure = Figure(figsize=(6.5, 5.5), dpi=100)
    axis = figure.subplots()
    names = sorted(set(groups) - {""})
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    if (groups == "").any():
        take = groups == ""
        axis.scatter(*coords[take].T, s=4, c="lightgrey", label="unlabelled", alpha=0.5)
    for i, name in enumerate(names):
        take = groups == name
        axis.scatter(
            *coords[take].T, s=5, color=palette(i % palette.N), label=f"{name} ({take.sum()})",
            alpha=0.7,
        )
    axis.legend(markerscale=3, fontsize=8, loc="best")
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path
