"""``--cluster slurm`` for real: Dask workers as SLURM jobs give the same store as a local run.

Every test here runs against the live single-node SLURM of ``conftest.py``. The CLI runs
in a subprocess, as a user runs it on a login node, so that it builds its own
dask-jobqueue ``SLURMCluster`` from the YAML (an in-process run could quietly reuse
another test's Dask client). The last test submits ``cluster-configs/train-gpu.sbatch``
(``srun`` of two ``airysort train`` tasks joined by ``jax.distributed``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import store
from tests.factories import random_frames, random_labels, write_stacked_cxi, xla_flags

pytestmark = pytest.mark.slurm

AIRYSORT = [sys.executable, "-m", "pipeline.cli.main"]
# Attributes and result fields that describe a run rather than the data: they differ
# between two runs that wrote the same store.
RUN_KEYS = {"time", "ingest_id", "seconds"}


def airysort(*args: str, env: dict, timeout: float = 240, messages: list | None = None) -> dict:
    """Run ``airysort ARGS --json`` in a subprocess; return its JSON result.

    Its stderr (the human-readable messages) is appended to ``messages`` if given.
    """
    done = subprocess.run([*AIRYSORT, *args, "--json"], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"airysort {' '.join(args)} failed:\n{done.stderr[-4000:]}"
    if messages is not None:
        messages.append(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def without_run_keys(value):
    """``value`` (nested attrs or a command's result) without the keys in RUN_KEYS."""
    if isinstance(value, dict):
        return {k: without_run_keys(v) for k, v in value.items() if k not in RUN_KEYS}
    if isinstance(value, list):
        return [without_run_keys(v) for v in value]
    return value


def assert_same_store(path: Path, reference: Path) -> None:
    """Same variables, coordinates, values, dtypes, chunking and attributes (but run ids)."""
    got, expected = store.open_store(path), store.open_store(reference)
    assert sorted(got.variables) == sorted(expected.variables)
    for name in expected.variables:
        a, b = got[name], expected[name]
        assert a.dims == b.dims and a.dtype == b.dtype, name
        assert a.chunks == b.chunks, name
        np.testing.assert_array_equal(a.values, b.values, err_msg=name)
    assert without_run_keys(got.attrs) == without_run_keys(expected.attrs)


def worker_jobs(log_directory: Path) -> set[str]:
    """SLURM job ids whose Dask worker registered with a scheduler (from the job logs)."""
    jobs = set()
    for log in log_directory.glob("dask-worker-*.err"):
        if "Registered to" in log.read_text(errors="replace"):
            jobs.add(log.stem.rsplit("-", 1)[-1])
    return jobs


def wait_until_queue_empty(slurm, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while slurm.jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not slurm.jobs(), f"worker jobs left behind: {slurm.jobs()}"


@pytest.fixture(scope="module")
def beamtime(tmp_path_factory) -> list[Path]:
    """Two CXI runs, 260 frames in all (2 shards): Airy-pattern hits among empty frames,
    a detector mask, labels, pulse energies and shot ids, so that preprocessing has hits,
    a background and hot pixels to find."""
    from tests.pipeline.test_preprocess import beamtime as hits_and_blanks
    from tests.pipeline.test_preprocess_kernels import detector_mask

    directory = tmp_path_factory.mktemp("beamtime")
    frames, _, _ = hits_and_blanks(130, 130, seed=3)
    files = []
    for run, part in ((1, frames[:200]), (2, frames[200:])):
        n = len(part)
        files.append(
            write_stacked_cxi(
                directory / f"run{run}.cxi", part, labels=random_labels(n, seed=run), mask=detector_mask(),
                pulse_energy=np.linspace(1e-3, 2e-3, n), shot_ids=[f"r{run}-{i}" for i in range(n)],
            )
        )
    return files


def test_ingest_and_preprocess_on_slurm_equal_local_run(slurm, slurm_yaml, beamtime, tmp_path):
    inputs = [str(p) for p in beamtime]
    local, on_slurm = tmp_path / "local.zarr", tmp_path / "slurm.zarr"
    local_ingest = airysort("ingest", str(local), *inputs, "--cluster", "local-threads", env=slurm.env)
    messages: list[str] = []
    slurm_ingest = airysort("ingest", str(on_slurm), *inputs, "--cluster", str(slurm_yaml), env=slurm.env,
                            messages=messages)
    assert re.search(r"Dask dashboard: http://\S+:\d+/status", messages[0])  # docs/hpc.md: tunnel to it
    assert slurm_ingest == local_ingest == {"ingested": 260, "rejected": 0, "skipped_files": 0, "patterns": 260}
    assert_same_store(on_slurm, local)

    local_pre = airysort("preprocess", str(local), "--cluster", "local-threads", env=slurm.env)
    slurm_pre = airysort("preprocess", str(on_slurm), "--cluster", str(slurm_yaml), env=slurm.env)
    assert without_run_keys(slurm_pre) == without_run_keys(local_pre)
    assert 0 < local_pre["hits"] < 260  # the data has hits and blanks to tell apart
    assert_same_store(on_slurm, local)
    assert "image" in store.open_store(on_slurm)

    # The work really ran in SLURM jobs (their logs say the workers registered), and
    # closing each cluster cancelled its jobs.
    assert len(worker_jobs(tmp_path / "dask-logs")) >= 2
    wait_until_queue_empty(slurm)


def _write_task_worker(client, timeout: float = 120) -> str:
    """Address of a worker that is running an ingest ``write_shard`` task right now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for address, keys in client.processing().items():
            if any(str(key).startswith("write_shard") for key in keys):
                return address
        time.sleep(0.01)
    raise AssertionError("no write_shard task was seen running")


def test_scancelled_worker_job_is_replaced_and_ingest_is_complete(slurm, slurm_yaml, tmp_path):
    import dask
    from distributed import get_task_stream

    from pipeline.dask_cluster import dask_client
    from pipeline.ingest import ingest

    # 8 shards of 128 x 128 frames: each write task takes long enough to be caught running.
    frames = random_frames(2048, shape=(128, 128), seed=7)
    first = write_stacked_cxi(tmp_path / "first.cxi", frames)
    second = write_stacked_cxi(tmp_path / "second.cxi", frames[:1024])
    reference, path = tmp_path / "reference.zarr", tmp_path / "s.zarr"
    airysort("ingest", str(reference), str(first), "--cluster", "local-threads", env=slurm.env)

    # A lost job is noticed after distributed's lost-worker-timeout (15 s); 2 s keeps this short.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "2s"}), dask_client(
        str(slurm_yaml), reuse=False
    ) as client:
        cluster = client.cluster
        client.wait_for_workers(2, timeout=120)
        original_jobs = {job.job_id for job in cluster.workers.values()}

        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(ingest(path, [first], client=client, log=lambda _: None)))
        runner.start()
        victim = _write_task_worker(client)
        victim_job = cluster.workers[client.scheduler_info()["workers"][victim]["name"]].job_id
        slurm.run("scancel", victim_job)
        runner.join(timeout=240)
        assert not runner.is_alive(), "ingest did not finish after a worker job was cancelled"
        assert victim_job not in slurm.jobs()

        # Nothing lost, nothing duplicated: the same store as the local run.
        assert outcome == {"ingested": 2048, "rejected": 0, "skipped_files": 0, "patterns": 2048}
        assert_same_store(path, reference)

        # The cancelled job is replaced by a new SLURM job whose worker joins and works.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = {job.job_id for job in cluster.workers.values()}
            if len(client.scheduler_info()["workers"]) == 2 and len(jobs) == 2 and jobs - original_jobs:
                break
            time.sleep(0.5)
        new_jobs = {job.job_id for job in cluster.workers.values()} - original_jobs
        assert len(new_jobs) == 1, f"jobs before {original_jobs}, now {slurm.jobs()}"
        new_worker = next(a for a, w in client.scheduler_info()["workers"].items()
                          if cluster.workers[w["name"]].job_id in new_jobs)
        with get_task_stream(client) as stream:
            assert ingest(path, [second], client=client, log=lambda _: None)["patterns"] == 3072
        assert new_worker in {task["worker"] for task in stream.data}
    ds = store.open_store(path)
    np.testing.assert_array_equal(ds.raw.values, np.concatenate([frames, frames[:1024]]))
    np.testing.assert_array_equal(ds.pattern.values, np.arange(3072))
    assert [p["command"] for p in ds.attrs["provenance"]] == ["ingest", "ingest"]
    wait_until_queue_empty(slurm)


# --------------------------------------------------------------------------- training under srun

EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+ step (\d+) loss ([0-9.]+)")
VALIDATION_LINE = re.compile(r"^validation loss ([0-9.]+)")


def loss_curve(log: str) -> list[tuple[str, float]]:
    """The training and validation losses that ``airysort train`` logs, in order."""
    curve = []
    for line in log.splitlines():
        if match := EPOCH_LINE.match(line):
            curve.append((f"train step {match[2]}", float(match[3])))
        elif match := VALIDATION_LINE.match(line):
            curve.append(("validation", float(match[1])))
    return curve


@pytest.fixture(scope="module")
def ring_store(tmp_path_factory, dask_threads) -> Path:
    """240 labelled 32 x 32 images of three ring motifs (the classifier tests' store)."""
    from typer.testing import CliRunner

    from pipeline.cli.main import app
    from tests.pipeline.test_classify import make_ring_store, write_label_csv

    path = tmp_path_factory.mktemp("rings") / "rings.zarr"
    truth = make_ring_store(path, n=240, client=dask_threads)
    shots = store.open_store(path)["shot_id"].values.astype(object)
    labelled = CliRunner().invoke(app, ["label", str(path), str(write_label_csv(path.parent / "l.csv", shots, truth))])
    assert labelled.exit_code == 0, labelled.output
    return path


SBATCH_SCRIPT = Path(__file__).resolve().parents[2] / "cluster-configs" / "train-gpu.sbatch"


def test_train_gpu_sbatch_two_tasks_train_the_cnn_like_one_process(slurm, ring_store, tmp_path):
    """The shipped sbatch script on the CPU test node: ``srun`` runs two ``airysort train``
    tasks with two CPU devices each, joined by ``jax.distributed``; the loss curve equals
    that of one process with the same four devices and global batch."""
    options = ["--epochs", "3", "--depth", "10", "--width", "8", "--batch-size", "32", "--seed", "0"]
    one = subprocess.run(
        [*AIRYSORT, "train", str(ring_store), str(tmp_path / "one"), "--model", "cnn", *options, "--json"],
        capture_output=True, text=True, timeout=400,
        env={**slurm.env, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4")},
    )
    assert one.returncode == 0, one.stderr[-3000:]

    # What a user at a GPU site edits in the script, set on the command line for this node:
    # no GPUs, two tasks of one core each, the test partition.
    venv = Path(sys.executable).parent.parent
    job = slurm.run(
        "sbatch", "--wait", f"--partition={slurm.partition}", "--nodes=1", "--ntasks-per-node=2",
        "--gpus-per-node=0", "--cpus-per-task=1", "--mem=6G", "--time=10", f"--output={tmp_path}/train.out",
        f"--export=ALL,XLA_FLAGS={xla_flags('--xla_force_host_platform_device_count=2')},AIRYSORT_VENV={venv}",
        str(SBATCH_SCRIPT), str(ring_store), str(tmp_path / "two"), *options,
        timeout=500, check=False,
    )
    output = (tmp_path / "train.out").read_text()
    assert job.returncode == 0, f"{job.stdout}{job.stderr}\n{output[-4000:]}"
    logs = ["\n".join(line[3:] for line in output.splitlines() if line.startswith(f"{task}: ")) for task in (0, 1)]

    # The tasks joined one 4-device mesh; task 0 alone logs the job's progress...
    assert "over 4 device(s)" in logs[0] and "patterns/s" not in logs[1] and "training ResNet" not in logs[1]
    # ...which follows the 1-process loss curve (logged to 4 decimals) step for step.
    expected = loss_curve(one.stderr)
    assert [name for name, _ in expected].count("validation") == 3
    # Sums across two processes run in another order than across four local devices, so the
    # curves drift apart at the 1e-4 level (train loss 0.63632 against 0.63605 by epoch 3). The
    # validation loss, read after batch-norm recalibration on 16 fresh batches, moves about
    # four times as much (0.7802 against 0.7791; without recalibration 0.66976 against 0.66962).
    tolerance = {"validation": 2e-3}
    got = loss_curve(logs[0])
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (name, value), (_, reference) in zip(got, expected):
        assert value == pytest.approx(reference, rel=tolerance.get(name, 1e-3), abs=2e-4), (
            f"{name}: two tasks {got} against one process {expected}")
    # The per-epoch history saved with the model, at full precision.
    history = [json.loads((tmp_path / run / "model.json").read_text())["history"] for run in ("one", "two")]
    for key, rtol in (("train_loss", 1e-3), ("val_loss", 2e-3)):
        np.testing.assert_allclose([h[key] for h in history[1]], [h[key] for h in history[0]], rtol=rtol)
