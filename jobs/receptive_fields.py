"""Receptive fields of every unit: flashing on/off dots on a grid in, spike-triggered averages and RF centres out.

    python -m jobs.receptive_fields --release URL --output URL [--scans 8-5,9-6] [--grid 5x9] [--trials N]
                                    [--dot-frames 6] [--seed S] [--size 144x256] [--save-stimuli URL]
                                    [shared options: --actors, --dtype, --storage-options, ...]

    python -m jobs.receptive_fields     # a CPU dry run on a small synthetic release under ./fnn-ray-output/

Each event shows one white (on) or black (off) dot at one grid cell on gray; each unit's mean response over every
event's scoring window is averaged per (cell, polarity) on the workers. Output: the dataset
``OUTPUT/receptive_fields/`` (``scan-<s>-<i>.parquet``: session, scan_idx, unit_id, readout_id, sta_on, sta_off,
sta_on_off as row-major [rows*cols] maps with row 0 at the top, ssi (the published index), rf_x, rf_y in
normalised screen coordinates and ssi_rf_map, from the baseline-removed map) and under
``OUTPUT/receptive_fields/_files/``: ``metadata.json`` (grid, dot parameters, index definitions, windows of every
clip), ``units.csv`` and PNG plots.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from fnn_ray.analysis.receptive_fields import INDEX_DEFINITIONS, RF_THRESHOLD, rf_table
from fnn_ray.experiment import ScanMeans
from fnn_ray.generators import family_from_name
from fnn_ray.plots import rf_plots
from jobs.cli import count, parse_size
from jobs.experiment_cli import Experiment, experiment_main, experiment_parser

DATA_DIR = "receptive_fields"
CSV_COLUMNS = ["session", "scan_idx", "unit_id", "ssi", "rf_x", "rf_y", "ssi_rf_map"]
STA_COLUMNS = ("sta_on", "sta_off", "sta_on_off")


def build_parser() -> argparse.ArgumentParser:
    parser = experiment_parser("python -m jobs.receptive_fields", __doc__)
    parser.add_argument("--grid", default="5x9", help="dot grid ROWSxCOLS covering the screen (default 5x9)")
    parser.add_argument("--trials", type=count(), default=1, help="repeats of every (cell, polarity) (default 1)")
    parser.add_argument("--dot-frames", type=count(), default=6, help="frames a dot is shown (default 6)")
    parser.add_argument("--gap-frames", type=count(0), default=0, help="gray frames after each dot (default 0)")
    return parser


def analyse(rows: int, cols: int, height: int, width: int):
    def run(means: ScanMeans) -> pd.DataFrame:
        u = len(means.unit_ids)
        on = means.means[:, : rows * cols].reshape(u, rows, cols)
        off = means.means[:, rows * cols:].reshape(u, rows, cols)
        table = rf_table(on, off, height, width)
        for name, sta in reversed(list(zip(STA_COLUMNS, (on, off, (on + off) / 2)))):
            table.insert(0, name, list(sta.reshape(u, -1).astype(np.float32)))
        return table
    return run


def maps(table: pd.DataFrame, rows: int, cols: int) -> pd.DataFrame:
    """``table`` with the STA columns as ``[rows, cols]`` arrays (for plotting)."""
    return table.assign(**{k: [np.asarray(v).reshape(rows, cols) for v in table[k]] for k in STA_COLUMNS})


def build(args: argparse.Namespace, dry: bool, size: tuple[int, int]) -> Experiment:
    rows, cols = parse_size(args.grid)
    height, width = size
    family = family_from_name("dots", rows=rows, cols=cols, trials=args.trials, dot_frames=args.dot_frames,
                              gap_frames=args.gap_frames, seed=args.seed, height=height, width=width,
                              burnin_frames=args.burnin, latency_frames=args.latency)
    return Experiment(family, analyse(rows, cols, height, width), {"grid": [rows, cols], "height": height,
                                                                    "width": width}, CSV_COLUMNS,
                      lambda table, directory, caption: rf_plots(maps(table, rows, cols), height, width, directory,
                                                                 caption=caption),
                      settings={"rf_map_threshold": RF_THRESHOLD, "definitions": INDEX_DEFINITIONS})


def main(argv: list[str] | None = None) -> int:
    return experiment_main(build_parser(), argv, "receptive_fields", DATA_DIR, build)


if __name__ == "__main__":
    sys.exit(main())
