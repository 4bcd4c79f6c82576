"""Cluster configs: every shipped YAML loads and renders a valid job script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dask
import pytest

from pipeline.dask_cluster import WORKER_ENVIRON, dask_client, load_cluster_config, make_cluster
from pipeline.errors import AirysortError
from tests.factories import repo_env

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "cluster-configs").glob("*.yaml"))
DIRECTIVES = {"slurm": "#SBATCH", "pbs": "#PBS", "lsf": "#BSUB"}


@pytest.mark.parametrize("config_path", [p for p in CONFIGS if p.stem != "local"], ids=lambda p: p.stem)
def test_jobqueue_config_renders_job_script(config_path, monkeypatch):
    config = load_cluster_config(str(config_path))
    # do not bind the real dashboard port in tests
    config["cluster"].setdefault("scheduler_options", {})["dashboard_address"] = ":0"
    with make_cluster(config) as cluster:
        script = cluster.job_script()
    assert script.startswith("#!")
    assert DIRECTIVES[config["type"]] in script
    assert "distributed.cli.dask_worker" in script or "dask worker" in script or "dask-worker" in script
    assert config["cluster"]["walltime"] in script
    # The workers get the environment of the local cluster's workers through Dask's config.
    export = next(line for line in script.splitlines() if "PRE_SPAWN_ENVIRON" in line)
    name, value = export.removeprefix("export ").split("=", 1)
    collected = dask.config.collect_env({name: value.strip("'")})
    environ = dask.config.get("distributed.nanny.pre-spawn-environ", config=collected)
    assert environ == {"MALLOC_TRIM_THRESHOLD_": 256 * 2**20, "MALLOC_MMAP_THRESHOLD_": 32 * 2**20,
                       "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def _worker_environ() -> dict[str, str]:
    return {name: os.environ.get(name) for name in WORKER_ENVIRON}


def _ignores_ctrl_c() -> bool:
    import signal

    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_local_cluster_workers_get_the_worker_environment():
    import signal

    handler = signal.getsignal(signal.SIGINT)
    with make_cluster({"type": "local", "cluster": {"n_workers": 1}}) as cluster:
        from distributed import Client

        with Client(cluster) as client:
            (environ,) = client.run(_worker_environ).values()
            (ignored,) = client.run(_ignores_ctrl_c).values()
    # Ctrl-C reaches the whole process group: workers leave it to the client.
    assert ignored and signal.getsignal(signal.SIGINT) is handler  # the client's own is restored
    # Malloc thresholds, and no GPU memory preallocation: several worker processes can
    # share one card in predict and embed.
    assert environ == {"MALLOC_TRIM_THRESHOLD_": str(256 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                       "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def test_a_closing_worker_does_not_log_its_failed_heartbeat(caplog):
    """The heartbeat a worker had sent when the cluster began to close fails; distributed
    logs that with a traceback (distributed issue 7105), after commands that succeeded.
    Only that message, and only while the worker closes, is dropped."""
    import logging

    from distributed.core import Status

    from pipeline.dask_cluster import HEARTBEAT_FAILURE, quiet_heartbeat_while_closing

    class Worker:
        status = Status.running

    worker = Worker()
    quiet_heartbeat_while_closing(worker)
    logger = logging.getLogger("distributed.worker")

    def logged(message: str) -> bool:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="distributed.worker"):
            logger.error(message + ".")
        return [r.getMessage() for r in caplog.records] == [message + "."]

    assert logged(HEARTBEAT_FAILURE)  # a running worker's failure is news
    worker.status = Status.closing
    assert not logged(HEARTBEAT_FAILURE)
    assert logged("Failed to connect to the scheduler")  # any other message still shows
    worker.status = Status.closed
    assert not logged(HEARTBEAT_FAILURE)
    del worker  # watched weakly: a worker gone is forgotten
    import gc

    gc.collect()
    assert logged(HEARTBEAT_FAILURE)


def _watched(dask_worker) -> bool:
    from pipeline.dask_cluster import _watched_workers

    return dask_worker in _watched_workers


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_workers_of_a_cluster_airysort_starts_drop_the_closing_heartbeat_failure(tmp_path, processes):
    config = tmp_path / "mine.yaml"
    config.write_text(f"type: local\ncluster:\n  n_workers: 1\n  processes: {str(processes).lower()}\n")
    with dask_client(str(config), reuse=False) as client:
        assert list(client.run(_watched).values()) == [True]


def test_named_config_is_found_and_unknown_name_lists_choices():
    assert load_cluster_config("slurm")["type"] == "slurm"
    with pytest.raises(AirysortError, match="unknown cluster 'nowhere'.*slurm"):
        load_cluster_config("nowhere")


def test_local_yaml_starts_a_working_cluster(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("type: local\ncluster:\n  n_workers: 1\n  processes: false\n  dashboard_address: ':0'\n")
    with dask_client(str(config), reuse=False) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        assert client.submit(sum, [1, 2, 3]).result() == 6


def test_named_configs_are_installed_with_the_package_and_found_there(tmp_path, monkeypatch):
    """`pip install .` (not editable) puts cluster-configs/ under the environment's data
    directory, where --cluster NAME finds it without a source checkout."""
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools", minversion="77")  # a test extra: the SPDX license string
    root = Path(__file__).resolve().parents[2]
    source = tmp_path / "source"  # a copy: building writes build/ next to pyproject.toml
    for name in ("pipeline", "jaxmodels", "cluster-configs"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(source), "-w", str(tmp_path / "wheel")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel, = (tmp_path / "wheel").glob("airysort-*.whl")
    shipped = {Path(name).name for name in zipfile.ZipFile(wheel).namelist()
               if "/data/share/airysort/cluster-configs/" in name}
    assert shipped == {p.name for p in (root / "cluster-configs").iterdir() if p.suffix in (".yaml", ".sbatch")}

    import pipeline.dask_cluster as dask_cluster

    installed = tmp_path / "share" / "airysort" / "cluster-configs"
    installed.mkdir(parents=True)
    (installed / "site-only.yaml").write_text("type: local\n")
    monkeypatch.setattr(dask_cluster, "INSTALLED_CONFIGS", installed)
    monkeypatch.chdir(tmp_path)
    assert load_cluster_config("site-only")["_path"] == str(installed / "site-only.yaml")


def test_command_line_shows_library_warnings_but_not_their_info_messages(tmp_path):
    """distributed logs its start-up at INFO; once absl (orbax) has touched the logging
    system those lines reached the terminal and buried the command's own output."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    script = (
        "import logging, sys\n"
        "from pipeline.cli.main import app\n"
        f"sys.argv = ['airysort', 'info', {str(tmp_path / 'none.zarr')!r}]\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "import absl.logging\n"
        "absl.logging.info('absl touched logging')\n"
        "logging.getLogger('distributed.scheduler').setLevel(logging.INFO)\n"
        "logging.getLogger('distributed.scheduler').info('State start')\n"
        "logging.getLogger('distributed.scheduler').warning('Port 8787 is already in use')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "WARNING: distributed.scheduler: Port 8787 is already in use" in run.stderr
    assert "State start" not in run.stderr and "absl touched" not in run.stderr


def test_ctrl_c_in_a_command_is_one_line_and_status_130(capsys):
    import typer

    from pipeline.cli.common import user_errors

    @user_errors
    def command():
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 130
    assert capsys.readouterr().err.startswith("ERROR: interrupted; the store keeps what was complete")


@pytest.mark.parametrize("spec, seconds", [("local", 60), ("local-threads", 3)])  # (threads cannot be stopped)
def test_ctrl_c_leaves_no_worker_warnings_about_cancelled_tasks(tmp_path, spec, seconds):
    """Interrupted while workers run tasks: the command's one line is all the user sees,
    not one distributed warning per cancelled task."""
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "interrupted.py"
    script.write_text(
        "import time\n"
        "from pipeline.dask_cluster import dask_client\n"
        "if __name__ == '__main__':\n"
        f"    with dask_client({spec!r}) as client:\n"
        f"        tasks = [client.submit(time.sleep, {seconds}, pure=False) for _ in range(4)]\n"
        "        while sum(len(v) for v in client.processing().values()) < 2:\n"
        "            time.sleep(0.1)\n"
        "        time.sleep(1.0)  # the tasks are executing now\n"
        "        raise KeyboardInterrupt\n"
    )
    run = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=300,
                         env=repo_env())
    assert "KeyboardInterrupt" in run.stderr, run.stderr[-2000:]
    assert "CancelledError" not in run.stderr, run.stderr[-3000:]


def test_a_taken_dashboard_port_is_no_warning(recwarn):
    """local.yaml asks for port 8787; a second command running meanwhile gets another port
    (printed by dask_client) without Dask's multi-line warning."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = {"n_workers": 1, "processes": False, "dashboard_address": f"127.0.0.1:{port}"}
        with make_cluster({"type": "local", "cluster": options}) as cluster:
            assert cluster.dashboard_link and str(port) not in cluster.dashboard_link
    assert not [w for w in recwarn if "already in use" in str(w.message)]


def test_cluster_config_mistakes_are_one_error_line(tmp_path, monkeypatch):
    """Each mistake a user makes in a cluster YAML, or a missing batch system or scheduler,
    is one line naming it, instead of a traceback, a silently ignored key or a hang."""
    from pipeline import dask_cluster

    def config(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    cases = {
        config("bad.yaml", "type: slurm\ncluster: [\n"): r"is not valid YAML \(line 3\)",
        config("top.yaml", "type: slurm\nqueue: gpu\ncluster:\n  cores: 2\n  memory: 4GB\n"):
            r"unknown top-level key\(s\) \['queue'\].*go under 'cluster:'",
        config("jobs.yaml", "type: slurm\njobs: two\ncluster:\n  cores: 2\n  memory: 4GB\n"):
            "'jobs' must be a whole number >= 1, got 'two'",
        config("list.yaml", "type: slurm\ncluster:\n  - cores: 2\n"): r"'cluster' must be a mapping .*got \[",
        config("adapt.yaml", "type: slurm\nadapt: 5\ncluster:\n  cores: 2\n"): "'adapt' must be a mapping .*got 5",
        config("adapt_key.yaml", "type: slurm\nadapt:\n  max_jobs: 5\n"): r"unknown 'adapt' key\(s\) \['max_jobs'\]",
        config("local_adapt.yaml", "type: local\nadapt:\n  maximum_jobs: 5\n"): "a local cluster has a fixed number",
    }
    cases["10.0.0.5:8786"] = "a scheduler address needs its scheme: tcp://10.0.0.5:8786"
    for path, message in cases.items():
        with pytest.raises(AirysortError, match=message):
            load_cluster_config(path)
    unknown = load_cluster_config(config("unk.yaml", "type: slurm\ncluster:\n  cores: 2\n  memory: 4GB\n  partiton: x\n"))
    with pytest.raises(AirysortError, match="SLURMCluster rejects its 'cluster:' options: .*'partiton'") as raised:
        make_cluster(unknown)
    assert "\n" not in str(raised.value)
    local = load_cluster_config(config("local.yaml", "type: local\ncluster:\n  n_workers: 1\n  memory_limt: 2GB\n"))
    with pytest.raises(AirysortError, match=r"LocalCluster and its workers take no option\(s\) \['memory_limt'\]"):
        make_cluster(local)
    # Options of the workers' server (passed on by Worker) are valid ones.
    with make_cluster({"type": "local", "cluster": {"n_workers": 1, "processes": False, "connection_limit": 256}}):
        pass
    # No sbatch here: refused before dask-jobqueue tries to submit and waits for ever.
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AirysortError, match="'sbatch' is not on this machine's PATH"):
        with dask_client(config("ok.yaml", "type: slurm\ncluster:\n  cores: 2\n  memory: 4GB\n"), reuse=False):
            pass
    # Malformed scheduler addresses are refused at once, before any connection is tried.
    for address, message in {"tcp://127.0.0.1:abc": "is not a scheduler address", "tcp://": "missing port",
                             "tcp://127.0.0.1:99999": "port number from 1 to 65535", "tcp://:8786": "needs a host"}.items():
        with pytest.raises(AirysortError, match=message):
            with dask_client(address, reuse=False):
                pass
    monkeypatch.setattr(dask_cluster, "SCHEDULER_TIMEOUT", "2s")
    with pytest.raises(AirysortError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:1 within 2s"):
        with dask_client("tcp://127.0.0.1:1", reuse=False):
            pass
    # A service that takes the connection but never answers (a mistyped port) is no hang.
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = "tcp://127.0.0.1:%d" % silent.getsockname()[1]
        with pytest.raises(AirysortError, match=f"cannot reach the Dask scheduler at {address} within 2s"):
            with dask_client(address, reuse=False):
                pass


def test_site_and_user_prologue_lines_reach_the_job_script():
    """The workers' environment line comes first, then the user's prologue: the config's
    own, else the site's jobqueue.yaml (which dask-jobqueue ignores once a prologue is given)."""
    options = {"cores": 1, "memory": "1GB"}
    with dask.config.set({"jobqueue.slurm.job-script-prologue": ["module load hdf5"]}):
        script = make_cluster({"type": "slurm", "cluster": dict(options)}).job_script()
        assert "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON" in script and "module load hdf5" in script
        assert script.index("PRE_SPAWN_ENVIRON") < script.index("module load hdf5")
        own = make_cluster({"type": "slurm", "cluster": {**options, "job_script_prologue": ["source env.sh"]}})
        assert "source env.sh" in own.job_script() and "module load hdf5" not in own.job_script()
        none = make_cluster({"type": "slurm", "cluster": {**options, "job_script_prologue": []}})
        assert "module load hdf5" not in none.job_script()  # an empty list given replaces it too


def test_a_batch_system_that_refuses_every_job_is_one_error_line(tmp_path):
    """sbatch exiting non-zero (a wrong account or partition) ended in a traceback at every
    adapt interval and a command that waited for workers for ever."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Invalid account or account/partition "
                                 "combination specified' >&2\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    env = repo_env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "correlate", str(tmp_path / "s.zarr"),
                          "--cluster", "slurm"], capture_output=True, text=True, timeout=120, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [line for line in run.stderr.splitlines() if "sbatch" in line or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith(
        "ERROR: sbatch failed (exit 1): sbatch: error: Invalid account or account/partition combination specified, "
        "so no worker can start; check the job settings of --cluster "), run.stderr
