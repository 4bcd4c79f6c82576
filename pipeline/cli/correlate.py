"""``airysort correlate STORE.zarr [--n-q N] [--n-phi N] [--cross-q]``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store (after 'airysort preprocess').")],
    n_q: Annotated[int, typer.Option("--n-q", help="Number of rings (q bins).")] = 64,
    n_phi: Annotated[int, typer.Option("--n-phi", help="Number of angular lags.")] = 128,
    cross_q: Annotated[
        bool, typer.Option("--cross-q", help="Keep all ring pairs (pattern, q1, q2, phi) instead of q1 = q2.")
    ] = False,
    r_min: Annotated[Optional[float], typer.Option(help="Inner ring radius, pixels (default: hole edge).")] = None,
    r_max: Annotated[Optional[float], typer.Option(help="Outer ring radius, pixels (default: detector edge).")] = None,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Angular two-point cross-correlation of every pattern -> 'ccf'."""
    from pipeline.correlate import correlate_store

    result = correlate_store(store, n_q=n_q, n_phi=n_phi, variant="cross" if cross_q else "auto",
                             r_min=r_min, r_max=r_max, cluster=cluster)
    emit(result, json, _summary)


def _summary(result: dict) -> str:
    return (
        f"correlated {result['patterns']} patterns ({result['hits']} hits, {result['hit_rate']:.1%}): "
        f"ccf {result['variant']} of shape {tuple(result['shape'])} per pattern, rings "
        f"{result['r_min']:.1f}-{result['r_max']:.1f} px"
    )
