"""``airysort simulate``: API, label rules, detector effects, CXI layouts, Dask, ``--like``."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.errors import AirysortError
from pipeline.simulate import load_profile, simulate_beamtime, simulate_patterns
from pipeline.simulate import beamtime
from pipeline.simulate import labels as rules
from pipeline.simulate.render import Setup, expected_photons
from pipeline.simulate.scene import Shot, newton_feasible, sample_shot
from pipeline.taxonomy import CLASS_INDEX, CLASS_NAMES, multi_hot

runner = CliRunner()


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


class TestProfiles:
    @pytest.mark.parametrize("name,model", [("fermi", "msft"), ("lcls", "projection")])
    def test_shipped_profiles(self, name, model):
        profile = load_profile(name)
        assert profile.model == model
        assert profile.frame_shape == (1024, 1024)

    def test_lcls_is_small_angle(self):
        assert np.degrees(load_profile("lcls").max_angle()) < 5

    def test_at_size_keeps_the_angles(self):
        full = load_profile("fermi")
        small = full.at_size(128)
        assert small.frame_shape == (128, 128)
        assert small.max_angle() == pytest.approx(full.max_angle(), rel=0.02)
        assert small.detector["pixel_size"] == pytest.approx(8 * full.detector["pixel_size"])

    def test_yaml_file_and_errors(self, tmp_path):
        text = (tmp_path / "p.yaml")
        text.write_text("name: mine\nmodel: born\nwavelength: 4.0e-9\ndetector: {frame_shape: [64, 64]}\n")
        with pytest.raises(AirysortError, match="lacks detector"):
            load_profile(text)
        with pytest.raises(AirysortError, match="neither a shipped profile"):
            load_profile("no-such-profile")


    def test_slice_thickness_switches_msft_to_a_propagated_wave(self, tmp_path):
        from pathlib import Path

        import pipeline.simulate

        shipped = (Path(pipeline.simulate.__file__).parent / "profiles" / "fermi.yaml").read_text()
        assert load_profile("fermi").slice_thickness == pytest.approx(15e-9)  # propagated by default
        straight = tmp_path / "fermi-straight.yaml"
        straight.write_text(shipped.replace("slice_thickness: 15.0e-9", "slice_thickness: null"))
        assert load_profile(straight).slice_thickness is None
        frames, labels, _ = simulate_patterns(4, seed=3, profile="fermi", size=64)
        straight_frames, straight_labels, _ = simulate_patterns(4, seed=3, profile=straight, size=64)
        # Same shots and noise draws; only the wave inside the droplets differs.
        np.testing.assert_array_equal(labels, straight_labels)
        hits = straight_frames.reshape(4, -1).sum(axis=1) > 2 * straight_frames.reshape(4, -1).sum(axis=1).min()
        assert np.any(frames[hits] != straight_frames[hits])
        assert frames.sum() == pytest.approx(straight_frames.sum(), rel=0.2)
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(shipped.replace("model: msft", "model: born"))
        with pytest.raises(AirysortError, match="slice_thickness"):
            load_profile(wrong)


class TestLabelRules:
    def test_combination_frequencies_follow_taxonomy(self):
        combos, p = rules.combination_table(wide_angle=True, balanced=False)
        probability = dict(zip(combos, p))
        assert probability[("Spherical/Oblate", "Round")] == pytest.approx(5300 / 7264, rel=1e-6)
        totals = sum(p_i * multi_hot(c).astype(float) for c, p_i in zip(combos, p))
        real = np.array([6589, 5792, 796, 453, 242, 390, 367, 460, 218, 47, 211]) / 7264
        np.testing.assert_allclose(totals, real, atol=0.006)

    def test_balanced_groups_are_equal(self):
        from pipeline.taxonomy import coarse_group

        combos, p = rules.combination_table(wide_angle=True, balanced=True)
        groups = coarse_group(np.stack([multi_hot(c) for c in combos]))
        shares = {g: p[groups == g].sum() for g in np.unique(groups)}
        # Every simulated combination falls in one of five groups ("other" needs none of them).
        assert set(shares) == {"empty", "double", "prolate", "elliptical", "round"}
        assert all(share == pytest.approx(1 / 5) for share in shares.values())

    def test_small_angle_drops_wide_angle_labels(self):
        combos, _ = rules.combination_table(wide_angle=False, balanced=False)
        assert not any({"Bent", "Asymmetric"} & set(c) for c in combos)

    @pytest.mark.parametrize("profile_name", ["fermi", "lcls"])
    def test_every_combination_can_be_drawn(self, profile_name):
        profile = load_profile(profile_name).at_size(128)
        combos, _ = rules.combination_table(wide_angle=profile.wide_angle, balanced=False,
                                            newton=newton_feasible(profile))
        rng = np.random.default_rng(1)
        for combo in combos:
            shot = sample_shot(combo, rng, profile)
            got = rules.physical_labels(shot, wide_angle=profile.wide_angle,
                                        newton_fringe_pixels=shot.newton_period(profile))
            assert rules.label_names(got) == tuple(n for n in CLASS_NAMES if n in combo)

    def test_rules_on_hand_made_shots(self):
        def names(shot, wide=True):
            return set(rules.label_names(rules.physical_labels(shot, wide_angle=wide, newton_fringe_pixels=np.inf)))

        assert names(Shot("sphere", 300.0)) == {"Spherical/Oblate", "Round"}
        assert names(Shot(None)) == {"Empty"}
        # Pill with its axis in the detector plane: straight streak, not bent.
        assert names(Shot("capsule", 300.0, 2.5, axis_polar=np.pi / 2)) == {"Prolate", "Streak"}
        # Tilted by 30 degrees out of the plane: bent and asymmetric at wide angle only.
        tilted = Shot("capsule", 300.0, 2.5, axis_polar=np.radians(60))
        assert names(tilted) == {"Prolate", "Streak", "Bent", "Asymmetric"}
        assert names(tilted, wide=False) == {"Prolate", "Streak"}
        # Oblate droplet seen edge-on: elliptical outline.
        assert "Elliptical" in names(Shot("oblate", 300.0, 0.6, axis_polar=np.pi / 2))
        # A smaller second droplet: double rings.
        assert "DoubleRings" in names(Shot("sphere", 300.0, companion_radius=150.0,
                                           companion_offset=(900.0, 0.0, 0.0)))

    def test_asymmetric_label_matches_asymmetric_patterns(self):
        """Droplets labelled Asymmetric scatter measurably less centro-symmetrically (MSFT)."""
        from pipeline.simulate.forward import droplet_amplitude, ewald_q
        from pipeline.simulate.optics import refractive_index

        profile = load_profile("fermi")
        g = (np.arange(40) - 19.5) / 20 * np.tan(profile.max_angle())
        x, y = np.meshgrid(g, g)
        q, _ = ewald_q(x, y, distance=1.0, wavelength=profile.wavelength)
        dn = [refractive_index("helium", profile.wavelength) - 1]
        rng = np.random.default_rng(3)

        def asymmetry(combo):
            values = []
            for _ in range(4):
                shot = sample_shot(combo, rng, profile)
                shot.core_radius = 0.0
                a = droplet_amplitude(shot.bodies(), q.reshape(-1, 3), wavelength=profile.wavelength,
                                      index_minus_one=dn, model="msft")
                image = (np.abs(a) ** 2).reshape(40, 40)
                mate = image[::-1, ::-1]  # the pixel at -q_perp
                values.append(np.abs(image - mate).sum() / (image + mate).sum())
            return np.median(values)

        asymmetric = asymmetry(("Spherical/Oblate", "Elliptical", "Asymmetric"))
        assert asymmetric > 3 * asymmetry(("Spherical/Oblate", "Elliptical"))
        assert asymmetric > 3 * asymmetry(("Spherical/Oblate", "Round"))


class TestPatterns:
    def test_shapes_types_and_metadata(self):
        frames, labels, meta = simulate_patterns(6, seed=2, profile="fermi", size=48, balanced=True)
        assert frames.shape == (6, 48, 48) and frames.dtype == np.uint16
        assert labels.shape == (6, 11) and labels.dtype == np.int8
        assert set(np.unique(labels)) <= {0, 1}
        assert meta["mask"].shape == (48, 48) and meta["mask"].dtype == bool
        assert meta["pulse_energy"].shape == (6,) and np.all(meta["pulse_energy"] > 0)
        assert meta["wavelength"] == pytest.approx(13.5e-9)

    def test_reproducible_and_seed_dependent(self):
        a = simulate_patterns(3, seed=7, profile="lcls", size=48)
        b = simulate_patterns(3, seed=7, profile="lcls", size=48)
        c = simulate_patterns(3, seed=8, profile="lcls", size=48)
        np.testing.assert_array_equal(a[0], b[0])
        assert not np.array_equal(a[0], c[0])

    def test_detector_effects(self):
        profile = load_profile("lcls").at_size(64)
        frames, labels, meta = simulate_patterns(8, seed=4, profile=profile, balanced=True)
        mask = meta["mask"]
        # The gap between the pnCCD halves and the central stop are masked and dark.
        assert mask[32].all() and mask[31].all()
        assert np.abs(frames[:, mask]).mean() < 1.0
        # Empty shots hold only background; hits hold many more photons.
        empty = labels[:, CLASS_INDEX["Empty"]] == 1
        totals = frames[:, ~mask].sum(axis=1)
        if empty.any() and (~empty).any():
            assert totals[~empty].min() > 3 * totals[empty].max()
        # Hot pixels are the same in every frame (they belong to the detector).
        hot = frames.min(axis=0) > 40
        assert hot.any()

    def test_pixel_area_integration_averages_fine_fringes(self):
        """A droplet too large for the pixels gives a smooth, not aliased, pattern."""
        profile = load_profile("fermi").at_size(48)
        setup = Setup.build(profile, seed=0)
        image = expected_photons(Shot("sphere", 900.0, focus_fraction=1.0, pulse_energy=60e-6), setup)
        live = ~setup.mask
        # Radial profile of the pixel-integrated pattern decreases smoothly: few sign changes.
        yy, xx = np.indices(image.shape)
        r = np.hypot(yy - 23.5 - 3 / 21.3, xx - 23.5 + 2 / 21.3).astype(int)
        radial = np.bincount(r[live], image[live]) / np.maximum(np.bincount(r[live]), 1)
        radial = radial[radial > 0]
        assert np.all(np.diff(np.log(radial[2:])) < 0.2)


class TestBeamtime:
    def test_stacked_cxi_and_dask_matches_serial(self, tmp_path):
        from distributed import Client, LocalCluster

        serial = simulate_beamtime(tmp_path / "a.cxi", 20, size=48, seed=3, profile="lcls")
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            parallel = simulate_beamtime(tmp_path / "b.cxi", 20, size=48, seed=3, profile="lcls",
                                         client=client)
        assert serial["class_counts"] == parallel["class_counts"]
        with h5py.File(tmp_path / "a.cxi") as a, h5py.File(tmp_path / "b.cxi") as b:
            np.testing.assert_array_equal(a["entry_1/data_1/data"][()], b["entry_1/data_1/data"][()])
            assert a["entry_1/data_1/data"].chunks == (1, 48, 48)
            assert a["entry_1/result_1/labels"].shape == (20, 11)
            assert a["entry_1/instrument_1/source_1/pulse_energy"].shape == (20,)
            assert a["entry_1/instrument_1/detector_1/mask"].dtype == np.uint32
            assert a["entry_1/instrument_1/source_1/wavelength"][()] == pytest.approx(0.8266e-9)
            assert len(set(a["entry_1/experiment_identifier"][()])) == 20

    def test_block_size_does_not_change_the_result(self, tmp_path, monkeypatch):
        simulate_beamtime(tmp_path / "a.cxi", 10, size=32, seed=5, profile="lcls")
        monkeypatch.setattr(beamtime, "BLOCK", 3)
        simulate_beamtime(tmp_path / "b.cxi", 10, size=32, seed=5, profile="lcls")
        with h5py.File(tmp_path / "a.cxi") as a, h5py.File(tmp_path / "b.cxi") as b:
            np.testing.assert_array_equal(a["entry_1/data_1/data"][()], b["entry_1/data_1/data"][()])

    def test_entries_layout(self, tmp_path):
        result = simulate_beamtime(tmp_path / "e.cxi", 4, size=32, seed=1, profile="lcls", layout="entries")
        assert result["patterns"] == 4
        with h5py.File(tmp_path / "e.cxi") as h5:
            for k in range(1, 5):
                entry = h5[f"entry_{k}"]
                assert entry["instrument_1/detector_1/data"].shape == (32, 32)
                assert entry["note_1/data"].shape == (11,)
                assert entry["instrument_1/source_1/energy"][()] == pytest.approx(1.5e3 * 1.602e-19, rel=0.01)
                assert entry["instrument_1/detector_1/distance"][()] == pytest.approx(0.735)

    def test_bad_arguments(self, tmp_path):
        with pytest.raises(AirysortError, match="layout"):
            simulate_beamtime(tmp_path / "x.cxi", 2, layout="sideways")
        with pytest.raises(AirysortError, match="at least 1"):
            simulate_beamtime(tmp_path / "x.cxi", 0)
        for seed in (-1, 2**32, 1.5):  # what NumPy's generators refuse, before any work
            with pytest.raises(AirysortError, match="from 0 to 2\\*\\*32 - 1"):
                simulate_beamtime(tmp_path / "x.cxi", 2, seed=seed)
        assert not (tmp_path / "x.cxi").exists()
        with pytest.raises(AirysortError, match="is a directory; give the CXI file to write"):
            simulate_beamtime(tmp_path, 2)  # before simulating, not when the result is moved there


class TestCommandLine:
    def test_simulate_then_ingest_gives_a_labelled_store(self, tmp_path):
        out = tmp_path / "sim.cxi"
        result = runner.invoke(app, ["simulate", str(out), "--n", "24", "--size", "48", "--seed", "2",
                                     "--cluster", "local-threads", "--json"])
        assert result.exit_code == 0, result.output
        summary = _last_json(result.stdout)
        assert summary["patterns"] == 24 and summary["model"] == "msft"
        assert sum(summary["class_counts"].values()) >= 24
        store = tmp_path / "s.zarr"
        result = runner.invoke(app, ["ingest", str(store), str(out), "--cluster", "local-threads", "--json"])
        assert result.exit_code == 0, result.output
        assert _last_json(result.stdout)["ingested"] == 24
        from pipeline.store import open_store

        ds = open_store(store)
        with h5py.File(out) as h5:
            np.testing.assert_array_equal(ds["label"].values, h5["entry_1/result_1/labels"][()])
        assert ds.attrs["wavelength"] == pytest.approx(13.5e-9)
        # Another beamtime (another seed) has other shot ids: both fit in one store.
        other = tmp_path / "other.cxi"
        assert runner.invoke(app, ["simulate", str(other), "--n", "24", "--size", "48", "--seed", "3",
                                   "--cluster", "local-threads"]).exit_code == 0
        result = runner.invoke(app, ["ingest", str(store), str(other), "--cluster", "local-threads"])
        assert result.exit_code == 0 and "WARNING" not in result.output
        assert len(set(open_store(store)["shot_id"].values.tolist())) == 48

    def test_slice_thickness_option(self, tmp_path):
        out = tmp_path / "wave.cxi"
        result = runner.invoke(app, ["simulate", str(out), "--n", "3", "--size", "32", "--slice-thickness", "1e-8",
                                     "--cluster", "local-threads", "--json"])
        assert result.exit_code == 0, result.output
        assert _last_json(result.output)["slice_thickness"] == pytest.approx(1e-8)
        with h5py.File(out) as h5:
            assert h5.attrs["slice_thickness"] == pytest.approx(1e-8)
            assert h5["entry_1/data_1/data"].shape == (3, 32, 32)
        # 0: straight lines instead of the fermi profile's propagated wave.
        straight = runner.invoke(app, ["simulate", str(tmp_path / "straight.cxi"), "--n", "2", "--size", "32",
                                       "--slice-thickness", "0", "--cluster", "local-threads", "--json"])
        assert straight.exit_code == 0, straight.output
        assert _last_json(straight.output)["slice_thickness"] is None
        # The small-angle profile has no MSFT to propagate: one clear error line, no file.
        refused = runner.invoke(app, ["simulate", str(tmp_path / "no.cxi"), "--n", "3", "--profile", "lcls",
                                      "--slice-thickness", "1e-8", "--cluster", "local-threads"])
        assert refused.exit_code == 1
        assert "slice_thickness" in refused.output and "projection" in refused.output
        assert not (tmp_path / "no.cxi").exists()

    def test_detector_seed_gives_several_beamtimes_one_detector(self, tmp_path):
        """Hot pixels belong to the detector: with one --detector-seed, beamtimes of other
        seeds have them in the same place; without it, each beamtime's seed draws them."""
        from pipeline.simulate import detector
        from pipeline.simulate.beamtime import resolve_profile

        runs = {"a": ["--seed", "1", "--detector-seed", "5"], "b": ["--seed", "2", "--detector-seed", "5"],
                "c": ["--seed", "2"]}
        frames, attrs = {}, {}
        for name, options in runs.items():
            result = runner.invoke(app, ["simulate", str(tmp_path / f"{name}.cxi"), "--n", "3", "--size", "64",
                                         "--profile", "lcls", *options, "--cluster", "local-threads"])
            assert result.exit_code == 0, result.output
            with h5py.File(tmp_path / f"{name}.cxi") as h5:
                frames[name], attrs[name] = h5["entry_1/data_1/data"][()].reshape(3, -1), dict(h5.attrs)
        profile = resolve_profile("lcls", size=64)
        on_sensor = ~detector.static_mask(profile).ravel()  # the hole and the gap have no hot pixels
        shared, own = (hot[on_sensor[hot]] for hot in (detector.hot_pixels(profile, s)[0] for s in (5, 2)))
        assert len(shared) > 10 and len(set(shared) & set(own)) < len(shared) // 2
        low = profile.detector["hot_pixel_counts"][0] - 1
        for name, hot in (("a", shared), ("b", shared), ("c", own)):
            assert (frames[name][:, hot] >= low).all(), name
        assert attrs["a"]["detector_seed"] == attrs["b"]["detector_seed"] == 5 and "detector_seed" not in attrs["c"]
        refused = runner.invoke(app, ["simulate", str(tmp_path / "x.cxi"), "--n", "1", "--detector-seed", "-1",
                                      "--cluster", "local-threads"])
        assert refused.exit_code == 1 and "detector seed -1 must be an integer from 0 to 2**32 - 1" in refused.output

    def test_bad_profile_is_one_error_line(self, tmp_path):
        result = runner.invoke(app, ["simulate", str(tmp_path / "x.cxi"), "--n", "2", "--profile", "nope",
                                     "--cluster", "local-threads"])
        assert result.exit_code == 1
        assert "ERROR:" in result.output and "nope" in result.output

    def test_like_copies_geometry_mask_and_count_range(self, tmp_path):
        real = tmp_path / "real.cxi"
        rng = np.random.default_rng(0)
        mask = np.zeros((40, 56), np.uint32)
        mask[:, 27:29] = 1  # a vertical gap
        frames = rng.poisson(2.0, (10, 40, 56)).astype(np.float32)
        frames[:, 18:22, 26:30] += 500.0  # bright centre
        with h5py.File(real, "w") as h5:
            h5["entry_1/data_1/data"] = frames
            h5["entry_1/instrument_1/detector_1/distance"] = 0.5
            h5["entry_1/instrument_1/detector_1/x_pixel_size"] = 100e-6
            h5["entry_1/instrument_1/detector_1/y_pixel_size"] = 100e-6
            h5["entry_1/instrument_1/detector_1/mask"] = mask
            h5["entry_1/instrument_1/source_1/wavelength"] = 1.0e-9
        out = tmp_path / "like.cxi"
        result = runner.invoke(app, ["simulate", str(out), "--n", "12", "--like", str(real), "--profile", "lcls",
                                     "--cluster", "local-threads", "--json"])
        assert result.exit_code == 0, result.output
        assert _last_json(result.stdout)["frame_shape"] == [40, 56]
        with h5py.File(out) as h5:
            data = h5["entry_1/data_1/data"][()]
            assert data.dtype == np.float32
            np.testing.assert_array_equal(h5["entry_1/instrument_1/detector_1/mask"][()] != 0, mask != 0)
            assert h5["entry_1/instrument_1/source_1/wavelength"][()] == pytest.approx(1e-9)
            assert h5["entry_1/instrument_1/detector_1/distance"][()] == pytest.approx(0.5)
            labels = h5["entry_1/result_1/labels"][()]
        hits = labels[:, CLASS_INDEX["Empty"]] == 0
        levels = [np.percentile(frame[mask == 0], 99.5) for frame in data[hits]]
        real_level = np.median([np.percentile(f[mask == 0], 99.5) for f in frames])
        # Same order of magnitude as the real file (shot-to-shot fluctuations are large).
        assert real_level / 10 < np.median(levels) < real_level * 10
        assert data.max() <= frames.max()  # saturates where the real detector did


    @pytest.mark.parametrize("half_angle_degrees", [2.0, 20.0])
    def test_like_follows_the_geometry_from_the_default_profile(self, tmp_path, half_angle_degrees):
        """A file with only frames (CXIDB 94 style) or a wide-angle one, from the default
        (MSFT with slices) profile: projection without slices, or MSFT with them."""
        from pipeline.simulate.beamtime import resolve_profile

        real = tmp_path / "real.cxi"
        frames = np.random.default_rng(1).poisson(3.0, (4, 48, 48)).astype(np.float32)
        with h5py.File(real, "w") as h5:
            for k, frame in enumerate(frames, start=1):
                if k != 2:  # entry_2 lost its frame: ingest rejects it, --like skips it
                    h5[f"entry_{k}/instrument_1/detector_1/data"] = frame
                h5[f"entry_{k}/experiment_identifier"] = f"shot{k}"
            if half_angle_degrees > 10:
                half_diagonal = 0.5 * np.hypot(48, 48) * 75e-6
                h5["entry_1/instrument_1/detector_1/distance"] = half_diagonal / np.tan(np.radians(half_angle_degrees))
                h5["entry_1/instrument_1/detector_1/x_pixel_size"] = 75e-6
                h5["entry_1/instrument_1/detector_1/y_pixel_size"] = 75e-6
        profile = resolve_profile(like=real)
        if half_angle_degrees > 10:
            assert (profile.model, profile.slice_thickness) == ("msft", load_profile("fermi").slice_thickness)
        else:
            assert (profile.model, profile.slice_thickness) == ("projection", None)
        out = tmp_path / "like.cxi"
        result = runner.invoke(app, ["simulate", str(out), "--n", "3", "--like", str(real),
                                     "--cluster", "local-threads", "--json"])
        assert result.exit_code == 0, result.output
        assert _last_json(result.stdout)["frame_shape"] == [48, 48]


class TestReadOut:
    """Photon statistics and read-out chain (Numba loops drawing from the shot's generator)."""

    @pytest.mark.parametrize("mean", [0.02, 0.7, 5.0, 40.0])  # 40: numpy's sampler (bright pixels)
    def test_poisson_counts_and_gaussian_read_noise(self, mean):
        from pipeline.simulate import detector

        profile = load_profile("lcls").at_size(256)
        mask = np.zeros(profile.frame_shape, dtype=bool)
        mask[:64] = True
        photons = np.full(profile.frame_shape, mean / profile.detector["quantum_efficiency"], np.float32)
        rng = np.random.default_rng(5)
        frames = np.stack([detector.read_out(photons, profile, rng, mask=mask, hot=(np.zeros(0, int), np.zeros(0)))
                           for _ in range(4)])
        noise = profile.detector["read_noise"]
        live, dead = frames[:, ~mask], frames[:, mask]
        n = live.size
        # Mean and variance of Poisson(mean) + N(0, noise^2), to 5 standard errors.
        assert abs(live.mean() - mean) < 5 * np.sqrt((mean + noise**2) / n)
        variance_error = np.sqrt(2 * (mean + noise**2) ** 2 / n + mean / n)
        assert abs(live.var() - (mean + noise**2)) < 5 * variance_error
        # Masked pixels: read noise only.
        assert abs(dead.mean()) < 5 * noise / np.sqrt(dead.size)
        assert dead.std() == pytest.approx(noise, rel=0.02)
        # Integer photon counts under the noise: the nearest integers hold the Poisson law.
        counts = np.rint(live).astype(int)
        p0 = np.exp(-mean)
        assert abs((counts == 0).mean() - p0) < 5 * np.sqrt(p0 * (1 - p0) / n) + 1e-4

    def test_mcp_gain_is_gamma_per_photon(self):
        from pipeline.simulate import detector

        profile = load_profile("fermi").at_size(128)
        det = profile.detector
        mask = np.zeros(profile.frame_shape, dtype=bool)
        mean = 2.0
        photons = np.full(profile.frame_shape, mean / det["quantum_efficiency"])
        rng = np.random.default_rng(1)
        frames = np.stack([detector.read_out(photons, profile, rng, mask=mask, hot=(np.zeros(0, int), np.zeros(0)))
                           for _ in range(4)]).astype(float)
        unsaturated = frames < det["saturation"]
        assert unsaturated.mean() > 0.99
        # n ~ Poisson(mean), signal ~ Gamma(n k, g / k): mean n g, variance mean g^2 (1 + 1/k).
        g, k = det["gain"], det["gain_shape"]
        expected_mean = mean * g + det["dark_level"]
        assert frames.mean() == pytest.approx(expected_mean, rel=0.02)
        expected_var = mean * g**2 * (1 + 1 / k) + det["read_noise"] ** 2
        assert frames.var() == pytest.approx(expected_var, rel=0.05)
