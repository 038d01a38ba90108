"""Write a synthetic release and stimulus set anywhere, to try the whole sweep path before real weights.

    python -m jobs.make_synthetic --release URL --stimuli URL [--scans 4-7:500,8-5:1000] [--clips N]
                                  [--frames T] [--config microns|tiny] [--height H --width W]
                                  [--storage-options JSON] [--seed S]

The release has the real on-disk format (random weights, `fnn_model.synthetic.make_release`); the stimuli are
random uint8 clips with eye positions and behaviour (`fnn_model.synthetic.random_clips`), written as the Parquet
stimulus dataset (`fnn_ray.stimuli.write_clips`). Clip lengths vary a little (T, T - T/10, T - T/5, ...) so that
batching with padding is exercised. Then run, e.g.:

    python -m jobs.sweep --release URL --stimuli URL --output URL
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fnn_model.config import NetworkConfig
from fnn_model.synthetic import make_release, random_behaviour, random_clips
from fnn_ray import storage
from fnn_ray.stimuli import Clip, write_clips

__all__ = ["make_synthetic", "parse_scan_units", "synthetic_clips"]

DEFAULT_SCANS = "4-7:500,8-5:1000,9-6:800"


def parse_scan_units(text: str) -> list[tuple[int, int, int]]:
    """``"4-7:500,8-5:1000"`` -> ``[(4, 7, 500), (8, 5, 1000)]`` (session, scan_idx, units)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            scan, units = part.split(":")
            session, scan_idx = scan.split("-")
            out.append((int(session), int(scan_idx), int(units)))
        except ValueError:
            raise ValueError(f"bad scan {part!r}: expected SESSION-SCAN_IDX:UNITS, e.g. 8-5:1000") from None
        if out[-1][2] < 1:
            raise ValueError(f"scan {scan} needs at least one unit")
    if not out:
        raise ValueError("no scans given")
    return out


def synthetic_clips(clips: int, frames: int, height: int, width: int, seed: int = 0) -> list[Clip]:
    """``clips`` random clips of ``frames`` (varying: up to 30 % shorter) uint8 ``[T, height, width]`` frames,
    with float32 ``[T, 2]`` eye positions and behaviour; ids ``clip-00000``, ..."""
    video = random_clips(clips, frames, height, width, seed=seed)  # [N, T, H, W]
    eye, behaviour = random_behaviour(clips, frames, seed=seed)  # [N, T, 2] each
    out = []
    for n in range(clips):
        length = max(1, frames - (n % 4) * (frames // 10))
        out.append(Clip(f"clip-{n:05d}", video[n, :length].copy(), eye[n, :length].copy(),
                        behaviour[n, :length].copy()))
    return out


def make_synthetic(
    release_url: str,
    stimuli_url: str,
    scans: Sequence[tuple[int, int, int]],
    clips: int = 16,
    frames: int = 30,
    config: NetworkConfig | None = None,
    height: int = 144,
    width: int = 256,
    clips_per_file: int = 32,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> None:
    """Write a random release of ``scans`` (session, scan_idx, units) and ``clips`` random clips (deterministic in
    ``seed``; ``overwrite`` replaces existing stimulus files)."""
    make_release(release_url, scans, config or NetworkConfig.tiny(), seed=seed, storage_options=storage_options)
    write_clips(stimuli_url, synthetic_clips(clips, frames, height, width, seed), storage_options,
                clips_per_file=clips_per_file, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.make_synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True, help="where to write the release (directory URL or .zip)")
    parser.add_argument("--stimuli", required=True, help="where to write the stimulus dataset (directory URL)")
    parser.add_argument("--scans", default=DEFAULT_SCANS, help=f"SESSION-SCAN:UNITS,... (default {DEFAULT_SCANS})")
    parser.add_argument("--clips", type=int, default=16, help="number of clips (default 16)")
    parser.add_argument("--frames", type=int, default=30, help="frames of the longest clip (default 30)")
    parser.add_argument("--config", choices=["microns", "tiny"], default="tiny",
                        help="network size: the MICrONS architecture or a ~1%% tiny one (default tiny)")
    parser.add_argument("--height", type=int, default=144)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--clips-per-file", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage-options", default=None, help="JSON fsspec options for every store (not echoed)")
    args = parser.parse_args(argv)
    try:
        scans = parse_scan_units(args.scans)
        options = json.loads(args.storage_options) if args.storage_options else None
    except (ValueError, json.JSONDecodeError) as e:
        parser.error(str(e))
    config = NetworkConfig.microns() if args.config == "microns" else NetworkConfig.tiny()
    start = time.perf_counter()
    make_synthetic(args.release, args.stimuli, scans, args.clips, args.frames, config, args.height, args.width,
                   args.clips_per_file, args.seed, options)
    units = sum(u for _, _, u in scans)
    print(f"wrote a synthetic {args.config} release of {len(scans)} scan(s), {units} unit(s) to "
          f"{storage.redact_url(args.release)}\nand {args.clips} clip(s) of <= {args.frames} frames "
          f"{args.height}x{args.width} to {storage.redact_url(args.stimuli)} in {time.perf_counter() - start:.1f} s")
    print(f"next: python -m jobs.sweep --release {storage.redact_url(args.release)} "
          f"--stimuli {storage.redact_url(args.stimuli)} --output OUTPUT_URL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
