"""Filesystem access for fnn-ray: one place that turns a URL into an fsspec filesystem.

Supported URLs: plain local paths, ``file://``, ``memory://`` and ``s3://`` (via s3fs). Anything else that
fsspec knows also works, without the S3-specific defaults.

For ``s3://`` URLs, settings missing from ``storage_options`` are taken from the environment, so that Ray
actors in other processes reach the same store as the driver:

* endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (passed as s3fs ``endpoint_url``);
* region: ``AWS_REGION``, else ``AWS_DEFAULT_REGION`` (passed as ``client_kwargs["region_name"]``);
* keys: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` are read by botocore itself.

Directory listings are not cached for S3 (``use_listings_cache=False`` unless given), because other
processes write to the same prefixes and s3fs caches filesystem instances per process.

Credentials are never logged and never put into error messages: use :func:`redact_url` on any URL that is
shown to a user.

Transient store errors (the store unreachable, a connection cut, a timeout, throttling, a 5xx) are told apart
from data errors (a missing key, a bad file, a denied request) by :func:`is_transient`; :func:`retry` calls an
operation again with exponential backoff and full jitter until a time budget is spent, then raises
:class:`StoreUnavailable`. Through s3fs a store that refuses or resets connections surfaces (after botocore's
own retries, ``BOTOCORE_RETRIES``: under a second per call) as ``botocore.exceptions.EndpointConnectionError`` caused by an
``aiohttp.ClientConnectorError`` / ``ClientOSError`` and a ``ConnectionRefusedError`` /
``ConnectionResetError``; s3fs turns S3 error codes into ``OSError`` subclasses with the ``ClientError`` as
``__cause__``. A cut connection does not poison s3fs's cached filesystem instance: the next call after the
store is back succeeds on the same instance. :func:`commit_bytes` is safe to retry as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import posixpath
import random
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar

import aiohttp
import botocore.exceptions
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.parsers import ResponseParserError
from fsspec import AbstractFileSystem
from fsspec.exceptions import FSTimeoutError

__all__ = [
    "STAGING_DIR",
    "Retry",
    "StoreUnavailable",
    "commit_bytes",
    "filesystem",
    "is_local",
    "is_transient",
    "join",
    "open_parquet",
    "redact_url",
    "retry",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Name of the staging directory used by :func:`commit_bytes` (the leading '_' makes pyarrow.dataset skip it).
STAGING_DIR = "_staging"

#: botocore's own retries of one S3 call (unless ``storage_options["config_kwargs"]["retries"]`` says otherwise):
#: a few quick tries, so that a store that is gone fails a call in about a second and :class:`Retry` keeps the time
#: budget (``--store-timeout``); botocore's default (legacy mode, 5 attempts) spends ~12 s per call on a refused
#: connection before any budget is looked at.
BOTOCORE_RETRIES = {"mode": "standard", "max_attempts": 3}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]*@")


def _scheme(url: str) -> str:
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def redact_url(url: str) -> str:
    """Return ``url`` (or a message holding URLs) with any ``user:password@`` part replaced by ``***@``."""
    return _USERINFO.sub(r"\1***@", str(url))


def _s3_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = dict(storage_options or {})
    client_kwargs = dict(opts.get("client_kwargs") or {})
    if not opts.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
    if not client_kwargs.get("region_name"):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    config_kwargs = dict(opts.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", BOTOCORE_RETRIES)
    opts["config_kwargs"] = config_kwargs
    opts.setdefault("use_listings_cache", False)
    return opts


def filesystem(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """Resolve ``url`` to ``(fs, path)``: an fsspec filesystem and the path on it (no protocol).

    Plain paths are made absolute. ``storage_options`` are passed to the filesystem constructor (for s3,
    e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}``); see the module docstring for S3 defaults.
    """
    url = os.fspath(url)
    scheme = _scheme(url)
    if scheme in ("", "file", "local"):
        path = url[len(scheme) + 3 :] if scheme else url
        fs = fsspec.filesystem("file", **dict(storage_options or {}))
        return fs, os.path.abspath(os.path.expanduser(path))
    if scheme in ("s3", "s3a"):
        fs, path = fsspec.core.url_to_fs("s3://" + url[len(scheme) + 3 :], **_s3_options(storage_options))
        return fs, path.rstrip("/")
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


def join(url: str | os.PathLike, *parts: str) -> str:
    """Join path components onto a URL or local path with '/', e.g. ``join("s3://b/out", "x", "y.parquet")``."""
    url = os.fspath(url)
    m = _SCHEME.match(url)
    prefix, rest = (m.group(0), url[m.end() :]) if m else ("", url)
    root = rest.startswith("/")
    pieces = [p for p in rest.split("/") if p]
    for part in parts:
        pieces.extend(p for p in str(part).split("/") if p)
    return prefix + ("/" if root else "") + "/".join(pieces)


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local filesystem."""
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def commit_bytes(
    fs: AbstractFileSystem,
    path: str,
    data: bytes | bytearray | memoryview | pa.Buffer,
    staging_dir: str | None = None,
) -> None:
    """Write ``data`` to ``path`` so that a reader never sees a partial file at ``path``.

    The bytes are first written to a uniquely named object in ``staging_dir`` (default: ``_staging`` next to
    ``path``'s parent; it must sit on the same filesystem, and a '_'-prefixed name keeps it invisible to
    ``pyarrow.dataset``), then moved onto ``path`` (an atomic ``os.replace`` locally; a server-side copy on
    S3) and the staging object is removed. An existing file at ``path`` is replaced.
    """
    path = path.rstrip("/")
    parent, name = posixpath.split(path)
    if staging_dir is None:
        staging_dir = posixpath.join(parent, STAGING_DIR)
    staging_dir = staging_dir.rstrip("/")
    stage = posixpath.join(staging_dir, f"{uuid.uuid4().hex}.{name}")
    if isinstance(data, pa.Buffer):
        data = memoryview(data)
    if is_local(fs):
        os.makedirs(staging_dir, exist_ok=True)
        os.makedirs(parent, exist_ok=True)
        try:
            with open(stage, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(stage, path)
        finally:
            if os.path.exists(stage):
                os.remove(stage)
        return
    if not isinstance(data, bytes):
        data = bytes(data)
    fs.pipe_file(stage, data)
    try:
        fs.mv(stage, path)  # copy + delete of the staging object (server-side on S3)
    except BaseException:
        try:
            fs.rm_file(stage)
        except Exception:
            pass
        raise
    fs.invalidate_cache(parent)


@contextlib.contextmanager
def open_parquet(fs: AbstractFileSystem, path: str, url: str | None = None) -> Iterator[pq.ParquetFile]:
    """Open a Parquet file on ``fs`` for reading: ``with open_parquet(fs, path) as pf: pf.read_row_groups(...)``.

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` naming the file (``url`` if
    given, else ``path``) when it is not a valid Parquet file. The file is closed when the block exits.
    """
    name = redact_url(url or path)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"parquet file not found: {name}") from None
    with f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError, ValueError) as e:
            if is_transient(e):
                raise
            raise ValueError(f"{name}: not a valid parquet file ({e})") from None
        yield pf


# ------------------------------------------------------------------------------------ transient errors
#: errno values of a store that cannot be reached right now.
_TRANSIENT_ERRNO = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTUNREACH, errno.EAGAIN,
})
#: S3 error codes that mean 'try again later'.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "503", "500",
})
#: Errors that are about the data or the request, never retried even when they wrap a transient one.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
              ValueError, TypeError, KeyError)
#: Exception types that mean the store could not be reached (or answered too late): see :func:`is_transient`.
#: botocore ConnectionError: EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError;
#: HTTPClientError: ConnectionClosedError, ReadTimeoutError; ResponseParserError: throttling responses with a
#: broken body (s3fs retries these too).
_TRANSIENT_TYPES = (
    ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError, FSTimeoutError,
    botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, ResponseParserError,
    aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
)


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, Mapping):
        code = str((response.get("Error") or {}).get("Code", ""))
        status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        return code in _TRANSIENT_CODES or status == 429 or status >= 500
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` means the store could not be reached or asked to try again later.

    Transient: refused / reset / closed connections, timeouts, botocore ``EndpointConnectionError`` /
    ``ConnectionClosedError`` / ``ReadTimeoutError``, aiohttp connection and payload errors, S3 error
    responses with status 5xx or 429 or code ``SlowDown`` / ``Throttling`` / ``RequestTimeout`` /
    ``InternalError`` / ``ServiceUnavailable``, and ``OSError`` with errno ECONNREFUSED, ECONNRESET, ETIMEDOUT,
    ... The chain of causes is searched too (s3fs wraps ``ClientError`` into ``OSError``). Never transient:
    a top-level ``FileNotFoundError``, ``PermissionError``, ``FileExistsError``, ``ValueError`` (bad data),
    ``TypeError`` or ``KeyError``.
    """
    if isinstance(exc, _PERMANENT):
        return False
    seen: set[int] = set()
    todo: BaseException | None = exc
    while todo is not None and id(todo) not in seen:
        if _transient_one(todo):
            return True
        seen.add(id(todo))
        todo = todo.__cause__ or (None if todo.__suppress_context__ else todo.__context__)
    return False


class StoreUnavailable(RuntimeError):
    """The store stayed unreachable for a whole retry budget; ``.what`` names the operation."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what

    def __reduce__(self):  # picklable with its two arguments (Ray sends it from workers to the driver)
        return type(self), (str(self), self.what)


@dataclass(frozen=True)
class Retry:
    """Retry policy for transient store errors: exponential backoff with full jitter within a time budget.

    The n-th wait (n = 0, 1, ...) is uniform in ``[0, min(cap_s, base_s * 2**n)]``, cut to the budget left;
    one more attempt is made when the budget runs out during a wait. A call in progress is never interrupted,
    so the total time can exceed ``budget_s`` by one call (through s3fs with ``BOTOCORE_RETRIES``, a call to an
    unreachable store takes under a second before it fails).
    """

    budget_s: float
    base_s: float = 0.5
    cap_s: float = 30.0

    def call(self, fn: Callable[..., T], *args: Any, what: str, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, again after each transient error until the budget is spent.

        Errors that are not transient (:func:`is_transient`) propagate at once. When the budget is spent,
        raises :class:`StoreUnavailable` ("store unreachable for <budget>: <what>: <last error>; rerun when
        it is back") from the last error.
        """
        deadline = time.monotonic() + self.budget_s
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not is_transient(e):
                    raise
                left = deadline - time.monotonic()
                error = redact_url(f"{type(e).__name__}: {e}")
                if left <= 0:
                    raise StoreUnavailable(
                        f"store unreachable for {_duration(self.budget_s)}: {what}: {error}; "
                        "rerun when it is back",
                        what,
                    ) from e
                wait = min(left, random.uniform(0.0, min(self.cap_s, self.base_s * 2.0**attempt)))
                log.warning("%s: %s; retrying in %.1f s (%.0f s of the retry budget left)", what, error, wait, left)
                attempt += 1
                time.sleep(wait)


def retry(fn: Callable[..., T], *args: Any, budget_s: float, what: str, **kwargs: Any) -> T:
    """``Retry(budget_s).call(fn, *args, what=what, **kwargs)``: the default policy (base 0.5 s, cap 30 s)."""
    return Retry(budget_s).call(fn, *args, what=what, **kwargs)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"
