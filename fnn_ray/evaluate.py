"""Model performance against recorded responses with repeats, as a :class:`fnn_ray.job.Job`.

    evaluation = run_evaluate(EvaluateConfig(release="s3://b/release", recordings="s3://b/recordings",
                                             output="s3://b/eval"))

The recordings (:mod:`fnn_ray.recordings`: one ``<session>-<scan_idx>`` folder per scan, the original package's
evaluation layout) are listed and checked before Ray starts, values included: a non-finite eye position or
behaviour value is refused with its file and frame named (or imputed with ``impute=True``, by
:data:`fnn_ray.recordings.IMPUTE_RULE`, recorded in the metadata), ``inf`` in the recorded units is refused, NaN
there means "not recorded". Work items are (scan, video): a worker predicts every
repeat of the video with that repeat's own eye and behaviour inputs, reads the recorded responses of the same
repeats and commits the additive correlation statistics per unit (:class:`fnn_ray.recordings.RepeatsReducer`);
per-frame predictions never leave it. When every item is committed, the statistics are merged per scan into
``cc_abs``, ``cc_max`` and ``cc_norm`` (``shared/IN_SILICO.md`` §4; :mod:`fnn_ray.analysis.performance`) and
``frames`` (the frames scored for the unit: samples after burn-in where it was recorded in at least one repeat),
written as::

    OUTPUT/performance/scan-<s>-<i>.parquet     session, scan_idx, unit_id, readout_id, cc_abs, cc_max, cc_norm,
                                                frames   (the dataset: one row per unit)
    OUTPUT/performance/_files/units.csv         session, scan_idx, unit_id, cc_abs, cc_max, cc_norm, frames
    OUTPUT/performance/_files/metadata.json     burn-in, frames per scan, imputation, definitions
    OUTPUT/performance/_files/plots/*.png

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
from fnn_ray.outputs import committed_tables, csv_bytes, files_url, write_file, write_table
from fnn_ray.plan import Scan
from fnn_ray.recordings import IMPUTE_RULE, RecordingSource, RepeatsReducer, check_values, list_scan, read_stats, \
    scan_folders


__all__ = ["DATA_DIR", "EvaluateConfig", "Evaluation", "format_performance", "merge_performance", "plan_evaluate",
           "run_evaluate", "write_performance"]


#: Where the final tables go, under the output URL.
DATA_DIR = "performance"
#: The metric columns, in table order.
METRICS = ("cc_abs", "cc_max", "cc_norm")
#: A unit scored on fewer than this fraction of its scan's frames is named in the summary.
FEW_FRAMES = 0.9


@dataclass(kw_only=True)
class EvaluateConfig(JobConfig):
    """An evaluation: ``release``, ``recordings`` and ``output`` URLs, ``scans`` (default: every scan folder of
    the recordings), ``burnin`` (frames at the start of every repeat never scored, default 10), ``impute``
    (fill non-finite eye positions and behaviour by :data:`fnn_ray.recordings.IMPUTE_RULE` instead of refusing
    them); the rest as :class:`fnn_ray.job.JobConfig`."""

    release: str
    recordings: str
    output: str
    scans: Sequence[Scan] | None = None
    burnin: int = 10
    impute: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.burnin < 0:
            raise ValueError(f"burnin must be >= 0 frames, got {self.burnin}")
        if self.scans is not None:
            self.scans = [(int(s), int(i)) for s, i in self.scans]


@dataclass
class Evaluation:
    """What :func:`run_evaluate` did: the job's ``summary``; when every item is committed, the per-scan
    ``tables`` (unit_id, readout_id, cc_abs, cc_max, cc_norm, frames), each scan's frames after burn-in
    (``scan_frames``), the frames imputed per kind (``imputed``) and the URLs of the ``files`` written."""

    summary: JobSummary
    tables: dict[Scan, pd.DataFrame] = field(default_factory=dict)
    scan_frames: dict[Scan, int] = field(default_factory=dict)
    imputed: dict[str, int] = field(default_factory=dict)
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
    imputed = check_values([p for ps in parts.values() for p in ps], config.impute, so)
    every = [p for ps in parts.values() for p in ps]
    used = {posixpath.basename(folders[scan].rstrip("/")) for scan, _ in scans}
    frames = sum(p.frames for p in every)
    return Job(
        name="evaluate", release_url=release_url, release_options=release_so, output_url=output_url,
        source=RecordingSource(so, impute=config.impute),
        reducer=RepeatsReducer(config.burnin, so, config.store_timeout_s), scans=scans, parts=parts,
        clips=sum(len(p.repeats) for p in every), frames=frames,
        inputs={"release": storage.redact_url(release_url), "recordings": storage.redact_url(recordings_url),
                "burnin": config.burnin, "impute": IMPUTE_RULE if config.impute else None, "imputed": imputed},
        settings={"scans_filter": config.scans and [f"{s}-{i}" for s, i in config.scans]}, products=(DATA_DIR,),
        fingerprint=fingerprint.fingerprint(
            release, scans, config.dtype, burnin=config.burnin, impute=IMPUTE_RULE if config.impute else None,
            recordings=fingerprint.identity(
                recordings_url, so, lambda rel: rel.split("/", 1)[0] in used and rel.endswith(".npy"),
                [(f"{s}-{i}", p.video, p.repeats, p.num_frames) for (s, i), ps in parts.items() for p in ps])),
        bytes_per_unit_frame=0.0,  # the statistics: 3 R + 8 float64 per unit and video
        bytes_per_unit=8.0 * max(sum(3 * len(p.repeats) + 8 for p in ps) for ps in parts.values()))


def merge_performance(job: Job, storage_options: Mapping[str, Any] | None = None) -> dict[Scan, pd.DataFrame]:
    """Merge the committed statistics of ``job``'s items per scan into ``unit_id``, ``readout_id``, ``cc_abs``,
    ``cc_max``, ``cc_norm``, ``frames`` (rows in the release's unit order). Every item must be committed (ValueError
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
        merged = merge_stats(stats)
        metrics = cc_from_stats(merged)
        tables[scan] = pd.DataFrame({"unit_id": unit_ids.astype(np.int64), "readout_id": readout_ids.astype(np.int32),
                                     **{name: np.asarray(m, np.float64) for name, m in zip(METRICS, metrics)},
                                     "frames": np.rint(merged["samples"]).astype(np.int64)})
    return tables


def scan_frames(job: Job) -> dict[Scan, int]:
    """Frames after burn-in of each scan of ``job`` (the most a unit can be scored on)."""
    burnin = job.reducer.burnin  # type: ignore[attr-defined]
    return {scan: sum(p.num_frames - burnin for p in parts) for scan, parts in job.parts.items()}


def write_performance(output_url: str, tables: Mapping[Scan, pd.DataFrame],
                      storage_options: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None
                      ) -> list[str]:
    """Commit the per-scan tables (the dataset ``OUTPUT/performance``) and under ``OUTPUT/performance/_files/``
    ``units.csv`` (the scans of ``tables``), ``metadata.json`` (``metadata``) and the plots; return the URLs."""
    import json
    import tempfile
    from pathlib import Path

    from fnn_ray.plots import performance_plots

    files = [write_table(output_url, DATA_DIR, scan, table, storage_options) for scan, table in tables.items()]
    everything = pd.concat([table.assign(session=scan[0], scan_idx=scan[1]) for scan, table in tables.items()],
                           ignore_index=True)
    columns = ["session", "scan_idx", "unit_id", *METRICS, "frames"]
    files.append(write_file(files_url(output_url, DATA_DIR, "units.csv"), csv_bytes(everything[columns]),
                            storage_options))
    meta = dict(metadata or {})
    files.append(write_file(files_url(output_url, DATA_DIR, "metadata.json"), json.dumps(meta, indent=1).encode(),
                            storage_options))
    imputed = {kind: n for kind, n in (meta.get("imputed") or {}).items() if n}
    caption = (f"burn-in {meta.get('burnin', '?')} frames per repeat; "
               + (f"imputed input frames: {imputed}" if imputed else "no input frame imputed"))
    with tempfile.TemporaryDirectory() as tmp:
        for path in performance_plots(everything, tmp, caption=caption):
            files.append(write_file(files_url(output_url, DATA_DIR, "plots", Path(path).name),
                                    Path(path).read_bytes(), storage_options))
    return files


def format_performance(tables: Mapping[Scan, pd.DataFrame], frames: Mapping[Scan, int] | None = None) -> str:
    """Per scan: units, units with finite metrics, and the median cc_abs / cc_max / cc_norm (NaN left out); with
    ``frames`` (each scan's frames after burn-in), a WARNING line per scan where a recorded unit is scored on
    fewer than :data:`FEW_FRAMES` of them."""
    lines = [f"{'scan':>8} {'units':>7} {'scored':>7} " + " ".join(f"{'median ' + m:>14}" for m in METRICS)]
    warnings = []
    for (session, scan_idx), table in tables.items():
        scored = int(np.isfinite(table[list(METRICS)].to_numpy()).all(axis=1).sum())
        medians = [table[m].median(skipna=True) for m in METRICS]
        lines.append(f"{session:>5}-{scan_idx:<2} {len(table):>7,} {scored:>7,} "
                     + " ".join(f"{v:>14.3f}" for v in medians))
        total = (frames or {}).get((session, scan_idx))
        if total and "frames" in table.columns:
            few = table[(table["frames"] > 0) & (table["frames"] < FEW_FRAMES * total)]
            if len(few):
                first = few.iloc[0]
                warnings.append(f"WARNING: scan {session}-{scan_idx}: {len(few)} unit(s) scored on fewer than "
                                f"{FEW_FRAMES:.0%} of its {total} frames (e.g. unit_id {int(first.unit_id)}: "
                                f"{int(first.frames)}); {int((table['frames'] == 0).sum())} never recorded; see "
                                f"the frames column")
    return "\n".join(lines + warnings)


def run_evaluate(config: EvaluateConfig) -> Evaluation:
    """Plan (checks first), run or resume the evaluation job; when every item is committed, merge the statistics
    and write the tables and plots (a rerun of a finished evaluation only rewrites them)."""
    job = plan_evaluate(config)
    evaluation = Evaluation(run_job(job, config), scan_frames=scan_frames(job), imputed=job.inputs["imputed"])
    if evaluation.summary.ok:
        evaluation.tables = merge_performance(job, config.storage_options)
        metadata = {"burnin": config.burnin, "scan_frames": {f"{s}-{i}": n for (s, i), n in
                                                             evaluation.scan_frames.items()},
                    "impute": job.inputs["impute"], "imputed": evaluation.imputed,
                    "definitions": {"cc_abs, cc_max, cc_norm": "IN_SILICO.md section 4",
                                    "frames": "samples after burn-in where the unit was recorded in at least one "
                                              "repeat (the frames it is scored on)"}}
        evaluation.files = write_performance(job.output_url, evaluation.tables, config.storage_options, metadata)
    return evaluation
