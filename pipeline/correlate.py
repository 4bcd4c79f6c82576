"""``airysort correlate``: Dask wiring of :mod:`pipeline.correlate_kernels` over the store.

Reads ``raw`` shard by shard together with the per-pattern centres that
``airysort preprocess`` refined (``centre_y``, ``centre_x``) and the run's corrections it
stored (``preprocess_mask``, ``background``), and writes ``ccf``: ``(pattern, q1, phi)``
for the default ``q1 = q2`` autocorrelation or ``(pattern, q1, q2, phi)`` for the
cross-q variant, one Dask task per shard.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline import correlate_kernels as kernels
from pipeline import preprocess_kernels
from pipeline.dask_cluster import on_cluster
from pipeline.errors import AirysortError

COMMAND = "correlate"


def correlate_array(raw, centres, *, settings: kernels.CorrelateSettings):
    """Angular correlations of a Dask array of frames.

    Parameters
    ----------
    raw : dask.array.Array, shape (n, y, x)
        Frames, chunked along the first axis only.
    centres : dask.array.Array of float, shape (n, 2)
        (row, column) per frame, pixels.
    settings : CorrelateSettings

    Returns
    -------
    dask.array.Array of float32, shape (n, *settings.output_shape)
    """
    import dask
    import dask.array as da

    centres = centres.rechunk((raw.chunks[0], 2))
    # (n, 1, 1) arrays broadcast against raw's (n, y, x) blocks, one block per shard.
    rows, cols = centres[:, 0, None, None], centres[:, 1, None, None]
    shared = dask.delayed(settings, pure=False)  # a key of its own (see preprocess.analyse_array)
    extra = len(settings.output_shape) - 2
    return da.map_blocks(
        _correlate_block,
        raw,
        rows,
        cols,
        shared,
        chunks=(raw.chunks[0], *((s,) for s in settings.output_shape)),
        new_axis=list(range(3, 3 + extra)),
        dtype=np.float32,
        meta=np.empty((0,) * (1 + len(settings.output_shape)), np.float32),
    )


def _correlate_block(
    frames: np.ndarray, rows: np.ndarray, cols: np.ndarray, settings: kernels.CorrelateSettings
) -> np.ndarray:
    centres = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1)
    return kernels.correlate_block(frames, centres, settings=settings)


@on_cluster
def correlate_store(
    path: str | os.PathLike,
    *,
    n_q: int = 64,
    n_phi: int = 128,
    variant: str = "auto",
    r_min: float | None = None,
    r_max: float | None = None,
    min_overlap: float = 0.25,
) -> dict[str, Any]:
    """Angular two-point cross-correlation of every pattern of a store → ``ccf``.

    Runs after ``airysort preprocess``, on the current Dask client, else on a cluster
    started for the call.

    Parameters
    ----------
    path : path-like
        The store.
    cluster : str, default="local"
        Where Dask runs when no client is active (``--cluster``,
        :func:`pipeline.dask_cluster.on_cluster`).
    n_q, n_phi : int, default=64, 128
        Rings and angular lags.
    variant : {"auto", "cross"}, default="auto"
        ``auto``: the ``q1 = q2`` autocorrelation ``(pattern, q1, phi)``, the default
        network input; ``cross``: all ring pairs ``(pattern, q1, q2, phi)``.
    r_min, r_max : float, optional
        Ring radii in pixels; default from the central hole's edge to the largest disc
        on the detector around every refined centre.
    min_overlap : float, default=0.25
        See :func:`~pipeline.correlate_kernels.angular_correlation`.

    Returns
    -------
    dict
        ``patterns``, ``hits``, ``hit_rate``, ``shape`` (of one pattern's ``ccf``),
        ``r_min``, ``r_max`` and ``parameters``.
    """
    from pipeline import store
    from pipeline.preprocess import resolve_saturation

    if variant not in kernels.VARIANTS:
        raise AirysortError(f"unknown correlation variant {variant!r}; use one of {kernels.VARIANTS}")
    if n_q < 1 or n_phi < 4:
        raise AirysortError(f"need --n-q >= 1 and --n-phi >= 4, got {n_q!r} and {n_phi!r}")
    dataset = store.open_store(path)
    missing = [v for v in ("centre_y", "centre_x", "preprocess_mask", "background", "hit") if v not in dataset]
    if missing:
        raise AirysortError(
            f"store {str(path)!r} lacks {', '.join(missing)}; run 'airysort preprocess {path}' first"
        )
    n_patterns = dataset.sizes["pattern"]
    raw = store.raw_frames(dataset)  # one read task per shard (store.open_store)
    shape = tuple(raw.shape[1:])
    # Straight from Zarr: through the Dask-backed dataset these small reads took seconds.
    centres = np.stack([store.read_pattern_values(path, f"centre_{axis}")[:n_patterns] for axis in "yx"],
                       axis=1).astype(np.float64)
    hits = store.read_pattern_values(path, "hit")[:n_patterns].astype(bool)
    run_mask = dataset["preprocess_mask"].values.astype(bool)
    preprocess_parameters = store.last_parameters(dataset.attrs, "preprocess")
    level = resolve_saturation(
        preprocess_parameters.get("saturation", "auto"), dtype=raw.dtype, attrs=dict(dataset.attrs)
    )
    nominal = preprocess_kernels.nominal_centre(dataset["mask"].values.astype(bool))
    if r_min is None:
        r_min = preprocess_kernels.hole_radius(run_mask, nominal) + 1.0
    if r_max is None:
        r_max = min(preprocess_kernels.disc_radius(shape, (cy, cx)) for cy, cx in centres) - 1.0
    if not 0 <= r_min < r_max:
        raise AirysortError(
            f"no room for rings between r_min={r_min!r} and r_max={r_max!r} px; give --r-min/--r-max"
        )
    settings = kernels.CorrelateSettings(
        mask=run_mask,
        background=dataset["background"].values.astype(np.float32),
        r_min=float(r_min),
        r_max=float(r_max),
        n_q=int(n_q),
        n_phi=int(n_phi),
        variant=variant,
        saturation=level,
        min_overlap=min_overlap,
    )
    import dask.array as da

    ccf = correlate_array(raw, da.from_array(centres, chunks=(raw.chunks[0], 2)), settings=settings)
    edges = np.linspace(r_min, r_max, n_q + 1)
    radii = 0.5 * (edges[1:] + edges[:-1])
    coords = {"q1": ("q1", radii, {"long_name": "ring radius", "units": "px"}),
              "phi": ("phi", 2 * np.pi * np.arange(n_phi) / n_phi, {"long_name": "angular lag", "units": "rad"})}
    dims = ("pattern", "q1", "phi")
    if variant == "cross":
        dims = ("pattern", "q1", "q2", "phi")
        coords["q2"] = ("q2", radii, {"long_name": "ring radius", "units": "px"})
    momentum = _momentum_transfer(radii, dataset.attrs)
    if momentum is not None:
        coords["q1_momentum"] = ("q1", momentum, {"long_name": "momentum transfer of ring", "units": "1/m"})
    parameters = {
        "n_q": int(n_q),
        "n_phi": int(n_phi),
        "variant": variant,
        "r_min": float(r_min),
        "r_max": float(r_max),
        "min_overlap": min_overlap,
        "saturation": level,
    }
    with store.write_lock(path, COMMAND):
        # A rerun may switch variant: coordinates of the old layout (q2, q1_momentum) must go.
        _drop_arrays(path, ("ccf", "q1", "q2", "phi", "q1_momentum"))
        _write_ccf(path, ccf, dims=dims, coords=coords, variant=variant, parameters=parameters)
    n_hits = int(hits.sum())
    return {
        "patterns": int(n_patterns),
        "hits": n_hits,
        "hit_rate": n_hits / n_patterns if n_patterns else 0.0,
        "shape": list(settings.output_shape),
        "variant": variant,
        "r_min": float(r_min),
        "r_max": float(r_max),
        "parameters": parameters,
    }


def _drop_arrays(path: str | os.PathLike, names: tuple[str, ...]) -> None:
    import zarr

    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    for name in names:
        if name in group:
            del group[name]


def _write_ccf(path, ccf, *, dims, coords, variant: str, parameters: dict[str, Any]) -> None:
    import xarray as xr

    from pipeline import store

    store.write_variables(
        path,
        {
            "ccf": xr.DataArray(
                ccf,
                dims=dims,
                coords=coords,
                attrs={
                    "long_name": "normalised angular cross-correlation",
                    "units": "1",
                    "comment": "C(q1,q2,dphi)/sqrt(C(q1,q1,0) C(q2,q2,0)), mask-corrected; "
                    + ("q1 = q2" if variant == "auto" else "all ring pairs"),
                },
            )
        },
        command=COMMAND,
        parameters=parameters,
        description="correlate: ccf",
    )


def _momentum_transfer(radii: np.ndarray, attrs: dict[str, Any]) -> np.ndarray | None:
    """``q = 4π/λ sin(θ/2)``, ``θ = atan(r p / L)``, in 1/m; None without geometry."""
    try:
        wavelength = float(attrs["wavelength"])
        distance = float(attrs["detector_distance"])
        pixel = float(attrs["pixel_size"])
    except (KeyError, TypeError, ValueError):
        return None
    if not all(np.isfinite([wavelength, distance, pixel])) or min(wavelength, distance, pixel) <= 0:
        return None
    theta = np.arctan(radii * pixel / distance)
    return 4 * np.pi / wavelength * np.sin(theta / 2)
