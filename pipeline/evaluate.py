"""``airysort evaluate``: score classifications and clusterings against known truth.

Truth is the store's ``label`` (researcher labels, −1 where unlabelled) or a label CSV
(``shot_id,`` + the 11 class names, rows matched by ``shot_id``).

* Classification (``predicted`` against truth): per-class precision, recall, F1 and
  support, micro and macro F1 (scikit-learn). Macro F1 averages the classes that occur
  in the truth or the predictions: a class the beamtime cannot show (Bent and Asymmetric
  need wide-angle scattering) would otherwise count as F1 0. Patterns the classifier was trained or
  validated on are left out when the store records them (a ``label_role`` or
  ``train_split`` variable, see :func:`training_mask`); the output says which subset
  was scored.
* Clustering (every ``cluster_<method>`` variable): homogeneity, completeness, adjusted
  Rand index and normalised mutual information against each pattern's coarse group
  (taxonomy.md, :func:`pipeline.taxonomy.coarse_group`), over all patterns with truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from sklearn import metrics

from pipeline.errors import AirysortError
from pipeline.label_csv import problem_lines, read_label_csv
from pipeline.taxonomy import CLASS_NAMES, N_CLASSES, coarse_group

#: Variables that may record which labelled patterns trained the classifier.
SPLIT_VARIABLES = ("label_role", "train_split")
#: Values of a string split variable meaning "used to fit or tune the model".
TRAINING_ROLES = frozenset({"train", "training", "val", "valid", "validation"})


def read_truth_csv(path: str | Path, shot_ids: np.ndarray) -> tuple[np.ndarray, int, list[str]]:
    """Read a label CSV as ``airysort label`` reads it and align it with the store's patterns.

    Parameters
    ----------
    path : path-like
        CSV with header ``shot_id,`` + the 11 class names (any column order), 0/1 values
        (:func:`pipeline.label_csv.read_label_csv`).
    shot_ids : ndarray of str, shape (n_patterns,)
        The store's ``shot_id`` coordinate.

    Returns
    -------
    truth : ndarray of int8, shape (n_patterns, 11)
        0/1 where the CSV has a usable row for the pattern, −1 elsewhere.
    unmatched : int
        CSV rows whose ``shot_id`` is not in the store.
    bad_rows : list of str
        Rows of the store's patterns left out as ``airysort label`` would reject them (a
        wrong number of fields, a value other than 0 or 1, blank included, classes that
        exclude each other, a shot id listed again), by line:
        ``"line 7: reason; left out"``, consecutive lines with one reason joined.
    """
    sheet = read_label_csv(path)
    if not sheet.rows:
        raise AirysortError(f"truth file {str(path)!r} has a header but no rows")
    # tolist(): the store's strings come back as NumPy StringDType, which .astype(str) rejects.
    row_of = {str(shot): i for i, shot in enumerate(np.asarray(shot_ids).tolist())}
    matched = [row for row in sheet.rows if row.shot_id in row_of]
    if not matched:
        raise AirysortError(
            f"no shot_id of truth file {str(path)!r} matches the store (first CSV id "
            f"{sheet.rows[0].shot_id!r}, first store id {str(shot_ids[0])!r}); "
            "the ids must equal the store's shot_id coordinate (see `airysort info`)"
        )
    # Rows `label` would reject are truths no classifier can match: left out, and said.
    truth = np.full((len(shot_ids), N_CLASSES), -1, dtype=np.int8)
    problems = []
    for row in matched:
        if row.problem is None:
            truth[row_of[row.shot_id]] = row.values
        else:
            problems.append((row.line, f"{row.problem}; left out"))
    return truth, len(sheet.rows) - len(matched), problem_lines(problems)


def training_mask(dataset: xr.Dataset) -> tuple[np.ndarray | None, str | None]:
    """Which patterns trained (or validated) the classifier, if the store records it.

    Looks for a pattern variable named in :data:`SPLIT_VARIABLES`: strings (a pattern
    is a training pattern if its role is in :data:`TRAINING_ROLES`), or booleans /
    integers (non-zero = used for training).

    Returns
    -------
    mask : ndarray of bool, shape (n_patterns,), or None
        True for patterns used for training; None if nothing is recorded.
    source : str or None
        Name of the variable read.
    """
    for name in SPLIT_VARIABLES:
        if name in dataset.variables and dataset[name].dims == ("pattern",):
            values = np.asarray(dataset[name].values)
            if values.dtype.kind in "biu":
                return values != 0, name
            roles = [str(role).lower() for role in values.tolist()]
            return np.isin(roles, sorted(TRAINING_ROLES)), name
    return None, None


def training_patterns(dataset: xr.Dataset, *, external_truth: bool) -> tuple[np.ndarray | None, str | None]:
    """The patterns to leave out when scoring the classifier, and where that came from.

    A recorded split (:func:`training_mask`) wins. Otherwise, when the truth comes from
    outside the store (``--truth``), the patterns labelled in the store are the ones the
    classifier learnt from.
    """
    trained, source = training_mask(dataset)
    if trained is None and external_truth and "label" in dataset:
        return (np.asarray(dataset["label"].values) >= 0).all(axis=1), "label"
    return trained, source


def classification_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Per-class and averaged scores of multi-label predictions.

    Parameters
    ----------
    truth, predicted : ndarray of shape (n, 11)
        0/1 multi-hot rows (truth known for every row).

    Returns
    -------
    dict
        ``per_class`` (name → precision, recall, f1, support), ``micro_f1``,
        ``macro_f1``, ``n`` — the classification section of interface.md — and
        ``macro_classes``, the classes the macro average is over (see :func:`macro_f1`).
    """
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        truth, predicted, average=None, labels=list(range(N_CLASSES)), zero_division=0
    )
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(CLASS_NAMES, precision, recall, f1, support)
    }
    macro, classes = macro_f1(truth, predicted)
    return {
        "per_class": per_class,
        "micro_f1": float(metrics.f1_score(truth, predicted, average="micro", zero_division=0)),
        "macro_f1": macro,
        "macro_classes": classes,
        "n": int(len(truth)),
    }


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, list[str]]:
    """Macro F1 over the classes that occur in ``truth`` or ``predicted`` (0/1 rows).

    A class absent from both has no defined F1; scikit-learn leaves it out of the
    average with ``zero_division=nan``. Returns the score (nan when no class occurs)
    and the names of the classes averaged.
    """
    occurs = (np.asarray(truth) > 0).any(axis=0) | (np.asarray(predicted) > 0).any(axis=0)
    classes = [name for name, seen in zip(CLASS_NAMES, occurs) if seen]
    if not classes:
        return float("nan"), classes
    score = metrics.f1_score(truth, predicted, average="macro", zero_division=np.nan)
    return float(score), classes


def clustering_scores(groups: np.ndarray, clusters: np.ndarray, *, k: int) -> dict[str, Any]:
    """Agreement of a clustering with the coarse groups.

    Parameters
    ----------
    groups : ndarray of str, shape (n,)
        Coarse group of each pattern.
    clusters : ndarray of int, shape (n,)
        Cluster index of each pattern.
    k : int
        Number of clusters of the clustering (reported, not used for scoring).

    Returns
    -------
    dict
        ``homogeneity``, ``completeness``, ``ari``, ``nmi``, ``k``, ``n``.
    """
    homogeneity, completeness, _ = metrics.homogeneity_completeness_v_measure(groups, clusters)
    return {
        "homogeneity": float(homogeneity),
        "completeness": float(completeness),
        "ari": float(metrics.adjusted_rand_score(groups, clusters)),
        "nmi": float(metrics.normalized_mutual_info_score(groups, clusters)),
        "k": int(k),
        "n": int(len(groups)),
    }


def predicted_group_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """A classifier's coarse groups scored like a clustering (:func:`clustering_scores`):
    the supervised reference for the clustering table, i.e. what labels teach about the
    groups on these patterns.

    Parameters
    ----------
    truth, predicted : ndarray of shape (n, 11)
        Multi-hot true and predicted labels of the same patterns.
    """
    predicted_groups = coarse_group(predicted)
    return clustering_scores(coarse_group(truth), predicted_groups, k=len(np.unique(predicted_groups)))


def evaluate_store(path: str | Path, *, truth_csv: str | Path | None = None) -> dict[str, Any]:
    """Score the store's ``predicted`` and ``cluster_*`` variables against truth.

    Parameters
    ----------
    path : path-like
        An airysort store.
    truth_csv : path-like, optional
        Label CSV to use as truth instead of the store's ``label``.

    Returns
    -------
    dict
        ``{"classification": {...}, "clustering": {METHOD: {...}}}`` as in
        interface.md; a section is absent when its inputs are. Extra keys: ``truth``
        (``"label"`` or the CSV path), ``classification.scored`` (``"held_out"`` when the
        training patterns are known and excluded, else ``"all_labelled"``),
        ``classification.excluded_training`` (labelled patterns that trained the classifier),
        ``classification.not_predicted`` (labelled patterns ingested since ``predict``),
        ``classification.groups`` (the predicted
        coarse groups scored as a clustering of the scored patterns,
        :func:`predicted_group_scores`), ``truth_unmatched_rows`` and ``truth_bad_rows`` (CSV
        only: rows not in the store, and rows left out as `label` would reject them).
    """
    from pipeline import store

    dataset = store.open_store(path)
    clusterings = sorted(
        name for name in dataset.data_vars
        if name.startswith("cluster_") and dataset[name].dims == ("pattern",)
    )
    if "predicted" not in dataset and not clusterings:
        raise AirysortError(
            f"store {str(path)!r} has nothing to evaluate (no 'predicted', no 'cluster_*'); "
            "run `airysort predict` or `airysort cluster` first"
        )
    result: dict[str, Any] = {}
    if truth_csv is not None:
        truth, unmatched, bad_rows = read_truth_csv(truth_csv, dataset["shot_id"].values)
        result["truth_bad_rows"] = bad_rows
        result["truth"] = str(truth_csv)
        result["truth_unmatched_rows"] = unmatched
    elif "label" in dataset:
        truth = np.asarray(dataset["label"].values, dtype=np.int8)
        result["truth"] = "label"
    else:
        raise AirysortError(f"store {str(path)!r} has no 'label'; pass --truth LABELS.csv")
    known = (truth >= 0).all(axis=1)
    if not known.any():
        left_out = result.get("truth_bad_rows") or []
        why = f"; every matching row was left out, e.g. {left_out[0]}" if left_out else ""
        raise AirysortError(
            f"no pattern of store {str(path)!r} has known truth ({result['truth']}){why}; import "
            "labels with `airysort label STORE LABELS.csv` or pass --truth LABELS.csv"
        )

    if "predicted" in dataset:
        trained, split_variable = training_patterns(dataset, external_truth=truth_csv is not None)
        # Not patterns ingested since `predict` (a new array: `known` scores the clusterings).
        covered = store.covered(dataset, "predicted")
        scored = (known if trained is None else known & ~trained) & covered
        if scored.any():
            predicted = np.asarray(dataset["predicted"].values)
            result["classification"] = classification_scores(truth[scored], predicted[scored])
            result["classification"]["scored"] = "all_labelled" if trained is None else "held_out"
            result["classification"]["groups"] = predicted_group_scores(truth[scored], predicted[scored])
            result["classification"]["excluded_training"] = 0 if trained is None else int((known & trained).sum())
            result["classification"]["not_predicted"] = int((known & ~covered).sum())
            if trained is None and truth_csv is None:
                result["classification"]["note"] = (
                    "the store does not record which labelled patterns trained the classifier, so "
                    "these scores include them and are optimistic; pass --truth with labels of "
                    "patterns outside the training set for an unbiased estimate"
                )
        elif trained is not None and (known & ~trained).any():
            reason = (f"no pattern with known truth ({result['truth']}) outside the classifier's training set has "
                      "'predicted' yet (ingested since `predict` ran); run `airysort predict` again")
        else:
            reason = (f"every pattern with known truth ({result['truth']}) was used to train the "
                      f"classifier ({split_variable!r}); pass --truth with labels of other patterns to score it")
            if not clusterings:
                raise AirysortError(reason)
            result["classification_not_scored"] = reason  # the clusterings are still scored

    if clusterings:
        groups = coarse_group(truth)
        result["clustering"] = {}
        clustered_any = np.zeros_like(known)
        for name in clusterings:
            clusters = np.asarray(dataset[name].values)
            k = int(dataset[name].attrs.get("k", len(np.unique(clusters))))
            clustered = known & (clusters >= 0)  # -1: ingested after `cluster` ran
            clustered_any |= clustered
            result["clustering"][name.removeprefix("cluster_")] = clustering_scores(
                groups[clustered], clusters[clustered], k=k
            )
        result["coarse_groups"] = {
            str(g): int(n) for g, n in zip(*np.unique(groups[clustered_any], return_counts=True))
        }
    return result


def format_report(result: dict[str, Any]) -> str:
    """The evaluation as readable tables (per-class metrics, then clusterings)."""
    lines = []
    classification = result.get("classification")
    if classification:
        subset = {"held_out": "held-out", "all_labelled": "all labelled"}[classification["scored"]]
        lines.append(
            f"Classification: {classification['n']} {subset} patterns, truth = {result['truth']}"
            + (f" ({classification['excluded_training']} training patterns left out)"
               if classification["excluded_training"] else "")
            + (f" ({classification['not_predicted']} ingested since `predict` ran, not scored)"
               if classification.get("not_predicted") else "")
        )
        lines.append(f"{'class':<18}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}")
        for name, row in classification["per_class"].items():
            lines.append(
                f"{name:<18}{row['precision']:>10.3f}{row['recall']:>8.3f}{row['f1']:>8.3f}{row['support']:>9d}"
            )
        averaged = len(classification["macro_classes"])
        lines.append(f"micro F1 {classification['micro_f1']:.3f}   macro F1 {classification['macro_f1']:.3f} "
                     f"(over the {averaged} classes in the truth or the predictions)")
        groups = classification["groups"]
        lines.append(f"predicted coarse groups as a clustering: homogeneity {groups['homogeneity']:.3f}, "
                     f"completeness {groups['completeness']:.3f}, ARI {groups['ari']:.3f}, NMI {groups['nmi']:.3f}")
        if "note" in classification:
            lines.append(f"note: {classification['note']}")
    if "classification_not_scored" in result:
        lines.append(f"Classification not scored: {result['classification_not_scored']}")
    clustering = result.get("clustering")
    if clustering:
        if lines:
            lines.append("")
        groups = ", ".join(f"{g} {n}" for g, n in result["coarse_groups"].items())
        lines.append(f"Clustering against coarse groups ({groups}):")
        lines.append(f"{'method':<10}{'k':>4}{'homogeneity':>13}{'completeness':>14}{'ARI':>8}{'NMI':>8}")
        for method, row in clustering.items():
            lines.append(_clustering_row(method, row))
        if classification:
            row = classification["groups"]
            lines.append(_clustering_row("classifier", row) + "   (supervised reference: its predicted "
                         f"groups on the {row['n']} patterns above)")
    return "\n".join(lines)


def _clustering_row(name: str, row: dict[str, Any]) -> str:
    """One row of :func:`format_report`'s clustering table."""
    return (f"{name:<10}{row['k']:>4d}{row['homogeneity']:>13.3f}{row['completeness']:>14.3f}"
            f"{row['ari']:>8.3f}{row['nmi']:>8.3f}")
