"""Decisions from classifier probabilities follow the taxonomy's structure."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.taxonomy import CLASS_INDEX, CLASS_NAMES, decide, multi_hot, taxonomy_problem


def probabilities(**values: float) -> np.ndarray:
    """One row of probabilities: the named classes as given, every other class 0.01."""
    row = np.full(len(CLASS_NAMES), 0.01)
    for name, value in values.items():
        row[CLASS_INDEX[name.replace("_", "/")]] = value
    return row


def thresholds(**values: float) -> np.ndarray:
    row = np.full(len(CLASS_NAMES), 0.5)
    for name, value in values.items():
        row[CLASS_INDEX[name.replace("_", "/")]] = value
    return row


def names(predicted_row: np.ndarray) -> set[str]:
    return {CLASS_NAMES[i] for i in np.flatnonzero(predicted_row)}


def test_exclusive_sub_classes_keep_the_one_further_above_its_threshold_in_log_odds():
    # Round 0.9 over 0.5 is 2.2 in log-odds; Elliptical 0.6 over 0.3 is 1.25: Round stays.
    rows = np.stack([probabilities(Spherical_Oblate=0.95, Round=0.9, Elliptical=0.6),
                     # Round 0.55 over 0.5 is 0.2; Elliptical 0.4 over 0.1 is 1.79: Elliptical
                     # stays although its probability is lower.
                     probabilities(Spherical_Oblate=0.95, Round=0.55, Elliptical=0.4)])
    predicted = decide(rows, thresholds(Elliptical=0.3))
    assert names(predicted[0]) == {"Spherical/Oblate", "Round"}
    predicted = decide(rows, thresholds(Elliptical=0.1))
    assert names(predicted[1]) == {"Spherical/Oblate", "Elliptical"}


def test_a_threshold_of_one_turns_a_class_off():
    """A class the network never saw labelled (threshold 1) is not predicted, even where
    its output saturates; it does not take part in the taxonomy's decisions either."""
    rows = np.stack([probabilities(Spherical_Oblate=0.9, Round=0.8, Elliptical=1.0),
                     probabilities(Layered=1.0, Empty=0.9)])
    predicted = decide(rows, thresholds(Elliptical=1.0, Layered=1.0))
    assert names(predicted[0]) == {"Spherical/Oblate", "Round"}
    assert names(predicted[1]) == {"Empty"}


def test_super_classes_exclude_each_other_and_sub_classes_imply_them():
    rows = np.stack([probabilities(Spherical_Oblate=0.6, Prolate=0.97, Streak=0.8),
                     probabilities(Bent=0.7),  # Prolate itself below its threshold
                     probabilities(Round=0.8)])
    predicted = decide(rows, thresholds())
    assert names(predicted[0]) == {"Prolate", "Streak"}
    assert names(predicted[1]) == {"Prolate", "Bent"}
    assert names(predicted[2]) == {"Spherical/Oblate", "Round"}


def test_a_super_class_is_decided_with_its_sub_classes():
    # Spherical/Oblate (0.9) beats Prolate (0.6) alone, but Streak (0.99) speaks for the
    # prolate family: the whole oblate family goes. And the other way round.
    rows = np.stack([probabilities(Spherical_Oblate=0.9, Round=0.8, Prolate=0.6, Streak=0.99),
                     probabilities(Spherical_Oblate=0.9, Round=0.98, Prolate=0.7, Streak=0.6, Bent=0.6)])
    predicted = decide(rows, thresholds())
    assert names(predicted[0]) == {"Prolate", "Streak"}
    assert names(predicted[1]) == {"Spherical/Oblate", "Round"}
    # Never both super-classes, whatever the probabilities.
    random = np.random.default_rng(0).random((2000, len(CLASS_NAMES)))
    decided = decide(random, np.random.default_rng(1).uniform(0.05, 0.95, len(CLASS_NAMES)))
    families = decided[:, [CLASS_INDEX["Spherical/Oblate"], CLASS_INDEX["Prolate"]]]
    assert families.any(axis=1).mean() > 0.5 and not families.all(axis=1).any()
    assert not decided[:, [CLASS_INDEX["Round"], CLASS_INDEX["Elliptical"]]].all(axis=1).any()


def test_empty_excludes_every_other_class():
    rows = np.stack([probabilities(Empty=0.95, Round=0.6),  # Empty far above: alone
                     probabilities(Empty=0.55, Prolate=0.9, Streak=0.9)])  # Empty barely
    predicted = decide(rows, thresholds())
    assert names(predicted[0]) == {"Empty"}  # no Spherical/Oblate added for a dropped Round
    assert names(predicted[1]) == {"Prolate", "Streak"}


def test_consistent_multi_labels_are_left_as_the_thresholds_give_them():
    combination = ("Spherical/Oblate", "Round", "NewtonRings", "DoubleRings", "Asymmetric")
    rows = np.where(multi_hot(combination) == 1, 0.9, 0.1)[None].repeat(3, axis=0)
    rows[1, CLASS_INDEX["Layered"]] = 0.7
    predicted = decide(rows, thresholds())
    np.testing.assert_array_equal(predicted[0], multi_hot(combination))
    assert names(predicted[1]) == set(combination) | {"Layered"}
    assert predicted.dtype == np.int8


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="must have shape"):
        decide(np.zeros((2, 10)), np.full(11, 0.5))
    with pytest.raises(ValueError, match="must have shape"):
        decide(np.zeros((2, 11)), np.full(10, 0.5))


def test_taxonomy_problem_names_what_a_label_breaks():
    assert taxonomy_problem(multi_hot(["Spherical/Oblate", "Round", "NewtonRings"])) is None
    assert taxonomy_problem(multi_hot(["Prolate", "Streak", "Bent", "Asymmetric"])) is None
    assert taxonomy_problem(multi_hot(["Streak"])) == "Streak without its super-class Prolate"
    assert taxonomy_problem(multi_hot(["Spherical/Oblate", "Round", "Elliptical"])) == (
        "Round and Elliptical exclude each other")
    assert taxonomy_problem(multi_hot(["Empty", "Layered"])) == "Empty (no hit) with other classes"
    # Every label combination of the real set is consistent.
    from pipeline.taxonomy import REAL_COMBINATIONS
    assert all(taxonomy_problem(multi_hot(names)) is None for _, names in REAL_COMBINATIONS)


def test_label_cells_read_as_spreadsheets_write_them():
    from pipeline.taxonomy import label_cell_value

    assert [label_cell_value(t) for t in ("0", "1", " 1 ", "1.0", "0.00", "1e0")] == [0, 1, 1, 1, 0, 1]
    assert [label_cell_value(t) for t in ("", "NA", "x", "2", "0.5", "-1", "nan", "inf")] == [None] * 8
