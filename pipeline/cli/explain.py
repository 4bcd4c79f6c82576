"""``airysort explain STORE.zarr MODEL_DIR --index I [--index J ...] --out DIR``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, note_unused_cluster, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store with the model's input variable.")],
    model_dir: Annotated[Path, typer.Argument(help="Classifier from 'airysort train --model cnn'.")],
    index: Annotated[list[int], typer.Option("--index", help="Pattern index to explain (repeat the option).")],
    out: Annotated[Path, typer.Option(help="Directory for the PNG overlays.")] = Path("explain"),
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Grad-CAM++ heat maps: for each chosen pattern and each class predicted for it, a PNG
    of the input with the regions that drove the prediction highlighted."""
    from pipeline.classify import explain_patterns

    note_unused_cluster(cluster, "explain", "computes its handful of patterns in this process")
    result = explain_patterns(store, model_dir, indices=list(index), out_dir=out)
    emit(result, json, lambda r: f"wrote {len(r['files'])} overlay(s) to {out}")
