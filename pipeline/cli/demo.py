"""``airysort demo``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, user_errors


@user_errors
def command(
    out: Annotated[Path, typer.Option(help="Output directory (replaced).")] = Path("demo-output"),
    n: Annotated[int, typer.Option("--n", help="Simulated patterns.")] = 2000,
    size: Annotated[int, typer.Option(help="Simulated frame side in pixels.")] = 128,
    labelled: Annotated[float, typer.Option(help="Fraction labelled by the stand-in researcher.")] = 0.2,
    cnn_epochs: Annotated[int, typer.Option(help="CNN training epochs.")] = 12,
    vae_epochs: Annotated[int, typer.Option(help="β-TCVAE training epochs.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed of the simulation and the splits.")] = 0,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Everything on a simulated beamtime: simulate → ingest → … → report."""
    from pipeline.demo import format_summary, run_demo

    summary = run_demo(out, n=n, size=size, labelled_fraction=labelled, cnn_epochs=cnn_epochs,
                       vae_epochs=vae_epochs, seed=seed, cluster=cluster)
    emit(summary, json, format_summary)
