"""Supervised classification of a store: import labels, train, predict, explain.

Thin wiring between the store and :mod:`jaxmodels`:

* :func:`import_labels` — a researcher's label CSV → ``label`` (``airysort label``);
* :func:`train_classifier` — ResNet on the labelled patterns → ``MODEL_DIR``
  (``airysort train --model cnn``);
* :func:`predict_store` — every pattern → ``prob``, ``predicted`` (``airysort predict``),
  one Dask task per store shard;
* :func:`explain_patterns` — Grad-CAM++ PNG overlays (``airysort explain``).

A model directory holds ``model.json`` (architecture, training options, input
variable and shape, per-class thresholds, model id), ``best/`` (weights with the
lowest validation loss) and ``checkpoints/`` (resumable training state).
"""

from __future__ import annotations

import datetime as dt
import functools
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import AirysortError
from pipeline.label_csv import problem_lines, read_label_csv
from pipeline.model_dir import (
    MODEL_FILE,
    check_preprocessing,
    input_preprocessing,
    read_model_info,
    trained_precision,
    trained_weights,
    write_model_info,
)
from pipeline.taxonomy import CLASS_NAMES, N_CLASSES, coarse_group, decide



# ----------------------------------------------------------------------------- labels


def import_labels(store_path: str | Path, csv_path: str | Path) -> dict[str, Any]:
    """Import a label CSV into the store's ``label`` variable.

    The CSV has a header ``shot_id,`` followed by the 11 class names (taxonomy
    order not required) and one row of 0/1 values per pattern; rows are matched to
    patterns by the store's ``shot_id`` coordinate. Patterns not in the CSV keep
    their labels. Every problem (unknown column, unknown or duplicate shot id,
    wrong number of fields, a value other than 0/1) is reported on its own line and
    counted; such rows are not imported.

    Parameters
    ----------
    store_path : path
        An airysort store.
    csv_path : path
        The label CSV.

    Returns
    -------
    dict
        ``rows`` (data rows read), ``imported``, ``bad_rows``, ``bad_columns``,
        ``labelled`` (patterns with labels in the store afterwards), ``problems``
        (list of one-line messages).
    """
    from pipeline import store

    csv_path = Path(csv_path)
    dataset = store.open_store(store_path)
    shot_ids = np.asarray(dataset["shot_id"].values).astype(object)
    patterns_of: dict[str, list[int]] = {}
    for index, shot in enumerate(shot_ids):
        patterns_of.setdefault(str(shot), []).append(index)
    labels = np.asarray(dataset["label"].values).astype(np.int8)

    sheet = read_label_csv(csv_path)
    problems = list(sheet.notes)  # (line of the CSV or None, what is wrong)
    imported = bad_rows = 0
    for row in sheet.rows:
        problem = row.problem
        if row.shot_id not in patterns_of:  # the first thing to fix, whatever else is wrong
            problem = f"unknown shot_id {row.shot_id!r} (not in the store)"
        if problem is not None:
            bad_rows += 1
            problems.append((row.line, problem))
            continue
        labels[patterns_of[row.shot_id]] = row.values
        imported += 1
        if len(patterns_of[row.shot_id]) > 1:
            problems.append((row.line, f"shot_id {row.shot_id!r} is shared by {len(patterns_of[row.shot_id])} "
                                       "patterns; all of them labelled"))
    problems.sort(key=lambda problem: problem[0] or 0)  # column notes first, then by line

    if imported:  # nothing imported: the store stays as it was, provenance included
        with store.write_lock(store_path, "label"):
            store.write_pattern_variable_direct(store_path, "label", labels)
            store.append_provenance(
                store_path, "label",
                {"csv": str(csv_path.absolute()), "imported": imported, "bad_rows": bad_rows},
            )
            store.consolidate(store_path)
    labelled = int((labels >= 0).all(axis=1).sum())
    return {"rows": len(sheet.rows), "imported": imported, "bad_rows": bad_rows,
            "bad_columns": sum(1 for line, _ in sheet.notes if line is None), "labelled": labelled,
            "problems": problem_lines(problems)}


# --------------------------------------------------------------------------- model dir


def finished_classifier_info(model_dir: str | Path) -> dict[str, Any]:
    """``model.json`` of a classifier whose training has finished (it has thresholds),
    or a clear error."""
    info = read_model_info(model_dir, kind="cnn")
    if "thresholds" not in info:
        raise AirysortError(
            f"training of {str(model_dir)!r} has not finished; run 'airysort train' again to resume it"
        )
    trained_weights(model_dir)
    return info


@functools.lru_cache(maxsize=4)
def _load_classifier_cached(model_dir: str, stamp: float):
    from flax import nnx

    from jaxmodels.checkpoint import load_model
    from jaxmodels.configs import CNNConfig
    from jaxmodels.resnet import build_cnn

    info = finished_classifier_info(model_dir)
    config = CNNConfig.from_dict(info["cnn"])
    model = load_model(Path(model_dir) / "best", lambda: build_cnn(config, rngs=nnx.Rngs(0)))
    return model, info


def load_classifier(model_dir: str | Path):
    """The trained classifier of ``model_dir`` (eval mode) and its ``model.json`` dict.

    Cached per process and per version of ``model.json``, so the Dask tasks of one
    worker load the weights once.
    """
    model_dir = str(Path(model_dir).absolute())
    path = Path(model_dir) / MODEL_FILE
    stamp = path.stat().st_mtime if path.exists() else 0.0
    return _load_classifier_cached(model_dir, stamp)


def _input_array(store_path: str | Path, variable: str, *, warn: bool = True):
    """The store variable a classifier reads, as a Zarr array (read shard by shard)."""
    import zarr

    from pipeline import store

    dataset = store.open_store(store_path, warn=warn)
    hint = "preprocess" if variable == "image" else "correlate"
    if variable not in dataset:
        raise AirysortError(
            f"store {str(store_path)!r} has no {variable!r} variable; run 'airysort {hint} {store_path}' first"
        )
    store.require_every_pattern(dataset, variable, remedy=f"airysort {hint} {store_path}")
    if dataset[variable].ndim != 3:
        raise AirysortError(
            f"the classifier needs 2-D inputs per pattern but {variable!r} has dims "
            f"{dataset[variable].dims!r}; use --input image, or correlate with a 2-D (q, phi) ccf"
        )
    group = zarr.open_group(str(store_path), mode="r", use_consolidated=False)
    return dataset, group[variable]


# ---------------------------------------------------------------------------- training


def _split(labelled: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    """Train/validation split of the labelled patterns, stratified so that every class
    with a few examples has some in both parts (see :func:`_strata`)."""
    from sklearn.model_selection import train_test_split

    if fraction <= 0 or len(labelled) < 4:
        return labelled, labelled[:0]
    stratify = None
    for strata in (_strata(labels), coarse_group(labels)):
        _, counts = np.unique(strata, return_counts=True)
        if counts.min() >= 2 and len(counts) <= fraction * len(labelled):
            stratify = strata
            break
    train, valid = train_test_split(labelled, test_size=fraction, random_state=seed,
                                    stratify=stratify)
    return np.sort(train), np.sort(valid)


def _strata(labels: np.ndarray) -> np.ndarray:
    """Each pattern's rarest class (by count in ``labels``), for a multi-label stratified split.

    Stratifying by coarse group alone can leave a sub-class such as NewtonRings out of
    validation altogether (45 training examples, none of 120 validation patterns, in one
    run), and its threshold then cannot be tuned. A class seen once joins its pattern's
    next rarest class; patterns with no class form one stratum.
    """
    labels = np.asarray(labels, bool)
    counts = labels.sum(axis=0)
    strata = np.full(len(labels), -1)
    for c in np.argsort(-counts, kind="stable"):  # commonest first: the rarest write last
        if counts[c] >= 2:
            strata[labels[:, c]] = c
    return strata


def train_classifier(
    store_path: str | Path,
    model_dir: str | Path,
    *,
    input: str = "image",
    epochs: int | None = None,
    batch_size: int | None = None,
    width: int | None = None,
    depth: int | None = None,
    attention: bool | None = None,
    learning_rate: float | None = None,
    seed: int | None = None,
    validation_fraction: float | None = None,
    patience: int | None = None,
    checkpoint_every: int | None = None,
    precision: str | None = None,
    resume: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the multi-label ResNet on the labelled patterns of a store.

    Patterns whose ``label`` row holds no -1 are split into training and validation
    sets; the network learns with class-weighted BCE, AdamW (warm-up + cosine
    schedule, weight decay), on-device flip/rotation augmentation and early
    stopping; per-class thresholds that maximise validation F1 are stored with the
    model. Interrupted training resumes from the last checkpoint in ``model_dir``.

    Parameters
    ----------
    store_path : path
        Store with ``label`` and the ``input`` variable.
    model_dir : path
        Output directory (created).
    input : {"image", "ccf"}, default="image"
    epochs, batch_size, learning_rate, seed, validation_fraction, patience, checkpoint_every, precision
        :class:`~jaxmodels.configs.TrainConfig` fields; None keeps the default.
    width, depth, attention
        :class:`~jaxmodels.configs.CNNConfig` fields (``attention`` puts a
        self-attention block after stages 2 and 3); None keeps the default.
    resume : bool, default=True
        Continue from ``model_dir``'s checkpoint, keeping its architecture and
        optimiser settings (``epochs``, ``patience``, ``checkpoint_every`` and
        ``precision`` may change); False starts over.
    log : callable, optional
        Receives progress lines (default: stderr).

    Returns
    -------
    dict
        ``model`` ("cnn"), ``model_id``, ``model_dir``, ``n_train``, ``n_valid``,
        ``epochs_run``, ``steps``, ``best_epoch``, ``stopped_early``, ``resumed_from``,
        ``thresholds`` (class → value), ``validation`` (loss and F1 scores),
        ``seconds``.
    """
    import dataclasses
    import shutil

    import jax
    from flax import nnx
    from sklearn.metrics import f1_score

    from jaxmodels.checkpoint import init_model
    from jaxmodels.configs import CNNConfig, TrainConfig, to_dict
    from jaxmodels.data import PatternBatches
    from jaxmodels.infer import predict_proba, tune_thresholds, weighted_prior
    from jaxmodels.losses import classifier_loss_fn, positive_weights
    from jaxmodels.parallel import (
        first_process_only,
        make_data_mesh,
        maybe_initialize_distributed,
        use_every_cpu_core,
    )
    from jaxmodels.resnet import build_cnn
    from jaxmodels.train import fit
    from jaxmodels.xla_cache import use_compilation_cache
    from pipeline import store
    from pipeline.evaluate import macro_f1

    start = time.perf_counter()
    model_dir = Path(model_dir)
    use_every_cpu_core()  # on a CPU (see its docstring)
    use_compilation_cache()
    maybe_initialize_distributed()
    dataset, source = _input_array(store_path, input)
    labels_all = np.asarray(dataset["label"].values)
    labelled = np.flatnonzero((labels_all >= 0).all(axis=1))
    if len(labelled) < 2:
        raise AirysortError(
            f"store {str(store_path)!r} has {len(labelled)} labelled pattern(s); training needs at least 2 "
            "(in practice hundreds); import labels "
            "with 'airysort label STORE LABELS.csv' first"
        )

    info_path = model_dir / MODEL_FILE
    cnn_options = {"input": input, "width": width, "depth": depth,
                   "attention_stages": (2, 3) if attention else None}
    train_options = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                     "seed": seed, "validation_fraction": validation_fraction,
                     "patience": patience, "checkpoint_every": checkpoint_every, "precision": precision}
    try:  # checked before anything in MODEL_DIR is touched
        cnn_config = CNNConfig(**{k: v for k, v in cnn_options.items() if v is not None})
        train_config = TrainConfig(**{k: v for k, v in train_options.items() if v is not None})
    except ValueError as error:
        raise AirysortError(str(error)) from None
    labels_digest = _labels_digest(labelled, labels_all[labelled])
    if not resume:
        for name in ("checkpoints", "best", MODEL_FILE):
            target = model_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if resume and info_path.exists():
        info = read_model_info(model_dir, kind="cnn")
        _check_resumable(info, model_dir=model_dir, store_path=store_path, labels_digest=labels_digest,
                         given={**{k: v for k, v in cnn_options.items() if k != "input"},
                                **{k: train_options[k] for k in ("batch_size", "learning_rate", "seed",
                                                                 "validation_fraction")}})
        cnn_config = CNNConfig.from_dict(info["cnn"])
        train_config = TrainConfig.from_dict(info["train"])
        # Options that do not change the model may differ from the interrupted run.
        overrides = {"epochs": epochs, "checkpoint_every": checkpoint_every, "patience": patience,
                     "precision": precision}
        train_config = dataclasses.replace(
            train_config, **{k: v for k, v in overrides.items() if v is not None})
        if cnn_config.input != input:
            raise AirysortError(
                f"{str(model_dir)!r} was trained on {cnn_config.input!r}, not {input!r}; pass "
                f"--input {cnn_config.input} or a new MODEL_DIR"
            )
    else:
        model_dir.mkdir(parents=True, exist_ok=True)
        info = {"model": "cnn", "status": "training", "store": str(Path(store_path).absolute()),
                "input": input, "input_shape": list(source.shape[1:]),
                "preprocessing": input_preprocessing(dataset.attrs, input),
                "labels_digest": labels_digest,
                "class_names": list(CLASS_NAMES), "cnn": to_dict(cnn_config),
                "train": to_dict(train_config)}
        write_model_info(model_dir, info)
    _check_input_shape(source.shape[1:], info, store_path=store_path, model_dir=model_dir)
    check_preprocessing(info, dataset.attrs, input=input, store_path=store_path, model_dir=model_dir)

    train_idx, valid_idx = _split(labelled, labels_all[labelled],
                                  train_config.validation_fraction, train_config.seed)
    mesh = make_data_mesh()
    n_dev = mesh.size
    global_batch = -(-train_config.batch_size // n_dev) * n_dev
    if len(train_idx) < global_batch:  # a small labelled set: one batch per epoch
        global_batch = max(n_dev, len(train_idx) // n_dev * n_dev)
    label_of = {int(p): labels_all[p] for p in labelled}
    train_labels = np.stack([label_of[int(p)] for p in train_idx]).astype(np.float32)
    batches = dict(batch_size=global_batch, chunk=store.PATTERN_CHUNK,
                   cache_bytes=train_config.input_cache_mib << 20,
                   process_index=jax.process_index(), process_count=jax.process_count())
    train_batches = PatternBatches(source, train_idx, extras={"y": train_labels}, shuffle=True,
                                   seed=train_config.seed, **batches)
    valid_batches = None
    if len(valid_idx):
        valid_labels = np.stack([label_of[int(p)] for p in valid_idx]).astype(np.float32)
        valid_batches = PatternBatches(source, valid_idx, extras={"y": valid_labels}, **batches)
    pos_weight = positive_weights(train_labels, max_weight=cnn_config.pos_weight_max)
    loss_fn = classifier_loss_fn(tuple(float(w) for w in pos_weight), augment=cnn_config.augment)

    say = first_process_only(log if log is not None else _stderr)
    say(f"training ResNet-{cnn_config.depth} (width {cnn_config.width}) on {len(train_idx)} "
        f"labelled patterns, validating on {len(valid_idx)}, batch {global_batch} over "
        f"{n_dev} device(s)")
    if not len(valid_idx):
        say(f"NOTE: {len(labelled)} labelled patterns are too few to hold some out: no early stopping, "
            "and every class threshold stays 0.5; label more patterns for both")
    if (train_labels == train_labels[0]).all():  # one label combination throughout
        shown = [name for name, value in zip(CLASS_NAMES, train_labels[0]) if value]
        say(f"NOTE: every training pattern is labelled {' + '.join(shown)}; the network cannot learn "
            "to tell patterns apart from them: label some of other kinds too")
    # A class no training pattern shows is not learned: its output would mean nothing.
    unseen = ~np.asarray(train_labels, bool).any(axis=0)
    if unseen.any():
        say(f"NOTE: no training pattern is labelled {', '.join(np.asarray(CLASS_NAMES)[unseen])}: "
            "the model will never predict these classes; label some to learn them")
    model = init_model(lambda: build_cnn(cnn_config, rngs=nnx.Rngs(train_config.seed)))
    result = fit(model, loss_fn, train_batches, valid=valid_batches, config=train_config,
                 checkpoint_dir=model_dir / "checkpoints", best_dir=model_dir / "best",
                 resume=resume, mesh=mesh, log=say)

    validation: dict[str, Any] = {}
    # Without validation, each class is cut where its weighting puts a calibrated 0.5.
    prior = weighted_prior(pos_weight)
    thresholds = prior.astype(np.float32)
    if len(valid_idx):
        rows = valid_batches.rows()  # kept from training, or read shard by shard
        with jax.default_matmul_precision(train_config.precision):
            probabilities = predict_proba(result.model, rows, mesh=mesh)
        truth = valid_labels.astype(int)
        thresholds = tune_thresholds(probabilities, truth, prior=prior)
        untuned = ~truth.astype(bool).any(axis=0) & ~unseen
        if untuned.any():
            say("NOTE: no validation pattern is labelled " + ", ".join(
                f"{name} (threshold {t:.2f})" for name, t in zip(np.asarray(CLASS_NAMES)[untuned], thresholds[untuned]))
                + ": these thresholds are not tuned; label more patterns of these classes")
    thresholds[unseen] = 1.0  # never predicted (taxonomy.decide)
    if len(valid_idx):
        predicted = decide(probabilities, thresholds)
        validation = {
            "loss": result.history[result.best_epoch]["val_loss"] if result.best_epoch >= 0 else None,
            "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0.0)),
            "macro_f1": macro_f1(truth, predicted)[0],
            "n": int(len(valid_idx)),
        }
    unchanged = result.resumed_from is not None and result.steps == result.resumed_from and "model_id" in info
    if unchanged:  # a finished run called again: the same weights keep their id
        say(f"nothing to train: {str(model_dir)!r} finished under these settings "
            "(raise --epochs or --patience to go on)")
    info.update({
        "status": "trained",
        "model_id": info["model_id"] if unchanged else
        f"cnn-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}",
        "thresholds": [float(t) for t in thresholds],
        # Unchanged weights keep the settings they were trained with (--precision included).
        "train": info["train"] if unchanged and "train" in info else to_dict(train_config),
        "n_train": int(len(train_idx)), "n_valid": int(len(valid_idx)),
        "best_epoch": result.best_epoch, "history": result.history,
        "validation": validation,
        "trained_at": info["trained_at"] if unchanged and "trained_at" in info else
        dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    write_model_info(model_dir, info)
    return {
        "model": "cnn", "model_id": info["model_id"], "model_dir": str(model_dir),
        "n_train": int(len(train_idx)), "n_valid": int(len(valid_idx)),
        "epochs_run": len(result.history), "steps": result.steps,
        "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
        "resumed_from": result.resumed_from,
        "thresholds": dict(zip(CLASS_NAMES, info["thresholds"])),
        "never_predicted": [name for name, off in zip(CLASS_NAMES, unseen) if off],
        "validation": validation, "seconds": round(time.perf_counter() - start, 2),
    }


def _check_input_shape(shape, info: dict, *, store_path, model_dir) -> None:
    """Refuse inputs of another shape than the model's, naming the command that makes them."""
    if list(shape) == list(info["input_shape"]):
        return
    if info["input"] == "image":
        remedy = f"airysort preprocess {store_path} --size {info['input_shape'][0]}"
    else:
        remedy = f"airysort correlate {store_path} --n-q {info['input_shape'][0]} --n-phi {info['input_shape'][-1]}"
    raise AirysortError(
        f"{info['input']!r} patterns of {str(store_path)!r} are {tuple(shape)!r} but the model in "
        f"{str(model_dir)!r} was trained on {tuple(info['input_shape'])!r}; run '{remedy}' first")


def _labels_digest(patterns: np.ndarray, labels: np.ndarray) -> str:
    """Fingerprint of the labelled patterns and their labels (what the split is drawn from)."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(patterns, np.int64).tobytes())
    digest.update(np.ascontiguousarray(labels, np.int8).tobytes())
    return digest.hexdigest()[:16]


def _check_resumable(info: dict, *, model_dir: Path, store_path, labels_digest: str, given: dict) -> None:
    """Refuse to resume a run whose architecture, optimiser or data would silently change:
    the checkpoint keeps its own, so an option given now would be ignored, and new labels
    would be split anew (former training patterns validating the model)."""
    fresh = "pass --fresh to start again with them (or use a new MODEL_DIR)"
    saved_store = info.get("store")
    if saved_store and Path(saved_store).resolve() != Path(store_path).resolve():
        raise AirysortError(f"{str(model_dir)!r} began training on {saved_store!r}, not {str(store_path)!r}; "
                            f"resume it there, or {fresh}")
    if info.get("labels_digest") not in (None, labels_digest):
        raise AirysortError(f"the labels of {str(store_path)!r} changed since {str(model_dir)!r} began training; "
                            f"{fresh}")
    saved = {**info.get("cnn", {}), **info.get("train", {})}
    if given.get("attention_stages") is not None:
        given["attention_stages"] = list(given["attention_stages"])
    differ = [name for name, value in given.items()
              if value is not None and name in saved and saved[name] != value]
    if differ:
        def option(name: str, value: Any) -> str:
            if name == "attention_stages":
                return "--attention" if value else "no --attention"
            return f"--{name.replace('_', '-')} {value!r}"

        said = ", ".join(f"{option(n, given[n])} (saved: "
                         f"{option(n, saved[n]) if n == 'attention_stages' else repr(saved[n])})" for n in differ)
        raise AirysortError(f"{str(model_dir)!r} was trained with other settings than {said}; resuming keeps "
                            f"the saved ones: drop these options to resume, or {fresh}")


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------- prediction


def _predict_block(block: np.ndarray, *, model_dir: str, batch_size: int, symmetrise: bool) -> np.ndarray:
    """Dask block function: inputs (n, H, W) → probabilities (n, 11) float32."""
    from jaxmodels.infer import predict_proba

    model, info = load_classifier(model_dir)
    with trained_precision(info):
        return predict_proba(model, block, batch_size=batch_size, symmetrise=symmetrise)


def predict_store(
    store_path: str | Path,
    model_dir: str | Path,
    *,
    batch_size: int = 64,
    symmetrise: bool = False,
    cluster: str = "local",
    start: int = 0,
) -> dict[str, Any]:
    """Classify every pattern of a store → ``prob`` and ``predicted``.

    One Dask task per store shard loads the model (once per worker), runs the
    jitted network over the shard's patterns and returns their probabilities;
    ``predicted`` applies the per-class thresholds saved with the model and then the
    taxonomy's rules (:func:`pipeline.taxonomy.decide`: no Round with Elliptical, no
    Spherical/Oblate with Prolate, nothing with Empty; a sub-class implies its
    super-class).

    Parameters
    ----------
    store_path : path
    model_dir : path
        Directory from :func:`train_classifier`.
    batch_size : int, default=64
        Patterns per forward pass.
    symmetrise : bool, default=False
        Average over the 8 rotations and mirrors of each image
        (:func:`jaxmodels.infer.predict_proba`); image input only.
    cluster : str, default="local"
        Dask cluster (``--cluster``).
    start : int, default=0
        Classify only patterns ``start`` to the end (written by region into ``prob``
        and ``predicted``, which must exist: ``airysort watch`` after each new file).

    Returns
    -------
    dict
        ``n_patterns`` (classified now), ``model_id``, ``counts`` (predicted patterns
        per class, among them), ``variables``, ``seconds``.
    """
    import xarray as xr

    from pipeline import store
    from pipeline.dask_cluster import dask_client

    started = time.perf_counter()
    model_dir = Path(model_dir).absolute()
    info = finished_classifier_info(model_dir)
    if symmetrise and info["input"] != "image":
        raise AirysortError(
            f"--symmetrise rotates and mirrors images; {str(model_dir)!r} classifies {info['input']!r}, "
            "whose rows a rotation does not map onto each other")
    # Classifying new patterns (watch, start > 0) extends results that cover the old ones.
    dataset, _ = _input_array(store_path, info["input"], warn=not start)
    inputs = dataset[info["input"]].data
    _check_input_shape(inputs.shape[1:], info, store_path=store_path, model_dir=model_dir)
    check_preprocessing(info, dataset.attrs, input=info["input"], store_path=store_path, model_dir=model_dir)
    n_total = inputs.shape[0]
    if start and dataset.get("prob") is not None and dataset["prob"].attrs.get("model_id") != info["model_id"]:
        raise AirysortError(
            f"'prob' of {str(store_path)!r} comes from model {dataset['prob'].attrs.get('model_id')!r}, not "
            f"{info['model_id']!r}; classify the whole store with 'airysort predict {store_path} {model_dir}'"
        )
    inputs = inputs[start:].rechunk(
        {0: store.region_chunks(start, n_total) if start else store.PATTERN_CHUNK, 1: -1, 2: -1})
    prob = inputs.map_blocks(
        _predict_block, model_dir=str(model_dir), batch_size=batch_size, symmetrise=symmetrise,
        drop_axis=2, chunks=(inputs.chunks[0], (N_CLASSES,)),
        dtype=np.float32, meta=np.zeros((0, 0), np.float32),
    )
    thresholds = np.asarray(info["thresholds"], np.float32)
    predicted = prob.map_blocks(decide, thresholds, dtype=np.int8)
    dims = ("pattern", "class")
    variables = {
        "prob": xr.DataArray(prob, dims=dims, attrs={
            "long_name": "class probability", "model_id": info["model_id"]}),
        "predicted": xr.DataArray(predicted, dims=dims, attrs={
            "long_name": "predicted classes", "flag_values": "1 = predicted, 0 = not",
            "model_id": info["model_id"]}),
    }
    with dask_client(cluster):
        store.write_variables(
            store_path, variables, command="predict",
            parameters={"model_dir": str(model_dir), "model_id": info["model_id"],
                        "thresholds": dict(zip(CLASS_NAMES, info["thresholds"])),
                        "input": info["input"], "batch_size": batch_size, "symmetrise": symmetrise},
            description="predict: classifying patterns",
            start=start,
        )
    counts = store.read_pattern_values(store_path, "predicted", start=start).sum(axis=0, dtype=np.int64)
    return {
        "n_patterns": int(inputs.shape[0]), "model_id": info["model_id"],
        "counts": dict(zip(CLASS_NAMES, (int(c) for c in counts))),
        "variables": ["prob", "predicted"], "seconds": round(time.perf_counter() - started, 2),
    }


# -------------------------------------------------------------------------- explaining


def explain_patterns(
    store_path: str | Path,
    model_dir: str | Path,
    *,
    indices: list[int],
    out_dir: str | Path,
) -> dict[str, Any]:
    """Grad-CAM++ overlays for chosen patterns and each class the model predicts.

    For every pattern the predicted classes are those of ``predict`` (thresholds and
    taxonomy rules, :func:`pipeline.taxonomy.decide`); when there is none, the most
    probable class is explained. One PNG
    per (pattern, class): the input with the heat map on top.

    Parameters
    ----------
    store_path, model_dir : path
    indices : list of int
        Pattern indices (``pattern`` coordinate).
    out_dir : path
        Where the PNGs go (created).

    Returns
    -------
    dict
        ``files`` (list of paths) and ``explained``: per pattern, its classes and
        probabilities.
    """
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxmodels.gradcam import explain_resnet
    from jaxmodels.infer import predict_proba
    from pipeline import store

    out_dir = store.check_output_dir(out_dir, store_path)
    model, info = load_classifier(model_dir)
    dataset, source = _input_array(store_path, info["input"])
    _check_input_shape(source.shape[1:], info, store_path=store_path, model_dir=model_dir)
    check_preprocessing(info, dataset.attrs, input=info["input"], store_path=store_path, model_dir=model_dir)
    n = dataset.sizes["pattern"]
    bad = [i for i in indices if not 0 <= i < n]
    if bad or not indices:
        raise AirysortError(
            f"pattern indices must be in 0..{n - 1}, got {bad or indices!r}; choose them with "
            "'airysort info' or from a 'sort' index list"
        )
    indices = list(dict.fromkeys(int(i) for i in indices))  # a repeated index once
    out_dir.mkdir(parents=True, exist_ok=True)
    thresholds = np.asarray(info["thresholds"])
    shot_ids = np.asarray(dataset["shot_id"].values).astype(object)
    files: list[str] = []
    explained: dict[str, Any] = {}
    images = np.stack([np.asarray(source[index], np.float32) for index in indices])
    with trained_precision(info):
        all_probabilities = predict_proba(model, images)
    all_predicted = decide(all_probabilities, thresholds)
    for index, image, probabilities, predicted in zip(indices, images, all_probabilities, all_predicted):
        classes = np.flatnonzero(predicted)
        if not len(classes):
            classes = np.array([int(np.argmax(probabilities))])
        explained[str(index)] = {CLASS_NAMES[c]: float(probabilities[c]) for c in classes}
        x = jnp.asarray(image[None, ..., None])
        for c in classes:
            heat = np.asarray(explain_resnet(model, x, jnp.int32(c)))[0]
            name = CLASS_NAMES[c].replace("/", "-")
            path = out_dir / f"pattern{index:06d}_{name}.png"
            figure, axes = plt.subplots(figsize=(4.5, 4.5), dpi=100)
            # Row 0 at the top, as in the label sheets and galleries.
            axes.imshow(image, cmap="gray")
            overlay = axes.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            figure.colorbar(overlay, ax=axes, fraction=0.046, pad=0.04, label="Grad-CAM++")
            axes.set_title(f"pattern {index} ({shot_ids[index]})\n{CLASS_NAMES[c]}: "
                           f"p = {probabilities[c]:.2f}", fontsize=9)
            axes.set_axis_off()
            figure.savefig(path, bbox_inches="tight")
            plt.close(figure)
            files.append(str(path))
    return {"files": files, "explained": explained, "model_id": info["model_id"]}
