"""Whole-connectome prediction sweep on Ray: Parquet stimuli on any store -> Parquet responses on any store.

    python -m jobs.sweep --release URL --stimuli URL --output URL [--scans 8-5,9-6] [--actors N]
                         [--clips-per-batch K] [--clips-per-shard C] [--dtype float32|bfloat16]
                         [--storage-options JSON] [--store-timeout S] [--wait-for-lock] [--address RAY]

    python -m jobs.sweep          # no URLs: a CPU dry run on a small synthetic release and clips, written to
                                  # ./fnn-ray-output/ (responses in ./fnn-ray-output/responses)

On a cluster: ``ray job submit --working-dir . -- python -m jobs.sweep --release s3://... ...`` (joins the cluster
it runs in through RAY_ADDRESS; otherwise it starts a private local Ray). S3 endpoint and keys may come from the
usual ``AWS_*`` environment variables instead of ``--storage-options``. Rerunning the same command computes only
the items not committed yet. Exit status: 0 all committed, 1 some item failed, 2 bad setup, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fnn_ray.sweep import SweepConfig, run_sweep
from jobs.cli import Parser, add_job_options, count, job_options, run_cli

#: The dry run: scans (session, scan_idx, units), clips, frames of the longest clip, frame size.
DRY_RUN_SCANS = ((4, 7, 300), (8, 5, 500), (9, 6, 400))
DRY_RUN_CLIPS, DRY_RUN_FRAMES, DRY_RUN_SIZE, DRY_RUN_CLIPS_PER_SHARD = 24, 30, (72, 128), 4
DRY_RUN_DIR = "fnn-ray-output"


def dry_run_inputs(root: str = DRY_RUN_DIR) -> tuple[str, str, str]:
    """Write the dry run's synthetic release and clips under ``root``; return (release, stimuli, output) URLs.

    Deterministic (fixed seeds), so a second dry run finds its output complete and computes nothing.
    """
    from fnn_model.config import NetworkConfig
    from jobs.make_synthetic import make_synthetic

    base = Path(root).resolve()
    release, stimuli = base / "sweep-release", base / "sweep-stimuli"
    make_synthetic(str(release), str(stimuli), DRY_RUN_SCANS, DRY_RUN_CLIPS, DRY_RUN_FRAMES, NetworkConfig.tiny(),
                   *DRY_RUN_SIZE, clips_per_file=12, seed=0)
    return str(release), str(stimuli), str(base)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m jobs.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_options(parser)
    parser.add_argument("--stimuli", help="stimulus dataset URL (a Parquet file or a directory of them)")
    parser.add_argument("--clips-per-shard", type=count(), default=None,
                        help="clips per work item (default: as recorded in the output, else from the data size)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    given = [args.release, args.stimuli, args.output]
    if any(given) and not all(given):
        parser.error("--release, --stimuli and --output are required (or give no arguments for a dry run)")

    def body():
        options = job_options(args)
        if any(given):
            release, stimuli, output = given
        else:
            start = time.perf_counter()
            print(f"fnn-ray dry run: writing a synthetic release and {DRY_RUN_CLIPS} clips under ./{DRY_RUN_DIR}/")
            release, stimuli, output = dry_run_inputs()
            print(f"  ({time.perf_counter() - start:.1f} s)")
            args.clips_per_shard = args.clips_per_shard or DRY_RUN_CLIPS_PER_SHARD
        summary = run_sweep(SweepConfig(release=release, stimuli=stimuli, output=output,
                                        clips_per_shard=args.clips_per_shard, **options))
        if summary.ok:
            from fnn_ray.responses import read_snippet

            print(read_snippet(output))
        return summary

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
