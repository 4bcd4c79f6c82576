"""Tiny rotation-invariant two-ring images shared by the jaxmodels tests."""

from __future__ import annotations

import numpy as np


def ring_images(n: int, *, size: int = 32, n_classes: int = 2, seed: int = 0):
    """Noisy images where class c is a ring of radius ``4 + 6 c`` pixels.

    Returns
    -------
    images : ndarray of float32, shape (n, size, size)
    labels : ndarray of int8, shape (n, n_classes)
        Multi-hot: any subset of rings can be present.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2 + 0.5
    radius = np.hypot(yy, xx)
    labels = rng.integers(0, 2, (n, n_classes)).astype(np.int8)
    images = rng.normal(0.0, 0.3, (n, size, size)).astype(np.float32)
    for c in range(n_classes):
        ring = np.exp(-((radius - (4 + 6 * c)) ** 2) / 2).astype(np.float32)
        images += labels[:, c, None, None] * ring
    return images, labels
