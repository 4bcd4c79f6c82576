"""The shared training loop, data streaming, schedules and checkpoints (tiny data, CPU)."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxmodels.checkpoint import init_model
from jaxmodels.configs import TrainConfig
from jaxmodels.data import PatternBatches, augment
from jaxmodels.losses import positive_weights, weighted_bce
from jaxmodels.resnet import _ResNetTiny
from jaxmodels.train import fit, make_schedule
from tests.jaxmodels._synthetic import ring_images


def ring_loss(model, batch, *, key, step, train):
    x = augment(key, batch["x"]) if train else batch["x"]
    logits = model(x)
    valid = batch["valid"]
    correct = ((logits > 0) == (batch["y"] > 0)).mean(axis=-1)
    accuracy = (correct * valid).sum() / jnp.maximum(valid.sum(), 1)
    return weighted_bce(logits, batch["y"], valid=valid), {"accuracy": accuracy}


class RecordingSource:
    """A NumPy array that records every slice read from it."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape = array.shape

    def __getitem__(self, item):
        self.reads.append((item.start, item.stop))
        return self.array[item]


class TestSchedule:
    def test_warmup_then_cosine(self):
        config = TrainConfig(epochs=10, learning_rate=1e-2, warmup_epochs=1, schedule="cosine")
        schedule = make_schedule(config, steps_per_epoch=10)
        assert float(schedule(0)) == pytest.approx(1e-2 / 11)  # the first step already learns
        assert float(schedule(10)) == pytest.approx(1e-2)
        assert float(schedule(5)) == pytest.approx(1e-2 * 6 / 11)
        assert float(schedule(100)) == pytest.approx(1e-4, rel=1e-3)
        values = [float(schedule(s)) for s in range(10, 100)]
        assert all(a >= b for a, b in zip(values, values[1:]))

    def test_step_decay(self):
        config = TrainConfig(epochs=4, learning_rate=1.0, warmup_epochs=1, schedule="step")
        schedule = make_schedule(config, steps_per_epoch=100)
        assert float(schedule(0)) == pytest.approx(1 / 101)
        assert float(schedule(100)) == pytest.approx(1.0)
        assert float(schedule(150)) == pytest.approx(1.0)
        assert float(schedule(250)) == pytest.approx(0.1)
        assert float(schedule(350)) == pytest.approx(0.01)


class TestPatternBatches:
    def test_each_epoch_visits_every_pattern_once_reading_by_shard(self):
        data = np.arange(100 * 2 * 2, dtype=np.float32).reshape(100, 2, 2)
        source = RecordingSource(data)
        selected = np.array(sorted(np.random.default_rng(1).choice(100, 60, replace=False)))
        labels = selected[:, None] * 10
        batches = PatternBatches(source, selected, batch_size=8, extras={"y": labels},
                                 shuffle=False, chunk=16, window=2)
        seen = []
        for batch in batches.epoch(0):
            index = batch["index"][batch["valid"]]
            np.testing.assert_array_equal(batch["x"][batch["valid"], ..., 0], data[index])
            np.testing.assert_array_equal(batch["y"][batch["valid"], 0], index * 10)
            seen.extend(index)
        assert sorted(seen) == list(selected)
        assert len(batches) == 8  # 60 / 8 rounded up, last batch padded
        # Every read stays inside one shard of 16 patterns.
        assert all(start // 16 == (stop - 1) // 16 for start, stop in source.reads)

    def test_shuffled_order_is_reproducible_and_resumable(self):
        data = np.random.default_rng(0).normal(size=(90, 3, 3)).astype(np.float32)
        batches = PatternBatches(data, np.arange(5, 90), batch_size=10, shuffle=True,
                                 chunk=16, window=2, seed=3)
        first = [b["index"] for b in batches.epoch(1)]
        again = [b["index"] for b in batches.epoch(1)]
        other = [b["index"] for b in batches.epoch(2)]
        tail = [b["index"] for b in batches.epoch(1, start_batch=5)]
        assert len(first) == 8 and all(len(b) == 10 for b in first)  # remainder dropped
        assert len(np.unique(np.concatenate(first))) == 80
        np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
        assert not np.array_equal(np.concatenate(first), np.concatenate(other))
        np.testing.assert_array_equal(np.concatenate(first[5:]), np.concatenate(tail))
        assert np.concatenate(first).tolist() != sorted(np.concatenate(first).tolist())

    @pytest.mark.parametrize("process_index", [0, 1])
    def test_cached_rows_give_the_same_batches_and_are_read_once(self, process_index):
        data = np.random.default_rng(2).normal(size=(100, 3, 3)).astype(np.float32)
        selected = np.random.default_rng(3).permutation(100)[:40]  # scattered, unsorted
        options = dict(batch_size=8, extras={"y": selected * 10}, shuffle=True, chunk=16,
                       window=2, seed=4, process_index=process_index, process_count=2)
        fits = 40 * 3 * 3 * 4
        streamed, cached = RecordingSource(data), RecordingSource(data)
        plain = PatternBatches(streamed, selected, **options)
        kept = PatternBatches(cached, selected, cache_bytes=fits, **options)
        too_small = PatternBatches(data, selected, cache_bytes=fits - 1, **options)
        assert kept.cached and not too_small.cached and not plain.cached
        assert kept.nbytes == fits
        for epoch in range(3):
            for a, b in zip(plain.epoch(epoch), kept.epoch(epoch), strict=True):
                assert a.keys() == b.keys()
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key])
                np.testing.assert_array_equal(b["x"][..., 0], data[b["index"]])
        resumed = list(kept.epoch(1, start_batch=2))
        np.testing.assert_array_equal(resumed[0]["index"], list(plain.epoch(1))[2]["index"])
        # Streaming reads every shard of the selection each epoch; the cache reads them once.
        shards = len(np.unique(selected // 16))
        assert len(cached.reads) == shards
        assert len(streamed.reads) >= 3 * shards
        # All rows at once (validation after training), in the selection's order, from
        # the cache or shard by shard.
        reads = len(streamed.reads)
        for batches in (kept, plain):
            np.testing.assert_array_equal(batches.rows(), data[selected])
        assert len(cached.reads) == shards and len(streamed.reads) == reads + shards


class TestAugment:
    def test_rotation_keeps_rings_and_moves_asymmetric_features(self):
        images, _ = ring_images(4, size=32, seed=0)
        yy, xx = np.mgrid[:32, :32] - 15.5
        ring = np.exp(-((np.hypot(yy, xx) - 8) ** 2) / 2).astype(np.float32)
        spot = np.zeros((32, 32), np.float32)
        spot[4:8, 14:18] = 1.0  # off-centre blob above the centre
        x = jnp.asarray(np.stack([ring, spot] * 4)[..., None])
        out = np.asarray(augment(jax.random.key(0), x))
        assert out.shape == x.shape
        interior = np.hypot(yy, xx) < 14  # away from the corners filled by edge values
        for i in range(0, 8, 2):
            assert np.abs(out[i, ..., 0] - ring)[interior].max() < 0.2
        moved = [np.abs(out[i, ..., 0] - spot).sum() for i in range(1, 8, 2)]
        assert max(moved) > 4.0
        # A rotation preserves the total intensity of a feature inside the circle.
        assert all(abs(out[i, ..., 0].sum() - 16) < 2 for i in range(1, 8, 2))


def positive_weight_ratio():
    labels = np.array([[1, 0], [1, 0], [1, 1], [1, 0], [0, 0]])
    return positive_weights(labels, max_weight=20.0)


def test_positive_weights_and_weighted_bce():
    weights = positive_weight_ratio()
    np.testing.assert_allclose(weights, [1 / 4, 4.0])
    logits = jnp.array([[2.0, -1.0], [0.5, 0.3]])
    targets = jnp.array([[1, 0], [0, 1]])
    expected = -np.mean([
        weights[0] * np.log(1 / (1 + np.exp(-2.0))), np.log(1 - 1 / (1 + np.exp(1.0))),
        np.log(1 - 1 / (1 + np.exp(-0.5))), weights[1] * np.log(1 / (1 + np.exp(-0.3))),
    ])
    assert float(weighted_bce(logits, targets, pos_weight=weights)) == pytest.approx(expected, rel=1e-5)
    # Padding rows do not count.
    padded = weighted_bce(jnp.concatenate([logits, 9 * jnp.ones((1, 2))]),
                          jnp.concatenate([targets, jnp.zeros((1, 2), int)]),
                          pos_weight=weights, valid=jnp.array([True, True, False]))
    assert float(padded) == pytest.approx(expected, rel=1e-5)


def _ring_batches(n_train=192, n_valid=64, seed=0):
    images, labels = ring_images(n_train + n_valid, size=32, seed=seed)
    index = np.arange(n_train + n_valid)
    train = PatternBatches(images, index[:n_train], batch_size=32, extras={"y": labels[:n_train]},
                           shuffle=True, chunk=64, seed=seed)
    valid = PatternBatches(images, index[n_train:], batch_size=32, extras={"y": labels[n_train:]},
                           chunk=64, cache_bytes=1 << 20)
    return train, valid


def test_fit_learns_rings_and_keeps_the_best_model(tmp_path):
    train, valid = _ring_batches()
    lines = []
    config = TrainConfig(epochs=4, learning_rate=3e-3, log_every=3, checkpoint_every=5)
    result = fit(init_model(lambda: _ResNetTiny(n_classes=2, rngs=nnx.Rngs(0))), ring_loss, train, valid=valid,
                 config=config, checkpoint_dir=tmp_path / "ck", best_dir=tmp_path / "best",
                 log=lines.append)
    assert result.steps == 4 * 6 and len(result.history) == 4
    losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == int(np.argmin(losses))
    assert result.history[-1]["val_accuracy"] > 0.85  # two classes of rings, chance 0.5
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert any("loss" in line and "patterns/s" in line for line in lines)
    assert lines[:2] == ["training patterns: 192, 1 MB, read from the store every epoch",
                         "validation patterns: 64, 0 MB, kept in memory"]
    # The returned model carries the best epoch's weights.
    from jaxmodels.train import evaluate
    assert evaluate(result.model, ring_loss, valid)["loss"] == pytest.approx(min(losses), rel=1e-4)


class Interrupt(Exception):
    pass


def test_interrupted_fit_resumes_to_the_same_weights(tmp_path):
    config = TrainConfig(epochs=2, learning_rate=3e-3, log_every=1, checkpoint_every=4,
                         validation_fraction=0.0)
    train, _ = _ring_batches(n_train=128)

    def params(model):
        return jax.tree.leaves(jax.device_get(nnx.state(model, nnx.Param)))

    reference = fit(init_model(lambda: _ResNetTiny(n_classes=2, rngs=nnx.Rngs(0))), ring_loss, train, config=config)

    def crash_at_step_6(line):
        if "step 6 " in line:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(init_model(lambda: _ResNetTiny(n_classes=2, rngs=nnx.Rngs(0))), ring_loss, train, config=config,
            checkpoint_dir=tmp_path / "ck", log=crash_at_step_6)
    lines = []
    resumed = fit(init_model(lambda: _ResNetTiny(n_classes=2, rngs=nnx.Rngs(7))), ring_loss, train, config=config,
                  checkpoint_dir=tmp_path / "ck", log=lines.append)
    assert resumed.resumed_from == 4
    assert any("resuming from step 4" in line for line in lines)
    assert resumed.steps == reference.steps == 8
    for a, b in zip(params(resumed.model), params(reference.model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class Scalar(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones(()))


def diverging_loss(model, batch, *, key, step, train):
    """Training pulls w from 1 towards 0, which makes the validation loss worse."""
    w = model.w[...]
    return (w**2 if train else (w - 1.0) ** 2) + 0.0 * batch["x"].sum(), {}


@pytest.mark.parametrize("min_epochs, stop_after", [(1, 3), (5, 5)])
def test_early_stopping_respects_patience_and_min_epochs(min_epochs, stop_after):
    data = np.zeros((16, 2, 2), np.float32)
    train = PatternBatches(data, np.arange(8), batch_size=4, shuffle=True, chunk=8)
    valid = PatternBatches(data, np.arange(8, 16), batch_size=4, chunk=8)
    config = TrainConfig(epochs=20, learning_rate=0.05, warmup_epochs=0, patience=2,
                         min_epochs=min_epochs, schedule="constant")
    result = fit(Scalar(), diverging_loss, train, valid=valid, config=config, log=lambda line: None)
    assert result.stopped_early and len(result.history) == stop_after
    assert result.best_epoch == 0
    # The returned model holds the best (first-epoch) weights, not the last ones.
    assert float(result.model.w[...]) == pytest.approx(1.0 - 0.05 * 2, abs=0.02)


@pytest.mark.parametrize("seconds, kept", [(0.0, [4, 6]), (1e6, [6])])
def test_short_epochs_are_checkpointed_at_most_once_per_checkpoint_seconds(tmp_path, seconds, kept):
    """Epochs of 2 steps against checkpoint_every=200: an epoch-end save once
    checkpoint_seconds have passed (each costs most of a second), and always the last."""
    data = np.zeros((8, 2, 2), np.float32)
    train = PatternBatches(data, np.arange(8), batch_size=4, shuffle=True, chunk=8)
    config = TrainConfig(epochs=3, warmup_epochs=0, learning_rate=0.05, schedule="constant",
                         checkpoint_seconds=seconds)
    fit(Scalar(), diverging_loss, train, config=config, checkpoint_dir=tmp_path / "ck", log=lambda line: None)
    # Orbax keeps the newest two.
    assert sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == kept


@pytest.mark.parametrize("precision", ["default", "tensorfloat32", "highest"])
def test_training_and_validation_run_at_the_configured_precision(precision):
    """The loss is traced (training and validation steps) under ``TrainConfig.precision``,
    whatever the process default is; a precision JAX does not know is refused up front."""
    seen = []

    def recording_loss(model, batch, *, key, step, train):
        seen.append((train, jax.config.jax_default_matmul_precision))  # at trace time
        return diverging_loss(model, batch, key=key, step=step, train=train)

    data = np.zeros((16, 2, 2), np.float32)
    train = PatternBatches(data, np.arange(8), batch_size=4, shuffle=True, chunk=8)
    valid = PatternBatches(data, np.arange(8, 16), batch_size=4, chunk=8)
    config = TrainConfig(epochs=2, warmup_epochs=0, precision=precision)
    with jax.default_matmul_precision("bfloat16"):
        fit(Scalar(), recording_loss, train, valid=valid, config=config, log=lambda line: None)
    assert {train for train, _ in seen} == {True, False}
    assert {value for _, value in seen} == {precision}
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp32")


def test_a_finished_run_goes_on_only_when_its_limits_are_raised(tmp_path):
    """``train`` again on a finished model directory: nothing more with the same settings;
    more epochs after ``--epochs`` is raised; an early stop holds until ``--patience`` is."""
    data = np.zeros((16, 2, 2), np.float32)
    train = PatternBatches(data, np.arange(8), batch_size=4, shuffle=True, chunk=8)
    valid = PatternBatches(data, np.arange(8, 16), batch_size=4, chunk=8)

    def run(directory, **settings):
        config = TrainConfig(learning_rate=0.05, warmup_epochs=0, min_epochs=1, schedule="constant", **settings)
        return fit(Scalar(), diverging_loss, train, valid=valid, config=config,
                   checkpoint_dir=tmp_path / directory, log=lambda line: None)

    assert len(run("epochs", epochs=2, patience=0).history) == 2
    again = run("epochs", epochs=2, patience=0)
    assert (again.resumed_from, again.steps, len(again.history)) == (4, 4, 2)
    raised = run("epochs", epochs=4, patience=0)
    assert (raised.resumed_from, raised.steps, len(raised.history)) == (4, 8, 4)

    assert len(run("early", epochs=20, patience=2).history) == 3  # stopped early
    assert len(run("early", epochs=20, patience=2).history) == 3
    patient = run("early", epochs=20, patience=4)
    assert len(patient.history) == 5 and patient.stopped_early and patient.best_epoch == 0


def test_batch_norm_recalibration_averages_the_batches_statistics():
    # The input layer's batch norm sees the images themselves, so its recalibrated mean
    # and variance must be the average of the batches' own statistics.
    from jaxmodels.train import recalibrate_batch_norm

    def plain_loss(model, batch, *, key, step, train):  # no augmentation: known inputs
        return weighted_bce(model(batch["x"]), batch["y"], valid=batch["valid"]), {}

    train, _ = _ring_batches(n_train=160)
    model = init_model(lambda: _ResNetTiny(n_classes=2, rngs=nnx.Rngs(0)))
    assert recalibrate_batch_norm(model, plain_loss, train, n_batches=3, epoch=2) == 3
    inputs = [np.asarray(b["x"], np.float64) for b in list(train.epoch(2))[:3]]
    expected_mean = np.mean([x.mean(axis=(0, 1, 2)) for x in inputs], axis=0)
    expected_var = np.mean([x.var(axis=(0, 1, 2)) for x in inputs], axis=0)
    np.testing.assert_allclose(model.input_norm.mean[...], expected_mean, rtol=1e-4)
    np.testing.assert_allclose(model.input_norm.var[...], expected_var, rtol=1e-3)
    # A network without batch norm is left alone.
    assert recalibrate_batch_norm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), plain_loss, train,
                                  n_batches=3, epoch=0) == 0
