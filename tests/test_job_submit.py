"""A sweep submitted with ``ray job submit`` to a real head node, exactly as the README and docs/cluster.md show it,
on a machine where Ray's default ports are taken and another Ray runs.

The module first makes sure Ray's default ports (6379, 8265, 52365, 10001) are taken (a listener of its own on
each one nobody holds) and starts a second Ray (``ray start --head --block``, its own temp dir and ports). Then
it starts the cluster under test as the README does: ``ray start --head --block`` in the background with its own
``--temp-dir`` and every port it would otherwise take by default chosen free, token authentication on with a
token file of its own; it waits until ``ray job list`` answers, submits ``python -m jobs.sweep ...`` from the
repository root with ``--working-dir .``, reads the response dataset back, stops a second job with ``ray job
stop`` while it waits for a lease the test holds on its output (its log must end with our summary naming
SIGTERM, its status STOPPED), and finally
stops the cluster as the README does: SIGTERM to the ``ray start`` process, which stops that node's processes and
no other (the second Ray is checked to be still up, the default ports still taken). Whatever happens, every
process this module started is killed at the end by process group and descent (never ``ray stop``, which would
stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the cluster's processes in /proc"),
]

REPO_ROOT = Path(__file__).resolve().parent.parent
SCANS = ((4, 7, 12), (8, 5, 20))  # (session, scan_idx, units)
CLIPS, FRAMES, HEIGHT, WIDTH = 2, 4, 36, 64
#: Ray's default ports: GCS, dashboard (job server), dashboard agent, Ray client server.
DEFAULT_PORTS = (6379, 8265, 52365, 10001)
#: Runtime environment of the test jobs as in the README (the cluster runs on this machine, where the project's
#: dependencies are installed already, so it installs nothing): unbuffered output, and 60 s for a job to finish
#: after `ray job stop`'s SIGTERM before Ray kills it (Ray's default is 3 s).
RUNTIME_ENV = {"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": "60"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _taken(port: int) -> bool:
    """Something listens on ``port`` (of any interface)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process on the machine."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z":
            table[int(name)] = (int(fields[1]), int(fields[2]))
    return table


def _members(group: int) -> set[int]:
    """Live processes of process group ``group`` and all their descendants."""
    table = _processes()
    found = {pid for pid, (_, pgid) in table.items() if pgid == group}
    while True:
        children = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        if not children:
            return found - {os.getpid()}
        found |= children


def _kill_cluster(group: int) -> None:
    """SIGKILL the processes of process group ``group`` and all their descendants (found before any dies, so
    that orphans are not lost to pid 1), until none is left."""
    for _ in range(5):
        doomed = _members(group)
        if not doomed:
            return
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float, details: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout_s:.0f} s\n{details()}")
        time.sleep(0.5)


def _ray_cli() -> str:
    """The ``ray`` command of the Python running the tests (not whatever ``ray`` is first on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def _ray_env(token_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        # `python` in the job's entrypoint is the interpreter running the tests (as in an activated venv)
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


@dataclass
class Node:
    """A ``ray start --head --block`` running in the background: its process, log and temp dir."""

    process: subprocess.Popen
    log: Path
    temp_dir: Path

    @classmethod
    def start(cls, root: Path, env: dict[str, str], ports: list[str]) -> Node:
        """Start it as the README does and wait for "Ray runtime started" in its log (AssertionError with the
        log when it exits first)."""
        log = root / "head.log"
        command = [_ray_cli(), "start", "--head", "--block", "--temp-dir", str(root / "ray"), *ports,
                   "--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats"]
        with open(log, "w") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)  # its own process group
        node = cls(process, log, root / "ray")
        try:
            _wait_for(lambda: "Ray runtime started" in log.read_text() or process.poll() is not None,
                      "Ray started", 180, lambda: log.read_text()[-3000:])
        except AssertionError:
            node.kill()
            raise
        if process.poll() is not None:
            node.kill()
            raise AssertionError(f"`ray start --head` exited {process.returncode}:\n{log.read_text()[-3000:]}")
        return node

    def kill(self) -> None:
        """SIGKILL everything it started (its process group and their descendants)."""
        _kill_cluster(self.process.pid)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@dataclass(frozen=True)
class Head:
    """The cluster under test: its dashboard ``address``, the environment a client needs to reach it, its token,
    its node and the other Ray beside it."""

    address: str
    client_env: dict[str, str]
    token: str
    node: Node
    neighbour: Node


def _wait_for_job_server(address: str, env: dict[str, str], temp_dir: Path, timeout_s: float) -> None:
    """As the README: until ``ray job list --address ADDRESS`` answers; else fail with the end of the dashboard's
    log (which says ``http server disabled`` when ``ray[default]`` is missing)."""

    def answers() -> bool:
        return subprocess.run([_ray_cli(), "job", "list", "--address", address], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=120).returncode == 0

    def tail() -> str:
        logs = sorted(temp_dir.glob("session_*/logs/dashboard.log"))
        return "dashboard.log ends:\n" + (logs[-1].read_text()[-3000:] if logs else "(no dashboard.log)")

    _wait_for(answers, f"the job server at {address} answering (is ray[default] installed?)", timeout_s, tail)


def _own_ports() -> tuple[list[str], int]:
    """`ray start` flags giving every port it would otherwise take by default a free one, and the dashboard's."""
    dashboard = _free_port()
    return ["--node-ip-address", "127.0.0.1", "--port", str(_free_port()), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(_free_port()),
            "--ray-client-server-port", str(_free_port())], dashboard


def _start(root: Path) -> tuple[Node, dict[str, str], int]:
    """A head node on ports of its own (README), with a token file of its own: (node, its env, dashboard port)."""
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = _ray_env(token_file)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single-node mode: Ray keeps 127.0.0.1 as the node address
    ports, dashboard = _own_ports()
    return Node.start(root, env, ports), env, dashboard


@pytest.fixture(scope="module")
def neighbour() -> Iterator[Node]:
    """Ray's default ports taken and another Ray running on this machine. Each default port nobody holds is held
    by a listener of this fixture (a Ray started on the defaults here would race the session's own local Ray for
    some of them: its agent port, for one); the other Ray runs on ports of its own."""
    root = Path(tempfile.mkdtemp(prefix="fnnray-n-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 B
    listeners = []
    node = None
    try:
        for port in DEFAULT_PORTS:
            if not _taken(port):
                listener = socket.socket()
                listener.bind(("", port))
                listener.listen()
                listeners.append(listener)
        node, _, _ = _start(root)
        yield node
    finally:
        if node is not None:
            node.kill()
        for listener in listeners:
            listener.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def head(neighbour):
    """The cluster under test, started as the README does; all its processes killed whatever the tests do."""
    root = Path(tempfile.mkdtemp(prefix="fnnray-", dir="/tmp"))
    node, env, dashboard = _start(root)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        client_env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        _wait_for_job_server(address, client_env, node.temp_dir, timeout_s=180)
        yield Head(address, client_env, (root / "auth_token").read_text(), node, neighbour)
    finally:
        node.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_job_server_refuses_requests_without_the_token(head):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{head.address}/api/jobs/", timeout=10)
    assert refused.value.code == 401


def test_ray_job_submit_runs_a_sweep(head, tmp_path):
    import pyarrow.dataset as ds

    from fnn_model.config import NetworkConfig
    from fnn_model.release import Release
    from jobs.make_synthetic import make_synthetic

    release, stimuli, output = (str(tmp_path / name) for name in ("release", "stimuli", "output"))
    make_synthetic(release, stimuli, SCANS, clips=CLIPS, frames=FRAMES, config=NetworkConfig.tiny(), height=HEIGHT,
                   width=WIDTH, seed=3)
    command = [
        _ray_cli(), "job", "submit", "--address", head.address, "--working-dir", ".",
        "--runtime-env-json", json.dumps(RUNTIME_ENV),
        "--", "python", "-m", "jobs.sweep", "--release", release, "--stimuli", stimuli, "--output", output,
    ]
    run = subprocess.run(command, check=False, cwd=REPO_ROOT, env=head.client_env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 0 and "succeeded" in run.stdout, f"the job failed:\n{run.stdout[-6000:]}"
    assert head.token not in run.stdout

    table = ds.dataset(str(Path(output) / "responses"), partitioning="hive").to_table().to_pandas()
    units = {(s, i): Release.open(release).units(s, i) for s, i, _ in SCANS}
    assert len(table) == CLIPS * sum(u for _, _, u in SCANS)
    keys = table[["session", "scan_idx", "clip_id", "unit_id"]]
    assert not keys.duplicated().any()
    for (session, scan_idx), expected in units.items():
        rows = table[(table.session == session) & (table.scan_idx == scan_idx)]
        assert sorted(set(rows.clip_id)) == [f"clip-{n:05d}" for n in range(CLIPS)]
        for _, clip in rows.groupby("clip_id"):
            assert sorted(clip.unit_id) == sorted(expected.unit_id)
            assert {len(r) for r in clip.response} == {FRAMES}
            assert np.isfinite(np.concatenate(clip.response.to_list())).all()


def _job_status(head: Head, job_id: str) -> str:
    """The job's status from the job server (``PENDING``, ``RUNNING``, ``STOPPED``, ``SUCCEEDED``, ``FAILED``)."""
    request = urllib.request.Request(f"{head.address}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["status"]


def test_ray_job_stop_ends_the_log_with_our_summary(head, tmp_path):
    """`ray job stop` on a sweep that waits for another run's lease on its output (a phase the test holds for as
    long as it likes, so the job cannot finish first on a fast or a slow machine; SIGTERM while computing, in a
    real process: test_signals.py)."""
    from fnn_model.config import NetworkConfig
    from fnn_ray.lease import OutputLease
    from fnn_ray.ledger import Ledger
    from jobs.make_synthetic import make_synthetic

    release, stimuli, output = (str(tmp_path / name) for name in ("release", "stimuli", "output"))
    make_synthetic(release, stimuli, SCANS, clips=CLIPS, frames=FRAMES, config=NetworkConfig.tiny(), height=HEIGHT,
                   width=WIDTH, seed=4)
    ray_job = [_ray_cli(), "job"]
    where = ["--address", head.address]

    def run(*args: str) -> str:
        done = subprocess.run([*ray_job, *args], check=False, cwd=REPO_ROOT, env=head.client_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert done.returncode == 0, f"ray job {' '.join(args)}:\n{done.stdout[-4000:]}"
        return done.stdout

    holder = OutputLease(output).acquire()
    try:
        submitted = run("submit", *where, "--no-wait", "--working-dir", ".", "--runtime-env-json",
                        json.dumps(RUNTIME_ENV), "--", "python", "-m", "jobs.sweep", "--release", release,
                        "--stimuli", stimuli, "--output", output, "--wait-for-lock", "--no-progress")
        job_id = re.search(r"raysubmit_\w+", submitted).group(0)
        _wait_for(lambda: "waiting for it" in run("logs", *where, job_id), "the job waiting for the lease", 240,
                  lambda: run("logs", *where, job_id))
        run("stop", *where, job_id)
        _wait_for(lambda: _job_status(head, job_id) == "STOPPED", "the job STOPPED", 120,
                  lambda: f"status {_job_status(head, job_id)}; logs:\n{run('logs', *where, job_id)}")
        logs = run("logs", *where, job_id)
    finally:
        holder.release()
    lines = [line for line in logs.splitlines() if line.strip()]
    tail = "\n".join(lines[-4:])
    assert "stopped by SIGTERM" in tail and "rerun the same command" in tail, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    assert not Ledger(output).commits()


def test_stopping_the_cluster_stops_it_alone(head):
    """The README's `kill $HEAD_PID`: the head's `ray start --block` stops its node's processes, no others."""
    members = _members(head.node.process.pid)
    assert len(members) > 3, members  # gcs, raylet, dashboard, ... of this cluster
    neighbours = _members(head.neighbour.process.pid)
    head.node.process.send_signal(signal.SIGTERM)
    head.node.process.wait(timeout=120)
    _wait_for(lambda: not (_members(head.node.process.pid) | (members & set(_processes()))), "the cluster gone", 60,
              lambda: f"left: {_members(head.node.process.pid) | (members & set(_processes()))}")
    assert head.neighbour.process.poll() is None, "the other Ray was stopped too"
    assert neighbours <= set(_processes()), "processes of the other Ray were stopped"
    assert all(_taken(port) for port in DEFAULT_PORTS)
