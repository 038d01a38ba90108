"""Whole-connectome prediction sweep on Ray: Parquet stimuli on any store -> Parquet responses on any store.

    python -m jobs.sweep --release URL --stimuli URL --output URL [--scans 8-5,9-6] [--actors N]
                         [--clips-per-batch K] [--clips-per-shard C] [--dtype float32|bfloat16]
                         [--storage-options JSON] [--max-retries R] [--no-progress]

    python -m jobs.sweep          # no URLs: a CPU dry run on a small synthetic release and clips, written to
                                  # ./fnn-ray-output/ (responses in ./fnn-ray-output/responses)

On a cluster: ``ray job submit --working-dir . -- python -m jobs.sweep --release s3://... ...`` (connects to the
cluster it runs in; otherwise it starts a local Ray). S3 endpoint and keys may come from the usual ``AWS_*``
environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) instead of ``--storage-options``.
Rerunning the same command computes only the items not committed yet. Exit status: 0 when every item is
committed, 1 when some item failed (listed with file / row / clip), 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fnn_ray.driver import SweepConfig, parse_scans, run_sweep

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
    parser = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", help="release directory or .zip URL (params_*.pt, scans.csv, units.csv)")
    parser.add_argument("--stimuli", help="stimulus dataset URL (a Parquet file or a directory of them)")
    parser.add_argument("--output", help="output URL; responses go to OUTPUT/responses, the manifest to "
                                         "OUTPUT/manifest.json")
    parser.add_argument("--scans", default=None, help="SESSION-SCAN_IDX,... (default: every scan of the release)")
    parser.add_argument("--actors", type=int, default=None,
                        help="number of workers (default: one per GPU; CPU-only: CPUs/4)")
    parser.add_argument("--clips-per-batch", type=int, default=8, help="clips per model batch (default 8)")
    parser.add_argument("--clips-per-shard", type=int, default=None,
                        help="clips per work item (default: as recorded in the output, else from the data size)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--storage-options", default=None,
                        help="JSON fsspec options for every store, e.g. '{\"endpoint_url\": ...}' (never echoed)")
    parser.add_argument("--max-retries", type=int, default=2, help="retries of an item after a transient error")
    parser.add_argument("--max-heads", type=int, default=4, help="scan heads cached per worker (default 4)")
    parser.add_argument("--cpus-per-actor", type=float, default=None, help="Ray CPUs per worker")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [args.release, args.stimuli, args.output]
    try:
        options = json.loads(args.storage_options) if args.storage_options else None
        if options is not None and not isinstance(options, dict):
            raise ValueError("--storage-options must be a JSON object")
        dry = not any(given)
        if dry:
            start = time.perf_counter()
            print(f"fnn-ray dry run: writing a synthetic release and {DRY_RUN_CLIPS} clips under ./{DRY_RUN_DIR}/")
            release, stimuli, output = dry_run_inputs()
            print(f"  ({time.perf_counter() - start:.1f} s)")
            args.clips_per_shard = args.clips_per_shard or DRY_RUN_CLIPS_PER_SHARD
        elif all(given):
            release, stimuli, output = given
        else:
            parser.error("--release, --stimuli and --output are required (or give no arguments for a dry run)")
        config = SweepConfig(
            release=release, stimuli=stimuli, output=output, scans=parse_scans(args.scans), actors=args.actors,
            clips_per_batch=args.clips_per_batch, clips_per_shard=args.clips_per_shard, dtype=args.dtype,
            storage_options=options, max_retries=args.max_retries, max_heads=args.max_heads,
            cpus_per_actor=args.cpus_per_actor, progress=not args.no_progress, local_ray=dry,
        )
        summary = run_sweep(config)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
