"""Connect to Dask: an embedded LocalCluster, a dask-jobqueue batch cluster or a scheduler.

``--cluster`` accepts

- ``local`` (default): a LocalCluster with one single-threaded worker process per core
  (settings in ``cluster-configs/local.yaml`` when present);
- ``local-threads``: one in-process worker with a thread per core (fast to start; tests);
- ``slurm``, ``pbs``, ``lsf``, ``slurm-gpu``…: ``cluster-configs/<name>.yaml``;
- a path to a YAML file in the same format;
- a scheduler address such as ``tcp://10.0.0.5:8786``.

Cluster YAML format (see the commented files in ``cluster-configs/``)::

    type: slurm            # local | slurm | pbs | lsf | sge | htcondor
    jobs: 2                # worker jobs to keep running (a job that ends early is resubmitted)
    adapt:                 # optional: let Dask scale between these bounds instead
      minimum_jobs: 1
      maximum_jobs: 20
    cluster:               # keyword arguments of dask_jobqueue.<Type>Cluster
      cores: 8
      memory: 32GB
      walltime: "01:00:00"
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import sys
import sysconfig
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from pipeline.errors import AirysortError

JOBQUEUE_CLASSES = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "lsf": "LSFCluster",
    "sge": "SGECluster",
    "htcondor": "HTCondorCluster",
    "oar": "OARCluster",
}


#: How long connecting to a running scheduler (``--cluster tcp://...``) may take.
SCHEDULER_TIMEOUT = "20s"

#: Seconds a batch cluster's first job submission may take before a command goes on
#: without knowing whether it worked.
SUBMIT_WAIT = 60.0

#: The cluster-configs/ of an installed (not editable) airysort.
INSTALLED_CONFIGS = Path(sysconfig.get_path("data")) / "share" / "airysort" / "cluster-configs"


def config_directories() -> list[Path]:
    """Where named cluster configs are looked up, first match wins."""
    directories = []
    if os.environ.get("AIRYSORT_CLUSTER_CONFIGS"):
        directories.append(Path(os.environ["AIRYSORT_CLUSTER_CONFIGS"]))
    directories.append(Path.cwd() / "cluster-configs")
    directories.append(Path(__file__).resolve().parents[1] / "cluster-configs")  # a source checkout
    directories.append(INSTALLED_CONFIGS)  # where `pip install` puts them (pyproject's data-files)
    return directories


def load_cluster_config(spec: str) -> dict[str, Any]:
    """Read the cluster YAML named by ``spec`` (a name in cluster-configs/ or a path)."""
    path = Path(spec).expanduser()
    if not (spec.endswith((".yaml", ".yml")) and path.exists()):
        candidates = [d / f"{spec}.yaml" for d in config_directories()]
        found = [c for c in candidates if c.exists()]
        if not found:
            if spec.endswith((".yaml", ".yml")):
                raise AirysortError(f"cluster config {spec!r} does not exist")
            known = sorted({p.stem for d in config_directories() if d.is_dir() for p in d.glob("*.yaml")})
            if re.fullmatch(r"[\w.-]+:\d+", spec):
                raise AirysortError(f"unknown cluster {spec!r}; a scheduler address needs its scheme: tcp://{spec}")
            raise AirysortError(
                f"unknown cluster {spec!r}; use 'local', 'local-threads', a scheduler address, "
                f"a YAML path, or one of: {', '.join(known) or '(no cluster-configs/ found)'}"
            )
        path = found[0]
    try:
        with open(path) as stream:
            config = yaml.safe_load(stream) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise AirysortError(f"cluster config {str(path)!r} is not valid YAML{line}: "
                            f"{getattr(error, 'problem', None) or error}") from None
    if not isinstance(config, dict) or "type" not in config:
        raise AirysortError(f"cluster config {str(path)!r} must be a mapping with a 'type' key")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:  # e.g. `queue:` one level too high: it would be ignored silently
        raise AirysortError(f"cluster config {str(path)!r} has unknown top-level key(s) {unknown}; the keys are "
                            f"{sorted(CONFIG_KEYS)}, and the batch system's options go under 'cluster:'")
    if "jobs" in config and (isinstance(config["jobs"], bool) or not isinstance(config["jobs"], int)
                             or config["jobs"] < 1):
        raise AirysortError(f"cluster config {str(path)!r}: 'jobs' must be a whole number >= 1, "
                            f"got {config['jobs']!r}")
    for key in ("cluster", "adapt"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise AirysortError(f"cluster config {str(path)!r}: '{key}' must be a mapping (indented 'name: value' "
                                f"lines below it), got {config[key]!r}")
    adapt = config.get("adapt") or {}
    if adapt and config["type"] == "local":
        raise AirysortError(f"cluster config {str(path)!r}: 'adapt' scales batch jobs; a local cluster has a "
                            "fixed number of workers (set 'n_workers' under 'cluster:')")
    unknown_adapt = sorted(set(adapt) - ADAPT_KEYS)
    if unknown_adapt:
        raise AirysortError(f"cluster config {str(path)!r}: unknown 'adapt' key(s) {unknown_adapt}; "
                            f"the keys are {sorted(ADAPT_KEYS)}")
    config["_path"] = str(path)
    return config


#: Top-level keys of a cluster YAML (see the module docstring).
CONFIG_KEYS = {"type", "jobs", "adapt", "cluster"}

#: Keys of its ``adapt:`` mapping (dask-jobqueue's ``JobQueueCluster.adapt``).
ADAPT_KEYS = {"minimum_jobs", "maximum_jobs", "minimum", "maximum", "minimum_cores", "maximum_cores",
              "minimum_memory", "maximum_memory", "interval", "wait_count", "target_duration"}


#: Environment of every worker process (set by its nanny).
#: - distributed's default MALLOC_TRIM_THRESHOLD_ (64 KiB) makes every per-frame temporary
#:   page-fault: ~3x the CPU time in the preprocessing kernels. Larger thresholds keep
#:   freed memory for reuse; memory is still returned between tasks.
#: - JAX grabs 75 % of a GPU's memory in the first process that uses it, so the second
#:   worker running ``predict`` or ``embed`` on the same card would fail; workers
#:   allocate what they use instead.
WORKER_ENVIRON = {
    "MALLOC_TRIM_THRESHOLD_": 256 * 2**20,
    "MALLOC_MMAP_THRESHOLD_": 32 * 2**20,
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
}


def worker_environ() -> dict[str, Any]:
    """distributed's ``nanny.pre-spawn-environ`` (thread limits, ...) with :data:`WORKER_ENVIRON`."""
    import dask
    import distributed  # noqa: F401  (loads distributed's config defaults)

    return {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_ENVIRON}


def worker_environ_export() -> str:
    """Shell line that gives batch-job workers :data:`WORKER_ENVIRON`.

    Dask merges the mapping into distributed's defaults on the node. It goes in one
    variable because Dask lower-cases the keys of ``DASK_A__B`` variables but parses their
    values as Python literals, which keeps the case.
    """
    return f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{json.dumps(WORKER_ENVIRON)}'"


def make_cluster(config: dict[str, Any]):
    """Build (but do not scale) the Dask cluster that ``config`` describes."""
    kind = config["type"]
    options = dict(config.get("cluster") or {})
    if kind == "local":
        import dask
        from distributed import LocalCluster

        dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()})
        _check_local_options(config, options)
        options.setdefault("n_workers", os.cpu_count() or 1)
        options.setdefault("threads_per_worker", 1)
        options.setdefault("dashboard_address", ":0")
        # Worker processes started meanwhile inherit the ignored SIGINT. A terminal sends
        # Ctrl-C to the whole process group: the workers would die mid-task with
        # tracebacks of their own, while the client should decide (``airysort watch``
        # finishes the batch in hand; other commands stop the cluster).
        with ctrl_c_handled_by(signal.SIG_IGN), warnings.catch_warnings(), _options_checked(config, "LocalCluster"):
            # Another command's dashboard on the port: Dask takes a free one and says so
            # in a multi-line warning; the link printed below names the port taken.
            warnings.filterwarnings("ignore", message="Port .* is already in use")
            return LocalCluster(**options)
    if kind not in JOBQUEUE_CLASSES:
        raise AirysortError(
            f"cluster type {kind!r} is not supported; use 'local' or one of {sorted(JOBQUEUE_CLASSES)}"
        )
    import dask
    import dask_jobqueue

    cluster_class = getattr(dask_jobqueue, JOBQUEUE_CLASSES[kind])
    # The workers' environment first, then the user's lines: this config's, else the
    # deprecated env_extra, else the site's jobqueue.yaml (dask-jobqueue reads those only
    # when no prologue is given, and one is always given here).
    if "job_script_prologue" in options:  # the config's own, even empty, replaces the site's
        prologue = options.pop("job_script_prologue") or []
    else:
        prologue = (options.pop("env_extra", None)
                    or dask.config.get(f"jobqueue.{kind}.job-script-prologue", None) or [])
    options["job_script_prologue"] = [worker_environ_export(), *prologue]
    with _options_checked(config, cluster_class.__name__):
        return cluster_class(**options)


def _check_address(address: str) -> None:
    """Refuse a ``tcp://`` address without a host and a port number in 1-65535."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        host, port = parse_host_port(parse_address(address)[1])
    except ValueError as error:
        raise AirysortError(f"{address!r} is not a scheduler address ({error}); write tcp://HOST:PORT") from None
    if not host or not 0 < port < 65536:
        raise AirysortError(f"{address!r} needs a host and a port number from 1 to 65535: tcp://HOST:PORT")


def _check_scheduler(address: str) -> None:
    """Ask ``address`` who it is, within :data:`SCHEDULER_TIMEOUT`.

    ``Client`` waits for ever for the handshake of a service that accepts the connection
    but does not speak Dask's protocol (a mistyped port); this question has a deadline. It
    runs on a loop of its own, in a thread, so that a caller's running loop (a notebook)
    does not matter.
    """
    import asyncio
    import concurrent.futures

    from dask.utils import parse_timedelta
    from distributed.core import rpc

    async def identity() -> dict:
        async with rpc(address) as scheduler:
            return await scheduler.identity()

    deadline = parse_timedelta(SCHEDULER_TIMEOUT)
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        answer = thread.submit(asyncio.run, asyncio.wait_for(identity(), deadline)).result()
    if not isinstance(answer, dict) or answer.get("type") != "Scheduler":
        raise AirysortError(f"{address} answered, but not as a Dask scheduler ({str(answer)[:80]}); is the port right?")


def _check_local_options(config: dict[str, Any], options: dict[str, Any]) -> None:
    """LocalCluster passes options it does not know on to its workers, whose start then fails
    with a traceback per worker: check the names against the signatures first. A custom
    ``worker_class`` takes options of its own, and is left to report them itself."""
    import inspect

    from distributed import LocalCluster, Nanny, Worker
    from distributed.core import Server

    if "worker_class" in options:
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    known = {name for cls in (LocalCluster, Nanny, Worker, Server)
             for name, parameter in inspect.signature(cls).parameters.items() if parameter.kind in named}
    unknown = sorted(set(options) - known)
    if unknown:
        where = config.get("_path", "type 'local'")
        raise AirysortError(f"cluster config {where}: LocalCluster and its workers take no option(s) {unknown} "
                            "under 'cluster:' (see distributed.LocalCluster)")


def _check_submit_command(config: dict[str, Any]) -> None:
    """Without the batch system's submit command, dask-jobqueue would log a traceback and
    wait for workers forever."""
    import dask_jobqueue

    kind = config["type"]
    submit = getattr(dask_jobqueue, JOBQUEUE_CLASSES[kind]).job_cls.submit_command
    if shutil.which(submit) is None:
        raise AirysortError(f"'{submit}' is not on this machine's PATH: --cluster {config.get('_path', kind)} submits "
                            f"{kind} jobs, so run on the batch system's login node (or use --cluster local)")


@contextlib.contextmanager
def _options_checked(config: dict[str, Any], what: str, key: str = "cluster") -> Iterator[None]:
    """An option under ``key`` that ``what`` rejects is one error line naming the file."""
    try:
        yield
    except (TypeError, ValueError, RuntimeError) as raised:
        # A LocalCluster hands options it does not know to its workers, whose start then
        # fails as "Nanny failed to start." with the TypeError as its cause.
        error: BaseException | None = raised
        while error is not None and not isinstance(error, (TypeError, ValueError)):
            error = error.__cause__ or error.__context__
        if error is None:
            raise
        where = config.get("_path", f"type {config.get('type')!r}")
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AirysortError(f"cluster config {where}: {what} rejects its '{key}:' options: {first}") from None


@contextlib.contextmanager
def ctrl_c_handled_by(handler: Any) -> Iterator[None]:
    """Ctrl-C (SIGINT) goes to ``handler`` (a function of ``(signum, frame)``, or
    ``signal.SIG_IGN``) inside the block, to the previous handler after it. Outside the
    main thread, where Python cannot set signal handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def dask_client(spec: str = "local", *, reuse: bool = True) -> Iterator[Any]:
    """Context manager yielding a ``distributed.Client`` for ``spec`` (see module docstring).

    With ``reuse`` (the default), inside an existing client (a notebook, or a test that made
    one) that client is used and left running.
    """
    from distributed import Client, default_client

    try:
        existing = default_client() if reuse else None
    except ValueError:
        existing = None
    if existing is not None:
        yield existing
        return

    if spec.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        try:
            if spec.startswith("tcp://"):  # (tls:// needs the Client's security settings)
                _check_address(spec)
                _check_scheduler(spec)
            client = Client(spec, timeout=SCHEDULER_TIMEOUT)
        except (OSError, TimeoutError) as error:
            detail = type(error).__name__ + (f": {str(error).splitlines()[0]}" if str(error) else "")
            raise AirysortError(f"cannot reach the Dask scheduler at {spec} within {SCHEDULER_TIMEOUT} "
                                f"({detail}); is it running, and is the address right?") from None
        with client:
            yield client
        return
    if spec == "local-threads":
        from distributed import LocalCluster

        with LocalCluster(
            n_workers=1, threads_per_worker=os.cpu_count() or 1, processes=False, dashboard_address=":0"
        ) as cluster, Client(cluster) as client:
            _register_worker_setup(client)
            with _cancelled_tasks_quiet_on_ctrl_c(client):
                yield client
        return
    if spec == "local" and not any((d / "local.yaml").exists() for d in config_directories()):
        config = {"type": "local"}
    else:
        config = load_cluster_config(spec)
    if config["type"] in JOBQUEUE_CLASSES:
        _check_submit_command(config)
    with make_cluster(config) as cluster, _submit_failures_watched(config) as failures:
        if config["type"] != "local":
            # Always adapt, with fixed bounds when only ``jobs`` is given: a worker job that
            # ends early (scancel, walltime, preemption, node failure) is then resubmitted.
            # A plain ``scale(jobs=n)`` never replaces it and the run limps on with fewer.
            jobs = int(config.get("jobs", 1))
            adapt = config.get("adapt") or {"minimum_jobs": jobs, "maximum_jobs": jobs}
            with _options_checked(config, "adapt()", "adapt"):
                cluster.adapt(**adapt)
            if any(adapt.get(key) for key in ("minimum_jobs", "minimum", "minimum_cores", "minimum_memory")):
                _wait_for_first_submission(cluster, failures, config)  # (else no job is due yet)
        with Client(cluster) as client:
            _register_worker_setup(client)
            # The port is only known now (8787 may be taken); docs/hpc.md shows the tunnel.
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
            with _cancelled_tasks_quiet_on_ctrl_c(client):
                yield client


class _SubmitFailures(logging.Filter):
    """Keeps dask-jobqueue's failed job submissions (``sbatch``, ``qsub``, ``bsub`` exiting
    non-zero) out of the log: each comes with a traceback, again at every adapt interval,
    for ever (a wrong account or partition). They are collected in ``failures``; once
    ``one_line`` is set, each is let through as one line instead."""

    def __init__(self, submit: str) -> None:
        super().__init__()
        self.submit, self.failures, self.one_line = submit, [], False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        text = str(error)
        if not (isinstance(error, RuntimeError) and text.startswith("Command exited with non-zero exit code")
                and f"\n{self.submit} " in text):
            return True
        self.failures.append(text)
        if not self.one_line:
            return False
        record.msg, record.args, record.exc_info, record.exc_text = (
            f"{_submit_problem(text, self.submit)}; the batch cluster submits the job again", (), None, None)
        return True


def _submit_problem(failure: str, submit: str) -> str:
    """'sbatch failed (exit 1): <its last error line>' from dask-jobqueue's message."""
    code = re.search(r"Exit code: (\S+)", failure)
    stderr = failure.split("stderr:", 1)[-1].strip().splitlines()
    return f"{submit} failed (exit {code[1] if code else '?'}): {stderr[-1] if stderr else 'no message'}"


#: Loggers through which a failed submission reaches the user (the event loop's callback).
SUBMIT_FAILURE_LOGGERS = ("tornado.application", "asyncio", "distributed.deploy.adaptive_core")


@contextlib.contextmanager
def _submit_failures_watched(config: dict[str, Any]) -> Iterator[_SubmitFailures | None]:
    """A :class:`_SubmitFailures` on the loggers for the life of a batch cluster (None for
    a local one)."""
    if config["type"] not in JOBQUEUE_CLASSES:
        yield None
        return
    import dask_jobqueue

    watcher = _SubmitFailures(getattr(dask_jobqueue, JOBQUEUE_CLASSES[config["type"]]).job_cls.submit_command)
    for name in SUBMIT_FAILURE_LOGGERS:
        logging.getLogger(name).addFilter(watcher)
    try:
        yield watcher
    finally:
        for name in SUBMIT_FAILURE_LOGGERS:
            logging.getLogger(name).removeFilter(watcher)


def _wait_for_first_submission(cluster, failures: _SubmitFailures, config: dict[str, Any]) -> None:
    """Until a worker job has a job id, or its submission failed (an AirysortError with the
    batch system's message), or :data:`SUBMIT_WAIT` passed. Without it, a submit command
    that always fails left the command waiting for workers for ever."""
    deadline = time.monotonic() + SUBMIT_WAIT
    try:
        while time.monotonic() < deadline and not failures.failures:
            if any(getattr(job, "job_id", None) for job in list(cluster.workers.values())):
                return
            time.sleep(0.1)
        if failures.failures:
            from distributed.core import Status

            # A job whose start raised stays "created", which closing the cluster asserts
            # against (distributed's SpecCluster._close): it failed.
            for job in list(cluster.workers.values()):
                if getattr(job, "job_id", None) is None and job.status == Status.created:
                    job.status = Status.failed
            where = config.get("_path", config["type"])
            raise AirysortError(f"{_submit_problem(failures.failures[0], failures.submit)}, so no worker can "
                                f"start; check the job settings of --cluster {where} (account, partition or "
                                "queue, resources)")
    finally:
        failures.one_line = True


#: What a worker logs when a heartbeat to the scheduler fails.
HEARTBEAT_FAILURE = "Failed to communicate with scheduler during heartbeat"

#: Workers of this process whose failed heartbeats are dropped while they close.
_watched_workers: weakref.WeakSet = weakref.WeakSet()


class _HeartbeatFailureWhileClosing(logging.Filter):
    """Drops :data:`HEARTBEAT_FAILURE` while a watched worker of this process is closing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(HEARTBEAT_FAILURE):
            return True
        return not any(worker.status.name in ("closing", "closed") for worker in list(_watched_workers))


def quiet_heartbeat_while_closing(worker) -> None:
    """From now on, ``worker`` does not log a failed heartbeat while it is closing.

    When a cluster closes, a heartbeat already on its way from a closing worker finds the
    scheduler's end of the connection closed, and the worker logs the failure with a
    traceback (distributed issue 7105). At the end of a successful command that read as
    if it had failed (seen after an `ingest` on a 16-core machine; the more workers, the
    likelier). The same failure from a worker that is running still shows.
    """
    _watched_workers.add(worker)
    worker_logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _HeartbeatFailureWhileClosing) for f in worker_logger.filters):
        worker_logger.addFilter(_HeartbeatFailureWhileClosing())


def _register_worker_setup(client) -> None:
    """Run :func:`quiet_heartbeat_while_closing` on every worker, present and future."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class QuietHeartbeatWhileClosing(WorkerPlugin):
        name = "airysort-quiet-heartbeat-while-closing"

        def setup(self, worker) -> None:
            quiet_heartbeat_while_closing(worker)

    client.register_plugin(QuietHeartbeatWhileClosing())


def on_cluster(function: Callable) -> Callable:
    """Give a store function that computes with Dask a ``cluster`` keyword (default
    ``"local"``): it runs inside :func:`dask_client` of that spec, so that it works the
    same from the command line, from a notebook with its own client (which is used), and
    from a script with none (a cluster is started and stopped around the call)."""

    @functools.wraps(function)
    def wrapper(*args: Any, cluster: str = "local", **kwargs: Any) -> Any:
        with dask_client(cluster):
            return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _cancelled_tasks_quiet_on_ctrl_c(client) -> Iterator[None]:
    """Ctrl-C: closing the cluster cancels the running tasks, and each worker would log a
    warning per task it was running. The command says it was interrupted; the workers need
    not (only their state machine's warnings are silenced, and only then)."""
    try:
        yield
    except KeyboardInterrupt:
        def quiet() -> None:
            logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)

        with contextlib.suppress(Exception):
            client.run(quiet)
        raise
