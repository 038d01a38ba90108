"""Orientation and direction tuning of every unit: drifting directional stimuli in, OSI/DSI/gOSI/gDSI out.

    python -m jobs.tuning --release URL --output URL [--scans 8-5,9-6] [--stimulus monet2|rigid_monet|gratings]
                          [--directions 16] [--trials N] [--block-frames N] [--pattern-width 80] [--seed S]
                          [--size 144x256] [--fit-starts 1] [--fit-method least_squares|projection]
                          [--save-stimuli URL] [shared options: --actors, --dtype, --storage-options, ...]

    python -m jobs.tuning         # a CPU dry run on a small synthetic release under ./fnn-ray-output/

The stimulus (default Monet2 with the published parameters, IN_SILICO.md section 6; ``rigid_monet`` is this
project's earlier rigidly drifting pink noise) is generated on the workers (seeded; 0 deg = motion to the right,
90 = up); each unit's mean response over every coherent segment's scoring window is averaged per direction on the
workers. The von Mises fit is the published single start unless ``--fit-starts`` adds starts; it runs on the
driver after the last item, units spread over one process per core. Output: the
dataset ``OUTPUT/ori_dir_tuning/`` (``scan-<s>-<i>.parquet``: session, scan_idx, unit_id, readout_id, OSI, DSI,
gOSI, gDSI, pref_ori, pref_dir, the von Mises fit and its fit_status, direction_responses) and under
``OUTPUT/ori_dir_tuning/_files/``: ``metadata.json`` (directions, stimulus family and parameters, fit settings,
index definitions, windows of every clip), ``units.csv`` in the published column layout (plus the stimulus and
fit settings) and PNG plots. Exit status as jobs.sweep.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np
import pandas as pd

from fnn_ray.analysis.tuning import FIT_METHODS, INDEX_DEFINITIONS, FitConfig, tuning_table
from fnn_ray.experiment import ScanMeans
from fnn_ray.generators import family_from_name
from fnn_ray.plots import tuning_plots
from jobs.cli import count
from jobs.experiment_cli import Experiment, experiment_main, experiment_parser

DATA_DIR = "ori_dir_tuning"
CSV_COLUMNS = ["session", "scan_idx", "unit_id", "OSI", "DSI", "gOSI", "gDSI", "pref_ori", "pref_dir"]
#: Family parameters and the flags that set them (for error messages).
FLAGS = {"directions": "--directions", "trials": "--trials", "block_frames": "--block-frames",
         "pattern_width": "--pattern-width", "height": "--size height", "width": "--size width",
         "burnin_frames": "--burnin", "latency_frames": "--latency", "seed": "--seed"}


def parse_floats(text: str) -> tuple[float, ...]:
    """``"1,20"`` -> ``(1.0, 20.0)``."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,20; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = experiment_parser("python -m jobs.tuning", __doc__)
    parser.add_argument("--stimulus", default="monet2",
                        help="monet2 (the published directional noise, default), rigid_monet or gratings")
    parser.add_argument("--directions", type=count(), default=16, help="directions, 360/D apart from 0 (default 16)")
    parser.add_argument("--trials", type=count(), default=None, help="repeats of every direction (default 4; dry run 2)")
    parser.add_argument("--block-frames", type=count(), default=None,
                        help="frames per direction (default: monet2 56, the others 30; dry run 20)")
    parser.add_argument("--pattern-width", type=count(), default=None,
                        help="monet2: coarse noise pixels per screen width (default 80, the published value)")
    parser.add_argument("--fit-starts", type=parse_floats, default=(1.0,),
                        help="kappa starts of the von Mises fit, comma-separated (default 1: the published single "
                             "start; e.g. 1,20 adds a narrow start, recorded in metadata.json)")
    parser.add_argument("--fit-method", default="least_squares",
                        help=f"{' or '.join(FIT_METHODS)}: the published fit (default) or a vectorised, faster one")
    return parser


def analyse(directions_deg: np.ndarray, fit: FitConfig):
    def run(means: ScanMeans) -> pd.DataFrame:
        table = tuning_table(means.means, directions_deg, fit)
        table["direction_responses"] = list(means.means.astype(np.float32))
        bad = ~np.isfinite(means.means).all(axis=1)
        if bad.any():
            print(f"WARNING: {bad.sum()} unit(s) have a non-finite tuning curve (e.g. unit_id "
                  f"{int(means.unit_ids[bad][0])}); their fit_status is nonfinite", file=sys.stderr)
        return table
    return run


def build(args: argparse.Namespace, dry: bool, size: tuple[int, int]) -> Experiment:
    params = dict(directions=args.directions, trials=args.trials if args.trials is not None else (2 if dry else 4),
                  seed=args.seed, height=size[0], width=size[1], burnin_frames=args.burnin,
                  latency_frames=args.latency)
    if args.block_frames is not None or dry:
        params["block_frames"] = args.block_frames if args.block_frames is not None else 20
    if args.pattern_width is not None:
        if args.stimulus != "monet2":
            raise ValueError("--pattern-width applies to --stimulus monet2 only")
        params["pattern_width"] = args.pattern_width
    try:
        family = family_from_name(args.stimulus, **params)
        fit = FitConfig(kappa_starts=tuple(args.fit_starts), method=args.fit_method, processes=None)
    except ValueError as e:  # the family's and the fit's messages name keywords: name the flags instead
        message = str(e)
        for keyword, flag in FLAGS.items():
            message = re.sub(rf"\b{keyword}=", f"{flag} ", message)
        raise ValueError(message.replace("kappa starts", "--fit-starts").replace("fit: method", "--fit-method")) \
            from None
    directions = np.array([c["direction_deg"] for c in family.conditions], float)
    return Experiment(family, analyse(directions, fit), {"directions_deg": directions.tolist()}, CSV_COLUMNS,
                      lambda table, directory, caption: tuning_plots(table, directions, directory, caption),
                      settings={"fit": fit.to_json(), "definitions": INDEX_DEFINITIONS})


def main(argv: list[str] | None = None) -> int:
    return experiment_main(build_parser(), argv, "tuning", DATA_DIR, build)


if __name__ == "__main__":
    sys.exit(main())
