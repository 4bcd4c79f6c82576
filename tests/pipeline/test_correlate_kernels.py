"""Tests of the angular cross-correlation kernels."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import correlate_kernels as ck
from pipeline.errors import AirysortError
from tests.pipeline.test_preprocess_kernels import SHAPE, airy_pattern, detector_mask

CENTRE = (127.5, 127.5)


def settings(**changes):
    options = dict(
        mask=detector_mask(),
        background=np.zeros(SHAPE, np.float32),
        r_min=9.0,
        r_max=120.0,
        n_q=24,
        n_phi=64,
    )
    options.update(changes)
    return ck.CorrelateSettings(**options)


class TestPolarResample:
    def test_rings_of_a_radial_function(self):
        radius = np.hypot(*(np.indices(SHAPE) - np.array(CENTRE)[:, None, None]))
        values, weight = ck.polar_resample(
            radius, np.zeros(SHAPE, bool), centre=CENTRE, r_min=10, r_max=110, n_q=10, n_phi=32
        )
        assert values.shape == weight.shape == (10, 32)
        assert np.all(weight == 1)
        expected = 10 + 10 * (np.arange(10) + 0.5)  # ring middles
        assert np.allclose(values, expected[:, None], atol=0.05)

    def test_masked_cells_have_no_weight(self):
        mask = np.zeros(SHAPE, bool)
        mask[:128] = True  # the upper half (rows < 128): angles in (π, 2π)
        values, weight = ck.polar_resample(
            np.ones(SHAPE), mask, centre=CENTRE, r_min=10, r_max=110, n_q=4, n_phi=16
        )
        assert np.all(weight[:, 1:7] == 1) and np.all(weight[:, 9:15] == 0)

    def test_rejects_bad_radii(self):
        with pytest.raises(AirysortError, match="r_min=50"):
            ck.polar_resample(np.ones(SHAPE), np.zeros(SHAPE, bool), centre=CENTRE, r_min=50, r_max=20, n_q=4, n_phi=16)


class TestAngularCorrelation:
    def test_mask_correction_recovers_the_modulation(self):
        # Rings modulated as 1 + 0.5 cos(2φ): C(Δ) = cos(2Δ), estimated from the valid
        # pairs only when a fifth of the cells (scattered, like gaps and hot pixels) is masked.
        n_phi = 64
        phi = 2 * np.pi * np.arange(n_phi) / n_phi
        truth = np.cos(2 * phi)[None, :]
        values = 1 + 0.5 * truth * np.ones((3, 1))
        weight = np.ones_like(values)
        weight[:, np.random.default_rng(1).choice(n_phi, 13, replace=False)] = 0.0
        values = np.where(weight > 0, values, 1e6)  # masked cells must not count
        correlation = ck.angular_correlation(values, weight)
        assert np.abs(correlation - truth).max() < 0.1
        # Without the correction (masked cells read as zeros) the estimate is far off.
        naive = ck.angular_correlation(np.where(weight > 0, values, 0.0), np.ones_like(values))
        assert np.abs(naive - truth).max() > 0.3

    def test_exactly_invariant_to_rotation_by_whole_bins(self):
        rng = np.random.default_rng(0)
        values, weight = rng.random((5, 32)), (rng.random((5, 32)) > 0.2).astype(float)
        auto = ck.angular_correlation(values, weight)
        rolled = ck.angular_correlation(np.roll(values, 7, axis=1), np.roll(weight, 7, axis=1))
        assert np.allclose(auto, rolled, atol=1e-6)

    def test_cross_variant_contains_the_autocorrelation(self):
        rng = np.random.default_rng(1)
        values, weight = rng.random((6, 32)), np.ones((6, 32))
        cross = ck.angular_correlation(values, weight, cross=True)
        auto = ck.angular_correlation(values, weight)
        assert cross.shape == (6, 6, 32)
        assert np.allclose(np.diagonal(cross, axis1=0, axis2=1).T, auto, atol=1e-6)
        assert np.allclose(cross[..., 0], cross[..., 0].T, atol=1e-6)  # C(q1,q2,0) = C(q2,q1,0)
        assert np.all(np.abs(cross) <= 1)

    def test_empty_rings_give_zeros_not_nans(self):
        correlation = ck.angular_correlation(np.zeros((2, 16)), np.zeros((2, 16)))
        assert np.array_equal(correlation, np.zeros((2, 16), np.float32))


class TestCorrelateFrame:
    def test_invariant_to_in_plane_rotation(self):
        # The same elliptical droplet turned by 37°, on a detector whose mask does not turn.
        first = airy_pattern(ellipticity=1.6, angle=0.2, photons=1e7, noise=False)
        turned = airy_pattern(ellipticity=1.6, angle=0.2 + np.radians(37), photons=1e7, noise=False)
        rounder = airy_pattern(ellipticity=1.2, angle=0.2, photons=1e7, noise=False)
        s = settings()
        a, b, c = (ck.correlate_frame(f, centre=CENTRE, settings=s) for f in (first, turned, rounder))
        assert a.shape == (24, 64) and a.dtype == np.float32
        rotation_change = np.abs(a - b).mean()
        shape_change = np.abs(a - c).mean()
        # Not exactly 0: cells are 5.6° wide and 37° is not a whole number of them.
        assert rotation_change < 0.05
        assert shape_change > 5 * rotation_change

    def test_saturated_and_masked_pixels_do_not_count(self):
        frame = airy_pattern(ellipticity=1.4, photons=1e6, seed=3).astype(np.float64)
        s = settings(saturation=60000)
        reference = ck.correlate_frame(frame, centre=CENTRE, settings=s)
        spoiled = frame.copy()
        spoiled[s.mask] = 1e9
        spoiled[100, 160] = 65000
        changed = ck.correlate_frame(spoiled, centre=CENTRE, settings=s)
        assert np.abs(changed - reference).max() < 0.05

    def test_block(self):
        frames = np.stack([airy_pattern(seed=i, centre=(127.5 + i, 127.5)) for i in range(3)])
        centres = np.array([[127.5 + i, 127.5] for i in range(3)])
        s = settings(variant="cross", n_q=8, n_phi=16)
        block = ck.correlate_block(frames, centres, settings=s)
        assert block.shape == (3, 8, 8, 16)
        assert np.array_equal(block[2], ck.correlate_frame(frames[2], centre=tuple(centres[2]), settings=s))

    @pytest.mark.parametrize("sub_block", [1, 3])  # the default, and all frames in one gather
    def test_block_equals_frame_by_frame_near_the_edge_and_saturated(self, monkeypatch, sub_block):
        monkeypatch.setattr(ck, "SUB_BLOCK", sub_block)
        frames = np.stack([airy_pattern(seed=i, photons=1e6, centre=(127.5 + i, 127.5)) for i in range(3)])
        frames[1, 130:132, 140:142] = 65000
        # The last centre puts the outer rings off the frame: samples there do not count.
        centres = np.array([[127.5, 127.5], [128.5, 127.5], [127.5, 60.0]])
        s = settings(n_q=8, n_phi=16, saturation=60000)
        block = ck.correlate_block(frames, centres, settings=s)
        assert np.isfinite(block).all()
        for frame, centre, row in zip(frames, centres, block):
            assert np.array_equal(row, ck.correlate_frame(frame, centre=tuple(centre), settings=s))
        _, weight = ck.polar_resample(frames[2], s.mask, centre=(127.5, 60.0), r_min=s.r_min, r_max=s.r_max, n_q=8,
                                      n_phi=16)
        assert weight[-1].min() == 0 and weight[0].max() == 1

    def test_unknown_variant(self):
        with pytest.raises(AirysortError, match="unknown correlation variant 'triple'"):
            settings(variant="triple")
