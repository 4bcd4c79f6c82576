"""``airysort info STORE.zarr``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, note_unused_cluster, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store.")],
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Show what the store holds: counts, variables, chunking, rejects, provenance."""
    note_unused_cluster(cluster, "info", "reads the store's metadata in this process")
    from pipeline.info import format_info, store_info

    emit(store_info(store), json, format_info)
