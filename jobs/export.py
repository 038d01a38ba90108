"""Export to the published MICrONS layout (shared/IN_SILICO.md section 5).

    python -m jobs.export --output OUT --to URL [--scans 8-5,9-6] [--stimuli URL] [--stimulus] [--overwrite]
                          [--work-dir DIR] [--storage-options JSON]
        the sweep at OUT -> URL/responses/: responses.npy float32 [units, frames], units.csv (session, scan_idx,
        unit_id, readout_id: the rows of the array), metadata.csv (one row per scan; its `stimulus` column
        names the stimulus dataset, or stimulus.npy), clips.csv (one row per clip: clip_id, its columns
        start/stop, context_frames, burnin_frames) and, with --stimulus, stimulus.npy uint8 [frames, H, W]

    python -m jobs.export --readout --release URL --to URL [--scans 8-5,9-6] [--overwrite] [--storage-options JSON]
        the release alone -> URL/readout/: readout_weights.npy [units, streams x channels],
        readout_locations.npy [units, 2] (mu), units.csv (session, scan_idx, unit_id)

Read the array with ``numpy.load(".../responses.npy", mmap_mode="r")``. Memory stays bounded however large the
array (it is filled by memory map, one record batch of one part file at a time). For a remote --to the files are
built in a local temporary directory (--work-dir, default $TMPDIR; it must hold the array) and uploaded at the
end; a local --to is built in place under URL/_staging/. Nothing is left at --to when the export fails. A sweep
with uncommitted items is refused (naming them), and so is a --to that holds an export already, unless
--overwrite. Exit status: 0 written, 2 bad setup or data (one ``error:``
line), 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from fnn_ray.export import export_readout, export_responses
from fnn_ray.preflight import parse_scans
from jobs.cli import Parser, parse_storage_options, run_cli

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m jobs.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="the sweep's output URL (responses export)")
    parser.add_argument("--readout", action="store_true", help="export the readout of --release instead")
    parser.add_argument("--release", help="release directory or .zip URL (with --readout)")
    parser.add_argument("--to", required=True, help="where the published layout goes (local path, s3://...)")
    parser.add_argument("--scans", default=None, help="SESSION-SCAN_IDX,... (default: every scan, in order)")
    parser.add_argument("--stimuli", default=None,
                        help="stimulus dataset URL (default: the one recorded in the sweep's manifest)")
    parser.add_argument("--stimulus", action="store_true",
                        help="also write stimulus.npy: the frame of every column of responses.npy")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already at --to")
    parser.add_argument("--work-dir", default=None,
                        help="local directory for building the files of a remote --to (default $TMPDIR)")
    parser.add_argument("--storage-options", default=None,
                        help="JSON fsspec options for every store, e.g. '{\"endpoint_url\": ...}' (never echoed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.readout and (not args.release or args.output or args.stimuli or args.stimulus):
        parser.error("--readout takes --release (not --output, --stimuli or --stimulus)")
    if not args.readout and (not args.output or args.release):
        parser.error("--output is required (or --readout with --release)")

    def body() -> int:
        options = parse_storage_options(args.storage_options)
        scans = parse_scans(args.scans)
        if args.readout:
            result = export_readout(args.release, args.to, scans, options, work_dir=args.work_dir,
                                    overwrite=args.overwrite)
        else:
            result = export_responses(args.output, args.to, scans, options, stimuli_url=args.stimuli,
                                      work_dir=args.work_dir, stimulus=args.stimulus, overwrite=args.overwrite,
                                      log=print)
        print(result)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
