"""In-silico experiments on the one job machinery: generated stimuli in, per-unit condition means out.

An experiment is a :class:`fnn_ray.job.Job` whose source is a seeded generator (:mod:`fnn_ray.generators`: the
clips are made on the workers, no stimulus I/O) and whose reducer is a :class:`fnn_ray.reducers.WindowReducer`
(per unit and condition, the sum of the unit's window means; per-frame responses never leave the worker).
After the items are committed, :func:`condition_means` merges the partial sums of every item into the mean
response per unit and condition, and the experiment's analysis (tuning, receptive fields) turns them into tables.

The final outputs are written by :mod:`fnn_ray.outputs`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fnn_ray import preflight, storage
from fnn_ray.generators import Family
from fnn_ray.job import Job, JobConfig
from fnn_ray.outputs import committed_tables
from fnn_ray.plan import Scan
from fnn_ray.reducers import WindowReducer
from fnn_ray.sources import GeneratedSource, blocks
from fnn_ray.stimuli import Clip, ClipWriter

__all__ = ["ExperimentConfig", "ScanMeans", "clips_metadata", "condition_means", "plan_experiment", "save_stimuli"]


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


def plan_experiment(name: str, config: ExperimentConfig) -> Job:
    """Check the setup (release, scans, output) and build the experiment's job (nothing written, no Ray)."""
    setup = preflight.prepare(config.release, config.output, config.scans, config.storage_options)
    release_url, release_so, scans, output_url = setup.release_url, setup.release_options, setup.scans, setup.output_url
    family = config.family
    parts = blocks(family, config.clips_per_part)
    return Job(
        name=name, release_url=release_url, release_options=release_so, output_url=output_url,
        source=GeneratedSource(family),
        reducer=WindowReducer(family, data_dir=f"_partials/{name}"), scans=scans, parts=parts,
        clips=family.num_clips, frames=sum(p.frames for p in parts),
        inputs={"release": storage.redact_url(release_url), "stimulus": family.name, "params": family.params()},
        settings={"clips_per_part": config.clips_per_part}, bytes_per_unit_frame=0.0,
        bytes_per_unit=8.0 * len(family.conditions) * len(parts))


def condition_means(job: Job, storage_options: Mapping[str, Any] | None = None) -> dict[Scan, ScanMeans]:
    """Merge the committed partial sums of ``job`` per scan (ValueError unless every item is committed)."""
    k = len(job.source.family.conditions)  # type: ignore[attr-defined]
    acc: dict[Scan, list] = {}
    for key, table in committed_tables(job, storage_options):
        counts = np.asarray(json.loads(table.schema.metadata[b"counts"]), np.int64)
        sums = table.column("sums").combine_chunks().flatten().to_numpy().reshape(-1, k)
        scan = key[:2]
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


def save_stimuli(family: Family, url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Write the experiment's exact clips as a stimulus dataset (the sweep's contract, the metadata's clip ids),
    one clip in memory at a time; returns the file URLs."""
    with ClipWriter(url, storage_options, overwrite=True) as writer:
        for i in range(family.num_clips):
            writer.write(Clip(family.clip_id(i), family.frames(i)))
    return writer.files
