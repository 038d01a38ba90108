"""The stimulus dataset: video clips stored as Parquet under any fsspec URL.

Contract. The dataset is either a single ``.parquet`` file or a directory of them (searched recursively;
names starting with '_' or '.' are skipped, like ``pyarrow.dataset`` does). Files are read in sorted path
order. One row per clip:

================== ================== ==================================================================
column             type               meaning
================== ================== ==================================================================
``clip_id``        string             unique over the whole dataset
``frames``         binary             raw uint8 bytes of a C-ordered ``[T, H, W]`` array (len = T*H*W)
``num_frames``     int32              ``T > 0`` (all frames, context frames included)
``height``         int32              ``H > 0``
``width``          int32              ``W > 0``
``perspectives``   list<float32>      optional; row-major ``[T, 2]`` (eye position), null = absent
``modulations``    list<float32>      optional; row-major ``[T, 2]`` (pupil, running), null = absent
``context_frames`` int32              optional; ``0 <= C < T``, null or absent = 0: the first ``C`` frames
                                      are context (the movie before the clip): run through the model,
                                      their responses not written (a clip's response has ``T - C`` frames)
================== ================== ==================================================================

(Any integer type is accepted for ``num_frames``/``height``/``width``/``context_frames`` and any float list
for ``perspectives``/``modulations``; :func:`write_clips` writes exactly the types above, each optional
column only when some clip needs it.)

Work is split into :class:`Shard` s: runs of consecutive rows of one file, found by :func:`list_shards`
from the small columns only; :func:`read_shard` then reads the frames of just those rows and validates them.

Reading fetches exact byte ranges, never a whole file: the footer (the last 32 KiB, more only when the
metadata is larger), then the column chunks needed, taken from the footer's offsets (several at once where
the filesystem can, e.g. s3fs). Both :func:`list_shards` and :func:`read_shard` add what they fetched to an
optional ``stats`` dict (``bytes_read``, ``requests``; ``read_shard`` also ``frame_bytes``), so a caller can
report bytes read per byte of frames; for files written by :func:`write_clips` (one clip per row group) that
is about ``1 + 32 KiB / frame bytes of the shard``.

Writing streams: :class:`ClipWriter` writes clips file by file (one row group at a time into the file being
built, each file committed atomically), so memory stays bounded by one file; :func:`write_clips` writes a
list through it.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from fnn_ray import storage

__all__ = [
    "Clip",
    "ClipWriter",
    "SCHEMA",
    "Shard",
    "check_finite",
    "dataset_files",
    "list_shards",
    "read_shard",
    "regroup",
    "write_clips",
]

#: The schema :func:`write_clips` writes (the optional columns only when some clip needs them).
SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("frames", pa.binary()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("perspectives", pa.list_(pa.float32())),
        ("modulations", pa.list_(pa.float32())),
        ("context_frames", pa.int32()),
    ]
)

_REQUIRED = {
    "clip_id": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "frames": (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
    "num_frames": (pa.types.is_integer, "int32"),
    "height": (pa.types.is_integer, "int32"),
    "width": (pa.types.is_integer, "int32"),
}


def _is_float_list(t: pa.DataType) -> bool:
    return (
        pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    ) and pa.types.is_floating(t.value_type)


_VECTORS = ("perspectives", "modulations")  # optional per-frame [T, 2] float columns
_OPTIONAL = {
    "perspectives": (_is_float_list, "list<float32>"),
    "modulations": (_is_float_list, "list<float32>"),
    "context_frames": (pa.types.is_integer, "int32"),
}
_SMALL = ["clip_id", "num_frames", "height", "width"]


# --------------------------------------------------------------------------------------------------- Clip
@dataclass(eq=False)
class Clip:
    """One stimulus clip.

    ``frames``: uint8 ``[T, H, W]``; ``perspectives`` / ``modulations``: float32 ``[T, 2]`` or None;
    ``context_frames``: the first ``C`` frames (``0 <= C < T``) are context, run but not written.
    """

    clip_id: str
    frames: np.ndarray
    perspectives: np.ndarray | None = None
    modulations: np.ndarray | None = None
    context_frames: int = 0

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    def columns(self) -> set[str]:
        """The optional columns this clip needs (``perspectives``, ``modulations``, ``context_frames``)."""
        need = {name for name in _VECTORS if getattr(self, name) is not None}
        return need | ({"context_frames"} if self.context_frames else set())

    def validate(self) -> None:
        """Raise ValueError (naming the clip) unless the clip satisfies the dataset contract."""
        if not isinstance(self.clip_id, str) or not self.clip_id:
            raise ValueError(f"clip_id must be a non-empty string, got {self.clip_id!r}")
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3:
            desc = f"{f.dtype} {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
            raise ValueError(f"clip {self.clip_id!r}: frames must be a uint8 [T, H, W] array, got {desc}")
        if min(f.shape) <= 0:
            raise ValueError(f"clip {self.clip_id!r}: frames shape {f.shape} has an empty axis")
        for name in _VECTORS:
            a = getattr(self, name)
            if a is None:
                continue
            a = np.asarray(a)
            if a.shape != (f.shape[0], 2) or not np.issubdtype(a.dtype, np.number):
                raise ValueError(
                    f"clip {self.clip_id!r}: {name} must be a numeric [T, 2] = [{f.shape[0]}, 2] array, "
                    f"got {a.dtype} {a.shape}"
                )
            check_finite(a, f"clip {self.clip_id!r}: {name}")
        c = self.context_frames
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < f.shape[0]:
            raise ValueError(
                f"clip {self.clip_id!r}: context_frames must be an integer in [0, T) = [0, {f.shape[0]}), got {c!r}"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Clip):
            return NotImplemented

        def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return np.asarray(a).shape == np.asarray(b).shape and np.array_equal(a, b)

        return (
            self.clip_id == other.clip_id
            and same(self.frames, other.frames)
            and same(self.perspectives, other.perspectives)
            and same(self.modulations, other.modulations)
            and int(self.context_frames) == int(other.context_frames)
        )

    __hash__ = None  # type: ignore[assignment]


# -------------------------------------------------------------------------------------------------- Shard
@dataclass(frozen=True)
class Shard:
    """Rows ``[row_start, row_stop)`` of one Parquet file of the stimulus dataset at ``url``.

    ``path`` is the file's path on the filesystem of ``url`` (no protocol); ``clip_ids`` are the clips of
    those rows in order; ``frames`` is their total number of frames, ``context_frames`` how many of those are
    context. ``file`` is the file's path relative to the dataset root (defaults to the basename of ``path``);
    it names the shard in :attr:`shard_id`.
    Frozen, hashable and picklable; it holds no storage options.
    """

    url: str
    path: str
    row_start: int
    row_stop: int
    clip_ids: tuple[str, ...]
    frames: int
    file: str = field(default="", compare=True)
    context_frames: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip_ids", tuple(self.clip_ids))
        if not self.file:
            object.__setattr__(self, "file", posixpath.basename(self.path))
        if not 0 <= self.row_start <= self.row_stop:
            raise ValueError(f"bad row range [{self.row_start}, {self.row_stop})")

    @property
    def num_clips(self) -> int:
        return self.row_stop - self.row_start

    @property
    def shard_id(self) -> str:
        """Stable, filename-safe id, e.g. ``part-00000.000000-000008`` (file stem, then the row range)."""
        stem = self.file[: -len(".parquet")] if self.file.endswith(".parquet") else self.file
        stem = re.sub(r"[^A-Za-z0-9._=-]", "_", stem.strip("/").replace("/", "."))
        return f"{stem}.{self.row_start:06d}-{self.row_stop:06d}"

    @property
    def file_url(self) -> str:
        """URL of the shard's file (for messages; credentials redacted)."""
        return _file_url(self.url, self.file, self.path)

    @property
    def part_id(self) -> str:
        """The shard as a work-item part (:class:`fnn_ray.plan.Part`): its :attr:`shard_id`."""
        return self.shard_id

    @property
    def where(self) -> str:
        """Where the part's clips come from (for messages): :attr:`file_url`."""
        return self.file_url


def _file_url(url: str, rel: str, path: str) -> str:
    base = storage.redact_url(url).rstrip("/")
    if base == rel or base.endswith("/" + rel):  # the dataset is this single file
        return base
    return storage.join(base, rel)


# ---------------------------------------------------------------------------------------------- writing
def _arrow_list(arrays: list[np.ndarray | None]) -> pa.Array:
    return pa.array(
        [None if a is None else np.ascontiguousarray(a, dtype=np.float32).ravel() for a in arrays],
        type=pa.list_(pa.float32()),
    )


def _clips_table(clips: Sequence[Clip], schema: pa.Schema) -> pa.Table:
    cols: dict[str, pa.Array] = {
        "clip_id": pa.array([c.clip_id for c in clips], pa.string()),
        "frames": pa.array([np.ascontiguousarray(c.frames).tobytes() for c in clips], pa.binary()),
        "num_frames": pa.array([c.num_frames for c in clips], pa.int32()),
        "height": pa.array([c.height for c in clips], pa.int32()),
        "width": pa.array([c.width for c in clips], pa.int32()),
    }
    for name in _VECTORS:
        if name in schema.names:
            cols[name] = _arrow_list([getattr(c, name) for c in clips])
    if "context_frames" in schema.names:
        cols["context_frames"] = pa.array([int(c.context_frames) for c in clips], pa.int32())
    return pa.table(cols, schema=schema)


class ClipWriter:
    """Write clips into a stimulus dataset directory at ``url`` one at a time, with bounded memory::

        with ClipWriter(url, storage_options) as writer:
            for clip in clips:
                writer.write(clip)
        writer.files  # the committed file URLs

    Files are ``part-00000.parquet``, ``part-00001.parquet``, ...; a file is finished when it holds
    ``clips_per_file`` clips or the next clip would take it past ``max_file_bytes`` of frames, and is then
    committed atomically (:func:`fnn_ray.storage.commit_bytes`): only the file being built is in memory. Rows
    go into row groups of ``clips_per_row_group`` clips (1 lets a shard read exactly its own rows). A file has
    the optional columns in ``columns`` plus those its first clip needs; a clip needing another one starts a
    new file. Every clip is validated and its id checked against all earlier ones (``ValueError``).

    If ``url`` already holds Parquet files: ``FileExistsError`` at construction unless ``overwrite`` (they are
    then deleted just before the first file is committed). Leaving the ``with`` block by an exception, or
    :meth:`abort`, removes every file this writer committed. ``clips``, ``frames``, ``context_frames`` and
    ``bytes`` (committed file bytes) count what was written.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        clips_per_file: int = 32,
        max_file_bytes: int = 1 << 30,
        clips_per_row_group: int = 1,
        overwrite: bool = False,
        columns: Iterable[str] = (),
    ) -> None:
        if clips_per_file < 1 or clips_per_row_group < 1:
            raise ValueError("clips_per_file and clips_per_row_group must be >= 1")
        self._columns = frozenset(columns)
        if not self._columns <= set(_OPTIONAL):
            raise ValueError(f"unknown optional column(s) {sorted(self._columns - set(_OPTIONAL))}")
        self.url = url
        self.clips_per_file, self.max_file_bytes = clips_per_file, max_file_bytes
        self.clips_per_row_group = clips_per_row_group
        self._fs, self._root = storage.filesystem(url, storage_options)
        self._created = not self._fs.exists(self._root)
        self._existing = _find_parquet(self._fs, self._root) if self._fs.isdir(self._root) else []
        if self._existing and not overwrite:
            raise FileExistsError(f"{storage.redact_url(url)} already holds {len(self._existing)} parquet file(s); "
                                  f"pass --overwrite to replace them")
        self.files: list[str] = []
        self._paths: list[str] = []
        self._ids: set[str] = set()
        self.clips = self.frames = self.context_frames = self.bytes = 0
        self._sink: pa.BufferOutputStream | None = None
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[Clip] = []
        self._file_clips = self._file_frame_bytes = 0

    def write(self, clip: Clip) -> None:
        """Validate ``clip`` and add it to the file being built (finishing that file first when it is full)."""
        if not isinstance(clip, Clip):
            raise TypeError(f"ClipWriter.write: got a {type(clip).__name__}, expected Clip")
        clip.validate()
        if clip.clip_id in self._ids:
            raise ValueError(f"duplicate clip_id {clip.clip_id!r} (clip {self.clips} repeats an earlier one)")
        nbytes = clip.frames.nbytes
        need = clip.columns()
        if self._writer is not None and (
            not need <= set(self._writer.schema.names)
            or self._file_clips >= self.clips_per_file
            or self._file_frame_bytes + nbytes > self.max_file_bytes
        ):
            self._finish_file()
        if self._writer is None:
            names = set(_REQUIRED) | self._columns | need
            schema = pa.schema([f for f in SCHEMA if f.name in names])
            self._sink = pa.BufferOutputStream()
            self._writer = pq.ParquetWriter(self._sink, schema, use_dictionary=["clip_id"])
        self._pending.append(clip)
        self._ids.add(clip.clip_id)
        self._file_clips += 1
        self._file_frame_bytes += nbytes
        self.clips += 1
        self.frames += clip.num_frames
        self.context_frames += int(clip.context_frames)
        if len(self._pending) >= self.clips_per_row_group:
            self._write_rows()

    def _write_rows(self) -> None:
        if self._pending:
            table = _clips_table(self._pending, self._writer.schema)
            self._writer.write_table(table, row_group_size=self.clips_per_row_group)
            self._pending = []

    def _finish_file(self) -> None:
        self._write_rows()
        self._writer.close()
        data = self._sink.getvalue()
        self._writer = self._sink = None
        self._file_clips = self._file_frame_bytes = 0
        for path in self._existing:  # overwrite: the old files go just before the first new one lands
            self._fs.rm_file(path)
        self._existing = []
        name = f"part-{len(self.files):05d}.parquet"
        path = posixpath.join(self._root, name)
        storage.commit_bytes(self._fs, path, data)
        self._paths.append(path)
        self.files.append(storage.join(self.url, name))
        self.bytes += data.size

    def close(self) -> list[str]:
        """Commit the file being built; return the URLs of all committed files."""
        if self._writer is not None:
            self._finish_file()
        return self.files

    def abort(self) -> None:
        """Drop the file being built and remove every file this writer committed."""
        self._writer = self._sink = None
        self._pending = []
        for path in self._paths:
            try:
                self._fs.rm_file(path)
            except FileNotFoundError:
                pass
        self._paths, self.files = [], []
        if storage.is_local(self._fs) and self._created:  # leave no empty folders behind either
            for folder in (posixpath.join(self._root, storage.STAGING_DIR), self._root):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass

    def __enter__(self) -> ClipWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_clips(
    url: str,
    clips: Iterable[Clip],
    storage_options: Mapping[str, Any] | None = None,
    *,
    clips_per_file: int = 32,
    max_file_bytes: int = 1 << 30,
    clips_per_row_group: int = 1,
    overwrite: bool = False,
) -> list[str]:
    """Write ``clips`` as a stimulus dataset directory at ``url``; return the written file URLs.

    Every clip is validated (and clip ids checked for uniqueness) before anything is written; then the clips
    go through a :class:`ClipWriter` (see there for file names, sizes, row groups and atomic commits). Every
    file has the same columns: ``perspectives`` / ``modulations`` / ``context_frames`` are written when any
    clip has them (null, or 0 context frames, for the others).
    If ``url`` already holds Parquet files: ``FileExistsError`` unless ``overwrite`` (then they are deleted).
    """
    clips = list(clips)
    if not clips:
        raise ValueError("write_clips: no clips given")
    seen: dict[str, int] = {}
    for i, c in enumerate(clips):
        if not isinstance(c, Clip):
            raise TypeError(f"write_clips: item {i} is a {type(c).__name__}, expected Clip")
        c.validate()
        if c.clip_id in seen:
            raise ValueError(f"write_clips: duplicate clip_id {c.clip_id!r} (clips {seen[c.clip_id]} and {i})")
        seen[c.clip_id] = i
    columns = set().union(*(c.columns() for c in clips))
    with ClipWriter(url, storage_options, clips_per_file=clips_per_file, max_file_bytes=max_file_bytes,
                    clips_per_row_group=clips_per_row_group, overwrite=overwrite, columns=columns) as writer:
        for c in clips:
            writer.write(c)
    return writer.files


# ---------------------------------------------------------------------------------------------- listing
def _hidden(rel: str) -> bool:
    return any(p.startswith(("_", ".")) for p in rel.split("/") if p)


def _find_parquet(fs: AbstractFileSystem, root: str) -> list[str]:
    root = root.rstrip("/")
    files = []
    for p in fs.find(root):
        p = p.rstrip("/")
        rel = p[len(root) :].lstrip("/") if p.startswith(root) else posixpath.basename(p)
        if p.endswith(".parquet") and not _hidden(rel):
            files.append(p)
    return sorted(files)


def dataset_files(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[AbstractFileSystem, list[tuple[str, str]]]:
    """Return ``(fs, [(path, rel), ...])``: the dataset's Parquet files in order, with paths relative to
    the dataset root. ``FileNotFoundError`` naming ``url`` if it is missing, unreachable or has no files."""
    shown = storage.redact_url(url)
    try:
        fs, root = storage.filesystem(url, storage_options)
        fs.invalidate_cache(root)
        info = fs.info(root)
        if info.get("type") == "file":
            return fs, [(root, posixpath.basename(root))]
        files = _find_parquet(fs, root)
    except FileNotFoundError:
        raise FileNotFoundError(f"stimulus dataset not found: {shown}") from None
    except (ValueError, TypeError):
        raise
    except Exception as e:  # unreachable endpoint, permission denied, ... (messages carry no credentials)
        raise FileNotFoundError(f"cannot reach stimulus dataset {shown}: {type(e).__name__}: {e}") from None
    if not files:
        raise FileNotFoundError(f"stimulus dataset {shown} holds no .parquet files")
    root = root.rstrip("/")
    return fs, [(p, p[len(root) :].lstrip("/")) for p in files]


def _check_schema(schema: pa.Schema, where: str) -> list[str]:
    """Check the columns; return the optional columns present."""
    names = set(schema.names)
    for name, (ok, expected) in _REQUIRED.items():
        if name not in names:
            raise ValueError(f"{where}: missing column {name!r} (expected {expected})")
        t = schema.field(name).type
        if not ok(t):
            raise ValueError(f"{where}: column {name!r} has type {t}, expected {expected}")
    present = []
    for name, (ok, expected) in _OPTIONAL.items():
        if name in names:
            t = schema.field(name).type
            if not ok(t):
                raise ValueError(f"{where}: column {name!r} has type {t}, expected {expected}")
            present.append(name)
    return present


def _check_small(table: pa.Table, where: str, row0: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Validate clip_id / num_frames / height / width (and context_frames when present) of rows ``row0...``;
    return the ids, T and context frames (0 when absent or null) per row."""
    ids = table.column("clip_id").to_pylist()
    dims = {k: table.column(k).to_pylist() for k in ("num_frames", "height", "width")}
    names = table.column_names
    context = table.column("context_frames").to_pylist() if "context_frames" in names else [None] * len(ids)
    for i, cid in enumerate(ids):
        if cid is None or cid == "":
            raise ValueError(f"{where} row {row0 + i}: clip_id is null or empty")
        for k, vals in dims.items():
            if vals[i] is None or vals[i] <= 0:
                raise ValueError(f"{where} row {row0 + i} (clip_id {cid!r}): {k} must be > 0, got {vals[i]}")
        c, t = context[i] or 0, dims["num_frames"][i]
        if not 0 <= c < t:
            raise ValueError(
                f"{where} row {row0 + i} (clip_id {cid!r}): context_frames must be in [0, num_frames) = "
                f"[0, {t}), got {c}"
            )
    return (ids, np.asarray(dims["num_frames"], dtype=np.int64),
            np.asarray([c or 0 for c in context], dtype=np.int64))


# --------------------------------------------------------------------------------- ranged file access
_TAIL_BYTES = 32 * 1024  # first read at a file's end: holds the footer of files of up to ~40 row groups
_HOLE_BYTES = 4 * 1024  # needed ranges closer than this are fetched as one


def _count(stats: dict[str, int] | None, **counts: int) -> None:
    if stats is not None:
        for key, value in counts.items():
            stats[key] = stats.get(key, 0) + value


class _RangeFile(io.RawIOBase):
    """Read-only, seekable view of one stored file that fetches exactly the byte ranges it is asked for.

    :meth:`prefetch` fetches several ranges in one call (concurrently where the filesystem can); a read
    inside a fetched range is served from memory, any other read fetches just its own bytes. Every fetched
    byte and request is added to ``stats`` (``bytes_read``, ``requests``).
    """

    def __init__(self, fs: AbstractFileSystem, path: str, size: int, stats: dict[str, int] | None) -> None:
        super().__init__()
        self._fs, self._path, self._size, self._stats = fs, path, size, stats
        self._pos = 0
        self._held: list[tuple[int, bytes]] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def fetch(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` straight from storage (one request)."""
        data = self._fs.cat_file(self._path, start=start, end=stop)
        _count(self._stats, bytes_read=len(data), requests=1)
        return data

    def prefetch(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Fetch ``[(start, stop), ...]`` (merged where they touch) and keep them for later reads."""
        merged: list[list[int]] = []
        for start, stop in sorted(ranges):
            if merged and start - merged[-1][1] <= _HOLE_BYTES:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        if not merged:
            return
        datas = self._fs.cat_ranges([self._path] * len(merged), [m[0] for m in merged], [m[1] for m in merged],
                                    on_error="raise")
        _count(self._stats, bytes_read=sum(len(d) for d in datas), requests=len(merged))
        self._held.extend((m[0], d) for m, d in zip(merged, datas))

    def read(self, size: int = -1) -> bytes | memoryview:
        stop = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        start, self._pos = self._pos, max(self._pos, stop)
        if stop <= start:
            return b""
        for offset, data in self._held:
            if offset <= start and stop <= offset + len(data):
                return memoryview(data)[start - offset : stop - offset]
        return self.fetch(start, stop)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _open_parquet(
    fs: AbstractFileSystem, path: str, where: str, stats: dict[str, int] | None
) -> tuple[pq.ParquetFile, _RangeFile]:
    """Open a Parquet file for ranged reads: fetch its footer (one request, two for large metadata)."""
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"parquet file not found: {where}") from None
    f = _RangeFile(fs, path, size, stats)
    if size < 12:
        raise ValueError(f"{where}: not a valid parquet file ({size} bytes)")
    tail = f.fetch(max(0, size - _TAIL_BYTES), size)
    meta = int.from_bytes(tail[-8:-4], "little")
    if tail[-4:] != b"PAR1" or meta + 12 > size:
        raise ValueError(f"{where}: not a valid parquet file (no parquet footer at the end)")
    if meta + 8 > len(tail):
        tail = f.fetch(size - meta - 8, size - len(tail)) + tail
    try:
        # the footer alone, behind a leading magic, is a file pyarrow can read the metadata of
        metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-(meta + 8) :]))
        return pq.ParquetFile(f, metadata=metadata, pre_buffer=False), f
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ValueError(f"{where}: not a valid parquet file ({e})") from None


def _chunk_ranges(metadata: pq.FileMetaData, groups: Iterable[int], names: Iterable[str]) -> list[tuple[int, int]]:
    """Byte ranges ``(start, stop)`` of the column chunks of ``names`` (top-level columns) in row ``groups``."""
    names = set(names)
    out = []
    for g in groups:
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".")[0] not in names:
                continue
            start = chunk.data_page_offset
            if chunk.has_dictionary_page and 0 < (chunk.dictionary_page_offset or 0) < start:
                start = chunk.dictionary_page_offset
            out.append((start, start + chunk.total_compressed_size))
    return out


def _read(read: Any, where: str) -> pa.Table:
    """Run a pyarrow read; transient store errors propagate, anything else is a ValueError naming the file."""
    try:
        return read()
    except (pa.ArrowException, OSError) as e:
        if storage.is_transient(e):
            raise
        raise ValueError(f"{where}: cannot read parquet data ({e})") from None


def list_shards(
    url: str,
    clips_per_shard: int,
    storage_options: Mapping[str, Any] | None = None,
    *,
    stats: dict[str, int] | None = None,
) -> list[Shard]:
    """Split the stimulus dataset at ``url`` into shards of up to ``clips_per_shard`` consecutive rows of one
    file (shards never span files), in file then row order. A shard's ``frames`` counts all frames the model
    runs, context frames included.

    Reads only the Parquet footers and the small columns (``clip_id``, ``num_frames``, ``height``,
    ``width``, ``context_frames``), never the frames; adds the bytes and requests fetched to ``stats``.
    Raises ``FileNotFoundError`` (missing/unreachable URL) or ``ValueError`` (corrupt file, missing or
    mistyped column, bad dimensions or context, duplicate ``clip_id``: each names the file).
    """
    if clips_per_shard < 1:
        raise ValueError(f"clips_per_shard must be >= 1, got {clips_per_shard}")
    fs, files = dataset_files(url, storage_options)
    owner: dict[str, tuple[str, int]] = {}
    shards: list[Shard] = []
    for path, rel in files:
        where = _file_url(url, rel, path)
        pf, f = _open_parquet(fs, path, where, stats)
        optional = _check_schema(pf.schema_arrow, where)
        columns = _SMALL + [name for name in optional if name == "context_frames"]
        f.prefetch(_chunk_ranges(pf.metadata, range(pf.metadata.num_row_groups), columns))
        table = _read(lambda: pf.read(columns=columns, use_threads=False), where)
        ids, num_frames, context = _check_small(table, where, 0)
        for row, cid in enumerate(ids):
            if cid in owner:
                f0, r0 = owner[cid]
                raise ValueError(f"duplicate clip_id {cid!r}: {f0} row {r0} and {where} row {row}")
            owner[cid] = (where, row)
        for start in range(0, len(ids), clips_per_shard):
            stop = min(start + clips_per_shard, len(ids))
            shards.append(
                Shard(
                    url=url,
                    path=path,
                    row_start=start,
                    row_stop=stop,
                    clip_ids=tuple(ids[start:stop]),
                    frames=int(num_frames[start:stop].sum()),
                    file=rel,
                    context_frames=int(context[start:stop].sum()),
                )
            )
    seen_ids: dict[str, Shard] = {}
    for s in shards:
        if s.shard_id in seen_ids:
            raise ValueError(
                f"shard id {s.shard_id!r} is ambiguous: files {seen_ids[s.shard_id].file!r} and {s.file!r}"
            )
        seen_ids[s.shard_id] = s
    return shards


# ---------------------------------------------------------------------------------------------- reading
def _float_rows(col: pa.ChunkedArray, name: str, nframes: np.ndarray, ids: list[str], where: str, row0: int):
    out: list[np.ndarray | None] = []
    for i, v in enumerate(col):
        if not v.is_valid:
            out.append(None)
            continue
        vals = v.values.to_numpy(zero_copy_only=False)
        T = int(nframes[i])
        if vals.shape[0] != 2 * T:
            raise ValueError(
                f"{where} row {row0 + i} (clip_id {ids[i]!r}): {name} has {vals.shape[0]} values, "
                f"expected 2*num_frames = {2 * T}"
            )
        out.append(np.ascontiguousarray(vals, dtype=np.float32).reshape(T, 2))
        check_finite(out[-1], f"{where} row {row0 + i} (clip_id {ids[i]!r}): {name}")
    return out


def check_finite(values: np.ndarray, what: str) -> None:
    """ValueError naming ``what`` and the first frame of ``values`` ``[T, 2]`` that is not finite."""
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size:
        raise ValueError(f"{what} of frame {bad[0]} is {np.asarray(values[bad[0]]).tolist()}: not finite "
                         f"({bad.size} frame(s) like it)")


def read_shard(
    shard: Shard,
    storage_options: Mapping[str, Any] | None = None,
    *,
    stats: dict[str, int] | None = None,
) -> list[Clip]:
    """Read and validate the clips of ``shard`` (only its row groups); return them in row order.

    Each clip's ``frames`` is a writable uint8 ``[T, H, W]`` array; ``perspectives`` / ``modulations`` are
    float32 ``[T, 2]`` or None; ``context_frames`` is 0 when the column is absent. Fetches the file's footer
    and the byte ranges of the shard's row groups only; adds ``bytes_read`` and ``requests`` (what was
    fetched) and ``frame_bytes`` (T*H*W summed over the clips) to ``stats``. Raises ``ValueError`` naming the
    file, row, clip_id and expected vs. actual value for any violation of the contract, or if the file changed
    since :func:`list_shards`.
    """
    where = shard.file_url
    try:
        fs, _ = storage.filesystem(shard.url, storage_options)
    except Exception as e:
        raise FileNotFoundError(f"cannot reach stimulus dataset {storage.redact_url(shard.url)}: {e}") from None
    n = shard.num_clips
    if n == 0:
        return []
    pf, f = _open_parquet(fs, shard.path, where, stats)
    optional = _check_schema(pf.schema_arrow, where)
    md = pf.metadata
    if md.num_rows < shard.row_stop:
        raise ValueError(
            f"{where}: has {md.num_rows} rows, shard {shard.shard_id} needs rows "
            f"[{shard.row_start}, {shard.row_stop}); the file changed since it was listed"
        )
    groups, first, offset = [], None, 0
    for g in range(md.num_row_groups):
        rows = md.row_group(g).num_rows
        if offset < shard.row_stop and offset + rows > shard.row_start:
            groups.append(g)
            first = offset if first is None else first
        offset += rows
    columns = _SMALL + ["frames"] + optional
    f.prefetch(_chunk_ranges(md, groups, columns))
    table = _read(lambda: pf.read_row_groups(groups, columns=columns, use_threads=False), where)
    table = table.slice(shard.row_start - first, n)
    ids, nframes, context = _check_small(table, where, shard.row_start)
    if tuple(ids) != shard.clip_ids:
        raise ValueError(
            f"{where} rows [{shard.row_start}, {shard.row_stop}): clip ids {ids} differ from the listed "
            f"{list(shard.clip_ids)}; the file changed since it was listed"
        )
    heights = table.column("height").to_numpy()
    widths = table.column("width").to_numpy()
    extra = {name: _float_rows(table.column(name), name, nframes, ids, where, shard.row_start)
             for name in optional if name in _VECTORS}
    clips = []
    for i, v in enumerate(table.column("frames")):
        T, H, W = int(nframes[i]), int(heights[i]), int(widths[i])
        row = shard.row_start + i
        if not v.is_valid:
            raise ValueError(f"{where} row {row} (clip_id {ids[i]!r}): frames is null")
        buf = v.as_buffer()
        if buf.size != T * H * W:
            raise ValueError(
                f"{where} row {row} (clip_id {ids[i]!r}): frames has {buf.size} bytes, expected "
                f"num_frames*height*width = {T}*{H}*{W} = {T * H * W}"
            )
        frames = np.frombuffer(buf, dtype=np.uint8).reshape(T, H, W).copy()
        clips.append(
            Clip(
                clip_id=ids[i],
                frames=frames,
                perspectives=extra["perspectives"][i] if "perspectives" in extra else None,
                modulations=extra["modulations"][i] if "modulations" in extra else None,
                context_frames=int(context[i]),
            )
        )
    _count(stats, frame_bytes=sum(c.frames.nbytes for c in clips))
    return clips


def regroup(shards: Sequence[Shard], clips_per_shard: int) -> list[Shard]:
    """Merge one-clip shards (``list_shards(url, 1)``) into shards of ``clips_per_shard`` consecutive rows of one
    file: the same shards (and ids) as ``list_shards(url, clips_per_shard)``, without listing twice."""
    out: list[Shard] = []
    group: list[Shard] = []

    def flush() -> None:
        if group:
            first, last = group[0], group[-1]
            out.append(Shard(url=first.url, path=first.path, row_start=first.row_start, row_stop=last.row_stop,
                             clip_ids=tuple(c for s in group for c in s.clip_ids),
                             frames=sum(s.frames for s in group), file=first.file,
                             context_frames=sum(s.context_frames for s in group)))
            group.clear()

    for shard in shards:
        if group and (shard.path != group[0].path or shard.row_start % clips_per_shard == 0):
            flush()
        group.append(shard)
    flush()
    return out
