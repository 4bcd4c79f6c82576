"""report: a self-contained HTML file that renders in headless Chromium without errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from pipeline import store
from pipeline.cli.main import app
from pipeline.ingest import ingest
from pipeline.taxonomy import REAL_COMBINATIONS, multi_hot
from tests.factories import random_frames, write_stacked_cxi


@pytest.fixture
def evaluated_store(tmp_path, dask_threads):
    n = 120
    rng = np.random.default_rng(0)
    # Label rows as a researcher could give them (taxonomy-consistent: evaluate leaves out
    # rows that `label` would reject), drawn from the real set's combinations.
    combinations = [names for _, names in REAL_COMBINATIONS]
    labels = np.stack([multi_hot(combinations[i]) for i in rng.integers(0, len(combinations), n)]).astype(np.int8)
    path = tmp_path / "s.zarr"
    ingest(path, [write_stacked_cxi(tmp_path / "a.cxi", random_frames(n, shape=(16, 16)), labels=labels)], log=lambda line: None)
    flip = rng.uniform(size=labels.shape) < 0.1
    predicted = np.where(flip, 1 - labels, labels).astype(np.int8)
    store.write_variables(path, {
        "prob": xr.DataArray(np.clip(predicted + rng.normal(0, 0.2, labels.shape), 0, 1).astype(np.float32), dims=("pattern", "class")),
        "predicted": xr.DataArray(predicted, dims=("pattern", "class")),
        "cluster_gmm": xr.DataArray(rng.integers(0, 3, n).astype(np.int32), dims=("pattern",)),
    }, command="test", parameters={})
    return path, labels, predicted


def test_report_sections_from_real_results(evaluated_store, tmp_path):
    path, labels, predicted = evaluated_store
    (tmp_path / "out" / "latent").mkdir(parents=True)
    from pipeline.gallery import contact_sheet

    contact_sheet(np.random.default_rng(0).uniform(size=(2, 8, 8)), tmp_path / "out" / "latent" / "map.png")
    result = CliRunner().invoke(app, ["report", str(path), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sections"] == ["Store", "Class distribution", "Classification", "Unsupervised sorting",
                                   "Latent space", "Cluster galleries", "Provenance"]
    document = (tmp_path / "out" / "report.html").read_text()
    assert "<td>input files</td><td class=\"num\">1</td>" in document
    assert "src=\"http" not in document and "<script" not in document  # self-contained
    from sklearn.metrics import f1_score

    assert f"{f1_score(labels, predicted, average='micro', zero_division=0):.3f}" in document
    # The clustering table ends with the classifier's groups as a supervised reference.
    assert "predicted groups (supervised reference, 120 scored patterns)" in document
    assert "<h3>Confusion matrices (one per class)</h3><img" in document


def test_report_renders_in_headless_chromium(evaluated_store, tmp_path, chromium_path):
    playwright = pytest.importorskip("playwright.sync_api")
    path, *_ = evaluated_store
    report = CliRunner().invoke(app, ["report", str(path), str(tmp_path / "out"), "--json"])
    html_file = json.loads(report.stdout.strip().splitlines()[-1])["report"]
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"file://{html_file}")
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        page.screenshot(path=str(tmp_path / "out" / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert len(sizes) >= 4 and all(complete and width > 0 for complete, width in sizes)
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_with_truth_scores_only_held_out_patterns(evaluated_store, tmp_path):
    from pipeline.labelsheet import write_label_csv

    path, labels, predicted = evaluated_store
    shot_ids = store.open_store(path).shot_id.values
    truth_csv = write_label_csv(tmp_path / "truth.csv", shot_ids, labels)
    trained = np.arange(len(labels)) < 30  # the researcher labelled 30 patterns
    store.write_pattern_variable_direct(path, "label", np.where(trained[:, None], labels, -1).astype(np.int8))
    result = CliRunner().invoke(app, ["report", str(path), str(tmp_path / "out"), "--truth", str(truth_csv)])
    assert result.exit_code == 0, result.output
    document = (tmp_path / "out" / "report.html").read_text()
    assert f"Scored on {len(labels) - 30} patterns (held out from training" in document
    from sklearn.metrics import f1_score

    held_out = ~trained
    assert f"{f1_score(labels[held_out], predicted[held_out], average='micro', zero_division=0):.3f}" in document
