"""The documentation figures: simulated examples of every class, and MSFT against exact Mie theory.

Regenerate with ``.venv/bin/python -m pipeline.simulate.figures docs/figures/simulated_classes.png``
and ``.venv/bin/python -m pipeline.simulate.figures docs/figures/msft_vs_mie.png --mie``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

#: One label combination per class that shows that class's feature clearly.
SHOWCASE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Round", ("Spherical/Oblate", "Round")),
    ("Elliptical", ("Spherical/Oblate", "Elliptical")),
    ("Prolate", ("Prolate",)),
    ("Streak", ("Prolate", "Streak")),
    ("Bent", ("Prolate", "Streak", "Bent")),
    ("Bent (no flat sides)", ("Prolate", "Bent")),
    ("Asymmetric", ("Spherical/Oblate", "Elliptical", "Asymmetric")),
    ("NewtonRings", ("Spherical/Oblate", "Round", "NewtonRings")),
    ("DoubleRings", ("Spherical/Oblate", "Round", "DoubleRings")),
    ("Layered", ("Spherical/Oblate", "Round", "Layered")),
    ("Empty", ("Empty",)),
)


def class_montage(path: str | Path, *, profile: str = "fermi", size: int = 256, examples: int = 2,
                  seed: int = 11) -> Path:
    """Render ``examples`` shots of every showcase combination and save a PNG montage.

    Parameters
    ----------
    path : str or Path
        Output PNG.
    profile : str, default="fermi"
    size : int, default=256
        Frame size (pixels).
    examples : int, default=2
        Rows of examples.
    seed : int, default=11

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.simulate.beamtime import resolve_profile
    from pipeline.simulate.labels import label_names, physical_labels
    from pipeline.simulate.render import Setup, render_shot
    from pipeline.simulate.scene import sample_shot

    prof = resolve_profile(profile, size=size)
    setup = Setup.build(prof, seed=seed)
    fig, axes = plt.subplots(examples, len(SHOWCASE), figsize=(1.9 * len(SHOWCASE), 2.2 * examples))
    axes = np.atleast_2d(axes)
    for column, (title, combo) in enumerate(SHOWCASE):
        for row in range(examples):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(column, row)))
            shot = sample_shot(combo, rng, prof)
            frame = render_shot(shot, setup, rng).astype(float)
            shown = np.ma.masked_array(np.log10(np.maximum(frame, 1.0)), mask=setup.mask)
            ax = axes[row, column]
            ax.imshow(shown, cmap="magma", vmin=0.5, vmax=np.log10(max(frame.max(), 10.0)))
            ax.set_xticks([])
            ax.set_yticks([])
            names = label_names(physical_labels(shot, wide_angle=prof.wide_angle,
                                                newton_fringe_pixels=shot.newton_period(prof)))
            detail = f"R={shot.radius:.0f} nm" if shot.shape else "no droplet"
            if row == 0:
                ax.set_title(title, fontsize=9, fontweight="bold")
            ax.set_xlabel(", ".join(n.replace("Spherical/Oblate", "S/O") for n in names) + f"\n{detail}",
                          fontsize=6)
    fig.suptitle(f"airysort simulate: profile {prof.name!r} ({prof.model}, {prof.frame_shape[0]}² px, "
                 f"{np.degrees(prof.max_angle()):.0f}° max), log10 counts", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def mie_comparison(path: str | Path, *, radius: float = 500.0, wavelength: float = 13.5e-9,
                   max_angle: float = 30.0, slice_thickness: float = 10.0) -> Path:
    """Plot MSFT (straight-line and propagated wave) against exact Mie theory for a helium sphere.

    Parameters
    ----------
    path : str or Path
        Output PNG.
    radius : float, default=500
        Sphere radius (nm).
    wavelength : float, default=13.5e-9
        m.
    max_angle : float, default=30
        Largest scattering angle (degrees).
    slice_thickness : float, default=10
        Slices of the propagated wave (nm).

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import miepython  # a test dependency, the independent reference

    from pipeline.simulate.forward import droplet_amplitude
    from pipeline.simulate.optics import refractive_index
    from pipeline.simulate.particles import Body

    k = 2 * np.pi / (wavelength * 1e9)
    n = refractive_index("helium", wavelength)
    theta = np.radians(np.linspace(0.2, max_angle, 3000))
    # Perpendicular to the polarisation: Mie's |S1|^2 / k^2 is the cross-section (nm^2/sr).
    q = np.stack([0 * theta, k * np.sin(theta), k * (np.cos(theta) - 1)], axis=1)
    sphere = [Body("ellipsoid", np.zeros(3), np.eye(3), (radius,) * 3)]
    s1, _ = miepython.S1_S2(np.conj(n), k * radius, np.cos(theta), norm="wiscombe")
    exact = np.abs(s1) ** 2 / k**2
    curves = {"MSFT, straight lines": None, f"MSFT, wave propagated in {slice_thickness:g} nm slices": slice_thickness}
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    axes[0].semilogy(np.degrees(theta), exact, color="black", lw=1.2, label="exact Mie (miepython)")
    for (label, thickness), colour in zip(curves.items(), ("tab:orange", "tab:blue")):
        amplitude = droplet_amplitude(sphere, q, wavelength=wavelength, index_minus_one=[n - 1], model="msft",
                                      slice_thickness=thickness)
        simulated = (k * k / (2 * np.pi)) ** 2 * np.abs(amplitude) ** 2
        error = np.log10(simulated) - np.log10(exact)
        rms = np.sqrt(np.mean(error**2))
        axes[0].semilogy(np.degrees(theta), simulated, color=colour, lw=0.8, label=f"{label} (RMS {rms:.3f} dex)")
        axes[1].plot(np.degrees(theta), error, color=colour, lw=0.8)
    axes[0].set_ylabel("dσ/dΩ (nm²/sr)")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"He sphere, R = {radius:g} nm, λ = {wavelength * 1e9:g} nm, n − 1 = {n - 1:.2e}", fontsize=10)
    axes[1].set_ylabel("log10 (MSFT / Mie)")
    axes[1].set_xlabel("scattering angle (degrees)")
    axes[1].set_ylim(-1, 1)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":  # pragma: no cover
    target = sys.argv[1] if len(sys.argv) > 1 else "docs/figures/simulated_classes.png"
    print(mie_comparison(target) if "--mie" in sys.argv[2:] else class_montage(target))
