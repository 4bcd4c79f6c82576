"""β-TCVAE: the decomposed-ELBO estimators against brute force, the model, a tiny training."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import logsumexp
from scipy.stats import norm

from jaxmodels.checkpoint import init_model
from jaxmodels.configs import TrainConfig, VAEConfig
from jaxmodels.data import PatternBatches
from jaxmodels.latent_tools import (
    decode_latents,
    embed_2d,
    encode_patterns,
    save_map_png,
    save_traversal_png,
    traversal_grid,
    traversal_latents,
)
from jaxmodels.losses import (
    beta_tcvae_loss,
    log_importance_weights,
    tc_decomposition,
    vae_loss_fn,
)
from jaxmodels.train import fit
from jaxmodels.vae import VAESmall, _VAETiny


def _posteriors(rng, m, d):
    mean = rng.normal(size=(m, d))
    logvar = rng.normal(scale=0.3, size=(m, d)) - 1.0
    z = mean + np.exp(0.5 * logvar) * rng.normal(size=(m, d))
    return z, mean, logvar


def _brute_force_terms(z, mean, logvar, weights):
    """MI, TC, dimension-wise KL with explicit loops over patterns and dimensions."""
    m, d = z.shape
    log_q_given_x, log_q, log_q_product, log_p = [], [], [], []
    for i in range(m):
        joint = [norm.logpdf(z[i], mean[j], np.exp(0.5 * logvar[j])).sum() for j in range(m)]
        log_q.append(logsumexp(joint, b=weights[i]))
        marginal = 0.0
        for k in range(d):
            per_j = [norm.logpdf(z[i, k], mean[j, k], np.exp(0.5 * logvar[j, k])) for j in range(m)]
            marginal += logsumexp(per_j, b=weights[i])
        log_q_product.append(marginal)
        log_q_given_x.append(norm.logpdf(z[i], mean[i], np.exp(0.5 * logvar[i])).sum())
        log_p.append(norm.logpdf(z[i]).sum())
    a, b, c, p = map(np.array, (log_q_given_x, log_q, log_q_product, log_p))
    return {"mi": np.mean(a - b), "tc": np.mean(b - c), "dwkl": np.mean(c - p)}


class TestEstimators:
    def test_weights_are_the_papers(self):
        n, m = 100, 5
        w = np.exp(np.asarray(log_importance_weights(m, n, "mss")))
        np.testing.assert_allclose(np.diag(w), 1 / n, rtol=1e-5)
        strat = (n - m + 1) / (n * (m - 1))
        for i in range(m):
            np.testing.assert_allclose(w[i, (i + 1) % m], strat, rtol=1e-5)
            others = [j for j in range(m) if j not in (i, (i + 1) % m)]
            np.testing.assert_allclose(w[i, others], 1 / (m - 1), rtol=1e-5)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.exp(np.asarray(log_importance_weights(m, n, "mws"))), 1 / m)

    @pytest.mark.parametrize("estimator", ["mss", "mws"])
    def test_matches_brute_force(self, estimator):
        rng = np.random.default_rng(0)
        z, mean, logvar = _posteriors(rng, 6, 3)
        weights = np.exp(np.asarray(log_importance_weights(6, 50, estimator), np.float64))
        expected = _brute_force_terms(z, mean, logvar, weights)
        got = tc_decomposition(
            jnp.asarray(z, jnp.float32), jnp.asarray(mean, jnp.float32),
            jnp.asarray(logvar, jnp.float32), dataset_size=50, estimator=estimator,
        )
        for name in ("mi", "tc", "dwkl"):
            np.testing.assert_allclose(float(got[name]), expected[name], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            float(got["kl"]), sum(expected.values()), rtol=1e-4, atol=1e-4
        )

    def test_mss_is_unbiased_for_q_of_z(self):
        """Averaged over every ordered batch containing x*, the MSS estimate of q(z) is exact."""
        rng = np.random.default_rng(1)
        n, m, d = 6, 3, 2
        mean = rng.normal(size=(n, d))
        logvar = rng.normal(scale=0.3, size=(n, d))
        z = mean[0] + 0.5 * rng.normal(size=d)  # a sample of q(z|x_0)
        q_given = np.array([np.exp(norm.logpdf(z, mean[j], np.exp(0.5 * logvar[j])).sum())
                            for j in range(n)])
        exact = q_given.mean()  # q(z) = 1/N Σ_n q(z|n)
        w = np.exp(np.asarray(log_importance_weights(m, n, "mss"), np.float64))
        estimates = [
            w[0, 0] * q_given[0] + sum(w[0, k + 1] * q_given[j] for k, j in enumerate(others))
            for others in itertools.permutations(range(1, n), m - 1)
        ]
        np.testing.assert_allclose(np.mean(estimates), exact, rtol=1e-6)

    @pytest.mark.parametrize("estimator", ["mss", "mws"])
    def test_total_correlation_zero_for_independent_positive_for_correlated(self, estimator):
        rng = np.random.default_rng(2)
        m, d, std = 512, 2, 0.3
        independent = rng.normal(size=(m, d))
        correlated = rng.normal(size=(m, 1)) + 0.1 * rng.normal(size=(m, d))
        logvar = np.full((m, d), 2 * np.log(std))
        results = {}
        for name, mean in {"independent": independent, "correlated": correlated}.items():
            z = mean + std * rng.normal(size=(m, d))
            terms = tc_decomposition(
                jnp.asarray(z, jnp.float32), jnp.asarray(mean, jnp.float32),
                jnp.asarray(logvar, jnp.float32), dataset_size=20000, estimator=estimator,
            )
            results[name] = float(terms["tc"])
        # q(z) is then (nearly) Gaussian, whose TC is −½ log(1 − ρ²): 0 for independent
        # factors; for the correlated pair var = 1 + 0.1² + 0.3², cov = 1.
        rho = 1.0 / (1.0 + 0.1**2 + std**2)
        assert abs(results["independent"]) < 0.1, results
        assert abs(results["correlated"] - (-0.5 * np.log(1 - rho**2))) < 0.1, results

    def test_loss_weights_and_warmup(self):
        rng = np.random.default_rng(3)
        z, mean, logvar = (jnp.asarray(a, jnp.float32) for a in _posteriors(rng, 8, 4))
        x = jnp.asarray(rng.normal(size=(8, 5, 5)), jnp.float32)
        recon = x + 0.1
        kwargs = dict(dataset_size=100)
        loss0, aux = beta_tcvae_loss(x, recon, jnp.log(0.1), z, mean, logvar, kl_weight=0.0, **kwargs)
        np.testing.assert_allclose(float(loss0), float(aux["recon"]), rtol=1e-6)
        loss, aux = beta_tcvae_loss(
            x, recon, jnp.log(0.1), z, mean, logvar, alpha=2.0, beta=3.0, gamma=0.5, **kwargs
        )
        expected = aux["recon"] + 2.0 * aux["mi"] + 3.0 * aux["tc"] + 0.5 * aux["dwkl"]
        np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
        # Gaussian NLL with σ = 0.1 and a residual of 0.1 everywhere: 25 pixels.
        nll = 25 * (0.5 * np.log(2 * np.pi) + np.log(0.1) + 0.5)
        np.testing.assert_allclose(float(aux["recon"]), nll, rtol=1e-5)

    def test_bad_estimator_and_sizes_are_rejected(self):
        with pytest.raises(ValueError, match="estimator"):
            log_importance_weights(4, 10, "iwae")
        with pytest.raises(ValueError, match="dataset_size"):
            log_importance_weights(8, 4, "mss")
        with pytest.raises(ValueError, match="estimator"):
            VAEConfig(estimator="foo")


@pytest.fixture(scope="module")
def tiny_model():
    """One tiny VAE for the module. Tests must not change its weights (the training test
    trains a clone)."""
    return init_model(lambda: _VAETiny(rngs=nnx.Rngs(0)))


class TestModel:
    def test_shapes_and_parameter_count(self, tiny_model):
        model = tiny_model
        forward = nnx.jit(lambda m, x, key: m(x, key=key))
        recon, z, mean, logvar = forward(model, jnp.zeros((3, 24, 24)), jax.random.key(0))
        assert recon.shape == (3, 16, 16) and z.shape == mean.shape == logvar.shape == (3, 4)
        n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert 2_000 < n_params < 20_000, n_params
        # The default preset, counted abstractly (no initialisation).
        small = nnx.eval_shape(lambda: VAESmall(rngs=nnx.Rngs(0)))
        n_small = sum(p.size for p in jax.tree.leaves(nnx.state(small, nnx.Param)))
        assert 200_000 < n_small < 2_000_000, n_small
        # Without a key the encoding is deterministic (the posterior mean is decoded).
        _, z1, mean1, _ = nnx.jit(lambda m, x: m(x))(model, jnp.ones((2, 16, 16)))
        np.testing.assert_array_equal(np.asarray(z1), np.asarray(mean1))

    def test_attention_variant(self):
        model = init_model(lambda: _VAETiny(attention=True, rngs=nnx.Rngs(0)))
        recon, *_ = nnx.jit(lambda m, x: m(x))(model, jnp.ones((2, 16, 16)))
        assert recon.shape == (2, 16, 16) and bool(jnp.isfinite(recon).all())
        assert any("attention" in str(path) for path, _ in nnx.iter_graph(model))

    def test_resolution_must_divide(self):
        with pytest.raises(ValueError, match="multiple"):
            _VAETiny(resolution=18, rngs=nnx.Rngs(0))


def _ring_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Rings of random radius and centre offset: two obvious factors of variation."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    radius = rng.uniform(2, 6, n)[:, None, None]
    shift = rng.uniform(-1.5, 1.5, (n, 2))[:, :, None, None]
    r = np.hypot(yy - shift[:, 0], xx - shift[:, 1])
    images = np.exp(-((r - radius) ** 2) / 1.5)
    images = (images - images.mean(axis=(1, 2), keepdims=True)) / images.std(axis=(1, 2), keepdims=True)
    return images.astype(np.float32)


def test_tiny_vae_trains_and_loss_decreases(tmp_path, tiny_model):
    images = _ring_images(128)
    batches = PatternBatches(images, np.arange(128), batch_size=32, shuffle=True, chunk=64)
    loss_fn = functools.partial(vae_loss_fn, dataset_size=128)
    result = fit(
        nnx.clone(tiny_model), loss_fn, batches,
        config=TrainConfig(epochs=6, batch_size=32, learning_rate=3e-3, warmup_epochs=0.5,
                           grad_clip=0.0, validation_fraction=0.0, log_every=1000),
        checkpoint_dir=tmp_path / "ckpt", log=lambda line: None,
    )
    losses = [h["train_loss"] for h in result.history]
    assert result.steps == 6 * 4
    # From the prior's σ = 1 towards a fit: the negative ELBO falls by well over 10 %.
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses
    mean, logvar = encode_patterns(result.model, images[:50], batch_size=16)
    assert mean.shape == logvar.shape == (50, 4) and np.isfinite(mean).all()
    # Deterministic: the same patterns encode identically in a batch of another size.
    mean2, _ = encode_patterns(result.model, images[:50], batch_size=64)
    np.testing.assert_allclose(mean, mean2, rtol=1e-4, atol=1e-5)


class TestLatentTools:
    def test_traversal_latents(self):
        grid = traversal_latents(np.array([1.0, -1.0, 0.0]), scales=np.array([1.0, 2.0, 0.5]), n_steps=5, span=2.0)
        assert grid.shape == (3, 5, 3)
        np.testing.assert_allclose(grid[1, :, 1], [-5, -3, -1, 1, 3])
        np.testing.assert_allclose(grid[1, :, 0], 1.0)  # the other factors stay fixed
        np.testing.assert_allclose(grid[2, :, 2], [-1, -0.5, 0, 0.5, 1])

    def test_figures(self, tmp_path, tiny_model):
        model = tiny_model
        rng = np.random.default_rng(0)
        latents = rng.normal(size=(60, 4)).astype(np.float32)
        images, spread = traversal_grid(functools.partial(decode_latents, model), latents, n_steps=5)
        assert images.shape == (4, 5, 16, 16) and spread.shape == (4,)
        path = save_traversal_png(images, tmp_path / "t.png", spread=spread)
        groups = np.array(["round", "prolate", ""] * 20)
        for method in ("pca", "tsne"):
            coords = embed_2d(latents, method=method)
            assert coords.shape == (60, 2) and np.isfinite(coords).all()
        map_path = save_map_png(coords, groups, tmp_path / "m.png")
        for p in (path, map_path):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with pytest.raises(ValueError, match="method"):
            embed_2d(latents, method="umap")
