"""``airysort evaluate STORE.zarr [--truth LABELS.csv]``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, note_unused_cluster, say, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store.")],
    truth: Annotated[
        Optional[Path],
        typer.Option(help="Label CSV (shot_id + 11 class columns) to score against instead of the store's label."),
    ] = None,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Per-class precision/recall/F1 of 'predicted' and homogeneity/completeness/ARI/NMI of
    every clustering against the coarse groups."""
    note_unused_cluster(cluster, "evaluate", "reads per-pattern tables in this process")
    from pipeline.evaluate import evaluate_store, format_report

    result = evaluate_store(store, truth_csv=truth)
    for line in result.get("truth_bad_rows", []):
        say(f"WARNING: {line}")
    emit(result, json, format_report)
