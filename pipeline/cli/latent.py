"""``airysort latent STORE.zarr MODEL_DIR OUT_DIR``"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, note_unused_cluster, user_errors


class ColorBy(str, Enum):
    label = "label"
    cluster_gmm = "cluster_gmm"
    cluster_spectral = "cluster_spectral"


class MapMethod(str, Enum):
    pca = "pca"
    tsne = "tsne"


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store with 'latent' (airysort embed).")],
    model_dir: Annotated[Path, typer.Argument(help="The β-TCVAE that wrote 'latent'.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory for the PNG figures.")],
    color_by: Annotated[
        ColorBy, typer.Option(help="Colour the map by label coarse group or by cluster.")
    ] = ColorBy.label,
    method: Annotated[MapMethod, typer.Option(help="2-D projection of the latents.")] = MapMethod.pca,
    points: Annotated[int, typer.Option(help="Patterns drawn at random for the map.")] = 3000,
    steps: Annotated[int, typer.Option(help="Images per factor in the traversal.")] = 7,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Latent traversal grid and 2-D latent map, as PNGs."""
    note_unused_cluster(cluster, "latent", "decodes and plots in this process")
    from pipeline.embed import latent_figures

    paths = latent_figures(
        store, model_dir, out_dir, color_by=color_by.value, method=method.value,
        n_points=points, n_steps=steps, seed=seed,
    )
    emit(
        {"figures": [str(p) for p in paths]},
        json,
        lambda r: "wrote " + ", ".join(r["figures"]),
    )
