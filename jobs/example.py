"""The upstream README's example: 3 seconds of black, gray and white frames through one scan.

    python -m jobs.example                       # on a synthetic release written to ./fnn-ray-output/release
    python -m jobs.example --release DIR_OR_ZIP --scan 8-5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fnn_model import NetworkConfig, microns
from fnn_model.release import Release
from fnn_model.synthetic import make_release


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", help="release directory/.zip URL (default: a synthetic MICrONS-size release)")
    parser.add_argument("--scan", default=None, help="SESSION-SCAN_IDX (default: the release's first scan)")
    args = parser.parse_args(argv)

    release_url = args.release
    if release_url is None:
        release_url = str(Path("fnn-ray-output/release").resolve())
        if not Path(release_url, "scans.csv").exists():
            print(f"writing a synthetic release (MICrONS architecture, random weights) to {release_url}")
            make_release(release_url, [(8, 5, 1000)], NetworkConfig(), seed=0)
    release = Release.open(release_url)
    session, scan_idx = map(int, args.scan.split("-")) if args.scan else release.scans[0].key
    model, units = microns.scan(session, scan_idx, directory=release_url)

    frames = [np.full((144, 256), value, np.uint8) for value in (0, 128, 255) for _ in range(30)]
    start = time.perf_counter()
    responses = model.predict(stimuli=frames)
    seconds = time.perf_counter() - start
    print(f"scan {session}-{scan_idx}: responses {responses.shape} (frames x units) in {seconds:.1f} s "
          f"({len(frames) / seconds:.1f} frames/s)")
    for name, part in zip(("black", "gray", "white"), np.split(responses, 3)):
        print(f"  {name:5s}: mean rate {part.mean():.4f}, last frame mean {part[-1].mean():.4f}")
    print(f"  unit ids of the first 5 columns: {units.unit_id.tolist()[:5]}")


if __name__ == "__main__":
    main()
