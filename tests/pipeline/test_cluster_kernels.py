"""Clustering kernels (NumPy / scikit-learn only) against exact references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import SpectralClustering
from sklearn.datasets import make_blobs, make_circles
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics.pairwise import rbf_kernel

from pipeline import cluster_kernels as kernels
from pipeline.errors import AirysortError


class TestNystromSpectral:
    @pytest.mark.parametrize("seed", [0, 1])
    def test_agrees_with_exact_spectral_clustering_on_blobs(self, seed):
        x, truth = make_blobs(500, centers=4, n_features=8, cluster_std=1.0, random_state=seed)
        labels, model = kernels.nystrom_spectral_clustering(x, k=4, n_landmarks=150, seed=seed)
        exact = SpectralClustering(4, affinity="rbf", gamma=model.gamma, random_state=0).fit_predict(x)
        assert model.gamma == pytest.approx(kernels.median_gamma(model.landmarks))  # the default
        assert adjusted_rand_score(labels, exact) > 0.95
        assert adjusted_rand_score(labels, truth) > 0.95

    @pytest.mark.parametrize("seed", [0, 1])
    def test_eigengap_finds_the_number_of_blobs_with_a_local_kernel(self, seed):
        x, truth = make_blobs(500, centers=4, n_features=8, cluster_std=1.0, random_state=seed)
        gamma = kernels.knn_gamma(x[:150])
        labels, model = kernels.nystrom_spectral_clustering(x, n_landmarks=150, gamma=gamma, seed=seed)
        assert model.kmeans.n_clusters == 4
        assert adjusted_rand_score(labels, truth) > 0.95

    def test_separates_concentric_circles_like_exact_spectral(self):
        # k-means on the raw coordinates cannot split nested rings; spectral clustering
        # with a local kernel scale can.
        x, truth = make_circles(600, factor=0.4, noise=0.04, random_state=0)
        gamma = kernels.knn_gamma(x[:200])
        labels, model = kernels.nystrom_spectral_clustering(x, k=2, n_landmarks=200, gamma=gamma)
        exact = SpectralClustering(2, affinity="rbf", gamma=gamma, random_state=0).fit_predict(x)
        assert adjusted_rand_score(labels, exact) > 0.95
        assert adjusted_rand_score(labels, truth) > 0.95

    def test_nystrom_reproduces_the_landmark_kernel(self):
        x, _ = make_blobs(200, centers=3, n_features=5, random_state=0)
        model = kernels.start_spectral_model(x[:60], gamma=0.05)
        phi = kernels.nystrom_features_block(x[:60], **model.nystrom)
        np.testing.assert_allclose(phi @ phi.T, rbf_kernel(x[:60], gamma=0.05), atol=1e-6)

    def test_embedding_is_orthonormal_before_row_scaling(self):
        x, _ = make_blobs(400, centers=3, n_features=6, random_state=2)
        model = kernels.start_spectral_model(x[::4])
        feature_sum = kernels.feature_sum_block(x, **model.nystrom)[0]
        gram = kernels.weighted_gram_block(x, feature_sum=feature_sum, **model.nystrom)[0]
        eigenvalues, projection = kernels.spectral_projection(gram, n_vectors=3)
        phi = kernels.nystrom_features_block(x, **model.nystrom)
        vectors = phi / np.sqrt(phi @ feature_sum)[:, None] @ projection
        np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-8)
        # The normalised affinity's top eigenvalue is 1 (eigenvector D^1/2 1).
        assert eigenvalues[0] == pytest.approx(1.0, abs=1e-6)

    def test_eigengap_picks_the_largest_gap_in_range(self):
        values = np.array([1.0, 0.99, 0.98, 0.5, 0.45, 0.1])
        assert kernels.eigengap_k(values, k_range=(2, 5)) == 3
        assert kernels.eigengap_k(values, k_range=(4, 5)) == 5
        with pytest.raises(AirysortError, match="spectral directions"):
            kernels.eigengap_k(values, k_range=(7, 9))

    @pytest.mark.parametrize("heuristic", [kernels.median_gamma, kernels.knn_gamma])
    def test_identical_landmarks_are_a_clear_error(self, heuristic):
        with pytest.raises(AirysortError, match="identical"):
            heuristic(np.ones((10, 3)))
        with pytest.raises(AirysortError, match="at least 2 patterns"):
            heuristic(np.ones((1, 3)))


class TestGaussianMixture:
    def test_bic_finds_the_number_of_components(self):
        x, _ = make_blobs(1500, centers=3, n_features=4, cluster_std=0.5, random_state=3)
        gmm, bic = kernels.fit_gmm(x, k_range=(1, 6))
        assert gmm.n_components == 3
        assert sorted(bic) == [1, 2, 3, 4, 5, 6]
        assert min(bic, key=bic.get) == 3

    @pytest.mark.parametrize("seed", [0, 3])
    def test_finds_small_groups_next_to_a_dominant_one(self, seed):
        # Coarse groups are this imbalanced (round ~80 %); two small groups sit close
        # together. With seed 3, plain GaussianMixture(n_init=2) + BIC picks k=7, ARI 0.27.
        rng = np.random.default_rng(seed)
        groups = rng.choice(5, size=4000, p=[0.80, 0.08, 0.05, 0.04, 0.03])
        centres = rng.normal(scale=4.0, size=(5, 6))
        centres[4] = centres[3] + 6.0 * np.eye(6)[0]
        x = centres[groups] + rng.normal(size=(4000, 6))
        gmm, _ = kernels.fit_gmm(x, k_range=(2, 7))
        assert gmm.n_components == 5
        assert adjusted_rand_score(groups, gmm.predict(x)) > 0.99

    def test_posterior_block_matches_predict(self):
        x, _ = make_blobs(300, centers=3, n_features=4, random_state=4)
        gmm, _ = kernels.fit_gmm(x, k=3)
        probabilities = kernels.gmm_posterior_block(x, gmm=gmm)
        assert probabilities.dtype == np.float32 and probabilities.shape == (300, 3)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(probabilities.argmax(axis=1), gmm.predict(x))
        assert kernels.gmm_posterior_block(x[:0], gmm=gmm).shape == (0, 3)

    @pytest.mark.parametrize("bad", [np.full((5, 2), np.nan), np.zeros(5)])
    def test_bad_latents_are_a_clear_error(self, bad):
        with pytest.raises(AirysortError, match="finite 2-D"):
            kernels.fit_gmm(bad, k=2)

    def test_more_components_than_rows_is_a_clear_error(self):
        with pytest.raises(AirysortError, match="impossible for 4 sampled"):
            kernels.fit_gmm(np.random.default_rng(0).normal(size=(4, 2)), k=7)

    def test_the_default_k_range_stops_at_the_number_of_rows(self):
        rows = np.random.default_rng(0).normal(size=(3, 2))
        gmm, bic = kernels.fit_gmm(rows)  # k_range 2-12 searched as 2-3
        assert sorted(bic) == [2, 3] and gmm.n_components in (2, 3)
        with pytest.raises(AirysortError, match="impossible for 3 sampled"):
            kernels.fit_gmm(rows, k_range=(5, 8))


class TestImageFeatures:
    def test_downsample_averages_cells_and_drops_the_remainder(self):
        images = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
        flat = kernels.downsample_flatten_block(images, factor=2)
        assert flat.shape == (2, 2 * 3)
        assert flat[1, 4] == images[1, 2:4, 2:4].mean()

    def test_downsample_factor_bounds_the_side(self):
        assert kernels.downsample_factor((128, 128), max_side=32) == 4
        assert kernels.downsample_factor((100, 64), max_side=32) == 4
        assert kernels.downsample_factor((16, 16), max_side=32) == 1

    def test_sample_is_sorted_unique_and_bounded(self):
        rows = kernels.draw_sample(1000, size=100, seed=5)
        assert len(np.unique(rows)) == 100 and (np.diff(rows) > 0).all() and rows.max() < 1000
        assert len(kernels.draw_sample(10, size=100, seed=5)) == 10
