"""SAGAN-style self-attention for convolutional feature maps (Flax NNX).

Zhang et al., "Self-Attention Generative Adversarial Networks", ICML 2019: every
position attends to every other through 1×1-convolution queries, keys and values;
the result is added to the input scaled by a learned ``gamma`` that starts at 0, so
the block is the identity at initialisation and the network learns how much
non-local context (e.g. the far side of a ring) to mix in. Used by the ResNet
classifier and available to the VAE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SelfAttention(nnx.Module):
    """Self-attention over the spatial positions of a (B, H, W, C) feature map.

    Parameters
    ----------
    channels : int
        Input and output channels C.
    reduction : int, default=8
        Queries and keys have ``channels // reduction`` channels (SAGAN uses 8).
    pool : bool, default=True
        Max-pool keys and values 2×2 (as SAGAN does) to cut the cost 4-fold; needs
        even H and W.
    rngs : nnx.Rngs
        Initialisation keys.
    """

    def __init__(self, channels: int, *, reduction: int = 8, pool: bool = True,
                 rngs: nnx.Rngs) -> None:
        inner = max(1, channels // reduction)
        value_channels = max(1, channels // 2)
        conv = lambda c_in, c_out: nnx.Conv(c_in, c_out, (1, 1), use_bias=False, rngs=rngs)
        self.query = conv(channels, inner)
        self.key = conv(channels, inner)
        self.value = conv(channels, value_channels)
        self.out = conv(value_channels, channels)
        self.gamma = nnx.Param(jnp.zeros((), jnp.float32))
        self.pool = pool

    def __call__(self, x: jax.Array) -> jax.Array:
        """Return ``x + gamma * attention(x)``, shape (B, H, W, C)."""
        batch, height, width, channels = x.shape
        q = self.query(x).reshape(batch, height * width, -1)
        k, v = self.key(x), self.value(x)
        if self.pool and height % 2 == 0 and width % 2 == 0:
            k = nnx.max_pool(k, (2, 2), strides=(2, 2))
            v = nnx.max_pool(v, (2, 2), strides=(2, 2))
        k = k.reshape(batch, -1, k.shape[-1])
        v = v.reshape(batch, -1, v.shape[-1])
        attention = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k), axis=-1)
        o = jnp.einsum("bqk,bkc->bqc", attention, v).reshape(batch, height, width, -1)
        return x + self.gamma[...] * self.out(o)
