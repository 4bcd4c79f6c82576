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


#: Sub-class → its super-class (taxonomy.md): a pattern of a sub-class also belongs to
#: the super-class.
SUPER_CLASS: dict[str, str] = {
    "Round": "Spherical/Oblate",
    "Elliptical": "Spherical/Oblate",
    "Streak": "Prolate",
    "Bent": "Prolate",
}
#: Classes that exclude each other: the two super-classes (a droplet is oblate or
#: prolate) and the two sub-classes of Spherical/Oblate (circular or elliptical rings).
#: Empty ("no particle hit") excludes every other class.
EXCLUSIVE_PAIRS: tuple[tuple[str, str], ...] = (("Spherical/Oblate", "Prolate"), ("Round", "Elliptical"))


def decide(probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Predicted classes from probabilities: per-class thresholds, then the taxonomy's rules.

    A class is predicted when its probability reaches its threshold. Where that gives
    two classes that exclude each other (:data:`EXCLUSIVE_PAIRS`, or Empty with anything
    else), only the one further above its threshold is kept, measured in log-odds, so
    that classes with low thresholds (rare ones) are not favoured. A super-class stands
    for its sub-classes too: Spherical/Oblate against Prolate is decided by the best of
    each family (Spherical/Oblate, Round, Elliptical against Prolate, Streak, Bent), and
    the losing family goes whole. Finally every predicted sub-class adds its super-class
    (:data:`SUPER_CLASS`).

    Parameters
    ----------
    probabilities : ndarray of shape (n, 11)
        Sigmoid outputs of the classifier.
    thresholds : ndarray of shape (11,)
        Per-class decision thresholds in (0, 1); 1 (or more) turns a class off (a class
        no training pattern showed, whose output means nothing).

    Returns
    -------
    ndarray of int8, shape (n, 11)
        Multi-hot predictions (0/1).
    """
    probabilities = np.asarray(probabilities, np.float64)
    thresholds = np.asarray(thresholds, np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != N_CLASSES or thresholds.shape != (N_CLASSES,):
        raise ValueError(f"probabilities must have shape (n, {N_CLASSES}) and thresholds ({N_CLASSES},), "
                         f"got {probabilities.shape!r} and {thresholds.shape!r}")
    eps = 1e-7
    p, t = np.clip(probabilities, eps, 1 - eps), np.clip(thresholds, eps, 1 - eps)
    margin = np.log(p / (1 - p)) - np.log(t / (1 - t))  # >= 0: predicted
    predicted = (probabilities >= thresholds) & (thresholds < 1)
    empty = CLASS_INDEX["Empty"]
    others = np.array([i for i in range(N_CLASSES) if i != empty])
    for a, b in EXCLUSIVE_PAIRS:
        family_a, family_b = _family(a), _family(b)
        best_a = np.where(predicted[:, family_a], margin[:, family_a], -np.inf).max(axis=1)
        best_b = np.where(predicted[:, family_b], margin[:, family_b], -np.inf).max(axis=1)
        both = np.isfinite(best_a) & np.isfinite(best_b)
        a_wins = best_a >= best_b
        predicted[np.ix_(np.flatnonzero(both & a_wins), family_b)] = False
        predicted[np.ix_(np.flatnonzero(both & ~a_wins), family_a)] = False
    with_others = predicted[:, empty] & predicted[:, others].any(axis=1)
    best_other = np.where(predicted[:, others], margin[:, others], -np.inf).max(axis=1)
    empty_wins = with_others & (margin[:, empty] >= best_other)
    predicted[np.ix_(np.flatnonzero(empty_wins), others)] = False
    predicted[with_others & ~empty_wins, empty] = False
    for sub, sup in SUPER_CLASS.items():
        predicted[:, CLASS_INDEX[sup]] |= predicted[:, CLASS_INDEX[sub]]
    return predicted.astype(np.int8)


def taxonomy_problem(labels: np.ndarray) -> str | None:
    """What makes one multi-hot label vector break the taxonomy, or None: a sub-class
    without its super-class, two classes that exclude each other, Empty with another class.
    """
    labels = np.asarray(labels)
    names = [name for name, value in zip(CLASS_NAMES, labels) if value == 1]
    for sub, sup in SUPER_CLASS.items():
        if sub in names and sup not in names:
            return f"{sub} without its super-class {sup}"
    for a, b in EXCLUSIVE_PAIRS:
        if a in names and b in names:
            return f"{a} and {b} exclude each other"
    if "Empty" in names and len(names) > 1:
        return "Empty (no hit) with other classes"
    return None


def label_cell_value(text: str) -> int | None:
    """A label sheet's cell as 0 or 1 (``1``, ``1.0`` as spreadsheets and pandas write
    numbers, spaces around), or None for anything else, a blank included."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def label_row_problem(labels: np.ndarray) -> str | None:
    """Why a researcher's label row cannot be used, or None: no class set (every pattern
    has one, Empty when nothing was hit, so an all-zero row was not filled in), or a
    :func:`taxonomy_problem`. ``airysort label`` and ``evaluate --truth`` both apply it."""
    if not np.asarray(labels).any():
        return "no class set (a pattern with no hit is Empty); not filled in?"
    return taxonomy_problem(labels)


def _family(name: str) -> list[int]:
    """Indices of a class and its sub-classes (:data:`SUPER_CLASS`)."""
    return [CLASS_INDEX[name]] + [CLASS_INDEX[sub] for sub, sup in SUPER_CLASS.items() if sup == name]


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
