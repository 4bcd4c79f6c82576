"""Typed configurations for airysort's networks and their training.

One frozen dataclass per concern, each with defaults a physicist can use as is:

* :class:`TrainConfig` — the optimisation loop shared by every model
  (:func:`jaxmodels.train.fit`): epochs, batch size, learning-rate schedule,
  weight decay, validation split, early stopping, checkpoints.
* :class:`CNNConfig` — the supervised ResNet classifier (:mod:`jaxmodels.resnet`).
* ``VAEConfig`` — the β-TCVAE, appended at the bottom by its module's author.

Variants override only what differs, e.g.
``dataclasses.replace(TrainConfig(), epochs=5)``. Every config round-trips
through a plain dict (:func:`to_dict` / ``Config.from_dict``) so that it can be
stored as JSON next to a checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON-serialisable dict of a config dataclass (tuples become lists)."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(config).items()
    }


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build ``cls`` from a dict, ignoring unknown keys and restoring tuples.

    Unknown keys are ignored so that a model directory written by a newer version
    with an extra option still loads.
    """
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        if key in known:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


#: Values of ``jax.default_matmul_precision`` that :class:`TrainConfig` accepts.
MATMUL_PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Options of the training loop shared by the CNN and the VAE.

    Parameters
    ----------
    epochs : int, default=30
        Maximum number of passes over the training patterns.
    batch_size : int, default=64
        Global batch size (patterns per optimiser step, summed over all devices);
        rounded up to a multiple of the device count.
    learning_rate : float, default=1e-3
        Peak learning rate of the AdamW optimiser, reached after the warm-up.
    warmup_epochs : float, default=1.0
        Linear warm-up from 0 to ``learning_rate``, in epochs.
    schedule : {"cosine", "step", "constant"}, default="cosine"
        Decay after the warm-up: cosine to 1 % of the peak, or ÷10 at 50 % and 75 %
        of training ("step").
    weight_decay : float, default=1e-4
        Decoupled (AdamW) weight decay, applied to kernels only (not to biases or
        normalisation scales).
    grad_clip : float, default=1.0
        Clip the global gradient norm to this value (0 disables clipping).
    seed : int, default=0
        Seed for initialisation, the validation split, shuffling and augmentation.
    validation_fraction : float, default=0.15
        Fraction of the training patterns held out for validation (early stopping,
        threshold tuning). 0 disables validation.
    patience : int, default=8
        Stop after this many epochs without improvement of the validation loss
        (0 disables early stopping).
    min_epochs : int, default=10
        Never stop early before this many epochs: with few labelled patterns the
        validation loss of the first epochs is noise (batch statistics still settling).
    checkpoint_every : int, default=200
        Save a resumable checkpoint every this many optimiser steps, and at the end.
    checkpoint_seconds : float, default=60.0
        When an epoch has fewer than ``checkpoint_every`` steps, also save at the end of an
        epoch once this many seconds have passed since the last save (a killed run loses
        at most about this much; Ctrl-C saves the step in hand whatever the setting).
    log_every : int, default=20
        Print loss and metrics to stderr every this many steps.
    batch_norm_batches : int, default=16
        At the end of every epoch, recompute the BatchNorm layers' running statistics as
        the average over this many training batches with the epoch's final weights
        (:func:`jaxmodels.train.recalibrate_batch_norm`); 0 keeps the running averages of
        training. Models without BatchNorm (the VAE) skip it.
    input_cache_mib : int, default=1024
        Keep the training patterns (and, separately, the validation patterns) in host
        memory after reading them once when they take at most this many MiB as float32
        (:class:`jaxmodels.data.PatternBatches`); larger sets, or 0, are read from the
        store every epoch. A labelled subset is scattered over the store, so reading it
        again decodes every shard it touches.
    precision : {"highest", "high", "default", "float32", "tensorfloat32", "bfloat16"}, default="highest"
        Precision of the matrix products and convolutions of training and validation
        (``jax.default_matmul_precision``), and of ``predict``, ``explain`` and ``embed``
        with the model (:func:`pipeline.model_dir.trained_precision`). "highest" computes in float32 on every
        device; "default" lets NVIDIA GPUs round their inputs to TensorFloat-32 (10-bit
        mantissa), faster for wide networks. On an H100 the README's width-16 ResNet
        trained as fast either way (58 against 56 s; docs/results.md).
    """

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_epochs: float = 1.0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    validation_fraction: float = 0.15
    patience: int = 8
    min_epochs: int = 10
    checkpoint_every: int = 200
    checkpoint_seconds: float = 60.0
    log_every: int = 20
    batch_norm_batches: int = 16
    input_cache_mib: int = 1024
    precision: str = "highest"

    def __post_init__(self) -> None:
        if self.precision not in MATMUL_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if not 0 <= self.seed < 2**32:  # what NumPy and scikit-learn accept as a seed
            raise ValueError(f"seed must be an integer from 0 to 2**32 - 1, got {self.seed!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(
                f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}"
            )
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every!r}")
        if not self.checkpoint_seconds >= 0:  # NaN too
            raise ValueError(f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds!r}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 (0: no early stopping), got {self.patience!r}")
        if self.batch_norm_batches < 0:
            raise ValueError(f"batch_norm_batches must be >= 0, got {self.batch_norm_batches!r}")
        if self.input_cache_mib < 0:
            raise ValueError(f"input_cache_mib must be >= 0, got {self.input_cache_mib!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, values)


@dataclass(frozen=True, kw_only=True)
class CNNConfig:
    """Architecture of the multi-label ResNet classifier (:mod:`jaxmodels.resnet`).

    Parameters
    ----------
    depth : {18, 34, 10}, default=18
        Pre-activation ResNet depth (10: one block per stage, for quick trials).
    width : int, default=32
        Channels of the first stage; stages double it (width, 2w, 4w, 8w). The
        ImageNet ResNet uses 64; 32 is plenty for 128×128 diffraction images and
        four times cheaper.
    log_activation : bool, default=True
        Use the learnable logarithmic activation of Zimmermann et al. (2019) after
        the first convolution, which compresses the orders of magnitude between
        the central speckle and the outer rings.
    attention_stages : tuple of int, default=()
        Stages (0-3) after which a SAGAN self-attention block is inserted.
    input : {"image", "ccf"}, default="image"
        Store variable the network reads.
    n_classes : int, default=11
        Number of sigmoid outputs (the taxonomy's 11 classes).
    pos_weight_max : float, default=20.0
        Upper bound of the positive-class weight of the class-balanced BCE, so that
        a class with 3 labelled examples does not dominate the loss.
    augment : bool, default=True
        Random flips and rotations on the device during training.
    """

    depth: int = 18
    width: int = 32
    log_activation: bool = True
    attention_stages: tuple[int, ...] = ()
    input: Literal["image", "ccf"] = "image"
    n_classes: int = 11
    pos_weight_max: float = 20.0
    augment: bool = True

    def __post_init__(self) -> None:
        if self.depth not in (10, 18, 34):
            raise ValueError(f"depth must be 18 or 34 (or 10 for quick trials), got {self.depth!r}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width!r}")
        if any(s not in (0, 1, 2, 3) for s in self.attention_stages):
            raise ValueError(f"attention_stages must be in 0..3, got {self.attention_stages!r}")
        if self.input not in ("image", "ccf"):
            raise ValueError(f"input must be 'image' or 'ccf', got {self.input!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CNNConfig:
        return from_dict(cls, values)


__all__ = ["TrainConfig", "CNNConfig", "to_dict", "from_dict"]


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Architecture and objective of the β-TCVAE (:mod:`jaxmodels.vae`,
    :func:`jaxmodels.losses.beta_tcvae_loss`).

    Parameters
    ----------
    preset : {"small", "base", "tiny"}, default="small"
        Architecture preset of :data:`jaxmodels.vae.PRESETS`; "small" trains on
        ~2000 patterns in a few minutes on two CPU cores, "tiny" is for tests.
    latent_dim : int, default=10
        Number of latent factors.
    resolution : int or None, default=None
        Side (pixels) the patterns are resized to; None keeps the preset's.
    attention : bool, default=False
        Self-attention at the lowest resolution of encoder and decoder.
    alpha, beta, gamma : float, default=1.0, 6.0, 1.0
        Weights of the index-code mutual information, the total correlation and the
        dimension-wise KL in the decomposed ELBO (defaults of Chen et al. 2018).
    estimator : {"mss", "mws"}, default="mss"
        Minibatch-stratified or minibatch-weighted sampling estimate of log q(z).
    kl_warmup_epochs : float, default=2.0
        The three KL terms are scaled by a weight rising linearly from 0 to 1 over this
        many epochs (0 disables the warm-up), so the decoder learns before the
        posterior is pulled to the prior.
    input : {"image"}, default="image"
        Store variable the VAE reads.
    """

    preset: Literal["small", "base", "tiny"] = "small"
    latent_dim: int = 10
    resolution: int | None = None
    attention: bool = False
    alpha: float = 1.0
    beta: float = 6.0
    gamma: float = 1.0
    estimator: Literal["mss", "mws"] = "mss"
    kl_warmup_epochs: float = 2.0
    input: Literal["image"] = "image"

    def __post_init__(self) -> None:
        if self.preset not in ("small", "base", "tiny"):
            raise ValueError(f"preset must be 'small', 'base' or 'tiny', got {self.preset!r}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim!r}")
        if self.estimator not in ("mss", "mws"):
            raise ValueError(f"estimator must be 'mss' or 'mws', got {self.estimator!r}")
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError(
                f"alpha, beta, gamma must be >= 0, got {(self.alpha, self.beta, self.gamma)!r}"
            )
        if self.kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs must be >= 0, got {self.kl_warmup_epochs!r}")
        if self.input != "image":
            raise ValueError(
                f"the VAE reads preprocessed patterns, input must be 'image', got {self.input!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VAEConfig:
        return from_dict(cls, values)


__all__ += ["VAEConfig"]
