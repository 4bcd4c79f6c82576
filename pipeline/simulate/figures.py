"""The documentation figure: simulated examples of every class.

Regenerate with ``.venv/bin/python -m pipeline.simulate.figures docs/figures/simulated_classes.png``.
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


if __name__ == "__main__":  # pragma: no cover
    print(class_montage(sys.argv[1] if len(sys.argv) > 1 else "docs/figures/simulated_classes.png"))
