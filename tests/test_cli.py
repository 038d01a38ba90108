"""The sweep's command line as a user runs it: ``python -m jobs.sweep ...`` in a real subprocess.

* Bad setup -> exit status 2 (its wall time printed), one ``error:`` line naming the problem as the last line of
  stderr, no traceback, nothing created at ``--output`` (each case runs in an empty working directory that must
  stay empty).
* Credentials given in ``--storage-options`` appear in no output and no file written.

SIGINT and SIGTERM (exit 130/143, the rerun equal to an uninterrupted run): test_signals.py.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fnn_model.config import NetworkConfig
from fnn_ray.responses import read_responses
from jobs.make_synthetic import make_synthetic

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Scans (session, scan_idx, units) of the synthetic release; frame size of its clips.
SCANS = [(8, 5, 20), (9, 6, 15)]
HEIGHT, WIDTH = 36, 64
#: The environment variable that tags every process of one run (scanned for in /proc).
TAG = "FNN_TEST_CLI_RUN"
LEAK_KEY, LEAK_SECRET = "AKIA-LEAK-TEST", "LEAK-SECRET-TEST"


def _cli(args: list[str], cwd: Path, tag: str, timeout: float = 240.0) -> tuple[int, str, str, float]:
    """Run ``python -m jobs.sweep *args`` in ``cwd``; return (exit status, stdout, stderr, wall seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               **{TAG: tag})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.sweep", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - start


def _tagged_pids(tag: str) -> list[int]:
    """Pids of live processes whose environment holds ``TAG=tag`` (zombies excluded)."""
    needle = f"{TAG}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        pids.append(int(entry))
    return pids


def _kill_tagged(tag: str) -> None:
    for pid in _tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A tiny synthetic release (2 scans) and 8 clips of <= 8 frames."""
    root = tmp_path_factory.mktemp("cli-data")
    make_synthetic(str(root / "release"), str(root / "stimuli"), SCANS, 8, 8, NetworkConfig.tiny(), HEIGHT, WIDTH,
                   clips_per_file=8, seed=0)
    return {"root": root, "release": root / "release", "stimuli": root / "stimuli"}


def _broken_release(data: dict[str, Path], tmp_path: Path, change) -> Path:
    release = tmp_path / "inputs" / "release"
    shutil.copytree(data["release"], release)
    change(release)
    return release


def _no_core(release: Path) -> None:
    (release / "params_core.pt").unlink()


def _pickled_head(release: Path) -> None:
    (release / "params_8_5.pt").write_bytes(pickle.dumps({"a": 1}))


# (case id, extra args or a release changer, words the error line must contain)
BAD_SETUPS = [
    ("missing-release", {"release": "no-such-release"}, ["no-such-release"]),
    ("no-core", {"change": _no_core}, ["params_core.pt"]),
    ("pickled-head", {"change": _pickled_head}, ["params_8_5.pt", "pickle"]),
    ("unknown-scan", {"args": ["--scans", "1-1"]}, ["1-1"]),
    ("missing-stimuli", {"stimuli": "no-such-stimuli"}, ["no-such-stimuli"]),
    # root ignores directory permissions, so the unwritable output is a path under a regular file
    ("output-under-file", {"output": "afile/out"}, ["afile"]),
    ("storage-options-list", {"args": ["--storage-options", "[1]"]}, ["--storage-options"]),
    ("zero-actors", {"args": ["--actors", "0"]}, ["--actors"]),
]


def _bad_setup_paths(data, tmp_path, spec) -> tuple[Path, Path, Path, Path]:
    """(inputs dir, release, stimuli, output) of one bad-setup case; ``inputs`` holds a regular file ``afile``."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "afile").write_text("a regular file\n")
    release = _broken_release(data, tmp_path, spec["change"]) if "change" in spec else data["release"]
    release = inputs / spec["release"] if "release" in spec else release
    stimuli = inputs / spec["stimuli"] if "stimuli" in spec else data["stimuli"]
    return inputs, release, stimuli, inputs / spec.get("output", "out")


def _assert_refused(name: str, code: int, out: str, err: str, words: list[str]) -> None:
    assert code == 2, f"{name}: exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), err
    for word in words:
        assert word in lines[-1], f"{name}: {word!r} not in {lines[-1]!r}"
    assert "Traceback" not in out + err


@pytest.fixture
def keep_signal_handlers():
    """The CLI installs its SIGINT / SIGTERM handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("case", BAD_SETUPS, ids=[c[0] for c in BAD_SETUPS])
def test_bad_setup_exits_2_with_one_error_line(data, tmp_path, case, capsys, monkeypatch, keep_signal_handlers):
    """In process (``main([...])``): exit 2, one error line, nothing written, and Ray never started."""
    from jobs import sweep as sweep_job

    name, spec, words = case
    inputs, release, stimuli, output = _bad_setup_paths(data, tmp_path, spec)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad setup")

    monkeypatch.setattr("fnn_ray.pool.init_ray", no_ray)
    before = sorted(p.name for p in inputs.iterdir())
    try:
        code = sweep_job.main(["--release", str(release), "--stimuli", str(stimuli), "--output", str(output),
                               "--no-progress", *spec.get("args", [])])
    except SystemExit as e:  # the argument parser's refusal (a count < 1): one line, exit status 2
        code = e.code
    out, err = capsys.readouterr()
    _assert_refused(name, code, out, err, words)
    assert not os.path.lexists(output), f"{name}: {output} was created"
    assert sorted(p.name for p in inputs.iterdir()) == before
    assert (inputs / "afile").is_file()
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_bad_setup_in_a_real_process(data, tmp_path):
    """The same through ``python -m jobs.sweep``: the error is the last line of stderr, no process left behind."""
    inputs, release, stimuli, output = _bad_setup_paths(data, tmp_path, {"release": "no-such-release"})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    tag = uuid.uuid4().hex
    try:
        code, out, err, _ = _cli(["--release", str(release), "--stimuli", str(stimuli), "--output", str(output),
                                  "--no-progress"], cwd, tag, timeout=300)
    finally:
        _kill_tagged(tag)
    _assert_refused("missing-release", code, out, err, ["no-such-release"])
    assert not os.path.lexists(output) and list(cwd.iterdir()) == []


@pytest.mark.slow
def test_credentials_never_echoed_or_written(data, tmp_path):
    output = tmp_path / "out"
    tag = uuid.uuid4().hex
    options = f'{{"key": "{LEAK_KEY}", "secret": "{LEAK_SECRET}"}}'
    try:
        code, out, err, wall = _cli(["--release", str(data["release"]), "--stimuli", str(data["stimuli"]),
                                     "--output", str(output), "--storage-options", options, "--actors", "1",
                                     "--cpus-per-actor", "1", "--no-progress"], tmp_path, tag)
    finally:
        _kill_tagged(tag)
    print(f"\ncredentials run: exit {code} in {wall:.1f} s")
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert read_responses(str(output)).num_rows == 8 * sum(u for _, _, u in SCANS)
    for secret in (LEAK_KEY, LEAK_SECRET):
        assert secret not in out + err
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"{secret} written to {path}"
