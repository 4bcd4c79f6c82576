"""Supervised classification end to end through the CLI: label, train (killed and
resumed), predict, explain; plus the label importer's error reporting."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import xarray as xr
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from pipeline import store
from pipeline.cli.main import app
from pipeline.errors import AirysortError
from pipeline.ingest import ingest
from pipeline.taxonomy import CLASS_NAMES, decide, multi_hot
from tests.factories import cli_with_ctrl_c, repo_env, xla_flags

REPO = Path(__file__).resolve().parents[2]

#: Rotation-invariant motifs of the synthetic store and their label combinations.
COMBINATIONS = [
    ("Empty",),
    ("Spherical/Oblate", "Round"),
    ("Spherical/Oblate", "Round", "NewtonRings"),
]


def make_ring_store(path: Path, n: int = 240, *, seed: int = 0, client=None) -> np.ndarray:
    """A store of ``n`` 32×32 images: noise (Empty), one ring (Round), two rings
    (Round + NewtonRings). Returns the true labels, shape (n, 11)."""
    rng = np.random.default_rng(seed)
    np.save(path.parent / "frames.npy", rng.integers(0, 50, size=(n, 8, 8)).astype(np.uint16))
    ingest(path, [path.parent / "frames.npy"], client=client, log=lambda line: None)
    kind = rng.integers(0, len(COMBINATIONS), size=n)
    yy, xx = np.mgrid[:32, :32] - 15.5
    radius = np.hypot(yy, xx)
    inner, outer = (np.exp(-((radius - r) ** 2) / 2) for r in (5.0, 11.0))
    images = rng.normal(0.0, 0.3, size=(n, 32, 32))
    images += (kind >= 1)[:, None, None] * inner + (kind == 2)[:, None, None] * outer
    store.write_variables(
        path, {"image": xr.DataArray(images.astype(np.float32), dims=("pattern", "iy", "ix"))},
        command="test-fixture", parameters={"seed": seed},
    )
    return np.stack([multi_hot(COMBINATIONS[k]) for k in kind])


def write_label_csv(path: Path, shot_ids, labels, extra_lines=()) -> Path:
    lines = ["shot_id," + ",".join(CLASS_NAMES)]
    lines += [f"{s}," + ",".join(str(int(v)) for v in row) for s, row in zip(shot_ids, labels)]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def ring_store(tmp_path_factory, dask_threads):
    path = tmp_path_factory.mktemp("classify") / "rings.zarr"
    truth = make_ring_store(path, client=dask_threads)
    return path, truth


class TestLabel:
    def test_bad_rows_are_reported_and_counted(self, tmp_path, dask_threads):
        path = tmp_path / "s.zarr"
        truth = make_ring_store(path, n=12, client=dask_threads)
        shots = store.open_store(path)["shot_id"].values.astype(object)
        csv = write_label_csv(tmp_path / "labels.csv", shots[:4], truth[:4], extra_lines=[
            "no-such-shot," + ",".join(["0"] * 11),
            f"{shots[5]}," + ",".join(["0"] * 10 + ["2"]),
            f"{shots[0]}," + ",".join(["1"] * 11),
            f"{shots[6]},1,0",
            f"{shots[8]}," + ",".join(str(v) for v in multi_hot(["Round"])),  # without Spherical/Oblate
            f"{shots[9]}," + ",".join(str(v) for v in multi_hot(["Empty", "Prolate"])),
        ])
        result = run_cli("label", path, csv, "--json")
        assert result.exit_code == 0, result.output
        counts = json.loads(result.stdout.strip().splitlines()[-1])
        assert (counts["rows"], counts["imported"], counts["bad_rows"]) == (10, 4, 6)
        assert "Round without its super-class Spherical/Oblate" in result.stderr
        assert "Empty (no hit) with other classes" in result.stderr
        assert counts["labelled"] == 4
        assert "unknown shot_id 'no-such-shot'" in result.stderr
        assert "value '2' for class 'Empty' is not 0 or 1" in result.stderr
        assert "duplicate shot_id" in result.stderr
        assert "has 3 fields" in result.stderr
        label = store.open_store(path)["label"].values
        np.testing.assert_array_equal(label[:4], truth[:4])
        assert (label[4:] == -1).all()

        # A second CSV adds labels and keeps the earlier ones; unknown columns are reported.
        # Written as Excel's "CSV UTF-8" writes it, with a byte-order mark, and a header typed by hand.
        csv2 = tmp_path / "more.csv"
        # Two sheets joined with `cat`: the second header is skipped, not a bad row.
        header = "Shot_ID," + ",".join(CLASS_NAMES) + ",Comment\n"
        csv2.write_text(header + f"{shots[7]}," + ",".join(str(v) for v in truth[7]) + ",nice\n"
                        + header.lower() + f"{shots[10]}," + ",".join(str(v) for v in truth[10]) + ",\n",
                        encoding="utf-8-sig")
        result = run_cli("label", path, csv2, "--json")
        assert result.exit_code == 0, result.output
        counts = json.loads(result.stdout.strip().splitlines()[-1])
        assert (counts["rows"], counts["imported"], counts["bad_rows"], counts["labelled"]) == (2, 2, 0, 6)
        assert "column 'Comment' is not a class" in result.stderr
        assert "line 3: the header again" in result.stderr
        label = store.open_store(path)["label"].values
        np.testing.assert_array_equal(label[[0, 1, 2, 3, 7, 10]], truth[[0, 1, 2, 3, 7, 10]])

    def test_missing_class_column_is_one_error_line(self, ring_store, tmp_path):
        path, _ = ring_store
        csv = tmp_path / "bad.csv"
        csv.write_text("shot_id,Round\nx,1\n")
        result = run_cli("label", path, csv)
        assert result.exit_code == 1
        assert result.stderr.startswith("ERROR:") and "Spherical/Oblate" in result.stderr
        csv.write_text("shot_id," + ",".join(CLASS_NAMES) + ",Round\n")  # which Round counts?
        result = run_cli("label", path, csv)
        assert result.exit_code == 1 and "has the column(s) ['Round'] more than once" in result.stderr
        result = run_cli("label", path, tmp_path)
        assert result.exit_code == 1 and "is a directory, not a CSV file" in result.stderr


def test_label_train_killed_resume_predict_explain(ring_store, tmp_path):
    path, truth = ring_store
    shots = store.open_store(path)["shot_id"].values.astype(object)
    labelled = np.arange(0, len(truth), 2)  # half of the patterns are labelled
    csv = write_label_csv(tmp_path / "labels.csv", shots[labelled], truth[labelled])
    assert run_cli("label", path, csv).exit_code == 0

    model_dir = tmp_path / "model"
    train_args = ["train", path, model_dir, "--model", "cnn", "--depth", "10", "--width", "4",
                  "--batch-size", "24", "--learning-rate", "5e-3", "--patience", "0"]
    # A real `airysort train` process, killed with SIGKILL once it has checkpointed.
    env = repo_env()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", *map(str, train_args),
                                "--epochs", "500", "--checkpoint-every", "2"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = model_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if checkpoints.exists() and any(p.name.isdigit() and ocp.step.is_checkpoint_finalized(p)
                                        for p in checkpoints.iterdir()):
            break  # a complete checkpoint is on disk
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (model_dir / "best").exists() or "thresholds" not in json.loads(
        (model_dir / "model.json").read_text())

    # Resumed with options that do not change the model: more epochs, TF32 allowed.
    result = run_cli(*train_args, "--epochs", "12", "--checkpoint-every", "100", "--precision", "default", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert "resuming from step" in result.stderr
    assert summary["resumed_from"] >= 2
    assert summary["steps"] == 12 * 4  # 102 training patterns, batches of 24
    assert summary["n_train"] + summary["n_valid"] == len(labelled)
    assert "patterns/s" in result.stderr and "validation loss" in result.stderr
    info = json.loads((model_dir / "model.json").read_text())
    assert len(info["thresholds"]) == 11 and info["model_id"].startswith("cnn-")
    assert (info["train"]["epochs"], info["train"]["precision"]) == (12, "default")

    result = run_cli("predict", path, model_dir, "--cluster", "local-threads", "--json")
    assert result.exit_code == 0, result.output
    dataset = store.open_store(path)
    prob, predicted = dataset["prob"].values, dataset["predicted"].values
    assert prob.dtype == np.float32 and predicted.dtype == np.int8
    assert prob.shape == predicted.shape == (len(truth), 11)
    np.testing.assert_array_equal(predicted, decide(prob, np.asarray(info["thresholds"])))
    unlabelled = np.setdiff1d(np.arange(len(truth)), labelled)
    micro = f1_score(truth[unlabelled], predicted[unlabelled], average="micro")
    assert micro > 0.9, micro
    provenance = store.read_attrs(path)["provenance"][-1]
    assert provenance["command"] == "predict"
    assert provenance["parameters"]["model_id"] == info["model_id"]
    assert set(provenance["parameters"]["thresholds"]) == set(CLASS_NAMES)

    out = tmp_path / "explain"
    result = run_cli("explain", path, model_dir, "--index", "1", "--index", "4", "--index", "1", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout.strip().splitlines()[-1])["files"]
    assert files and all(Path(f).stat().st_size > 1000 for f in files)
    assert len(files) == len(set(files)) == len(list(out.glob("*.png")))  # index 1 once
    assert {Path(f).name.split("_")[0] for f in files} == {"pattern000001", "pattern000004"}

    result = run_cli("explain", path, model_dir, "--index", "99999", "--out", out)
    assert result.exit_code == 1 and "pattern indices must be in" in result.stderr

    # Images made another way (here: re-preprocessed with --crop 0.5, a different zoom)
    # are refused, not silently misclassified; the look of the training images is
    # recorded with the model.
    assert info["preprocessing"] == {"crop": 1.0, "scaling": "log", "asinh_scale": 1.0}
    store.append_provenance(path, "preprocess", {"size": 32, "crop": 0.5, "scaling": "log"})
    for command in (["predict", path, model_dir, "--cluster", "local-threads"],
                    ["explain", path, model_dir, "--index", "1", "--out", out]):
        result = run_cli(*command)
        assert result.exit_code == 1
        assert "preprocessed with crop 0.5" in result.stderr and f"'airysort preprocess {path} --crop 1.0'" in result.stderr
    store.append_provenance(path, "preprocess", {"size": 32, "crop": 1.0, "scaling": "log"})
    assert run_cli("predict", path, model_dir, "--cluster", "local-threads").exit_code == 0


def test_resuming_refuses_what_it_would_silently_change_and_keeps_a_finished_model(tmp_path, dask_threads):
    """A resumed run keeps the checkpoint's architecture, optimiser and data split, so an
    option that differs, new labels or another store are refused; an invalid option never
    costs the trained model; a finished run called again keeps its id."""
    path = tmp_path / "s.zarr"
    truth = make_ring_store(path, n=40, client=dask_threads)
    shots = store.open_store(path)["shot_id"].values.astype(object)
    assert run_cli("label", path, write_label_csv(tmp_path / "l.csv", shots[:30], truth[:30])).exit_code == 0
    model_dir = tmp_path / "m"
    options = ["--model", "cnn", "--depth", "10", "--width", "4", "--epochs", "1"]
    assert run_cli("train", path, model_dir, *options).exit_code == 0
    trained = json.loads((model_dir / "model.json").read_text())

    result = run_cli("train", path, model_dir, *options, "--json")
    assert result.exit_code == 0 and "nothing to train" in result.stderr, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["model_id"] == trained["model_id"]
    assert json.loads((model_dir / "model.json").read_text())["trained_at"] == trained["trained_at"]
    result = run_cli("train", path, model_dir, *options)
    assert "nothing more to train for the cnn model" in result.stderr and "\ntrained" not in result.stderr

    refused = {
        ("--width", "8"): "--width 8 (saved: 4)",
        ("--learning-rate", "0.1"): "--learning-rate 0.1 (saved: 0.001)",
    }
    for extra, message in refused.items():
        result = run_cli("train", path, model_dir, *options, *extra)
        assert result.exit_code == 1 and message in result.stderr and "--fresh" in result.stderr, result.output
    result = run_cli("train", path, model_dir, "--fresh", "--depth", "50")
    assert result.exit_code == 1 and "depth" in result.stderr
    result = run_cli("train", path, model_dir, "--fresh", "--seed", "-1")
    assert result.exit_code == 1 and "seed must be an integer from 0 to 2**32 - 1, got -1" in result.stderr
    assert json.loads((model_dir / "model.json").read_text())["model_id"] == trained["model_id"]  # untouched
    result = run_cli("train", path, tmp_path / "new", *options, "--seed", "-1")
    assert result.exit_code == 1 and not (tmp_path / "new" / "model.json").exists()

    other = tmp_path / "other.zarr"
    other_truth = make_ring_store(other, n=40, client=dask_threads)
    other_shots = store.open_store(other)["shot_id"].values.astype(object)
    assert run_cli("label", other, write_label_csv(tmp_path / "o.csv", other_shots, other_truth)).exit_code == 0
    result = run_cli("train", other, model_dir, *options)
    assert result.exit_code == 1 and "began training on" in result.stderr
    assert run_cli("label", path, write_label_csv(tmp_path / "more.csv", shots[30:], truth[30:])).exit_code == 0
    result = run_cli("train", path, model_dir, *options, "--epochs", "2")
    assert result.exit_code == 1 and "labels of" in result.stderr and "changed" in result.stderr
    result = run_cli("train", path, tmp_path / "m2", *options, "--patience", "-1")
    assert result.exit_code == 1 and "patience must be >= 0" in result.stderr

    # Mistakes around the trained model are one ERROR line each, found before any output.
    assert run_cli("predict", path, model_dir, "--cluster", "local-threads").exit_code == 0
    result = run_cli("sort", path, tmp_path / "sorted", "--export", "Bogus")
    assert result.exit_code == 1 and "unknown class 'Bogus'" in result.stderr and not (tmp_path / "sorted").exists()
    (tmp_path / "afile").write_text("")  # an output directory that is a file: an OSError
    result = run_cli("explain", path, model_dir, "--index", "1", "--out", tmp_path / "afile")
    assert result.exit_code == 1 and result.stderr.startswith("ERROR:") and "Traceback" not in result.output
    result = run_cli("report", path, tmp_path / "report", "--truth", tmp_path / "missing.csv")
    assert result.exit_code == 1 and "does not exist" in result.stderr
    # Images of another size: explain refuses as predict does, naming the command.
    store.write_variables(path, {"image": xr.DataArray(np.zeros((40, 16, 16), np.float32),
                                                       dims=("pattern", "iy", "ix"))}, command="test", parameters={})
    for command in (["explain", path, model_dir, "--index", "1", "--out", tmp_path / "ex"],
                    ["predict", path, model_dir, "--cluster", "local-threads"]):
        result = run_cli(*command)
        assert result.exit_code == 1 and f"run 'airysort preprocess {path} --size 32' first" in result.stderr, \
            result.output


def test_ctrl_c_in_training_checkpoints_the_step_it_finished(tmp_path, dask_threads):
    """Ctrl-C during `airysort train` (a real process): the step in hand finishes and is
    checkpointed, the run stops with status 130 and one line naming the checkpoint, and the
    same command goes on from that step. Here an epoch is one step, fewer than
    --checkpoint-every: without this nothing would have been saved."""
    path = tmp_path / "s.zarr"
    truth = make_ring_store(path, n=40, client=dask_threads)
    shots = store.open_store(path)["shot_id"].values.astype(object)
    assert run_cli("label", path, write_label_csv(tmp_path / "l.csv", shots, truth)).exit_code == 0
    command = cli_with_ctrl_c("train", path, tmp_path / "m", "--model", "cnn", "--depth", "10", "--width", "4",
                              "--patience", "0")
    process = subprocess.Popen([*command, "--epochs", "1000"], cwd=REPO, env=repo_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:  # wait until training runs
        lines.append(line)
        if line.startswith("epoch 3/"):
            process.send_signal(signal.SIGINT)
            break
    rest = process.communicate(timeout=300)[1]
    assert process.returncode == 130, "".join(lines) + rest
    stopped = re.search(r"ERROR: interrupted; training stopped at step (\d+), checkpointed in", rest)
    assert stopped, rest
    again = subprocess.run([*command, "--epochs", "1000", "--patience", "1"], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env=repo_env())
    assert f"resuming from step {stopped[1]} " in again.stderr, again.stderr[-2000:]
    # Stopped on an epoch's last step (an epoch is one step here): the epoch is finished on
    # resume, so the history holds no NaN and model.json stays strict JSON.
    def refuse(constant):
        raise ValueError(constant)

    history = json.loads((tmp_path / "m" / "model.json").read_text(), parse_constant=refuse)["history"]
    assert all(np.isfinite(h["train_loss"]) for h in history)


def test_training_on_too_few_or_uniform_labels_says_so(tmp_path, dask_threads):
    path = tmp_path / "s.zarr"
    make_ring_store(path, n=12, client=dask_threads)
    shots = store.open_store(path)["shot_id"].values.astype(object)
    rows = np.stack([multi_hot(["Spherical/Oblate", "Round"])] * 3)
    assert run_cli("label", path, write_label_csv(tmp_path / "l.csv", shots[:3], rows)).exit_code == 0
    result = run_cli("train", path, tmp_path / "m", "--model", "cnn", "--depth", "10", "--width", "4",
                     "--epochs", "1", "--json")
    assert result.exit_code == 0, result.output
    assert "too few to hold some out" in result.stderr
    assert "every training pattern is labelled Spherical/Oblate + Round" in result.stderr
    # The classes no training pattern showed: said before training, and never predicted
    # (after one step the network's outputs for them are near 0.5, its initial value).
    unseen = [name for name in CLASS_NAMES if name not in ("Spherical/Oblate", "Round")]
    assert f"no training pattern is labelled {', '.join(unseen)}" in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["never_predicted"] == unseen
    assert run_cli("predict", path, tmp_path / "m", "--cluster", "local-threads").exit_code == 0
    dataset = store.open_store(path)
    off = [CLASS_NAMES.index(name) for name in unseen]
    assert (dataset["prob"].values[:, off] > 0.1).any() and not dataset["predicted"].values[:, off].any()


def test_train_without_labels_is_one_error_line(tmp_path, dask_threads):
    path = tmp_path / "s.zarr"
    make_ring_store(path, n=8, client=dask_threads)
    result = run_cli("train", path, tmp_path / "m", "--model", "cnn")
    assert result.exit_code == 1
    assert "0 labelled pattern(s)" in result.stderr and "airysort label" in result.stderr


def test_inputs_missing_for_patterns_ingested_since_are_refused(tmp_path, dask_threads):
    """Frames ingested after `preprocess`: their images are NaN fill values, so training,
    clustering, embedding and label sheets refuse and name the command that covers them."""
    path = tmp_path / "s.zarr"
    make_ring_store(path, n=8, client=dask_threads)
    np.save(tmp_path / "later.npy", np.ones((3, 8, 8), np.uint16))
    ingest(path, [tmp_path / "later.npy"], client=dask_threads, log=lambda line: None)
    for command in (["train", path, tmp_path / "m", "--model", "vae", "--cluster", "local-threads"],
                    ["cluster", path, "--method", "spectral", "--cluster", "local-threads"],
                    ["label", "--sheet", path, tmp_path / "sheets"]):
        result = run_cli(*command)
        assert result.exit_code == 1, (command, result.output)
        assert "'image' covers patterns 0..7 of the 11 in the store" in result.stderr, result.stderr
        assert f"run 'airysort preprocess {path}' first" in result.stderr


def test_train_vae_dispatches_to_the_embedding_module(monkeypatch, tmp_path):
    calls = []

    def fake_train_vae(store_path, model_dir, **kwargs):
        calls.append((store_path, model_dir, kwargs))
        return {"model": "vae", "model_dir": str(model_dir), "steps": 0, "seconds": 0.0}

    import pipeline.embed

    monkeypatch.setattr(pipeline.embed, "train_vae", fake_train_vae)
    result = run_cli("train", tmp_path / "s.zarr", tmp_path / "m", "--model", "vae",
                     "--epochs", "3", "--batch-size", "16", "--json")
    assert result.exit_code == 0, result.output
    (store_path, model_dir, kwargs), = calls
    assert kwargs == {"input": "image", "epochs": 3, "resume": True, "batch_size": 16}
    assert "--cluster" not in result.stderr
    # A batch cluster does not run training: say so instead of ignoring it.
    result = run_cli("train", tmp_path / "s.zarr", tmp_path / "m", "--model", "vae", "--cluster", "slurm")
    assert result.exit_code == 0 and "--cluster slurm is not used by train" in result.stderr


def test_train_help_states_the_defaults_of_both_models():
    """The options default to None (unset on a resumed run), so the help says the defaults
    itself; they must match the configurations."""
    from jaxmodels.configs import CNNConfig, TrainConfig
    from pipeline.embed import VAE_TRAIN_DEFAULTS

    text = " ".join(CliRunner().invoke(app, ["train", "--help"]).stdout.replace("│", " ").split())
    cnn, vae = TrainConfig(), VAE_TRAIN_DEFAULTS
    assert f"(default: {cnn.epochs} for cnn, {vae['epochs']} for vae)" in text
    assert "(default: 1e-3 for cnn, 2e-3 for vae)" in text and (cnn.learning_rate, vae["learning_rate"]) == (1e-3, 2e-3)
    assert f"(default: {cnn.validation_fraction} for cnn, {vae['validation_fraction']} for vae)" in text
    assert f"(default: {cnn.patience} for cnn; 0, off, for vae)" in text and vae["patience"] == 0
    assert f"over all devices (default: {cnn.batch_size})" in text and vae["batch_size"] == cnn.batch_size
    assert f"stage (default: {CNNConfig().width})" in text and f"(default: {CNNConfig().depth})" in text
    assert f"networks (default: {cnn.precision})" in text


def test_a_model_trained_without_validation_predicts(ring_store, tmp_path):
    """With no validation patterns the last weights are the model; they are saved from the
    host, not with the training mesh's devices (a Dask worker could not load them)."""
    path, truth = ring_store
    shots = store.open_store(path)["shot_id"].values.astype(object)
    csv = write_label_csv(tmp_path / "labels.csv", shots[:48], truth[:48])
    assert run_cli("label", path, csv).exit_code == 0
    model_dir = tmp_path / "model"
    # A process of its own, as a user runs it: JAX starts there with one device per core
    # (here forced to 2), so training replicates the model over a mesh.
    env = repo_env(XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    train = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "train", str(path), str(model_dir),
                            "--model", "cnn", "--depth", "10", "--width", "4", "--batch-size", "16",
                            "--epochs", "1", "--validation-fraction", "0", "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    assert json.loads(train.stdout.strip().splitlines()[-1])["n_valid"] == 0
    result = run_cli("predict", path, model_dir, "--cluster", "local-threads", "--json")
    assert result.exit_code == 0, result.output
    plain = store.open_store(path)["prob"].values
    assert np.isfinite(plain).all()
    # Test-time augmentation over the image's rotations and mirrors, recorded in provenance.
    assert run_cli("predict", path, model_dir, "--symmetrise", "--cluster", "local-threads").exit_code == 0
    dataset = store.open_store(path)
    assert store.last_parameters(dataset.attrs, "predict")["symmetrise"] is True
    symmetrised = dataset["prob"].values
    assert np.isfinite(symmetrised).all() and not np.allclose(symmetrised, plain)
    # A model on correlations refuses it: rotating a ccf row means nothing.
    ccf_model = tmp_path / "ccf-model"
    shutil.copytree(model_dir, ccf_model)
    info = json.loads((ccf_model / "model.json").read_text())
    (ccf_model / "model.json").write_text(json.dumps({**info, "input": "ccf"}))
    refused = run_cli("predict", path, ccf_model, "--symmetrise", "--cluster", "local-threads")
    assert refused.exit_code != 0 and "--symmetrise rotates and mirrors images" in refused.output
    # A model directory copied in part, or with a damaged model.json: one error line, and
    # the predictions already in the store stay whole and usable.
    partial, damaged = tmp_path / "partial", tmp_path / "damaged"
    shutil.copytree(model_dir, partial, ignore=shutil.ignore_patterns("best"))
    shutil.copytree(model_dir, damaged)
    (damaged / "model.json").write_text("{garbage")
    for broken, message in ((partial, "has no trained weights (best/ missing or empty)"), (damaged, "is damaged")):
        refused = run_cli("predict", path, broken, "--cluster", "local-threads")
        assert refused.exit_code == 1 and message in refused.stderr and "Traceback" not in refused.output
        dataset = store.open_store(path)
        np.testing.assert_array_equal(dataset["prob"].values, symmetrised)
        assert not store.incomplete_variables(dataset.attrs)


def test_a_ccf_model_refuses_correlations_made_on_other_rings():
    """A classifier on `ccf` records how the correlations were made; other rings or
    sampling are refused with the `correlate` command that matches, while the ring radii
    that each store's own hole and centres set may differ a little."""
    from pipeline.model_dir import check_preprocessing, input_preprocessing

    def attrs(**parameters):
        made = {"n_q": 64, "n_phi": 128, "variant": "auto", "r_min": 8.0, "r_max": 61.4, "min_overlap": 0.25}
        return {"provenance": [{"command": "correlate", "parameters": {**made, **parameters}}]}

    info = {"preprocessing": input_preprocessing(attrs(), "ccf")}
    assert info["preprocessing"] == {"n_q": 64, "n_phi": 128, "variant": "auto", "r_min": 8.0, "r_max": 61.4}
    check_preprocessing(info, attrs(r_min=8.6, r_max=60.0), input="ccf", store_path="s.zarr", model_dir="m")
    with pytest.raises(AirysortError, match=r"run 'airysort correlate s.zarr --r-min 8.0 --r-max 61.4' first"):
        check_preprocessing(info, attrs(r_min=14.0, r_max=30.0), input="ccf", store_path="s.zarr", model_dir="m")
    with pytest.raises(AirysortError, match=r"'airysort correlate s.zarr --n-phi 128' first"):
        check_preprocessing(info, attrs(n_phi=64), input="ccf", store_path="s.zarr", model_dir="m")


def test_the_validation_split_holds_every_class_with_a_few_examples():
    """Stratifying by coarse group alone left all of a sub-class in training (one real run:
    NewtonRings 45 / 0), so its threshold could not be tuned."""
    from pipeline.classify import _split

    rng = np.random.default_rng(0)
    names = rng.choice(["Round", "Round+NewtonRings", "Elliptical", "Empty", "Round+Layered"],
                       size=800, p=[0.8, 0.06, 0.1, 0.035, 0.005])
    labels = np.stack([multi_hot(name.split("+")) for name in names])
    labelled = np.arange(800)
    for seed in range(20):
        train, valid = _split(labelled, labels, 0.15, seed)
        assert len(valid) == 120 and not set(train) & set(valid)
        for c in np.flatnonzero(labels.sum(axis=0) >= 20):  # 15 % of each in validation
            share = labels[valid, c].sum() / labels[:, c].sum()
            assert abs(share - 0.15) <= 0.03, (CLASS_NAMES[c], share, seed)


def test_a_class_without_validation_examples_is_named_and_its_threshold_left_untuned(tmp_path, dask_threads):
    from pipeline.classify import _split

    path = tmp_path / "s.zarr"
    make_ring_store(path, n=24, client=dask_threads)
    shots = store.open_store(path)["shot_id"].values.astype(object)
    rows = np.stack([multi_hot(["Spherical/Oblate", "Round"])] * 16 + [multi_hot(["Empty"])] * 4)
    # One NewtonRings example, on a pattern the default split (fraction 0.15, seed 0) trains on.
    train, _ = _split(np.arange(20), rows, 0.15, 0)
    rows[train[0], CLASS_NAMES.index("NewtonRings")] = 1
    assert _split(np.arange(20), rows, 0.15, 0)[0].tolist() == train.tolist()
    assert run_cli("label", path, write_label_csv(tmp_path / "l.csv", shots[:20], rows)).exit_code == 0
    result = run_cli("train", path, tmp_path / "m", "--model", "cnn", "--depth", "10", "--width", "4",
                     "--epochs", "1", "--json")
    assert result.exit_code == 0, result.output
    assert re.search(r"no validation pattern is labelled NewtonRings \(threshold 0\.\d\d\)", result.stderr), result.stderr
    assert "NewtonRings" not in json.loads(result.stdout.strip().splitlines()[-1])["never_predicted"]
