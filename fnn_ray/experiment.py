"""In-silico experiments on the one job machinery: generated stimuli in, per-unit condition means out.

An experiment is a :class:`fnn_ray.job.Job` whose source is a seeded generator (:mod:`fnn_ray.generators`: the
clips are made on the workers, no stimulus I/O) and whose reducer is a :class:`fnn_ray.reducers.WindowReducer`
(per unit and condition, the sum of the unit's window means; per-frame responses never leave the worker).
After the items are committed, :func:`condition_means` merges the partial sums of every item into the mean
response per unit and condition, and the experiment's analysis (tuning, receptive fields) turns them into tables.

The final outputs are written by :mod:`fnn_ray.outputs`: each result folder is a Parquet dataset (one row per
unit) with its figures, CSV and metadata under ``_files/``.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fnn_ray import fingerprint, preflight, storage
from fnn_ray.generators import Family
from fnn_ray.job import Job, JobConfig, JobSummary, run_job
from fnn_ray.outputs import committed_tables, csv_bytes, files_url, read_results, write_file, write_table
from fnn_ray.plan import Scan
from fnn_ray.reducers import WindowReducer
from fnn_ray.sources import GeneratedSource, blocks
from fnn_ray.stimuli import Clip, ClipWriter

__all__ = ["ExperimentConfig", "ScanMeans", "clips_metadata", "condition_means", "plan_experiment", "read_results",
           "run_experiment", "save_stimuli", "stimulus_caption"]  # read_results: from fnn_ray.outputs, kept here for the README


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
    setup = preflight.prepare(config.release, config.output, config.scans, config.storage_options)
    release, scans, output_url = setup.release, setup.scans, setup.output_url
    release_url, release_so = setup.release_url, setup.release_options
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


def stimulus_caption(family: Family) -> str:
    """One line naming the stimulus family and its parameters (for figures)."""
    params = ", ".join(f"{k}={v}" for k, v in family.params().items() if k != "seed")
    return f"stimulus {family.name} (seed {family.seed}): {params}"


def run_experiment(name: str, data_dir: str, config: ExperimentConfig, save_stimuli_url: str | None,
                   analyse: Callable[[ScanMeans], pd.DataFrame], metadata: dict, csv_columns: list[str],
                   plot: Callable[[pd.DataFrame, str, str], list[str]],
                   settings: Mapping[str, Any] | None = None) -> JobSummary:
    """Run the experiment job, then (when every item is committed) write per scan
    ``OUTPUT/<data_dir>/scan-<s>-<i>.parquet`` (``session``, ``scan_idx``, ``unit_id``, ``readout_id``, then the
    columns of ``analyse(means)``) and under ``OUTPUT/<data_dir>/_files/``: ``metadata.json`` (``metadata`` and
    ``settings``, the stimulus family, its parameters and every clip's windows), ``units.csv`` (``csv_columns`` of
    all scans, then the stimulus family, its parameters and each of ``settings`` (analysis settings, index
    definitions) as JSON columns) and the PNGs of ``plot(table, directory, stimulus caption)`` under ``plots/``.
    Prints where everything went."""
    settings = dict(settings or {})
    so = config.storage_options
    family = config.family
    job = plan_experiment(name, config, products=(data_dir,))
    if save_stimuli_url and not config.overwrite:
        fingerprint.check(job, so)  # a rerun that will be refused writes no stimuli either
    if save_stimuli_url:
        start = time.perf_counter()
        files = save_stimuli(family, save_stimuli_url, so)
        print(f"saved the {family.num_clips} clip(s) as a stimulus dataset ({len(files)} file(s)) at "
              f"{storage.redact_url(save_stimuli_url)} in {time.perf_counter() - start:.1f} s")
    summary = run_job(job, config)
    if not summary.ok:
        return summary
    start = time.perf_counter()
    tables = []
    for scan, means in sorted(condition_means(job, so).items()):
        table = analyse(means)
        table.insert(0, "readout_id", means.readout_ids.astype("int32"))
        table.insert(0, "unit_id", means.unit_ids.astype("int64"))
        write_table(job.output_url, data_dir, scan, table, so)
        table.insert(0, "scan_idx", scan[1])
        table.insert(0, "session", scan[0])
        tables.append(table)
    everything = pd.concat(tables, ignore_index=True)
    meta = {**metadata, **settings, "stimulus": {"family": family.name, **family.params()},
            "burnin_frames": family.burnin_frames, "clips": clips_metadata(family)}
    write_file(files_url(job.output_url, data_dir, "metadata.json"), json.dumps(meta, indent=1).encode(), so)
    csv = everything[csv_columns].assign(
        stimulus=family.name, stimulus_params=json.dumps(family.params(), separators=(",", ":")),
        **{key: json.dumps(value, separators=(",", ":")) for key, value in settings.items()})
    write_file(files_url(job.output_url, data_dir, "units.csv"), csv_bytes(csv), so)
    with tempfile.TemporaryDirectory() as tmp:
        paths = plot(everything, tmp, stimulus_caption(family))
        for path in paths:
            write_file(files_url(job.output_url, data_dir, "plots", Path(path).name), Path(path).read_bytes(), so)
    shown = storage.redact_url(storage.join(job.output_url, data_dir))
    print(f"\n{name}: {len(everything):,} unit(s) of {len(tables)} scan(s) analysed in "
          f"{time.perf_counter() - start:.1f} s\n  dataset (one row per unit): {shown}  "
          f"(pandas.read_parquet or pyarrow.dataset.dataset(..., format=\"parquet\"))\n"
          f"  published layout: {shown}/_files/units.csv\n  metadata: {shown}/_files/metadata.json\n"
          f"  plots: {shown}/_files/plots/ ({len(paths)} PNG)")
    return summary
