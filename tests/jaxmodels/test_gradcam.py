"""Grad-CAM++ against known answers: the formula by hand, and a network whose class
evidence sits in a known place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.checkpoint import init_model
from jaxmodels.gradcam import explain_resnet, gradcam_plus_plus, gradcam_plus_plus_maps
from jaxmodels.resnet import _ResNetTiny


def test_alpha_follows_the_paper_for_a_linear_head():
    rng = np.random.default_rng(0)
    features = rng.uniform(0, 1, (3, 4, 2)).astype(np.float32)
    m = rng.normal(size=(3, 4, 2)).astype(np.float32)
    score = lambda a: jnp.sum(jnp.asarray(m) * a)
    # By hand: g = m; α = g² / (2g² + Σ_ab A_ab g³); w_k = Σ α relu(g); L = relu(Σ w_k A^k).
    g = m
    alpha = g**2 / (2 * g**2 + features.sum(axis=(0, 1), keepdims=True) * g**3)
    weights = (alpha * np.maximum(g, 0)).sum(axis=(0, 1))
    expected = np.maximum((features * weights).sum(-1), 0)
    for derivatives in ("exact", "exp"):
        got = gradcam_plus_plus_maps(score, jnp.asarray(features), derivatives=derivatives)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_exact_derivatives_include_curvature_the_exp_trick_ignores():
    rng = np.random.default_rng(1)
    features = rng.uniform(0.1, 1, (2, 2, 3)).astype(np.float32)
    c = 0.3
    score = lambda a: c * jnp.sum(a**2)
    # Y = exp(S): Y' = Y g, Y'' = Y (g² + 2c), Y''' = Y (g³ + 6cg), with g = 2cA.
    g = 2 * c * features
    d2, d3 = g**2 + 2 * c, g**3 + 6 * c * g
    alpha = d2 / (2 * d2 + features.sum(axis=(0, 1), keepdims=True) * d3)
    expected = np.maximum((features * (alpha * g).sum(axis=(0, 1))).sum(-1), 0)
    exact = gradcam_plus_plus_maps(score, jnp.asarray(features), derivatives="exact")
    closed_form = gradcam_plus_plus_maps(score, jnp.asarray(features), derivatives="exp")
    np.testing.assert_allclose(exact, expected, rtol=1e-4)
    assert not np.allclose(closed_form, expected, rtol=1e-2)


def _two_blob_network():
    """Channel 0 responds to bright spots, channel 1 to dark ones; class 0 scores the
    bright channel through a ReLU layer, class 1 the dark one."""
    w1 = jnp.array([[2.0, 0.0], [0.0, 3.0]])
    features_fn = lambda x: jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)

    def head_fn(a):
        hidden = jax.nn.relu(a.mean(axis=(1, 2)) @ w1 - 0.01)
        return hidden @ jnp.array([[1.5, 0.0], [0.0, 1.0]]) - 0.2

    return features_fn, head_fn


def test_heat_maps_point_at_the_evidence_of_each_class():
    x = np.zeros((2, 16, 16, 1), np.float32)
    x[0, 2:6, 2:6] = 1.0    # bright blob, top left
    x[0, 10:14, 9:13] = -1.0  # dark blob, bottom right
    x[1, 9:13, 1:5] = 1.0
    x[1, 1:5, 10:14] = -1.0
    x += np.random.default_rng(0).normal(0, 0.01, x.shape).astype(np.float32)
    features_fn, head_fn = _two_blob_network()
    for class_index, sign in ((0, 1.0), (1, -1.0)):
        heat = np.asarray(gradcam_plus_plus(features_fn, head_fn, jnp.asarray(x), class_index))
        assert heat.shape == (2, 16, 16)
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
        for i in range(2):
            evidence = sign * x[i, ..., 0] > 0.5
            other = -sign * x[i, ..., 0] > 0.5
            assert heat[i][evidence].mean() > 0.8
            assert heat[i][other].max() < 0.05


def test_resnet_heat_maps_have_input_shape():
    model = init_model(lambda: _ResNetTiny(rngs=nnx.Rngs(0)))
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    heat = explain_resnet(model, x, 3)
    assert heat.shape == (2, 32, 32)
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0
    exp_trick = explain_resnet(model, x, 3, derivatives="exp")
    # The ResNet head (average pooling + linear layer) is linear in the features.
    np.testing.assert_allclose(heat, exp_trick, atol=1e-4)
