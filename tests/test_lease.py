"""fnn_ray.lease.OutputLease: one writer per output, on a local directory and on a real moto S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime

import pytest
from conftest import S3_KEY, S3_SECRET
from faults import wait_for

from fnn_ray import storage
from fnn_ray.lease import LEASE_NAME, LeaseHeld, LeaseLost, OutputLease

pytest_plugins = ["faultproxy"]  # the store_proxy fixture

KINDS = ["local", "s3"]


def _lease_file(url: str) -> dict | None:
    fs, path = storage.filesystem(storage.join(url, LEASE_NAME))
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _python(script: str, stdin: int | None = None) -> subprocess.Popen:
    """Start ``script`` in a fresh interpreter (inherits the AWS_* variables that point at moto)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=os.environ.copy(), stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kind", KINDS)
def test_second_acquire_fails_with_the_holder_named_and_release_frees_it(kind, tmp_url):
    url = tmp_url(kind, "out")
    with OutputLease(url, run_id="run-a") as a:
        assert a.held
        content = _lease_file(url)
        assert content["run_id"] == "run-a" and content["pid"] == os.getpid()
        assert datetime.fromisoformat(content["expires"]).timestamp() > time.time() + 50  # ttl 60 s
        with pytest.raises(LeaseHeld) as info:
            OutputLease(url, run_id="run-b").acquire()
        message = str(info.value)
        assert message.startswith(f"output {url} in use by run run-a since {content['started']}, started on host "
                                  f"{content['host']} (pid {os.getpid()})")
        assert message.endswith("; wait for it or pass --wait-for-lock")
        assert isinstance(info.value, RuntimeError) and info.value.holder["run_id"] == "run-a"
    assert not a.held and _lease_file(url) is None
    with OutputLease(url, run_id="run-b"):
        assert _lease_file(url)["run_id"] == "run-b"


def test_s3_lease_holds_no_credentials(s3, s3_url):
    with OutputLease(s3_url, s3.storage_options):
        fs, path = storage.filesystem(storage.join(s3_url, LEASE_NAME))
        raw = fs.cat_file(path).decode()
    assert S3_KEY not in raw and S3_SECRET not in raw


@pytest.mark.parametrize("kind", KINDS)
def test_heartbeat_keeps_the_lease_past_its_ttl(kind, tmp_url):
    url = tmp_url(kind, "out")
    with OutputLease(url, ttl_s=1.0, heartbeat_s=0.2, run_id="run-a"):
        first = _lease_file(url)
        expiry = datetime.fromisoformat(first["expires"]).timestamp()
        wait_for(lambda: time.time() > expiry + 0.5, "the first expiry to pass")
        with pytest.raises(LeaseHeld):
            OutputLease(url, run_id="run-b").acquire()
        renewed = _lease_file(url)
    assert renewed["started"] == first["started"]
    assert datetime.fromisoformat(renewed["expires"]) > datetime.fromisoformat(first["expires"])


@pytest.mark.parametrize("kind", KINDS)
def test_wait_gets_the_lease_when_the_holder_releases(kind, tmp_url):
    url = tmp_url(kind, "out")
    holder = OutputLease(url, run_id="run-a").acquire()
    with pytest.raises(LeaseHeld, match=r"still held after waiting 0\.3 s"):
        OutputLease(url, run_id="run-b", poll_s=0.1).acquire(wait=True, timeout_s=0.3)
    threading.Timer(1.0, holder.release).start()
    t0 = time.monotonic()
    waiter = OutputLease(url, run_id="run-b", poll_s=0.1).acquire(wait=True, timeout_s=20)
    assert time.monotonic() - t0 >= 0.9
    assert _lease_file(url)["run_id"] == "run-b"
    waiter.release()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_stale_lease_of_a_killed_run_is_taken_over(kind, tmp_url):
    url = tmp_url(kind, "out")
    child = _python(f"""
        import threading
        from fnn_ray.lease import OutputLease
        OutputLease({url!r}, ttl_s=2.0, heartbeat_s=0.3, run_id="doomed").acquire()
        print("held", flush=True)
        threading.Event().wait()  # holds the lease until killed
    """)
    try:
        assert child.stdout.readline().strip() == "held", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        assert _lease_file(url)["run_id"] == "doomed"  # its ttl has not run out ...
        with OutputLease(url, run_id="next").acquire():  # ... but its process is gone on this host: stale at once
            assert _lease_file(url)["run_id"] == "next"
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow  # processes of their own
@pytest.mark.parametrize("kind", KINDS)
def test_racing_processes_exactly_one_wins(kind, tmp_url):
    url = tmp_url(kind, "out")
    script = """
        import sys
        from fnn_ray.lease import LeaseHeld, OutputLease
        lease = OutputLease({url!r}, run_id="racer-{i}")
        print("ready", flush=True)
        sys.stdin.readline()  # go
        try:
            lease.acquire()
        except LeaseHeld:
            print("lost", flush=True)
        else:
            print("won", flush=True)
            sys.stdin.readline()  # hold it until every racer has tried
            lease.release()
    """
    racers = [_python(script.format(url=url, i=i), stdin=subprocess.PIPE) for i in range(3)]
    try:
        for p in racers:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in racers:
            p.stdin.write("go\n")
            p.stdin.flush()
        outcomes = sorted(p.stdout.readline().strip() for p in racers)
        for p in racers:
            _, err = p.communicate("\n", timeout=60)
            assert p.returncode == 0, err[-2000:]
    finally:
        for p in racers:
            p.kill()
    assert outcomes == ["lost", "lost", "won"]
    assert _lease_file(url) is None  # the winner released it


@pytest.mark.parametrize("kind", KINDS)
def test_a_lease_of_another_host_is_stale_only_once_it_expires(kind, tmp_url):
    """A holder on another host cannot be checked for life: only its expiry makes its lease stale."""
    url = tmp_url(kind, "out")
    fs, path = storage.filesystem(storage.join(url, LEASE_NAME))
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    other = {"run_id": "remote", "host": "elsewhere", "pid": 1, "started": "2020-01-01T00:00:00+00:00",
             "expires": "2999-01-01T00:00:00+00:00", "token": "not-ours"}
    fs.pipe_file(path, json.dumps(other).encode())
    with pytest.raises(LeaseHeld, match="in use by run remote .*host elsewhere"):
        OutputLease(url, run_id="next").acquire()
    fs.pipe_file(path, json.dumps({**other, "expires": "2020-01-01T00:01:00+00:00"}).encode())
    with OutputLease(url, run_id="next").acquire():
        assert _lease_file(url)["run_id"] == "next"


@pytest.mark.parametrize("kind", KINDS)
def test_a_lease_replaced_behind_our_back_is_lost_and_not_deleted(kind, tmp_url):
    url = tmp_url(kind, "out")
    lease = OutputLease(url, ttl_s=1.0, heartbeat_s=0.1, run_id="run-a").acquire()
    lease.ensure_held()
    fs, path = storage.filesystem(storage.join(url, LEASE_NAME))
    intruder = {"run_id": "intruder", "host": "elsewhere", "pid": 1, "started": "2020-01-01T00:00:00+00:00",
                "expires": "2999-01-01T00:00:00+00:00", "token": "not-ours"}
    fs.pipe_file(path, json.dumps(intruder).encode())
    wait_for(lambda: not lease.held, "the heartbeat to notice the takeover")
    with pytest.raises(LeaseLost, match="taken over by run intruder on host elsewhere"):
        lease.ensure_held()
    lease.release()
    assert _lease_file(url)["run_id"] == "intruder"  # the other run's lease is left alone


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_not_a_lease_is_named(kind, tmp_url):
    url = tmp_url(kind, "out")
    fs, path = storage.filesystem(storage.join(url, LEASE_NAME))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, b"garbage")
    with pytest.raises(ValueError, match=rf"{LEASE_NAME}: not a valid lease"):
        OutputLease(url).acquire()


def test_s3_lease_rides_out_store_outages(store_proxy, s3_url, caplog):
    one_attempt = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}  # leave the retrying to fnn_ray
    store_proxy.outage(1.0)
    lease = OutputLease(s3_url, one_attempt, ttl_s=2.0, heartbeat_s=0.2, retry_budget_s=10).acquire()
    assert _lease_file(s3_url)["run_id"] == lease.run_id
    ends = time.time() + 1.0
    store_proxy.outage(1.0)  # shorter than the ttl: renewals fail, then succeed again
    wait_for(lambda: any("could not renew lease" in r.getMessage() for r in caplog.records), "a failed renewal")
    # the last renewal before the outage expires by ends + 1 s: a later expiry is a renewal after the outage
    wait_for(lambda: datetime.fromisoformat(_lease_file(s3_url)["expires"]).timestamp() > ends + 1.0,
             "a renewal after the outage")
    lease.ensure_held()
    assert datetime.fromisoformat(_lease_file(s3_url)["expires"]).timestamp() > time.time()
    assert any("could not renew lease" in r.getMessage() for r in caplog.records)
    # releasing while the store is down does not raise; the lease stays until it expires
    store_proxy.down()
    lease.retry_budget_s = 0.5
    lease.release()
    store_proxy.up()
    assert _lease_file(s3_url)["run_id"] == lease.run_id
    assert any("the lease stays until it expires" in r.getMessage() for r in caplog.records)


def test_bad_settings_and_unsupported_urls_are_rejected(tmp_url):
    with pytest.raises(ValueError, match="heartbeat_s"):
        OutputLease(tmp_url("local"), ttl_s=10, heartbeat_s=10)
    with pytest.raises(ValueError, match="local path or an s3:// URL"):
        OutputLease(tmp_url("memory"))
