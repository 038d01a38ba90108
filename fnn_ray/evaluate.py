"""Model performance against recorded responses with repeats, as a :class:`fnn_ray.job.Job`.

    evaluation = run_evaluate(EvaluateConfig(release="s3://b/release", recordings="s3://b/recordings",
                                             output="s3://b/eval"))

The recordings (:mod:`fnn_ray.recordings`: one ``<session>-<scan_idx>`` folder per scan, the original package's
evaluation layout) are listed and checked before Ray starts. Work items are (scan, video): a worker predicts every
repeat of the video with that repeat's own eye and behaviour inputs, reads the recorded responses of the same
repeats and commits the additive correlation statistics per unit (:class:`fnn_ray.recordings.RepeatsReducer`);
per-frame predictions never leave it. When every item is committed, the statistics are merged per scan into
``cc_abs``, ``cc_max`` and ``cc_norm`` (``shared/IN_SILICO.md`` §4; :mod:`fnn_ray.analysis.performance`) and
written as::

    OUTPUT/performance/session=<s>/scan_idx=<i>/units.parquet   unit_id, readout_id, cc_abs, cc_max, cc_norm
    OUTPUT/performance/units.csv                                session, scan_idx, unit_id, cc_abs, cc_max, cc_norm
    OUTPUT/performance/plots/*.png

each committed atomically; a rerun rewrites them identically. A unit without variance, or never recorded, gets
NaN metrics.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fnn_ray import fingerprint, preflight, storage
from fnn_ray.job import Job, JobConfig, JobSummary, run_job
from fnn_ray.outputs import committed_tables, csv_bytes, write_file, write_table
from fnn_ray.plan import Scan
from fnn_ray.recordings import RecordingSource, RepeatsReducer, list_scan, read_stats, scan_folders


__all__ = ["DATA_DIR", "EvaluateConfig", "Evaluation", "format_performance", "merge_performance", "plan_evaluate",
           "run_evaluate", "write_performance"]


#: Where the final tables go, under the output URL.
DATA_DIR = "performance"
#: The metric columns, in table order.
METRICS = ("cc_abs", "cc_max", "cc_norm")


@dataclass(kw_only=True)
class EvaluateConfig(JobConfig):
    """An evaluation: ``release``, ``recordings`` and ``output`` URLs, ``scans`` (default: every scan folder of
    the recordings), ``burnin`` (frames at the start of every repeat never scored, default 10); the rest as
    :class:`fnn_ray.job.JobConfig`."""

    release: str
    recordings: str
    output: str
    scans: Sequence[Scan] | None = None
    burnin: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.burnin < 0:
            raise ValueError(f"burnin must be >= 0 frames, got {self.burnin}")
        if self.scans is not None:
            self.scans = [(int(s), int(i)) for s, i in self.scans]


@dataclass
class Evaluation:
    """What :func:`run_evaluate` did: the job's ``summary``; when every item is committed, the per-scan
    ``tables`` (unit_id, readout_id, cc_abs, cc_max, cc_norm) and the URLs of the ``files`` written."""

    summary: JobSummary
    tables: dict[Scan, pd.DataFrame] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def plan_evaluate(config: EvaluateConfig) -> Job:
    """Check the setup (release, recordings: listing and ``.npy`` headers, output) and build the evaluation's job;
    nothing is written and Ray is not started. ValueError / FileNotFoundError naming the file."""
    so = config.storage_options
    recordings_url = preflight.absolute(config.recordings)
    folders = scan_folders(recordings_url, so)
    if config.scans is not None:
        for session, scan_idx in [s for s in config.scans if s not in folders][:1]:
            raise FileNotFoundError(f"no recordings for scan {session}-{scan_idx}: "
                                    f"{storage.join(storage.redact_url(recordings_url), f'{session}-{scan_idx}')} "
                                    f"does not exist")
    try:
        setup = preflight.prepare(config.release, config.output, list(config.scans or folders), so)
    except preflight.UnknownScans as e:  # a recordings folder of a scan the release lacks: name the folder
        outside = [scan for scan in (config.scans or folders) if scan not in e.known]
        listing = ", ".join(f"{s}-{i}" for s, i in sorted(e.known))
        raise ValueError(f"{storage.redact_url(folders[outside[0]])}: scan {outside[0][0]}-{outside[0][1]} is "
                         f"not in release {storage.redact_url(preflight.release_location(config.release, so)[0])} "
                         f"(its scans: {listing})") from None
    release, scans, output_url = setup.release, setup.scans, setup.output_url
    release_url, release_so = setup.release_url, setup.release_options
    parts = {scan: list_scan(folders[scan], units, config.burnin, so) for scan, units in scans}
    every = [p for ps in parts.values() for p in ps]
    used = {posixpath.basename(folders[scan].rstrip("/")) for scan, _ in scans}
    frames = sum(p.frames for p in every)
    return Job(
        name="evaluate", release_url=release_url, release_options=release_so, output_url=output_url,
        source=RecordingSource(so),
        reducer=RepeatsReducer(config.burnin, so, config.store_timeout_s), scans=scans, parts=parts,
        clips=sum(len(p.repeats) for p in every), frames=frames,
        inputs={"release": storage.redact_url(release_url), "recordings": storage.redact_url(recordings_url),
                "burnin": config.burnin},
        settings={"scans_filter": config.scans and [f"{s}-{i}" for s, i in config.scans]}, products=(DATA_DIR,),
        fingerprint=fingerprint.fingerprint(
            release, scans, config.dtype, burnin=config.burnin,
            recordings=fingerprint.identity(
                recordings_url, so, lambda rel: rel.split("/", 1)[0] in used and rel.endswith(".npy"),
                [(f"{s}-{i}", p.video, p.repeats, p.num_frames) for (s, i), ps in parts.items() for p in ps])),
        bytes_per_unit_frame=0.0,  # the statistics: 3 R + 8 float64 per unit and video
        bytes_per_unit=8.0 * max(sum(3 * len(p.repeats) + 8 for p in ps) for ps in parts.values()))


def merge_performance(job: Job, storage_options: Mapping[str, Any] | None = None) -> dict[Scan, pd.DataFrame]:
    """Merge the committed statistics of ``job``'s items per scan into ``unit_id``, ``readout_id``, ``cc_abs``,
    ``cc_max``, ``cc_norm`` (rows in the release's unit order). Every item must be committed (ValueError
    otherwise); commits of other scans in the output are left out."""
    from fnn_ray.analysis.performance import cc_from_stats, merge_stats

    found: dict[Scan, list] = {}
    for key, table in committed_tables(job, storage_options):
        unit_ids, readout_ids, stats = read_stats(table)
        scan = key[:2]
        first = found.setdefault(scan, [unit_ids, readout_ids, []])
        if not (np.array_equal(first[0], unit_ids) and np.array_equal(first[1], readout_ids)):
            raise ValueError(f"{storage.redact_url(job.output_url)}: the units of item {key[0]}-{key[1]}/{key[2]} "
                             f"differ from those of the other items of scan {scan[0]}-{scan[1]}")
        first[2].append(stats)
    tables = {}
    for scan, (unit_ids, readout_ids, stats) in sorted(found.items()):
        metrics = cc_from_stats(merge_stats(stats))
        tables[scan] = pd.DataFrame({"unit_id": unit_ids.astype(np.int64), "readout_id": readout_ids.astype(np.int32),
                                     **{name: np.asarray(m, np.float64) for name, m in zip(METRICS, metrics)}})
    return tables


def write_performance(output_url: str, tables: Mapping[Scan, pd.DataFrame],
                      storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Commit the per-scan tables, ``units.csv`` (the scans of ``tables``) and the plots under
    ``OUTPUT/performance``; return the URLs written."""
    import tempfile
    from pathlib import Path

    from fnn_ray.plots import performance_plots

    files = [write_table(output_url, DATA_DIR, scan, table, storage_options) for scan, table in tables.items()]
    everything = pd.concat([table.assign(session=scan[0], scan_idx=scan[1]) for scan, table in tables.items()],
                           ignore_index=True)
    base = storage.join(output_url, DATA_DIR)
    columns = ["session", "scan_idx", "unit_id", *METRICS]
    files.append(write_file(storage.join(base, "units.csv"), csv_bytes(everything[columns]), storage_options))
    with tempfile.TemporaryDirectory() as tmp:
        for path in performance_plots(everything, tmp):
            files.append(write_file(storage.join(base, "plots", Path(path).name), Path(path).read_bytes(),
                                    storage_options))
    return files


def format_performance(tables: Mapping[Scan, pd.DataFrame]) -> str:
    """Per scan: units, units with finite metrics, and the median cc_abs / cc_max / cc_norm (NaN left out)."""
    lines = [f"{'scan':>8} {'units':>7} {'scored':>7} " + " ".join(f"{'median ' + m:>14}" for m in METRICS)]
    for (session, scan_idx), table in tables.items():
        scored = int(np.isfinite(table[list(METRICS)].to_numpy()).all(axis=1).sum())
        medians = [table[m].median(skipna=True) for m in METRICS]
        lines.append(f"{session:>5}-{scan_idx:<2} {len(table):>7,} {scored:>7,} "
                     + " ".join(f"{v:>14.3f}" for v in medians))
    return "\n".join(lines)


def run_evaluate(config: EvaluateConfig) -> Evaluation:
    """Plan (checks first), run or resume the evaluation job; when every item is committed, merge the statistics
    and write the tables and plots (a rerun of a finished evaluation only rewrites them)."""
    job = plan_evaluate(config)
    evaluation = Evaluation(run_job(job, config))
    if evaluation.summary.ok:
        evaluation.tables = merge_performance(job, config.storage_options)
        evaluation.files = write_performance(job.output_url, evaluation.tables, config.storage_options)
    return evaluation
