"""The one training loop of airysort, shared by the ResNet classifier and the β-TCVAE.

How a model plugs in
--------------------
:func:`fit` knows nothing about the model. A caller provides four things:

1. ``model`` — any ``flax.nnx.Module`` (built by the caller, e.g.
   ``init_model(lambda: ResNet18(rngs=nnx.Rngs(seed)))``, see :mod:`jaxmodels.checkpoint`).
   Batch-norm / dropout modes are switched with ``model.train()`` / ``model.eval()`` by the loop.
2. ``loss_fn(model, batch, *, key, step, train) -> (loss, aux)`` — a pure function,
   traced under :func:`flax.nnx.jit`:

   * ``batch``: dict of device arrays from :class:`jaxmodels.data.PatternBatches`
     (``"x"`` (B, H, W, 1) float32, ``"valid"`` (B,) bool, ``"index"`` (B,), plus
     the ``extras`` given to it, e.g. ``"y"``). Rows with ``valid`` False are
     padding; weight them out of the loss (training batches are always full).
   * ``key``: a fresh ``jax.random`` key for this step (augmentation,
     reparameterisation sampling); ``step``: the optimiser step as a 0-d int32
     array (β annealing); ``train``: Python bool, False during validation
     (switch augmentation off there).
   * returns a scalar ``loss`` (mean over valid rows) and ``aux``, a flat dict of
     scalar metrics (logged, averaged over the validation set).

3. ``train`` and ``valid`` — :class:`jaxmodels.data.PatternBatches` (shuffled /
   not shuffled) streaming from the store.
4. ``config`` — :class:`jaxmodels.configs.TrainConfig` and a model directory.

Example (see ``pipeline/classify.py`` for the real one)::

    def loss_fn(model, batch, *, key, step, train):
        x = augment(key, batch["x"]) if train else batch["x"]
        loss = weighted_bce(model(x), batch["y"], pos_weight, valid=batch["valid"])
        return loss, {}

    result = fit(model, loss_fn, train_batches, valid=valid_batches,
                 config=TrainConfig(epochs=20), checkpoint_dir=model_dir / "checkpoints",
                 best_dir=model_dir / "best")
    result.model  # best-validation weights, eval mode

What the loop does: AdamW with warm-up + cosine/step schedule and decoupled weight
decay on kernels (:func:`make_optimizer`), gradient clipping, data parallelism over
every device (batch sharded along a ``"data"`` mesh, state replicated; see
:mod:`jaxmodels.parallel`), validation every epoch, early stopping on the
validation loss, the best model saved to ``best_dir``, and resumable orbax
checkpoints every ``checkpoint_every`` steps (or, for short epochs, at the end of an
epoch once ``checkpoint_seconds`` have passed) and at the end: calling :func:`fit` again with the
same directories continues from the last checkpoint, at the same batch of the same
epoch, with the same data order and random keys.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmodels.checkpoint import TrainingCheckpointer, load_state_into, save_model, save_state
from jaxmodels.configs import TrainConfig
from jaxmodels.data import PatternBatches
from jaxmodels.parallel import make_data_mesh, replicate, shard_batch


class LossFn(Protocol):
    def __call__(
        self, model: nnx.Module, batch: dict[str, jax.Array], *, key: jax.Array,
        step: jax.Array, train: bool,
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _all_agree(decision: bool) -> bool:
    """Process 0's ``decision``, on every process. A checkpoint is a collective: processes
    (several srun tasks) that decided it each by their own clock would wait for each other
    for ever."""
    if jax.process_count() == 1:
        return decision
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(decision)))


def _ctrl_c_at_step_boundaries() -> tuple[Callable[[], bool], Callable[[], None]]:
    """Turn the first Ctrl-C into a request that :func:`fit` honours after the current step
    (a checkpoint, then ``KeyboardInterrupt``), so an interrupted run loses nothing; a
    second Ctrl-C interrupts at once. Returns ``(requested, restore)``. Left alone outside
    the main thread, where the user ignores SIGINT, and in multi-process runs (processes
    stopping at different steps would wait for each other in the checkpoint's collectives).
    """
    import signal
    import threading

    previous = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread() or jax.process_count() > 1
            or previous in (signal.SIG_IGN, None)):
        return (lambda: False), (lambda: None)
    requested: list[bool] = []

    def handler(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(True)
        print("stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    return (lambda: bool(requested)), (lambda: signal.signal(signal.SIGINT, previous))


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    model : nnx.Module
        The trained model in eval mode, holding the best-validation weights (the
        last weights when there is no validation set).
    history : list of dict
        One entry per finished epoch: ``epoch``, ``train_loss``, ``val_loss`` and
        the validation ``aux`` metrics prefixed ``val_``.
    best_epoch : int
        Epoch (0-based) of the lowest validation loss, -1 without validation.
    steps : int
        Optimiser steps taken in total (including before a resume).
    stopped_early : bool
        True if early stopping ended training before ``config.epochs``.
    resumed_from : int or None
        Step of the checkpoint this call resumed from.
    """

    model: nnx.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    steps: int = 0
    stopped_early: bool = False
    resumed_from: int | None = None


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate per step: linear warm-up, then cosine or step decay.

    Parameters
    ----------
    config : TrainConfig
        ``learning_rate``, ``warmup_epochs``, ``schedule``, ``epochs``.
    steps_per_epoch : int
        Optimiser steps per epoch.
    """
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(config.warmup_epochs * steps_per_epoch)))
    peak = config.learning_rate
    # The ramp starts one step above zero (a first step at rate 0 would be wasted) and
    # reaches the peak at step ``warmup``.
    start = peak / (warmup + 1)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=start, peak_value=peak, warmup_steps=warmup,
            decay_steps=total, end_value=peak * 1e-2,
        )
    if config.schedule == "step":
        decay = optax.piecewise_constant_schedule(
            peak, {int(0.5 * total) - warmup: 0.1, int(0.75 * total) - warmup: 0.1}
        )
    else:
        decay = optax.constant_schedule(peak)
    ramp = optax.linear_schedule(start, peak, max(warmup, 1))
    return optax.join_schedules([ramp, decay], [warmup])


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW with :func:`make_schedule`, weight decay on kernels only, gradient clipping.

    The same optimisation settings return the same object (cached), which keeps
    the optimiser's static structure identical between runs so that jitted steps
    are not recompiled when only, e.g., ``checkpoint_every`` differs.
    """
    relevant = {name: getattr(config, name) for name in
                ("epochs", "learning_rate", "warmup_epochs", "schedule", "weight_decay", "grad_clip")}
    return _optimizer(tuple(sorted(relevant.items())), steps_per_epoch)


@functools.lru_cache(maxsize=16)
def _optimizer(settings: tuple, steps_per_epoch: int) -> optax.GradientTransformation:
    config = TrainConfig(**dict(settings))

    def decay_mask(params: Any) -> Any:
        # Biases and normalisation scales/offsets (1-D) are not decayed.
        return jax.tree.map(lambda p: p.ndim > 1, params)

    adamw = optax.adamw(
        make_schedule(config, steps_per_epoch),
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw


def _mean_metrics(sums: dict[str, float], count: float) -> dict[str, float]:
    return {k: v / max(count, 1.0) for k, v in sums.items()}


@functools.lru_cache(maxsize=8)
def _train_step(loss_fn: LossFn) -> Callable:
    """Jitted optimiser step for ``loss_fn``; cached so that a second :func:`fit` with the
    same loss, architecture and :func:`make_optimizer` reuses the compiled program."""

    @nnx.jit
    def train_step(model, optimizer, batch, key, step):
        def objective(model):
            return loss_fn(model, batch, key=key, step=step, train=True)

        (loss, aux), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, aux

    return train_step


@functools.lru_cache(maxsize=16)
def _forward_step(loss_fn: LossFn, *, train: bool) -> Callable:
    """Jitted ``loss_fn`` without an update, cached so that every epoch reuses one trace:
    evaluation (``train=False``), or a training-mode pass in which batch norm's running
    statistics move (``train=True``, :func:`recalibrate_batch_norm`)."""

    @nnx.jit
    def forward_step(model, batch, key):
        return loss_fn(model, batch, key=key, step=jnp.zeros((), jnp.int32), train=train)

    return forward_step


def recalibrate_batch_norm(
    model: nnx.Module,
    loss_fn: LossFn,
    batches: PatternBatches,
    *,
    n_batches: int,
    epoch: int,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> int:
    """Set every BatchNorm's running mean and variance to their average over ``n_batches``
    training batches, computed with the current weights ("precise BN").

    The running averages kept during training mix statistics of weights from the last
    few dozen steps; while the learning rate is high those weights differ enough that the
    network in eval mode no longer matches itself in training mode, and the validation
    loss jumps from epoch to epoch (Wu & Johnson, "Rethinking 'Batch' in BatchNorm",
    arXiv:2105.07576). With the layers' momentum set to 0 for the passes, each pass leaves
    exactly its batch's statistics in the running averages, which are then averaged.

    Returns
    -------
    int
        Batches used (0 when the model has no BatchNorm).
    """
    layers = [module for _, module in nnx.iter_modules(model) if isinstance(module, nnx.BatchNorm)]
    if not layers or n_batches < 1:
        return 0
    mesh = make_data_mesh() if mesh is None else mesh
    momenta = [layer.momentum for layer in layers]
    sums: list[tuple[jax.Array, jax.Array]] = []
    used = 0
    try:
        for layer in layers:
            layer.momentum = 0.0
        model.train()
        step = nnx.cached_partial(_forward_step(loss_fn, train=True), model)
        key = jax.random.fold_in(jax.random.key(seed), 7919 + epoch)
        for i, host_batch in enumerate(batches.epoch(epoch)):
            if i == n_batches:
                break
            step(shard_batch(host_batch, mesh), jax.random.fold_in(key, i))
            stats = [(layer.mean[...], layer.var[...]) for layer in layers]
            sums = stats if not sums else [(m + a, v + b) for (m, v), (a, b) in zip(sums, stats)]
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    for layer, (mean, var) in zip(layers, sums):
        layer.mean[...], layer.var[...] = mean / used, var / used
    return used


def evaluate(
    model: nnx.Module,
    loss_fn: LossFn,
    batches: PatternBatches,
    *,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
    """Loss and ``aux`` metrics of ``model`` averaged over ``batches`` (eval mode).

    Averages are weighted by the number of valid rows in each batch, so the padded
    last batch counts correctly.

    Returns
    -------
    dict
        ``{"loss": float, **aux}``.
    """
    mesh = make_data_mesh() if mesh is None else mesh
    model.eval()
    eval_step = nnx.cached_partial(_forward_step(loss_fn, train=False), model)  # see fit
    key = jax.random.key(seed)
    sums: dict[str, float] = {}
    count = 0.0
    for i, host_batch in enumerate(batches.epoch(0)):
        batch = shard_batch(host_batch, mesh)
        # Rows of the whole (global) batch: with several processes each host batch is only
        # this process's share, and every process must weight batches alike.
        n_valid = float(jnp.sum(batch["valid"]))
        loss, aux = eval_step(batch, jax.random.fold_in(key, i))
        for name, value in {"loss": loss, **aux}.items():
            sums[name] = sums.get(name, 0.0) + float(value) * n_valid
        count += n_valid
    return _mean_metrics(sums, count)


def fit(
    model: nnx.Module,
    loss_fn: LossFn,
    train: PatternBatches,
    *,
    config: TrainConfig,
    valid: PatternBatches | None = None,
    checkpoint_dir: str | Path | None = None,
    best_dir: str | Path | None = None,
    resume: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    log: Callable[[str], None] = _stderr,
) -> FitResult:
    """Train ``model`` with ``loss_fn`` on ``train``; see the module docstring.

    Parameters
    ----------
    model : nnx.Module
        Freshly initialised model; updated in place.
    loss_fn : callable
        ``loss_fn(model, batch, *, key, step, train) -> (loss, aux)``.
    train : PatternBatches
        Shuffled training batches (``drop_remainder=True``); the batch size must be a
        multiple of the device count.
    config : TrainConfig
        Epochs, schedule, weight decay, patience, checkpoint interval, seed.
    valid : PatternBatches, optional
        Validation batches, evaluated after every epoch for early stopping and
        model selection.
    checkpoint_dir : path, optional
        Resumable checkpoints; without it training cannot resume.
    best_dir : path, optional
        The best model (lowest validation loss, or the last without validation)
        is saved here for :func:`jaxmodels.checkpoint.load_model`.
    resume : bool, default=True
        Continue from the newest checkpoint in ``checkpoint_dir`` if there is one.
    mesh : jax.sharding.Mesh, optional
        Device mesh; default all devices (:func:`jaxmodels.parallel.make_data_mesh`).
    log : callable, default=print to stderr
        Receives one progress line at a time.

    Returns
    -------
    FitResult
    """
    mesh = make_data_mesh() if mesh is None else mesh
    if train.batch_size % mesh.size:
        raise ValueError(
            f"batch_size {train.batch_size!r} is not a multiple of the {mesh.size} devices; "
            "round it with jaxmodels.parallel.round_batch_size"
        )
    steps_per_epoch = len(train)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train.indices)} training patterns do not fill one batch of "
            f"{train.batch_size}; lower the batch size or label more patterns"
        )
    optimizer = nnx.Optimizer(model, make_optimizer(config, steps_per_epoch), wrt=nnx.Param)
    schedule = make_schedule(config, steps_per_epoch)
    # Parameters and optimiser moments live, replicated, on every device.
    nnx.update(model, replicate(nnx.state(model), mesh))
    nnx.update(optimizer, replicate(nnx.state(optimizer), mesh))

    state = {"epoch": 0, "batch": 0, "step": 0, "best_val_loss": math.inf,
             "best_epoch": -1, "bad_epochs": 0, "finished": False, "history": []}
    checkpointer = TrainingCheckpointer(checkpoint_dir) if checkpoint_dir is not None else None
    resumed_from = None
    if checkpointer is not None and resume and checkpointer.latest_step() is not None:
        resumed_from = checkpointer.latest_step()
        state.update(checkpointer.restore(model, optimizer))
        if state["best_val_loss"] is None:  # JSON has no infinity
            state["best_val_loss"] = math.inf
        # Finished or not under the settings of this call: a finished run goes on when
        # ``epochs`` (or ``patience``, after an early stop) was raised.
        stopped_early = (config.patience and state["bad_epochs"] >= config.patience
                         and state["epoch"] >= config.min_epochs)
        state["finished"] = bool(state["epoch"] >= config.epochs or stopped_early)
        log(f"resuming from step {resumed_from} (epoch {state['epoch'] + 1}, "
            f"batch {state['batch']}) in {checkpoint_dir}")

    # nnx.cached_partial walks the model's graph once here instead of at every step
    # (several milliseconds per call otherwise: more than a small batch's compute on a
    # GPU). It binds a train-mode clone sharing the model's variables, so the
    # evaluations in between, in eval mode, leave it alone.
    model.train()
    train_step = nnx.cached_partial(_train_step(loss_fn), model, optimizer)

    # The best weights stay in host memory and reach best_dir just before each
    # checkpoint, so that best_dir always matches the checkpoint's best_val_loss.
    best_state: Any = None
    best_dirty = False
    last_saved = time.monotonic()

    def save_checkpoint() -> None:
        nonlocal best_dirty, last_saved
        last_saved = time.monotonic()
        if best_dir is not None and best_dirty:
            save_state(best_dir, best_state)
            best_dirty = False
        if checkpointer is not None:
            meta = dict(state)
            if meta["best_val_loss"] == math.inf:
                meta["best_val_loss"] = None
            checkpointer.save(state["step"], model, optimizer, meta)

    for name, batches in (("training", train), ("validation", valid)):
        if batches is not None:
            where = "kept in memory" if batches.cached else "read from the store every epoch"
            log(f"{name} patterns: {len(batches.indices)}, {batches.nbytes / 1e6:.0f} MB, {where}")

    def stop_if_asked() -> None:
        """Ctrl-C was pressed: checkpoint the step just finished, then stop."""
        if stop_requested():
            if checkpointer is None:
                raise KeyboardInterrupt
            save_checkpoint()
            raise KeyboardInterrupt(f"training stopped at step {state['step']}, checkpointed in "
                                    f"{checkpoint_dir}: run the same command to go on from there")

    base_key = jax.random.key(config.seed)
    stop_requested, restore_ctrl_c = _ctrl_c_at_step_boundaries()
    # Undone in reverse order on the way out: the precision, Ctrl-C's handler, then the
    # checkpointer (which waits for its saves).
    with contextlib.ExitStack() as cleanup:
        if checkpointer is not None:
            cleanup.callback(checkpointer.close)
        cleanup.callback(restore_ctrl_c)
        # Before the first step compiles: the precision is part of every jitted step.
        cleanup.enter_context(jax.default_matmul_precision(config.precision))
        while not state["finished"] and state["epoch"] < config.epochs:
            epoch = state["epoch"]
            model.train()
            t0, seen, running = time.perf_counter(), 0, []
            epoch_losses = []
            for host_batch in train.epoch(epoch, start_batch=state["batch"]):
                step = state["step"]
                loss, aux = train_step(
                    shard_batch(host_batch, mesh),
                    jax.random.fold_in(base_key, step), jnp.asarray(step, jnp.int32),
                )
                running.append((loss, aux))
                seen += len(host_batch["valid"]) * jax.process_count()
                state["step"] += 1
                state["batch"] += 1
                if state["step"] % config.log_every == 0 or state["batch"] == steps_per_epoch:
                    values = jax.device_get(running)
                    mean_loss = float(np.mean([v[0] for v in values]))
                    epoch_losses.extend(float(v[0]) for v in values)
                    extra = "".join(
                        f" {k} {np.mean([float(v[1][k]) for v in values]):.4g}"
                        for k in values[0][1]
                    )
                    rate = seen / (time.perf_counter() - t0)
                    log(f"epoch {epoch + 1}/{config.epochs} step {state['step']} "
                        f"loss {mean_loss:.4f}{extra} lr {float(schedule(step)):.2e} "
                        f"{rate:.0f} patterns/s")
                    running = []
                if state["batch"] < steps_per_epoch:  # the epoch's last step: after its validation
                    if state["step"] % config.checkpoint_every == 0:
                        save_checkpoint()
                    stop_if_asked()
            if running:
                epoch_losses.extend(float(v[0]) for v in jax.device_get(running))

            record: dict[str, float] = {"epoch": epoch,
                                        "train_loss": float(np.mean(epoch_losses or [np.nan]))}
            if config.batch_norm_batches:
                recalibrate_batch_norm(model, loss_fn, train, n_batches=config.batch_norm_batches,
                                       epoch=epoch, seed=config.seed, mesh=mesh)
            if valid is not None and len(valid.indices):
                metrics = evaluate(model, loss_fn, valid, seed=config.seed, mesh=mesh)
                record.update({f"val_{k}": v for k, v in metrics.items()})
                log("validation " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                if metrics["loss"] < state["best_val_loss"]:
                    state["best_val_loss"] = metrics["loss"]
                    state["best_epoch"] = epoch
                    state["bad_epochs"] = 0
                    best_state, best_dirty = jax.device_get(nnx.state(model)), True
                else:
                    state["bad_epochs"] += 1
                    if (config.patience and state["bad_epochs"] >= config.patience
                            and epoch + 1 >= config.min_epochs):
                        log(f"early stopping: no validation improvement for "
                            f"{state['bad_epochs']} epochs (best epoch {state['best_epoch'] + 1})")
                        state["finished"] = True
            state["history"].append(record)
            state["epoch"] += 1
            state["batch"] = 0
            if state["epoch"] >= config.epochs:
                state["finished"] = True
            # Epochs shorter than checkpoint_every (small labelled sets) would otherwise save
            # nothing for many epochs; each save costs about 0.7 s, as much as a short
            # epoch on a GPU, so at most one per checkpoint_seconds.
            due = (steps_per_epoch < config.checkpoint_every
                   and time.monotonic() - last_saved >= config.checkpoint_seconds)
            if state["finished"] or state["step"] % config.checkpoint_every == 0 or _all_agree(due):
                save_checkpoint()
            stop_if_asked()

    has_best = valid is not None and state["best_epoch"] >= 0
    if has_best:
        # Return the weights of the best validation epoch, not the last ones.
        if best_state is not None:
            nnx.update(model, replicate(best_state, mesh))
        elif best_dir is not None:  # resumed a finished run: the best is on disk
            load_state_into(best_dir, model)
    elif best_dir is not None:
        save_model(best_dir, model)
    model.eval()
    return FitResult(
        model=model,
        history=state["history"],
        best_epoch=state["best_epoch"],
        steps=state["step"],
        stopped_early=state["finished"] and state["epoch"] < config.epochs,
        resumed_from=resumed_from,
    )
