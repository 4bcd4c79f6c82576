"""Test-time augmentation over the symmetries of the square (jaxmodels.infer)."""

from __future__ import annotations

import numpy as np
from flax import nnx
from scipy.special import expit, logit

from jaxmodels.checkpoint import init_model
from jaxmodels.infer import predict_proba, square_symmetries
from jaxmodels.resnet import _ResNetTiny


def test_the_eight_views_are_distinct_pixel_permutations():
    image = np.random.default_rng(0).random((1, 6, 6))
    views = square_symmetries(image)
    assert len(views) == 8
    assert len({view.tobytes() for view in views}) == 8
    assert np.array_equal(views[0], image)
    for view in views:
        assert np.array_equal(np.sort(view, axis=None), np.sort(image, axis=None))


def test_symmetrised_probabilities_do_not_depend_on_the_orientation():
    """A random network answers differently for a rotated image; averaged over the eight
    views it gives the same answer for every orientation, and the average is taken over
    the logits."""
    model = init_model(lambda: _ResNetTiny(n_classes=3, rngs=nnx.Rngs(0)))
    images = np.random.default_rng(1).normal(size=(5, 16, 16)).astype(np.float32)
    turned = np.rot90(images, 1, axes=(1, 2))
    mirrored = images[:, :, ::-1]

    plain = predict_proba(model, images, batch_size=4)
    assert np.abs(predict_proba(model, turned, batch_size=4) - plain).max() > 1e-3
    symmetrised = predict_proba(model, images, batch_size=4, symmetrise=True)
    for other in (turned, mirrored):
        np.testing.assert_allclose(predict_proba(model, other, batch_size=4, symmetrise=True), symmetrised, atol=1e-5)
    views = [predict_proba(model, view, batch_size=4) for view in square_symmetries(images)]
    np.testing.assert_allclose(symmetrised, expit(np.mean(logit(np.asarray(views, np.float64)), axis=0)), atol=1e-5)
