"""label --sheet: a diverse subset, contact sheets, and a CSV that label imports back."""

from __future__ import annotations

import csv
import json

import numpy as np
import xarray as xr
from typer.testing import CliRunner

from pipeline import store
from pipeline.cli.main import app
from pipeline.ingest import ingest
from pipeline.taxonomy import CLASS_NAMES
from tests.factories import random_frames, write_stacked_cxi


def test_sheet_spreads_over_clusters_and_round_trips(tmp_path, dask_threads):
    n = 400
    path = tmp_path / "s.zarr"
    ingest(path, [write_stacked_cxi(tmp_path / "a.cxi", random_frames(n, shape=(16, 16)))], log=lambda line: None)
    clusters = np.where(np.arange(n) < 380, 0, 1 + np.arange(n) % 2).astype(np.int32)  # two rare clusters
    store.write_variables(path, {"cluster_gmm": xr.DataArray(clusters, dims=("pattern",))}, command="test", parameters={})
    runner = CliRunner()
    result = runner.invoke(app, ["label", "--sheet", str(path), str(tmp_path / "sheet"), "--n", "12", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    chosen = np.asarray(summary["patterns"])
    assert len(chosen) == 12 and len(set(chosen)) == 12
    assert {0, 1, 2} <= set(clusters[chosen])  # the rare clusters are represented
    assert summary["grouping"] == "cluster_gmm" and all((tmp_path / "sheet").glob("sheet_01.png"))
    with open(summary["csv"]) as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["shot_id", *CLASS_NAMES] and len(rows) == 13
    # Asking for a sheet again must not overwrite one that may be filled in already.
    again = runner.invoke(app, ["label", "--sheet", str(path), str(tmp_path / "sheet"), "--n", "12"])
    assert again.exit_code == 1 and "may hold labels filled in already" in again.stderr
    # The sheet as written (nothing filled in) imports nothing, and says so with its status.
    provenance = store.read_attrs(path)["provenance"]
    untouched = runner.invoke(app, ["label", str(path), summary["csv"], "--json"])
    assert untouched.exit_code == 1 and json.loads(untouched.stdout.strip().splitlines()[-1])["imported"] == 0
    assert store.read_attrs(path)["provenance"] == provenance  # and leaves the store as it was
    assert "lines 2-13 (12 rows): no class set" in untouched.stderr  # one line, not twelve
    # the researcher fills in all rows but the last and imports the sheet
    rows[1][1 + CLASS_NAMES.index("Spherical/Oblate")] = rows[1][1 + CLASS_NAMES.index("Round")] = "1"
    for row in rows[2:-1]:
        row[1 + CLASS_NAMES.index("Empty")] = "1"
    with open(summary["csv"], "w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    imported = runner.invoke(app, ["label", str(path), summary["csv"], "--json"])
    assert imported.exit_code == 0, imported.output
    counts = json.loads(imported.stdout.strip().splitlines()[-1])
    assert (counts["imported"], counts["bad_rows"]) == (11, 1)
    assert "line 13: no class set" in imported.stderr  # the row left as the sheet wrote it
    labels = store.open_store(path).label.values
    assert (labels >= 0).all(axis=1).sum() == 11
    assert labels[chosen[0], CLASS_NAMES.index("Round")] == 1 and (labels[chosen[-1]] == -1).all()
