"""Pre-activation ResNet for one-channel diffraction images, with 11 sigmoid outputs.

He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (pre-activation
blocks: BN → ReLU → conv), with two additions from the helium-droplet literature:

* an optional logarithmic activation after the first convolution (Zimmermann et al.,
  Phys. Rev. E 99, 063309 (2019)), ``α·(log(x + e⁻¹) + 1) + β`` for x ≥ 0 and its
  mirror image for x < 0, with learnable α, β per channel: diffraction intensities
  span orders of magnitude from the centre to the edge;
* optional SAGAN self-attention blocks after chosen stages (:mod:`jaxmodels.attention`).

Presets follow the Flax examples: ``ResNet18``/``ResNet34`` are ``functools.partial``
of :class:`ResNet`; ``_ResNetTiny`` is a small variant for tests. Inputs are
(B, H, W, 1) float32; outputs are (B, n_classes) logits (apply a sigmoid for
probabilities).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmodels.attention import SelfAttention
from jaxmodels.configs import CNNConfig
from jaxmodels.pooling import max_pool


class LogActivation(nnx.Module):
    """Learnable, sign-symmetric logarithmic activation (Zimmermann et al. 2019).

    ``f(x) = sign(x) · α · (log(|x| + e⁻¹) + 1) + β``; the inner term is 0 at x = 0,
    so f is continuous, monotonic for α > 0 and grows only logarithmically.

    Parameters
    ----------
    channels : int
        One (α, β) pair per channel; α starts at 1, β at 0.
    """

    def __init__(self, channels: int) -> None:
        self.alpha = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        magnitude = jnp.log(jnp.abs(x) + np.exp(-1.0)) + 1.0
        return jnp.sign(x) * self.alpha[...] * magnitude + self.beta[...]


class PreActBlock(nnx.Module):
    """Basic pre-activation residual block: two 3×3 convolutions, identity shortcut
    (a strided 1×1 convolution when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, *, stride: int, rngs: nnx.Rngs) -> None:
        self.bn1 = nnx.BatchNorm(c_in, momentum=0.9, rngs=rngs)
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), strides=stride, padding=1,
                              use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.shortcut = (
            nnx.Conv(c_in, c_out, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            if stride != 1 or c_in != c_out else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(x))
        # Pre-activation: the projection shortcut sees the normalised input too.
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(nnx.relu(self.bn2(out)))
        return out + residual


class ResNet(nnx.Module):
    """Pre-activation ResNet classifier for one-channel images.

    Parameters
    ----------
    stage_sizes : sequence of int
        Blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    width : int, default=64
        Channels of the first stage; stage s has ``width · 2**s``.
    n_classes : int, default=11
        Logits out.
    log_activation : bool, default=False
        Log activation after the stem convolution instead of BN + ReLU.
    attention_stages : sequence of int, default=()
        Insert a :class:`~jaxmodels.attention.SelfAttention` block after these stages.
    in_channels : int, default=1
    rngs : nnx.Rngs

    Examples
    --------
    >>> from flax import nnx
    >>> model = ResNet18(width=16, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 128, 128, 1))).shape
    (2, 11)
    """

    def __init__(
        self,
        *,
        stage_sizes: Sequence[int],
        width: int = 64,
        n_classes: int = 11,
        log_activation: bool = False,
        attention_stages: Sequence[int] = (),
        in_channels: int = 1,
        rngs: nnx.Rngs,
    ) -> None:
        # Non-learnable batch norm of the raw input: the network adapts to whatever
        # scale the preprocessing produced (log counts, cross-correlations).
        self.input_norm = nnx.BatchNorm(in_channels, use_scale=False, use_bias=False,
                                        momentum=0.9, rngs=rngs)
        self.stem = nnx.Conv(in_channels, width, (7, 7), strides=2, padding=3,
                             use_bias=log_activation, rngs=rngs)  # BN would cancel a bias
        if log_activation:
            self.stem_act = LogActivation(width)
            self.stem_bn = None
        else:
            self.stem_act = None
            self.stem_bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        blocks = []
        c_in = width
        for stage, n_blocks in enumerate(stage_sizes):
            c_out = width * 2**stage
            for b in range(n_blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(PreActBlock(c_in, c_out, stride=stride, rngs=rngs))
                c_in = c_out
            if stage in attention_stages:
                blocks.append(SelfAttention(c_out, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.final_bn = nnx.BatchNorm(c_in, momentum=0.9, rngs=rngs)
        self.classifier = nnx.Linear(c_in, n_classes, rngs=rngs)
        self.n_features = c_in

    def features(self, x: jax.Array) -> jax.Array:
        """Last convolutional feature map (after the final BN + ReLU), shape
        (B, H/32, W/32, 8·width) for four stages; what Grad-CAM++ explains."""
        x = self.stem(self.input_norm(x))
        x = self.stem_act(x) if self.stem_act is not None else nnx.relu(self.stem_bn(x))
        x = max_pool(x, 3, 2)  # nnx.max_pool's values, with a gradient cheaper on a CPU
        for block in self.blocks:
            x = block(x)
        return nnx.relu(self.final_bn(x))

    def head(self, features: jax.Array) -> jax.Array:
        """Global average pooling and the linear classifier: (B, h, w, C) → (B, n_classes)."""
        return self.classifier(features.mean(axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits, shape (B, n_classes), for images of shape (B, H, W, in_channels)."""
        return self.head(self.features(x))


#: One block per stage: quick trials on a laptop and the CLI tests.
ResNet10 = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1))
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
#: Two stages of one block, width 8: for tests only (compiles in seconds on a CPU).
_ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), width=8)

_PRESETS = {10: ResNet10, 18: ResNet18, 34: ResNet34}


def build_cnn(config: CNNConfig, *, rngs: nnx.Rngs) -> ResNet:
    """The classifier described by ``config``."""
    preset = _PRESETS[config.depth]
    return preset(
        width=config.width,
        n_classes=config.n_classes,
        log_activation=config.log_activation,
        attention_stages=tuple(config.attention_stages),
        rngs=rngs,
    )
