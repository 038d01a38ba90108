"""One writer per output: a lease object ``<output>/_lease.json`` that a run holds while it writes there.

``OutputLease(output_url).acquire()`` creates the lease with a conditional create (S3: ``PutObject`` with
``If-None-Match: *``; a local directory: ``O_CREAT | O_EXCL``), so of two runs started on the same output
exactly one gets it; the other gets :class:`LeaseHeld`, which names the holder (run id, host, pid, start time),
or waits for it with ``acquire(wait=True)``. The lease file (JSON)::

    {"run_id": ..., "host": ..., "pid": ..., "started": ISO time, "renewed": ISO time, "expires": ISO time,
     "token": a random id of this holder}

A heartbeat thread renews ``expires`` every ``heartbeat_s`` with a conditional replace (S3: ``If-Match`` the
ETag of our last write; locally: compare-and-replace under an ``flock`` on ``<output>/_lease.lock``), so a
renewal never overwrites another run's lease. A holder that dies without releasing (kill -9, a lost node)
stops renewing; once ``expires`` is past the lease is stale and the next run takes it over with the same
conditional replace, so of two runs taking over, one wins. ``release()`` deletes the lease if it is still
ours. If someone else replaced it meanwhile (we were paused beyond ``ttl_s``) the lease is *lost*:
:meth:`OutputLease.ensure_held` raises :class:`LeaseLost`; check it before writing results that must not
be mixed with another run's.

Every write is confirmed by reading the lease back (the token must be ours), which also covers stores whose
conditional writes are not atomic (moto checks the condition and then writes, without a lock in between).
Stale means ``expires`` is before the reader's clock: the hosts' clocks must agree to well within ``ttl_s``.
Store operations are retried on transient errors (:func:`fnn_ray.storage.retry`). Only local paths and
``s3://`` URLs are supported. No credentials are written to the lease or put into messages.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping

import fsspec.asyn

from . import storage

__all__ = ["LEASE_NAME", "LeaseHeld", "LeaseLost", "OutputLease"]

log = logging.getLogger(__name__)

#: Name of the lease object inside the output directory ('_' keeps it out of pyarrow.dataset).
LEASE_NAME = "_lease.json"
_GUARD_NAME = "_lease.lock"
#: S3 error codes of a failed condition (409: a concurrent conditional write won; NoSuchKey: If-Match on a
#: lease that is gone).
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"})


class LeaseHeld(RuntimeError):
    """The output is leased by another live run; ``.holder`` is its lease (run_id, host, pid, started, ...)."""

    def __init__(self, message: str, holder: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.holder = dict(holder)


class LeaseLost(RuntimeError):
    """Our lease was taken over by another run (we did not renew it in time)."""


class _Conflict(Exception):
    """The lease object is not what a conditional write expected (exists / changed / gone)."""


@dataclass(frozen=True)
class _Version:
    """The lease object's bytes and its tag (S3 ETag; locally the MD5 of the bytes)."""

    data: bytes
    tag: str


def _client_error_code(exc: BaseException) -> str:
    """The S3 error code (or HTTP status) of the first botocore ClientError in ``exc``'s causes, else ''."""
    seen: set[int] = set()
    todo: BaseException | None = exc
    while todo is not None and id(todo) not in seen:
        response = getattr(todo, "response", None)
        if isinstance(response, Mapping):
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return str(error.get("Code") or status or "")
        seen.add(id(todo))
        todo = todo.__cause__ or todo.__context__
    return ""


class _S3Store:
    """The lease object on S3: conditional PutObject / DeleteObject (If-None-Match, If-Match on the ETag)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> _Version | None:
        try:
            return fsspec.asyn.sync(self.fs.loop, self._get)
        except FileNotFoundError:
            return None

    async def _get(self) -> _Version:
        resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        try:
            data = await resp["Body"].read()
        finally:
            resp["Body"].close()
        return _Version(data, resp["ETag"])

    def create(self, data: bytes) -> str:
        return self._call("put_object", Body=data, IfNoneMatch="*")["ETag"]

    def replace(self, data: bytes, tag: str) -> str:
        return self._call("put_object", Body=data, IfMatch=tag)["ETag"]

    def delete(self, tag: str) -> None:
        self._call("delete_object", IfMatch=tag)

    def _call(self, method: str, **kwargs: Any) -> dict:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except FileExistsError as e:
            raise _Conflict(str(e)) from None
        except Exception as e:
            if _client_error_code(e) in _CONFLICT_CODES:
                raise _Conflict(str(e)) from None
            if isinstance(e, FileNotFoundError):  # NoSuchBucket
                raise FileNotFoundError(f"s3://{self.bucket}/{self.key}: {e}") from e
            raise


class _LocalStore:
    """The lease file on a local disk: O_CREAT|O_EXCL create; compare-and-replace under an flock guard."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.guard_path = os.path.join(os.path.dirname(path), _GUARD_NAME)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.guard_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _current(self) -> _Version | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return _Version(data, hashlib.md5(data).hexdigest())

    def _check(self, tag: str) -> None:
        current = self._current()
        if current is None or current.tag != tag:
            raise _Conflict(f"{self.path}: {'gone' if current is None else 'changed'}")

    def read(self) -> _Version | None:
        with self._guard():
            return self._current()

    def create(self, data: bytes) -> str:
        with self._guard():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError as e:
                raise _Conflict(str(e)) from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return hashlib.md5(data).hexdigest()

    def replace(self, data: bytes, tag: str) -> str:
        with self._guard():
            self._check(tag)
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return hashlib.md5(data).hexdigest()

    def delete(self, tag: str) -> None:
        with self._guard():
            self._check(tag)
            os.remove(self.path)


def _dead_here(holder: Mapping[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (killed with -9): its lease is stale at once."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


class OutputLease:
    """A lease on ``output_url`` (see the module docstring): ``with OutputLease(url).acquire(wait=True): ...``.

    ``ttl_s``: how long a lease lives without renewal; ``heartbeat_s`` (< ``ttl_s``): renewal period;
    ``run_id``: written into the lease for other runs' messages (default: a random id); ``poll_s``: how
    often a waiting ``acquire`` looks again; ``retry_budget_s``: how long one store operation is retried on
    transient errors before :class:`fnn_ray.storage.StoreUnavailable`.
    """

    def __init__(
        self,
        output_url: str | os.PathLike,
        storage_options: Mapping[str, Any] | None = None,
        ttl_s: float = 60.0,
        heartbeat_s: float = 15.0,
        *,
        run_id: str | None = None,
        poll_s: float = 1.0,
        retry_budget_s: float = 60.0,
    ) -> None:
        if not 0 < heartbeat_s < ttl_s:
            raise ValueError(f"lease heartbeat_s={heartbeat_s} must be > 0 and < ttl_s={ttl_s}")
        self.url = storage.join(output_url, LEASE_NAME)
        self._output = storage.redact_url(storage.join(output_url))
        fs, path = storage.filesystem(self.url, storage_options)
        if storage.is_local(fs):
            self._store: _S3Store | _LocalStore = _LocalStore(path)
        elif "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
            self._store = _S3Store(fs, path)
        else:
            raise ValueError(f"{storage.redact_url(self.url)}: output leases need a local path or an s3:// URL")
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.poll_s = poll_s
        self.retry_budget_s = retry_budget_s
        self._token = uuid.uuid4().hex
        self._started = 0.0
        self._tag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- public
    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`, unless the lease was lost."""
        return self._tag is not None

    def acquire(self, wait: bool = False, timeout_s: float | None = None) -> OutputLease:
        """Take the lease (or take over a stale one) and start the heartbeat; returns ``self``.

        Held by another live run: raises :class:`LeaseHeld` at once, or with ``wait=True`` polls every
        ``poll_s`` until it is released or goes stale (raising :class:`LeaseHeld` after ``timeout_s``, if
        given). Raises ``ValueError`` when the existing lease file is not a lease.
        """
        if self._tag is not None:
            return self
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._started = time.time()
        self._lost = None
        waiting_for = None
        while True:
            current = self._try_take()
            if current is None and self._confirm():
                break
            if current is None:
                continue
            holder = self._parse(current)
            timed_out = deadline is not None and time.monotonic() >= deadline
            if not wait or timed_out:
                raise LeaseHeld(self._held_message(holder, timeout_s if timed_out else None), holder)
            if waiting_for != holder.get("token"):
                waiting_for = holder.get("token")
                log.info("output %s in use by run %s (host %s, pid %s); waiting for it", self._output,
                         holder.get("run_id"), holder.get("host"), holder.get("pid"))
            time.sleep(self.poll_s if deadline is None else max(0.0, min(self.poll_s, deadline - time.monotonic())))
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease-heartbeat-{self.run_id}", daemon=True)
        self._heartbeat.start()
        return self

    def ensure_held(self) -> None:
        """Raise :class:`LeaseLost` when another run took the lease over (call before a final write)."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        if self._tag is None:
            raise LeaseLost(f"lease {storage.redact_url(self.url)} is not held by this run (acquire it first)")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours; never raises for an unreachable store
        (the lease then stays until it expires, and is logged)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        tag, self._tag = self._tag, None
        if tag is None:
            return
        try:
            self._retry(self._delete, tag, what="release the lease")
        except storage.StoreUnavailable as e:
            log.warning("%s; the lease stays until it expires (%s s after its last renewal)", e, self.ttl_s)

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---------------------------------------------------------------------------------------- internals
    def _retry(self, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        return storage.retry(fn, *args, budget_s=self.retry_budget_s, what=f"{what} {storage.redact_url(self.url)}")

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps({
            "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started": _iso(self._started), "renewed": _iso(now), "expires": _iso(now + self.ttl_s),
            "token": self._token,
        }, indent=1).encode()

    def _parse(self, version: _Version) -> dict[str, Any]:
        try:
            holder = json.loads(version.data)
            holder["expires_at"] = datetime.fromisoformat(holder["expires"]).timestamp()
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{storage.redact_url(self.url)}: not a valid lease ({e}); expected JSON with run_id, host, pid, "
                "started, expires. Delete it if no run is writing to this output"
            ) from None
        return holder

    def _ours(self, version: _Version | None) -> bool:
        return version is not None and self._parse(version).get("token") == self._token

    def _try_take(self) -> _Version | None:
        """Create the lease or take over a stale one: ``None`` once we wrote it, else the live lease held."""
        while True:
            try:
                self._tag = self._retry(self._store.create, self._payload(), what="create the lease")
                return None
            except _Conflict:
                pass
            current = self._retry(self._store.read, what="read the lease")
            if current is None:  # released in between: create again
                continue
            if self._ours(current):  # our create went through but its reply was lost
                self._tag = current.tag
                return None
            holder = self._parse(current)
            if holder["expires_at"] > time.time() and not _dead_here(holder):
                return current
            try:
                self._tag = self._retry(self._store.replace, self._payload(), current.tag, what="take over the lease")
            except _Conflict:  # another run took it over (or its holder renewed it) first: look again
                continue
            log.warning("took over the stale lease of run %s (host %s, pid %s, expired %s) on %s",
                        holder.get("run_id"), holder.get("host"), holder.get("pid"), holder.get("expires"),
                        self._output)
            return None

    def _confirm(self) -> bool:
        """Read the lease back: True if it is ours (and adopt its tag), False if a racing write replaced it."""
        current = self._retry(self._store.read, what="read the lease")
        if self._ours(current):
            self._tag = current.tag
            return True
        self._tag = None
        return False

    def _renew(self) -> None:
        data = self._payload()
        try:
            self._tag = self._store.replace(data, self._tag)
        except _Conflict:
            current = self._store.read()
            if not self._ours(current):
                holder = self._parse(current) if current is not None else {}
                raise LeaseLost(
                    f"lease {storage.redact_url(self.url)} of run {self.run_id} was "
                    + (f"taken over by run {holder.get('run_id')} on host {holder.get('host')} (pid "
                       f"{holder.get('pid')})" if holder else "deleted by someone else")
                    + "; this run's results there may be mixed with another's"
                ) from None
            self._tag = self._store.replace(data, current.tag)  # an earlier renewal landed, its reply was lost

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._renew()
            except Exception as e:
                if storage.is_transient(e):  # store unreachable: try again at the next beat (that is safe)
                    log.warning("could not renew lease %s: %s", storage.redact_url(self.url),
                                storage.redact_url(str(e)))
                    continue
                self._lost = str(e) if isinstance(e, LeaseLost) else (
                    f"lease {storage.redact_url(self.url)} of run {self.run_id}: renewal failed ({e})")
                self._tag = None
                log.error("%s", self._lost)
                return

    def _delete(self, tag: str) -> None:
        try:
            self._store.delete(tag)
        except _Conflict:
            current = self._store.read()
            if self._ours(current):  # an earlier delete/renewal reply was lost
                self._store.delete(current.tag)

    def _held_message(self, holder: Mapping[str, Any], waited_s: float | None) -> str:
        waited = "" if waited_s is None else f" (still held after waiting {waited_s:g} s)"
        return (
            f"output {self._output} in use by run {holder.get('run_id')} "
            f"since {holder.get('started')}, started on host {holder.get('host')} (pid {holder.get('pid')}), "
            f"lease expires {holder.get('expires')} unless renewed{waited}; wait for it or pass --wait-for-lock"
        )
