"""``airysort train STORE.zarr MODEL_DIR --model cnn|vae``"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, note_unused_cluster, say, user_errors


class Model(str, Enum):
    cnn = "cnn"
    vae = "vae"


class Input(str, Enum):
    image = "image"
    ccf = "ccf"


class Precision(str, Enum):
    highest = "highest"
    default = "default"


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store with 'image' (or 'ccf') and, for cnn, 'label'.")],
    model_dir: Annotated[Path, typer.Argument(help="Directory for the model, its checkpoints and settings.")],
    model: Annotated[Model, typer.Option(help="cnn: supervised multi-label ResNet on the labelled "
                                              "patterns; vae: β-TCVAE on all patterns.")] = Model.cnn,
    input: Annotated[Input, typer.Option(help="Store variable the network reads.")] = Input.image,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum passes over the training patterns "
                                                       "(default: 30 for cnn, 20 for vae); raise it to continue a finished run.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Patterns per step, over all devices (default: 64).")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate (default: 1e-3 for cnn, 2e-3 for vae).")] = None,
    width: Annotated[Optional[int], typer.Option(help="cnn: channels of the first ResNet stage (default: 32).")] = None,
    depth: Annotated[Optional[int], typer.Option(help="cnn: ResNet depth, 18 or 34 (10 for quick trials) "
                                                      "(default: 18).")] = None,
    attention: Annotated[bool, typer.Option("--attention", help="Add self-attention blocks.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation, split and shuffling (default: 0).")] = None,
    validation_fraction: Annotated[Optional[float], typer.Option(
        help="Fraction of the training patterns held out for early stopping and thresholds (default: 0.15 for cnn, 0.1 for vae).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Epochs without validation improvement before "
                                                         "stopping (default: 8 for cnn; 0, off, for vae).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Optimiser steps between checkpoints "
                                                                  "(default: 200).")] = None,
    precision: Annotated[Optional[Precision], typer.Option(
        help="Matrix products and convolutions in float32 (highest), or as JAX does by default: "
             "TensorFloat-32 on NVIDIA GPUs, faster for wide networks (default: highest).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard checkpoints in MODEL_DIR and start over "
                                                        "(default: resume).")] = False,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Train a classifier (cnn) or a β-TCVAE (vae). Checkpoints regularly; running the same
    command again after an interruption resumes from the last checkpoint."""
    # Training runs on the JAX devices of this process (all local GPUs/CPU cores, or every
    # node of a SLURM job); it reads shards straight from Zarr and needs no Dask cluster.
    note_unused_cluster(cluster, "train", "runs on this process's JAX devices; for several nodes start "
                        "it under srun (docs/hpc.md)")
    options = {"batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
               "validation_fraction": validation_fraction, "patience": patience,
               "checkpoint_every": checkpoint_every, "precision": precision and precision.value}
    if model is Model.vae:
        from pipeline.embed import train_vae

        vae_options = {k: v for k, v in options.items() if v is not None}
        if attention:
            vae_options["attention"] = True
        result = train_vae(store, model_dir, input=input.value, epochs=epochs, resume=not fresh,
                           **vae_options)
    else:
        from pipeline.classify import train_classifier

        result = train_classifier(store, model_dir, input=input.value, epochs=epochs, width=width,
                                  depth=depth, attention=attention or None, resume=not fresh,
                                  log=say, **options)
    import jax

    if jax.process_index() == 0:  # under srun, one result for the job, from the task that saved the model
        emit(result, json, _summary)


def _summary(result: dict) -> str:
    done = "nothing more to train for the" if result.get("steps") == result.get("resumed_from") else "trained"
    lines = [f"{done} {result.get('model')} model in {result.get('model_dir')} "
             f"({result.get('steps')} steps, {result.get('seconds')} s)"]
    validation = result.get("validation") or {}
    if validation.get("macro_f1") is not None:
        lines.append(f"validation ({validation['n']} patterns): micro F1 {validation['micro_f1']:.3f}, "
                     f"macro F1 {validation['macro_f1']:.3f}")
    return "\n".join(lines)
