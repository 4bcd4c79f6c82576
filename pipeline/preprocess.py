"""``airysort preprocess``: Dask wiring of :mod:`pipeline.preprocess_kernels` over the store.

Up to ``stat_shards`` shards spread evenly over the run are read first and kept in
worker memory (``persist``) for three passes of statistics, then released; one full pass
then reads every shard once (the sampled ones again: reading a shard costs about a
fifth of analysing it, and one fused read-and-analyse task per shard keeps every 128 MB
shard in the worker that decodes it). Each pass is one Dask task per shard, so memory
stays bounded by a few shards whatever the store size:

1. **Hot pixels** (sample) — per-pixel mean over the sampled shards (a Dask ``sum``
   reduction; hot pixels are persistent, so a sample of a few hundred frames finds
   them), then :func:`~pipeline.preprocess_kernels.hot_pixels`.
2. **Hit threshold** (sample) — hit statistics of the sampled frames; when they show
   a separate population of empty frames lit by stray light,
   :func:`~pipeline.preprocess_kernels.excess_threshold` gives the level between it
   and the hits (otherwise each frame is tested on its own).
3. **Background** (sample) — a dark frame the user gives, or the per-pixel median of
   the non-hit frames: hits are found in each sampled shard and the median of its
   non-hit frames taken (:func:`~pipeline.preprocess_kernels.empty_median_block`),
   then the median across those shards. No non-hit frame in the sample and no dark:
   no background is subtracted.
4. **Everything else** (full pass) — per shard, hit finding, then every frame through
   :func:`~pipeline.preprocess_kernels.analyse_block` (centre, scaling, crop, resize,
   normalisation), written with :func:`pipeline.store.write_variables`: ``image``,
   ``hit``, ``photon_count``, ``centre_y``, ``centre_x``. Hit finding is per frame
   (:func:`~pipeline.preprocess_kernels.is_hit`), so the sample and the full pass agree.

The run-level results (combined mask without saturation, background) are written as
the store variables ``preprocess_mask`` and ``background`` (``y, x``) so that
``airysort correlate`` uses exactly the same corrections, and so that
:func:`preprocess_new` (``airysort watch``) can apply them, with the recorded
parameters, to patterns appended later, without another pass over the run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import preprocess_kernels as kernels
from pipeline.dask_cluster import on_cluster
from pipeline.errors import AirysortError
from pipeline.progress import StageClock

COMMAND = "preprocess"


def analyse_array(raw, *, hit_settings: kernels.HitSettings, settings: kernels.PreprocessSettings) -> dict:
    """Hit finding and preprocessing of a Dask array of frames, one task per chunk.

    Parameters
    ----------
    raw : dask.array.Array, shape (n, y, x)
        Frames, chunked along the first axis only.
    hit_settings : HitSettings
    settings : PreprocessSettings

    Returns
    -------
    dict of dask.array.Array
        ``image`` (n, size, size) float32, ``centre_y``, ``centre_x``, ``photon_count``
        (n,) float32 and ``hit`` (n,) bool, all slices of one packed array so that one
        task per chunk computes them together.
    """
    import dask
    import dask.array as da

    size = settings.size
    # One copy of the settings (masks, background) in the graph, not one per task, under
    # a key of its own (pure=False): a key derived from the content would be shared with
    # the previous pass's graph, and a key the scheduler is still releasing from that
    # graph can leave this one's tasks waiting or cancelled.
    # The blocks keep three axes, (n, 1, packed row): with ``drop_axis`` Dask does not
    # fuse the shard's read into this task, and each 128 MB shard became a task result
    # of its own (held in memory, sometimes sent to the other worker).
    packed = da.map_blocks(
        _analyse_block,
        raw,
        dask.delayed(hit_settings, pure=False),
        dask.delayed(settings, pure=False),
        chunks=(raw.chunks[0], (1,), (size * size + len(kernels.PACKED_COLUMNS),)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )[:, 0]
    out = {"image": packed[:, : size * size].reshape((raw.shape[0], size, size))}
    for i, name in enumerate(kernels.PACKED_COLUMNS):
        out[name] = packed[:, size * size + i]
    out["hit"] = out["hit"] > 0.5
    return out


def _analyse_block(frames, hit_settings: kernels.HitSettings, settings: kernels.PreprocessSettings) -> np.ndarray:
    return kernels.analyse_block(frames, hit_settings=hit_settings, settings=settings)[:, None]


def frame_statistics(raw, *, hit_settings: kernels.HitSettings):
    """Per-frame hit statistics of a Dask array of frames, one task per chunk.

    Returns
    -------
    dask.array.Array of float64, shape (n, 3)
        See :func:`~pipeline.preprocess_kernels.frame_statistics_block`.
    """
    import dask
    import dask.array as da

    return da.map_blocks(
        _frame_statistics_block,
        raw,
        dask.delayed(hit_settings, pure=False),
        drop_axis=2,
        chunks=(raw.chunks[0], (3,)),
        dtype=np.float64,
        meta=np.empty((0, 0), np.float64),
    )


def _frame_statistics_block(frames, hit_settings: kernels.HitSettings) -> np.ndarray:
    return kernels.frame_statistics_block(
        frames, regions=hit_settings.regions, dark=hit_settings.dark, saturation=hit_settings.saturation,
        read_noise=hit_settings.read_noise,
    )


def sample_shards(raw, n_shards: int):
    """Up to ``n_shards`` whole chunks of ``raw`` spread evenly along the first axis."""
    import dask.array as da

    return da.concatenate([raw.blocks[int(i)] for i in _sample_picks(raw, n_shards)], axis=0)


def _sample_picks(raw, n_shards: int) -> np.ndarray:
    """Blocks spread evenly over the run; a short last block (a partly filled shard) only
    when there is no other, so that the sample's size, and the statistics drawn from it,
    do not depend on where the run happens to end."""
    sizes = raw.chunks[0]
    usable = len(sizes) - 1 if len(sizes) > 1 and sizes[-1] < sizes[0] else len(sizes)
    return kernels.evenly_spaced(usable, n_shards)


def background_median(sample, *, hit_settings: kernels.HitSettings) -> tuple[np.ndarray | None, int]:
    """Median of non-hit frames: within each chunk of ``sample``, then across chunks.

    Parameters
    ----------
    sample : dask.array.Array, shape (n, y, x)
        Frames, chunked along the first axis only (e.g. :func:`sample_shards`).
    hit_settings : HitSettings

    Returns
    -------
    background : ndarray of float32, shape (y, x), or None when no frame is a non-hit
    n_chunks : int
        Chunks that held non-hit frames.
    """
    import dask
    import dask.array as da

    medians = da.map_blocks(
        _empty_median_block,
        sample,
        dask.delayed(hit_settings, pure=False),
        chunks=((1,) * sample.numblocks[0], *((s,) for s in sample.shape[1:])),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    ).compute()
    used = ~np.isnan(medians).all(axis=(1, 2))
    if not used.any():
        return None, 0
    return np.median(medians[used], axis=0).astype(np.float32), int(used.sum())


def _empty_median_block(frames, hit_settings: kernels.HitSettings) -> np.ndarray:
    return kernels.empty_median_block(frames, hit_settings=hit_settings)


def read_noise_of_sample(sample, *, valid: np.ndarray, dark: np.ndarray | None) -> float:
    """Read noise, photons rms, of calibrated frames from their values below zero.

    One task per chunk of ``sample`` (:func:`~pipeline.preprocess_kernels.negative_spread_block`
    on a few frames of each), combined by
    :func:`~pipeline.preprocess_kernels.read_noise_from_spreads`.
    """
    import dask
    import dask.array as da

    spreads = da.map_blocks(
        _negative_spread_block,
        sample,
        dask.delayed(valid, pure=False),
        dask.delayed(dark, pure=False),
        drop_axis=2,
        chunks=((1,) * sample.numblocks[0], (3,)),
        dtype=np.float64,
        meta=np.empty((0, 0), np.float64),
    ).compute()
    return kernels.read_noise_from_spreads(spreads)


def _negative_spread_block(frames, valid: np.ndarray, dark: np.ndarray | None) -> np.ndarray:
    return kernels.negative_spread_block(frames, valid=valid, dark=dark)


def resolve_saturation(saturation: float | str | None, *, dtype: np.dtype, attrs: dict[str, Any]) -> float | None:
    """Saturation level in counts: a number, ``None`` (off), or ``"auto"``: the store's
    ``saturation`` attribute, else the largest value of an integer ``raw`` dtype, else off."""
    if saturation is None or isinstance(saturation, (int, float)) and not isinstance(saturation, bool):
        return None if saturation is None else float(saturation)
    if saturation != "auto":
        raise AirysortError(f"saturation {saturation!r} must be a number of counts, 'auto' or None")
    if attrs.get("saturation") is not None:
        return float(attrs["saturation"])
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    return None


#: Fewer frames in the statistics sample than this and no hot pixels are looked for: a
#: bright speckle of one shot is then as bright as a hot pixel (a 1-frame run flagged
#: twice the true number, most of them in the rings).
MIN_HOT_PIXEL_FRAMES = 8


def _check_positive(*, zero_allowed: bool = False, **values: float) -> None:
    """One error line for an option that is not a finite positive (or non-negative) number,
    checked here rather than deep in the workers."""
    for name, value in values.items():
        if not (np.isfinite(value) and (value >= 0 if zero_allowed else value > 0)):
            wanted = "a finite number >= 0" if zero_allowed else "a finite number > 0"
            raise AirysortError(f"--{name.replace('_', '-')} {value!r} must be {wanted}")


def load_dark(dark: str | os.PathLike | np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A dark frame from a ``.npy`` file (or an array), checked against the frame shape."""
    if dark is None:
        return None
    if not isinstance(dark, np.ndarray):
        path = Path(dark)
        if not path.exists():
            raise AirysortError(f"dark frame {str(path)!r} does not exist; give a .npy file of shape {shape!r}")
        try:
            dark = np.load(path)
        except ValueError as error:
            raise AirysortError(f"dark frame {str(path)!r} is not a readable .npy file ({error})") from None
    if np.asarray(dark).dtype.kind not in "biuf":
        raise AirysortError(f"dark frame holds {np.asarray(dark).dtype} values, not numbers; give counts per pixel")
    dark = np.asarray(dark, np.float32)
    if dark.shape != tuple(shape):
        raise AirysortError(f"dark frame has shape {dark.shape!r} but frames are {tuple(shape)!r}; give one frame (y, x)")
    if not np.all(np.isfinite(dark)):
        raise AirysortError("dark frame holds NaN or inf values; replace them (e.g. by 0) first")
    return dark


@on_cluster
def preprocess_store(
    path: str | os.PathLike,
    *,
    size: int = 128,
    crop: float = 1.0,
    scaling: str = "log",
    asinh_scale: float = 1.0,
    dark: str | os.PathLike | np.ndarray | None = None,
    saturation: float | str | None = "auto",
    hot_sigma: float = 10.0,
    hit_sigma: float = 5.0,
    min_photons: float = 50.0,
    search_radius: float = 8.0,
    centre_window: int | None = None,
    stat_shards: int = 2,
    read_noise: float | str = "auto",
) -> dict[str, Any]:
    """Preprocess every frame of a store into ``image``; find hits, centres, background.

    Runs on the current Dask client, else on a cluster started for the call.

    Parameters
    ----------
    path : path-like
        The store.
    cluster : str, default="local"
        Where Dask runs when no client is active (``--cluster``,
        :func:`pipeline.dask_cluster.on_cluster`).
    size : int, default=128
        Side of ``image`` in pixels.
    crop : float, default=1.0
        Side of the cropped square as a fraction of the largest square inscribed in
        the on-detector disc around the centre. Below 1 the image keeps the inner,
        small-angle part of the frame at a finer sampling: for small-angle data whose
        signal fades well inside the frame, fine rings then survive the resize.
    scaling : {"log", "asinh"}, default="log"
        Intensity scaling (:func:`~pipeline.preprocess_kernels.scale_intensity`).
    asinh_scale : float, default=1.0
        Counts where ``asinh`` scaling turns logarithmic.
    dark : path to a .npy file or ndarray (y, x), optional
        Subtracted instead of the median of non-hit frames.
    saturation : float, "auto" or None, default="auto"
        Counts at or above which a pixel is masked in that frame
        (:func:`resolve_saturation`).
    hot_sigma : float, default=10.0
        Hot-pixel threshold in robust standard deviations.
    hit_sigma, min_photons : float, default=5.0, 50.0
        A hit has an inner-disc photon excess above ``hit_sigma`` Poisson standard
        deviations and above ``min_photons``.
    search_radius : float, default=8.0
        Largest centre offset searched around the nominal centre, pixels.
    centre_window : int, optional
        Half side of the window used for centring, pixels; default a quarter of the
        frame's smaller side, at most 64 (the bright low-q region, where Friedel's law
        holds best and noise matters least).
    stat_shards : int, default=2
        Shards sampled (evenly over the run; whole ones, a partly filled last shard only
        when there is no other) for the hot-pixel mean, the hit threshold and the
        background median.
    read_noise : float or "auto", default="auto"
        Detector read noise, photons rms per pixel, for hit finding. ``"auto"``: for
        float frames (calibrated detectors writing photons), estimated from the sampled
        frames' values below zero (:func:`read_noise_of_sample`); 0 for integer counts,
        whose shot noise the test already includes.

    Returns
    -------
    dict
        ``patterns``, ``hits``, ``hit_rate``, ``background`` (how it was obtained),
        ``hot_pixels``, ``nominal_centre``, ``centre_median``, ``seconds`` (per pass) and
        ``parameters``.
    """
    import dask

    from pipeline import store

    if scaling not in kernels.SCALINGS:
        raise AirysortError(f"unknown scaling {scaling!r}; use one of {kernels.SCALINGS}")
    if not 4 <= int(size) <= 2048:
        raise AirysortError(f"--size {size!r} must be between 4 and 2048 pixels")
    if not 0.05 <= crop <= 1.0:
        raise AirysortError(f"--crop {crop!r} must be between 0.05 and 1 (a fraction of the inscribed square's side)")
    _check_positive(asinh_scale=asinh_scale, hot_sigma=hot_sigma, hit_sigma=hit_sigma, stat_shards=stat_shards)
    _check_positive(min_photons=min_photons, search_radius=search_radius, zero_allowed=True)
    if read_noise != "auto":
        if isinstance(read_noise, (str, bool)):
            raise AirysortError(f"--read-noise {read_noise!r} must be a number of photons rms or 'auto'")
        _check_positive(read_noise=read_noise, zero_allowed=True)
    if isinstance(saturation, (int, float)) and not isinstance(saturation, bool):
        _check_positive(saturation=saturation)
    dataset = store.open_store(path)
    n_patterns = dataset.sizes["pattern"]
    if n_patterns == 0:
        pending = (Path(path) / store.PENDING_DIR).exists()
        raise AirysortError(f"store {str(path)!r} holds no patterns; " + (
            "an interrupted ingest is pending: run the same 'airysort ingest' again to complete it"
            if pending else "ingest some first"))
    raw = store.raw_frames(dataset)  # one read task per shard (store.open_store)
    shape = tuple(raw.shape[1:])
    file_mask = dataset["mask"].values.astype(bool)
    dark_frame = load_dark(dark, shape)
    level = resolve_saturation(saturation, dtype=raw.dtype, attrs=dict(dataset.attrs))

    clock = StageClock()
    # 1. Hot pixels from a bounded sample of shards, read once and kept in worker memory
    # (stat_shards shards, whatever the store size) for the next two passes.
    sample = sample_shards(raw, stat_shards).persist()
    # sum(dtype=float64) accumulates without a float64 copy of each shard; the sums of
    # squares give each pixel's spread over the frames, which tells hot pixels (bright in
    # every frame) from bright speckle (in a few).
    n_sample = sample.shape[0]
    squares = sample.map_blocks(kernels.square_sums, chunks=(1, *shape), dtype=np.float64).sum(axis=0)
    total, square_total = dask.compute(sample.sum(axis=0, dtype=np.float64), squares)
    mean_frame = total / n_sample
    frame_std = np.sqrt(np.maximum(square_total / n_sample - mean_frame**2, 0.0))
    if dark_frame is not None:
        mean_frame = mean_frame - dark_frame
    if n_sample >= MIN_HOT_PIXEL_FRAMES:
        hot = kernels.hot_pixels(mean_frame, mask=file_mask, n_frames=n_sample, n_sigma=hot_sigma, frame_std=frame_std)
    else:  # a bright speckle of one shot looks like a hot pixel: too few shots to tell
        hot = np.zeros_like(file_mask)
    run_mask = file_mask | hot
    if read_noise == "auto":
        floats = np.issubdtype(raw.dtype, np.floating)
        read_noise = read_noise_of_sample(sample, valid=~run_mask, dark=dark_frame) if floats else 0.0
        read_noise_source = "estimated" if floats else "integer counts"
    else:
        read_noise, read_noise_source = float(read_noise), "given"
    centre0 = kernels.nominal_centre(file_mask)
    hit_settings = kernels.HitSettings(
        regions=kernels.HitRegions.around(run_mask, centre0),
        dark=dark_frame,
        saturation=level,
        n_sigma=hit_sigma,
        min_photons=min_photons,
        read_noise=read_noise,
    )
    clock.lap("hot_pixels")

    # 2. A run-level hit threshold when the sample shows empty frames lit by stray light.
    sample_statistics = frame_statistics(sample, hit_settings=hit_settings).compute()
    threshold = kernels.excess_threshold(sample_statistics, n_sigma=hit_sigma, min_photons=min_photons)
    hit_settings = dataclasses.replace(hit_settings, threshold=threshold)
    clock.lap("hit_threshold")

    # 3. Background from the non-hits of the same sample.
    if dark_frame is not None:
        background, background_source, n_background = dark_frame, "dark", 0
    else:
        background, n_background = background_median(sample, hit_settings=hit_settings)
        background_source = "median of non-hits" if background is not None else "none"
        if background is None:
            background = np.zeros(shape, np.float32)
        # NaN where every sampled frame had the pixel masked does not matter, but must
        # not propagate.
        background = np.nan_to_num(background, nan=0.0)
    clock.lap("background")

    # 4. Hits and images, one pass.
    if centre_window is None:
        centre_window = min(64, min(shape) // 4)
    radius = kernels.disc_radius(shape, centre0) - search_radius
    if radius <= 0:
        raise AirysortError(
            f"frames of {shape[0]}x{shape[1]} px are too small for --search-radius {search_radius:g}: the "
            f"centre ({centre0[0]:.1f}, {centre0[1]:.1f}) is {radius + search_radius:.1f} px from the edge; "
            "give a smaller --search-radius")
    parameters = {
        "size": int(size),
        "crop": float(crop),
        "scaling": scaling,
        "asinh_scale": asinh_scale,
        "dark": _describe_dark(dark),
        "saturation": level,
        "hot_sigma": hot_sigma,
        "hit_sigma": hit_sigma,
        "min_photons": min_photons,
        "read_noise": read_noise,
        "read_noise_source": read_noise_source,
        "hit_threshold": threshold,
        "search_radius": search_radius,
        "centre_window": centre_window,
        "stat_shards": stat_shards,
        "nominal_centre": list(centre0),
        "crop_half_side": crop * radius / np.sqrt(2.0),
        "background": background_source,
        "background_shards": n_background,
        "hot_pixels": int(hot.sum()),
    }
    hit_settings, settings = run_settings(parameters, run_mask=run_mask, background=background, dark=dark_frame)
    # The full pass reads every shard afresh: read and analysis fuse into one task per
    # shard, and the sample leaves worker memory now.
    del sample
    outputs = analyse_array(raw, hit_settings=hit_settings, settings=settings)

    with store.write_lock(path, COMMAND):
        _write_run_arrays(path, run_mask=run_mask, background=settings.background)
        _write_outputs(path, outputs, parameters=parameters)
    clock.lap("images")
    hits = store.read_pattern_values(path, "hit")
    hit_centres = np.stack([store.read_pattern_values(path, f"centre_{axis}")[hits] for axis in "yx"], axis=1)
    n_hits = int(hits.sum())
    return {
        "patterns": int(n_patterns),
        "hits": n_hits,
        "hit_rate": n_hits / n_patterns,
        "background": background_source,
        "hot_pixels": int(hot.sum()),
        "hot_pixels_searched": n_sample >= MIN_HOT_PIXEL_FRAMES,
        "read_noise": read_noise,
        "read_noise_source": read_noise_source,
        "nominal_centre": list(centre0),
        "centre_median": np.median(hit_centres, axis=0).tolist() if n_hits else list(centre0),
        "image_shape": [int(size), int(size)],
        "seconds": clock.laps,
        "parameters": parameters,
    }


def run_settings(
    parameters: dict[str, Any], *, run_mask: np.ndarray, background: np.ndarray, dark: np.ndarray | None
) -> tuple[kernels.HitSettings, kernels.PreprocessSettings]:
    """The block kernels' settings from a run's ``preprocess`` parameters and corrections.

    ``parameters`` are those :func:`preprocess_store` records; ``run_mask`` and
    ``background`` its ``preprocess_mask`` and ``background``; ``dark`` the dark frame
    hit finding subtracts (None unless the user gave one).
    """
    centre0 = tuple(float(c) for c in parameters["nominal_centre"])
    hit_settings = kernels.HitSettings(
        regions=kernels.HitRegions.around(run_mask, centre0),
        dark=dark,
        saturation=parameters["saturation"],
        n_sigma=parameters["hit_sigma"],
        min_photons=parameters["min_photons"],
        threshold=parameters["hit_threshold"],
        read_noise=parameters.get("read_noise", 0.0),  # not recorded before it existed
    )
    settings = kernels.PreprocessSettings(
        mask=run_mask,
        background=np.asarray(background, np.float32),
        nominal_centre=centre0,
        half_side=parameters["crop_half_side"],
        size=int(parameters["size"]),
        scaling=parameters["scaling"],
        asinh_scale=parameters["asinh_scale"],
        saturation=parameters["saturation"],
        search_radius=parameters["search_radius"],
        centre_window=parameters["centre_window"],
    )
    return hit_settings, settings


def preprocess_new(path: str | os.PathLike, *, start: int) -> dict[str, Any]:
    """Preprocess patterns ``start`` to the end as the store's last ``preprocess`` did.

    For a run that grows while it is processed (``airysort watch``): the run-level
    corrections (mask with hot pixels, background, hit threshold) and every parameter are
    those of the last :func:`preprocess_store` on this store, so new images match the old
    ones; only the new patterns are read and written (by region). Must run inside
    :func:`pipeline.dask_cluster.dask_client`.

    Returns
    -------
    dict
        ``patterns`` (new ones), ``hits`` among them, ``seconds``.
    """
    from pipeline import store

    started = time.perf_counter()
    # The preprocess outputs cover only the old patterns until this call extends them: no
    # warning telling the user to run preprocess again.
    dataset = store.open_store(path, warn=False)
    parameters = store.last_parameters(dataset.attrs, COMMAND)
    if not parameters or "preprocess_mask" not in dataset or "image" not in dataset:
        raise AirysortError(f"store {str(path)!r} has not been preprocessed yet; run 'airysort preprocess {path}' first")
    background = dataset["background"].values
    dark = background if parameters["background"] == "dark" else None
    hit_settings, settings = run_settings(
        parameters, run_mask=dataset["preprocess_mask"].values.astype(bool), background=background, dark=dark)
    outputs = analyse_array(store.raw_frames(dataset)[start:], hit_settings=hit_settings, settings=settings)
    _write_outputs(path, outputs, parameters=parameters, start=start)
    hits = store.read_pattern_values(path, "hit", start=start)
    return {"patterns": int(hits.size), "hits": int(hits.sum()), "seconds": round(time.perf_counter() - started, 2)}


def _write_outputs(path, outputs: dict, *, parameters: dict[str, Any], start: int = 0) -> None:
    """Write the per-pattern results in one pass (one task per shard computes them all)."""
    import xarray as xr

    from pipeline import store

    pattern = ("pattern",)
    descriptions = {
        "hit": {"long_name": "hit (not an empty frame)"},
        "photon_count": {"long_name": "photons in valid pixels of the on-detector disc", "units": "counts"},
        "centre_y": {"long_name": "beam centre row", "units": "px"},
        "centre_x": {"long_name": "beam centre column", "units": "px"},
    }
    variables = {
        "image": xr.DataArray(
            outputs["image"],
            dims=("pattern", "iy", "ix"),
            attrs={"long_name": "preprocessed network input", "units": "1",
                   "comment": f"{parameters['scaling']} scaled, normalised per pattern; masked pixels are 0"},
        ),
        **{name: xr.DataArray(outputs[name], dims=pattern, attrs=attrs) for name, attrs in descriptions.items()},
    }
    store.write_variables(path, variables, command=COMMAND, parameters=parameters, description="preprocess: images",
                          start=start)


def _describe_dark(dark: str | os.PathLike | np.ndarray | None) -> str | None:
    if dark is None:
        return None
    return "array given through the API" if isinstance(dark, np.ndarray) else str(Path(dark).resolve())


def _write_run_arrays(path: str | os.PathLike, *, run_mask: np.ndarray, background: np.ndarray) -> None:
    """Store the run's combined mask and background (``y, x``) for ``correlate``."""
    import xarray as xr

    from pipeline import store

    with store.write_lock(path, COMMAND):
        store.write_frame_variables(path, {
            "preprocess_mask": xr.DataArray(run_mask, dims=("y", "x"), attrs={
                "long_name": "file mask and hot pixels", "flag_meanings": "True = bad pixel"}),
            "background": xr.DataArray(background, dims=("y", "x"), attrs={
                "long_name": "subtracted background", "units": "counts"}),
        })
