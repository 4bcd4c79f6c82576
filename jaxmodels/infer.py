"""Batched, jitted inference and decision thresholds for the multi-label classifier.

:func:`predict_proba` runs a trained model over an in-memory block of patterns (one
store shard in a Dask task, see ``pipeline/classify.py``) in fixed-size batches so
that one compiled program serves every block; :func:`tune_thresholds` picks the
per-class decision threshold that maximises F1 on validation patterns.
"""

from __future__ import annotations

import numpy as np
import jax
from flax import nnx
from jax.experimental import multihost_utils
from sklearn.metrics import f1_score

from jaxmodels.parallel import make_data_mesh, round_batch_size, shard_batch


@nnx.jit
def _probabilities(model: nnx.Module, x: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(model(x))


def predict_proba(
    model: nnx.Module,
    patterns: np.ndarray,
    *,
    batch_size: int = 64,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Class probabilities of every pattern.

    Parameters
    ----------
    model : nnx.Module
        Classifier mapping (B, H, W, 1) to (B, n_classes) logits; set to eval mode.
    patterns : ndarray, shape (n, H, W)
        Network inputs (``image`` or ``ccf`` rows).
    batch_size : int, default=64
        Patterns per jitted call; the last batch is zero-padded to this size so the
        program compiles once. Rounded up to a multiple of the device count.
    mesh : jax.sharding.Mesh, optional
        Devices to spread each batch over (default: all).

    Returns
    -------
    ndarray of float32, shape (n, n_classes)
        Sigmoid probabilities.
    """
    mesh = make_data_mesh() if mesh is None else mesh
    batch_size = round_batch_size(batch_size, mesh)
    model.eval()
    # One walk of the model's graph for all batches, not one per call (see train.fit).
    probabilities_of = nnx.cached_partial(_probabilities, model)
    patterns = np.asarray(patterns, dtype=np.float32)
    n = len(patterns)
    outputs = []
    for start in range(0, n, batch_size):
        chunk = patterns[start : start + batch_size]
        padded = np.zeros((batch_size, *patterns.shape[1:], 1), np.float32)
        padded[: len(chunk), ..., 0] = chunk
        if jax.process_count() == 1:
            outputs.append(np.asarray(probabilities_of(shard_batch({"x": padded}, mesh)["x"]))[: len(chunk)])
        else:  # every process holds all patterns: feed its share, gather the whole batch
            share = batch_size // jax.process_count()
            mine = padded[jax.process_index() * share : (jax.process_index() + 1) * share]
            probabilities = probabilities_of(shard_batch({"x": mine}, mesh)["x"])
            outputs.append(np.asarray(multihost_utils.process_allgather(probabilities, tiled=True))[: len(chunk)])
    if not outputs:
        return np.zeros((0, model.classifier.out_features), np.float32)
    return np.concatenate(outputs).astype(np.float32)


def tune_thresholds(
    probabilities: np.ndarray,
    labels: np.ndarray,
    *,
    candidates: np.ndarray | None = None,
    default: float = 0.5,
) -> np.ndarray:
    """Per-class decision threshold that maximises F1 on held-out patterns.

    Class-weighted training shifts probabilities away from calibrated values, so
    0.5 is not the best cut for rare classes. Ties go to the threshold closest to
    ``default``. Small validation sets need two guards, because the F1-best cut
    can be worse than no cut at all:

    - a class with positive examples keeps ``default`` when no candidate beats the F1
      of calling every pattern positive (a network that has not learned the class
      would otherwise be set to call everything positive);
    - a class without positive examples cannot be tuned and keeps ``default``, unless
      most patterns (all without it) would be called positive there, the mark of an
      output that has not learned the class (an undertrained, class-weighted network
      gives ~0.6 everywhere): then the threshold goes above all of them (up to the
      largest candidate).

    Parameters
    ----------
    probabilities : ndarray, shape (n, n_classes)
    labels : ndarray of 0/1, shape (n, n_classes)
    candidates : ndarray, optional
        Thresholds tried (default 0.05, 0.10, …, 0.95).
    default : float, default=0.5

    Returns
    -------
    ndarray of float32, shape (n_classes,)
    """
    candidates = np.round(np.arange(0.05, 0.951, 0.05), 2) if candidates is None else np.asarray(candidates)
    # Try the thresholds nearest to the default first so that ties keep it.
    nearest_first = np.asarray(sorted(candidates, key=lambda t: abs(t - default)))
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    thresholds = np.full(labels.shape[1], default, np.float32)
    for c in range(labels.shape[1]):
        positives = int(labels[:, c].sum())
        if positives == 0:
            if len(labels) and np.median(probabilities[:, c]) >= default:
                above = candidates[candidates > probabilities[:, c].max()]
                thresholds[c] = above.min() if above.size else candidates.max()
            continue
        scores = [f1_score(labels[:, c], probabilities[:, c] >= t, zero_division=0.0)
                  for t in nearest_first]
        every_pattern_positive = 2 * positives / (positives + len(labels))
        if max(scores) > every_pattern_positive:
            thresholds[c] = nearest_first[int(np.argmax(scores))]
    return thresholds
