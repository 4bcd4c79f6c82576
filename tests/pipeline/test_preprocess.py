"""Preprocessing as Dask graphs: oracle tests on uneven chunks, the store, the CLI."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from pipeline import preprocess, store
from pipeline import preprocess_kernels as pk
from pipeline.cli.main import app
from pipeline.ingest import ingest
from tests.factories import write_stacked_cxi
from tests.pipeline.test_preprocess_kernels import SHAPE, airy_pattern, detector_mask

runner = CliRunner()
UNEVEN = (7, 1, 12, 4)  # deliberately uneven chunks along ``pattern``


def beamtime(n_hits: int, n_empty: int, *, seed: int = 0):
    """Interleaved hits (Airy patterns with known centres) and empty frames.

    Returns frames (uint16), the true hit flags and the true centres (NaN for empty).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.r_[np.ones(n_hits, bool), np.zeros(n_empty, bool)])
    frames, centres = [], []
    for i, hit in enumerate(order):
        centre = (127.5 + rng.uniform(-4, 4), 127.5 + rng.uniform(-4, 4))
        photons = 10 ** rng.uniform(4, 6) if hit else 0
        frames.append(
            airy_pattern(centre=centre, photons=photons, ellipticity=rng.uniform(1, 1.4), angle=rng.uniform(0, 3),
                         background=0.3, seed=seed * 1000 + i)
        )
        centres.append(centre if hit else (np.nan, np.nan))
    frames = np.stack(frames)
    frames[:, 40, 200] += 500  # a hot pixel, not in the file mask
    return frames, order, np.array(centres)


def make_store(tmp_path, frames, name="run.zarr"):
    cxi = write_stacked_cxi(tmp_path / "run.cxi", frames, mask=detector_mask())
    ingest(tmp_path / name, [cxi])
    return tmp_path / name


def sharded_store(tmp_path, n, shape, name="sharded.zarr"):
    """A store of ``n`` random uint16 frames written straight into ``raw`` (no ingest)."""
    frames = np.random.default_rng(0).integers(0, 1000, (n, *shape), dtype=np.uint16)
    path = tmp_path / name
    store.create_store(path, frame_shape=shape, dtype=np.uint16, mask=np.zeros(shape, bool))
    store.resize_patterns(path, n)
    zarr.open_group(path, mode="r+", use_consolidated=False)["raw"][:] = frames
    return path, frames


def task_prefixes(*collections) -> set[str]:
    """Name prefixes of the tasks left after Dask's graph optimisation (fusion)."""
    import dask
    from dask.utils import key_split

    optimised = dask.optimize(*collections)
    return {key_split(key) for collection in optimised for key in dict(collection.__dask_graph__())}


def first_dark_ring(image, beyond):
    """Radius, image pixels, of the first minimum of the azimuthal mean beyond radius ``beyond``."""
    size = image.shape[0]
    yy, xx = np.indices(image.shape)
    radius = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    valid = image != 0
    bins = np.round(radius[valid]).astype(int)
    mean = np.bincount(bins, image[valid]) / np.maximum(np.bincount(bins), 1)
    start = int(np.ceil(beyond))
    lowest = start + int(np.flatnonzero(np.diff(mean[start : size // 2]) > 0)[0])
    # Sub-bin position: the vertex of the parabola through the lowest bin and its neighbours.
    left, middle, right = mean[lowest - 1 : lowest + 2]
    return lowest + 0.5 * (left - right) / (left - 2 * middle + right)


def hit_settings(mask=None):
    mask = detector_mask() if mask is None else mask
    return pk.HitSettings(regions=pk.HitRegions.around(mask, (127.5, 127.5)), saturation=65535)


class TestOracles:
    """Each Dask stage equals its kernel applied to the whole NumPy array."""

    def test_analyse_array(self):
        frames, hits, _ = beamtime(14, 10)
        settings = pk.PreprocessSettings(
            mask=detector_mask(), background=np.full(SHAPE, 0.3, np.float32), nominal_centre=(127.5, 127.5),
            half_side=80.0, size=32, saturation=65535,
        )
        lazy = preprocess.analyse_array(
            da.from_array(frames, chunks=(UNEVEN, -1, -1)), hit_settings=hit_settings(), settings=settings
        )
        assert lazy["image"].chunks[0] == UNEVEN and lazy["image"].shape == (24, 32, 32)
        computed = {name: array.compute() for name, array in lazy.items()}
        packed = pk.analyse_block(frames, hit_settings=hit_settings(), settings=settings)
        np.testing.assert_array_equal(computed["image"].reshape(24, -1), packed[:, : 32 * 32])
        for i, name in enumerate(pk.PACKED_COLUMNS):
            np.testing.assert_array_equal(computed[name], packed[:, 32 * 32 + i] if name != "hit" else hits)

    def test_frame_statistics(self):
        frames, _, _ = beamtime(14, 10)
        lazy = preprocess.frame_statistics(da.from_array(frames, chunks=(UNEVEN, -1, -1)), hit_settings=hit_settings())
        settings = hit_settings()
        expected = pk.frame_statistics_block(frames, regions=settings.regions, saturation=settings.saturation)
        np.testing.assert_array_equal(lazy.compute(), expected)

    def test_background_median(self):
        frames, hits, _ = beamtime(14, 10)
        lazy = da.from_array(frames, chunks=(UNEVEN, -1, -1))
        whole, n = preprocess.background_median(lazy.rechunk((-1, -1, -1)), hit_settings=hit_settings())
        np.testing.assert_array_equal(whole, np.median(frames[~hits], axis=0))
        assert n == 1
        # Uneven chunks: the median of the per-chunk medians of non-hits.
        per_chunk, n = preprocess.background_median(lazy, hit_settings=hit_settings())
        bounds = np.cumsum((0,) + UNEVEN)
        medians = [pk.background_median_block(frames[a:b], hits[a:b])[0] for a, b in zip(bounds, bounds[1:])
                   if (~hits[a:b]).any()]
        np.testing.assert_array_equal(per_chunk, np.median(medians, axis=0))
        assert n == len(medians)

    def test_sample_shards(self):
        lazy = da.from_array(np.arange(24)[:, None, None], chunks=(UNEVEN, -1, -1))
        # The short last chunk (a partly filled shard) is left out while there are others,
        # so the sample does not depend on where the run ends.
        assert preprocess.sample_shards(lazy, 2).compute().ravel().tolist() == [*range(7), *range(8, 20)]
        assert preprocess.sample_shards(lazy, 10).shape[0] == 20
        even = da.from_array(np.arange(24)[:, None, None], chunks=(6, -1, -1))
        assert preprocess.sample_shards(even, 2).compute().ravel().tolist() == [*range(6), *range(18, 24)]
        alone = da.from_array(np.arange(5)[:, None, None], chunks=(5, -1, -1))
        assert preprocess.sample_shards(alone, 2).shape[0] == 5


class TestStore:
    def test_open_store_reads_each_shard_of_raw_in_one_task(self, tmp_path):
        n = store.PATTERN_CHUNK + 44
        path, frames = sharded_store(tmp_path, n, (6, 5))
        raw = store.open_store(path)["raw"].data
        assert raw.chunks[0] == (store.PATTERN_CHUNK, 44)
        # no per-inner-chunk reads and no rechunk: one task per shard (and the array itself)
        assert len(raw.__dask_graph__()) == raw.numblocks[0] + 1
        np.testing.assert_array_equal(raw.compute(scheduler="sync"), frames)

    def test_full_pass_reads_each_shard_in_the_task_that_analyses_it(self, tmp_path):
        # Fused: no task returns a raw shard (which would be held, or sent between workers).
        path, _ = sharded_store(tmp_path, store.PATTERN_CHUNK + 44, SHAPE)
        mask = detector_mask()
        settings = pk.PreprocessSettings(mask=mask, background=np.zeros(SHAPE, np.float32),
                                         nominal_centre=(127.5, 127.5), half_side=80.0, size=16)
        outputs = preprocess.analyse_array(store.open_store(path)["raw"].data, hit_settings=hit_settings(), settings=settings)
        assert "from-zarr" not in task_prefixes(*outputs.values())

    def test_preprocess_finds_hits_centres_and_hot_pixels(self, tmp_path, dask_threads):
        frames, hits, centres = beamtime(20, 12)
        path = make_store(tmp_path, frames)
        result = preprocess.preprocess_store(path, size=48)
        ds = store.open_store(path)
        np.testing.assert_array_equal(ds.hit.values, hits)
        assert result["hits"] == 20 and result["hit_rate"] == pytest.approx(20 / 32)
        found = np.stack([ds.centre_y.values, ds.centre_x.values], axis=1)
        assert np.hypot(*(found[hits] - centres[hits]).T).max() < 0.5
        assert np.all(found[~hits] == np.float32(result["nominal_centre"]))
        assert ds.preprocess_mask.values[40, 200] and result["hot_pixels"] == 1
        assert result["background"] == "median of non-hits"
        np.testing.assert_allclose(ds.background.values[100:110, 60], np.median(frames[~hits, 100:110, 60], axis=0))
        image = ds.image.values
        assert image.shape == (32, 48, 48) and image.dtype == np.float32 and np.isfinite(image).all()
        valid = image[0] != 0
        assert image[0][valid].mean() == pytest.approx(0, abs=1e-3)
        assert ds.photon_count.dtype == np.float32 and np.all(ds.photon_count.values[hits] > 1000)
        assert [entry["command"] for entry in ds.attrs["provenance"]] == ["ingest", "preprocess"]
        assert ds.attrs["wavelength"] == 13.5e-9 and len(ds.attrs["ingested_files"]) == 1
        recorded = ds.attrs["provenance"][-1]
        assert recorded["parameters"]["size"] == 48 and recorded["parameters"]["scaling"] == "log"

    def test_too_few_frames_to_look_for_hot_pixels(self, tmp_path, dask_threads):
        """Three frames cannot tell a hot pixel from one shot's bright speckle: none is
        masked, and the summary says why."""
        frames, _, _ = beamtime(2, 1)
        path = make_store(tmp_path, frames)
        outcome = runner.invoke(app, ["preprocess", str(path), "--size", "32", "--cluster", "local-threads", "--json"])
        assert outcome.exit_code == 0, outcome.output
        result = json.loads(outcome.stdout.strip().splitlines()[-1])
        assert (result["hot_pixels"], result["hot_pixels_searched"]) == (0, False)
        assert not (store.open_store(path).preprocess_mask.values & ~store.open_store(path).mask.values).any()
        human = runner.invoke(app, ["preprocess", str(path), "--size", "32", "--cluster", "local-threads"])
        assert "too few frames to tell hot pixels from speckle" in human.output

    def test_crop_keeps_the_inner_part_at_a_finer_sampling(self, tmp_path, dask_threads):
        """--crop 0.5 maps the same pixels of the frame onto twice the image radius: the
        Airy pattern's first dark ring (20 px from the centre on the detector) moves
        from 20 / s to 2 x 20 / s image pixels, s the detector pixels per image pixel at
        crop 1."""
        frames = np.stack([airy_pattern(speckle=20.0, photons=1e6, seed=i) for i in range(4)])
        path = make_store(tmp_path, frames)
        radii = {}
        for crop in (1.0, 0.5):
            outcome = runner.invoke(app, ["preprocess", str(path), "--size", "64", "--crop", str(crop),
                                          "--cluster", "local-threads", "--json"])
            assert outcome.exit_code == 0, outcome.output
            parameters = json.loads(outcome.stdout.strip().splitlines()[-1])["parameters"]
            assert parameters["crop"] == crop
            scale = 2 * parameters["crop_half_side"] / 64  # detector pixels per image pixel
            image = store.open_store(path).image.values.mean(axis=0)
            # Past the central hole (7 px on the detector) and the mask's blurred edge.
            radii[crop] = first_dark_ring(image, beyond=7 / scale + 2) * scale
        # The same ring on the detector: 20 px, measured at both samplings.
        assert radii[1.0] == pytest.approx(20.0, abs=2.0) and radii[0.5] == pytest.approx(20.0, abs=1.0)
        outcome = runner.invoke(app, ["preprocess", str(path), "--crop", "1.5", "--cluster", "local-threads"])
        assert outcome.exit_code == 1 and "--crop 1.5 must be between 0.05 and 1" in outcome.output

    @pytest.mark.parametrize("n_hits,n_empty", [(0, 6), (6, 0)])
    def test_stores_of_only_empty_frames_or_only_hits(self, tmp_path, dask_threads, n_hits, n_empty):
        frames, hits, _ = beamtime(n_hits, n_empty, seed=3)
        path = make_store(tmp_path, frames)
        result = preprocess.preprocess_store(path, size=32)
        assert result["hits"] == n_hits
        assert result["background"] == ("none" if n_empty == 0 else "median of non-hits")
        assert np.isfinite(store.open_store(path).image.values).all()


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["lcls", "fermi"])
def test_simulated_beamtime(tmp_path, dask_threads, profile):
    """On the simulator's frames (stray light, dark level, hot pixels, beam jitter) hit
    finding agrees with the 'Empty' labels and hits are centred on the beam."""
    from pipeline.simulate.beamtime import draw_shots, resolve_profile, simulate_patterns
    from pipeline.simulate.detector import beam_center
    from pipeline.taxonomy import CLASS_INDEX

    frames, labels, metadata = simulate_patterns(24, seed=2, profile=profile, size=128, balanced=True)
    cxi = write_stacked_cxi(tmp_path / "sim.cxi", frames, labels=labels, mask=metadata["mask"])
    ingest(tmp_path / "sim.zarr", [cxi])
    preprocess.preprocess_store(tmp_path / "sim.zarr", size=64)
    ds = store.open_store(tmp_path / "sim.zarr")
    empty = labels[:, CLASS_INDEX["Empty"]] == 1
    assert empty.any() and not empty.all()
    np.testing.assert_array_equal(ds.hit.values, ~empty)
    hits = ds.hit.values
    # The true centre of each shot: the nominal beam position plus the shot's jitter.
    resolved = resolve_profile(profile, size=128)
    shifts = np.array([shot.center_shift for shot, _ in draw_shots(0, 24, seed=2, profile=resolved, balanced=True)])
    beam = np.asarray(beam_center(resolved)) + shifts[hits]
    offsets = np.hypot(ds.centre_y.values[hits] - beam[:, 0], ds.centre_x.values[hits] - beam[:, 1])
    if profile == "lcls":  # small-angle (projection) patterns obey Friedel's law
        assert offsets.max() < 0.5
    else:
        # Wide-angle MSFT patterns break centro-symmetry (absorption, Ewald curvature, the
        # 'Asymmetric' and 'Bent' classes): typical hits are still within half a pixel.
        assert np.median(offsets) < 0.5 and offsets.max() < 3


class TestCommand:
    def test_cli_json_dark_and_info(self, tmp_path, dask_threads):
        frames, hits, _ = beamtime(5, 3, seed=5)
        path = make_store(tmp_path, frames)
        dark = tmp_path / "dark.npy"
        np.save(dark, np.full(SHAPE, 0.3, np.float32))
        outcome = runner.invoke(
            app, ["preprocess", str(path), "--size", "32", "--scaling", "asinh", "--dark", str(dark),
                  "--read-noise", "0.2", "--cluster", "local-threads", "--json"],
        )
        assert outcome.exit_code == 0, outcome.output
        result = json.loads(outcome.stdout.strip().splitlines()[-1])
        assert result["patterns"] == 8 and result["hits"] == 5 and result["background"] == "dark"
        assert result["parameters"]["scaling"] == "asinh" and result["parameters"]["dark"].endswith("dark.npy")
        # The read noise is recorded, and patterns added later (watch) are tested with it.
        from pipeline.preprocess import run_settings

        parameters = store.last_parameters(store.read_attrs(path), "preprocess")
        assert parameters["read_noise"] == 0.2
        hit_settings, _ = run_settings(parameters, run_mask=np.zeros(SHAPE, bool), background=np.zeros(SHAPE),
                                       dark=None)
        assert hit_settings.read_noise == 0.2
        info = runner.invoke(app, ["info", str(path), "--json"])
        info_result = json.loads(info.stdout.strip().splitlines()[-1])
        assert info_result["hit_rate"] == pytest.approx(5 / 8)

    def test_read_noise_of_float_frames_is_estimated_and_keeps_empty_frames_empty(self, tmp_path, dask_threads):
        """Calibrated float frames with 0.5 photons rms of read noise and no option given:
        ``preprocess`` estimates the noise from the sampled frames, records it, and the
        nearly dark empty frames stay non-hits, as they do not when the noise is left out."""
        rng = np.random.default_rng(9)
        hits = rng.permutation(np.r_[np.ones(6, bool), np.zeros(58, bool)])
        frames = rng.poisson(0.002, (hits.size, *SHAPE)).astype(np.float32)
        frames[hits] += np.stack([airy_pattern(photons=3e4, seed=s) for s in range(6)])
        frames += rng.normal(0, 0.5, frames.shape).astype(np.float32)
        path = make_store(tmp_path, frames)
        outcome = runner.invoke(app, ["preprocess", str(path), "--size", "32", "--cluster", "local-threads"])
        assert outcome.exit_code == 0, outcome.output
        assert "photons rms (estimated)" in outcome.output
        parameters = store.last_parameters(store.read_attrs(path), "preprocess")
        assert parameters["read_noise_source"] == "estimated"
        assert parameters["read_noise"] == pytest.approx(0.5, rel=0.03)
        np.testing.assert_array_equal(store.read_pattern_values(path, "hit"), hits)
        without = preprocess.preprocess_store(path, size=32, read_noise=0.0)
        assert without["hits"] > hits.sum() and without["read_noise_source"] == "given"
        # Integer counts: no estimate.
        counts = make_store(tmp_path, np.rint(np.clip(frames, 0, None)).astype(np.uint16), name="counts.zarr")
        result = preprocess.preprocess_store(counts, size=32)
        assert result["read_noise"] == 0.0 and result["read_noise_source"] == "integer counts"
        with pytest.raises(preprocess.AirysortError, match="'loud' must be a number of photons rms or 'auto'"):
            preprocess.preprocess_store(counts, size=32, read_noise="loud")

    def test_half_float_frames_are_stored_as_float32_and_preprocessed(self, tmp_path, dask_threads):
        """The compiled kernels take no float16: ingest widens it (exactly); preprocess of a
        store that an older version left in float16 reads it as float32."""
        frames, hits, _ = beamtime(3, 2)
        halves = np.minimum(frames, 2000).astype(np.float16)
        path = make_store(tmp_path, halves)
        raw = store.open_store(path)["raw"]
        assert raw.dtype == np.float32 and np.array_equal(raw.values, halves.astype(np.float32))
        result = preprocess.preprocess_store(path, size=32)
        assert result["hits"] == hits.sum()
        older = store.open_store(path).assign(raw=raw.astype(np.float16))
        assert store.raw_frames(older).dtype == np.float32

    def test_cli_errors(self, tmp_path, dask_threads):
        frames, _, _ = beamtime(2, 2)
        path = make_store(tmp_path, frames)
        np.save(tmp_path / "small.npy", np.zeros((3, 3)))
        outcome = runner.invoke(app, ["preprocess", str(path), "--dark", str(tmp_path / "small.npy"),
                                      "--cluster", "local-threads"])
        assert outcome.exit_code == 1
        assert "ERROR: dark frame has shape (3, 3) but frames are (256, 256)" in outcome.output
        np.save(tmp_path / "text.npy", np.full((256, 256), "a"))
        outcome = runner.invoke(app, ["preprocess", str(path), "--dark", str(tmp_path / "text.npy"),
                                      "--cluster", "local-threads"])
        assert outcome.exit_code == 1 and "ERROR: dark frame holds <U1 values, not numbers" in outcome.output
        small = make_store(tmp_path, np.ones((3, 8, 8), np.uint16), name="small.zarr")
        outcome = runner.invoke(app, ["preprocess", str(small), "--size", "8", "--cluster", "local-threads"])
        assert outcome.exit_code == 1 and "frames of 8x8 px are too small for --search-radius 8" in outcome.output
        outcome = runner.invoke(app, ["preprocess", str(tmp_path / "nothing.zarr"), "--cluster", "local-threads"])
        assert outcome.exit_code == 1 and "does not exist" in outcome.output
        # Numbers that would give empty or NaN images are refused before any work.
        for option, value, wanted in [("--saturation", "0", "> 0"), ("--asinh-scale", "nan", "> 0"),
                                      ("--asinh-scale", "inf", "> 0"), ("--hit-sigma", "nan", "> 0"),
                                      ("--search-radius", "-1", ">= 0"), ("--read-noise", "-0.1", ">= 0")]:
            outcome = runner.invoke(app, ["preprocess", str(path), option, value, "--cluster", "local-threads"])
            assert outcome.exit_code == 1, option
            assert outcome.output.strip() == f"ERROR: {option} {float(value)!r} must be a finite number {wanted}"
        assert "image" not in store.open_store(path)
