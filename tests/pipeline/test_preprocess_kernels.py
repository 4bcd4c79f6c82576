"""Tests of the pure NumPy preprocessing kernels on synthetic diffraction patterns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.special

from pipeline import preprocess_kernels as pk
from pipeline.errors import AirysortError

SHAPE = (256, 256)


def airy_pattern(
    shape=SHAPE,
    *,
    centre=(127.5, 127.5),
    speckle=12.0,
    photons=1e5,
    ellipticity=1.0,
    angle=0.0,
    background=0.02,
    seed=0,
    noise=True,
):
    """Far-field pattern of an (elliptical) disc: ``(2 J1(x)/x)²`` with the first zero at
    ``speckle`` px along the long axis, Poisson noise on ``photons`` plus a flat
    ``background`` per pixel."""
    yy, xx = np.indices(shape, dtype=float)
    dy, dx = yy - centre[0], xx - centre[1]
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) * ellipticity
    x = np.maximum(3.8317 * np.hypot(u, v) / speckle, 1e-9)
    intensity = (2 * scipy.special.j1(x) / x) ** 2
    intensity = intensity / intensity.sum() * photons + background
    if not noise:
        return intensity
    return np.random.default_rng(seed).poisson(intensity).astype(np.uint16)


def detector_mask(shape=SHAPE, *, hole=7.0):
    """Central hole of radius ``hole`` px around the frame's middle and a 2-px gap."""
    yy, xx = np.indices(shape)
    ny, nx = shape
    mask = np.hypot(yy - (ny - 1) / 2, xx - (nx - 1) / 2) < hole
    mask[:, nx // 2 + 20 : nx // 2 + 22] = True
    return mask


class TestGeometry:
    def test_nominal_centre_is_the_hole_centroid(self):
        mask = np.zeros((100, 120), bool)
        mask[40:51, 60:71] = True  # hole centred at (45, 65)
        mask[:, :3] = True  # a border strip is not the hole
        assert pk.nominal_centre(mask) == pytest.approx((45.0, 65.0))

    def test_nominal_centre_without_hole_is_the_middle(self):
        assert pk.nominal_centre(np.zeros((100, 120), bool)) == pytest.approx((49.5, 59.5))

    def test_hole_and_disc_radius(self):
        mask = detector_mask(hole=10)
        assert pk.hole_radius(mask, (127.5, 127.5)) == pytest.approx(10, abs=1)
        assert pk.disc_radius(SHAPE, (100.0, 127.5)) == 100.0


class TestHotPixels:
    def test_finds_planted_hot_pixels_and_nothing_else(self):
        mask = detector_mask()
        frames = np.stack([airy_pattern(centre=(127.5 + i % 3, 127.5), seed=i) for i in range(20)]).astype(float)
        hot = [(30, 40), (128, 140), (200, 17)]
        for y, x in hot:
            frames[:, y, x] += 50
        frames[:, 127, 127] = 1e4  # inside the hole: already masked, never "hot"
        found = pk.hot_pixels(frames.mean(axis=0), mask=mask, n_frames=len(frames))
        assert sorted(map(tuple, np.argwhere(found).tolist())) == sorted(hot)

    def test_speckle_bright_in_a_few_frames_is_not_hot(self):
        """A pixel bright in 1 of 20 frames stands out in the mean, but not against its spread."""
        mask = detector_mask()
        frames = np.stack([airy_pattern(centre=(127.5 + i % 3, 127.5), seed=i) for i in range(20)]).astype(float)
        frames[:, 30, 40] += 50  # hot: in every frame
        frames[3, 200, 17] += 1000  # one bright speckle
        mean = frames.mean(axis=0)
        std = np.sqrt(pk.square_sums(frames, step=7)[0] / len(frames) - mean**2)
        np.testing.assert_allclose(std, frames.std(axis=0), rtol=1e-6, atol=1e-6)
        without = pk.hot_pixels(mean, mask=mask, n_frames=len(frames))
        assert without[200, 17]  # the mean alone cannot tell it from a hot pixel
        found = pk.hot_pixels(mean, mask=mask, n_frames=len(frames), frame_std=std)
        assert np.argwhere(found).tolist() == [[30, 40]]

    def test_rejects_nonpositive_threshold(self):
        with pytest.raises(AirysortError, match="n_sigma"):
            pk.hot_pixels(np.zeros(SHAPE), mask=np.zeros(SHAPE, bool), n_frames=1, n_sigma=0)


class TestHitFinding:
    def statistics(self, frames, mask):
        regions = pk.HitRegions.around(mask, pk.nominal_centre(mask))
        return pk.frame_statistics_block(np.stack(frames), regions=regions, saturation=65535)

    def test_hits_and_empty_frames_are_told_apart(self):
        mask = detector_mask()
        empty = [airy_pattern(photons=0, background=0.5, seed=s) for s in range(10)]
        hits = [airy_pattern(photons=p, seed=s) for s, p in enumerate([300, 1e3, 1e5, 1e6])]
        flags = pk.is_hit(self.statistics(empty + hits, mask))
        assert flags.tolist() == [False] * 10 + [True] * 4

    def test_a_beam_on_dark_that_peaks_at_the_hole_makes_no_false_hits(self):
        """Empty frames holding only stray light that falls off from the hole, that light
        given as the dark: the excess must be scored against the inner disc's own dark
        counts (scored against the outer annulus's flat level only, 162 of 4000 such frames
        were hits)."""
        mask = detector_mask()
        regions = pk.HitRegions.around(mask, pk.nominal_centre(mask))
        radius = np.hypot(*(np.indices(SHAPE) - 127.5))
        stray = np.where(mask, 0.0, 0.5 * np.exp(-(radius - 7) / 15))
        rng = np.random.default_rng(3)
        settings = pk.HitSettings(regions=regions, dark=stray)
        empty = rng.poisson(stray, (1000, *SHAPE)).astype(np.uint16)
        statistics, flags = pk.find_hits_block(empty, hit_settings=settings)
        assert flags.sum() == 0
        assert 0.9 < (statistics[:, 1] / statistics[:, 2]).std() < 1.1  # excess in standard deviations
        # ...and a weak hit on the same stray light is still one.
        hits = np.stack([airy_pattern(photons=3000, seed=s) for s in range(4)]) + rng.poisson(stray, (4, *SHAPE))
        assert pk.find_hits_block(hits, hit_settings=settings)[1].all()

    def test_read_noise_of_calibrated_frames_is_no_hit_once_given(self):
        """Float photons with Gaussian read noise: summed over the inner disc it exceeds
        the photon floor in a few per cent of empty frames, unless the noise is part of the
        test; a weak hit stays a hit."""
        mask = detector_mask()
        regions = pk.HitRegions.around(mask, pk.nominal_centre(mask))
        rng = np.random.default_rng(5)
        empty = (rng.poisson(0.002, (500, *SHAPE)) + rng.normal(0, 0.3, (500, *SHAPE))).astype(np.float32)
        plain = pk.find_hits_block(empty, hit_settings=pk.HitSettings(regions=regions))[1]
        settings = pk.HitSettings(regions=regions, read_noise=0.3)
        statistics, flags = pk.find_hits_block(empty, hit_settings=settings)
        assert plain.sum() >= 5 and flags.sum() == 0, (plain.sum(), flags.sum())
        assert 0.85 < (statistics[:, 1] / statistics[:, 2]).std() < 1.15
        hits = np.stack([airy_pattern(photons=3000, seed=s) for s in range(4)]).astype(np.float32)
        hits += rng.normal(0, 0.3, hits.shape).astype(np.float32)
        assert pk.find_hits_block(hits, hit_settings=settings)[1].all()

    @pytest.mark.parametrize("sigma", [0.1, 0.3])
    def test_read_noise_is_estimated_from_values_below_zero(self, sigma):
        """Calibrated frames (photons plus N(0, σ)): hits, stray light and a hot pixel do
        not move the estimate; an offset zero level gives none unless its dark is given."""
        mask = detector_mask()
        rng = np.random.default_rng(int(sigma * 10))
        photons = np.stack([airy_pattern(photons=p, background=0.05, seed=s) for s, p in enumerate([0, 3e4, 3e5, 0])])
        photons[:, 40, 200] += 500
        frames = (photons + rng.normal(0, sigma, photons.shape)).astype(np.float32)
        spreads = np.concatenate([pk.negative_spread_block(block, valid=~mask) for block in (frames[:2], frames[2:])])
        assert pk.read_noise_from_spreads(spreads) == pytest.approx(sigma, rel=0.03)
        offset = frames + np.float32(10)
        assert pk.read_noise_from_spreads(pk.negative_spread_block(offset, valid=~mask)) == 0.0
        dark = np.full(SHAPE, 10, np.float32)
        estimate = pk.read_noise_from_spreads(pk.negative_spread_block(offset, valid=~mask, dark=dark))
        assert estimate == pytest.approx(sigma, rel=0.03)
        # Photon counts without noise have no value below zero.
        assert pk.read_noise_from_spreads(pk.negative_spread_block(photons, valid=~mask)) == 0.0

    @pytest.mark.parametrize("kind", ["only_empty", "only_hits"])
    def test_needs_no_mixture_of_hits_and_empty_frames(self, kind):
        mask = detector_mask()
        if kind == "only_empty":
            frames = [airy_pattern(photons=0, background=b, seed=s) for s, b in enumerate([0, 0.01, 2, 20])]
        else:
            frames = [airy_pattern(photons=p, seed=s) for s, p in enumerate([500, 5e3, 5e4, 5e5])]
        flags = pk.is_hit(self.statistics(frames, mask))
        assert flags.tolist() == [kind == "only_hits"] * 4

    def test_photon_count_is_the_sum_over_valid_pixels(self):
        mask = detector_mask()
        frame = airy_pattern(photons=1e4)
        stats = self.statistics([frame], mask)
        regions = pk.HitRegions.around(mask, pk.nominal_centre(mask))
        assert stats[0, 0] == frame[regions.inner | regions.outer].sum()

    @pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32])
    def test_region_sums_for_every_detector_dtype(self, dtype):
        # Integer counts of up to 32 bits are summed exactly (64-bit), also beyond
        # float32's 2**24, and pedestal-subtracted negative values count with their sign;
        # other data (calibrated float photons) to float32 precision.
        mask = detector_mask()
        regions = pk.HitRegions.around(mask, pk.nominal_centre(mask))
        rng = np.random.default_rng(1)
        high = min(np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 2**24, 2**31 - 1)
        frames = rng.integers(0 if np.issubdtype(dtype, np.unsignedinteger) else -3, high, (3, *SHAPE)).astype(dtype)
        stats = pk.frame_statistics_block(frames, regions=regions)
        valid = regions.inner | regions.outer
        expected = [frame[valid].astype(np.int64).sum() for frame in frames]
        exact = np.issubdtype(dtype, np.integer) and np.dtype(dtype).itemsize <= 4
        np.testing.assert_allclose(stats[:, 0], expected, rtol=0 if exact else 1e-5)

    def test_saturated_pixels_and_their_dark_are_left_out(self):
        mask = detector_mask()
        regions = pk.HitRegions.around(mask, pk.nominal_centre(mask))
        frames = np.stack([airy_pattern(photons=p, seed=s) for s, p in enumerate([1e4, 1e5, 3e3])])
        frames[1, 127, 100] = frames[1, 200, 128] = 65535  # one frame saturates, in both regions
        dark = np.random.default_rng(0).uniform(0, 0.2, SHAPE)
        stats = pk.frame_statistics_block(frames, regions=regions, dark=dark, saturation=65535)
        for frame, row in zip(frames, stats):
            keep = frame < 65535
            inner, outer = regions.inner & keep, regions.outer & keep
            counts = frame - dark
            excess = counts[inner].sum() - inner.sum() * counts[outer].sum() / outer.sum()
            assert row[0] == pytest.approx(counts[inner | outer].sum(), rel=1e-9)
            assert row[1] == pytest.approx(excess, rel=1e-9, abs=1e-6)


class TestExcessThreshold:
    """The run-level threshold for empty frames lit by stray light (a halo every frame has)."""

    @staticmethod
    def statistics(excess):
        excess = np.asarray(excess, float)
        return np.stack([excess * 2, excess, np.full_like(excess, 30.0)], axis=1)

    def test_separates_a_tight_empty_population_from_hits(self):
        rng = np.random.default_rng(0)
        empty = 1e4 * rng.normal(1, 0.1, 20)  # stray light, following the pulse energy
        hits = 10 ** rng.uniform(5, 7, 60)
        threshold = pk.excess_threshold(self.statistics(np.r_[empty, hits]))
        assert empty.max() < threshold < hits.min()

    @pytest.mark.parametrize("kind", ["only_hits", "only_empty"])
    def test_no_threshold_without_two_populations(self, kind):
        rng = np.random.default_rng(1)
        excess = 10 ** rng.uniform(3, 7, 60) if kind == "only_hits" else 1e4 * rng.normal(1, 0.1, 60)
        assert pk.excess_threshold(self.statistics(excess)) == 0.0


    def test_a_few_spread_hits_are_not_split(self):
        # Six hits with a chance gap of 1.3 decades: too few to call the low ones empty.
        assert pk.excess_threshold(self.statistics(10 ** np.array([4.0, 4.1, 4.2, 5.5, 5.8, 5.9]))) == 0.0


class TestCentre:
    @pytest.mark.parametrize("seed", range(8))
    def test_recovers_known_offsets_within_half_a_pixel(self, seed):
        rng = np.random.default_rng(seed)
        mask = detector_mask()
        true = (127.5 + rng.uniform(-5, 5), 127.5 + rng.uniform(-5, 5))
        frame = airy_pattern(
            centre=true,
            photons=10 ** rng.uniform(4, 6),
            ellipticity=rng.uniform(1, 1.5),
            angle=rng.uniform(0, np.pi),
            speckle=rng.uniform(6, 20),
            seed=seed,
        )
        found = pk.refine_centre(frame.astype(np.float32), mask, guess=pk.nominal_centre(mask))
        assert np.hypot(found[0] - true[0], found[1] - true[1]) < 0.5

    def test_shortened_ffts_find_the_best_candidate_of_direct_pair_sums(self):
        # D(s) summed directly over valid pixel pairs (no FFT, no wrap-around): the
        # refined centre lies within a quarter pixel (the parabola's reach) of its minimum.
        mask = detector_mask()
        frame = airy_pattern(centre=(129.3, 126.2), photons=1e5, ellipticity=1.3, angle=0.4, seed=4)
        guess, window, radius = (127.5, 127.5), 24, 3.0
        found = pk.refine_centre(frame.astype(np.float32), mask, guess=guess, search_radius=radius, window=window)
        gy, gx = 128, 128
        rows, cols = slice(gy - window, gy + window + 1), slice(gx - window, gx + window + 1)
        valid = ~mask[rows, cols]
        f = np.where(valid, np.log1p(np.maximum(frame[rows, cols], 0.0)), 0.0)
        side = 2 * window + 1
        best, best_score = None, np.inf
        for sy in range(side - 1 - 6, side + 6):
            for sx in range(side - 1 - 6, side + 6):
                # pixel i pairs with s - i, both inside the window
                ys, xs = slice(max(sy - side + 1, 0), min(sy + 1, side)), slice(max(sx - side + 1, 0), min(sx + 1, side))
                a, wa = f[ys, xs], valid[ys, xs]
                b = f[sy - ys.start :: -1, :][: a.shape[0]][:, sx - xs.start :: -1][:, : a.shape[1]]
                wb = valid[sy - ys.start :: -1, :][: a.shape[0]][:, sx - xs.start :: -1][:, : a.shape[1]]
                pairs = wa & wb
                score = ((a - b) ** 2)[pairs].sum() / pairs.sum()
                if score < best_score:
                    best, best_score = (gy - window + sy / 2, gx - window + sx / 2), score
        assert abs(found[0] - best[0]) <= 0.25 + 1e-9 and abs(found[1] - best[1]) <= 0.25 + 1e-9

    def test_block_of_frames_equals_frame_by_frame(self):
        mask = detector_mask()
        frames = np.stack([airy_pattern(centre=(126 + i, 129 - i), photons=1e5, seed=i) for i in range(3)])
        frames = frames.astype(np.float32)
        bad = np.repeat(mask[None], 3, axis=0)
        bad[1, 120:123, 140:143] = True  # one frame with saturated pixels: its own mask
        block = pk.refine_centres(frames, bad, guess=(127.5, 127.5))
        for frame, frame_bad, centre in zip(frames, bad, block):
            assert tuple(centre) == pk.refine_centre(frame, frame_bad, guess=(127.5, 127.5))

    def test_which_refines_only_the_chosen_frames(self):
        mask = detector_mask()
        frames = np.stack([airy_pattern(centre=(126 + i, 129 - i), photons=1e5, seed=i) for i in range(4)])
        frames = frames.astype(np.float32)
        bad = np.repeat(mask[None], 4, axis=0)
        bad[2, 120:123, 140:143] = True
        which = np.array([True, False, True, True])
        chosen = pk.refine_centres(frames, bad, guess=(127.5, 127.5), which=which)
        np.testing.assert_array_equal(chosen, pk.refine_centres(frames[which], bad[which], guess=(127.5, 127.5)))
        shared = pk.refine_centres(frames, mask, guess=(127.5, 127.5), which=which)
        np.testing.assert_array_equal(shared, pk.refine_centres(frames[which], mask, guess=(127.5, 127.5)))
        assert pk.refine_centres(frames, mask, guess=(127.5, 127.5), which=np.zeros(4, bool)).shape == (0, 2)

    def test_frame_too_close_to_the_edge_keeps_the_guess(self):
        frame = airy_pattern().astype(np.float32)
        assert pk.refine_centre(frame, np.zeros(SHAPE, bool), guess=(1.0, 2.0)) == (1.0, 2.0)


class TestScalingAndResampling:
    def test_log1p_of_positive_part_matches_log1p_in_place_too(self):
        values = np.concatenate([[-5.0, 0.0, 1e-7, 1e-4, 0.5], np.geomspace(1, 6e4, 200)]).astype(np.float32)
        expected = np.log1p(np.maximum(values.astype(np.float64), 0))
        np.testing.assert_allclose(pk.log1p_of_positive_part(values), expected, rtol=1e-6, atol=6e-8)
        copy = values.copy()
        assert pk.log1p_of_positive_part(copy, out=copy) is copy
        np.testing.assert_allclose(copy, expected, rtol=1e-6, atol=6e-8)
        frames = np.arange(12, dtype=np.uint16).reshape(3, 2, 2)  # raw counts, as the centring reads them
        np.testing.assert_allclose(pk.log1p_of_positive_part(frames), np.log1p(frames), rtol=1e-6)

    def test_compiled_log_is_within_two_ulp_for_every_exponent(self):
        # Every float32 exponent from 1 to 3e38, both sides of each range-reduction boundary
        # (powers of two and sqrt(2) times them) and the largest finite float32.
        values = np.concatenate([
            np.geomspace(1, 3e38, 20001, dtype=np.float64),
            2.0 ** np.arange(128), np.sqrt(2) * 2.0 ** np.arange(127),
        ]).astype(np.float32)
        values = np.concatenate([values, np.nextafter(values, np.float32(0)), [np.finfo(np.float32).max]])
        values = values[values >= 1]
        logs = values.copy()
        pk._log_in_place(logs, np.empty_like(logs))
        exact = np.log(values.astype(np.float64))
        ulps = np.abs(logs - exact) / np.spacing(exact.astype(np.float32))
        assert ulps.max() <= 2.0  # NumPy's own float32 log: 2.2 on these values

    @pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
    def test_fused_log_scaling_of_a_region_equals_the_numpy_steps(self, dtype):
        rng = np.random.default_rng(5)
        frames = rng.poisson(rng.exponential(40, (3, 40, 50))).astype(dtype)
        frames[1, 12, 30] = 60000
        region = (slice(5, 35), slice(7, 47))
        background = rng.uniform(0, 3, (30, 40)).astype(np.float32)
        valid = (rng.random((30, 40)) > 0.2).astype(np.float32)
        out = np.empty((3, 30, 40), np.float32)
        peaks = pk._log_scaled_region(frames, 5, 7, background, valid, out)
        counts = frames[:, region[0], region[1]].astype(np.float64) - background
        np.testing.assert_allclose(out, np.log1p(np.maximum(counts, 0)) * valid, rtol=2e-7, atol=6e-8)
        np.testing.assert_array_equal(peaks, frames[:, region[0], region[1]].max(axis=(1, 2)))
        assert peaks[1] == 60000

    def test_centring_on_log_scaled_frames_equals_centring_on_counts(self):
        frames = np.stack([airy_pattern(centre=(128.3 + i, 126.8), photons=1e5, seed=i) for i in range(3)])
        bad = np.zeros(SHAPE, bool)
        bad[120:137, 120:137] = True
        on_counts = pk.refine_centres(frames, bad, guess=(127.5, 127.5))
        logs = pk.log1p_of_positive_part(frames) * ~bad  # the scaled frames preprocessing passes on
        np.testing.assert_allclose(pk.refine_centres(logs, bad, guess=(127.5, 127.5), log_scaled=True), on_counts)

    def test_log_and_asinh(self):
        frame = np.array([[-3.0, 0.0, 1.0, 1e4]])
        assert np.allclose(pk.scale_intensity(frame, scaling="log"), np.log1p([0, 0, 1, 1e4]))
        assert np.allclose(pk.scale_intensity(frame, scaling="asinh", asinh_scale=2), np.arcsinh(frame / 2))
        with pytest.raises(AirysortError, match="unknown scaling 'sqrt'"):
            pk.scale_intensity(frame, scaling="sqrt")

    @pytest.mark.parametrize("scaling", ["log", "asinh"])
    def test_scaling_in_place_gives_the_same_values(self, scaling):
        frame = np.random.default_rng(2).normal(5, 10, (3, 16, 16)).astype(np.float32)
        expected = pk.scale_intensity(frame, scaling=scaling, asinh_scale=3.0)
        scaled = pk.scale_intensity(frame, scaling=scaling, asinh_scale=3.0, out=frame)
        assert scaled is frame
        np.testing.assert_array_equal(frame, expected)

    def test_masked_pixels_neither_leak_nor_darken_their_neighbours(self):
        # A smooth pattern with garbage in the masked pixels: the image next to the mask
        # (normalised convolution) matches the same pattern resampled without a mask.
        radius = np.hypot(*(np.indices(SHAPE) - 127.5))
        smooth = 100 * np.exp(-(radius**2) / (2 * 60.0**2))
        mask = detector_mask()
        settings = pk.PreprocessSettings(
            mask=mask, background=np.zeros(SHAPE, np.float32), nominal_centre=(127.5, 127.5), half_side=80.0,
            size=32, scaling="asinh", asinh_scale=1e9,  # asinh is linear here: the image is the pattern
        )
        image, _ = pk.preprocess_frame(np.where(mask, 1e9, smooth), hit=False, settings=settings)
        clean, _ = pk.preprocess_frame(smooth, hit=False, settings=dataclasses.replace(settings, mask=mask & False))
        kept = image != 0
        assert kept.sum() > 0.9 * kept.size and not kept.all()  # the gap's output pixels are masked
        near_gap = np.zeros_like(kept)
        near_gap[:, 17:22] = True  # output columns next to the detector gap
        # Up to the change of normalisation (mean and std over fewer pixels) and the
        # curvature within the filter's reach: equal. Garbage leaking in, or masked pixels
        # counted as 0 (up to half an output pixel), would be off by tens of per cent.
        a, b = image[kept], clean[kept]
        fit = np.polyfit(b, a, 1)
        assert np.abs(np.polyval(fit, clean) - image)[kept & near_gap].max() < 0.01 * np.ptp(a)

    def test_resample_square_is_gaussian_filter_then_bilinear_interpolation(self):
        import scipy.ndimage

        values = np.random.default_rng(0).normal(size=(2, 120, 110)).astype(np.float32)
        centres = np.array([[60.3, 54.8], [58.9, 56.25]])
        half_side, size, sigma = 40.0, 16, 1.2
        block = pk.resample_square(values, centres, half_side=half_side, size=size, sigma=sigma)
        steps = (np.arange(size) + 0.5) * 2 * half_side / size - half_side
        for image, frame, (cy, cx) in zip(block, values, centres):
            smooth = scipy.ndimage.gaussian_filter(frame.astype(np.float64), sigma, mode="nearest", truncate=4.0)
            rows, cols = np.meshgrid(cy + steps, cx + steps, indexing="ij")
            expected = scipy.ndimage.map_coordinates(smooth, [rows, cols], order=1)
            np.testing.assert_allclose(image, expected, atol=1e-5)
        with pytest.raises(AirysortError, match="leaves the"):
            pk.resample_square(values, centres + 30, half_side=half_side, size=size, sigma=sigma)

    def test_crop_resize_honours_a_subpixel_centre(self):
        # A linear ramp resampled around a centre: the output's mean is the ramp at the centre.
        ramp = np.add.outer(np.arange(256.0), np.zeros(256))
        image = pk.crop_resize(ramp, centre=(100.3, 128.0), half_side=40, size=32)
        assert image.shape == (32, 32)
        assert image.mean() == pytest.approx(100.3, abs=1e-3)
        assert np.allclose(np.diff(image[:, 0]), 80 / 32, atol=1e-3)

    def test_crop_resize_is_antialiased(self):
        checkerboard = (np.indices(SHAPE).sum(axis=0) % 2).astype(float)
        image = pk.crop_resize(checkerboard, centre=(127.5, 127.5), half_side=100, size=32)
        # Without the Gaussian pre-filter samples would alias to 0/1 patterns.
        assert image.std() < 0.02
        assert image.mean() == pytest.approx(0.5, abs=0.02)

    def test_normalise(self):
        rng = np.random.default_rng(0)
        image = rng.normal(5, 3, (16, 16)).astype(np.float32)
        bad = np.zeros((16, 16), bool)
        bad[:4] = True
        out = pk.normalise(image, bad)
        assert out[~bad].mean() == pytest.approx(0, abs=1e-5)
        assert out[~bad].std() == pytest.approx(1, abs=1e-5)
        assert np.all(out[bad] == 0)
        assert np.all(pk.normalise(np.ones((4, 4)), np.zeros((4, 4), bool)) == 0)


class TestPreprocessFrame:
    def settings(self, **changes):
        mask = detector_mask()
        mask[60, 60] = True  # a hot pixel known to the run
        centre = pk.nominal_centre(mask)
        options = dict(
            mask=mask,
            background=np.full(SHAPE, 0.02, np.float32),
            nominal_centre=centre,
            half_side=(pk.disc_radius(SHAPE, centre) - 8) / np.sqrt(2),
            size=64,
            saturation=60000,
        )
        options.update(changes)
        return pk.PreprocessSettings(**options)

    def test_masked_pixels_carry_no_signal(self):
        settings = self.settings()
        frame = airy_pattern(centre=(129.2, 126.4), photons=1e6)
        image, centre = pk.preprocess_frame(frame, hit=True, settings=settings)
        assert centre == pytest.approx((129.2, 126.4), abs=0.5)
        assert image.dtype == np.float32 and image.shape == (64, 64)
        valid = image != 0
        assert image[valid].mean() == pytest.approx(0, abs=1e-4)
        assert image[valid].std() == pytest.approx(1, abs=1e-3)
        # Whatever a masked pixel holds (hot, garbage) the result is the same ...
        spoiled = frame.copy()
        spoiled[settings.mask] = np.random.default_rng(1).integers(0, 50000, settings.mask.sum())
        assert np.array_equal(pk.preprocess_frame(spoiled, hit=True, settings=settings)[0], image)
        # ... and so is a saturated pixel's value, once it is saturated.
        one, two = frame.copy(), frame.copy()
        one[70, 150], two[70, 150] = 60000, 65000
        image_one, _ = pk.preprocess_frame(one, hit=True, settings=settings)
        assert np.array_equal(image_one, pk.preprocess_frame(two, hit=True, settings=settings)[0])
        assert not np.array_equal(image_one, image)  # the saturated pixel was masked

    def test_non_hits_keep_the_nominal_centre(self):
        settings = self.settings(scaling="asinh")
        frame = airy_pattern(photons=0, background=1)
        image, centre = pk.preprocess_frame(frame, hit=False, settings=settings)
        assert centre == settings.nominal_centre
        assert np.isfinite(image).all()

    def test_block_packs_images_and_centres(self):
        settings = self.settings()
        frames = np.stack([airy_pattern(centre=(128 + i, 127), photons=1e5, seed=i) for i in range(3)])
        packed = pk.preprocess_block(frames, np.array([True, False, True]), settings=settings)
        assert packed.shape == (3, 64 * 64 + 2)
        image, centre = pk.preprocess_frame(frames[2], hit=True, settings=settings)
        assert np.array_equal(packed[2, :-2], image.ravel())
        assert np.array_equal(packed[1, -2:], np.float32(settings.nominal_centre))

    def test_block_with_a_saturated_frame_equals_frame_by_frame(self):
        settings = self.settings()
        frames = np.stack([airy_pattern(centre=(128 + i, 127), photons=1e5, seed=i) for i in range(3)])
        frames[1, 90:93, 150:152] = 60000
        hits = np.array([True, True, False])
        packed = pk.preprocess_block(frames, hits, settings=settings)
        for frame, hit, row in zip(frames, hits, packed):
            image, centre = pk.preprocess_frame(frame, hit=bool(hit), settings=settings)
            assert np.array_equal(row[:-2], image.ravel()) and tuple(row[-2:]) == pytest.approx(centre)

    def test_settings_are_validated(self):
        with pytest.raises(AirysortError, match="unknown scaling"):
            self.settings(scaling="linear")
        with pytest.raises(AirysortError, match="too close to the frame edge"):
            self.settings(half_side=-1.0)


def test_background_median_of_non_hits():
    frames = np.stack([np.full((4, 4), v, np.uint16) for v in (1, 2, 3, 100, 200)])
    median = pk.background_median_block(frames, np.array([0, 0, 0, 1, 1], bool))
    assert median.shape == (1, 4, 4) and np.all(median == 2)
    assert np.isnan(pk.background_median_block(frames, np.ones(5, bool))).all()
