"""Per-class decision thresholds tuned on validation patterns (jaxmodels.infer.tune_thresholds)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from jaxmodels.infer import tune_thresholds


def test_the_threshold_maximises_f1_on_a_separable_class():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 1)) < 0.2).astype(int)
    # Positives score 0.3-0.5 and negatives 0-0.2: 0.5 would miss them all.
    probabilities = np.where(labels == 1, 0.3 + 0.2 * rng.random((200, 1)), 0.2 * rng.random((200, 1)))
    threshold = tune_thresholds(probabilities, labels)[0]
    assert 0.2 < threshold <= 0.3
    assert f1_score(labels[:, 0], probabilities[:, 0] >= threshold) == 1.0


def test_a_class_no_cut_can_find_keeps_the_default():
    # Two positives among 18 patterns, scored below every negative: the F1-best cut
    # (0.05) calls all 18 positive, no better than having no classifier at all.
    probabilities = np.r_[[0.1, 0.12], np.linspace(0.3, 0.7, 16)][:, None]
    labels = np.r_[[1, 1], np.zeros(16, int)][:, None]
    assert tune_thresholds(probabilities, labels)[0] == pytest.approx(0.5)


@pytest.mark.parametrize("untrained", [True, False])
def test_a_class_without_validation_examples_is_not_called_everywhere(untrained):
    """Raised above every validation pattern only when most of them would be called positive."""
    rng = np.random.default_rng(1)
    scale = 0.45 + 0.35 * rng.random(18) if untrained else 0.4 * rng.random(18) ** 3
    probabilities, labels = scale[:, None], np.zeros((18, 1), int)
    threshold = tune_thresholds(probabilities, labels)[0]
    if untrained:  # an output near 0.6 everywhere: a class the network has not learned
        assert np.median(probabilities) >= 0.5
        assert threshold > probabilities.max()
        assert threshold - probabilities.max() <= 0.05 + 1e-6
    else:
        assert threshold == pytest.approx(0.5)
