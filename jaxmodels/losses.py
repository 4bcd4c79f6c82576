"""Loss functions (pure JAX).

* :func:`positive_weights`, :func:`weighted_bce` — class-balanced sigmoid binary
  cross-entropy for the multi-label classifier.
* :func:`beta_tcvae_loss`, :func:`tc_decomposition`, :func:`vae_loss_fn` — the
  decomposed ELBO of the β-TCVAE (Chen et al. 2018), at the bottom.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def positive_weights(labels: np.ndarray, *, max_weight: float = 20.0) -> np.ndarray:
    """Per-class weight of positive examples for :func:`weighted_bce`.

    The weight is the negative-to-positive ratio ``n_neg / n_pos`` of each class,
    so that a rare class (Layered: 0.6 % of the real data) contributes as much to
    the loss as its absent examples, clipped to ``[1 / max_weight, max_weight]``
    to keep classes with a handful of examples from dominating.

    Parameters
    ----------
    labels : ndarray of shape (n_patterns, n_classes)
        0/1 training labels.
    max_weight : float, default=20.0
        Clipping bound.

    Returns
    -------
    ndarray of float32, shape (n_classes,)
    """
    labels = np.asarray(labels, dtype=np.float64)
    n_pos = labels.sum(axis=0)
    n_neg = len(labels) - n_pos
    ratio = np.where(n_pos > 0, n_neg / np.maximum(n_pos, 1), 1.0)
    return np.clip(ratio, 1.0 / max_weight, max_weight).astype(np.float32)


def weighted_bce(
    logits: jax.Array,
    targets: jax.Array,
    *,
    pos_weight: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Mean sigmoid binary cross-entropy with weighted positives.

    ``-[w_c y log σ(z) + (1 - y) log(1 - σ(z))]`` averaged over classes and valid
    rows, computed from log-sigmoids for numerical stability.

    Parameters
    ----------
    logits : jax.Array, shape (B, n_classes)
    targets : jax.Array, shape (B, n_classes)
        0/1 labels (any numeric dtype).
    pos_weight : jax.Array, shape (n_classes,), optional
        Weight of positive examples per class (see :func:`positive_weights`).
    valid : jax.Array of bool, shape (B,), optional
        Rows to include; padding rows are excluded.

    Returns
    -------
    jax.Array, shape ()
    """
    targets = targets.astype(logits.dtype)
    weight = 1.0 if pos_weight is None else jnp.asarray(pos_weight, logits.dtype)
    per_entry = -(weight * targets * jax.nn.log_sigmoid(logits)
                  + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
    per_row = per_entry.mean(axis=-1)
    if valid is None:
        return per_row.mean()
    valid = valid.astype(logits.dtype)
    return (per_row * valid).sum() / jnp.maximum(valid.sum(), 1.0)


@functools.lru_cache(maxsize=16)
def classifier_loss_fn(pos_weight: tuple[float, ...], *, augment: bool = True):
    """``loss_fn`` of the multi-label classifier for :func:`jaxmodels.train.fit`.

    Class-weighted BCE on the logits of ``model(x)``, with device-side flip and
    rotation augmentation (:func:`jaxmodels.data.augment`) while training. The
    batch needs ``"x"``, ``"y"`` (0/1 labels, (B, n_classes)) and ``"valid"``.
    Cached per ``(pos_weight, augment)`` so repeated runs reuse one compiled step.

    Parameters
    ----------
    pos_weight : tuple of float
        Positive weight per class (:func:`positive_weights`), as a hashable tuple.
    augment : bool, default=True
        Augment the training batches.

    Returns
    -------
    callable
        ``loss_fn(model, batch, *, key, step, train) -> (loss, {"accuracy": ...})``;
        accuracy is the fraction of correct (pattern, class) decisions at 0.5.
    """
    from jaxmodels.data import augment as augment_batch

    weights = np.asarray(pos_weight, np.float32)

    def loss_fn(model, batch, *, key, step, train):
        x = augment_batch(key, batch["x"]) if (train and augment) else batch["x"]
        logits = model(x)
        valid = batch["valid"]
        loss = weighted_bce(logits, batch["y"], pos_weight=weights, valid=valid)
        correct = ((logits > 0) == (batch["y"] > 0)).mean(axis=-1)
        accuracy = (correct * valid).sum() / jnp.maximum(valid.sum(), 1)
        return loss, {"accuracy": accuracy}

    return loss_fn


# ---------------------------------------------------------------------------------------
# β-TCVAE: decomposed ELBO (Chen et al., "Isolating Sources of Disentanglement in
# Variational Autoencoders", NeurIPS 2018, arXiv:1802.04942).
# ---------------------------------------------------------------------------------------

_LOG_2PI = float(np.log(2.0 * np.pi))


def gaussian_log_density(x: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Element-wise log N(x; mean, exp(logvar)) (nats); arrays broadcast together."""
    return -0.5 * (_LOG_2PI + logvar + (x - mean) ** 2 * jnp.exp(-logvar))


def log_importance_weights(batch_size: int, dataset_size: int, estimator: str) -> jax.Array:
    """Log weights w[i, j] of q(z_i | x_j) in the minibatch estimate of q(z_i).

    q(z_i) = (1/N) Σ_n q(z_i|n) over the whole data set (N patterns) is estimated from the
    M patterns of the batch, z_i being a sample of q(z|x_i), as Σ_j w[i, j] q(z_i|x_j).

    * ``"mws"`` (minibatch-weighted sampling): the same weight for every pair. Chen et
      al. write it as 1/(N M); that shifts log q(z) by the constant −log N and the total
      correlation by (D−1)·log N without changing any gradient, so we use 1/M, which
      keeps the reported terms on the same scale as "mss" (TC ≈ 0 when it should be).
    * ``"mss"`` (minibatch-stratified sampling, Chen et al. appendix C.2): the pattern
      itself has weight 1/N; of the M-1 others one carries the stratum of the N-M data
      points not in the batch, (N-M+1)/(N(M-1)), the rest 1/(M-1). This is unbiased
      for q(z_i) when the others are drawn without replacement.

    Parameters
    ----------
    batch_size : int
        M, patterns in the batch (>= 2 for "mss").
    dataset_size : int
        N, patterns in the whole training set (>= M).
    estimator : {"mss", "mws"}

    Returns
    -------
    array of shape (M, M)
        log w[i, j].
    """
    m, n = int(batch_size), int(dataset_size)
    if n < m:
        raise ValueError(f"dataset_size={n!r} must be >= batch_size={m!r}")
    if estimator == "mws":
        return jnp.full((m, m), -np.log(m), jnp.float32)
    if estimator != "mss":
        raise ValueError(f"estimator must be 'mss' or 'mws', got {estimator!r}")
    if m < 2:
        raise ValueError(f"'mss' needs batch_size >= 2, got {m!r}; use estimator='mws'")
    others = m - 1
    weights = np.full((m, m), 1.0 / others)
    rows = np.arange(m)
    weights[rows, rows] = 1.0 / n
    # Which "other" carries the stratum weight does not matter for unbiasedness (the
    # batch order is random); the next one, cyclically, keeps the matrix simple.
    weights[rows, (rows + 1) % m] = (n - others) / (n * others)
    return jnp.asarray(np.log(weights), jnp.float32)


def tc_decomposition(
    z: jax.Array,
    mean: jax.Array,
    logvar: jax.Array,
    *,
    dataset_size: int,
    estimator: str = "mss",
) -> dict[str, jax.Array]:
    """Minibatch estimates of the three KL terms of the decomposed ELBO.

    KL(q(z|x) || p(z)) averaged over the data splits into
    index-code MI  E[log q(z|x) − log q(z)],
    total correlation  E[log q(z) − Σ_d log q(z_d)] and
    dimension-wise KL  E[Σ_d log q(z_d) − log p(z)], with p(z) = N(0, I).

    Parameters
    ----------
    z : array of shape (M, D)
        One sample of q(z|x_i) per pattern of the batch.
    mean, logvar : arrays of shape (M, D)
        Posterior parameters of the same patterns.
    dataset_size : int
        N, the number of training patterns (for the importance weights).
    estimator : {"mss", "mws"}, default="mss"
        See :func:`log_importance_weights`.

    Returns
    -------
    dict of scalar arrays (nats per pattern)
        ``mi``, ``tc``, ``dwkl``, and ``kl`` (their sum, the usual KL term).
    """
    m = z.shape[0]
    log_w = log_importance_weights(m, dataset_size, estimator)
    # log q(z_i,d | x_j) for every pair (i, j): shape (M, M, D).
    log_qz_pairs = gaussian_log_density(z[:, None, :], mean[None, :, :], logvar[None, :, :])
    log_qz_given_x = gaussian_log_density(z, mean, logvar).sum(axis=1)
    log_qz = jax.nn.logsumexp(log_qz_pairs.sum(axis=2) + log_w, axis=1)
    log_qz_product = jax.nn.logsumexp(log_qz_pairs + log_w[:, :, None], axis=1).sum(axis=1)
    log_pz = gaussian_log_density(z, 0.0, 0.0).sum(axis=1)
    mi = jnp.mean(log_qz_given_x - log_qz)
    tc = jnp.mean(log_qz - log_qz_product)
    dwkl = jnp.mean(log_qz_product - log_pz)
    return {"mi": mi, "tc": tc, "dwkl": dwkl, "kl": mi + tc + dwkl}


def beta_tcvae_loss(
    images: jax.Array,
    recon: jax.Array,
    log_sigma: jax.Array,
    z: jax.Array,
    mean: jax.Array,
    logvar: jax.Array,
    *,
    dataset_size: int,
    alpha: float = 1.0,
    beta: float = 6.0,
    gamma: float = 1.0,
    estimator: str = "mss",
    kl_weight: float | jax.Array = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative decomposed ELBO of the β-TCVAE, per pattern (nats).

    loss = −E[log p(x|z)] + w · (α · MI + β · TC + γ · dimension-wise KL), with
    w = ``kl_weight`` the KL warm-up factor (0 → 1 over the first epochs).

    Parameters
    ----------
    images : array of shape (M, R, R)
        Target patterns at the decoder's resolution.
    recon : array of shape (M, R, R)
        Decoder means.
    log_sigma : scalar array
        Log of the learned noise scale of the Gaussian observation model.
    z, mean, logvar : arrays of shape (M, D)
        Posterior sample and parameters.
    dataset_size : int
        Number of training patterns N.
    alpha, beta, gamma : float, default=1.0, 6.0, 1.0
        Weights of MI, TC and dimension-wise KL (Chen et al. 2018 defaults).
    estimator : {"mss", "mws"}, default="mss"
    kl_weight : float, default=1.0
        Warm-up factor multiplying the three KL terms.

    Returns
    -------
    loss : scalar array
        Mean over the batch of the weighted negative ELBO.
    aux : dict of scalar arrays
        ``recon`` (−log p(x|z)), ``mi``, ``tc``, ``dwkl``, ``kl``, ``elbo`` (the
        unweighted ELBO, a lower bound on log p(x)), ``sigma``.
    """
    pixels = images.reshape(images.shape[0], -1)
    predicted = recon.reshape(recon.shape[0], -1)
    nll = -gaussian_log_density(pixels, predicted, 2.0 * log_sigma).sum(axis=1).mean()
    terms = tc_decomposition(z, mean, logvar, dataset_size=dataset_size, estimator=estimator)
    penalty = alpha * terms["mi"] + beta * terms["tc"] + gamma * terms["dwkl"]
    loss = nll + kl_weight * penalty
    aux = {"recon": nll, **terms, "elbo": -(nll + terms["kl"]), "sigma": jnp.exp(log_sigma)}
    return loss, aux


def vae_loss_fn(
    model: Any,
    batch: dict[str, jax.Array],
    *,
    key: jax.Array,
    step: jax.Array,
    train: bool,
    dataset_size: int,
    alpha: float = 1.0,
    beta: float = 6.0,
    gamma: float = 1.0,
    estimator: str = "mss",
    kl_weight: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The β-TCVAE objective in the form :func:`jaxmodels.train.fit` expects.

    Bind the keyword options with :func:`functools.partial`; ``fit`` supplies
    ``batch`` (``"x"`` (B, H, W, 1), ``"valid"`` (B,)), ``key``, ``step`` and ``train``.

    Training returns :func:`beta_tcvae_loss` with the warm-up weight
    ``kl_weight(step)`` (e.g. an ``optax.linear_schedule`` from 0 to 1; None = 1).
    Validation (``train=False``) returns the negative ELBO with the closed-form
    KL(q(z|x) || p(z)), averaged over the valid rows only: padding rows of the last
    batch must not enter the pairwise estimates of q(z), and the ELBO is comparable
    across epochs whatever the warm-up.
    """
    x = batch["x"][..., 0]
    recon, z, mean, logvar = model(x, key=key)
    target = model.prepare(x)[..., 0]
    log_sigma = model.log_sigma[...]
    if train:
        weight = 1.0 if kl_weight is None else kl_weight(step)
        return beta_tcvae_loss(
            target, recon, log_sigma, z, mean, logvar, dataset_size=dataset_size,
            alpha=alpha, beta=beta, gamma=gamma, estimator=estimator, kl_weight=weight,
        )
    valid = batch["valid"].astype(jnp.float32)
    nll = -gaussian_log_density(
        target.reshape(len(x), -1), recon.reshape(len(x), -1), 2.0 * log_sigma
    ).sum(axis=1)
    kl = 0.5 * (jnp.exp(logvar) + mean**2 - 1.0 - logvar).sum(axis=1)
    n = jnp.maximum(valid.sum(), 1.0)
    loss = ((nll + kl) * valid).sum() / n
    return loss, {"recon": (nll * valid).sum() / n, "kl": (kl * valid).sum() / n}
