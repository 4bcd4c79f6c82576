"""A trained classifier on patterns from an independent scattering model (issue 5, item 7).

    .venv/bin/python benchmarks/cross_simulator.py MODEL_DIR --work peer --n 800

The classifier will be judged on patterns from a simulator that is not airysort's, with
the same detector geometry. This script makes such patterns and scores the model on them:

1. Render ``--n`` labelled frames on the detector of a shipped profile (``--profile``,
   default ``lcls`` at ``--size`` 512; its wavelength, distance, pixels, mask, beam-centre
   jitter, fluence and read-out), with the scattering computed independently of
   :mod:`pipeline.simulate`: sasmodels' analytic small-angle form factors of a sphere,
   an oblate or prolate spheroid and a capped cylinder (pill), and the textbook
   amplitude of two spheres in the focus (coherent sum). Photons per pixel follow the
   first Born approximation, ``F r_e² (n_e V)² P(q) ΔΩ`` with liquid helium's electron
   density; only the read-out (Poisson photons, noise, hot pixels, stray light) is
   airysort's detector model.
2. Labels by what the shapes are, with the thresholds of airysort's label rules (`pipeline/simulate/labels.py`): a sphere
   is Round; a spheroid flattened to 0.6-0.95 and seen so that its outline's axis ratio
   is >= 1.10 is Elliptical; a prolate spheroid or pill is Prolate, a pill within 35
   degrees of the detector plane also Streak; two spheres (the second 0.4-0.75 times
   the first's radius) are DoubleRings; no particle is Empty.
3. ``airysort ingest``, ``preprocess --size IMAGE_SIZE`` (``--image-size``, default 128: it must
   match the model's training images), ``predict`` (``--symmetrise``: averaged over the
   image's rotations and mirrors) with the model, and per-class and micro/macro F1 against those labels (macro over
   classes with at least ``--min-support`` patterns).

Needs sasmodels (a test dependency). Capped cylinders take about 1.5 s per 512² frame
in sasmodels; the rest 30 ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnn_accuracy import airysort, class_scores, print_class_table  # noqa: E402

from pipeline import store  # noqa: E402
from pipeline.simulate import detector  # noqa: E402
from pipeline.simulate.beamtime import resolve_profile  # noqa: E402
from pipeline.taxonomy import CLASS_NAMES, multi_hot  # noqa: E402

#: Classical electron radius, nm.
R_E = 2.8179403e-6
#: Electrons per nm³ in liquid helium (0.145 g/cm³, 2 electrons per 4.0026 g/mol atom).
HELIUM_ELECTRONS = 2 * 0.145 / 4.0026 * 6.02214076e23 * 1e-21
#: Shape groups drawn and their shares.
KINDS = {"sphere": 0.30, "oblate": 0.20, "prolate": 0.13, "pill": 0.12, "two spheres": 0.12, "empty": 0.13}
#: Shares that give the coarse groups of taxonomy.md (round, elliptical, prolate, double,
#: empty) one fifth each, as ``airysort simulate --balanced`` does.
BALANCED_KINDS = {"sphere": 0.2, "oblate": 0.2, "prolate": 0.1, "pill": 0.1, "two spheres": 0.2, "empty": 0.2}


def _sasmodels_intensity(name: str, parameters: dict, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """sasmodels' 2-D form factor ``P(q)`` (1 at q = 0) at (qx, qy) in 1/nm."""
    from sasmodels.core import load_model
    from sasmodels.direct_model import call_kernel

    full = dict(parameters, sld=1.0, sld_solvent=0.0, scale=1.0, background=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(name)
        intensity = call_kernel(model.make_kernel([qx.ravel() / 10, qy.ravel() / 10]), full)  # 1/Angstrom
        forward = call_kernel(model.make_kernel([np.array([1e-7]), np.array([0.0])]), full)[0]
    return (intensity / forward).reshape(qx.shape)


def _sphere_amplitude(q: np.ndarray, radius: float) -> np.ndarray:
    """Normalised amplitude ``3 (sin x - x cos x) / x³`` of a sphere, x = q R (1 at q = 0)."""
    x = np.maximum(q * radius, 1e-6)
    return 3 * (np.sin(x) - x * np.cos(x)) / x**3


def _axis_angles(rng) -> tuple[float, float]:
    """Random orientation of a body's symmetry axis: (theta from the beam, phi), degrees."""
    return float(np.degrees(np.arccos(rng.uniform(-1, 1)))), float(rng.uniform(0, 360))


def draw_shot(kind: str, rng, profile) -> tuple[dict, list[str]]:
    """Shape parameters (nm, degrees) of one shot of ``kind`` and its class names."""
    particles = profile.particles
    low, high = (r * 1e9 for r in particles["radius_range"])
    radius = float(np.clip(particles["radius_median"] * 1e9 * np.exp(rng.normal(0, particles["radius_log_sigma"])),
                           low, high))  # volume-equivalent sphere radius
    if kind == "empty":
        return {"kind": kind}, ["Empty"]
    if kind == "sphere":
        return {"kind": kind, "radius": radius}, ["Spherical/Oblate", "Round"]
    if kind == "two spheres":
        second = radius * rng.uniform(0.4, 0.75)
        distance, angle = rng.uniform(1.5, 4.0) * (radius + second), rng.uniform(0, 2 * np.pi)
        offset = (distance * np.cos(angle), distance * np.sin(angle), rng.normal(0, 200.0))
        return ({"kind": kind, "radius": radius, "second": second, "offset": offset},
                ["Spherical/Oblate", "Round", "DoubleRings"])
    if kind == "oblate":
        while True:  # seen tilted enough that the outline is elliptical
            flattening = rng.uniform(0.6, 0.95)
            theta, phi = _axis_angles(rng)
            c = np.cos(np.radians(theta))
            if 1 / np.sqrt(c**2 + flattening**2 * (1 - c**2)) >= 1.10:
                break
        equatorial = radius / flattening ** (1 / 3)
        return ({"kind": kind, "model": "ellipsoid", "volume_radius": radius, "theta": theta, "phi": phi,
                 "radius_polar": flattening * equatorial, "radius_equatorial": equatorial},
                ["Spherical/Oblate", "Elliptical"])
    theta, phi = _axis_angles(rng)
    if kind == "prolate":
        elongation = rng.uniform(1.3, 2.5)
        equatorial = radius / elongation ** (1 / 3)
        return ({"kind": kind, "model": "ellipsoid", "volume_radius": radius, "theta": theta, "phi": phi,
                 "radius_polar": elongation * equatorial, "radius_equatorial": equatorial}, ["Prolate"])
    # A pill: a cylinder of length L between two hemispheres of its radius r, total length
    # (L + 2 r) = aspect * 2 r, of the drawn volume.
    aspect = rng.uniform(1.5, 3.0)
    r = radius / (1.5 * (aspect - 1) + 1) ** (1 / 3)
    tilt = 90.0 - theta if theta <= 90 else theta - 90.0  # axis to detector plane
    names = ["Prolate", "Streak"] if tilt <= 35.0 else ["Prolate"]
    return ({"kind": kind, "model": "capped_cylinder", "volume_radius": radius, "theta": theta, "phi": phi,
             "radius": r, "radius_cap": r, "length": 2 * r * (aspect - 1)}, names)


def render(shot: dict, rng, profile, *, mask, hot) -> tuple[np.ndarray, float]:
    """Detector frame of one shot and its pulse energy (J)."""
    source, det = profile.source, profile.detector
    energy_ratio = rng.gamma(1 / source["pulse_energy_spread"] ** 2, source["pulse_energy_spread"] ** 2)
    shift = rng.normal(0.0, det["center_jitter"], 2)
    photons = detector.stray_light(profile, center_shift=shift) * energy_ratio
    if shot["kind"] != "empty":
        y, x = detector.pixel_positions(profile, center_shift=shift)
        distance, k = det["distance"], 2 * np.pi / (profile.wavelength * 1e9)  # m, 1/nm
        r = np.sqrt(x**2 + y**2 + distance**2)
        qx, qy, qz = k * x / r, k * y / r, k * (distance / r - 1)
        solid_angle = det["pixel_size"] ** 2 * distance / r**3  # sr per pixel
        # Fluence at the particle: SASE energy and a random place within the hit radius.
        focus = source["focus_sigma"] * 1e9
        place2 = rng.uniform(0, (source["hit_radius"] * focus) ** 2)
        fluence = source["fluence"] * energy_ratio * np.exp(-place2 / (2 * focus**2))  # photons / nm²
        scale = fluence * R_E**2 * solid_angle
        if shot["kind"] in ("sphere", "two spheres"):
            q = np.sqrt(qx**2 + qy**2 + qz**2)
            amplitude = HELIUM_ELECTRONS * 4 / 3 * np.pi * shot["radius"] ** 3 * _sphere_amplitude(q, shot["radius"])
            if shot["kind"] == "two spheres":
                dx, dy, dz = shot["offset"]
                second = HELIUM_ELECTRONS * 4 / 3 * np.pi * shot["second"] ** 3 * _sphere_amplitude(q, shot["second"])
                amplitude = amplitude + second * np.exp(-1j * (qx * dx + qy * dy + qz * dz))
            signal = np.abs(amplitude) ** 2
        else:
            names = ("theta", "phi", "radius_polar", "radius_equatorial", "radius", "radius_cap", "length")
            parameters = {n: shot[n] * (10.0 if n.startswith("radius") or n == "length" else 1.0)
                          for n in names if n in shot}  # lengths in Angstrom
            form = _sasmodels_intensity(shot["model"], parameters, *np.broadcast_arrays(qx, qy))
            signal = (HELIUM_ELECTRONS * 4 / 3 * np.pi * shot["volume_radius"] ** 3) ** 2 * form
        photons = photons + scale * signal
    return detector.read_out(photons, profile, rng, mask=mask, hot=hot), float(source["pulse_energy"] * energy_ratio)


def write_peer_file(path: Path, n: int, *, profile, seed: int, shares: dict[str, float] = KINDS) -> dict[str, int]:
    """Render ``n`` shots, of kinds drawn with ``shares``, into a stacked CXI file with
    labels; returns the class counts."""
    rng = np.random.default_rng(seed)
    mask = detector.static_mask(profile)
    hot = detector.hot_pixels(profile, seed)
    kinds = list(shares)
    ny, nx = profile.frame_shape
    with h5py.File(path, "w") as h5:
        h5.attrs["creator"] = "benchmarks/cross_simulator.py (sasmodels form factors)"
        data = h5.create_dataset("entry_1/data_1/data", shape=(n, ny, nx), dtype=np.float32, chunks=(1, ny, nx))
        labels = h5.create_dataset("entry_1/result_1/labels", shape=(n, len(CLASS_NAMES)), dtype=np.int8)
        pulse = h5.create_dataset("entry_1/instrument_1/source_1/pulse_energy", shape=(n,), dtype=np.float64)
        group = h5.require_group("entry_1/instrument_1/detector_1")
        group["distance"] = float(profile.detector["distance"])
        group["x_pixel_size"] = group["y_pixel_size"] = float(profile.detector["pixel_size"])
        group["mask"] = mask.astype(np.uint32)
        h5["entry_1/instrument_1/source_1/wavelength"] = float(profile.wavelength)
        h5["entry_1/experiment_identifier"] = [f"peer-{i:06d}" for i in range(n)]
        started = time.perf_counter()
        for i in range(n):
            shot, names = draw_shot(kinds[rng.choice(len(kinds), p=list(shares.values()))], rng, profile)
            data[i], pulse[i] = render(shot, rng, profile, mask=mask, hot=hot)
            labels[i] = multi_hot(names)
            if (i + 1) % 100 == 0:
                print(f"  rendered {i + 1}/{n} ({time.perf_counter() - started:.0f} s)", flush=True)
        counts = labels[:].sum(axis=0)
    return {name: int(c) for name, c in zip(CLASS_NAMES, counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a trained classifier (airysort train --model cnn)")
    parser.add_argument("--work", type=Path, required=True, help="directory for the file, store and scores")
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--profile", default="lcls")
    parser.add_argument("--size", type=int, default=512, help="frame side of the detector, pixels")
    parser.add_argument("--image-size", type=int, default=128, help="preprocess --size the model was trained on")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-support", type=int, default=30)
    parser.add_argument("--symmetrise", action="store_true", help="predict --symmetrise (test-time augmentation)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    profile = resolve_profile(args.profile, size=args.size)
    peer = args.work / "peer.cxi"
    if not peer.exists():
        print(f"rendering {args.n} frames of {args.size}² with sasmodels form factors -> {peer}", flush=True)
        counts = write_peer_file(peer, args.n, profile=profile, seed=args.seed)
        print("classes:", {k: v for k, v in counts.items() if v})
    peer_store = args.work / "peer.zarr"
    if not store.is_store(peer_store):
        airysort("ingest", peer_store, peer)
        airysort("preprocess", peer_store, "--size", args.image_size)
    airysort("predict", peer_store, args.model, *(["--symmetrise"] if args.symmetrise else []))

    dataset = store.open_store(peer_store)
    y_true, y_pred = np.asarray(dataset["label"].values), np.asarray(dataset["predicted"].values)
    print(f"\n{len(y_true)} patterns from the independent model, classified by {args.model}")
    scores = class_scores(y_true, y_pred, min_support=args.min_support)
    print_class_table(scores["per_class"])
    print(f"micro F1 {scores['micro_f1']:.3f}; macro F1 over {int(scores['supported'].sum())} classes with "
          f">= {args.min_support} patterns {scores['macro_f1_supported']:.3f}")
    (args.work / f"scores{'-symmetrised' if args.symmetrise else ''}.json").write_text(json.dumps({
        "model": str(args.model), "n": int(len(y_true)), "symmetrise": args.symmetrise, "micro_f1": scores["micro_f1"],
        "macro_f1_supported": scores["macro_f1_supported"], "per_class": scores["per_class"]}, indent=2))


if __name__ == "__main__":
    main()
