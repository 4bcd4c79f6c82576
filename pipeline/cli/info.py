"""``airysort info STORE.zarr``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import JsonOption, emit, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store.")],
    json: JsonOption = False,
) -> None:
    """Show what the store holds: counts, variables, chunking, rejects, provenance."""
    from pipeline.info import format_info, store_info

    emit(store_info(store), json, format_info)
