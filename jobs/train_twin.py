"""Train a twin of a new mouse on the frozen foundation core, on Ray Train: resumable, one release at the end.

    python -m jobs.train_twin --release URL --data URL --animal A --output URL [--scan S-I ...] [--data URL ...]
                              [--workers N] [--gpus] [--epochs E] [--window T] [--batch B] [--train-batches K]
                              [--val-batches V] [--lr LR] [--foundation-scan 4-7] [--evaluate]
                              [--storage-options JSON] [--address RAY] [--wait-for-lock]
    python -m jobs.train_twin ... --plan-only [--simulate-twins 13 --simulate-gpus G]

    python -m jobs.train_twin     # no arguments: a CPU dry run (synthetic recordings of a planted teacher on a tiny
                                  # release, prepared and trained for a few epochs) under ./fnn-ray-output/

``--data``: a dataset written by jobs.prepare_twin (one per twin; its stats.json names animal and scan).
``--scan``: the twins to train (default: every --data). Each twin is its own Ray Train ``TorchTrainer`` with
``--workers`` ranks (one GPU each with ``--gpus``, else CPU ranks on gloo), run as a Ray task beside the others.
Output: ``run.json``, ``twins/<session>-<scan_idx>/`` (per-epoch checkpoints verified by hash, ``metrics.csv``,
``curves.png``), ``release/`` (the foundation core, each twin's head at its best validation epoch, scans.csv
with animal_id, units.csv) that every job opens, and with ``--evaluate`` ``evaluation/<session>-<scan_idx>/``.
A rerun of the same command resumes from the last checkpoint (after a killed driver, a killed worker or a lost
node). A release holds one animal: an output holding another animal's twins is refused. Exit status: 0 trained
and released, 1 a twin failed, 2 bad setup (one ``error:`` line, nothing written), 130/143 interrupted
(checkpoints kept).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fnn_ray.preflight import parse_scans
from fnn_ray.training.loop import TrainingSettings
from fnn_ray.training.twins import TrainConfig, format_plan, format_spread, plan_training, run_training
from jobs.cli import parse_storage_options, run_cli
from jobs.prepare_twin import parse_scan

__all__ = ["build_parser", "main"]

DRY_RUN_DIR = "fnn-ray-output"
#: The dry run's settings (a tiny release, 12 units, a few epochs on CPU).
DRY_RUN = dict(epochs=4, window=16, batch=2, train_batches=8, val_batches=2, burn_in=4, lr=0.1, clip=1e9)
#: A twin of the public example (8,509 units) costs about this on one H100-class GPU (TRAINING.md: 3-9 h).
TWIN_GPU_HOURS = 6.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_twin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", help="the foundation release (directory, .zip URL or 'microns')")
    parser.add_argument("--data", action="append", default=[], help="a prepared dataset URL (repeat per twin)")
    parser.add_argument("--animal", help="the animal id (must match each --data's stats.json)")
    parser.add_argument("--scan", action="append", default=[], help="SESSION-SCAN_IDX of a twin to train (repeat; "
                                                                    "default: every --data)")
    parser.add_argument("--output", help="output URL (a local path, s3://bucket/prefix, ...)")
    parser.add_argument("--foundation-scan", default="4-7", help="scan whose modulation LSTM is copied (default 4-7)")
    parser.add_argument("--workers", type=int, default=1, help="ranks per twin (default 1)")
    parser.add_argument("--gpus", action="store_true", help="one GPU per rank (default: CPU ranks)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per rank")
    parser.add_argument("--epochs", type=int, default=100, help="epochs (default 100)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up epochs (default epochs // 10)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    parser.add_argument("--clip", type=float, default=0.01,
                        help="adaptive gradient clipping relative to each parameter's norm (default 0.01, the "
                             "published value; large values turn it off)")
    parser.add_argument("--readout-clip", type=float, default=None,
                        help="the clip of the readout's per-unit tensors alone (default: --clip; not in the "
                             "published recipe: zero-initialised features barely grow under a relative clip)")
    parser.add_argument("--position-lr", type=float, default=1.0,
                        help="learning-rate scale of the readout positions mu and sigma (default 1, the published "
                             "recipe)")
    parser.add_argument("--window", type=int, default=100, help="frames per training window (default 100)")
    parser.add_argument("--batch", type=int, default=4, help="windows per step and rank (default 4)")
    parser.add_argument("--train-batches", type=int, default=500, help="steps per epoch (default 500)")
    parser.add_argument("--val-batches", type=int, default=20, help="validation batches per epoch (default 20)")
    parser.add_argument("--burn-in", type=int, default=10, help="frames not scored at the start of a window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-frames", type=int, default=None,
                        help="activation checkpointing over time chunks of K frames (less memory, ~1 more forward)")
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts per twin (default 3)")
    parser.add_argument("--evaluate", action="store_true", help="run jobs.evaluate on each twin's evaluation data")
    parser.add_argument("--plan-only", action="store_true", help="check the setup, print the plan, train nothing")
    parser.add_argument("--simulate-twins", type=int, default=None,
                        help="with --plan-only: how N twins of the public example size spread over --simulate-gpus")
    parser.add_argument("--simulate-gpus", type=int, default=4, help="GPUs of the simulated plan (default 4)")
    parser.add_argument("--storage-options", default=None, metavar="@FILE.json|JSON",
                        help="fsspec options for every store: @FILE.json (a file holding a JSON object) or the JSON "
                             "itself; never echoed")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    parser.add_argument("--wait-for-lock", action="store_true", help="wait while another run writes the output")
    parser.add_argument("--no-progress", action="store_true", help="no per-epoch lines")
    return parser


def dry_run_inputs(root: str = DRY_RUN_DIR) -> tuple[str, str, str]:
    """The dry run's foundation release and prepared dataset (written once) and its output: (release, data,
    output)."""
    import torch

    from fnn_ray.training.prepare import PrepareConfig, prepare
    from fnn_ray.training.synthetic_data import write_example

    torch.set_num_threads(1)  # a tiny model gains nothing from more threads, and loses much on a busy machine
    base = Path(root).resolve()
    example = write_example(str(base / "twin-example"))
    data = str(base / "twin-prepared")
    prepare(PrepareConfig(source=example.recordings, output=data, animal="dry-run", scan=(1, 1), size=(36, 64)))
    return example.foundation, data, str(base / "twin-output")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    given = [args.release, args.data, args.animal, args.output]
    simulated = args.plan_only and args.simulate_twins is not None
    if any(given) and not all(given) and not simulated:
        parser.error("--release, --data, --animal and --output are required (or give no arguments for a dry run)")

    def body():
        if simulated:
            if args.simulate_twins < 1 or args.simulate_gpus < 1:
                raise ValueError("--simulate-twins and --simulate-gpus must be >= 1")
            costs = {f"twin-{i + 1:02d}": TWIN_GPU_HOURS * (1 + 0.1 * (i % 3)) for i in range(args.simulate_twins)}
            print(f"simulated plan: twins of the public example size (8,509 units, {TWIN_GPU_HOURS:g}-"
                  f"{TWIN_GPU_HOURS * 1.2:g} GPU-h each at the published schedule)")
            print(format_spread(costs, args.simulate_gpus))
            return 0
        options = parse_storage_options(args.storage_options)
        scans = [parse_scan(s) for s in args.scan] or None
        foundation = parse_scans(args.foundation_scan)
        if not foundation or len(foundation) != 1:
            raise ValueError(f"--foundation-scan {args.foundation_scan!r}: expected one SESSION-SCAN_IDX")
        settings = dict(epochs=args.epochs, warmup=args.warmup, lr=args.lr, clip=args.clip, window=args.window,
                        batch=args.batch, train_batches=args.train_batches, val_batches=args.val_batches,
                        burn_in=args.burn_in, seed=args.seed, checkpoint_frames=args.checkpoint_frames,
                        readout_clip=args.readout_clip, position_lr=args.position_lr)
        if all(given):
            release, data, animal, output = args.release, args.data, args.animal, args.output
        else:
            start = time.perf_counter()
            print(f"fnn-ray dry run: a planted teacher's recordings, prepared, under ./{DRY_RUN_DIR}/")
            (release, data, output), animal = dry_run_inputs(), "dry-run"
            data, settings = [data], {**settings, **DRY_RUN, "warmup": 1}
            print(f"  ({time.perf_counter() - start:.1f} s)")
        config = TrainConfig(release=release, data=data, animal=animal, output=output, scans=scans,
                             foundation_scan=foundation[0], workers=args.workers, gpus=args.gpus,
                             cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                             evaluate=args.evaluate, address=args.address, storage_options=options,
                             wait_for_lock=args.wait_for_lock, verbose=not args.no_progress,
                             settings=TrainingSettings(**settings))
        plan = plan_training(config)
        if args.plan_only:
            print(format_plan(plan))
            return 0
        summary = run_training(config, plan)
        print(summary)
        if summary.interrupted:
            from jobs.cli import EXIT

            return EXIT.get(summary.interrupted, 130)
        return 0 if summary.ok else 1

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
