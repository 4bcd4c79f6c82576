"""A real single-node SLURM for the tests in this package, started once per session.

The :func:`slurm` fixture

1. installs Debian's ``slurmctld slurmd slurm-client munge`` when they are missing
   (``apt-get update`` once, then ``apt-get install``; needs root);
2. writes a private configuration under a temporary directory: a munge key and socket,
   and a ``slurm.conf`` for this host alone (node name from ``hostname -s``, CPUs and
   memory as ``slurmd -C`` measures them, free TCP ports, state and spool directories
   in the temporary directory, ``SlurmUser=root``). Process tracking is
   ``proctrack/linuxproc`` and tasks are not confined (``task/none``), so neither needs
   cgroups: they work in containers and CI sandboxes where cgroup plugins do not;
3. starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as child processes,
   sets ``SLURM_CONF`` for this process (so that ``sbatch`` called by dask-jobqueue, and
   ``srun``, find the private cluster) and waits until ``sinfo`` shows the node idle;
4. afterwards cancels every job, waits for them to end and stops the daemons.

Nothing outside the temporary directory is touched apart from the package install, so
a SLURM that the machine already runs is left alone. The tests are skipped, with the
reason, only where SLURM cannot run: not root, no ``apt-get`` to install it with, or
the package registry unreachable. Any other failure fails the tests, with the daemon
logs in the message.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PARTITION = "debug"
PROGRAMS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel", "srun")
# Where Debian puts the daemons; root's PATH has them, other PATHs may lack /usr/sbin.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])
# apt-get's words for "the package registry could not be reached".
OFFLINE = re.compile(
    r"Temporary failure resolving|Could not resolve|Failed to fetch|Unable to connect|"
    r"Network is unreachable|Could not connect|Connection failed|No route to host",
)


def _which(program: str) -> str | None:
    return shutil.which(program, path=SEARCH_PATH)


def _install_slurm() -> None:
    """Install the SLURM and munge packages if any program is missing; skip if impossible."""
    missing = [p for p in PROGRAMS if _which(p) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing) and installing it needs root")
    if _which("apt-get") is None:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SEARCH_PATH}
    lock = ["-o", "DPkg::Lock::Timeout=120"]  # wait for another apt run rather than fail
    update = subprocess.run(["apt-get", *lock, "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
    install = subprocess.run(
        ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
        env=env, capture_output=True, text=True, timeout=900,
    )
    log = update.stdout + update.stderr + install.stdout + install.stderr
    if install.returncode != 0:
        if OFFLINE.search(log):
            pytest.skip(f"cannot install {' '.join(PACKAGES)}: the package registry is unreachable:\n{log[-1500:]}")
        pytest.fail(f"apt-get install {' '.join(PACKAGES)} failed (status {install.returncode}):\n{log[-3000:]}")
    still = [p for p in PROGRAMS if _which(p) is None]
    if still:
        pytest.fail(f"after installing {' '.join(PACKAGES)} these programs are still missing: {still}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _node_line(node: str) -> str:
    """This host as a slurm.conf NodeName line: topology and memory as slurmd measures them.

    Taking slurmd's own numbers (``slurmd -C``) means the node registers without the
    "low RealMemory"/"CPU count mismatch" that drain a hand-written line.
    """
    probe = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=60)
    first = probe.stdout.splitlines()[0] if probe.returncode == 0 and probe.stdout else ""
    fields = dict(item.split("=", 1) for item in first.split() if "=" in item)
    if "CPUs" not in fields or "RealMemory" not in fields:  # fall back to what Python sees
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        fields = {"CPUs": str(os.cpu_count() or 1), "RealMemory": str(pages // 2**20)}
    fields["NodeName"] = node
    fields.pop("UpTime", None)
    fields["NodeAddr"] = "127.0.0.1"
    fields["State"] = "UNKNOWN"
    return " ".join(f"{k}={v}" for k, v in fields.items())


@dataclasses.dataclass
class Slurm:
    """Handle on the running test cluster."""

    root: Path  # temporary directory holding configuration, state and logs
    conf: Path  # slurm.conf
    node: str  # the node's name
    cpus: int
    partition: str  # the one (default) partition
    daemons: dict[str, subprocess.Popen]

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM client commands (and programs that call them)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SEARCH_PATH}

    def run(self, *command: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``sinfo``, ``squeue``…) against this cluster."""
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def jobs(self) -> dict[str, str]:
        """Job id -> state (PENDING, RUNNING…) of every job in the queue."""
        lines = self.run("squeue", "-h", "-o", "%i %T").stdout.split("\n")
        return dict(line.split() for line in lines if line.strip())

    def logs(self) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)


def _write_config(root: Path) -> tuple[Path, str, int]:
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    key = root / "munge" / "munge.key"
    if not key.exists():  # a private key: this cluster trusts nobody else's credentials
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
    node_line = _node_line(node)
    cpus = int(re.search(r"CPUs=(\d+)", node_line).group(1))
    conf = root / "slurm.conf"
    conf.write_text(
        f"""# Single-node test cluster written by tests/slurm/conftest.py
ClusterName=airysort-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge' / 'munge.socket'}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
# No cgroups anywhere: they are often unavailable in containers and CI sandboxes.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
{node_line}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf, node, cpus


def _start(name: str, command: list[str], root: Path) -> subprocess.Popen:
    output = open(root / "log" / f"{name}.out", "w")
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_for(condition, timeout: float, what: str, slurm: Slurm | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{slurm.logs() if slurm else ''}")


def _stop(slurm: Slurm) -> None:
    """Cancel every job, let them end, then stop the daemons (slurmd first)."""
    try:
        slurm.run("scancel", "--full", "--user", "root", check=False, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and slurm.jobs():
            time.sleep(0.5)
    except (subprocess.SubprocessError, OSError):
        pass  # the controller is already gone; stop the daemons anyway
    for name in ("slurmd", "slurmctld", "munged"):
        process = slurm.daemons.get(name)
        if process is None or process.poll() is not None:
            continue
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Slurm:
    """A running single-node SLURM; ``SLURM_CONF`` points at it for the whole session."""
    _install_slurm()
    if os.geteuid() != 0:
        pytest.skip("the SLURM daemons of the test cluster run as root (SlurmUser=root)")
    root = tmp_path_factory.mktemp("slurm")
    conf, node, cpus = _write_config(root)
    socket_path = root / "munge" / "munge.socket"
    slurm = Slurm(root=root, conf=conf, node=node, cpus=cpus, partition=PARTITION, daemons={})
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        slurm.daemons["munged"] = _start(
            "munged",
            [_which("munged"), "--foreground", "--force", f"--socket={socket_path}",
             f"--key-file={root / 'munge' / 'munge.key'}", f"--log-file={root / 'log' / 'munged.log'}",
             f"--pid-file={root / 'munge' / 'munged.pid'}", f"--seed-file={root / 'munge' / 'munged.seed'}"],
            root,
        )
        _wait_for(socket_path.exists, 30, "munged to create its socket", slurm)
        slurm.daemons["slurmctld"] = _start("slurmctld", [_which("slurmctld"), "-D", "-f", str(conf)], root)
        slurm.daemons["slurmd"] = _start("slurmd", [_which("slurmd"), "-D", "-f", str(conf)], root)

        def node_idle() -> bool:
            for name, process in slurm.daemons.items():
                if process.poll() is not None:
                    pytest.fail(f"{name} exited with status {process.returncode}\n{slurm.logs()}")
            state = slurm.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            return state.returncode == 0 and state.stdout.strip() == "idle"

        _wait_for(node_idle, 90, f"sinfo to show node {node!r} idle", slurm)
        yield slurm
    finally:
        _stop(slurm)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


@pytest.fixture
def slurm_yaml(slurm, tmp_path) -> Path:
    """A test copy of ``cluster-configs/slurm.yaml``: what a user edits, sized for this node.

    Only the fields a user edits for a small site change: 1 core and 2 GB per job, a
    10-minute walltime, logs and scratch in the test's directory, the dashboard on a free
    port, and ``python`` set to this interpreter (as on a cluster where the login node
    and the compute nodes share the virtual environment).
    """
    import yaml

    shipped = Path(__file__).resolve().parents[2] / "cluster-configs" / "slurm.yaml"
    config = yaml.safe_load(shipped.read_text())
    config["jobs"] = 2
    config["cluster"].update(
        cores=1,
        processes=1,
        memory="2GB",
        walltime="00:10:00",
        python=sys.executable,
        log_directory=str(tmp_path / "dask-logs"),
        local_directory=str(tmp_path),
    )
    config["cluster"].setdefault("scheduler_options", {})["dashboard_address"] = ":0"
    path = tmp_path / "slurm-test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
