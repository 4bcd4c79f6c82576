"""Peer validation of the simulator's physics against independent codes from PyPI.

- miepython: exact Mie scattering of a helium sphere (MSFT, wide angle);
- sasmodels: analytic small-angle form factors of an ellipsoid and a capped cylinder
  (projection model);
- periodictable: Henke optical constants;
- a brute-force voxel MSFT sum (the column-analytic kernel must equal it);
- Friedel symmetry: exact in projection, broken by MSFT on a tilted droplet, more
  so with absorption.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline.simulate.forward import droplet_amplitude, ewald_q
from pipeline.simulate.optics import refractive_index
from pipeline.simulate.particles import Body, column_segments, droplet_bodies, rotation_matrix
from pipeline.simulate.profile import load_profile

LAMBDA = 13.5e-9
K = 2 * np.pi / 13.5  # 1/nm


def _mie_check(radius_nm: float, max_angle_deg: float, *, index_minus_one=None, **options):
    """RMS and mean log10 error of MSFT (``options`` of droplet_amplitude) against exact Mie."""
    miepython = pytest.importorskip("miepython")
    n = refractive_index("helium", LAMBDA) if index_minus_one is None else 1 + index_minus_one
    theta = np.radians(np.linspace(0.2, max_angle_deg, 1500))
    # Perpendicular to the (horizontal) polarisation: Mie's |S1|^2, no polarisation factor.
    q = np.stack([0 * theta, K * np.sin(theta), K * (np.cos(theta) - 1)], axis=1)
    sphere = Body("ellipsoid", np.zeros(3), np.eye(3), (radius_nm,) * 3)
    amplitude = droplet_amplitude([sphere], q, wavelength=LAMBDA, index_minus_one=[n - 1], model="msft", **options)
    # dsigma/dOmega = (k^2 / 2 pi)^2 |A|^2 = |S1|^2 / k^2; miepython uses m = n' - i n''.
    simulated = (K**2 / (2 * np.pi)) ** 2 * np.abs(amplitude) ** 2 * K**2
    s1, _ = miepython.S1_S2(np.conj(n), K * radius_nm, np.cos(theta), norm="wiscombe")
    error = np.log10(simulated) - np.log10(np.abs(s1) ** 2)
    return np.sqrt(np.mean(error**2)), abs(np.mean(error))


class TestMSFTAgainstMie:
    def test_fermi_profile_reaches_30_degrees(self):
        assert np.degrees(load_profile("fermi").max_angle()) == pytest.approx(30.0, abs=0.5)

    def test_250nm_sphere_to_30_degrees(self):
        rms, bias = _mie_check(250.0, 30.0)
        # Absolute scale (no fitted factor) is right to 3 %, the shape to 0.08 dex.
        assert bias < 0.015
        assert rms < 0.08

    def test_500nm_sphere_straight_line(self):
        # With the incoming wave in straight lines MSFT meets the 0.05 target
        # within 15 degrees; out to 30 degrees it deviates from exact Mie by 0.15 dex RMS
        # (refraction shifts the deep minima). Both limits are asserted so that
        # regressions show.
        rms_15, bias = _mie_check(500.0, 15.0)
        rms_30, _ = _mie_check(500.0, 30.0)
        assert bias < 0.02
        assert rms_15 < 0.05
        assert rms_30 < 0.16

    def test_500nm_sphere_as_shipped_meets_the_target_to_30_degrees(self):
        # The check: RMS log10 error < 0.05 up to the fermi profile's 30 degrees,
        # with the incoming wave propagated through the droplet as the shipped profile
        # does (15 nm slices: measured 0.042) and in 10 nm slices (0.037).
        shipped = load_profile("fermi").slice_thickness
        assert shipped is not None
        for thickness_nm in (shipped * 1e9, 10.0):
            rms, bias = _mie_check(500.0, 30.0, slice_thickness=thickness_nm)
            assert rms < 0.05
            assert bias < 0.01

    def test_propagated_msft_converges_to_mie(self):
        # Finer slices and columns bring it closer (0.048 -> 0.018 measured): the
        # remaining difference is numerical, not a missing physical effect.
        coarse, _ = _mie_check(500.0, 30.0, slice_thickness=20.0)
        fine, _ = _mie_check(500.0, 30.0, slice_thickness=10.0, oversample=3.0)
        assert fine < 0.03
        assert fine < 0.6 * coarse

    @pytest.mark.parametrize("index_minus_one", [-0.02 + 0.002j, 0.01 + 0.001j])
    def test_propagation_captures_strong_refraction(self, index_minus_one):
        # A 300 nm sphere with 5x helium's refraction, diverging (n < 1) and focusing
        # (n > 1): straight lines miss by 0.15-0.20 dex, propagation by < 0.05.
        straight, _ = _mie_check(300.0, 30.0, index_minus_one=index_minus_one)
        propagated, _ = _mie_check(300.0, 30.0, index_minus_one=index_minus_one, slice_thickness=10.0)
        assert straight > 0.14
        assert propagated < 0.05

    def test_born_is_worse_than_msft(self):
        miepython = pytest.importorskip("miepython")
        n = refractive_index("helium", LAMBDA)
        theta = np.radians(np.linspace(0.5, 20, 400))
        q = np.stack([0 * theta, K * np.sin(theta), K * (np.cos(theta) - 1)], axis=1)
        sphere = Body("ellipsoid", np.zeros(3), np.eye(3), (500.0,) * 3)
        s1, _ = miepython.S1_S2(np.conj(n), K * 500.0, np.cos(theta), norm="wiscombe")
        errors = {}
        for model in ("born", "msft"):
            a = droplet_amplitude([sphere], q, wavelength=LAMBDA, index_minus_one=[n - 1], model=model)
            sim = (K**2 / (2 * np.pi)) ** 2 * np.abs(a) ** 2 * K**2
            errors[model] = np.sqrt(np.mean((np.log10(sim) - np.log10(np.abs(s1) ** 2)) ** 2))
        assert errors["msft"] < errors["born"] / 3


@pytest.mark.parametrize("shape", ["core_shell", "dumbbell"])
def test_propagated_msft_equals_straight_msft_without_refraction(shape):
    """With a vanishing index contrast the wave is not bent: both MSFT variants agree.

    Two bodies give columns of several segments (a xenon core inside helium; two
    overlapping spheres), so the partial and whole-slice pieces and segments of
    one slice are all exercised.
    """
    scale = 1e-6  # dn ~ 1e-9: k dn times the droplet's depth is ~1e-6 rad
    if shape == "core_shell":
        bodies = [Body("ellipsoid", np.zeros(3), rotation_matrix(0.4, 1.0, 0.3), (160.0, 120.0, 140.0), material=0),
                  Body("ellipsoid", np.array([20.0, -10.0, 15.0]), np.eye(3), (40.0, 40.0, 40.0), material=1)]
        dn = [scale * (-3.9e-3 + 1.2e-3j), scale * (-2e-2 + 3e-2j)]
    else:
        bodies = [Body("ellipsoid", np.array([0.0, 0.0, -70.0]), np.eye(3), (100.0,) * 3),
                  Body("ellipsoid", np.array([30.0, 20.0, 80.0]), np.eye(3), (90.0,) * 3)]
        dn = [scale * (-3.9e-3 + 1.2e-3j)]
    theta, phi = np.meshgrid(np.radians(np.linspace(1, 30, 12)), np.radians(np.linspace(0, 330, 12)))
    q = np.stack([K * np.sin(theta) * np.cos(phi), K * np.sin(theta) * np.sin(phi), K * (np.cos(theta) - 1)], -1)
    straight = droplet_amplitude(bodies, q, wavelength=LAMBDA, index_minus_one=dn, model="msft")
    propagated = droplet_amplitude(bodies, q, wavelength=LAMBDA, index_minus_one=dn, model="msft",
                                   slice_thickness=7.0)
    np.testing.assert_allclose(propagated, straight, rtol=0, atol=1e-4 * np.abs(straight).max())


def test_slice_thickness_needs_msft():
    sphere = Body("ellipsoid", np.zeros(3), np.eye(3), (100.0,) * 3)
    q = np.zeros((1, 3))
    for model, thickness in (("born", 10.0), ("msft", 0.0), ("msft", -5.0)):
        with pytest.raises(ValueError, match="slice_thickness"):
            droplet_amplitude([sphere], q, wavelength=LAMBDA, index_minus_one=[-1e-3], model=model,
                              slice_thickness=thickness)


def test_msft_kernel_equals_brute_force_voxel_sum():
    """The column-analytic MSFT equals the textbook slice sum on a fine voxel grid."""
    dn = -3.9e-2 + 1.2e-2j  # exaggerated so that refraction and absorption matter a lot
    semi = (100.0, 80.0, 110.0)
    body = Body("ellipsoid", np.zeros(3), np.eye(3), semi)
    theta = np.radians([3.0, 10.0, 20.0])
    phi = np.radians(40.0)
    q = np.stack([K * np.sin(theta) * np.cos(phi), K * np.sin(theta) * np.sin(phi), K * (np.cos(theta) - 1)], 1)
    ours = droplet_amplitude([body], q, wavelength=LAMBDA, index_minus_one=[dn], model="msft")
    h = 1.5
    grid = np.arange(-120.0, 120.0, h) + h / 2
    x, y, z = np.meshgrid(grid, grid, grid, indexing="ij")
    rho = np.where((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1, dn, 0)
    rho_eff = rho * np.exp(1j * K * (np.cumsum(rho, axis=2) * h - rho * h / 2))
    brute = np.array([np.sum(rho_eff * np.exp(-1j * (qq[0] * x + qq[1] * y + qq[2] * z))) * h**3 for qq in q])
    np.testing.assert_allclose(np.abs(ours), np.abs(brute), rtol=0.02)


@pytest.fixture(scope="module")
def grid():
    """Small-angle (qx, qy) grid (1/nm) covering several fringes of the test bodies."""
    g = np.linspace(-0.06, 0.06, 48)
    qx, qy = np.meshgrid(g, g)
    return qx.ravel(), qy.ravel()


class TestProjectionAgainstSasmodels:
    def _sasmodels(self, name, params, grid):
        sasmodels_core = pytest.importorskip("sasmodels.core")
        from sasmodels.direct_model import call_kernel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = sasmodels_core.load_model(name).make_kernel([grid[0] / 10, grid[1] / 10])  # 1/Angstrom
            return call_kernel(kernel, dict(params, sld=1.0, sld_solvent=0.0, scale=1.0, background=0.0))

    def _ours(self, body, grid):
        q = np.stack([grid[0], grid[1], np.zeros_like(grid[0])], axis=1)
        a = droplet_amplitude([body], q, wavelength=1e-9, index_minus_one=[1e-5], model="projection")
        return np.abs(a) ** 2

    @pytest.mark.parametrize("theta,phi", [(60, 30), (90, 0), (30, 120)])
    def test_ellipsoid(self, grid, theta, phi):
        reference = self._sasmodels("ellipsoid", dict(radius_polar=600.0, radius_equatorial=300.0,
                                                      theta=theta, phi=phi), grid)
        body = Body("ellipsoid", np.zeros(3), rotation_matrix(np.radians(theta), np.radians(phi)), (60.0, 30.0, 30.0))
        r = np.corrcoef(np.log10(self._ours(body, grid)), np.log10(reference))[0, 1]
        assert r > 0.99

    @pytest.mark.parametrize("theta,phi", [(60, 30), (90, 0)])
    def test_capped_cylinder(self, grid, theta, phi):
        reference = self._sasmodels("capped_cylinder", dict(radius=200.0, radius_cap=200.0, length=600.0,
                                                            theta=theta, phi=phi), grid)
        body = Body("capsule", np.zeros(3), rotation_matrix(np.radians(theta), np.radians(phi)), (30.0, 20.0, 20.0))
        r = np.corrcoef(np.log10(self._ours(body, grid)), np.log10(reference))[0, 1]
        assert r > 0.99


class TestFriedel:
    @staticmethod
    def _asymmetry(model, dn):
        g = (np.arange(48) - 23.5) / 24 * np.tan(np.radians(30))
        x, y = np.meshgrid(g, g)
        q, _ = ewald_q(x, y, distance=1.0, wavelength=LAMBDA)
        body = Body("ellipsoid", np.zeros(3), rotation_matrix(np.radians(50), np.radians(20)), (350.0, 200.0, 250.0))
        intensity = np.abs(droplet_amplitude([body], q.reshape(-1, 3), wavelength=LAMBDA,
                                             index_minus_one=[dn], model=model)) ** 2
        intensity = intensity.reshape(48, 48)
        mate = intensity[::-1, ::-1]  # pixel (i, j) <-> (-q_perp)
        return np.abs(intensity - mate).sum() / (intensity + mate).sum()

    def test_projection_is_centrosymmetric(self):
        assert self._asymmetry("projection", -3.9e-3 + 1.23e-3j) < 1e-9

    def test_msft_breaks_friedel_more_with_absorption(self):
        transparent = self._asymmetry("msft", -3.9e-3 + 0j)
        absorbing = self._asymmetry("msft", -3.9e-3 + 1.23e-3j)
        assert transparent > 3e-3
        assert absorbing > transparent * 1.03


class TestOptics:
    def test_helium_at_fermi_wavelength(self):
        n = refractive_index("helium", 13.5e-9)
        assert 1 - n.real == pytest.approx(3.93e-3, rel=0.01)  # physics.md: ~3.9e-3
        assert n.imag == pytest.approx(1.23e-3, rel=0.01)

    @pytest.mark.parametrize("wavelength", [30e-9, 13.5e-9, 4e-9, 0.8266e-9])
    def test_against_periodictable(self, wavelength):
        xsf = pytest.importorskip("periodictable.xsf")
        for material, formula, density in (("helium", "He", 0.145), ("xenon", "Xe", 3.64)):
            ours = refractive_index(material, wavelength)
            theirs = xsf.index_of_refraction(formula, density=density, wavelength=wavelength * 1e10)
            assert 1 - ours.real == pytest.approx(1 - theirs.real, rel=2e-3)
            assert ours.imag == pytest.approx(-theirs.imag, rel=2e-3)


@pytest.mark.parametrize("shape,aspect", [("sphere", 1.0), ("oblate", 0.6), ("prolate", 1.8),
                                          ("capsule", 2.4), ("dumbbell", 1.7), ("triaxial", 0.7)])
def test_shapes_keep_the_volume_of_their_radius(shape, aspect):
    bodies = droplet_bodies(shape, 300.0, aspect=aspect, triaxial=1.2, axis_polar=0.7, axis_azimuth=0.4)
    g = np.arange(-1000.0, 1000.0, 5.0)
    x, y = np.meshgrid(g, g)
    start, end, material = column_segments(bodies, x.ravel(), y.ravel())
    volume = ((end - start) * (material >= 0)).sum() * 25.0
    assert volume == pytest.approx(4 / 3 * np.pi * 300.0**3, rel=2e-3)


def test_exact_ellipsoid_projection_matches_the_column_engine():
    """The projection fast path (analytic form factor) equals the generic column sum."""
    body = Body("ellipsoid", np.array([30.0, -20.0, 10.0]), rotation_matrix(0.7, 0.4, 0.3), (300.0, 200.0, 150.0))
    g = np.linspace(-0.06, 0.06, 32)
    qx, qy = np.meshgrid(g, g)
    q = np.stack([qx.ravel(), qy.ravel(), np.zeros(qx.size)], axis=1)
    dn = 1e-5 + 1e-6j
    fast = droplet_amplitude([body], q, wavelength=1e-9, index_minus_one=[dn], model="projection")
    # A vanishing second body forces the column engine.
    speck = Body("ellipsoid", np.zeros(3), np.eye(3), (1e-3, 1e-3, 1e-3), material=1)
    column = droplet_amplitude([body, speck], q, wavelength=1e-9, index_minus_one=[dn, dn], model="projection")
    assert np.abs(fast - column).max() < 1e-3 * np.abs(fast).max()
    assert np.corrcoef(np.log10(np.abs(fast) ** 2), np.log10(np.abs(column) ** 2))[0, 1] > 0.98


def test_projection_of_a_droplet_with_a_core_matches_the_column_engine():
    droplet = Body("ellipsoid", np.zeros(3), rotation_matrix(0.4, 0.2), (300.0, 260.0, 240.0))
    core = Body("ellipsoid", np.array([40.0, -30.0, 20.0]), np.eye(3), (60.0, 60.0, 60.0), material=1)
    g = np.linspace(-0.05, 0.05, 32)
    qx, qy = np.meshgrid(g, g)
    q = np.stack([qx.ravel(), qy.ravel(), np.zeros(qx.size)], axis=1)
    dn = [1e-5 + 1e-7j, 2e-4 + 1e-4j]
    fast = droplet_amplitude([droplet, core], q, wavelength=1e-9, index_minus_one=dn, model="projection")
    # The same bodies as a capsule of zero length force the column engine.
    as_capsule = Body("capsule", core.center, np.eye(3), (0.0, 60.0, 60.0), material=1)
    column = droplet_amplitude([droplet, as_capsule], q, wavelength=1e-9, index_minus_one=dn, model="projection")
    assert np.abs(fast - column).max() < 2e-3 * np.abs(fast).max()


@pytest.mark.parametrize("shape,aspect", [("capsule", 2.4), ("dumbbell", 1.8)])
def test_fast_projection_path_matches_a_brute_force_reference(shape, aspect):
    """The Numba cell averages, float32 NUFFT and centred grid of the projection model
    against a slow reference: 4 x 4 sub-columns in every cell (NumPy chords), float64
    NUFFT at 1e-9, on the pixel centres of the lcls profile at 256^2. Log intensities
    are compared above a floor of 1e-7 of the peak (0.01 photon for a bright hit)."""
    import finufft

    from pipeline.simulate import detector
    from pipeline.simulate.forward import _PROJECTION_OVERSAMPLE

    profile = load_profile("lcls").at_size(256)
    y, x = detector.pixel_positions(profile, center_shift=(0.3, -0.2), dtype=np.float32)
    q, _ = ewald_q(x, y, distance=profile.detector["distance"], wavelength=profile.wavelength)
    bodies = droplet_bodies(shape, 300.0, aspect=aspect, axis_polar=1.2, axis_azimuth=0.5, spin=0.3,
                            core_radius=40.0, core_offset=(30.0, -20.0, 10.0))
    dn = [1e-5 + 2e-6j, 2e-4 + 1e-4j]
    fast = droplet_amplitude(bodies, q, wavelength=profile.wavelength, index_minus_one=dn, model="projection")

    qx, qy = (q[..., i].astype(np.float64).ravel() for i in (0, 1))
    spacing = np.pi / np.sqrt(np.max(qx**2 + qy**2)) / _PROJECTION_OVERSAMPLE
    n = 2 * int(np.ceil(700.0 / spacing))
    grid = (np.arange(n) - n // 2) * spacing  # origin on cell n // 2 (mode 0)
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    xs = (grid[:, None] + sub[None, :] * spacing).ravel()
    xx, yy = np.meshgrid(xs, xs)
    start, end, material = column_segments(bodies, xx.ravel(), yy.ravel())
    density = (np.append(dn, 0)[material] * (end - start)).sum(axis=1).reshape(n, 4, n, 4).mean(axis=(1, 3))
    reference = finufft.nufft2d2(qy * spacing, qx * spacing, density * spacing**2, isign=-1, eps=1e-9)
    reference /= np.sinc(qx * spacing / (2 * np.pi)) * np.sinc(qy * spacing / (2 * np.pi))

    i_fast, i_ref = np.abs(fast.ravel()) ** 2, np.abs(reference) ** 2
    floor = 1e-7 * i_ref.max()
    error = np.abs(np.log10(i_fast + floor) - np.log10(i_ref + floor))
    assert np.median(error) < 0.01
    assert np.percentile(error, 99) < 0.05


@pytest.mark.parametrize("polarization", ["horizontal", "vertical", "none"])
def test_ellipsoid_fast_path_matches_the_general_projection_path(polarization, monkeypatch):
    """Separable-geometry form factors (no q grid, no complex arrays) against ewald_q +
    polarisation + complex amplitudes and shift phases, on the pixels of the lcls
    profile with a beam-centre shift: one ellipsoid, one with a xenon core off centre,
    a companion beside it and one behind it (Newton rings)."""
    import dataclasses

    from pipeline.simulate import render
    from pipeline.simulate.scene import Shot

    profile = dataclasses.replace(load_profile("lcls"), polarization=polarization).at_size(128)
    setup = render.Setup.build(profile, seed=0)
    source = dict(focus_fraction=1.0, pulse_energy=2e-3)
    shots = [Shot("triaxial", 700.0, aspect=0.6, triaxial=1.3, axis_polar=0.7, axis_azimuth=1.4, spin=0.3,
                  center_shift=(0.3, 0.2), **source),
             Shot("oblate", 500.0, aspect=0.6, axis_polar=0.7, axis_azimuth=0.4, core_radius=60.0,
                  core_offset=(80.0, -50.0, 30.0), center_shift=(-0.4, 0.1), **source),
             Shot("sphere", 300.0, companion_radius=200.0, companion_offset=(900.0, -400.0, 150.0), **source),
             Shot("sphere", 300.0, companion_radius=250.0, companion_offset=(20.0, 10.0, -1500.0), **source)]
    for shot in shots:
        fast = render.expected_photons(shot, setup)
        with monkeypatch.context() as patch:
            patch.setattr(render, "ellipsoid_terms", lambda *args: None)
            general = render.expected_photons(shot, setup)
        live = ~setup.mask
        assert np.abs(fast[live] - general[live]).max() < 1e-3 * general.max()
        relative = np.abs(fast[live] - general[live]) / general[live]
        assert np.median(relative) < 1e-5 and np.percentile(relative, 99) < 1e-3


def test_mie_comparison_figure(tmp_path):
    """The documentation figure (docs/figures/msft_vs_mie.png) renders from the same models."""
    pytest.importorskip("miepython")
    from pipeline.simulate.figures import mie_comparison

    path = mie_comparison(tmp_path / "mie.png", radius=200.0, max_angle=20.0)
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # curves drawn, not a blank canvas
