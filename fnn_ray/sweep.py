"""The sweep: per-frame responses of every unit to a Parquet stimulus dataset (a :class:`fnn_ray.job.Job` with a
:class:`fnn_ray.sources.ParquetSource` and a :class:`fnn_ray.reducers.FramesReducer`).

    summary = run_sweep(SweepConfig(release="s3://b/release", stimuli="s3://b/clips", output="s3://b/out"))

The stimulus dataset is listed from its footers and small columns; work items are (scan, shard of
``clips_per_shard`` consecutive clips of one file). Output: :mod:`fnn_ray.responses` under ``OUTPUT/responses``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from fnn_ray import fingerprint, preflight, storage
from fnn_ray.job import Job, JobConfig, JobSummary, run_job
from fnn_ray.manifest import Manifest
from fnn_ray.plan import Scan, choose_clips_per_shard
from fnn_ray.pool import cluster_plan, init_ray
from fnn_ray.reducers import FramesReducer
from fnn_ray.sources import ParquetSource
from fnn_ray.stimuli import list_shards, regroup

__all__ = ["SweepConfig", "plan_sweep", "run_sweep"]


@dataclass(kw_only=True)
class SweepConfig(JobConfig):
    """A sweep: ``release``, ``stimuli`` and ``output`` URLs (local paths, ``file://``, ``s3://``...), ``scans``
    (default all of the release), ``clips_per_shard`` (clips per work item; default: as recorded in the output's
    manifest, else chosen from the data size and the planned actors); the rest as :class:`JobConfig`."""

    release: str
    stimuli: str
    output: str
    scans: Sequence[Scan] | None = None
    clips_per_shard: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clips_per_shard is not None and self.clips_per_shard < 1:
            raise ValueError(f"clips_per_shard must be >= 1, got {self.clips_per_shard}")
        if self.scans is not None:
            self.scans = [(int(s), int(i)) for s, i in self.scans]


def _planned_actors(config: JobConfig) -> int:
    """Actors this job will get: ``config.actors``; on a cluster (``address`` / ``RAY_ADDRESS``) what it offers;
    locally ``CPUs // 4`` (a local Ray is not started just to count)."""
    if config.actors:
        return config.actors
    if config.address or os.environ.get("RAY_ADDRESS"):
        init_ray(config.address)
        return cluster_plan(None, config.cpus_per_actor)[0]
    return max(1, (os.cpu_count() or 4) // 4)


def plan_sweep(config: SweepConfig) -> Job:
    """Check the setup (release, scans, stimuli, output) and build the sweep's job; nothing is written and Ray is
    not started. ValueError / FileNotFoundError naming the problem."""
    so = config.storage_options
    setup = preflight.prepare(config.release, config.output, config.scans, so)
    release, scans, output_url = setup.release, setup.scans, setup.output_url
    release_url, release_so = setup.release_url, setup.release_options
    stimuli_url = preflight.absolute(config.stimuli)
    one_clip = list_shards(stimuli_url, 1, so)
    previous = None if config.overwrite else Manifest.load(output_url, so)
    recorded = previous.config.get("clips_per_shard") if previous else None
    clips_per_shard = config.clips_per_shard or recorded
    if recorded and clips_per_shard != recorded and previous.items_done:
        raise ValueError(f"output {storage.redact_url(output_url)} was written with clips_per_shard={recorded}; "
                         f"rerun with that value or use another output URL")
    if not clips_per_shard:
        clips_per_shard = choose_clips_per_shard(len(one_clip), len(scans), _planned_actors(config),
                                                 max_clips=max(8, config.clips_per_batch))
    return Job(
        name="sweep", release_url=release_url, release_options=release_so, output_url=output_url,
        source=ParquetSource(stimuli_url, so), reducer=FramesReducer(), scans=scans,
        parts=regroup(one_clip, int(clips_per_shard)), clips=len(one_clip), frames=sum(s.frames for s in one_clip),
        inputs={"release": storage.redact_url(release_url), "stimuli": storage.redact_url(stimuli_url)},
        settings={"clips_per_shard": int(clips_per_shard),
                  "scans_filter": config.scans and [f"{s}-{i}" for s, i in config.scans]},
        fingerprint=fingerprint.fingerprint(
            release, scans, config.dtype, context_frames=sum(s.context_frames for s in one_clip),
            stimuli=fingerprint.identity(stimuli_url, so, {s.file for s in one_clip}.__contains__,
                                         [(s.file, s.row_start, s.clip_ids, s.frames) for s in one_clip])),
        bytes_per_unit_frame=4.0)


def run_sweep(config: SweepConfig) -> JobSummary:
    """Plan (checks first) and run or resume a sweep; return its summary."""
    return run_job(plan_sweep(config), config)
