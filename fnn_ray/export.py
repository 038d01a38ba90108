"""Export to the published MICrONS layout (shared/IN_SILICO.md section 5): a sweep's responses as one array, and
the readout (unit features and positions) of a release.

    export_responses("s3://b/run1", "s3://b/properties")   # -> properties/responses/{responses.npy, units.csv,
                                                           #    metadata.csv}
    export_readout("s3://b/release", "s3://b/properties")  # -> properties/readout/{readout_weights.npy,
                                                           #    readout_locations.npy, units.csv}

``responses/responses.npy`` is float32 ``[units, frames]``: rows are the rows of ``responses/units.csv`` (session,
scan_idx, unit_id, readout_id; scans in the sweep's order, each scan's units by readout_id), columns the stimulus
dataset's frames (clips in dataset order, each without its context frames, concatenated). ``metadata.csv`` has one
row per scan: session, scan_idx, sampling_frequency, stimulus_height, stimulus_width, burnin_frames, frames (the
published columns), then ``stimulus`` (``stimulus.npy`` when it was exported, else the stimulus dataset's URL)
and ``clip_table`` (``clips.csv``). ``clips.csv`` has one row per clip, in column order: ``clip_id``, ``start`` /
``stop`` (its columns ``[start, stop)`` of the array), ``context_frames`` (movie frames run before ``start`` from
the model's reset, not exported) and ``burnin_frames``: how many of its first frames lie within ``burnin_frames``
of that reset (``max(0, burnin_frames - context_frames)``; the first clip of a movie, which has no context, is
all burn-in there, as every trial of the public per-trial regime). With ``stimulus=True``,
``responses/stimulus.npy`` uint8 ``[frames, H, W]`` holds the frame of every column (written clip by clip).
An export is never written over another: ``<to>/responses/`` (or ``readout/``) holding files is refused unless
``overwrite=True`` (then the new files replace them, and files of the old export that the new one lacks go).

Bounded memory, however large the array (the full MICrONS table is 31 GB): the ``.npy`` file is created with its
header (sparse) and filled through memory maps, each opened for the rows of one clip in one record batch
(``BATCH_ROWS`` rows of a part file) and closed after them, so only the pages those rows touch are ever resident;
part files are read batch by batch, in plan order (each scan's clips in frame order, so the pages a part leaves
half-written are completed by the next while still cached). Every row is checked against the plan: clip, unit id,
readout id and response length; every (clip, unit) of the scans exported must be written exactly once.

Atomic: nothing is written before the checks pass (a sweep with uncommitted items is refused, naming them). The
files are built in a working directory (``<to>/_staging/<id>/`` for a local ``to``, so the array is written once
on its own disk; for a remote ``to`` a local temporary directory, ``work_dir`` or ``$TMPDIR``, which must hold the
array) and moved into place only when all are complete (locally ``os.replace``; remotely each file is uploaded to
``<to>/_staging/`` first and then moved, a server-side copy on S3). On failure the working files are removed, and
a local ``to`` this call created is removed too. Each file appears whole; the files of one export are moved one
after the other, so a reader racing the final moves may see a new file next to an old one.
"""

from __future__ import annotations

import itertools
import mmap
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fnn_ray import preflight, storage
from fnn_ray.ledger import Commit, Ledger
from fnn_ray.manifest import Manifest
from fnn_ray.outputs import committed
from fnn_ray.plan import Key, Scan
from fnn_ray.responses import RESPONSES_DIR
from fnn_ray.stimuli import Shard, dataset_files, list_shards, read_shard, regroup

__all__ = [
    "BURNIN_FRAMES",
    "READOUT_DIR",
    "RESPONSES_EXPORT_DIR",
    "SAMPLING_FREQUENCY",
    "ExportResult",
    "export_readout",
    "export_responses",
]


#: Folders of the published layout under the export URL.
RESPONSES_EXPORT_DIR = "responses"
READOUT_DIR = "readout"
#: ``metadata.csv`` defaults (IN_SILICO.md sections 1 and 5).
SAMPLING_FREQUENCY = 30.0
BURNIN_FRAMES = 10
#: Rows (clip x unit) per record batch read from a part file: a batch and the pages it maps stay a few MB.
BATCH_ROWS = 4096
#: Read buffer of a part file: its column chunks stream through it instead of being read whole.
READ_BUFFER = 1 << 22


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``files`` (URLs, credentials redacted), ``shape`` of its main array, ``scans`` in row
    order, ``seconds`` it took."""

    files: tuple[str, ...]
    shape: tuple[int, int]
    scans: tuple[Scan, ...]
    seconds: float

    def __str__(self) -> str:
        units, columns = self.shape
        gb = units * columns * 4 / 1e9
        names = ", ".join(posixpath.basename(f) for f in self.files)
        folder = posixpath.dirname(self.files[0]) if self.files else ""
        return (f"exported {len(self.scans)} scan(s), array [{units}, {columns}] float32 ({gb:.3g} GB) in "
                f"{self.seconds:.1f} s: {names} in {folder}")


# ------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class _Clips:
    """The stimulus dataset as the export sees it: one-clip shards in dataset order, each clip's first column
    ``start``, response length ``length`` (num_frames - context_frames) and ``context`` frames, and the frame
    size."""

    shards: list[Shard]
    start: dict[str, int]
    length: dict[str, int]
    context: dict[str, int]
    height: int
    width: int

    @property
    def frames(self) -> int:
        return sum(self.length.values())


def _read_clips(url: str, storage_options: Mapping[str, Any] | None) -> _Clips:
    """List the stimulus dataset (:func:`list_shards`, one clip per shard) and read each clip's context frames and
    size from the small columns (exact byte ranges, never the frames). ValueError when the frame size varies."""
    shards = list_shards(url, 1, storage_options)
    fs, files = dataset_files(url, storage_options)
    context: dict[str, int] = {}
    sizes: dict[tuple[int, int], str] = {}
    for path, _ in files:
        with fs.open(path, "rb", cache_type="none") as f:
            pf = pq.ParquetFile(f, pre_buffer=True)
            columns = ["clip_id", "height", "width"] + [c for c in ["context_frames"] if c in pf.schema_arrow.names]
            table = pf.read(columns=columns).to_pydict()
        given = table.get("context_frames", [0] * len(table["clip_id"]))
        for clip_id, height, width, c in zip(table["clip_id"], table["height"], table["width"], given):
            context[clip_id] = int(c or 0)
            sizes.setdefault((int(height), int(width)), clip_id)
    if len(sizes) > 1:
        (a, first), (b, second) = list(sizes.items())[:2]
        raise ValueError(f"stimulus dataset {storage.redact_url(url)}: clips {first!r} and {second!r} differ in "
                         f"frame size ({a[0]}x{a[1]} vs {b[0]}x{b[1]}); the published layout holds one size")
    start: dict[str, int] = {}
    length: dict[str, int] = {}
    column = 0
    for shard in shards:
        clip_id = shard.clip_ids[0]
        if clip_id not in context:
            raise ValueError(f"stimulus dataset {storage.redact_url(url)} changed while it was read "
                             f"(clip {clip_id!r} is gone)")
        start[clip_id], length[clip_id] = column, shard.frames - context[clip_id]
        column += length[clip_id]
    (height, width), = sizes
    return _Clips(shards, start, length, context, height, width)


@dataclass(frozen=True)
class _Plan:
    """What an export of a sweep reads: ``scans`` (in the sweep's order) with their ``units``, the stimulus
    ``clips``, the sweep's ``parts`` (its items per scan, in plan order) and every item's ``commits``."""

    scans: list[Scan]
    units: dict[Scan, int]
    stimuli_url: str
    clips: _Clips
    parts: list[Shard]
    commits: dict[Key, Commit]


def _plan(output_url: str, scans: Sequence[Scan] | None, stimuli_url: str | None,
          storage_options: Mapping[str, Any] | None) -> _Plan:
    """Check the sweep at ``output_url`` and plan its export; ValueError / FileNotFoundError (one line) when it is
    not a sweep, a scan is not in it, its stimuli changed or a planned item of ``scans`` is not committed."""
    shown = storage.redact_url(output_url)
    manifest = Manifest.load(output_url, storage_options)
    if manifest is None:
        raise FileNotFoundError(f"{shown}: no manifest.json (not the output of a sweep)")
    if manifest.job != "sweep":
        raise ValueError(f"{shown}: manifest.json is of a {manifest.job!r} job, expected a 'sweep'")
    unknown = [f"{s}-{i}" for s, i in scans or [] if (s, i) not in manifest.scans]
    if unknown:
        have = ", ".join(f"{s}-{i}" for s, i in manifest.scans)
        raise ValueError(f"scan(s) {', '.join(unknown)} not in the sweep at {shown}; it has {have}")
    chosen = [scan for scan in manifest.scans if scans is None or scan in set(scans)]
    stimuli = stimuli_url or manifest.inputs.get("stimuli")
    clips_per_shard = manifest.config.get("clips_per_shard")
    if not stimuli or not clips_per_shard:
        raise ValueError(f"{shown}: manifest.json lacks inputs.stimuli or config.clips_per_shard")
    clips = _read_clips(stimuli, storage_options)
    parts = regroup(clips.shards, int(clips_per_shard))  # the sweep's items, as plan_sweep made them
    if len(parts) * len(manifest.scans) != manifest.items_total:
        raise ValueError(f"stimulus dataset {storage.redact_url(stimuli)} gives {len(parts)} part(s) per scan, "
                         f"but the sweep planned {manifest.items_total} items for {len(manifest.scans)} scan(s): "
                         f"was it changed?")
    planned = [(s, i, part.shard_id) for s, i in chosen for part in parts]
    found = committed(Ledger(output_url, storage_options), RESPONSES_DIR, planned, "sweep")
    commits = {commit.key: commit for commit in found}
    return _Plan(chosen, manifest.units_per_scan, stimuli, clips, parts, commits)


# ------------------------------------------------------------------------------------------- writing
class _Npy:
    """A float32 C-order ``.npy`` file ``[rows, columns]`` at a local ``path``, written block by block, each block
    through its own memory map of just its rows, closed after it: only the pages a block touches become resident
    (read-around is switched off: on large-folio filesystems, e.g. ext4 on Linux 6.x, a fault would otherwise map
    ~150 KB around every touched row)."""

    def __init__(self, path: str, shape: tuple[int, int]) -> None:
        created = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        self.path, self.shape, self.offset = path, shape, created.offset
        del created

    def write(self, rows: np.ndarray, start: int, values: np.ndarray) -> None:
        """``array[rows, start:start + k] = values`` (``values`` ``[len(rows), k]``; ``rows`` int, ascending)."""
        low, high = int(rows[0]), int(rows[-1])
        row_bytes = self.shape[1] * 4
        begin = self.offset + low * row_bytes
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "r+b") as f:
            mapped = mmap.mmap(f.fileno(), begin - aligned + (high - low + 1) * row_bytes, offset=aligned)
        try:
            if hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_RANDOM)
            block = np.ndarray((high - low + 1, self.shape[1]), np.float32, buffer=mapped, offset=begin - aligned)
            columns = slice(start, start + values.shape[1])
            if high - low + 1 == len(rows):
                block[:, columns] = values
            else:
                block[rows - low, columns] = values
            del block
        finally:
            mapped.close()


@contextmanager
def _publish(to_url: str, folder: str, storage_options: Mapping[str, Any] | None,
             work_dir: str | None, overwrite: bool = False) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(local working directory, urls)``: files built there move to ``<to>/<folder>/`` when the block
    ends without error (their URLs appended to ``urls``); on error nothing is left at ``to``. ValueError before
    anything is written when ``<to>/<folder>/`` holds files, unless ``overwrite`` (then files the new export
    lacks are removed after the new ones are in place)."""
    fs, root = storage.filesystem(to_url, storage_options)
    target = posixpath.join(root, folder)
    old = sorted(p for p in fs.find(target) if not posixpath.basename(p).startswith(".")) \
        if fs.isdir(target) else []
    if old and not overwrite:
        raise ValueError(f"{storage.redact_url(storage.join(to_url, folder))} already holds an export "
                         f"({', '.join(posixpath.basename(p) for p in old[:4])}{', ...' if len(old) > 4 else ''}): "
                         f"pass --overwrite to replace it, or export to another --to")
    local = storage.is_local(fs)
    token = f"export-{uuid.uuid4().hex[:12]}"
    created = local and not os.path.exists(root)
    staging = posixpath.join(root, storage.STAGING_DIR)
    work = posixpath.join(staging, token) if local else tempfile.mkdtemp(prefix=f"fnn-{token}-", dir=work_dir)
    if local:
        os.makedirs(work)
    urls: list[str] = []
    staged: list[str] = []
    try:
        yield work, urls
        names = sorted(os.listdir(work))
        if local:
            os.makedirs(target, exist_ok=True)
            for name in names:
                with open(posixpath.join(work, name), "rb+") as f:
                    os.fsync(f.fileno())  # on disk before it takes the published name
                os.replace(posixpath.join(work, name), posixpath.join(target, name))
        else:
            for name in names:
                staged.append(posixpath.join(staging, f"{token}.{name}"))
                fs.put_file(posixpath.join(work, name), staged[-1])
            for name, stage in zip(names, staged):
                fs.mv(stage, posixpath.join(target, name))
            staged.clear()
            fs.invalidate_cache(target)
        for path in old:  # overwrite: what the new export does not replace must not pass for a part of it
            if posixpath.relpath(path, target) not in names:
                fs.rm_file(path)
        urls.extend(storage.join(to_url, folder, name) for name in names)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for stage in staged:
            try:
                fs.rm_file(stage)
            except FileNotFoundError:
                pass
        if local:
            for empty in (staging, root) if created else (staging,):
                try:
                    os.rmdir(empty)
                except OSError:
                    pass


# ------------------------------------------------------------------------------------------- responses
class _Filler:
    """Copies the rows of one scan's part files into the array, checking each against the plan."""

    def __init__(self, array: _Npy, first_row: int, units: int, clips: _Clips) -> None:
        self.array, self.first_row, self.units, self.clips = array, first_row, units, clips
        self.unit_ids = np.full(units, -1, dtype=np.int64)  # from the first part that names each readout_id

    def part(self, fs: Any, path: str, shard: Shard, where: str) -> None:
        """Copy one part file (the item of ``shard``); ValueError naming ``where`` and the clip on a bad row."""
        seen = {clip_id: np.zeros(self.units, dtype=bool) for clip_id in shard.clip_ids}
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f, buffer_size=READ_BUFFER)  # column chunks streamed, not read whole
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["clip_id", "unit_id", "readout_id",
                                                                          "response"]):
                self._batch(batch, seen, where)
        for clip_id, done in seen.items():
            if not done.all():
                raise ValueError(f"{where}: clip {clip_id!r} lacks {int((~done).sum())} of its {self.units} "
                                 f"units (first missing readout_id {int(np.flatnonzero(~done)[0])})")

    def _batch(self, batch: pa.RecordBatch, seen: dict[str, np.ndarray], where: str) -> None:
        clip_ids = batch.column("clip_id").to_numpy(zero_copy_only=False)
        unit_ids = batch.column("unit_id").to_numpy(zero_copy_only=False)
        readout_ids = batch.column("readout_id").to_numpy(zero_copy_only=False)
        responses = batch.column("response")
        if responses.null_count or batch.column("readout_id").null_count or batch.column("unit_id").null_count:
            raise ValueError(f"{where}: null values in unit_id, readout_id or response")
        bounds = np.flatnonzero(np.r_[True, clip_ids[1:] != clip_ids[:-1], True])
        for a, b in itertools.pairwise(bounds):
            self._clip(str(clip_ids[a]), unit_ids[a:b], readout_ids[a:b].astype(np.int64),
                       responses.slice(a, b - a), seen, where)

    def _clip(self, clip_id: str, unit_ids: np.ndarray, readout_ids: np.ndarray, responses: pa.Array,
              seen: dict[str, np.ndarray], where: str) -> None:
        if clip_id not in seen:
            raise ValueError(f"{where}: clip {clip_id!r} is not one of this item's clips {list(seen)}")
        outside = (readout_ids < 0) | (readout_ids >= self.units)
        if outside.any():
            raise ValueError(f"{where}: clip {clip_id!r} has readout_id {int(readout_ids[outside][0])}, expected "
                             f"0..{self.units - 1}")
        if seen[clip_id][readout_ids].any() or len(np.unique(readout_ids)) != len(readout_ids):
            raise ValueError(f"{where}: clip {clip_id!r} has a readout_id twice")
        seen[clip_id][readout_ids] = True
        known = self.unit_ids[readout_ids]
        new = known < 0
        self.unit_ids[readout_ids[new]] = unit_ids[new]
        clash = np.flatnonzero(~new & (known != unit_ids))
        if clash.size:
            r = int(readout_ids[clash[0]])
            raise ValueError(f"{where}: clip {clip_id!r} gives readout_id {r} unit_id {int(unit_ids[clash[0]])}, "
                             f"another part gave {int(self.unit_ids[r])}")
        length, start = self.clips.length[clip_id], self.clips.start[clip_id]
        lengths = responses.value_lengths().to_numpy(zero_copy_only=False)
        if (lengths != length).any():
            bad = int(np.flatnonzero(lengths != length)[0])
            raise ValueError(f"{where}: clip {clip_id!r} readout_id {int(readout_ids[bad])} has {int(lengths[bad])} "
                             f"frames, expected {length} (num_frames - context_frames)")
        values = responses.flatten().to_numpy(zero_copy_only=False).reshape(len(readout_ids), length)
        order = np.argsort(readout_ids, kind="stable")
        self.array.write(self.first_row + readout_ids[order], start, values[order])


def export_responses(
    output_url: str,
    to_url: str,
    scans: Sequence[Scan] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    stimuli_url: str | None = None,
    work_dir: str | None = None,
    sampling_frequency: float = SAMPLING_FREQUENCY,
    burnin_frames: int = BURNIN_FRAMES,
    stimulus: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the responses of the sweep at ``output_url`` (``scans``: default all, in the sweep's order) to
    ``<to_url>/responses/`` (see the module docstring); ``stimuli_url`` overrides the stimulus URL recorded in the
    sweep's manifest; ``stimulus``: also write ``stimulus.npy``; ``overwrite``: replace an export at ``to_url``;
    ``storage_options`` reach every store; ``log`` gets a line per scan.

    ValueError / FileNotFoundError (one line, nothing written) when the output is not a sweep, a scan is not in
    it, some planned item is not committed (naming how many and which), a part file disagrees with the plan, or
    ``<to_url>/responses/`` holds an export and ``overwrite`` is not given.
    """
    began = time.perf_counter()
    plan = _plan(output_url, scans, stimuli_url, storage_options)
    clips = plan.clips
    shape = (sum(plan.units[scan] for scan in plan.scans), clips.frames)
    ledger = Ledger(output_url, storage_options)
    with _publish(to_url, RESPONSES_EXPORT_DIR, storage_options, work_dir, overwrite) as (work, urls):
        array = _Npy(posixpath.join(work, "responses.npy"), shape)
        table: list[pd.DataFrame] = []
        row = 0
        for number, (session, scan_idx) in enumerate(plan.scans, 1):
            filler = _Filler(array, row, plan.units[(session, scan_idx)], clips)
            for part in plan.parts:
                commit = plan.commits[(session, scan_idx, part.shard_id)]
                filler.part(ledger.fs, ledger.path(commit.file), part,
                            storage.redact_url(storage.join(output_url, commit.file)))
            table.append(pd.DataFrame({"session": session, "scan_idx": scan_idx, "unit_id": filler.unit_ids,
                                       "readout_id": np.arange(filler.units)}))
            row += filler.units
            if log:
                log(f"  scan {session}-{scan_idx}: {filler.units} units ({number}/{len(plan.scans)}, "
                    f"{time.perf_counter() - began:.1f} s)")
        pd.concat(table).to_csv(posixpath.join(work, "units.csv"), index=False)
        if stimulus:
            _write_stimulus(posixpath.join(work, "stimulus.npy"), clips, storage_options)
            if log:
                log(f"  stimulus: {clips.frames} frames ({time.perf_counter() - began:.1f} s)")
        pointer = "stimulus.npy" if stimulus else storage.redact_url(plan.stimuli_url)
        pd.DataFrame([{"session": s, "scan_idx": i, "sampling_frequency": float(sampling_frequency),
                       "stimulus_height": clips.height, "stimulus_width": clips.width,
                       "burnin_frames": int(burnin_frames), "frames": clips.frames, "stimulus": pointer,
                       "clip_table": "clips.csv"} for s, i in plan.scans]
                     ).to_csv(posixpath.join(work, "metadata.csv"), index=False)
        _clip_table(clips, burnin_frames).to_csv(posixpath.join(work, "clips.csv"), index=False)
    return ExportResult(tuple(storage.redact_url(u) for u in urls), shape, tuple(plan.scans),
                        time.perf_counter() - began)


def _clip_table(clips: _Clips, burnin_frames: int) -> pd.DataFrame:
    """One row per clip in column order: ``clip_id``, ``start``, ``stop``, ``context_frames``, ``burnin_frames``."""
    ids = [shard.clip_ids[0] for shard in clips.shards]
    start = np.array([clips.start[c] for c in ids], np.int64)
    context = np.array([clips.context[c] for c in ids], np.int64)
    length = np.array([clips.length[c] for c in ids], np.int64)
    return pd.DataFrame({"clip_id": ids, "start": start, "stop": start + length, "context_frames": context,
                         "burnin_frames": np.minimum(length, np.maximum(0, burnin_frames - context))})


def _write_stimulus(path: str, clips: _Clips, storage_options: Mapping[str, Any] | None) -> None:
    """``stimulus.npy`` uint8 ``[frames, H, W]``: every clip's frames without its context, in column order,
    appended one clip at a time (memory holds one clip)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                 "fortran_order": False,
                                                 "shape": (clips.frames, clips.height, clips.width)})
        for shard in clips.shards:
            (clip,) = read_shard(shard, storage_options)
            frames = clip.frames[clip.context_frames:]
            if frames.shape != (clips.length[clip.clip_id], clips.height, clips.width):
                raise ValueError(f"{shard.where}: clip {clip.clip_id!r} changed while it was exported")
            f.write(np.ascontiguousarray(frames).tobytes())


# ------------------------------------------------------------------------------------------- readout
def export_readout(
    release_url: str,
    to_url: str,
    scans: Sequence[Scan] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    work_dir: str | None = None,
    height: int = 144,
    width: int = 256,
    eye: Sequence[float] = (0.0, 0.0),
    overwrite: bool = False,
) -> ExportResult:
    """Export the readout of the release at ``release_url`` to ``<to_url>/readout/``: ``readout_weights.npy``
    float32 ``[units, S*C]`` (row u, column ``s*C + c`` = ``readout.feature.weights.{s}[u, 0, c]``: stream-major,
    the channel order the readout samples the core output in; MICrONS: 4 x 128 = 512), ``readout_locations.npy``
    float32 ``[units, 2]`` (the published convention: the stimulus point each unit's readout looks at, in
    normalised screen coordinates, x right, y up, ``(-1, -1)`` bottom-left, for a ``height x width`` stimulus
    and eye position ``eye``: :func:`fnn_ray.locations.screen_locations`) and ``units.csv`` (session, scan_idx,
    unit_id). Scans: the release's order (``scans`` filters it); each scan's units by readout_id. Atomic, and
    ``overwrite`` as in :func:`export_responses`."""
    from fnn_ray.locations import screen_locations

    began = time.perf_counter()
    release, _ = preflight.open_release(release_url, scans, storage_options)
    chosen = [info for info in release.scans if scans is None or info.key in set(scans)]
    features = release.config.streams * release.config.recurrent.out_channels
    total = sum(info.units for info in chosen)
    with _publish(to_url, READOUT_DIR, storage_options, work_dir, overwrite) as (work, urls):
        weights = _Npy(posixpath.join(work, "readout_weights.npy"), (total, features))
        locations = _Npy(posixpath.join(work, "readout_locations.npy"), (total, 2))
        table: list[pd.DataFrame] = []
        row = 0
        for info in chosen:
            head = release.load_head(*info.key)
            state = head.state_dict()
            streams = [state[f"readout.feature.weights.{s}"][:, 0, :] for s in range(release.config.streams)]
            index = np.arange(row, row + info.units)
            weights.write(index, 0, np.concatenate([s.numpy() for s in streams], axis=1))
            locations.write(index, 0, screen_locations(head, height, width, eye))
            units = release.units(*info.key)
            table.append(pd.DataFrame({"session": info.session, "scan_idx": info.scan_idx,
                                       "unit_id": units.unit_id.to_numpy()}))
            row += info.units
        pd.concat(table).to_csv(posixpath.join(work, "units.csv"), index=False)
    return ExportResult(tuple(storage.redact_url(u) for u in urls), (total, features),
                        tuple(info.key for info in chosen), time.perf_counter() - began)
