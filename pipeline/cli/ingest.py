"""``airysort ingest STORE.zarr INPUT...``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store to create or append to.")],
    inputs: Annotated[list[Path], typer.Argument(help="CXI, HDF5 or .npy files.")],
    dataset: Annotated[Optional[str], typer.Option(help="HDF5 path of the frame stack in plain HDF5 files.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Ingest files already in the store again.")] = False,
    labels: Annotated[bool, typer.Option(
        "--labels/--no-labels", help="Store the labels found in the files (--no-labels: leave every pattern "
                                     "unlabelled, e.g. to label a simulated beamtime by hand).")] = True,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Ingest raw frames into the store (appends; resumable; bad frames go to the reject log).
    Exits with status 1 when frames were rejected and none was stored, so that a script
    stops there."""
    from pipeline.ingest import ingest

    result = ingest(store, inputs, dataset=dataset, force=force, labels=labels, cluster=cluster)
    emit(
        result,
        json,
        lambda r: f"ingested {r['ingested']} pattern(s), rejected {r['rejected']}, "
        f"skipped {r['skipped_files']} file(s) already stored; the store holds {r['patterns']}",
    )
    if result["rejected"] and not result["ingested"]:
        raise typer.Exit(1)
