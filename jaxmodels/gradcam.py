"""Grad-CAM++ heat maps: which part of a pattern made the network predict a class.

Chattopadhay et al., "Grad-CAM++: Improved Visual Explanations for Deep
Convolutional Networks", WACV 2018. For a class score S (the logit), feature maps
A^k of the last convolutional layer and Y = exp(S), the pixel weights are

    α^k_ij = ∂²Y/∂(A^k_ij)² / (2 ∂²Y/∂(A^k_ij)² + Σ_ab A^k_ab ∂³Y/∂(A^k_ij)³),

the channel weights ``w_k = Σ_ij α^k_ij · relu(∂Y/∂A^k_ij)`` and the map
``L = relu(Σ_k w_k A^k)``, upsampled to the input and scaled to [0, 1].

Two ways to get the higher derivatives (``derivatives=``):

* ``"exact"`` (default): the diagonal second and third derivatives of Y with
  respect to every feature element, by nested forward-mode ``jax.jvp`` along each
  element (cheap: the head after the feature maps is small).
* ``"exp"``: the paper's closed form ∂ⁿY/∂Aⁿ = Y·(∂S/∂A)ⁿ, exact when S is
  piecewise linear in A (ReLU/pooling/linear heads, as in :class:`ResNet`).

The two agree on such heads (tested), and the common factor Y is scaled by
``exp(-S)`` first so that large logits do not overflow; it cancels in α and in
the normalised map.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
from flax import nnx


def _derivatives_exact(score: Callable[[jax.Array], jax.Array], features: jax.Array):
    """First, and diagonal second and third derivatives of exp(S - S₀) w.r.t. every
    element of ``features`` (one sample, shape (h, w, K))."""
    s0 = jax.lax.stop_gradient(score(features))

    def y(a):
        return jnp.exp(score(a) - s0)

    def along(direction):
        d1 = lambda a: jax.jvp(y, (a,), (direction,))[1]
        d2 = lambda a: jax.jvp(d1, (a,), (direction,))[1]
        d3 = lambda a: jax.jvp(d2, (a,), (direction,))[1]
        return d1(features), d2(features), d3(features)

    n = features.size
    directions = jnp.eye(n, dtype=features.dtype).reshape(n, *features.shape)
    # lax.map in slices bounds memory to batch_size one-hot tangents at a time.
    d1, d2, d3 = jax.lax.map(along, directions, batch_size=min(n, 512))
    return (d.reshape(features.shape) for d in (d1, d2, d3))


def _derivatives_exp(score: Callable[[jax.Array], jax.Array], features: jax.Array):
    """Closed form of the exponential trick: Y' = g, Y'' = g², Y''' = g³ (Y scaled to 1)."""
    g = jax.grad(score)(features)
    return g, g**2, g**3


def gradcam_plus_plus_maps(
    score: Callable[[jax.Array], jax.Array],
    features: jax.Array,
    *,
    derivatives: Literal["exact", "exp"] = "exact",
) -> jax.Array:
    """Grad-CAM++ map of one sample at feature resolution.

    Parameters
    ----------
    score : callable
        ``score(features) -> scalar``: the class logit as a function of the
        feature maps of this sample.
    features : jax.Array, shape (h, w, K)
        Feature maps A^k of the sample.
    derivatives : {"exact", "exp"}, default="exact"
        How the second and third derivatives are obtained (module docstring).

    Returns
    -------
    jax.Array, shape (h, w)
        ``relu(Σ_k w_k A^k)``, not normalised.
    """
    if derivatives == "exact":
        d1, d2, d3 = _derivatives_exact(score, features)
    elif derivatives == "exp":
        d1, d2, d3 = _derivatives_exp(score, features)
    else:
        raise ValueError(f"derivatives must be 'exact' or 'exp', got {derivatives!r}")
    sum_a = features.sum(axis=(0, 1), keepdims=True)  # Σ_ab A^k_ab, per channel
    denominator = 2.0 * d2 + sum_a * d3
    # Where the denominator vanishes the gradient is zero too: α = 0 (as in the paper).
    alpha = jnp.where(denominator != 0, d2 / jnp.where(denominator != 0, denominator, 1.0), 0.0)
    weights = (alpha * jax.nn.relu(d1)).sum(axis=(0, 1))  # (K,)
    return jax.nn.relu((features * weights).sum(axis=-1))


def gradcam_plus_plus(
    features_fn: Callable[[jax.Array], jax.Array],
    head_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    class_index: int,
    *,
    derivatives: Literal["exact", "exp"] = "exact",
) -> jax.Array:
    """Grad-CAM++ heat maps of a batch for one class, at input resolution.

    Parameters
    ----------
    features_fn : callable
        ``features_fn(x) -> A``, shape (B, h, w, K): the network up to the explained
        layer (:meth:`ResNet.features`), in eval mode.
    head_fn : callable
        ``head_fn(A) -> logits``, shape (B, n_classes): the rest of the network; it
        must treat samples independently (eval-mode batch norm).
    x : jax.Array, shape (B, H, W, C)
        Inputs.
    class_index : int or 0-d int array
        Class to explain.
    derivatives : {"exact", "exp"}, default="exact"

    Returns
    -------
    jax.Array, shape (B, H, W)
        Heat maps scaled to [0, 1] per sample (all zero where nothing supports the
        class), bilinearly upsampled to the input size.

    Examples
    --------
    >>> heat = gradcam_plus_plus(model.features, model.head, images, class_index=4)
    """
    features = features_fn(x)

    def one(sample_features):
        score = lambda a: head_fn(a[None])[0, class_index]
        return gradcam_plus_plus_maps(score, sample_features, derivatives=derivatives)

    maps = jax.vmap(one)(features)
    height, width = x.shape[1:3]
    maps = jax.image.resize(maps, (maps.shape[0], height, width), method="bilinear")
    maps = jax.nn.relu(maps)
    peak = maps.max(axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)


@functools.partial(nnx.jit, static_argnames=("derivatives",))
def explain_resnet(
    model: nnx.Module,
    x: jax.Array,
    class_index: int | jax.Array,
    derivatives: Literal["exact", "exp"] = "exact",
) -> jax.Array:
    """Jitted :func:`gradcam_plus_plus` of a :class:`~jaxmodels.resnet.ResNet`
    (eval mode) at its last feature maps; shape (B, H, W), values in [0, 1].

    ``class_index`` is traced, so one compiled program explains every class.
    """
    return gradcam_plus_plus(model.features, model.head, x, class_index, derivatives=derivatives)
