"""Recorded responses with repeats (the original package's evaluation layout) as a job's source and reducer.

Layout, on any fsspec URL: one folder per scan, named ``<session>-<scan_idx>``, holding::

    stimuli/<video>/<repeat>.npy        uint8 [T, H, W, 1] (or [T, H, W])   the frames shown
    perspectives/<video>/<repeat>.npy   float [T, 2]                          eye position (optional)
    modulations/<video>/<repeat>.npy    float [T, 2]                          pupil, treadmill (optional)
    units/<video>/<repeat>.npy          float [T, U]                          recorded responses, readout order,
                                                                               NaN where a unit was not recorded

``stimuli`` and ``units`` are required for every repeat; ``perspectives`` / ``modulations`` are either given for
every repeat of the scan or for none (the model then gets zeros, like ``predict``). Values: NaN in ``units``
means "not recorded" (that unit, that frame); ``inf`` in ``units`` is refused; a non-finite eye position or
behaviour value is refused (one NaN input frame makes every later prediction of the repeat NaN), unless
imputed (:data:`IMPUTE_RULE`). All arrays of a repeat have
the same ``T``, and every repeat of a video has the same ``T``. Names starting with ``_`` or ``.`` are skipped;
other files than ``.npy`` are ignored. Repeats sort by name (numerically when the names are numbers); the r-th
repeat of every video forms repeat ``r`` of the concatenated recording (``shared/IN_SILICO.md`` §4: a video
with fewer repeats is padded with NaN).

* :func:`scan_folders` / :func:`list_scan`: the driver's listing (a listing plus the ``.npy`` headers, never
  whole arrays): every check that can be made before Ray starts, each failure one line naming the file;
* :func:`check_values`: the driver's pass over the values (non-finite inputs, ``inf`` responses), file and
  frame named, before Ray starts;
* :class:`VideoRepeats`: a work item's part, the repeats of one video of one scan;
* :class:`RecordingSource`: the repeats as :class:`fnn_ray.stimuli.Clip` s (``clip_id`` ``"<video>/<repeat>"``),
  each with its own eye and behaviour inputs;
* :class:`RepeatsReducer`: reads the recorded ``units`` of the same repeats on the worker and commits the
  additive correlation statistics per unit (:func:`fnn_ray.analysis.performance.cc_stats`), so per-frame
  predictions never leave the worker; :func:`stats_table` / :func:`read_stats` are its file format;
* :func:`write_repeat`: write one repeat in this layout (synthetic recordings, tests).
"""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from fsspec import AbstractFileSystem

from fnn_ray import storage
from fnn_ray.importers import read_npy_header
from fnn_ray.plan import Scan, WorkItem
from fnn_ray.reducers import Reducer, Units
from fnn_ray.sources import Source
from fnn_ray.stimuli import Clip

__all__ = ["IMPUTE_RULE", "KINDS", "RecordingSource", "RepeatsReducer", "VideoRepeats", "check_values", "impute_inputs",
           "list_scan", "load_npy", "natural_key", "npy_bytes", "npy_header", "read_npy_headers", "read_stats",
           "scan_folders", "stats_table", "write_repeat"]


#: The array kinds of a repeat, in the order they are checked.
KINDS = ("stimuli", "perspectives", "modulations", "units")
_OPTIONAL = ("perspectives", "modulations")
_SCAN_NAME = re.compile(r"^(\d+)-(\d+)$")
#: How ``--impute`` fills non-finite eye positions and behaviour (recorded in the output's metadata).
IMPUTE_RULE = ("per repeat and column: linear interpolation in time between the nearest finite frames; before "
               "the first / after the last finite frame: that frame's value; a column without any finite value: 0 "
               "(the model's input when the array is absent)")
#: Bytes read from the start of each ``.npy`` file to find its header (more when a header is longer).
_HEADER_BYTES = 1024


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def natural_key(name: str) -> tuple[int, int, str]:
    """Sort key: numeric names in numeric order first, then the others by name."""
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def _part_name(video: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]", "_", video)


# ------------------------------------------------------------------------------------------------- the part
@dataclass(frozen=True)
class VideoRepeats:
    """The recorded repeats of one video of one scan: a work item's part (:class:`fnn_ray.plan.Part`).

    ``url``: the scan's folder; ``repeats``: the repeat names in order; ``num_frames``: ``T`` of every repeat;
    ``frames``: ``T`` x repeats; ``perspectives`` / ``modulations``: whether those arrays exist.
    """

    url: str
    video: str
    repeats: tuple[str, ...]
    num_frames: int
    perspectives: bool = True
    modulations: bool = True

    @property
    def part_id(self) -> str:
        """``video-<name>`` (characters that are not filename-safe replaced by ``_``)."""
        return f"video-{_part_name(self.video)}"

    @property
    def frames(self) -> int:
        return self.num_frames * len(self.repeats)

    @property
    def where(self) -> str:
        """The scan's folder URL (credentials redacted)."""
        return storage.redact_url(self.url)

    def file(self, kind: str, repeat: str) -> str:
        """The URL of one array (``kind`` in :data:`KINDS`)."""
        return storage.join(self.url, kind, self.video, f"{repeat}.npy")

    def clip_id(self, repeat: str) -> str:
        return f"{self.video}/{repeat}"


# ------------------------------------------------------------------------------------------------- npy files
def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_header(data: bytes, where: str) -> tuple[tuple[int, ...], np.dtype, int] | int:
    """``(shape, dtype, data offset)`` of a ``.npy`` file from its first bytes, or the number of bytes needed
    when ``data`` is too short. ValueError naming ``where`` for anything that is not a plain ``.npy`` array."""
    fmt = np.lib.format
    if len(data) < 10 or data[:6] != fmt.MAGIC_PREFIX:
        raise ValueError(f"{where}: not a .npy file")
    major = data[6]
    size_bytes = {1: 2, 2: 4, 3: 4}.get(major)
    if size_bytes is None:
        raise ValueError(f"{where}: unsupported .npy format version {major}.{data[7]}")
    needed = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    if len(data) < needed:
        return needed
    shape, dtype, _ = read_npy_header(io.BytesIO(data[:needed]), where)
    if dtype.hasobject:
        raise ValueError(f"{where}: holds Python objects ({dtype}); expected a numeric array")
    return tuple(int(n) for n in shape), dtype, needed


def load_npy(data: bytes, where: str) -> np.ndarray:
    """A ``.npy`` file's array (never unpickled)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{where}: cannot read the .npy array ({e})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{where}: not a .npy array (a {type(array).__name__})")
    return array


def _check(kind: str, shape: tuple[int, ...], dtype: np.dtype, units: int, where: str) -> int:
    """Check one array's dtype and shape for its kind; return its ``T``."""
    if kind == "stimuli":
        if dtype != np.uint8:
            raise ValueError(f"{where}: stimuli must be uint8, got {dtype}")
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape) < 1:
            raise ValueError(f"{where}: stimuli must be [T, H, W, 1] or [T, H, W], got {list(shape)}")
    else:
        width = units if kind == "units" else 2
        name = "U" if kind == "units" else "2"
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"{where}: {kind} must be a float array, got {dtype}")
        if len(shape) != 2 or shape[1] != width or shape[0] < 1:
            raise ValueError(f"{where}: {kind} must be [T, {name}] = [T, {width}], got {list(shape)}")
    return shape[0]


# ------------------------------------------------------------------------------------------------- listing
def scan_folders(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[Scan, str]:
    """The scan folders under the recordings ``url``: ``{(session, scan_idx): folder URL}`` in scan order.

    FileNotFoundError when ``url`` is missing or holds no scan folder; ValueError naming a folder whose name is
    not ``<session>-<scan_idx>``.
    """
    shown = storage.redact_url(url)
    fs, root = storage.filesystem(url, storage_options)
    try:
        fs.invalidate_cache(root)
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"recordings not found: {shown}") from None
    folders: dict[Scan, str] = {}
    for entry in entries:
        name = posixpath.basename(entry["name"].rstrip("/"))
        if entry.get("type") != "directory" or _hidden(name):
            continue
        match = _SCAN_NAME.match(name)
        if match is None:
            raise ValueError(f"{storage.join(shown, name)}: a recordings folder must be named "
                             f"<session>-<scan_idx>, e.g. 8-5")
        folders[(int(match.group(1)), int(match.group(2)))] = storage.join(url, name)
    if not folders:
        raise FileNotFoundError(f"recordings {shown} hold no <session>-<scan_idx> folder")
    return dict(sorted(folders.items()))


def _npy_files(fs: AbstractFileSystem, root: str, shown: str) -> dict[str, dict[str, dict[str, tuple[str, int]]]]:
    """``{kind: {video: {repeat: (path, size)}}}`` of the ``.npy`` files under a scan folder."""
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"recordings folder not found: {shown}") from None
    files: dict[str, dict[str, dict[str, tuple[str, int]]]] = {kind: {} for kind in KINDS}
    for path, info in sorted(found.items()):
        rel = path[len(root):].strip("/")
        parts = rel.split("/")
        if not rel.endswith(".npy") or any(_hidden(p) for p in parts):
            continue
        if len(parts) != 3 or parts[0] not in KINDS:
            raise ValueError(f"{storage.join(shown, rel)}: unexpected file; expected "
                             f"{{{', '.join(KINDS)}}}/<video>/<repeat>.npy")
        kind, video, name = parts
        files[kind].setdefault(video, {})[name[: -len(".npy")]] = (path, int(info.get("size") or 0))
    return files


def _repeats(files: Mapping[str, Mapping[str, Mapping[str, Any]]], shown: str) -> list[tuple[str, str]]:
    """The ``(video, repeat)`` pairs of a scan folder, after checking that every repeat has ``stimuli`` and
    ``units`` and, when the scan has any, ``perspectives`` / ``modulations``."""
    repeats = {(video, r) for video, named in files["stimuli"].items() for r in named}
    for kind in KINDS[1:]:
        have = {(video, r) for video, named in files[kind].items() for r in named}
        if kind in _OPTIONAL and not have:
            continue
        for video, repeat in sorted(repeats ^ have)[:1]:
            lacking, having = (kind, "stimuli") if (video, repeat) in repeats else ("stimuli", kind)
            raise ValueError(f"{storage.join(shown, lacking, video, repeat + '.npy')} is missing "
                             f"({storage.join(shown, having, video, repeat + '.npy')} exists)")
    if not repeats:
        raise FileNotFoundError(f"recordings folder {shown} holds no stimuli/<video>/<repeat>.npy files")
    return sorted(repeats, key=lambda vr: (natural_key(vr[0]), natural_key(vr[1])))


def list_scan(url: str, units: int, burnin: int = 0,
              storage_options: Mapping[str, Any] | None = None) -> list[VideoRepeats]:
    """List and check the recordings of one scan folder (``units``: the scan's unit count in the release);
    return one part per video, videos in name order.

    Reads the listing and each ``.npy`` header (never whole arrays). ValueError / FileNotFoundError naming the
    file: a missing array of a repeat, a wrong dtype or shape (stimuli not uint8, ``units`` not ``[T, units]``),
    arrays of a repeat that disagree in length, repeats of a video that differ in length, a video of at most
    ``burnin`` frames, a file shorter or longer than its header says.
    """
    shown = storage.redact_url(url)
    fs, root = storage.filesystem(url, storage_options)
    root = root.rstrip("/")
    files = _npy_files(fs, root, shown)
    repeats = _repeats(files, shown)
    kinds = [kind for kind in KINDS if files[kind]]
    keys = [(kind, video, repeat) for kind in kinds for video, repeat in repeats]
    headers = read_npy_headers(fs, [files[k][v][r][0] for k, v, r in keys],
                               [storage.join(shown, k, v, f"{r}.npy") for k, v, r in keys])
    frames: dict[tuple[str, str], dict[str, int]] = {}
    for (kind, video, repeat), (shape, dtype, offset) in zip(keys, headers):
        where = storage.join(shown, kind, video, f"{repeat}.npy")
        size, expected = files[kind][video][repeat][1], offset + int(np.prod(shape)) * dtype.itemsize
        if size != expected:
            raise ValueError(f"{where}: {size} bytes, its header ({dtype} {list(shape)}) needs {expected}: "
                             f"truncated or corrupt")
        frames.setdefault((video, repeat), {})[kind] = _check(kind, shape, dtype, units, where)
    parts: dict[str, VideoRepeats] = {}
    for video, repeat in repeats:
        length = frames[(video, repeat)]["stimuli"]
        stimuli = storage.join(shown, "stimuli", video, f"{repeat}.npy")
        for kind, count in frames[(video, repeat)].items():
            if count != length:
                raise ValueError(f"{storage.join(shown, kind, video, repeat + '.npy')}: {count} frames, but "
                                 f"{stimuli} has {length}: the arrays of a repeat must have the same length")
        part = parts.get(video)
        if part is None:
            if length <= burnin:
                raise ValueError(f"{stimuli}: {length} frames, not more than the {burnin} burn-in frames")
            part = VideoRepeats(url, video, (), length, perspectives="perspectives" in kinds,
                                modulations="modulations" in kinds)
        elif length != part.num_frames:
            raise ValueError(f"{stimuli}: {length} frames, but repeat {part.repeats[0]!r} of video {video!r} has "
                             f"{part.num_frames}: the repeats of a video must have the same length")
        parts[video] = dataclasses.replace(part, repeats=(*part.repeats, repeat))
    ids: dict[str, str] = {}
    for part in parts.values():
        if part.part_id in ids:
            raise ValueError(f"{shown}: videos {ids[part.part_id]!r} and {part.video!r} both make the part id "
                             f"{part.part_id!r}; rename one")
        ids[part.part_id] = part.video
    return list(parts.values())


def read_npy_headers(fs: AbstractFileSystem, paths: list[str], names: list[str]
                     ) -> list[tuple[tuple[int, ...], np.dtype, int]]:
    """The ``.npy`` headers of ``paths`` (ranged reads of their first bytes; ``names`` name them in errors)."""
    if not paths:
        return []
    starts = fs.cat_ranges(paths, [0] * len(paths), [_HEADER_BYTES] * len(paths), on_error="raise")
    out = []
    for path, where, data in zip(paths, names, starts):
        header = npy_header(bytes(data), where)
        if isinstance(header, int):  # a long header: read as much as it says it needs
            header = npy_header(bytes(fs.cat_file(path, start=0, end=header)), where)
            if isinstance(header, int):
                raise ValueError(f"{where}: truncated .npy header")
        out.append(header)
    return out


# ------------------------------------------------------------------------------------------------- writing
def write_repeat(url: str, video: str, repeat: str, stimuli: np.ndarray, units: np.ndarray,
                 perspectives: np.ndarray | None = None, modulations: np.ndarray | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
    """Write one repeat into the scan folder ``url``: ``stimuli`` uint8 ``[T, H, W]`` (stored as ``[T, H, W, 1]``,
    like the original layout) or ``[T, H, W, 1]``, ``units`` ``[T, U]``, optional ``perspectives`` /
    ``modulations`` ``[T, 2]`` (stored as float32)."""
    fs, root = storage.filesystem(url, storage_options)
    frames = np.asarray(stimuli)
    arrays = {"stimuli": frames[..., None] if frames.ndim == 3 else frames, "perspectives": perspectives,
              "modulations": modulations, "units": units}
    for kind, array in arrays.items():
        if array is None:
            continue
        data = array if kind == "stimuli" else np.asarray(array, np.float32)
        fs.makedirs(posixpath.join(root, kind, video), exist_ok=True)
        fs.pipe_file(posixpath.join(root, kind, video, f"{repeat}.npy"), npy_bytes(data))


# ------------------------------------------------------------------------------------------------- values
def impute_inputs(array: np.ndarray) -> np.ndarray:
    """``array [T, C]`` (eye positions or behaviour) with its non-finite values filled by :data:`IMPUTE_RULE`."""
    out = np.array(array, dtype=np.float32)
    frames = np.arange(out.shape[0])
    for column in out.T:  # views: filled in place
        good = np.isfinite(column)
        column[~good] = np.interp(frames[~good], frames[good], column[good]) if good.any() else 0.0
    return out


def _values(array: np.ndarray, kind: str, where: str, impute: bool) -> int:
    """Check the values of one array of ``kind``: ValueError naming ``where`` and the frame for ``inf`` in
    ``units`` and, unless ``impute``, a non-finite eye position or behaviour value. Returns the number of frames
    that ``impute_inputs`` fills (0 for other kinds)."""
    if kind == "units":
        bad = np.isinf(array)
        if bad.any():
            frame, column = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{where}: frame {frame}, unit column {column} is {array[frame, column]}: responses "
                             f"must be finite or NaN (not recorded)")
    elif kind in _OPTIONAL:
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any() and not impute:
            frame = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}: frame {frame} is {array[frame].tolist()} ({int(bad.sum())} non-finite "
                             f"frame(s) of {len(bad)}); the model cannot take NaN {kind}: fix the file or pass "
                             f"--impute")
        return int(bad.sum())
    return 0


def check_values(parts: Iterable[VideoRepeats], impute: bool = False,
                 storage_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Read every ``perspectives``, ``modulations`` and ``units`` array of ``parts`` (one at a time) and check its
    values (ValueError naming the file and frame, see :func:`_values`). Returns the number of frames with a
    non-finite value per kind (``perspectives``, ``modulations``: the frames ``impute`` fills)."""
    counts = {kind: 0 for kind in _OPTIONAL}
    for part in parts:
        kinds = [k for k in _OPTIONAL if getattr(part, k)] + ["units"]
        fs, root = storage.filesystem(part.url, storage_options)
        for kind in kinds:
            for repeat in part.repeats:
                where = storage.redact_url(part.file(kind, repeat))
                array = load_npy(fs.cat_file(posixpath.join(root, kind, part.video, f"{repeat}.npy")), where)
                counts[kind] = counts.get(kind, 0) + _values(array, kind, where, impute)
    return {kind: n for kind, n in counts.items() if kind in _OPTIONAL}


# ------------------------------------------------------------------------------------------------- reading
def _read_arrays(part: VideoRepeats, kinds: Sequence[str], storage_options: Mapping[str, Any] | None,
                 stats: dict[str, float] | None = None) -> dict[tuple[str, str], np.ndarray]:
    """``{(kind, repeat): array}`` for every repeat of ``part`` (all files fetched concurrently)."""
    fs, root = storage.filesystem(part.url, storage_options)
    wanted = {(kind, r): posixpath.join(root, kind, part.video, f"{r}.npy") for kind in kinds for r in part.repeats}
    try:
        data = fs.cat(list(wanted.values()), on_error="raise")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{storage.redact_url(str(e))}: missing (it was listed when the job was planned)") \
            from None
    out = {}
    for (kind, repeat), path in wanted.items():
        where = storage.redact_url(part.file(kind, repeat))
        array = load_npy(data[path], where)
        if stats is not None:
            stats["bytes_read"] = stats.get("bytes_read", 0) + len(data[path])
        out[(kind, repeat)] = array
    return out


def _checked(array: np.ndarray, kind: str, part: VideoRepeats, repeat: str, units: int,
             impute: bool = False) -> np.ndarray:
    """Check an array read on the worker against the listing (the file may have changed since); eye positions
    and behaviour come back imputed when ``impute``."""
    where = storage.redact_url(part.file(kind, repeat))
    frames = _check(kind, array.shape, array.dtype, units, where)
    if frames != part.num_frames:
        raise ValueError(f"{where}: {frames} frames, {part.num_frames} when the job was planned (the file changed)")
    if _values(array, kind, where, impute):
        return impute_inputs(array)
    return array


@dataclass(frozen=True)
class RecordingSource(Source):
    """The repeats of a :class:`VideoRepeats` part as clips ``"<video>/<repeat>"`` (frames uint8 ``[T, H, W]``,
    perspectives / modulations float32 ``[T, 2]`` or None; non-finite ones filled by :data:`IMPUTE_RULE` when
    ``impute``, refused otherwise)."""

    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    impute: bool = False

    def read(self, item: WorkItem, stats: dict[str, float] | None = None) -> list[Clip]:
        part: VideoRepeats = item.part  # type: ignore[assignment]
        kinds = ["stimuli"] + [k for k in _OPTIONAL if getattr(part, k)]
        arrays = _read_arrays(part, kinds, self.storage_options, stats)
        clips = []
        for repeat in part.repeats:
            frames = _checked(arrays[("stimuli", repeat)], "stimuli", part, repeat, item.units)
            frames = np.ascontiguousarray(frames.reshape(frames.shape[:3]))
            extra = {k: np.ascontiguousarray(_checked(arrays[(k, repeat)], k, part, repeat, item.units, self.impute),
                                             np.float32)
                     for k in kinds[1:]}
            if stats is not None:
                stats["frame_bytes"] = stats.get("frame_bytes", 0) + frames.nbytes
            clips.append(Clip(part.clip_id(repeat), frames, extra.get("perspectives"), extra.get("modulations")))
        return clips


# ------------------------------------------------------------------------------------------------- reducing
def stats_table(units: Units, stats: Mapping[str, np.ndarray]) -> pa.Table:
    """One row per unit: ``unit_id``, ``readout_id`` and each statistic of ``stats`` (float arrays ``[U]`` or
    ``[R, U]`` over the model's readout columns, as :func:`fnn_ray.analysis.performance.cc_stats` returns them):
    ``[U]`` as a float64 column, ``[R, U]`` as a list<float64>[R] column; the shapes are in the schema metadata
    ``shapes``."""
    columns: dict[str, pa.Array] = {"unit_id": pa.array(units.unit_ids.astype(np.int64)),
                                    "readout_id": pa.array(units.readout_ids.astype(np.int32))}
    shapes = {}
    for name, value in stats.items():
        per_unit = np.moveaxis(np.asarray(value, np.float64), -1, 0)[units.readout_ids]  # [U, ...], table order
        shapes[name] = list(per_unit.shape[1:])
        columns[name] = (pa.array(per_unit) if per_unit.ndim == 1 else
                         pa.FixedSizeListArray.from_arrays(pa.array(per_unit.reshape(-1)),
                                                           int(np.prod(per_unit.shape[1:]))))
    return pa.table(columns).replace_schema_metadata({"shapes": json.dumps(shapes)})


def read_stats(table: pa.Table) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Inverse of :func:`stats_table`: ``(unit_ids [U], readout_ids [U], {name: array [U] or [R, U]})``, units in
    the table's row order."""
    shapes = json.loads((table.schema.metadata or {}).get(b"shapes", b"{}"))
    stats = {}
    for name, shape in shapes.items():
        column = table.column(name).combine_chunks()
        if shape:
            column = column.flatten()
        values = column.to_numpy(zero_copy_only=False).reshape(table.num_rows, *shape)
        stats[name] = np.moveaxis(values, 0, -1)
    return table.column("unit_id").to_numpy(), table.column("readout_id").to_numpy(), stats


@dataclass(frozen=True)
class RepeatsReducer(Reducer):
    """Additive correlation statistics per unit for the repeats of one video (``burnin`` frames of every repeat
    dropped). Reads the recorded ``units`` arrays of the item's repeats itself (store faults are ridden out for
    ``store_timeout_s``), checks their shapes, and commits :func:`stats_table` of
    :func:`fnn_ray.analysis.performance.cc_stats` of ``recorded`` and ``predicted`` ``[R, T, U]``."""

    burnin: int = 10
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    store_timeout_s: float = 300.0
    data_dir: str = "_partials/performance"

    def reduce(self, item: WorkItem, units: Units, results: Iterable[tuple[Clip, np.ndarray]]) -> pa.Table:
        from fnn_ray.analysis.performance import cc_stats

        part: VideoRepeats = item.part  # type: ignore[assignment]
        predicted = {clip.clip_id: response for clip, response in results}
        arrays = storage.retry(_read_arrays, part, ["units"], self.storage_options, budget_s=self.store_timeout_s,
                               what=f"reading the recorded units of {part.where} video {part.video!r}")
        recorded = np.stack([_checked(arrays[("units", r)], "units", part, r, item.units) for r in part.repeats])
        missing = [part.clip_id(r) for r in part.repeats if part.clip_id(r) not in predicted]
        if missing:
            raise ValueError(f"{part.where}: no prediction for {missing[0]}")
        model = np.stack([predicted[part.clip_id(r)] for r in part.repeats])
        if model.shape != recorded.shape:
            raise ValueError(f"{part.where} video {part.video!r}: predictions {list(model.shape)} and recordings "
                             f"{list(recorded.shape)} differ in shape")
        table = stats_table(units, cc_stats(recorded, model, self.burnin))
        metadata = dict(table.schema.metadata or {})
        metadata[b"repeats"] = json.dumps({"video": part.video, "repeats": list(part.repeats)}).encode()
        return table.replace_schema_metadata(metadata)
