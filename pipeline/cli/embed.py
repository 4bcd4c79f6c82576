"""``airysort embed STORE.zarr MODEL_DIR``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store with preprocessed 'image'.")],
    model_dir: Annotated[
        Path, typer.Argument(help="β-TCVAE directory from 'airysort train --model vae'.")
    ],
    batch_size: Annotated[int, typer.Option(help="Patterns per forward pass.")] = 128,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Encode every pattern with the β-TCVAE: writes 'latent' (posterior means) and
    'latent_logvar'."""
    from pipeline.embed import embed_store

    result = embed_store(store, model_dir, batch_size=batch_size, cluster=cluster)
    emit(
        result,
        json,
        lambda r: f"embedded {r['n_patterns']} pattern(s) into {r['latent_dim']} latent factors "
        f"({r['active_dims']} active) in {r['seconds']} s; wrote {', '.join(r['variables'])}",
    )
