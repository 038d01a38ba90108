"""What the in-silico experiment jobs (``jobs.tuning``, ``jobs.receptive_fields``) share: options, the dry run,
the run itself and how results are written (tables, metadata, CSV, plots).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fnn_ray import fingerprint, storage
from fnn_ray.experiment import ExperimentConfig, ScanMeans, clips_metadata, condition_means, csv_bytes, \
    plan_experiment, save_stimuli, write_file, write_table
from fnn_ray.generators import Family
from fnn_ray.job import JobSummary, run_job
from jobs.cli import Parser, add_job_options, count, job_options, parse_size, run_cli

__all__ = ["Experiment", "add_experiment_options", "dry_run_release", "experiment_main", "experiment_parser",
           "run_experiment"]

#: The dry run's synthetic release: (session, scan_idx, units), small frames.
DRY_RUN_SCANS = ((4, 7, 60), (8, 5, 100), (9, 6, 80))
DRY_RUN_DIR = "fnn-ray-output"


def experiment_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The command line every experiment job starts from: the job options and the experiment options."""
    parser = Parser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_options(parser)
    add_experiment_options(parser)
    return parser


def add_experiment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="stimulus seed (default 0)")
    parser.add_argument("--size", default=None, help="frame size HxW (default 144x256; dry run 36x64)")
    parser.add_argument("--burnin", type=count(0), default=10, help="burn-in frames never scored (default 10)")
    parser.add_argument("--latency", type=count(0), default=5, help="scoring window delay in frames (default 5)")
    parser.add_argument("--clips-per-part", type=count(), default=1, help="generated clips per work item (default 1)")
    parser.add_argument("--save-stimuli", default=None,
                        help="also write the exact clips as a stimulus dataset (for jobs.sweep) at this URL")


def dry_run_release(root: str = DRY_RUN_DIR) -> tuple[str, str]:
    """A small synthetic release under ``root`` (deterministic); returns (release URL, root)."""
    from fnn_model.config import NetworkConfig
    from fnn_model.synthetic import make_release

    base = Path(root).resolve()
    release = base / "experiment-release"
    if not (release / "scans.csv").exists():
        make_release(str(release), list(DRY_RUN_SCANS), NetworkConfig.tiny(), seed=0)
    return str(release), str(base)


def run_experiment(name: str, data_dir: str, config: ExperimentConfig, save_stimuli_url: str | None,
                   analyse: Callable[[ScanMeans], pd.DataFrame], metadata: dict, csv_columns: list[str],
                   plot: Callable[[pd.DataFrame, str], list[str]]) -> JobSummary:
    """Run the experiment job, then (when every item is committed) write per scan
    ``OUTPUT/<data_dir>/session=<s>/scan_idx=<i>/units.parquet`` (``unit_id``, ``readout_id``, then the columns of
    ``analyse(means)``), ``OUTPUT/<data_dir>/metadata.json`` (``metadata`` plus the stimulus family, its
    parameters and every clip's windows), ``units.csv`` (``csv_columns`` of all scans) and the PNGs of
    ``plot(table, directory)`` under ``plots/``. Prints where everything went."""
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
    base = storage.join(job.output_url, data_dir)
    meta = {**metadata, "stimulus": {"family": family.name, **family.params()},
            "burnin_frames": family.burnin_frames, "clips": clips_metadata(family)}
    write_file(storage.join(base, "metadata.json"), json.dumps(meta, indent=1).encode(), so)
    write_file(storage.join(base, "units.csv"), csv_bytes(everything[csv_columns]), so)
    with tempfile.TemporaryDirectory() as tmp:
        paths = plot(everything, tmp)
        for path in paths:
            write_file(storage.join(base, "plots", Path(path).name), Path(path).read_bytes(), so)
    shown = storage.redact_url(base)
    print(f"\n{name}: {len(everything):,} unit(s) of {len(tables)} scan(s) analysed in "
          f"{time.perf_counter() - start:.1f} s\n  tables: {shown}/session=*/scan_idx=*/units.parquet\n"
          f"  published layout: {shown}/units.csv\n  metadata: {shown}/metadata.json\n"
          f"  plots: {shown}/plots/ ({len(paths)} PNG)")
    return summary


@dataclass(frozen=True)
class Experiment:
    """What one experiment job adds to the shared machinery: its stimulus ``family``, ``analyse`` (condition
    means -> table columns), extra ``metadata``, the published ``csv_columns`` and ``plot`` (table, dir -> PNGs)."""

    family: Family
    analyse: Callable[[ScanMeans], pd.DataFrame]
    metadata: dict
    csv_columns: list[str]
    plot: Callable[[pd.DataFrame, str], list]


def experiment_main(parser: argparse.ArgumentParser, argv: list[str] | None, name: str, data_dir: str,
                    build: Callable[[argparse.Namespace, bool, tuple[int, int]], Experiment]) -> int:
    """The command line of an experiment job: parse, dry run when neither --release nor --output is given (a
    synthetic release, 36x64 frames), ``build(args, dry, (height, width))`` the experiment, run it."""
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if bool(args.release) != bool(args.output):
        parser.error("--release and --output are required (or give neither for a dry run)")

    def body() -> JobSummary:
        options = job_options(args)
        dry = not args.release
        release, output = (args.release, args.output) if not dry else dry_run_release()
        if dry:
            output = f"{output}/{name}"
            print(f"fnn-ray {name} dry run: synthetic release {release}, output {output}")
        experiment = build(args, dry, parse_size(args.size or ("36x64" if dry else "144x256")))
        config = ExperimentConfig(release=release, output=output, family=experiment.family,
                                  clips_per_part=args.clips_per_part, **options)
        return run_experiment(name, data_dir, config, args.save_stimuli, experiment.analyse, experiment.metadata,
                              experiment.csv_columns, experiment.plot)

    return run_cli(body)
