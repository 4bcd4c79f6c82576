"""``airysort predict STORE.zarr MODEL_DIR``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store with the model's input variable.")],
    model_dir: Annotated[Path, typer.Argument(help="Classifier from 'airysort train --model cnn'.")],
    batch_size: Annotated[int, typer.Option(help="Patterns per forward pass.")] = 64,
    symmetrise: Annotated[bool, typer.Option(
        "--symmetrise", help="Average the network's answers over the 8 rotations and mirrors of "
        "each image (test-time augmentation: 8 times the inference time; image input only).")] = False,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Classify every pattern: writes 'prob' (class probabilities) and 'predicted' (0/1 from
    the model's per-class thresholds, made consistent with the taxonomy: no Round with
    Elliptical, no Spherical/Oblate with Prolate, nothing with Empty, a sub-class implies
    its super-class)."""
    from pipeline.classify import predict_store

    result = predict_store(store, model_dir, batch_size=batch_size, symmetrise=symmetrise, cluster=cluster)
    emit(result, json, lambda r: (
        f"classified {r['n_patterns']} pattern(s) with {r['model_id']} in {r['seconds']} s\n"
        + "\n".join(f"  {name:<17} {count}" for name, count in r["counts"].items())))
