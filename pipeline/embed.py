"""β-TCVAE on a store: train it, embed every pattern, draw the latent space.

* :func:`train_vae` — ``airysort train STORE MODEL_DIR --model vae``: the β-TCVAE of
  :mod:`jaxmodels.vae` trained on *all* patterns (no labels) with the shared loop of
  :func:`jaxmodels.train.fit` (data-parallel mesh, streaming from Zarr shard by shard,
  orbax checkpoints, resume, progress lines).
* :func:`embed_store` — ``airysort embed``: posterior means and log-variances of every
  pattern → store variables ``latent`` and ``latent_logvar`` (pattern, z), one Dask
  task per shard.
* :func:`latent_figures` — ``airysort latent``: traversal grid and 2-D latent map PNGs.

A VAE model directory holds ``model.json`` (kind, configs, training summary),
``checkpoints/`` (resumable training state) and ``best/`` (the weights inference loads).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import AirysortError, check_seed
from pipeline.model_dir import (
    MODEL_FILE,
    check_preprocessing,
    input_preprocessing,
    read_model_info,
    trained_precision,
    trained_weights,
    write_model_info,
)


#: Training defaults of the VAE where they differ from :class:`TrainConfig`'s: no
#: gradient clipping (the loss is a sum over pixels, so clipping at 1 would rescale
#: every step), 10 % of the patterns to select the best epoch by validation ELBO and a
#: fixed budget instead of early stopping.
VAE_TRAIN_DEFAULTS = dict(
    epochs=20,
    batch_size=64,
    learning_rate=2e-3,
    warmup_epochs=1.0,
    weight_decay=0.0,
    grad_clip=0.0,
    validation_fraction=0.1,
    patience=0,
)


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sort ``options`` into VAEConfig and TrainConfig fields; reject anything else."""
    from jaxmodels.configs import TrainConfig, VAEConfig

    vae_fields = {f.name for f in dataclasses.fields(VAEConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    vae, train = {}, {}
    for key, value in options.items():
        if value is None:
            continue  # an option the command line left unset
        if key in vae_fields:
            vae[key] = value
        elif key in train_fields:
            train[key] = value
        else:
            raise AirysortError(
                f"unknown VAE training option {key!r}; known: "
                f"{', '.join(sorted(vae_fields | train_fields))}"
            )
    return vae, train


def build_vae(config: Any, *, seed: int = 0):
    """The β-TCVAE described by a :class:`~jaxmodels.configs.VAEConfig`."""
    from flax import nnx

    from jaxmodels.vae import PRESETS

    kwargs: dict[str, Any] = {"latent_dim": config.latent_dim, "attention": config.attention}
    if config.resolution is not None:
        kwargs["resolution"] = config.resolution
    return PRESETS[config.preset](**kwargs, rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=4)
def _load_vae_cached(model_dir: str, stamp: float):
    from jaxmodels.checkpoint import load_model
    from jaxmodels.configs import VAEConfig

    info = read_model_info(model_dir, kind="vae")
    config = VAEConfig.from_dict(info["vae"])
    best = trained_weights(model_dir)
    return load_model(best, lambda: build_vae(config)), config


def load_vae(model_dir: str | Path):
    """The trained β-TCVAE of ``model_dir`` (eval mode) and its VAEConfig.

    Cached per process and per version of the weights, so Dask tasks of one worker
    load the model once.
    """
    model_dir = str(Path(model_dir).absolute())
    stamp = (Path(model_dir) / MODEL_FILE).stat().st_mtime if Path(model_dir, MODEL_FILE).exists() else 0.0
    return _load_vae_cached(model_dir, stamp)


# ------------------------------------------------------------------------------ training


def train_vae(
    store_path: str | Path,
    model_dir: str | Path,
    *,
    input: str = "image",
    epochs: int | None = None,
    resume: bool = True,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train the β-TCVAE on every pattern of a store (``airysort train --model vae``).

    Parameters
    ----------
    store_path : path
        Store holding ``input`` (run ``airysort preprocess`` first).
    model_dir : path
        Where ``model.json``, ``checkpoints/`` and ``best/`` go.
    input : {"image"}, default="image"
        Store variable (pattern, iy, ix) to learn from.
    epochs : int, optional
        Passes over the patterns; default 20 (``VAE_TRAIN_DEFAULTS``).
    resume : bool, default=True
        Continue from the newest checkpoint in ``model_dir``. The saved architecture and
        objective are kept; ``epochs`` may be raised to train longer, ``precision`` changed.
    log : callable, optional
        Receives progress lines (default: stderr).
    **options
        Any field of :class:`~jaxmodels.configs.VAEConfig` (``preset``, ``latent_dim``,
        ``beta``, ``alpha``, ``gamma``, ``estimator``, ``attention``, ``resolution``,
        ``kl_warmup_epochs``) or :class:`~jaxmodels.configs.TrainConfig` (``batch_size``,
        ``learning_rate``, ``seed``, ``validation_fraction``, ...). None means default.

    Returns
    -------
    dict
        ``model`` ("vae"), ``model_dir``, ``n_train``, ``n_valid``, ``epochs``, ``steps``,
        ``resumed_from``, ``latent_dim``, ``final`` (last epoch's losses), ``seconds``.
    """
    import jax
    import optax
    import zarr

    from jaxmodels.checkpoint import init_model
    from jaxmodels.configs import TrainConfig, VAEConfig, to_dict
    from jaxmodels.data import PatternBatches
    from jaxmodels.losses import vae_loss_fn
    from jaxmodels.parallel import (
        first_process_only,
        make_data_mesh,
        maybe_initialize_distributed,
        round_batch_size,
        use_every_cpu_core,
    )
    from jaxmodels.train import fit
    from jaxmodels.xla_cache import use_compilation_cache
    from pipeline import store

    use_every_cpu_core()  # on a CPU (see its docstring)
    use_compilation_cache()
    maybe_initialize_distributed()  # one of several srun tasks: train together
    start = time.perf_counter()
    model_dir = Path(model_dir).absolute()
    vae_options, train_options = _split_options({"input": input, **options})
    info_path = model_dir / MODEL_FILE
    saved = json.loads(info_path.read_text()) if resume and info_path.exists() else None
    if saved is not None and saved.get("model") != "vae":
        raise AirysortError(
            f"{str(model_dir)!r} holds a {saved.get('model')!r} model; use another MODEL_DIR "
            "for the VAE or pass --fresh to start over"
        )
    try:
        if saved is not None:
            # Resuming: the architecture and objective must be those of the checkpoint.
            vae_config = VAEConfig.from_dict(saved["vae"])
            train_config = TrainConfig.from_dict(
                {**saved["train"], **{k: v for k, v in train_options.items() if k in ("epochs", "precision")}}
            )
        else:
            vae_config = VAEConfig(**vae_options)
            train_config = TrainConfig(**{**VAE_TRAIN_DEFAULTS, **train_options})
        if epochs is not None:
            train_config = dataclasses.replace(train_config, epochs=int(epochs))
    except (TypeError, ValueError) as error:
        raise AirysortError(f"invalid VAE option: {error}") from None

    dataset = store.open_store(store_path)
    if vae_config.input not in dataset:
        raise AirysortError(
            f"store {str(store_path)!r} has no {vae_config.input!r} variable to train on; run "
            f"'airysort preprocess {store_path}' first"
        )
    store.require_every_pattern(dataset, vae_config.input, remedy=f"airysort preprocess {store_path}")
    if saved is not None:
        check_preprocessing(saved, dataset.attrs, input=vae_config.input, store_path=store_path, model_dir=model_dir)
    n_patterns = int(dataset.sizes["pattern"])
    source = zarr.open_group(str(store_path), mode="r", use_consolidated=False)[vae_config.input]
    rng = np.random.default_rng(train_config.seed)
    order = rng.permutation(n_patterns)
    n_valid = int(round(train_config.validation_fraction * n_patterns))
    valid_idx, train_idx = np.sort(order[:n_valid]), np.sort(order[n_valid:])

    mesh = make_data_mesh()
    batch_size = round_batch_size(min(train_config.batch_size, len(train_idx)), mesh)
    if len(train_idx) < max(batch_size, 2):
        raise AirysortError(
            f"the store has {n_patterns} patterns, too few to train the VAE with batches "
            f"of {batch_size}; ingest more patterns or lower --batch-size"
        )
    train_config = dataclasses.replace(train_config, batch_size=batch_size)
    reading = dict(chunk=store.PATTERN_CHUNK, cache_bytes=train_config.input_cache_mib << 20,
                   process_index=jax.process_index(), process_count=jax.process_count())
    train_batches = PatternBatches(
        source, train_idx, batch_size=batch_size, shuffle=True, seed=train_config.seed, **reading
    )
    valid_batches = (
        PatternBatches(source, valid_idx, batch_size=batch_size, shuffle=False, **reading)
        if n_valid
        else None
    )
    warmup_steps = int(round(vae_config.kl_warmup_epochs * len(train_batches)))
    kl_weight = (
        optax.linear_schedule(0.0, 1.0, warmup_steps) if warmup_steps > 0 else None
    )
    loss_fn = functools.partial(
        vae_loss_fn,
        dataset_size=len(train_idx),
        alpha=vae_config.alpha,
        beta=vae_config.beta,
        gamma=vae_config.gamma,
        estimator=vae_config.estimator,
        kl_weight=kl_weight,
    )

    model_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "model": "vae",
        "vae": to_dict(vae_config),
        "train": to_dict(train_config),
        "store": str(Path(store_path).absolute()),
        "preprocessing": input_preprocessing(dataset.attrs, vae_config.input),
        "n_train": int(len(train_idx)),
        "n_valid": n_valid,
        "status": "training",
    }
    if not resume:
        _clear_training_state(model_dir)
    write_model_info(model_dir, record)

    say = first_process_only(log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True)))
    say(f"training β-TCVAE ({vae_config.preset} preset, {vae_config.latent_dim} latents) on "
        f"{len(train_idx)} patterns, validating on {n_valid}, batch {batch_size} over {mesh.size} device(s)")
    model = init_model(lambda: build_vae(vae_config, seed=train_config.seed))
    result = fit(
        model,
        loss_fn,
        train_batches,
        config=train_config,
        valid=valid_batches,
        checkpoint_dir=model_dir / "checkpoints",
        best_dir=model_dir / "best",
        resume=resume,
        mesh=mesh,
        log=say,
    )
    final = result.history[-1] if result.history else {}
    if saved is not None and result.steps == result.resumed_from:  # nothing trained: settings as trained
        record["train"] = saved["train"]
    record.update(
        status="trained",
        epochs_done=len(result.history),
        steps=result.steps,
        best_epoch=result.best_epoch,
        history=result.history,
    )
    write_model_info(model_dir, record)
    _load_vae_cached.cache_clear()
    return {
        "model": "vae",
        "model_dir": str(model_dir),
        "n_train": int(len(train_idx)),
        "n_valid": n_valid,
        "epochs": len(result.history),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "latent_dim": vae_config.latent_dim,
        "final": {k: round(float(v), 4) for k, v in final.items()},
        "seconds": round(time.perf_counter() - start, 2),
    }


def _clear_training_state(model_dir: Path) -> None:
    """Remove checkpoints and weights of an earlier run (``resume=False``)."""
    import shutil

    for name in ("checkpoints", "best"):
        if (model_dir / name).exists():
            shutil.rmtree(model_dir / name)


# ------------------------------------------------------------------------------ embedding


def _encode_block(block: np.ndarray, *, model_dir: str, info: dict, batch_size: int) -> np.ndarray:
    """Dask block function: patterns (n, iy, ix) → stacked [mean, logvar] (n, 2, z);
    ``info`` is the model's ``model.json``, read once by the caller."""
    from jaxmodels.latent_tools import encode_patterns

    model, _ = load_vae(model_dir)
    with trained_precision(info):
        mean, logvar = encode_patterns(model, block, batch_size=batch_size)
    return np.stack([mean, logvar], axis=1)


def embed_store(
    store_path: str | Path,
    model_dir: str | Path,
    *,
    batch_size: int = 128,
    cluster: str = "local",
) -> dict[str, Any]:
    """Encode every pattern with the trained β-TCVAE → ``latent``, ``latent_logvar``.

    Parameters
    ----------
    store_path : path
        Store holding the variable the model was trained on (``image``).
    model_dir : path
        Directory written by :func:`train_vae`.
    batch_size : int, default=128
        Patterns per forward pass inside each Dask task.
    cluster : str, default="local"
        Dask cluster spec (:func:`pipeline.dask_cluster.dask_client`); an existing
        client is reused.

    Returns
    -------
    dict
        ``n_patterns``, ``latent_dim``, ``variables`` written, ``active_dims`` (factors
        whose mean varies across the data by more than 0.1 posterior std),
        ``seconds``.
    """
    import xarray as xr

    from pipeline import store
    from pipeline.dask_cluster import dask_client

    start = time.perf_counter()
    model_dir = str(Path(model_dir).absolute())
    _, config = load_vae(model_dir)
    with dask_client(cluster) as client:
        dataset = store.open_store(store_path)
        if config.input not in dataset:
            raise AirysortError(
                f"store {str(store_path)!r} has no {config.input!r} variable to embed; run "
                f"'airysort preprocess {store_path}' first"
            )
        store.require_every_pattern(dataset, config.input, remedy=f"airysort preprocess {store_path}")
        info = read_model_info(model_dir, kind="vae")
        check_preprocessing(info, dataset.attrs, input=config.input, store_path=store_path, model_dir=model_dir)
        images = dataset[config.input].data
        z = config.latent_dim
        encoded = images.map_blocks(
            _encode_block,
            model_dir=model_dir,
            info=info,
            batch_size=batch_size,
            chunks=(images.chunks[0], (2,), (z,)),
            dtype=np.float32,
            meta=np.empty((0, 2, z), np.float32),
        )
        encoded = client.persist(encoded)
        attrs = {"model_dir": model_dir, "model": "beta-TCVAE"}
        variables = {
            "latent": xr.DataArray(
                encoded[:, 0, :], dims=("pattern", "z"),
                attrs={"long_name": "β-TCVAE posterior mean", **attrs},
            ),
            "latent_logvar": xr.DataArray(
                encoded[:, 1, :], dims=("pattern", "z"),
                attrs={"long_name": "β-TCVAE posterior log-variance", **attrs},
            ),
        }
        store.write_variables(
            store_path, variables, command="embed",
            parameters={"model_dir": model_dir, "batch_size": batch_size, "input": config.input},
            description="embed: encoding patterns",
        )
        # Activity of each factor (Burda et al.'s criterion, on the posterior means).
        mean_std = encoded[:, 0, :].std(axis=0)
        posterior_std = np.exp(0.5 * encoded[:, 1, :]).mean(axis=0)
        mean_std, posterior_std = (np.asarray(a) for a in client.compute([mean_std, posterior_std], sync=True))
    active = int((mean_std > 0.1 * posterior_std).sum())
    return {
        "n_patterns": int(images.shape[0]),
        "latent_dim": z,
        "variables": ["latent", "latent_logvar"],
        "active_dims": active,
        "seconds": round(time.perf_counter() - start, 2),
    }


# ------------------------------------------------------------------------------ figures


def latent_figures(
    store_path: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    color_by: str = "label",
    method: str = "pca",
    n_points: int = 3000,
    n_steps: int = 7,
    seed: int = 0,
) -> list[Path]:
    """Latent traversal grid and 2-D latent map of a store, as PNGs.

    Parameters
    ----------
    store_path : path
        Store with ``latent`` (run ``airysort embed`` first).
    model_dir : path
        The VAE that wrote ``latent`` (decodes the traversals).
    out_dir : path
        Created if missing; receives ``latent_traversal.png`` and
        ``latent_map_<color_by>_<method>.png``.
    color_by : {"label", "cluster_gmm", "cluster_spectral"}, default="label"
        Colour points by the coarse group of their label (taxonomy.md; unlabelled in
        grey) or by cluster.
    method : {"pca", "tsne"}, default="pca"
    n_points : int, default=3000
        Patterns drawn at random for the map and for the traversal's reference point.
    n_steps : int, default=7
        Images per factor in the traversal.
    seed : int, default=0

    Returns
    -------
    list of Path
        The PNG files written.
    """
    from jaxmodels.latent_tools import (
        decode_latents,
        embed_2d,
        save_map_png,
        save_traversal_png,
        traversal_grid,
    )
    from pipeline import store
    from pipeline.taxonomy import coarse_group

    if color_by not in ("label", "cluster_gmm", "cluster_spectral"):
        raise AirysortError(
            f"color_by must be 'label', 'cluster_gmm' or 'cluster_spectral', got {color_by!r}"
        )
    if method not in ("pca", "tsne"):
        raise AirysortError(f"method must be 'pca' or 'tsne', got {method!r}")
    seed = check_seed(seed)
    out_dir = store.check_output_dir(out_dir, store_path)
    read_model_info(model_dir, kind="vae")  # a wrong model dir first: embedding with it would fail too
    dataset = store.open_store(store_path)
    if "latent" not in dataset:
        raise AirysortError(
            f"store {str(store_path)!r} has no 'latent'; run 'airysort embed {store_path} "
            f"{model_dir}' first"
        )
    if color_by not in dataset:
        method_name = color_by.removeprefix("cluster_")
        raise AirysortError(
            f"store {str(store_path)!r} has no {color_by!r} to colour by; run 'airysort cluster "
            f"{store_path} --method {method_name}' first or use --color-by label"
        )
    model, _ = load_vae(model_dir)
    n = int(dataset.sizes["pattern"])
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(n_points, n), replace=False))
    # Dask's default (threaded) scheduler: a few thousand small rows need no cluster.
    latents = np.asarray(dataset["latent"].data[pick].compute(scheduler="threads"))
    values = np.asarray(dataset[color_by].data[pick].compute(scheduler="threads"))
    if color_by == "label":
        groups = coarse_group(values)
        legend = "coarse group of the label"
    else:
        groups = np.array([f"cluster {v}" for v in values])
        legend = color_by.replace("_", " ")

    out_dir.mkdir(parents=True, exist_ok=True)
    images, spread = traversal_grid(
        functools.partial(decode_latents, model), latents, n_steps=n_steps
    )
    paths = [
        save_traversal_png(
            images, out_dir / "latent_traversal.png", spread=spread,
            title="β-TCVAE latent traversals (rows: factors, ±2.5 data spreads)",
        )
    ]
    coords = embed_2d(latents, method=method, seed=seed)
    paths.append(
        save_map_png(
            coords, groups, out_dir / f"latent_map_{color_by}_{method}.png",
            title=f"Latent means ({method.upper()}), coloured by {legend}",
            xlabel=f"{method.upper()} 1", ylabel=f"{method.upper()} 2",
        )
    )
    return paths
