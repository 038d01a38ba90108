"""What the in-silico experiment jobs (``jobs.tuning``, ``jobs.receptive_fields``) share: their options and the dry
run; the run itself and its final step are :func:`fnn_ray.experiment.run_experiment`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fnn_ray.experiment import ExperimentConfig, ScanMeans, run_experiment
from fnn_ray.generators import Family
from fnn_ray.job import JobSummary
from jobs.cli import Parser, add_job_options, count, job_options, parse_size, run_cli

__all__ = ["Experiment", "add_experiment_options", "dry_run_release", "experiment_main", "experiment_parser"]

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


@dataclass(frozen=True)
class Experiment:
    """What one experiment job adds to the shared machinery: its stimulus ``family``, ``analyse`` (condition
    means -> table columns), extra ``metadata``, the published ``csv_columns``, ``plot`` (table, dir, stimulus
    caption -> PNGs) and ``settings`` (analysis settings and index definitions, JSON-able: written into
    ``metadata.json`` and as columns of ``units.csv``)."""

    family: Family
    analyse: Callable[[ScanMeans], pd.DataFrame]
    metadata: dict
    csv_columns: list[str]
    plot: Callable[[pd.DataFrame, str, str], list]
    settings: dict = field(default_factory=dict)


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
                              experiment.csv_columns, experiment.plot, experiment.settings)

    return run_cli(body)
