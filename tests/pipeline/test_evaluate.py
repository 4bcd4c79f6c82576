"""``airysort evaluate``: classification and clustering scores against known truth."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from sklearn.metrics import adjusted_rand_score, completeness_score, homogeneity_score
from typer.testing import CliRunner

from pipeline import store
from pipeline.cli.main import app
from pipeline.evaluate import classification_scores, clustering_scores
from pipeline.ingest import ingest
from pipeline.taxonomy import CLASS_NAMES, N_CLASSES, coarse_group, multi_hot, taxonomy_problem

COMBINATIONS = [
    ("Spherical/Oblate", "Round"),
    ("Spherical/Oblate", "Elliptical", "Asymmetric"),
    ("Prolate", "Streak", "Bent"),
    ("Spherical/Oblate", "Round", "DoubleRings"),
    ("Empty",),
]


def counted_scores(truth: np.ndarray, predicted: np.ndarray, column: int) -> tuple[float, float, float]:
    """Precision, recall, F1 of one class by counting, as the scikit-learn-free reference."""
    t, p = truth[:, column] == 1, predicted[:, column] == 1
    tp, fp, fn = (t & p).sum(), (~t & p).sum(), (t & ~p).sum()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def run_json(*args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def evaluated_store(tmp_path_factory, dask_threads):
    """A store with labels (some unknown), noisy predictions, a train/test split and
    two clusterings: one that is exactly the coarse groups (relabelled), one random."""
    rng = np.random.default_rng(7)
    n = 500
    tmp = tmp_path_factory.mktemp("evaluate")
    np.save(tmp / "frames.npy", rng.integers(0, 50, size=(n, 6, 6)).astype(np.uint16))
    path = tmp / "beamtime.zarr"
    ingest(path, [tmp / "frames.npy"], client=dask_threads, log=lambda line: None)
    truth = np.stack([multi_hot(COMBINATIONS[i]) for i in rng.integers(0, len(COMBINATIONS), n)])
    predicted = np.where(rng.random(truth.shape) < 0.1, 1 - truth, truth).astype(np.int8)
    label = truth.copy()
    label[:50] = -1  # unlabelled patterns
    role = np.where(rng.random(n) < 0.6, "train", "test").astype(np.dtypes.StringDType())
    groups = coarse_group(truth)
    relabel = {g: i for i, g in enumerate(["round", "prolate", "empty", "double", "elliptical"])}
    perfect = np.array([relabel[g] for g in groups], dtype=np.int32) * 3 + 1  # arbitrary ids
    store.write_variables(
        path,
        {
            "label": xr.DataArray(label, dims=("pattern", "class")),
            "predicted": xr.DataArray(predicted, dims=("pattern", "class")),
            "cluster_gmm": xr.DataArray(perfect, dims=("pattern",), attrs={"k": 5}),
            "cluster_spectral": xr.DataArray(rng.integers(0, 6, n).astype(np.int32), dims=("pattern",)),
        },
        command="test-fixture",
        parameters={},
    )
    return {"path": path, "truth": truth, "predicted": predicted, "label": label, "role": role, "tmp": tmp}


class TestScores:
    def test_classification_matches_counting(self):
        rng = np.random.default_rng(0)
        truth = rng.integers(0, 2, (200, N_CLASSES))
        predicted = np.where(rng.random(truth.shape) < 0.2, 1 - truth, truth)
        predicted[:, 9] = 0  # a class never predicted: precision 0 by convention, no warning
        scores = classification_scores(truth, predicted)
        for i, name in enumerate(CLASS_NAMES):
            expected = counted_scores(truth, predicted, i)
            row = scores["per_class"][name]
            assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(expected)
            assert row["support"] == truth[:, i].sum()
        tp = (truth & predicted).sum()
        micro = 2 * tp / (truth.sum() + predicted.sum())
        assert scores["micro_f1"] == pytest.approx(micro)
        assert scores["macro_f1"] == pytest.approx(np.mean([counted_scores(truth, predicted, i)[2] for i in range(11)]))
        assert scores["n"] == 200

    def test_macro_f1_leaves_out_classes_absent_from_truth_and_predictions(self):
        # A small-angle beamtime has no Bent or Asymmetric patterns: they must not count
        # as F1 0 in the macro average. A class predicted but never true does count (F1 0).
        rng = np.random.default_rng(3)
        truth = rng.integers(0, 2, (300, N_CLASSES))
        predicted = np.where(rng.random(truth.shape) < 0.2, 1 - truth, truth)
        truth[:, [5, 6]] = 0
        predicted[:, 5] = 0
        predicted[:40, 6] = 1
        scores = classification_scores(truth, predicted)
        averaged = [i for i in range(N_CLASSES) if i != 5]
        assert scores["macro_classes"] == [CLASS_NAMES[i] for i in averaged]
        assert scores["per_class"]["Asymmetric"]["f1"] == 0.0
        assert scores["macro_f1"] == pytest.approx(
            np.mean([counted_scores(truth, predicted, i)[2] for i in averaged]))

    def test_clustering_is_invariant_to_cluster_names(self):
        groups = np.array(["round", "round", "empty", "prolate", "prolate", "empty"])
        renamed = clustering_scores(groups, np.array([7, 7, 0, 3, 3, 0]), k=3)
        assert {renamed[m] for m in ("homogeneity", "completeness", "ari", "nmi")} == {1.0}
        merged = clustering_scores(groups, np.array([0, 0, 0, 1, 1, 0]), k=2)
        assert merged["completeness"] == pytest.approx(1.0) and merged["homogeneity"] < 0.7


class TestEvaluateCommand:
    def test_json_schema_and_values_against_store_labels(self, evaluated_store):
        result = run_json("evaluate", str(evaluated_store["path"]))
        known = (evaluated_store["label"] >= 0).all(axis=1)
        classification = result["classification"]
        assert classification["scored"] == "all_labelled" and classification["n"] == known.sum()
        assert "optimistic" in classification["note"]  # the store does not say what trained it
        assert set(classification["per_class"]) == set(CLASS_NAMES)
        assert set(classification["per_class"]["Round"]) == {"precision", "recall", "f1", "support"}
        truth, predicted = evaluated_store["truth"][known], evaluated_store["predicted"][known]
        assert classification["per_class"]["Prolate"]["f1"] == pytest.approx(counted_scores(truth, predicted, 3)[2])
        assert {"micro_f1", "macro_f1"} <= set(classification)
        clustering = result["clustering"]
        assert set(clustering) == {"gmm", "spectral"}
        assert clustering["gmm"]["k"] == 5
        for metric in ("homogeneity", "completeness", "ari", "nmi"):
            assert clustering["gmm"][metric] == pytest.approx(1.0)
            assert abs(clustering["spectral"][metric]) < 0.1  # random assignment
        assert clustering["gmm"]["n"] == known.sum()

    def test_training_patterns_are_left_out_when_recorded(self, evaluated_store, dask_threads, tmp_path):
        path = tmp_path / "split.zarr"
        shutil.copytree(evaluated_store["path"], path)  # the other tests see no split
        role = evaluated_store["role"]
        store.write_variables(
            path, {"label_role": xr.DataArray(role, dims=("pattern",))}, command="test-fixture", parameters={}
        )
        result = run_json("evaluate", str(path))
        known = (evaluated_store["label"] >= 0).all(axis=1)
        held_out = known & (role == "test")
        classification = result["classification"]
        assert classification["scored"] == "held_out"
        assert classification["n"] == held_out.sum()
        assert classification["excluded_training"] == (known & (role == "train")).sum()
        truth, predicted = evaluated_store["truth"][held_out], evaluated_store["predicted"][held_out]
        assert classification["per_class"]["Round"]["recall"] == pytest.approx(counted_scores(truth, predicted, 1)[1])
        # Clustering is unsupervised: still scored on every labelled pattern.
        assert result["clustering"]["gmm"]["n"] == known.sum()
        # The classifier's coarse groups, scored like a clustering on the held-out patterns.
        true_groups, predicted_groups = coarse_group(truth), coarse_group(predicted)
        assert (true_groups != predicted_groups).any()  # 10 % flipped labels move some groups
        groups = classification["groups"]
        assert groups["n"] == held_out.sum() and groups["k"] == len(set(predicted_groups))
        assert groups["homogeneity"] == pytest.approx(homogeneity_score(true_groups, predicted_groups))
        assert groups["completeness"] == pytest.approx(completeness_score(true_groups, predicted_groups))
        assert groups["ari"] == pytest.approx(adjusted_rand_score(true_groups, predicted_groups))
        assert 0.3 < groups["ari"] < 1.0

    def test_patterns_ingested_since_predict_are_counted_apart_from_training_patterns(
            self, evaluated_store, dask_threads, tmp_path):
        path = tmp_path / "grown.zarr"
        shutil.copytree(evaluated_store["path"], path)
        np.save(tmp_path / "more.npy", np.ones((20, 6, 6), np.uint16))
        ingest(path, [tmp_path / "more.npy"], client=dask_threads, log=lambda line: None)
        label = np.concatenate([evaluated_store["label"], evaluated_store["truth"][:20]])
        store.write_variables(path, {"label": xr.DataArray(label, dims=("pattern", "class"))},
                              command="label", parameters={})
        result = run_json("evaluate", str(path))
        known = (evaluated_store["label"] >= 0).all(axis=1)
        classification = result["classification"]
        assert classification["n"] == known.sum()
        assert classification["excluded_training"] == 0 and classification["not_predicted"] == 20
        # The groups' counts are those of the patterns the clusterings were scored on.
        assert sum(result["coarse_groups"].values()) == result["clustering"]["gmm"]["n"] == known.sum()
        human = CliRunner().invoke(app, ["evaluate", str(path)]).stderr
        assert "(20 ingested since `predict` ran, not scored)" in human and "training patterns left out" not in human

    def test_truth_csv_overrides_store_labels(self, evaluated_store):
        truth = evaluated_store["truth"]
        shot_ids = store.open_store(evaluated_store["path"])["shot_id"].values.tolist()
        rows = np.arange(0, 300, 2)
        table = pd.DataFrame(truth[rows], columns=list(CLASS_NAMES))
        table.insert(0, "shot_id", [f" {shot_ids[i]} " for i in rows])  # spaces around, as hand-edited
        table.loc[len(table)] = ["not-in-store", *([0] * N_CLASSES)]
        csv = evaluated_store["tmp"] / "truth.csv"
        table.to_csv(csv, index=False, encoding="utf-8-sig")  # with a byte-order mark, as from Excel
        result = run_json("evaluate", str(evaluated_store["path"]), "--truth", str(csv))
        assert result["truth"] == str(csv) and result["truth_unmatched_rows"] == 1
        assert "note" not in result["classification"]
        # patterns labelled in the store trained the classifier: only the others are scored
        held_out = rows[(evaluated_store["label"][rows] < 0).any(axis=1)]
        assert result["classification"]["n"] == len(held_out) == 25
        assert result["classification"]["scored"] == "held_out"
        expected = counted_scores(truth[held_out], evaluated_store["predicted"][held_out], 0)
        assert result["classification"]["per_class"]["Spherical/Oblate"]["precision"] == pytest.approx(expected[0])
        # The same truth as two sheets joined with `cat`, the shot_id header typed by hand:
        # read as `airysort label` reads it, the same scores.
        lines = csv.read_text(encoding="utf-8-sig").splitlines()
        header = "Shot_ID" + lines[0][len("shot_id"):]
        joined = evaluated_store["tmp"] / "joined.csv"
        joined.write_text("\n".join([header, *lines[1:60], header, *lines[60:]]) + "\n")
        again = run_json("evaluate", str(evaluated_store["path"]), "--truth", str(joined))
        assert again["classification"] == result["classification"]
        # Rows `label` rejects (an unfilled row, classes that exclude each other, a blank
        # cell, a typo) are left out and named, not scored; the other rows still count.
        bad = table.astype(object)
        bad.loc[0, list(CLASS_NAMES)] = 0
        bad.loc[1, list(CLASS_NAMES)] = 1
        bad.loc[2, "Streak"] = ""
        bad.loc[3, "Empty"] = "x"
        bad.loc[4:, list(CLASS_NAMES)] = bad.loc[4:, list(CLASS_NAMES)].astype(float)  # 1.0, as pandas writes floats
        bad.to_csv(evaluated_store["tmp"] / "bad.csv", index=False)
        # A row cut short and a shot listed twice: named by their lines, the first row kept.
        with open(evaluated_store["tmp"] / "bad.csv", "a") as handle:
            handle.write(f"{shot_ids[rows[5]]},1,0\n" + bad.iloc[[6]].to_csv(index=False, header=False))
        scored = run_json("evaluate", str(evaluated_store["path"]), "--truth", str(evaluated_store["tmp"] / "bad.csv"))
        bad_rows = scored["truth_bad_rows"]
        assert len(bad_rows) == 6 and bad_rows[0].startswith("line 2: no class set")
        assert bad_rows[1] == f"line 3: {taxonomy_problem(np.ones(11, np.int8))}; left out"  # one reason, one action
        assert bad_rows[2] == "line 4: value '' for class 'Streak' is not 0 or 1; left out"
        assert bad_rows[3] == "line 5: value 'x' for class 'Empty' is not 0 or 1; left out"
        last = len(table) + 3  # the header, the table's rows, the short row, the repeated one
        assert bad_rows[4] == f"line {last - 1}: has 3 fields, the header has 12; left out"
        assert bad_rows[5].startswith(f"line {last}: duplicate shot_id '{shot_ids[rows[6]]}' (first on line 8)")
        left_out = sum(1 for row in rows[:4] if (evaluated_store["label"][row] < 0).any())
        assert scored["classification"]["n"] == result["classification"]["n"] - left_out

    def test_classifier_trained_on_every_truth_pattern_leaves_the_clusterings_scored(self, evaluated_store, tmp_path):
        """A store labelled throughout (simulated or CXIDB 94 files carry labels): the
        classifier cannot be scored, the clusterings still are; with nothing else, an error."""
        path = tmp_path / "all-labelled.zarr"
        shutil.copytree(evaluated_store["path"], path)
        truth = evaluated_store["truth"]
        group = zarr.open_group(path, mode="r+")
        group["label"][:] = truth
        shot_ids = group["shot_id"][:].tolist()
        csv = tmp_path / "truth.csv"
        pd.DataFrame(truth, columns=list(CLASS_NAMES)).assign(shot_id=shot_ids)[
            ["shot_id", *CLASS_NAMES]].to_csv(csv, index=False)
        result = run_json("evaluate", str(path), "--truth", str(csv))
        assert "classification" not in result
        assert "used to train the classifier" in result["classification_not_scored"]
        assert result["clustering"]["gmm"]["n"] == len(truth)
        human = CliRunner().invoke(app, ["evaluate", str(path), "--truth", str(csv)])
        assert human.exit_code == 0 and "Classification not scored" in human.stderr
        report = CliRunner().invoke(app, ["report", str(path), str(tmp_path / "report"), "--truth", str(csv)])
        assert report.exit_code == 0, report.output
        assert "Not scored: every pattern with known truth" in (tmp_path / "report" / "report.html").read_text()
        for name in ("cluster_gmm", "cluster_spectral"):
            shutil.rmtree(path / name)
        store.consolidate(path)
        refused = CliRunner().invoke(app, ["evaluate", str(path), "--truth", str(csv)])
        assert refused.exit_code == 1 and "used to train the classifier" in refused.stderr

    def test_human_table_lists_classes_and_methods(self, evaluated_store):
        result = CliRunner().invoke(app, ["evaluate", str(evaluated_store["path"])])
        assert result.exit_code == 0, result.output
        assert "DoubleRings" in result.stderr and "macro F1" in result.stderr
        assert "homogeneity" in result.stderr and "spectral" in result.stderr and "gmm" in result.stderr
        assert "predicted coarse groups as a clustering" in result.stderr
        assert "supervised reference" in result.stderr.splitlines()[-1]

    def test_bad_csv_header_is_one_error_line(self, evaluated_store):
        csv = evaluated_store["tmp"] / "bad.csv"
        csv.write_text("shot_id,Round\na,1\n")
        result = CliRunner().invoke(app, ["evaluate", str(evaluated_store["path"]), "--truth", str(csv)])
        assert result.exit_code == 1
        assert result.stderr.startswith("ERROR: ") and "Spherical/Oblate" in result.stderr
        for text, message in [("", "is empty"), ("shot_id," + ",".join(CLASS_NAMES) + "\n", "header but no rows")]:
            csv.write_text(text)
            result = CliRunner().invoke(app, ["evaluate", str(evaluated_store["path"]), "--truth", str(csv)])
            assert result.exit_code == 1 and result.stderr.startswith("ERROR: ") and message in result.stderr

    def test_store_without_results_says_what_to_run(self, tmp_path, dask_threads):
        np.save(tmp_path / "f.npy", np.zeros((3, 4, 4), np.uint16))
        ingest(tmp_path / "s.zarr", [tmp_path / "f.npy"], client=dask_threads, log=lambda line: None)
        result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "s.zarr")])
        assert result.exit_code == 1 and "airysort cluster" in result.stderr
