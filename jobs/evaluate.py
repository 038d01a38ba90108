"""Model performance against recorded responses with repeats: cc_abs, cc_max and cc_norm of every unit.

    python -m jobs.evaluate --release URL --recordings URL --output URL [--scans 8-5,9-6] [--burnin 10]
                            [--impute] [shared options: --actors, --dtype, --storage-options, --store-timeout, ...]

    python -m jobs.evaluate       # no URLs: a CPU dry run on a small synthetic release and recordings made from
                                  # the model's own predictions plus noise, under ./fnn-ray-output/evaluate-*

Recordings: one folder per scan named ``<session>-<scan_idx>`` holding the original package's evaluation layout
``{stimuli, perspectives, modulations, units}/<video>/<repeat>.npy`` (stimuli uint8 [T, H, W, 1], perspectives
and modulations float32 [T, 2], units float32 [T, U] in readout order, NaN where a unit was not recorded), on any
store. Everything is checked before Ray starts: the listing, the ``.npy`` headers and the values (a non-finite
eye position or behaviour value: exit 2 naming the file and frame, unless ``--impute`` fills it by linear
interpolation in time, the rule and counts recorded in the metadata; ``inf`` in the units: exit 2). Each work
item is one video of one scan: its repeats are predicted, each with its own eye and behaviour inputs, and reduced
to statistics on the worker. Output: the dataset ``OUTPUT/performance/`` (``scan-<s>-<i>.parquet``, one row per
unit with ``frames``, the frames it was scored on) and ``OUTPUT/performance/_files/`` (``units.csv`` in the
published column layout plus ``frames``, ``metadata.json``, ``plots/``). Definitions: shared/IN_SILICO.md
section 4. Exit status: 0 done, 1 some item failed, 2 bad setup, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fnn_ray import storage
from fnn_ray.evaluate import EvaluateConfig, format_performance, run_evaluate
from fnn_ray.recordings import write_repeat
from jobs.cli import Parser, add_job_options, count, job_options, run_cli

__all__ = ["build_parser", "dry_run_inputs", "main", "synthetic_recordings"]

#: The dry run: scans (session, scan_idx, units), videos, repeats, frames per repeat, frame size.
DRY_RUN_SCANS = ((4, 7, 30), (8, 5, 50), (9, 6, 40))
DRY_RUN_VIDEOS, DRY_RUN_REPEATS, DRY_RUN_FRAMES, DRY_RUN_SIZE = 4, 5, 40, (36, 64)
DRY_RUN_DIR = "fnn-ray-output"


def synthetic_recordings(release_url: str, recordings_url: str, videos: int = 4, repeats: int = 5,
                         frames: int = 40, height: int = 36, width: int = 64, noise: float = 0.5,
                         jitter: float = 0.05, gaps: bool = True, seed: int = 0,
                         scans: Sequence[tuple[int, int]] | None = None,
                         storage_options: Mapping[str, Any] | None = None) -> None:
    """Write recordings of ``scans`` (default every scan of the release) whose responses are the model's own
    predictions plus Gaussian noise.

    Every video has ``frames`` random uint8 ``[height, width]`` frames (the same in every repeat); each repeat
    gets its own eye positions and behaviour (the video's, plus ``jitter`` x standard-normal noise). Recorded =
    predicted + ``noise`` x (the unit's standard deviation over all predictions of the scan) x standard-normal
    noise. With ``gaps`` every path of the metrics is exercised: the last repeat of every odd-numbered video is
    missing, unit 0 was never recorded (NaN), unit 1 is constant (zero variance) and unit 2 was not recorded
    during the first repeat of video 0 (NaN). Deterministic in ``seed``.
    """
    from fnn_model.engine import Engine
    from fnn_model.release import Release
    from fnn_model.synthetic import random_behaviour, random_clips

    release = Release.open(release_url, storage_options=storage_options)
    engine = Engine(release.load_core())
    video_frames = random_clips(videos, frames, height, width, seed=seed)  # [V, T, H, W]
    eye, behaviour = random_behaviour(videos, frames, seed=seed)  # [V, T, 2] each
    rng = np.random.default_rng(seed)
    for session, scan_idx in scans or [info.key for info in release.scans]:
        scan = (session, scan_idx)
        engine.add_head(scan, release.load_head(*scan))
        shown = [(v, r) for v in range(videos) for r in range(repeats - (gaps and v % 2 == 1 and repeats > 1))]
        persp = {vr: eye[vr[0]] + jitter * rng.standard_normal(eye[0].shape, dtype=np.float32) for vr in shown}
        modul = {vr: behaviour[vr[0]] + jitter * rng.standard_normal(eye[0].shape, dtype=np.float32)
                 for vr in shown}
        batch = engine.predict(video_frames[[v for v, _ in shown]], [scan], np.stack([persp[vr] for vr in shown]),
                               np.stack([modul[vr] for vr in shown]))[scan]  # [N, T, U]
        predicted = dict(zip(shown, batch))
        spread = np.concatenate(list(predicted.values())).std(axis=0)  # [U]
        folder = storage.join(recordings_url, f"{session}-{scan_idx}")
        for (v, r), response in predicted.items():
            recorded = response + noise * spread * rng.standard_normal(response.shape, dtype=np.float32)
            if gaps:
                recorded[:, 0] = np.nan
                recorded[:, 1:2] = 1.0
                if (v, r) == (0, 0):
                    recorded[:, 2:3] = np.nan
            write_repeat(folder, f"video{v}", str(r), video_frames[v], recorded.astype(np.float32), persp[(v, r)],
                         modul[(v, r)], storage_options)
        engine.remove_head(scan)


def dry_run_inputs(root: str = DRY_RUN_DIR) -> tuple[str, str, str]:
    """Write the dry run's synthetic release and recordings under ``root``; return (release, recordings,
    output) URLs. Deterministic (fixed seeds), so a second dry run finds its output complete."""
    from fnn_model.config import NetworkConfig
    from fnn_model.synthetic import make_release

    base = Path(root).resolve()
    release, recordings = base / "evaluate-release", base / "evaluate-recordings"
    make_release(str(release), list(DRY_RUN_SCANS), NetworkConfig.tiny(), seed=0)
    synthetic_recordings(str(release), str(recordings), DRY_RUN_VIDEOS, DRY_RUN_REPEATS, DRY_RUN_FRAMES,
                         *DRY_RUN_SIZE, seed=0)
    return str(release), str(recordings), str(base / "evaluate-output")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m jobs.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_options(parser)
    parser.add_argument("--recordings", help="recordings URL: one <session>-<scan_idx> folder per scan")
    parser.add_argument("--burnin", type=count(0), default=10, help="frames at the start of every repeat never scored "
                                                               "(default 10)")
    parser.add_argument("--impute", action="store_true",
                        help="fill non-finite eye positions and behaviour by linear interpolation in time (default: "
                             "refuse them, naming the file and frame)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    given = [args.release, args.recordings, args.output]
    if any(given) and not all(given):
        parser.error("--release, --recordings and --output are required (or give no arguments for a dry run)")

    def body():
        options = job_options(args)
        if any(given):
            release, recordings, output = given
        else:
            start = time.perf_counter()
            print(f"fnn-ray dry run: writing a synthetic release and recordings ({DRY_RUN_VIDEOS} videos x "
                  f"{DRY_RUN_REPEATS} repeats per scan) under ./{DRY_RUN_DIR}/")
            release, recordings, output = dry_run_inputs()
            print(f"  ({time.perf_counter() - start:.1f} s)")
        evaluation = run_evaluate(EvaluateConfig(release=release, recordings=recordings, output=output,
                                                 burnin=args.burnin, impute=args.impute, **options))
        if evaluation.tables:
            shown = storage.join(storage.redact_url(evaluation.summary.output_url), "performance")
            imputed = (f", imputed input frames {evaluation.imputed}" if args.impute else "")
            print(f"\nperformance (burn-in {args.burnin} frames{imputed}):\n"
                  f"{format_performance(evaluation.tables, evaluation.scan_frames)}\n"
                  f"  dataset (one row per unit): {shown}\n  published layout: {shown}/_files/units.csv\n"
                  f"  metadata: {shown}/_files/metadata.json\n  plots: {shown}/_files/plots/")
        return evaluation.summary

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
