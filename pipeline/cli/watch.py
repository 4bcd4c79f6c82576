"""``airysort watch DIR STORE.zarr MODEL_DIR [--interval 10] [--once]``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, user_errors


@user_errors
def command(
    directory: Annotated[Path, typer.Argument(help="Directory the DAQ writes its files to.")],
    store: Annotated[Path, typer.Argument(help="The run's Zarr store (created by the first file).")],
    model_dir: Annotated[Path, typer.Argument(help="Classifier from 'airysort train --model cnn'.")],
    interval: Annotated[float, typer.Option(help="Seconds between two looks at DIR; a file must stay "
                                                 "unchanged this long to be taken.")] = 10.0,
    pattern: Annotated[
        Optional[list[str]],
        typer.Option(help="File names to take (glob; repeat the option). Default: *.cxi *.h5 *.hdf5 *.npy."),
    ] = None,
    dataset: Annotated[Optional[str], typer.Option(help="HDF5 path of the frames in plain HDF5 files.")] = None,
    once: Annotated[bool, typer.Option(help="Take the files there now, process them and stop.")] = False,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Online mode: ingest, preprocess (as the model's training images were) and classify
    each file as it lands in DIR; one line per batch. Ctrl-C stops after the batch in hand;
    started again, it carries on where it stopped."""
    from pipeline.dask_cluster import dask_client
    from pipeline.watch import DEFAULT_PATTERNS, watch

    with dask_client(cluster):
        result = watch(directory, store, model_dir, interval=interval, patterns=pattern or DEFAULT_PATTERNS,
                       dataset=dataset, once=once)
    emit(result, json, lambda r: (
        f"{r['batches']} batch(es): {r['files']} file(s), {r['ingested']} patterns ingested, "
        f"{r['predicted']} classified; {r['patterns']} patterns in {store}"))
