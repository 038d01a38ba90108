"""Orientation and direction tuning of every unit: drifting directional stimuli in, OSI/DSI/gOSI/gDSI out.

    python -m jobs.tuning --release URL --output URL [--scans 8-5,9-6] [--stimulus monet|gratings]
                          [--directions 16] [--trials N] [--block-frames 30] [--seed S] [--size 144x256]
                          [--save-stimuli URL] [shared options: --actors, --dtype, --storage-options, ...]

    python -m jobs.tuning         # a CPU dry run on a small synthetic release under ./fnn-ray-output/

The stimulus is generated on the workers (seeded; IN_SILICO.md conventions: 0 deg = motion to the right, 90 = up);
each unit's mean response over every block's scoring window is averaged per direction on the workers. Output:
``OUTPUT/ori_dir_tuning/session=<s>/scan_idx=<i>/units.parquet`` (unit_id, readout_id, OSI, DSI, gOSI, gDSI,
pref_ori, pref_dir, the von Mises fit, direction_responses), ``metadata.json`` (directions, windows of every clip,
stimulus parameters), ``units.csv`` in the published column layout and PNG plots. Exit status as jobs.sweep.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from fnn_ray.analysis.tuning import tuning_table
from fnn_ray.experiment import ScanMeans
from fnn_ray.generators import family_from_name
from fnn_ray.plots import tuning_plots
from jobs.cli import count
from jobs.experiment_cli import Experiment, experiment_main, experiment_parser

DATA_DIR = "ori_dir_tuning"
CSV_COLUMNS = ["session", "scan_idx", "unit_id", "OSI", "DSI", "gOSI", "gDSI", "pref_ori", "pref_dir"]


def build_parser() -> argparse.ArgumentParser:
    parser = experiment_parser("python -m jobs.tuning", __doc__)
    parser.add_argument("--stimulus", default="monet", help="monet (directional pink noise) or gratings")
    parser.add_argument("--directions", type=count(), default=16, help="directions, 360/D apart from 0 (default 16)")
    parser.add_argument("--trials", type=count(), default=None, help="repeats of every direction (default 4; dry run 2)")
    parser.add_argument("--block-frames", type=count(), default=None, help="frames per direction block (default 30)")
    return parser


def analyse(directions_deg: np.ndarray):
    def run(means: ScanMeans) -> pd.DataFrame:
        table = tuning_table(means.means, directions_deg)
        table["direction_responses"] = list(means.means.astype(np.float32))
        bad = ~np.isfinite(means.means).all(axis=1)
        if bad.any():
            print(f"WARNING: {bad.sum()} unit(s) have a non-finite tuning curve (e.g. unit_id "
                  f"{int(means.unit_ids[bad][0])}); their fit_success is False", file=sys.stderr)
        return table
    return run


def build(args: argparse.Namespace, dry: bool, size: tuple[int, int]) -> Experiment:
    params = dict(directions=args.directions, trials=args.trials or (2 if dry else 4), seed=args.seed,
                  height=size[0], width=size[1], burnin_frames=args.burnin, latency_frames=args.latency)
    if args.block_frames or dry:
        params["block_frames"] = args.block_frames or 12
    family = family_from_name(args.stimulus, **params)
    directions = np.array([c["direction_deg"] for c in family.conditions], float)
    return Experiment(family, analyse(directions), {"directions_deg": directions.tolist()}, CSV_COLUMNS,
                      lambda table, directory: tuning_plots(table, directions, directory))


def main(argv: list[str] | None = None) -> int:
    return experiment_main(build_parser(), argv, "tuning", DATA_DIR, build)


if __name__ == "__main__":
    sys.exit(main())
