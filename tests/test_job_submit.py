"""A sweep submitted with ``ray job submit`` to a real head node, exactly as docs/cluster.md shows it.

The test starts a private head node (``ray start --head``: its own temp dir, free ports, the dashboard and job
server on 127.0.0.1, token authentication on with a token file of its own), writes a tiny synthetic release and
clips to local paths, submits ``python -m jobs.sweep ...`` from the repository root with ``--working-dir .``, and
reads the response dataset back. Whatever happens, the cluster is stopped by killing its processes: the process
group ``ray start`` was started in and every descendant of those processes (workers, the job's driver), never
with ``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
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
#: Runtime environment of the test job: the cluster runs on this machine, where the project's dependencies are
#: installed already, so it installs nothing (docs/cluster.md shows the runtime env of a real cluster).
RUNTIME_ENV = {"env_vars": {"PYTHONUNBUFFERED": "1"}}


@dataclass(frozen=True)
class Head:
    """A running head node: its dashboard ``address`` and the environment a client needs to reach it."""

    address: str
    client_env: dict[str, str]
    token: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        table[int(name)] = (int(fields[1]), int(fields[2]))
    return table


def _kill_cluster(group: int) -> None:
    """SIGKILL the processes of process group ``group`` and all their descendants (found before any dies, so
    that orphans are not lost to pid 1), until none is left."""
    for _ in range(5):
        table = _processes()
        doomed = {pid for pid, (_, pgid) in table.items() if pgid == group}
        while True:
            children = {pid for pid, (ppid, _) in table.items() if ppid in doomed} - doomed
            if not children:
                break
            doomed |= children
        doomed.discard(os.getpid())
        if not doomed:
            return
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _ray_cli() -> str:
    """The ``ray`` command of the Python running the tests (not whatever ``ray`` is first on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def _wait_for_dashboard(address: str, token: str, temp_dir: Path, timeout_s: float) -> None:
    """Wait until the job server answers; else fail with the end of the dashboard's log (which says ``http server
    disabled`` when ``ray[default]`` is missing)."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            logs = sorted(temp_dir.glob("session_*/logs/dashboard.log"))
            tail = logs[-1].read_text()[-3000:] if logs else "(no dashboard.log)"
            raise AssertionError(f"the job server at {address} did not answer within {timeout_s:.0f} s "
                                 f"(is ray[default] installed?); dashboard.log ends:\n{tail}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def head():
    """A private head node on this machine; stopped (all its processes killed) whatever the test does."""
    root = Path(tempfile.mkdtemp(prefix="fnnray-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 B
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    dashboard = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        # `python` in the job's entrypoint is the interpreter running the tests (as in an activated venv)
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        # single-node mode: Ray keeps 127.0.0.1 as the node address instead of the machine's outward address
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    log = root / "ray-start.log"
    command = [
        _ray_cli(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", "0",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
        "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(root / "ray"), "--disable-usage-stats",
    ]
    with open(log, "w") as out:
        started = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # its own process group: the cluster's processes
    try:
        if started.wait(timeout=120) != 0:
            raise AssertionError(f"`ray start --head` failed ({started.returncode}):\n{log.read_text()[-3000:]}")
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(address, token, root / "ray", timeout_s=60)
        client_env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        yield Head(address, client_env, token)
    finally:
        if started.poll() is None:
            started.kill()
        _kill_cluster(started.pid)
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
