"""fnn_ray.storage.is_transient / retry against a real moto S3 server behind a fault-injecting proxy."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import aiohttp
import botocore.exceptions
import pytest
from botocore.exceptions import ClientError
from faultproxy import CHUNK, FaultProxy
from faults import wait_for
from s3fs.errors import translate_boto_error

from fnn_ray import storage

pytest_plugins = ["faultproxy"]  # the store_proxy fixture

#: botocore's own retries would ride out short outages by themselves; with one attempt per call, the
#: retries seen here are fnn_ray's.
ONE_ATTEMPT = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} happened"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _raised(exc: BaseException, cause: BaseException) -> BaseException:
    """``exc`` as raised ``from cause`` (what s3fs does when it translates a ClientError)."""
    try:
        raise exc from cause
    except BaseException as e:
        return e


# ------------------------------------------------------------------------------------------ is_transient
@pytest.mark.parametrize("code,status,transient", [
    ("SlowDown", 503, True),
    ("InternalError", 500, True),
    ("ServiceUnavailable", 503, True),
    ("Throttling", 400, True),
    ("RequestTimeout", 400, True),
    ("TooManyRequests", 429, True),
    ("SomethingNew", 502, True),
    ("NoSuchKey", 404, False),
    ("AccessDenied", 403, False),
    ("PreconditionFailed", 412, False),
])
def test_is_transient_s3_error_codes(code, status, transient):
    error = _client_error(code, status)
    assert storage.is_transient(error) is transient
    # as s3fs raises it: translated into an OSError subclass with the ClientError as cause
    translated = _raised(translate_boto_error(error), error)
    if not isinstance(translated, (FileNotFoundError, PermissionError)):
        assert storage.is_transient(translated) is transient


@pytest.mark.parametrize("exc,transient", [
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (OSError(errno.ETIMEDOUT, "timed out"), True),
    (OSError(errno.ECONNRESET, "reset"), True),
    (TimeoutError("slow"), True),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/x"), True),
    (botocore.exceptions.ConnectionClosedError(endpoint_url="http://127.0.0.1:1/x"), True),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1/x"), True),
    (aiohttp.ServerDisconnectedError(), True),
    (aiohttp.ClientPayloadError("not enough data"), True),
    (FileNotFoundError("bucket/missing"), False),
    (PermissionError("denied"), False),
    (ValueError("not a valid parquet file"), False),
    (OSError(errno.EIO, "disk error"), False),
    (KeyError("unit_id"), False),
])
def test_is_transient_exception_types(exc, transient):
    assert storage.is_transient(exc) is transient


def test_is_transient_follows_causes_but_not_past_data_errors():
    reset = ConnectionResetError(errno.ECONNRESET, "reset")
    assert storage.is_transient(_raised(OSError(errno.EIO, "wrapped"), reset))
    assert storage.is_transient(_raised(RuntimeError("wrapped"), reset))
    assert not storage.is_transient(_raised(ValueError("bad row 3"), reset))
    assert not storage.is_transient(_raised(FileNotFoundError("gone"), reset))


# -------------------------------------------------------------------------------------- retry (no store)
def test_retry_backoff_is_bounded_and_gives_up_with_the_last_error(caplog):
    calls = []

    def flaky():
        calls.append(time.monotonic())
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('10.0.0.1', 9000)")

    caplog.set_level(logging.WARNING, logger="fnn_ray.storage")
    t0 = time.monotonic()
    with pytest.raises(storage.StoreUnavailable) as info:
        storage.Retry(budget_s=1.0, base_s=0.05, cap_s=0.2).call(flaky, what="read s3://b/x.parquet")
    assert time.monotonic() - t0 >= 1.0  # the whole budget was used
    waits = [float(r.getMessage().split("retrying in ")[1].split(" s")[0]) for r in caplog.records
             if "retrying in" in r.getMessage()]
    assert len(calls) == len(waits) + 1 >= 2 and max(waits) <= 0.2  # every wait within the cap
    e = info.value
    assert isinstance(e, RuntimeError) and e.what == "read s3://b/x.parquet"
    assert str(e).startswith("store unreachable for 1 s: read s3://b/x.parquet: ConnectionRefusedError:")
    assert str(e).endswith("; rerun when it is back")
    assert isinstance(e.__cause__, ConnectionRefusedError)


def test_retry_returns_value_after_transient_errors_and_passes_arguments():
    failures = [ConnectionResetError(errno.ECONNRESET, "reset"), _client_error("SlowDown", 503)]

    def op(a, b=0):
        if failures:
            raise failures.pop(0)
        return a + b

    assert storage.retry(op, 2, b=3, budget_s=10, what="op") == 5 and not failures


def test_retry_redacts_credentials_in_the_message():
    def op():
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://AKIAX:s3cr3t@10.0.0.1:9000/b")

    with pytest.raises(storage.StoreUnavailable) as info:
        storage.retry(op, budget_s=0, what="list")
    assert "s3cr3t" not in str(info.value) and "http://***@10.0.0.1:9000/b" in str(info.value)


# ------------------------------------------------------------------------------------- through the proxy
def test_retry_rides_out_an_outage_on_real_s3fs_calls(store_proxy, s3_url, caplog):
    fs, root = storage.filesystem(s3_url, ONE_ATTEMPT)
    fs.pipe_file(f"{root}/a.bin", b"alpha")
    results: dict[str, object] = {}

    def run(name, fn, *args):
        results[name] = storage.retry(fn, *args, budget_s=30, what=name)

    calls = [("pipe", fs.pipe_file, f"{root}/b.bin", b"beta"), ("cat", fs.cat_file, f"{root}/a.bin"),
             ("ls", fs.ls, root, False)]
    caplog.set_level(logging.WARNING, logger="fnn_ray.storage")
    t0 = time.monotonic()
    store_proxy.outage(3.0)
    threads = [threading.Thread(target=run, args=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40)
    elapsed = time.monotonic() - t0
    assert set(results) == {"pipe", "cat", "ls"}, results
    assert results["cat"] == b"alpha"
    assert f"{root}/a.bin" in results["ls"]  # b.bin may be written after the listing
    assert fs.cat_file(f"{root}/b.bin") == b"beta"
    assert elapsed >= 3.0  # they waited the outage out
    retried = {r.getMessage().split(":")[0] for r in caplog.records if "retrying in" in r.getMessage()}
    assert retried == {"pipe", "cat", "ls"}


@pytest.mark.parametrize("mode", ["refuse", "reset"])
def test_retry_gives_up_after_the_budget_and_the_cached_instance_recovers(store_proxy, s3_url, mode):
    fs, root = storage.filesystem(s3_url, ONE_ATTEMPT)
    fs.pipe_file(f"{root}/a.bin", b"alpha")
    store_proxy.down(mode)
    t0 = time.monotonic()
    with pytest.raises(storage.StoreUnavailable) as info:
        storage.retry(fs.cat_file, f"{root}/a.bin", budget_s=2, what=f"read {s3_url}/a.bin")
    elapsed = time.monotonic() - t0
    assert elapsed >= 2  # the whole budget was used
    message = str(info.value)
    assert message.startswith(f"store unreachable for 2 s: read {s3_url}/a.bin: EndpointConnectionError")
    assert message.endswith("rerun when it is back") and info.value.what == f"read {s3_url}/a.bin"
    # what s3fs raises for a cut store: botocore's EndpointConnectionError caused by aiohttp's connector
    # error, caused by the socket error
    cause = info.value.__cause__
    assert isinstance(cause, botocore.exceptions.EndpointConnectionError)
    root_cause = cause
    while root_cause.__cause__ is not None or root_cause.__context__ is not None:
        root_cause = root_cause.__cause__ or root_cause.__context__
    expected = ConnectionRefusedError if mode == "refuse" else ConnectionResetError
    assert isinstance(root_cause, expected), repr(root_cause)
    store_proxy.up()
    again, _ = storage.filesystem(s3_url, ONE_ATTEMPT)
    assert again is fs  # s3fs's cached instance ...
    assert again.cat_file(f"{root}/a.bin") == b"alpha"  # ... is not poisoned by the cut connections


def test_data_errors_are_not_retried(store_proxy, s3_url, caplog):
    fs, root = storage.filesystem(s3_url)
    caplog.set_level(logging.WARNING, logger="fnn_ray.storage")
    with pytest.raises(FileNotFoundError):
        storage.retry(fs.cat_file, f"{root}/missing.bin", budget_s=30, what="read")
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_slow_mode_slows_reads_and_bytes_are_counted(store_proxy, s3_url):
    fs, root = storage.filesystem(s3_url)
    payload = os.urandom(16 * CHUNK)
    store_proxy.reset_counts()
    fs.pipe_file(f"{root}/big.bin", payload)
    assert store_proxy.bytes_to_server >= len(payload)
    assert store_proxy.bytes_to_client < CHUNK

    store_proxy.reset_counts()
    t0 = time.monotonic()
    assert fs.cat_file(f"{root}/big.bin") == payload
    fast = time.monotonic() - t0
    assert len(payload) <= store_proxy.bytes_to_client < len(payload) + CHUNK
    assert store_proxy.bytes_to_server < CHUNK

    store_proxy.delay_per_chunk_s = 0.05
    t0 = time.monotonic()
    assert fs.cat_file(f"{root}/big.bin") == payload
    slow = time.monotonic() - t0
    assert slow >= 16 * 0.05 and slow > fast + 0.5


def test_a_cut_in_the_middle_of_a_read_is_ridden_out(store_proxy, s3_url):
    fs, root = storage.filesystem(s3_url, ONE_ATTEMPT)
    payload = os.urandom(16 * CHUNK)
    fs.pipe_file(f"{root}/big.bin", payload)
    store_proxy.delay_per_chunk_s = 0.05  # the read takes about a second ...
    store_proxy.reset_counts()

    def cut() -> None:  # ... and is cut once a quarter of it has come (however slow this machine is)
        wait_for(lambda: store_proxy.bytes_to_client >= 4 * CHUNK, "a quarter of the read", poll_s=0.01)
        store_proxy.outage(1.0, "reset")

    cutter = threading.Thread(target=cut, daemon=True)
    cutter.start()
    t0 = time.monotonic()
    assert storage.retry(fs.cat_file, f"{root}/big.bin", budget_s=20, what="read") == payload
    cutter.join()
    assert time.monotonic() - t0 > 1.0  # the outage was ridden out, not missed
    assert store_proxy.bytes_to_client > len(payload)  # part of it came twice


def test_a_separate_process_reaches_the_store_through_the_proxy(store_proxy, s3_url):
    fs, root = storage.filesystem(s3_url)
    fs.pipe_file(f"{root}/c.bin", b"x" * 100_000)
    store_proxy.reset_counts()
    script = textwrap.dedent(f"""
        from fnn_ray import storage
        fs, root = storage.filesystem({s3_url!r})
        print(len(fs.cat_file(root + "/c.bin")))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=os.environ.copy(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "100000"
    assert store_proxy.bytes_to_client >= 100_000


def test_proxy_refuses_while_down_and_stops_by_itself(s3):
    with FaultProxy(s3.endpoint_url, lifetime_s=1.0) as proxy:
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
        proxy.down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        proxy.up()
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
        wait_for(lambda: refused(proxy.port), "the proxy to stop at the end of its lifetime")


def refused(port: int) -> bool:
    """True when nothing accepts connections on ``port`` of 127.0.0.1."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False
