"""``airysort watch``: files landing in a directory are ingested, preprocessed as the
model's training images were, and classified, one batch at a time, by region."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import store
from pipeline.classify import predict_store, train_classifier
from pipeline.cli.main import app
from pipeline.ingest import ingest
from pipeline.preprocess import preprocess_new, preprocess_store
from pipeline.simulate import simulate_beamtime
from pipeline.watch import landed, snapshot, watch
from tests.factories import repo_env

REPO = Path(__file__).resolve().parents[2]
SIZE, CROP = 32, 0.8  # the model's look, which watch must reproduce


@pytest.fixture(scope="module")
def beamtime(tmp_path_factory, dask_threads):
    """Three simulated files (training, then two 'new' ones) and a tiny classifier
    trained on the first, preprocessed to 32² with --crop 0.8."""
    root = tmp_path_factory.mktemp("watch")
    files = {}
    for name, n, seed in (("train", 48, 0), ("run_a", 20, 1), ("run_b", 20, 2)):
        files[name] = root / f"{name}.cxi"
        simulate_beamtime(files[name], n, size=64, seed=seed, profile="lcls", client=dask_threads)
    train_store = root / "train.zarr"
    ingest(train_store, [files["train"]], client=dask_threads, log=lambda line: None)
    preprocess_store(train_store, size=SIZE, crop=CROP)
    model_dir = root / "model"
    train_classifier(train_store, model_dir, depth=10, width=4, epochs=2, batch_size=16, patience=0,
                     log=lambda line: None)
    return root, files, model_dir


def test_landed_means_unchanged_between_two_looks(tmp_path):
    path = tmp_path / "run_0001.cxi"
    path.write_bytes(b"x" * 10)
    first = snapshot(tmp_path)
    with path.open("ab") as growing:  # the DAQ is still writing
        growing.write(b"y" * 10)
    second = snapshot(tmp_path)
    assert landed(first, second) == []
    (tmp_path / "notes.txt").write_text("not a detector file")
    third = snapshot(tmp_path)
    assert landed(second, third) == [str(path.resolve())]


def test_once_twice_processes_only_the_new_file(beamtime, tmp_path, dask_threads, capsys):
    root, files, model_dir = beamtime
    daq, run = tmp_path / "daq", tmp_path / "run.zarr"
    daq.mkdir()
    quiet = dict(once=True, log=lambda line: None)
    assert watch(daq, run, model_dir, **quiet)["batches"] == 0  # nothing there yet, no store made
    assert not run.exists()

    shutil.copy(files["run_a"], daq)
    first = watch(daq, run, model_dir, **quiet)
    assert first["ingested"] == first["predicted"] == first["patterns"] == 20
    parameters = store.last_parameters(store.read_attrs(run), "preprocess")
    assert parameters["size"] == SIZE and parameters["crop"] == CROP  # the model's look
    before = store.open_store(run)[["image", "prob"]].load()

    shutil.copy(files["run_b"], daq)
    capsys.readouterr()
    second = watch(daq, run, model_dir, **quiet)
    assert second["files"] == 1 and second["ingested"] == second["predicted"] == 20
    # Mid-batch the results cover only the first file until watch extends them: no
    # warning telling the user to run the commands again.
    assert "do not cover all" not in capsys.readouterr().err
    assert second["patterns"] == 40 and sum(second["counts"].values()) > 0
    after = store.open_store(run)[["image", "prob", "predicted", "hit"]].load()
    # The first file's results are left as they were, bit for bit; the new ones are filled.
    np.testing.assert_array_equal(after["prob"].values[:20], before["prob"].values)
    np.testing.assert_array_equal(after["image"].values[:20], before["image"].values)
    assert np.isfinite(after["prob"].values).all() and np.isfinite(after["image"].values).all()
    # One provenance entry per stage for the whole watch, its pattern range extended by
    # each file (a beamtime of thousands of files keeps a short provenance).
    provenance = store.read_attrs(run)["provenance"]
    assert [(e["command"], e.get("patterns")) for e in provenance] == [
        ("ingest", None), ("preprocess", [0, 40]), ("predict", [0, 40]), ("ingest", None)]

    # Oracle: the same stages over the whole store at once give the same images and
    # probabilities (same run-level corrections, same model).
    preprocess_new(run, start=0)
    predict_store(run, model_dir, cluster="local-threads")
    whole = store.open_store(run)[["image", "prob"]].load()
    np.testing.assert_array_equal(whole["image"].values, after["image"].values)
    np.testing.assert_allclose(whole["prob"].values, after["prob"].values, atol=1e-5)

    # Nothing new: a third look changes nothing.
    third = watch(daq, run, model_dir, **quiet)
    assert third["ingested"] == third["predicted"] == 0 and third["patterns"] == 40


def test_a_killed_batch_is_finished_by_the_next(beamtime, tmp_path, dask_threads):
    """Patterns ingested by a watch killed before it classified them are done next time."""
    root, files, model_dir = beamtime
    daq, run = tmp_path / "daq", tmp_path / "run.zarr"
    daq.mkdir()
    shutil.copy(files["run_a"], daq)
    watch(daq, run, model_dir, once=True, log=lambda line: None)
    ingest(run, [files["run_b"]], client=dask_threads, log=lambda line: None)  # then the kill
    result = watch(daq, run, model_dir, once=True, log=lambda line: None)
    assert result["ingested"] == 0 and result["predicted"] == 20
    assert np.isfinite(store.open_store(run)["prob"].values).all()
    assert result["hits"] == store.read_pattern_values(run, "hit", start=20).sum() > 0

    # Killed after preprocessing the next file, before classifying it: the batch that
    # classifies those patterns reports their hits too.
    ingest(run, [files["run_b"]], client=dask_threads, force=True, log=lambda line: None)
    preprocess_new(run, start=40)
    result = watch(daq, run, model_dir, once=True, log=lambda line: None)
    assert result["ingested"] == 0 and result["predicted"] == 20
    assert result["hits"] == store.read_pattern_values(run, "hit", start=40).sum() > 0


def test_an_unreadable_first_file_does_not_stop_the_watch(beamtime, tmp_path):
    root, files, model_dir = beamtime
    daq, run = tmp_path / "daq", tmp_path / "run.zarr"
    daq.mkdir()
    (daq / "run_0.cxi").write_bytes(b"truncated by the DAQ")
    lines = []
    result = watch(daq, run, model_dir, once=True, log=lines.append)
    assert result["rejected"] == 1 and result["patterns"] == 0 and not store.is_store(run)
    assert any("run_0.cxi" in line for line in lines)
    shutil.copy(files["run_a"], daq)
    assert watch(daq, run, model_dir, once=True, log=lines.append)["predicted"] == 20


def test_cli_polls_until_interrupted(beamtime, tmp_path):
    """A real ``airysort watch`` process: a file moved into the directory (as a DAQ
    finishing a file under another name would) is classified; Ctrl-C, even while the
    batch is still being written, lets it finish and be counted, then stops."""
    root, files, model_dir = beamtime
    daq, run = tmp_path / "daq", tmp_path / "run.zarr"
    daq.mkdir()
    env = repo_env()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "watch", str(daq), str(run), str(model_dir),
         "--interval", "0.5", "--cluster", "local-threads", "--json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    shutil.copy(files["run_a"], daq / "run_a.cxi.part")
    os.replace(daq / "run_a.cxi.part", daq / "run_a.cxi")
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        if store.is_store(run) and any(e["command"] == "predict" for e in store.read_attrs(run).get("provenance", [])):
            break
        time.sleep(0.5)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["batches"] == 1 and result["files"] == 1 and result["predicted"] == 20
    assert "1 new file(s): 20 patterns ingested" in stderr
    assert "stopping after the batch in hand" in stderr and stderr.rstrip().endswith("stopped")


def test_user_errors(beamtime, tmp_path):
    root, files, model_dir = beamtime
    outcome = CliRunner().invoke(app, ["watch", str(tmp_path / "missing"), str(tmp_path / "r.zarr"), str(model_dir),
                                       "--cluster", "local-threads"])
    assert outcome.exit_code == 1 and "is not a directory to watch" in outcome.stderr
    outcome = CliRunner().invoke(app, ["watch", str(tmp_path), str(tmp_path / "r.zarr"), str(root),
                                       "--once", "--cluster", "local-threads"])
    assert outcome.exit_code == 1 and "holds no trained model" in outcome.stderr
