"""``airysort preprocess STORE.zarr [--size 128] [--crop 1.0] [--scaling log|asinh] [--dark FILE.npy]``"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, user_errors


class Scaling(str, Enum):
    log = "log"
    asinh = "asinh"


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store.")],
    size: Annotated[int, typer.Option(help="Side of the preprocessed image, pixels.")] = 128,
    crop: Annotated[
        float,
        typer.Option(help="Side of the cropped square as a fraction of the largest square inside the "
                          "detector disc (below 1: the inner, small-angle part at finer sampling)."),
    ] = 1.0,
    scaling: Annotated[Scaling, typer.Option(help="Intensity scaling: log(1+I) or asinh(I/scale).")] = Scaling.log,
    asinh_scale: Annotated[float, typer.Option(help="Counts where asinh scaling turns logarithmic.")] = 1.0,
    dark: Annotated[
        Optional[Path],
        typer.Option(help="Dark frame (.npy, y×x counts) to subtract instead of the median of non-hit frames."),
    ] = None,
    saturation: Annotated[
        Optional[float],
        typer.Option(help="Counts at which a pixel saturates (default: the store's 'saturation' "
                          "attribute or the largest value of an integer raw dtype)."),
    ] = None,
    hot_sigma: Annotated[float, typer.Option(help="Hot-pixel threshold, robust standard deviations.")] = 10.0,
    hit_sigma: Annotated[float, typer.Option(help="Hit threshold, Poisson standard deviations.")] = 5.0,
    min_photons: Annotated[float, typer.Option(help="Least inner-disc photon excess of a hit.")] = 50.0,
    search_radius: Annotated[float, typer.Option(help="Largest beam-centre offset searched, pixels.")] = 8.0,
    read_noise: Annotated[Optional[float], typer.Option(
        help="Detector read noise, photons rms per pixel, for hit finding (default: estimated from "
             "the sampled frames' values below zero when frames are float photons; 0 for integer "
             "counts).")] = None,
    stat_shards: Annotated[int, typer.Option(
        help="Shards (256 frames each) sampled evenly over the run for hot pixels, hit threshold and "
             "background; each is held in worker memory meanwhile.")] = 2,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Mask, background, hit finding, centring, scaling, crop/resize -> 'image', 'hit', centres."""
    from pipeline.preprocess import preprocess_store

    result = preprocess_store(
        store,
        size=size,
        crop=crop,
        scaling=scaling.value,
        asinh_scale=asinh_scale,
        dark=dark,
        saturation="auto" if saturation is None else saturation,
        hot_sigma=hot_sigma,
        hit_sigma=hit_sigma,
        min_photons=min_photons,
        search_radius=search_radius,
        stat_shards=stat_shards,
        read_noise="auto" if read_noise is None else read_noise,
        cluster=cluster,
    )
    emit(result, json, _summary)


def _summary(result: dict) -> str:
    return (
        f"preprocessed {result['patterns']} patterns into {result['image_shape'][0]}×{result['image_shape'][1]} "
        f"images; {result['hits']} hits ({result['hit_rate']:.1%}); background: {result['background']}; "
        + (f"{result['hot_pixels']} hot pixels; " if result.get("hot_pixels_searched", True)
           else "too few frames to tell hot pixels from speckle, none masked; ")
        + (f"read noise {result['read_noise']:.3g} photons rms ({result['read_noise_source']}); "
           if result.get("read_noise_source") != "integer counts" else "")
        + "median centre "
        f"({result['centre_median'][0]:.2f}, {result['centre_median'][1]:.2f}) px"
    )
