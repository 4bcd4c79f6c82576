"""sort: index lists and galleries for a store with known predictions and clusters."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from pipeline import store
from pipeline.cli.main import app
from pipeline.errors import AirysortError
from pipeline.ingest import ingest
from pipeline.sort import export_patterns, sort_store
from pipeline.taxonomy import CLASS_NAMES, N_CLASSES
from tests.factories import random_frames, write_stacked_cxi


def classified_store(tmp_path, n=300):
    rng = np.random.default_rng(1)
    path = tmp_path / "s.zarr"
    ingest(path, [write_stacked_cxi(tmp_path / "a.cxi", random_frames(n, shape=(16, 16)),
                                    shot_ids=[f"shot{i}" for i in range(n)])], log=lambda line: None)
    prob = rng.uniform(size=(n, N_CLASSES)).astype(np.float32)
    predicted = (prob > 0.5).astype(np.int8)
    clusters = rng.integers(0, 3, n).astype(np.int32)
    store.write_variables(path, {
        "prob": xr.DataArray(prob, dims=("pattern", "class")),
        "predicted": xr.DataArray(predicted, dims=("pattern", "class")),
        "cluster_gmm": xr.DataArray(clusters, dims=("pattern",)),
    }, command="test", parameters={})
    return path, prob, predicted, clusters


def read_csv(path):
    with open(path) as stream:
        return list(csv.DictReader(stream))


@pytest.mark.parametrize("rows_per_write", [None, 7], ids=["default", "7-rows-at-a-time"])
def test_sort_lists_exactly_the_members(tmp_path, dask_threads, monkeypatch, rows_per_write):
    if rows_per_write:  # lists longer than the rows written at a time
        monkeypatch.setattr("pipeline.sort.ROWS_PER_WRITE", rows_per_write)
    path, prob, predicted, clusters = classified_store(tmp_path)
    summary = sort_store(path, tmp_path / "out")
    for c, name in enumerate(CLASS_NAMES):
        rows = read_csv(tmp_path / "out" / "classes" / f"{name.replace('/', '-')}.csv")
        patterns = [int(r["pattern"]) for r in rows]
        assert sorted(patterns) == list(np.flatnonzero(predicted[:, c]))
        probabilities = [float(r["probability"]) for r in rows]
        assert probabilities == sorted(probabilities, reverse=True)  # most confident first
        assert all(r["shot_id"] == f"shot{int(r['pattern'])}" and r["frame"] == r["pattern"] for r in rows)
        assert [r["probability"] for r in rows] == [f"{prob[p, c]:.4f}" for p in patterns]
        assert summary["classes"][name] == len(rows)
        assert (tmp_path / "out" / "classes" / f"{name.replace('/', '-')}.png").stat().st_size > 1000
    for k in range(3):
        rows = read_csv(tmp_path / "out" / "clusters" / "gmm" / f"cluster_{k}.csv")
        assert sorted(int(r["pattern"]) for r in rows) == list(np.flatnonzero(clusters == k))
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["clusters"]["gmm"] == {
        str(k): int((clusters == k).sum()) for k in range(3)}


def test_export_class_to_cxi_round_trips(tmp_path, dask_threads):
    path, prob, predicted, _ = classified_store(tmp_path)
    out = tmp_path / "round.cxi"
    count = export_patterns(path, "Round", out)
    members = np.flatnonzero(predicted[:, 1])
    assert count == len(members)
    raw = store.open_store(path).raw.values
    with h5py.File(out, "r") as h5:
        np.testing.assert_array_equal(h5["entry_1/data_1/data"][()], raw[members])
        np.testing.assert_array_equal(h5["entry_1/result_1/predicted"][()], predicted[members])
    # and it can be ingested again, as unlabelled patterns: predictions are not ground truth
    assert ingest(tmp_path / "again.zarr", [out], log=lambda line: None)["ingested"] == count
    assert (store.open_store(tmp_path / "again.zarr").label.values == -1).all()
    # A class nobody belongs to: one error, and no file.
    group = zarr.open_group(path, mode="r+")
    group["predicted"][:, CLASS_NAMES.index("Layered")] = 0
    with pytest.raises(AirysortError, match="no pattern is predicted as 'Layered'"):
        export_patterns(path, "Layered", tmp_path / "layered.cxi")
    assert not (tmp_path / "layered.cxi").exists()


def test_sort_command_and_clear_error(tmp_path, dask_threads):
    runner = CliRunner()
    path, *_ = classified_store(tmp_path)
    result = runner.invoke(app, ["sort", str(path), str(tmp_path / "o"), "--export", "round", "--json"])
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout.strip().splitlines()[-1])["exported"]
    assert exported["class"] == "Round" and exported["file"].endswith("Round.cxi")  # typed in any case
    # stderr is not a terminal here (as in a batch job's log): progress comes as plain lines,
    # one at the start and one at the end (11 classes + 3 clusters).
    progress = [line for line in result.stderr.splitlines() if line.startswith("sort: index lists")]
    assert progress[0].startswith("sort: index lists and galleries: 0/14") and "14/14" in progress[-1]
    bare = tmp_path / "bare.zarr"
    ingest(bare, [write_stacked_cxi(tmp_path / "b.cxi", random_frames(3))], log=lambda line: None)
    result = runner.invoke(app, ["sort", str(bare), str(tmp_path / "o2")])
    assert result.exit_code == 1 and "run 'airysort predict' or 'airysort cluster' first" in result.stderr
    # Output in the store's place, inside it, or where a file is: refused before writing.
    (tmp_path / "plain").write_text("x")
    for out, message in ((path, "is inside the store"), (path / "classes", "is inside the store"),
                         (tmp_path / "plain", "is a file, not a directory")):
        for command in ("sort", "report"):
            result = runner.invoke(app, [command, str(path), str(out)])
            assert result.exit_code == 1 and message in result.stderr, result.output
    assert not (path / "classes").exists() and not (path / "report.html").exists()


def test_patterns_ingested_after_the_results_are_in_no_class_or_cluster(tmp_path, dask_threads):
    """Results written before more frames were ingested cover the old patterns only: the
    new ones are in no cluster (-1, not the fill value 0), evaluate scores the old ones,
    and computing from a variable that does not cover them all is refused."""
    from pipeline.evaluate import evaluate_store
    from pipeline.labelsheet import write_label_csv
    from pipeline.taxonomy import multi_hot

    path, prob, predicted, clusters = classified_store(tmp_path)
    ingest(path, [write_stacked_cxi(tmp_path / "b.cxi", random_frames(20, shape=(16, 16), seed=5),
                                    shot_ids=[f"late{i}" for i in range(20)])], log=lambda line: None)
    dataset = store.open_store(path)
    assert dataset["cluster_gmm"].dtype == np.int32
    np.testing.assert_array_equal(dataset["cluster_gmm"].values, np.r_[clusters, [-1] * 20])
    summary = sort_store(path, tmp_path / "out")
    assert summary["clusters"]["gmm"] == {k: int((clusters == k).sum()) for k in range(3)}

    truth = np.array([multi_hot(["Spherical/Oblate", "Round"])] * 320, np.int8)
    csv_path = write_label_csv(tmp_path / "truth.csv", np.r_[[f"shot{i}" for i in range(300)],
                                                             [f"late{i}" for i in range(20)]], truth)
    result = evaluate_store(path, truth_csv=csv_path)
    assert result["classification"]["n"] == 300 and result["clustering"]["gmm"]["n"] == 300
    # Clustered again over all 320 patterns: the clustering is scored on all of them, the
    # classification still on the 300 `predict` covered.
    store.write_variables(path, {"cluster_gmm": xr.DataArray(np.r_[clusters, [1] * 20].astype(np.int32),
                                                             dims=("pattern",))}, command="cluster", parameters={})
    result = evaluate_store(path, truth_csv=csv_path)
    assert result["classification"]["n"] == 300 and result["clustering"]["gmm"]["n"] == 320

    with pytest.raises(AirysortError, match=r"'cluster_gmm' covers patterns 0..299 of the 320 .* run 'x' first"):
        store.require_every_pattern(dataset, "cluster_gmm", remedy="x")
    store.require_every_pattern(dataset, "raw", remedy="x")  # ingest wrote it for all
