"""The stimulus dataset: video clips stored as Parquet under any fsspec URL.

Contract. The dataset is either a single ``.parquet`` file or a directory of them (searched recursively;
names starting with '_' or '.' are skipped, like ``pyarrow.dataset`` does). Files are read in sorted path
order. One row per clip:

=============== ===================== =====================================================================
column          type                  meaning
=============== ===================== =====================================================================
``clip_id``     string                unique over the whole dataset
``frames``      binary                raw uint8 bytes of a C-ordered ``[T, H, W]`` array (len = T*H*W)
``num_frames``  int32                 ``T > 0``
``height``      int32                 ``H > 0``
``width``       int32                 ``W > 0``
``perspectives`` list<float32>        optional; row-major ``[T, 2]`` (eye position), null = absent
``modulations`` list<float32>         optional; row-major ``[T, 2]`` (pupil, running), null = absent
=============== ===================== =====================================================================

(Any integer type is accepted for ``num_frames``/``height``/``width`` and any float list for the optional
columns; :func:`write_clips` writes exactly the types above.)

Work is split into :class:`Shard` s: runs of consecutive rows of one file, found by :func:`list_shards`
from the small columns only; :func:`read_shard` then reads the frames of just those rows and validates them.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from fnn_ray import storage

__all__ = ["Clip", "Shard", "SCHEMA", "write_clips", "list_shards", "read_shard", "dataset_files"]

#: The schema :func:`write_clips` writes (``perspectives``/``modulations`` only when some clip has them).
SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("frames", pa.binary()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("perspectives", pa.list_(pa.float32())),
        ("modulations", pa.list_(pa.float32())),
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


_OPTIONAL = {
    "perspectives": (_is_float_list, "list<float32>"),
    "modulations": (_is_float_list, "list<float32>"),
}
_SMALL = ["clip_id", "num_frames", "height", "width"]


# --------------------------------------------------------------------------------------------------- Clip
@dataclass(eq=False)
class Clip:
    """One stimulus clip.

    ``frames``: uint8 ``[T, H, W]``; ``perspectives`` / ``modulations``: float32 ``[T, 2]`` or None.
    """

    clip_id: str
    frames: np.ndarray
    perspectives: np.ndarray | None = None
    modulations: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

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
        for name in ("perspectives", "modulations"):
            a = getattr(self, name)
            if a is None:
                continue
            a = np.asarray(a)
            if a.shape != (f.shape[0], 2) or not np.issubdtype(a.dtype, np.number):
                raise ValueError(
                    f"clip {self.clip_id!r}: {name} must be a numeric [T, 2] = [{f.shape[0]}, 2] array, "
                    f"got {a.dtype} {a.shape}"
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
        )

    __hash__ = None  # type: ignore[assignment]


# -------------------------------------------------------------------------------------------------- Shard
@dataclass(frozen=True)
class Shard:
    """Rows ``[row_start, row_stop)`` of one Parquet file of the stimulus dataset at ``url``.

    ``path`` is the file's path on the filesystem of ``url`` (no protocol); ``clip_ids`` are the clips of
    those rows in order; ``frames`` is their total number of frames. ``file`` is the file's path relative
    to the dataset root (defaults to the basename of ``path``); it names the shard in :attr:`shard_id`.
    Frozen, hashable and picklable; it holds no storage options.
    """

    url: str
    path: str
    row_start: int
    row_stop: int
    clip_ids: tuple[str, ...]
    frames: int
    file: str = field(default="", compare=True)

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


def _clips_table(clips: Sequence[Clip], with_persp: bool, with_mod: bool) -> pa.Table:
    cols: dict[str, pa.Array] = {
        "clip_id": pa.array([c.clip_id for c in clips], pa.string()),
        "frames": pa.array([np.ascontiguousarray(c.frames).tobytes() for c in clips], pa.binary()),
        "num_frames": pa.array([c.num_frames for c in clips], pa.int32()),
        "height": pa.array([c.height for c in clips], pa.int32()),
        "width": pa.array([c.width for c in clips], pa.int32()),
    }
    if with_persp:
        cols["perspectives"] = _arrow_list([c.perspectives for c in clips])
    if with_mod:
        cols["modulations"] = _arrow_list([c.modulations for c in clips])
    schema = pa.schema([SCHEMA.field(k) for k in cols])
    return pa.table(cols, schema=schema)


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

    Every clip is validated (and clip ids checked for uniqueness) before anything is written. Files are
    ``part-00000.parquet``, ``part-00001.parquet``, ... holding up to ``clips_per_file`` clips and about
    ``max_file_bytes`` of frames each, with ``clips_per_row_group`` rows per row group (1 lets a shard read
    exactly its own rows); each file is committed atomically (:func:`fnn_ray.storage.commit_bytes`).
    ``perspectives`` / ``modulations`` columns are written when any clip has them (null for the others).
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
    if clips_per_file < 1 or clips_per_row_group < 1:
        raise ValueError("clips_per_file and clips_per_row_group must be >= 1")

    fs, root = storage.filesystem(url, storage_options)
    existing = _find_parquet(fs, root) if fs.isdir(root) else []
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"{storage.redact_url(url)} already holds {len(existing)} parquet file(s); pass overwrite=True"
            )
        for p in existing:
            fs.rm_file(p)

    with_persp = any(c.perspectives is not None for c in clips)
    with_mod = any(c.modulations is not None for c in clips)
    groups: list[list[Clip]] = [[]]
    size = 0
    for c in clips:
        nbytes = c.frames.nbytes
        if groups[-1] and (len(groups[-1]) >= clips_per_file or size + nbytes > max_file_bytes):
            groups.append([])
            size = 0
        groups[-1].append(c)
        size += nbytes

    out = []
    for k, group in enumerate(groups):
        table = _clips_table(group, with_persp, with_mod)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=clips_per_row_group, use_dictionary=["clip_id"])
        name = f"part-{k:05d}.parquet"
        storage.commit_bytes(fs, posixpath.join(root, name), sink.getvalue())
        out.append(storage.join(url, name))
    return out


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


def _check_small(table: pa.Table, where: str, row0: int) -> tuple[list[str], np.ndarray]:
    """Validate clip_id / num_frames / height / width of rows ``row0...``; return ids and T per row."""
    ids = table.column("clip_id").to_pylist()
    dims = {k: table.column(k).to_pylist() for k in ("num_frames", "height", "width")}
    for i, cid in enumerate(ids):
        if cid is None or cid == "":
            raise ValueError(f"{where} row {row0 + i}: clip_id is null or empty")
        for k, vals in dims.items():
            if vals[i] is None or vals[i] <= 0:
                raise ValueError(f"{where} row {row0 + i} (clip_id {cid!r}): {k} must be > 0, got {vals[i]}")
    return ids, np.asarray(dims["num_frames"], dtype=np.int64)


def list_shards(
    url: str, clips_per_shard: int, storage_options: Mapping[str, Any] | None = None
) -> list[Shard]:
    """Split the stimulus dataset at ``url`` into shards of up to ``clips_per_shard`` consecutive rows of one
    file (shards never span files), in file then row order.

    Reads only the Parquet footers and the small columns (``clip_id``, ``num_frames``, ``height``,
    ``width``), never the frames. Raises ``FileNotFoundError`` (missing/unreachable URL) or ``ValueError``
    (corrupt file, missing or mistyped column, bad dimensions, duplicate ``clip_id``: each names the file).
    """
    if clips_per_shard < 1:
        raise ValueError(f"clips_per_shard must be >= 1, got {clips_per_shard}")
    fs, files = dataset_files(url, storage_options)
    owner: dict[str, tuple[str, int]] = {}
    shards: list[Shard] = []
    for path, rel in files:
        where = _file_url(url, rel, path)
        with storage.open_parquet(fs, path, where) as pf:
            _check_schema(pf.schema_arrow, where)
            try:
                table = pf.read(columns=_SMALL)
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{where}: cannot read parquet data ({e})") from None
        ids, num_frames = _check_small(table, where, 0)
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
    return out


def read_shard(shard: Shard, storage_options: Mapping[str, Any] | None = None) -> list[Clip]:
    """Read and validate the clips of ``shard`` (only its row groups); return them in row order.

    Each clip's ``frames`` is a writable uint8 ``[T, H, W]`` array; ``perspectives`` / ``modulations`` are
    float32 ``[T, 2]`` or None. Raises ``ValueError`` naming the file, row, clip_id and expected vs. actual
    value for any violation of the contract, or if the file changed since :func:`list_shards`.
    """
    where = shard.file_url
    try:
        fs, _ = storage.filesystem(shard.url, storage_options)
    except Exception as e:
        raise FileNotFoundError(f"cannot reach stimulus dataset {storage.redact_url(shard.url)}: {e}") from None
    n = shard.num_clips
    if n == 0:
        return []
    with storage.open_parquet(fs, shard.path, where) as pf:
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
        try:
            table = pf.read_row_groups(groups, columns=_SMALL + ["frames"] + optional)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{where}: cannot read parquet data ({e})") from None
    table = table.slice(shard.row_start - first, n)
    ids, nframes = _check_small(table, where, shard.row_start)
    if tuple(ids) != shard.clip_ids:
        raise ValueError(
            f"{where} rows [{shard.row_start}, {shard.row_stop}): clip ids {ids} differ from the listed "
            f"{list(shard.clip_ids)}; the file changed since it was listed"
        )
    heights = table.column("height").to_numpy()
    widths = table.column("width").to_numpy()
    extra = {name: _float_rows(table.column(name), name, nframes, ids, where, shard.row_start) for name in optional}
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
            )
        )
    return clips
