"""ResNet presets, the log activation and self-attention (shapes, parameter counts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.attention import SelfAttention
from jaxmodels.checkpoint import init_model
from jaxmodels.configs import CNNConfig
from jaxmodels.pooling import max_pool
from jaxmodels.resnet import LogActivation, ResNet18, ResNet34, _ResNetTiny, build_cnn


def n_params(build) -> int:
    abstract = nnx.eval_shape(build)  # counts without allocating 11M floats
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def expected_params(stage_sizes, width, n_classes=11):
    """Pre-activation ResNet with BN stem, counted layer by layer."""
    total = 7 * 7 * 1 * width + 2 * width  # stem conv (no bias: BN follows) + BN
    c_in = width
    for stage, blocks in enumerate(stage_sizes):
        c_out = width * 2**stage
        for b in range(blocks):
            total += 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out
            if c_in != c_out or (stage > 0 and b == 0):
                total += c_in * c_out  # 1×1 projection shortcut
            c_in = c_out
    return total + 2 * c_in + c_in * n_classes + n_classes


@pytest.mark.parametrize("preset, stages", [(ResNet18, (2, 2, 2, 2)), (ResNet34, (3, 4, 6, 3))])
def test_parameter_counts(preset, stages):
    assert n_params(lambda: preset(width=64, rngs=nnx.Rngs(0))) == expected_params(stages, 64)
    assert n_params(lambda: preset(width=16, rngs=nnx.Rngs(0))) == expected_params(stages, 16)


def test_resnet18_width_64_is_the_familiar_size():
    # torchvision's ResNet-18 has 11.69 M parameters with 3 input channels and 1000 classes;
    # with 1 channel and 11 classes it is 11.17 M.
    assert n_params(lambda: ResNet18(width=64, rngs=nnx.Rngs(0))) == pytest.approx(11.17e6, rel=2e-3)


def test_tiny_forward_shapes_and_feature_head_split():
    model = init_model(lambda: _ResNetTiny(log_activation=True, attention_stages=(1,), rngs=nnx.Rngs(0)))
    model.eval()
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 1))
    features, logits, split = nnx.jit(
        lambda m, x: (m.features(x), m(x), m.head(m.features(x))))(model, x)
    assert features.shape == (3, 4, 4, 16)
    assert logits.shape == (3, 11)
    np.testing.assert_allclose(split, logits, rtol=1e-5, atol=1e-6)


def test_init_model_initialises_as_eager_code_in_one_program():
    """The parameters of a model built by one compiled program equal those of the eager
    build, and the model comes back in the mode the build left it."""

    class Small(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.linear = nnx.Linear(4, 3, rngs=rngs)

    def build():
        return Small(nnx.Rngs(3))

    eager, compiled = build(), init_model(build)
    eager_state, compiled_state = nnx.state(eager), nnx.state(compiled)
    assert jax.tree.structure(compiled_state) == jax.tree.structure(eager_state)
    for a, b in zip(jax.tree.leaves(eager_state), jax.tree.leaves(compiled_state)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(compiled.conv.kernel[...]).sum()) > 0  # initialised, not zeros
    assert compiled.bn.use_running_average is False  # train mode, as built


def test_init_model_compiles_at_the_default_level_where_xla_lacks_the_option(monkeypatch):
    from jaxmodels import checkpoint

    monkeypatch.setattr(checkpoint, "OPTIMISATION_LEVEL", "xla_no_such_option_in_any_xla")
    build = lambda: nnx.Linear(3, 2, rngs=nnx.Rngs(5))  # noqa: E731
    np.testing.assert_allclose(np.asarray(init_model(build).kernel[...]), np.asarray(build().kernel[...]),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 3)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_gradient_equals_reduce_windows(shape, ties):
    """Values and gradient equal nnx.max_pool's, ties included (the first maximum of a window
    takes the gradient), on even and odd sizes."""
    x = jax.random.normal(jax.random.key(1), shape)
    if ties:
        x = jnp.round(x)  # many windows hold their maximum twice
    reference = lambda x: nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    weights = jax.random.normal(jax.random.key(2), reference(x).shape)
    gradient = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * weights))(x)
    np.testing.assert_array_equal(np.asarray(max_pool(x, 3, 2)), np.asarray(reference(x)))
    ours, theirs = np.asarray(gradient(lambda x: max_pool(x, 3, 2))), np.asarray(gradient(reference))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)  # sums of up to 4 windows, any order
    assert np.count_nonzero(ours) == np.count_nonzero(theirs)  # one pixel per window


def test_log_activation_is_the_published_formula():
    act = LogActivation(2)
    act.alpha[...] = jnp.array([2.0, 0.5])
    act.beta[...] = jnp.array([0.1, -0.3])
    x = jnp.array([[0.0, 0.0], [3.0, 3.0], [-3.0, -3.0]])
    out = np.asarray(act(x))
    inner = np.log(3.0 + np.exp(-1.0)) + 1.0
    np.testing.assert_allclose(out[0], [0.1, -0.3], atol=1e-6)  # continuous at 0: f(0) = β
    np.testing.assert_allclose(out[1], [2.0 * inner + 0.1, 0.5 * inner - 0.3], rtol=1e-6)
    np.testing.assert_allclose(out[2], [-2.0 * inner + 0.1, -0.5 * inner - 0.3], rtol=1e-6)


def test_self_attention_starts_as_identity_and_mixes_positions():
    block = SelfAttention(16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
    np.testing.assert_array_equal(block(x), x)  # gamma = 0 at initialisation
    block.gamma[...] = jnp.array(1.0)
    y = block(x)
    assert y.shape == x.shape
    # Changing one far-away position changes the output everywhere (non-local).
    x2 = x.at[:, 7, 7].add(5.0)
    assert float(jnp.abs(block(x2)[:, 0, 0] - y[:, 0, 0]).max()) > 1e-4


def test_build_from_config():
    config = CNNConfig(depth=18, width=8, attention_stages=(2, 3), log_activation=True)
    model = nnx.eval_shape(lambda: build_cnn(config, rngs=nnx.Rngs(0)))
    assert sum(isinstance(b, SelfAttention) for b in model.blocks) == 2
    with pytest.raises(ValueError, match="depth must be 18 or 34"):
        CNNConfig(depth=50)
