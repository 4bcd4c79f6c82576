"""``airysort simulate OUT.cxi --n N``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, say, user_errors


@user_errors
def command(
    out: Annotated[Path, typer.Argument(help="CXI file to write (replaced if it exists).")],
    n: Annotated[int, typer.Option("--n", help="Number of patterns (shots).")],
    size: Annotated[Optional[int], typer.Option(help="Frame size in pixels (same angles, binned); default: the profile's frame.")] = None,
    seed: Annotated[int, typer.Option(help="Seed: the whole beamtime is reproducible from it.")] = 0,
    detector_seed: Annotated[Optional[int], typer.Option(help="Seed of the detector's hot pixels (default: --seed); the same value gives several beamtimes one detector.")] = None,
    profile: Annotated[str, typer.Option(help="'fermi' (wide-angle XUV, MSFT), 'lcls' (small-angle X-ray) or a profile YAML.")] = "fermi",
    like: Annotated[Optional[Path], typer.Option(help="Real CXI file whose geometry, mask and count range to copy.")] = None,
    layout: Annotated[str, typer.Option(help="'stacked' (N, y, x) or 'entries' (one frame per entry).")] = "stacked",
    balanced: Annotated[bool, typer.Option("--balanced", help="Equal coarse groups instead of real label frequencies.")] = False,
    slice_thickness: Annotated[Optional[float], typer.Option(help="MSFT only: propagate the wave through each droplet in slices this thick (m, e.g. 1e-8; refraction inside the droplet); 0: straight lines, about 2x faster, less exact at wide angles. Default: the profile's (fermi: 1.5e-8).")] = None,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Simulate a labelled beamtime of helium-nanodroplet diffraction patterns (CXI)."""
    from pipeline.dask_cluster import dask_client
    from pipeline.simulate import simulate_beamtime
    from pipeline.simulate.beamtime import resolve_profile

    chosen = resolve_profile(profile, size=size, like=like)
    if slice_thickness is not None:
        chosen = chosen.with_slice_thickness(slice_thickness or None, origin="--slice-thickness")
    if detector_seed is not None:
        chosen = chosen.with_detector_seed(detector_seed)
    say(f"simulating {n} pattern(s) with profile {profile!r} -> {out}")
    with dask_client(cluster) as client:
        result = simulate_beamtime(out, n, seed=seed, profile=chosen, layout=layout, balanced=balanced,
                                   client=client)
    emit(
        result,
        json,
        lambda r: f"wrote {r['patterns']} pattern(s) of {r['frame_shape'][0]}x{r['frame_shape'][1]} "
        f"({r['model']}) to {r['path']}; labels: "
        + ", ".join(f"{k} {v}" for k, v in r["class_counts"].items() if v),
    )
