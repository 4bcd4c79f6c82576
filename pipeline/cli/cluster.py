"""``airysort cluster STORE.zarr --method gmm|spectral [--k K]``"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, user_errors


class Method(str, Enum):
    gmm = "gmm"
    spectral = "spectral"


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store.")],
    method: Annotated[
        Method,
        typer.Option(help="gmm: Gaussian mixture on the VAE 'latent'; spectral: Nyström spectral "
                          "clustering of the preprocessed 'image' (the baseline)."),
    ] = Method.gmm,
    k: Annotated[
        Optional[int], typer.Option("--k", help="Number of clusters (default: BIC for gmm, eigengap for spectral).")
    ] = None,
    k_min: Annotated[int, typer.Option(help="Smallest k tried when --k is not given.")] = 2,
    k_max: Annotated[int, typer.Option(help="Largest k tried when --k is not given.")] = 12,
    sample_size: Annotated[int, typer.Option(help="Patterns drawn at random to fit on.")] = 20000,
    landmarks: Annotated[int, typer.Option(help="Nyström landmarks (spectral).")] = 500,
    gamma: Annotated[
        Optional[float],
        typer.Option(help="RBF parameter of the spectral affinity (1/feature units²; default: median heuristic)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Cluster every pattern: writes cluster_gmm (+ cluster_gmm_prob) or cluster_spectral."""
    from pipeline.cluster import cluster_store

    result = cluster_store(
        str(store), method=method.value, k=k, k_range=(k_min, k_max), sample_size=sample_size,
        n_landmarks=landmarks, gamma=gamma, seed=seed, cluster=cluster,
    )
    emit(result, json, _summary)


def _summary(result: dict) -> str:
    lines = [f"{result['method']}: {result['n_patterns']} patterns in {result['k']} clusters "
             f"({result['seconds']} s); wrote {', '.join(result['variables'])}"]
    if "bic" in result:
        best = min(result["bic"], key=result["bic"].get)
        lines.append("BIC by k: " + ", ".join(
            f"{k}: {v:.4g}{' *' if k == best else ''}" for k, v in result["bic"].items()))
    lines.append("cluster sizes: " + ", ".join(f"{c}: {n}" for c, n in result["sizes"].items()))
    return "\n".join(lines)
