"""Credentials off the command line, and the private local Ray's token readable by this user alone.

* ``--storage-options @FILE.json`` reads the options from a file; a missing file, a file that is not JSON or not a
  JSON object is one ``error:`` line naming the file (exit 2); an AWS profile given in the options is used.
* A sweep on the moto S3 server whose endpoint and keys come only from that file: while it runs, the secret is in
  no process's command line or environment (the job's, Ray's, its workers'), and the Ray token file named by
  ``RAY_AUTH_TOKEN_PATH`` is mode 0600 in a mode-0700 directory (``~/.ray/auth_token`` is never written);
  after the run the directory is gone.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fnn_model.config import NetworkConfig
from fnn_ray import storage
from fnn_ray.responses import read_responses
from jobs import sweep as sweep_cli
from jobs.cli import parse_storage_options
from jobs.make_synthetic import make_synthetic

REPO = Path(__file__).resolve().parent.parent
TAG = "FNN_TEST_CREDENTIALS_RUN"
SECRET = "file-only-secret-" + uuid.uuid4().hex
SCANS = [(8, 5, 11)]


def write_options(path: Path, options: dict, mode: int = 0o600) -> Path:
    path.write_text(json.dumps(options))
    path.chmod(mode)
    return path


def test_options_from_a_file(tmp_path, capsys):
    options = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": SECRET}
    path = write_options(tmp_path / "so.json", options)
    assert parse_storage_options(f"@{path}") == options
    assert parse_storage_options(json.dumps(options)) == options
    assert capsys.readouterr().err == ""
    write_options(path, options, 0o644)
    assert parse_storage_options(f"@{path}") == options
    err = capsys.readouterr().err
    assert str(path) in err and "chmod 600" in err and SECRET not in err


@pytest.mark.parametrize("content, words", [
    (None, ["cannot be read", "No such file"]),
    ("{'key': 'single quotes'}", ["is not valid JSON", "line 1"]),
    ('["a", "list"]', ["must hold a JSON object", "list"]),
], ids=["missing", "not-json", "not-an-object"])
def test_a_bad_options_file_exits_2_naming_it(tmp_path, capsys, content, words):
    path = tmp_path / "options.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    code = sweep_cli.main(["--release", str(tmp_path / "r"), "--stimuli", str(tmp_path / "s"), "--output", str(out),
                           "--storage-options", f"@{path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: --storage-options file ") and str(path) in err[-1]
    assert all(word in err[-1] for word in words), err[-1]
    assert "single quotes" not in err[-1]  # the contents are never echoed
    assert not out.exists()


def test_an_aws_profile_in_the_options_is_used(s3, tmp_path, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.write_text("[fnn-test]\naws_access_key_id = profile-key\naws_secret_access_key = profile-secret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    url = s3.url(f"profile-{uuid.uuid4().hex[:8]}", "x.bin")
    fs, path = storage.filesystem(url, {"profile": "fnn-test", "skip_instance_cache": True})
    fs.pipe_file(path, b"through the profile")
    assert fs.cat_file(path) == b"through the profile"
    fs, path = storage.filesystem(url, {"profile": "no-such-profile", "skip_instance_cache": True})
    with pytest.raises(Exception, match="no-such-profile"):
        fs.cat_file(path)


def _tagged(tag: str) -> dict[int, tuple[bytes, bytes]]:
    """Live processes whose environment holds ``TAG=tag``: pid -> (cmdline, environ)."""
    needle = f"{TAG}={tag}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found[int(entry)] = (cmdline, environ)
    return found


def _variable(environ: bytes, name: str) -> str | None:
    for item in environ.split(b"\0"):
        if item.startswith(name.encode() + b"="):
            return item.split(b"=", 1)[1].decode()
    return None


@pytest.mark.slow
def test_sweep_with_options_file_keeps_secret_and_token_private(s3, tmp_path):
    root = s3.url(f"credentials-{uuid.uuid4().hex[:8]}")
    make_synthetic(f"{root}/release", f"{root}/stimuli", SCANS, 4, 8, NetworkConfig.tiny(), 36, 64,
                   clips_per_file=4, seed=0)
    options = write_options(tmp_path / "s3.json", {"endpoint_url": s3.endpoint_url, "key": "file-only-key",
                                                   "secret": SECRET, "client_kwargs": {"region_name": "us-east-1"}})
    home = tmp_path / "home"
    home.mkdir()
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}  # only the file reaches S3
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               **{TAG: tag})
    command = [sys.executable, "-m", "jobs.sweep", "--release", f"{root}/release", "--stimuli", f"{root}/stimuli",
               "--output", f"{root}/out", "--storage-options", f"@{options}", "--actors", "1", "--cpus-per-actor",
               "1", "--clips-per-shard", "1", "--clips-per-batch", "1", "--no-progress"]
    log = tmp_path / "run.log"
    seen: dict[int, tuple[bytes, bytes]] = {}
    with open(log, "w") as f:
        child = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        token_path = None
        while token_path is None:  # until a worker actor runs: then every process of the run is up
            assert child.poll() is None, f"the run ended before a worker was seen:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no worker in 300 s:\n{log.read_text()}"
            now = _tagged(tag)
            seen.update(now)
            workers = [e for c, e in now.values() if c.startswith(b"ray::Worker")]
            if workers:
                token_path = _variable(workers[0], "RAY_AUTH_TOKEN_PATH")
                assert token_path, "the worker runs without RAY_AUTH_TOKEN_PATH (Ray's default token file)"
            time.sleep(0.1)
        info, folder = os.stat(token_path), os.stat(os.path.dirname(token_path))
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
        assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
        code = child.wait(timeout=300)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, 9)
            child.wait()
    text = log.read_text()
    assert code == 0, text
    assert len(seen) >= 3, seen.keys()  # the job, Ray's own processes, the worker
    for pid, (cmdline, environ) in seen.items():
        assert SECRET.encode() not in cmdline and SECRET.encode() not in environ, pid
    assert SECRET not in text
    assert not (home / ".ray" / "auth_token").exists()
    assert not os.path.exists(os.path.dirname(token_path))  # removed when the job ended
    so = json.loads(options.read_text())
    assert read_responses(f"{root}/out", storage_options=so).num_rows == 4 * sum(u for *_, u in SCANS)
