"""In-silico experiments on the one job machinery: generated stimuli in, per-unit condition means out.

An experiment is a :class:`fnn_ray.job.Job` whose source is a seeded generator (:mod:`fnn_ray.generators`: the
clips are made on the workers, no stimulus I/O) and whose reducer is a :class:`fnn_ray.reducers.WindowReducer`
(per unit and condition, the sum of the unit's window means; per-frame responses never leave the worker).
After the items are committed, :func:`condition_means` merges the partial sums of every item into the mean
response per unit and condition, and the experiment's analysis (tuning, receptive fields) turns them into tables.

:func:`write_table` and :func:`write_file` commit the final outputs atomically; a rerun rewrites them identically.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fnn_ray import fingerprint, preflight, storage
from fnn_ray.generators import Family
from fnn_ray.job import Job, JobConfig, absolute
from fnn_ray.ledger import Ledger, parquet_bytes
from fnn_ray.reducers import WindowReducer
from fnn_ray.sources import GeneratedSource, blocks
from fnn_ray.stimuli import Clip, ClipWriter

__all__ = ["ExperimentConfig", "ScanMeans", "clips_metadata", "condition_means", "csv_bytes", "plan_experiment", "read_results",
           "save_stimuli", "write_file", "write_table"]

Scan = tuple[int, int]


@dataclass(kw_only=True)
class ExperimentConfig(JobConfig):
    """An experiment: ``release`` and ``output`` URLs, ``scans`` (default all), the stimulus ``family`` and
    ``clips_per_part`` (generated clips per work item, default 1); the rest as :class:`JobConfig`."""

    release: str
    output: str
    family: Family
    scans: Sequence[Scan] | None = None
    clips_per_part: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clips_per_part < 1:
            raise ValueError(f"clips per part must be >= 1, got {self.clips_per_part}")
        if self.scans is not None:
            self.scans = [(int(s), int(i)) for s, i in self.scans]


@dataclass(frozen=True)
class ScanMeans:
    """One scan's result: ``unit_ids`` int64 ``[U]``, ``readout_ids`` int32 ``[U]`` (readout order) and ``means``
    float64 ``[U, K]``, the mean over all windows of condition ``k`` of each unit's window-mean response."""

    unit_ids: np.ndarray
    readout_ids: np.ndarray
    means: np.ndarray


def plan_experiment(name: str, config: ExperimentConfig, products: Sequence[str] = ()) -> Job:
    """Check the setup (release, scans, output) and build the experiment's job (nothing written, no Ray);
    ``products``: the folders under the output its results are written to after the run."""
    so = config.storage_options
    release_url, release_so = preflight.release_location(config.release, so)
    output_url = absolute(config.output)
    release, scans = preflight.open_release(release_url, config.scans, release_so)
    preflight.check_output(output_url, so)
    family = config.family
    parts = blocks(family, config.clips_per_part)
    return Job(
        name=name, release_url=release_url, release_options=release_so, output_url=output_url,
        source=GeneratedSource(family),
        reducer=WindowReducer(family, data_dir=f"_partials/{name}"), scans=scans, parts=parts,
        clips=family.num_clips, frames=sum(p.frames for p in parts),
        inputs={"release": storage.redact_url(release_url), "stimulus": family.name, "params": family.params()},
        settings={"clips_per_part": config.clips_per_part}, products=tuple(products),
        fingerprint=fingerprint.fingerprint(release, scans, config.dtype,
                                            generator={"family": family.name, **family.params()}),
        bytes_per_unit_frame=0.0,
        bytes_per_unit=8.0 * len(family.conditions) * len(parts))


def condition_means(job: Job, storage_options: Mapping[str, Any] | None = None) -> dict[Scan, ScanMeans]:
    """Merge the committed partial sums of ``job`` per scan (every item must be committed)."""
    ledger = Ledger(job.output_url, storage_options)
    k = len(job.source.family.conditions)  # type: ignore[attr-defined]
    acc: dict[Scan, list] = {}
    for commit in ledger.committed_files(job.reducer.data_dir):
        with ledger.fs.open(ledger.path(commit.file), "rb") as f:
            table = pq.read_table(f)
        counts = np.asarray(json.loads(table.schema.metadata[b"counts"]), np.int64)
        sums = table.column("sums").combine_chunks().flatten().to_numpy().reshape(-1, k)
        scan = commit.key[:2]
        if scan not in acc:
            acc[scan] = [table.column("unit_id").to_numpy(), table.column("readout_id").to_numpy(),
                         np.zeros_like(sums), np.zeros(k, np.int64)]
        acc[scan][2] += sums
        acc[scan][3] += counts
    out = {}
    for scan, (unit_ids, readout_ids, sums, counts) in acc.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            out[scan] = ScanMeans(unit_ids, readout_ids, sums / counts)
    return out


def clips_metadata(family: Family) -> list[dict]:
    """For every clip its ``clip_id`` and ``windows`` (``{**labels, "start", "stop"}``), in clip order."""
    return [{"clip_id": family.clip_id(i), "windows": [w.to_json() for w in family.windows(i)]}
            for i in range(family.num_clips)]


def write_file(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> str:
    """Commit ``data`` at ``url`` atomically; return ``url``."""
    fs, path = storage.filesystem(url, storage_options)
    storage.commit_bytes(fs, path, data)
    return url


def write_table(output_url: str, data_dir: str, scan: Scan, frame: pd.DataFrame,
                storage_options: Mapping[str, Any] | None = None) -> str:
    """Commit one scan's table as ``OUTPUT/<data_dir>/session=<s>/scan_idx=<i>/units.parquet``."""
    url = storage.join(output_url, data_dir, f"session={scan[0]}", f"scan_idx={scan[1]}", "units.parquet")
    return write_file(url, parquet_bytes(pa.Table.from_pandas(frame, preserve_index=False)), storage_options)


def save_stimuli(family: Family, url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Write the experiment's exact clips as a stimulus dataset (the sweep's contract, the metadata's clip ids),
    one clip in memory at a time; returns the file URLs."""
    with ClipWriter(url, storage_options, overwrite=True) as writer:
        for i in range(family.num_clips):
            writer.write(Clip(family.clip_id(i), family.frames(i)))
    return writer.files


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` as CSV (no index)."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def read_results(output_url: str, data_dir: str, storage_options: Mapping[str, Any] | None = None,
                 filter: Any = None) -> pd.DataFrame:
    """An analysis table (``ori_dir_tuning``, ``receptive_fields``, ``performance``) of every scan as one
    DataFrame with ``session`` / ``scan_idx`` columns (``filter``: a ``pyarrow.dataset`` expression on them)."""
    import pyarrow.dataset as ds

    fs, root = storage.filesystem(storage.join(output_url, data_dir), storage_options)
    dataset = ds.dataset([p for p in fs.find(root) if p.endswith("/units.parquet")], filesystem=fs,
                         format="parquet", partitioning=ds.partitioning(flavor="hive"), partition_base_dir=root)
    return dataset.to_table(filter=filter).to_pandas()
