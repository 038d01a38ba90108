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
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import uuid
from typing import Any, Iterator, Mapping

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

__all__ = [
    "STAGING_DIR",
    "commit_bytes",
    "filesystem",
    "is_local",
    "join",
    "open_parquet",
    "redact_url",
]

#: Name of the staging directory used by :func:`commit_bytes` (the leading '_' makes pyarrow.dataset skip it).
STAGING_DIR = "_staging"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@")


def _scheme(url: str) -> str:
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def redact_url(url: str) -> str:
    """Return ``url`` with any ``user:password@`` part replaced by ``***@`` (safe for messages)."""
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
            raise ValueError(f"{name}: not a valid parquet file ({e})") from None
        yield pf
