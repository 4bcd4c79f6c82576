"""Per-class decision thresholds tuned on validation patterns (jaxmodels.infer.tune_thresholds)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from jaxmodels.infer import tune_thresholds, weighted_prior


def separable(n_positive: int, n_negative: int = 160, seed: int = 0):
    """Positives score 0.3-0.5 and negatives 0-0.2: 0.5 would miss them all."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_positive, int), np.zeros(n_negative, int)][:, None]
    probabilities = np.where(labels == 1, 0.3 + 0.2 * rng.random(labels.shape), 0.2 * rng.random(labels.shape))
    return probabilities, labels


def test_without_a_prior_the_threshold_maximises_f1():
    probabilities, labels = separable(40)
    threshold = tune_thresholds(probabilities, labels, prior_strength=0)[0]
    assert 0.2 < threshold <= 0.3
    assert f1_score(labels[:, 0], probabilities[:, 0] >= threshold) == 1.0


def test_the_fewer_the_positives_the_closer_the_threshold_stays_to_the_prior():
    def logit(p):
        return np.log(p / (1 - p))

    prior = 0.9
    tuned = {n: tune_thresholds(*separable(n), prior=prior, prior_strength=0)[0] for n in (2, 40)}
    shrunk = {n: tune_thresholds(*separable(n), prior=prior)[0] for n in (2, 40)}
    assert max(tuned.values()) <= 0.5
    assert tuned[40] < shrunk[40] < shrunk[2] < prior
    # The log-odds are weighted n_positives : prior_strength (3).
    for n in (2, 40):
        assert logit(shrunk[n]) == pytest.approx((n * logit(tuned[n]) + 3 * logit(prior)) / (n + 3), abs=1e-5)


def test_the_prior_of_class_weighted_training_is_the_calibrated_half():
    # Weight w multiplies the odds: calibrated 0.5 (odds 1) reads as w / (1 + w).
    np.testing.assert_allclose(weighted_prior(np.array([20.0, 1.0, 0.05])), [20 / 21, 0.5, 0.05 / 1.05])
    # A class without validation examples keeps its prior.
    probabilities, labels = np.full((10, 2), 0.1), np.zeros((10, 2), int)
    np.testing.assert_allclose(tune_thresholds(probabilities, labels, prior=[0.3, 0.95]), [0.3, 0.95], rtol=1e-6)


def test_a_class_no_cut_can_find_keeps_the_prior():
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
