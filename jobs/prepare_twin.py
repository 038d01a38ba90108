"""Prepare a lab's recordings for training a twin: check everything, summarise in one streaming pass, write a
dataset a training node memory-maps.

    python -m jobs.prepare_twin --from DIR --output URL --animal A --scan S-I [--impute] [--size 144x256]
                                [--storage-options JSON]

    python -m jobs.prepare_twin   # no arguments: a dry run on small synthetic recordings under ./fnn-ray-output/

DIR (any store): the public ``train_digital_twin`` layout, ``training_data/<kind>/<trial>.npy`` with kinds
training, samples, stimuli, perspectives, modulations, units, and optionally ``evaluation_data/`` (the layout
jobs.evaluate reads) and ``unit_ids.npy``. Every file is checked from the listing and the ``.npy`` headers first
(frame size, dtypes, unit counts, a training/validation split, missing kinds or trials); the pass then refuses a
NaN or inf in eye, behaviour or responses naming the file and frame, or with ``--impute`` fills it and records a
mask. Output: per-kind arrays, ``trials.csv``, ``evaluation/<session>-<scan_idx>/`` and ``stats.json`` (means,
SDs, unit ids, animal); see ``fnn_ray.training.prepare``. Bad input: one ``error:`` line, exit 2, nothing
written. A rerun on the same inputs does nothing. Exit status: 0 done, 2 bad input, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fnn_ray.preflight import parse_scans
from fnn_ray.training.prepare import PrepareConfig, prepare
from jobs.cli import parse_size, parse_storage_options, run_cli

__all__ = ["build_parser", "main"]

DRY_RUN_DIR = "fnn-ray-output"


def parse_scan(text: str) -> tuple[int, int]:
    """``"4-7"`` -> ``(4, 7)``; ValueError naming ``--scan`` otherwise."""
    scans = parse_scans(text)
    if not scans or len(scans) != 1:
        raise ValueError(f"--scan {text!r}: expected one SESSION-SCAN_IDX, e.g. 4-7")
    return scans[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare_twin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", help="the lab's folder (training_data/, evaluation_data/)")
    parser.add_argument("--output", help="URL of the prepared dataset (a local path, s3://bucket/prefix, ...)")
    parser.add_argument("--animal", help="the animal's id (recorded; the twin's identity with --scan)")
    parser.add_argument("--scan", help="SESSION-SCAN_IDX of the recording, e.g. 4-7")
    parser.add_argument("--impute", action="store_true",
                        help="fill non-finite eye, behaviour and response values (recorded in masks/) instead of "
                             "refusing them")
    parser.add_argument("--size", default="144x256", help="frame size HxW of the stimuli (default 144x256)")
    parser.add_argument("--storage-options", default=None, metavar="@FILE.json|JSON",
                        help="fsspec options for every store: @FILE.json (a file holding a JSON object) or the JSON "
                             "itself; never echoed")
    return parser


def dry_run_source(root: str = DRY_RUN_DIR) -> tuple[str, str]:
    """Write small synthetic recordings (a random twin's Poisson responses) under ``root``; return (source,
    output)."""
    import torch

    from fnn_ray.training.synthetic_data import write_example

    torch.set_num_threads(1)  # a tiny model gains nothing from more threads, and loses much on a busy machine
    base = Path(root).resolve()
    example = write_example(str(base / "twin-example"))
    return example.recordings, str(base / "twin-prepared")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    given = [args.source, args.output, args.animal, args.scan]
    if any(given) and not all(given):
        parser.error("--from, --output, --animal and --scan are required (or give no arguments for a dry run)")

    def body() -> int:
        options = parse_storage_options(args.storage_options)
        size = parse_size(args.size)
        if any(given):
            source, output, animal, scan = args.source, args.output, args.animal, parse_scan(args.scan)
        else:
            start = time.perf_counter()
            print(f"fnn-ray dry run: writing small synthetic recordings under ./{DRY_RUN_DIR}/")
            (source, output), animal, scan, size = dry_run_source(), "dry-run", (1, 1), (36, 64)
            print(f"  ({time.perf_counter() - start:.1f} s)")
        print(prepare(PrepareConfig(source=source, output=output, animal=animal, scan=scan, size=size,
                                    impute=args.impute, storage_options=options)))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
