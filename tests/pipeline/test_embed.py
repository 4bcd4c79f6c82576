"""β-TCVAE on a store: train (and resume), ``airysort embed``, ``airysort latent``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from pipeline import store
from pipeline.cli.main import app
from pipeline.dask_cluster import dask_client
from pipeline.embed import latent_figures, load_vae, train_vae
from pipeline.errors import AirysortError
from pipeline.taxonomy import multi_hot
from tests.factories import repo_env, xla_flags

N_PATTERNS = 300  # two shards of 256: the embed oracle sees an uneven last chunk
SIZE = 16


def _synthetic_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rings (round) and bars (prolate streaks), standardised like preprocess's output."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    is_ring = rng.random(n) < 0.5
    images = np.empty((n, SIZE, SIZE), np.float32)
    for i in range(n):
        if is_ring[i]:
            image = np.exp(-((np.hypot(yy, xx) - rng.uniform(3, 6)) ** 2) / 1.5)
        else:
            angle = rng.uniform(0, np.pi)
            distance = np.abs(np.cos(angle) * yy - np.sin(angle) * xx)
            image = np.exp(-(distance**2) / 2.0)
        image = image + 0.05 * rng.normal(size=image.shape)
        images[i] = (image - image.mean()) / image.std()
    labels = np.stack(
        [multi_hot(("Spherical/Oblate", "Round")) if r else multi_hot(("Prolate", "Streak"))
         for r in is_ring]
    )
    return images, labels


@pytest.fixture(scope="module")
def vae_store(tmp_path_factory):
    """A store with ``raw`` (ingested .npy), synthetic ``image`` and labels."""
    from pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("embed")
    rng = np.random.default_rng(1)
    frames = root / "frames.npy"
    np.save(frames, rng.poisson(3.0, size=(N_PATTERNS, 24, 24)).astype(np.uint16))
    path = root / "run.zarr"
    images, labels = _synthetic_images(N_PATTERNS)
    with dask_client("local-threads") as client:
        ingest(path, [frames], client=client)
        store.write_variables(
            path, {"image": xr.DataArray(images, dims=("pattern", "iy", "ix"))},
            command="test", parameters={},
        )
    store.write_pattern_variable_direct(path, "label", labels)
    return path, images, labels


class _Crash(Exception):
    """Stands in for a kill in the middle of training."""


def _crash_at_step(step: int):
    def log(line: str) -> None:
        if f" step {step} " in line:
            raise _Crash(line)

    return log


@pytest.fixture(scope="module")
def trained(vae_store, tmp_path_factory):
    """Train 3 epochs, killed at step 5; ``airysort train`` resumes from the step-4 checkpoint."""
    path, _, _ = vae_store
    model_dir = tmp_path_factory.mktemp("model") / "vae"
    options = dict(preset="tiny", latent_dim=4, batch_size=64, validation_fraction=0.15,
                   learning_rate=3e-3, checkpoint_every=2, log_every=1)
    with pytest.raises(_Crash):
        train_vae(path, model_dir, epochs=3, log=_crash_at_step(5), **options)
    interrupted = json.loads((model_dir / "model.json").read_text())
    # The same run through the command line resumes with the saved (tiny) configuration.
    result = CliRunner().invoke(
        app, ["train", str(path), str(model_dir), "--model", "vae", "--epochs", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    resumed = json.loads(result.stdout.strip().splitlines()[-1])
    return model_dir, interrupted, resumed


def test_train_vae_and_resume(trained):
    model_dir, interrupted, resumed = trained
    assert interrupted["status"] == "training"
    info = json.loads((model_dir / "model.json").read_text())
    assert info["model"] == "vae" and info["vae"]["preset"] == "tiny"
    assert info["status"] == "trained"
    assert resumed["n_train"] == 255 and resumed["n_valid"] == 45
    steps_per_epoch = 255 // 64
    assert resumed["resumed_from"] == 4
    assert resumed["steps"] == 3 * steps_per_epoch and resumed["epochs"] == 3
    history = info["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # The validation negative ELBO improves over the three epochs, across the resume.
    assert history[-1]["val_loss"] < history[0]["val_loss"], history
    assert (model_dir / "best").is_dir()


def test_embed_cli_writes_latents(vae_store, trained):
    path, images, _ = vae_store
    model_dir, _, _ = trained
    result = CliRunner().invoke(
        app, ["embed", str(path), str(model_dir), "--batch-size", "50", "--cluster",
              "local-threads", "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n_patterns"] == N_PATTERNS and summary["latent_dim"] == 4
    dataset = store.open_store(path)
    latent = dataset["latent"].values
    logvar = dataset["latent_logvar"].values
    assert dataset["latent"].dims == ("pattern", "z") and latent.dtype == np.float32
    assert latent.shape == logvar.shape == (N_PATTERNS, 4)
    # Oracle: the same model on the whole array in memory, outside Dask.
    from jaxmodels.latent_tools import encode_patterns

    model, _ = load_vae(model_dir)
    mean, expected_logvar = encode_patterns(model, images, batch_size=128)
    np.testing.assert_allclose(latent, mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logvar, expected_logvar, rtol=1e-4, atol=1e-4)
    assert dataset.attrs["provenance"][-1]["command"] == "embed"


def test_latent_cli_writes_figures(vae_store, trained, tmp_path):
    path, _, _ = vae_store
    model_dir, _, _ = trained
    if "latent" not in store.open_store(path):  # also runnable on its own
        assert CliRunner().invoke(
            app, ["embed", str(path), str(model_dir), "--cluster", "local-threads"]
        ).exit_code == 0
    result = CliRunner().invoke(
        app, ["latent", str(path), str(model_dir), str(tmp_path / "figs"), "--points", "200",
              "--json"],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])["figures"]
    assert [p.rsplit("/", 1)[-1] for p in figures] == [
        "latent_traversal.png", "latent_map_label_pca.png"
    ]
    for figure in figures:
        with open(figure, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    # Colouring by a clustering the store does not have is a clear user error.
    with pytest.raises(AirysortError, match="airysort cluster"):
        latent_figures(path, model_dir, tmp_path / "figs", color_by="cluster_gmm")
    result = CliRunner().invoke(
        app, ["latent", str(path), str(model_dir), str(tmp_path), "--color-by", "cluster_gmm"]
    )
    assert result.exit_code == 1 and "ERROR:" in result.output


def test_user_errors(vae_store, tmp_path):
    path, _, _ = vae_store
    result = CliRunner().invoke(app, ["embed", str(path), str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "holds no trained model" in result.output
    # A classifier's directory given to `latent` is named as such, whether or not the
    # store has latents (embedding with it would fail too).
    (tmp_path / "cnn").mkdir()
    (tmp_path / "cnn" / "model.json").write_text(json.dumps({"model": "cnn"}))
    result = CliRunner().invoke(app, ["latent", str(path), str(tmp_path / "cnn"), str(tmp_path / "figs")])
    assert result.exit_code == 1 and "holds a 'cnn' model" in result.output, result.output
    with pytest.raises(AirysortError, match="unknown VAE training option 'betta'"):
        train_vae(path, tmp_path / "m", epochs=1, betta=3.0)
    with pytest.raises(AirysortError, match="latent_dim"):
        train_vae(path, tmp_path / "m", epochs=1, latent_dim=0)
    with pytest.raises(AirysortError, match="input must be 'image'"):
        train_vae(path, tmp_path / "m", epochs=1, input="ccf")


def test_images_preprocessed_another_way_are_refused(vae_store, trained, tmp_path):
    """The VAE records how its training images were made; embedding (or resuming on)
    images scaled another way is refused with the command that makes matching ones."""
    import shutil

    path, _, _ = vae_store
    model_dir, _, _ = trained
    assert json.loads((model_dir / "model.json").read_text())["preprocessing"] == {
        "crop": 1.0, "scaling": "log", "asinh_scale": 1.0}
    other = tmp_path / "other.zarr"
    shutil.copytree(path, other)
    store.append_provenance(other, "preprocess", {"size": SIZE, "scaling": "asinh", "asinh_scale": 1.0})
    result = CliRunner().invoke(app, ["embed", str(other), str(model_dir), "--cluster", "local-threads"])
    assert result.exit_code == 1
    assert "preprocessed with scaling 'asinh'" in result.stderr
    assert f"'airysort preprocess {other} --scaling log'" in result.stderr
    with pytest.raises(AirysortError, match="preprocessed with scaling 'asinh'"):
        train_vae(other, model_dir, epochs=4)


def test_vae_trains_as_two_srun_tasks_like_one_process(vae_store, tmp_path):
    """Two ``airysort train --model vae`` processes with the environment ``srun`` gives two
    tasks on this node join one ``jax.distributed`` run over two devices: the same losses as
    one process with two devices, one model written and one JSON result printed."""
    import random
    import subprocess
    import sys
    from pathlib import Path

    path, _, _ = vae_store
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "pipeline.cli.main", "train", str(path)]
    options = ["--model", "vae", "--epochs", "1", "--batch-size", "32", "--seed", "0", "--json"]
    base = {k: v for k, v in repo_env(JAX_PLATFORMS="cpu").items() if not k.startswith("SLURM_") and k != "XLA_FLAGS"}
    one = subprocess.run([*command, str(tmp_path / "one"), *options], capture_output=True, text=True, timeout=600,
                         cwd=root, env={**base, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2")})
    assert one.returncode == 0, one.stderr[-3000:]
    job = str(random.randrange(10_000, 1_000_000))  # JAX's coordinator port derives from it
    tasks = [subprocess.Popen(
        [*command, str(tmp_path / "two"), *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=root, env={**base, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=1"), "SLURM_JOB_ID": job,
                       "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank),
                       "SLURM_LOCALID": str(rank)}) for rank in (0, 1)]
    outputs = [task.communicate(timeout=600) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[1][1][-3000:] + outputs[0][1][-3000:]
    # One result, from task 0 (the collectives library prints its own lines on stdout too).
    results = [[line for line in out.splitlines() if line.startswith("{")] for out, _ in outputs]
    assert len(results[0]) == 1 and results[1] == []
    # One progress log for the job, from task 0.
    assert "training β-TCVAE" in outputs[0][1] and "validation" in outputs[0][1]
    assert "training β-TCVAE" not in outputs[1][1] and "patterns/s" not in outputs[1][1]
    history = [json.loads((tmp_path / run / "model.json").read_text())["history"] for run in ("one", "two")]
    assert len(history[1]) == len(history[0]) == 1
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([h[key] for h in history[1]], [h[key] for h in history[0]], rtol=2e-3)
