"""The class taxonomy of helium-nanodroplet diffraction patterns.

The 11 classes and their order follow the labelled helium data set of
Zimmermann et al., Phys. Rev. E 99, 063309 (2019) (CXIDB entry 94); see
``shared/design/taxonomy.md``. Everything in airysort (store coordinate ``class``,
model outputs, reports, label CSVs) uses exactly these names in this order.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "Spherical/Oblate",
    "Round",
    "Elliptical",
    "Prolate",
    "Streak",
    "Bent",
    "Asymmetric",
    "NewtonRings",
    "DoubleRings",
    "Layered",
    "Empty",
)
N_CLASSES = len(CLASS_NAMES)
CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}

#: Coarse groups used to score clusterings, in the order of the rules below.
COARSE_GROUPS: tuple[str, ...] = ("empty", "double", "prolate", "elliptical", "round", "other")

#: Frequencies of exact label combinations in the real set (taxonomy.md, top 12).
REAL_COMBINATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (5300, ("Spherical/Oblate", "Round")),
    (472, ("Spherical/Oblate", "Elliptical")),
    (316, ("Spherical/Oblate", "Round", "NewtonRings")),
    (229, ("Spherical/Oblate", "Elliptical", "Asymmetric")),
    (211, ("Empty",)),
    (126, ("Prolate", "Bent")),
    (126, ("Prolate", "Streak", "Bent")),
    (125, ("Spherical/Oblate", "Round", "DoubleRings")),
    (53, ("Prolate", "Bent", "Asymmetric")),
    (47, ("Spherical/Oblate", "Round", "NewtonRings", "DoubleRings")),
    (40, ("Spherical/Oblate", "Elliptical", "NewtonRings")),
    (34, ("Prolate", "Streak", "Bent", "Asymmetric")),
)


def multi_hot(names: list[str] | tuple[str, ...]) -> np.ndarray:
    """Multi-hot int8 vector of length 11 for a list of class names."""
    vector = np.zeros(N_CLASSES, dtype=np.int8)
    for name in names:
        if name not in CLASS_INDEX:
            raise ValueError(f"unknown class {name!r}; known classes: {', '.join(CLASS_NAMES)}")
        vector[CLASS_INDEX[name]] = 1
    return vector


def coarse_group(labels: np.ndarray) -> np.ndarray:
    """Coarse group name of each pattern: the first rule of taxonomy.md that matches.

    Parameters
    ----------
    labels : ndarray of shape (n_patterns, 11)
        Multi-hot labels (0/1); rows containing -1 (unlabelled) give ``""``.

    Returns
    -------
    ndarray of str, shape (n_patterns,)
        One of :data:`COARSE_GROUPS`, or ``""`` for unlabelled rows.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != N_CLASSES:
        raise ValueError(f"labels must have shape (n, {N_CLASSES}), got {labels.shape!r}")
    has = {name: labels[:, i] == 1 for i, name in enumerate(CLASS_NAMES)}
    rules = [
        ("empty", has["Empty"]),
        ("double", has["DoubleRings"]),
        ("prolate", has["Prolate"] | has["Streak"] | has["Bent"]),
        ("elliptical", has["Elliptical"]),
        ("round", has["Round"]),
    ]
    groups = np.full(len(labels), "other", dtype=object)
    assigned = np.zeros(len(labels), dtype=bool)
    for name, matches in rules:
        take = matches & ~assigned
        groups[take] = name
        assigned |= take
    groups[(labels < 0).any(axis=1)] = ""
    return groups.astype(str)
