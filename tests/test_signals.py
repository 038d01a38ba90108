"""SIGTERM (what ``ray job stop``, ``timeout``, Slurm and Kubernetes send) at each phase of a job, and SIGINT (Ctrl-C)
while computing, in a real process.

* planning: the job waits for another run's lease on its output (``--wait-for-lock``; the wait is logged);
* computing: at least two items are committed, the driver waits on its workers (inside ``ray.wait``, where Ray
  turns the handler's exception into a plain KeyboardInterrupt);
* merging: every item is committed and the lease released; the experiment job reads its partial results back
  through a slowed store (a fault proxy in front of moto) when the signal comes.

Each time: exit status 143 (SIGINT: 130), the summary line names the signal, no traceback, no process of the run
left. After the computing case the rerun's responses equal those of an uninterrupted run; after the others the
rerun completes. The uninterrupted run and the reruns run in this process, on the session's Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from fnn_model.config import NetworkConfig
from fnn_model.synthetic import make_release
from fnn_ray.lease import LEASE_NAME, OutputLease
from fnn_ray.ledger import Ledger
from fnn_ray.manifest import Manifest
from fnn_ray.responses import read_responses
from fnn_ray.stimuli import write_clips
from jobs import sweep as sweep_job
from jobs import tuning as tuning_job
from jobs.make_synthetic import synthetic_clips
from test_cli import REPO_ROOT, TAG, _kill_tagged, _tagged_pids

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the run's processes in /proc")]

SCANS = [(8, 5, 20), (9, 6, 15)]
HEIGHT, WIDTH = 36, 64
#: Clips and frames of the sweep: items (one clip each) long enough that the driver mostly waits on its workers.
CLIPS, FRAMES = 6, 40
SORT_KEYS = [("session", "ascending"), ("scan_idx", "ascending"), ("clip_id", "ascending"),
             ("readout_id", "ascending")]


def _env(tag: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                **{TAG: tag})


def _wait_for(condition: Callable[[], bool], child: subprocess.Popen, log: Path, what: str,
              timeout_s: float = 240.0) -> None:
    """Poll ``condition`` until it holds; fail if ``child`` ends first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert child.poll() is None, f"the run ended (exit {child.returncode}) before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"not {what} within {timeout_s:.0f} s:\n{log.read_text()}"
        time.sleep(0.1)


def _interrupt(module: str, args: list[str], cwd: Path, when: Callable[[subprocess.Popen, Path], None],
               sig: signal.Signals = signal.SIGTERM) -> str:
    """Start ``python -m module *args``, call ``when(child, log)`` (returns once the phase is reached), send
    ``sig``; check exit 128 + sig, the summary naming it, no traceback and no process left; return the log."""
    log, tag = cwd / f"run-{uuid.uuid4().hex[:8]}.log", uuid.uuid4().hex
    try:
        with open(log, "w") as f:
            child = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=_env(tag), stdout=f,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            when(child, log)
            child.send_signal(sig)
            signalled = time.monotonic()
            code = child.wait(timeout=120)
            print(f"\n{module}: exit {code} {time.monotonic() - signalled:.1f} s after SIGTERM")
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        deadline = time.monotonic() + 30
        while _tagged_pids(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _tagged_pids(tag)
    finally:
        _kill_tagged(tag)
    text = log.read_text()
    other = "SIGINT" if sig == signal.SIGTERM else "SIGTERM"
    assert code == 128 + sig, f"exit {code}:\n{text}"
    assert f"stopped by {sig.name}" in text and other not in text, text
    assert "rerun the same command" in text
    assert "Traceback" not in text, text
    assert not left, f"processes of the run left: {left}"
    return text


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("signals")
    make_release(str(root / "release"), SCANS, NetworkConfig.tiny(), seed=0)
    write_clips(str(root / "stimuli"), synthetic_clips(CLIPS, FRAMES, HEIGHT, WIDTH, seed=1), clips_per_file=CLIPS)
    return {"release": root / "release", "stimuli": root / "stimuli"}


def _sweep_args(data: dict[str, Path], output: Path | str) -> list[str]:
    return ["--release", str(data["release"]), "--stimuli", str(data["stimuli"]), "--output", str(output),
            "--clips-per-shard", "1", "--clips-per-batch", "1", "--actors", "1", "--cpus-per-actor", "1",
            "--no-progress"]


def _rows(output: Path) -> list[dict]:
    return read_responses(str(output)).sort_by(SORT_KEYS).to_pylist()


@pytest.fixture(scope="module")
def clean(ray_cluster, data, tmp_path_factory) -> list[dict]:
    """The sweep's responses from one uninterrupted run, sorted."""
    output = tmp_path_factory.mktemp("clean") / "out"
    assert sweep_job.main(_sweep_args(data, output)) == 0
    return _rows(output)


def test_sigterm_while_planning(ray_cluster, data, tmp_path):
    output = tmp_path / "out"
    holder = OutputLease(str(output)).acquire()  # another run holds the output: the job waits while planning
    try:
        text = _interrupt("jobs.sweep", [*_sweep_args(data, output), "--wait-for-lock"], tmp_path,
                          lambda child, log: _wait_for(lambda: "waiting for it" in log.read_text(), child, log,
                                                       "waiting for the lease"))
    finally:
        holder.release()
    assert "worker(s) on" not in text
    assert not Ledger(str(output)).commits()
    assert sweep_job.main(_sweep_args(data, output)) == 0
    assert len(Ledger(str(output)).commits()) == CLIPS * len(SCANS)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_computing_then_rerun_equals_a_clean_run(data, clean, tmp_path, sig):
    output = tmp_path / "out"

    def computing(child: subprocess.Popen, log: Path) -> None:
        _wait_for(lambda: len(Ledger(str(output)).commits()) >= 2, child, log, "2 items were committed")

    text = _interrupt("jobs.sweep", _sweep_args(data, output), tmp_path, computing, sig)
    committed = len(Ledger(str(output)).commits())
    assert committed < CLIPS * len(SCANS), "the run finished before the signal"
    assert f"{committed} of {CLIPS * len(SCANS)} item(s) are committed" in text, text
    assert sweep_job.main(_sweep_args(data, output)) == 0
    assert _rows(output) == clean


def test_sigterm_while_merging(ray_cluster, data, store_proxy, s3, s3_url, tmp_path, capsys):
    direct = s3.storage_options  # the test's own view of the store, not through the (slowed) proxy
    args = ["--release", str(data["release"]), "--output", s3_url, "--stimulus", "gratings", "--directions", "8",
            "--trials", "1", "--block-frames", "12", "--size", f"{HEIGHT}x{WIDTH}", "--actors", "1",
            "--cpus-per-actor", "1", "--no-progress"]
    lease_fs, lease_path = Ledger(s3_url, direct).fs, f"{s3_url[len('s3://'):]}/{LEASE_NAME}"

    def merging(child: subprocess.Popen, log: Path) -> None:
        def all_committed() -> bool:
            manifest = Manifest.load(s3_url, direct)
            return manifest is not None and len(Ledger(s3_url, direct).commits()) == manifest.items_total

        _wait_for(all_committed, child, log, "every item was committed")
        store_proxy.delay_per_chunk_s = 0.3  # from now on every store call of the driver is slow
        _wait_for(lambda: lease_fs.invalidate_cache() or not lease_fs.exists(lease_path), child, log,
                  "the lease was released")
        before = store_proxy.bytes_to_server
        _wait_for(lambda: store_proxy.bytes_to_server > before, child, log, "the merge read the store")

    text = _interrupt("jobs.tuning", args, tmp_path, merging)
    assert "analysed" not in text
    assert not Ledger(s3_url, direct).fs.exists(f"{s3_url[len('s3://'):]}/ori_dir_tuning/units.csv")
    store_proxy.delay_per_chunk_s = 0.0
    capsys.readouterr()
    assert tuning_job.main(args) == 0
    assert "analysed" in capsys.readouterr().out
