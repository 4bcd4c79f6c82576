"""Dask wiring of clustering (oracle tests on uneven chunks) and ``airysort cluster``."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from pipeline import cluster_kernels as kernels
from pipeline import store
from pipeline.cli.main import app
from pipeline.cluster import gmm_cluster_array, image_features, spectral_cluster_array
from pipeline.ingest import ingest
from pipeline.taxonomy import multi_hot

UNEVEN = (700, 13, 1200, 1, 1086)  # deliberately uneven row chunks, one of a single row

#: Coarse-group label combinations of the synthetic store (taxonomy.md).
GROUP_LABELS = {
    "round": ("Spherical/Oblate", "Round"),
    "elliptical": ("Spherical/Oblate", "Elliptical"),
    "prolate": ("Prolate", "Streak"),
    "empty": ("Empty",),
}


def make_cluster_store(path, n: int = 600, *, seed: int = 0, client=None):
    """A small store with ``label``, a 6-D ``latent`` and 16×16 ``image`` per coarse group.

    Each group has its own latent mean and its own image motif (rings of another radius,
    or noise only for ``empty``), so a working clustering recovers the groups.
    """
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 100, size=(n, 8, 8)).astype(np.uint16)
    np.save(path.parent / "frames.npy", frames)
    ingest(path, [path.parent / "frames.npy"], client=client, log=lambda line: None)
    group = rng.integers(0, len(GROUP_LABELS), size=n)
    labels = np.stack([multi_hot(list(GROUP_LABELS.values())[g]) for g in group])
    centres = rng.normal(scale=6.0, size=(len(GROUP_LABELS), 6))
    latent = (centres[group] + rng.normal(size=(n, 6))).astype(np.float32)
    yy, xx = np.mgrid[-8:8, -8:8] + 0.5
    radius = np.hypot(yy, xx)
    motifs = [np.cos(radius * f) for f in (0.6, 1.2, 2.0)] + [np.zeros((16, 16))]
    images = np.stack([motifs[g] for g in group]) + rng.normal(scale=0.3, size=(n, 16, 16))
    store.write_variables(
        path,
        {
            "label": xr.DataArray(labels.astype(np.int8), dims=("pattern", "class")),
            "latent": xr.DataArray(latent, dims=("pattern", "z")),
            "image": xr.DataArray(images.astype(np.float32), dims=("pattern", "iy", "ix")),
        },
        command="test-fixture",
        parameters={"seed": seed},
    )
    return group


@pytest.fixture(scope="module")
def blobs():
    x, truth = make_blobs(3000, centers=5, n_features=10, random_state=1)
    return x, truth, da.from_array(x, chunks=(UNEVEN, 10))


class TestOracles:
    """map_blocks assignment on uneven chunks equals the in-memory computation."""

    def test_gmm_matches_in_memory(self, blobs):
        x, truth, lazy = blobs
        labels, probabilities, info = gmm_cluster_array(lazy, k_range=(3, 7), sample_size=1000, seed=3)
        gmm, bic = kernels.fit_gmm(x[kernels.draw_sample(len(x), size=1000, seed=3)], k_range=(3, 7), seed=3)
        assert info["k"] == gmm.n_components == 5 and info["bic"] == bic
        np.testing.assert_allclose(probabilities.compute(), gmm.predict_proba(x), atol=1e-6)
        np.testing.assert_array_equal(labels.compute(), gmm.predict(x))
        assert labels.dtype == np.int32 and probabilities.dtype == np.float32
        assert adjusted_rand_score(truth, labels.compute()) > 0.99

    def test_spectral_matches_in_memory(self, blobs):
        x, truth, lazy = blobs
        gamma = kernels.knn_gamma(x[:200])  # local scale: the eigengap then finds the 5 blobs
        labels, info = spectral_cluster_array(lazy, sample_size=1000, n_landmarks=200, gamma=gamma, seed=2)
        expected, model = kernels.nystrom_spectral_clustering(
            x, sample_size=1000, n_landmarks=200, gamma=gamma, seed=2
        )
        assert info["k"] == model.kmeans.n_clusters == 5
        assert info["gamma"] == pytest.approx(model.gamma)
        np.testing.assert_array_equal(labels.compute(), expected)
        assert adjusted_rand_score(truth, expected) > 0.99

    def test_image_features_match_in_memory(self):
        images = np.random.default_rng(0).normal(size=(300, 20, 12)).astype(np.float32)
        lazy = da.from_array(images, chunks=((100, 7, 193), 20, 12))
        features, info = image_features(lazy, sample_size=200, n_components=5, max_side=8)
        assert info["downsample"] == 3
        sample = images[kernels.draw_sample(300, size=200, seed=0)]
        pca = kernels.fit_image_pca(kernels.downsample_flatten_block(sample, factor=3), n_components=5, seed=0)
        expected = pca.transform(kernels.downsample_flatten_block(images, factor=3))
        np.testing.assert_allclose(features.compute(), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, dask_threads):
    path = tmp_path_factory.mktemp("cluster") / "beamtime.zarr"
    group = make_cluster_store(path, client=dask_threads)
    return path, group


class TestClusterCommand:

    def test_gmm_writes_labels_and_posteriors(self, store_path):
        path, group = store_path
        result = CliRunner().invoke(app, ["cluster", str(path), "--method", "gmm", "--k-max", "6", "--json"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["k"] == 4 and sorted(map(int, summary["bic"])) == [2, 3, 4, 5, 6]
        assert sum(summary["sizes"].values()) == len(group)
        dataset = store.open_store(path)
        assert dataset["cluster_gmm"].dtype == np.int32 and dataset["cluster_gmm"].dims == ("pattern",)
        assert dataset["cluster_gmm_prob"].dims == ("pattern", "cluster")
        assert dataset["cluster_gmm_prob"].shape == (len(group), 4)
        assert adjusted_rand_score(group, dataset["cluster_gmm"].values) > 0.95
        assert dataset.attrs["provenance"][-1]["command"] == "cluster"

    def test_spectral_on_images_with_fixed_k(self, store_path):
        path, group = store_path
        result = CliRunner().invoke(
            app, ["cluster", str(path), "--method", "spectral", "--k", "4", "--landmarks", "150", "--json"]
        )
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["k"] == 4 and summary["variables"] == ["cluster_spectral"]
        clusters = store.open_store(path)["cluster_spectral"].values
        assert np.bincount(clusters).tolist() == list(summary["sizes"].values())
        assert adjusted_rand_score(group, clusters) > 0.9

    def test_missing_input_variable_is_one_error_line(self, tmp_path, dask_threads):
        frames = np.zeros((5, 4, 4), np.uint16)
        np.save(tmp_path / "f.npy", frames)
        ingest(tmp_path / "s.zarr", [tmp_path / "f.npy"], client=dask_threads, log=lambda line: None)
        result = CliRunner().invoke(app, ["cluster", str(tmp_path / "s.zarr"), "--method", "gmm"])
        assert result.exit_code == 1
        assert "ERROR: " in result.stderr and "airysort embed" in result.stderr

    def test_bad_k_range_is_rejected_before_work(self, tmp_path):
        result = CliRunner().invoke(app, ["cluster", str(tmp_path / "none.zarr"), "--k-min", "5", "--k-max", "3"])
        assert result.exit_code == 1 and "k range" in result.stderr

    def test_a_negative_seed_is_rejected_before_work(self, tmp_path):
        result = CliRunner().invoke(app, ["cluster", str(tmp_path / "none.zarr"), "--seed", "-1"])
        assert result.exit_code == 1 and "--seed -1 must be an integer from 0 to 2**32 - 1" in result.stderr


def test_seed_style_comparison_table(store_path):
    """Both clusterings of one store, then the comparison of ``airysort evaluate``."""
    path, group = store_path
    dataset = store.open_store(path)
    for method in ("gmm", "spectral"):
        if f"cluster_{method}" not in dataset:  # when this test runs on its own
            extra = ["--landmarks", "150"] if method == "spectral" else []
            assert CliRunner().invoke(app, ["cluster", str(path), "--method", method, "--k", "4", *extra]).exit_code == 0
    result = CliRunner().invoke(app, ["evaluate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    clustering = json.loads(result.stdout.strip().splitlines()[-1])["clustering"]
    assert set(clustering) == {"gmm", "spectral"}  # cluster_gmm_prob is not a clustering
    # The groups are separable in both inputs, so both methods recover them.
    for scores in clustering.values():
        assert scores["homogeneity"] > 0.9 and scores["completeness"] > 0.9 and scores["ari"] > 0.9
    assert "classification" not in json.loads(result.stdout.strip().splitlines()[-1])
