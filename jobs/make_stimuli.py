"""Import a movie (.npy, .npz, a folder of trials or a video) as a stimulus dataset, streaming.

    python -m jobs.make_stimuli --from SRC --output URL [--clip-frames N | --boundaries FILE]
                                [--context-frames W] [--strict-context] [--key KEY] [--size HxW] [--resize]
                                [--fps F] [--clips-per-file C] [--storage-options JSON] [--overwrite]

SRC: a uint8 ``[T, H, W]`` / ``[T, H, W, 1]`` ``.npy`` (memory-mapped locally, ranged reads on remote URLs), a
``.npz`` (frames under ``stimulus`` / ``stimuli`` / ``--key``, optional ``perspectives`` / ``modulations``), a
folder ``stimuli/<trial>.npy`` [+ ``perspectives/``, ``modulations/``] (one movie per trial), or a video file
(gray, resized to ``--size``, resampled to ``--fps`` 30 Hz by sample-and-hold). ``--size``: the frame size of the
release the clips are for (default 144x256, the MICrONS release); movies of another size are refused unless
``--resize`` is given, and so is a movie that looks like ``[H, W, T]`` (time last) or is shorter than
``--clip-frames``. Clips: ``--clip-frames
N``, a ``--boundaries`` file (``start`` or ``start,stop`` per line), or one clip per movie; ``--context-frames W``
prepends up to W frames of the movie before each clip (run by the model, not written; see
docs/context_frames.md). Details: ``fnn_ray.importers``.

Writes ``part-NNNNN.parquet`` files (one clip per row group, each file committed atomically; memory holds one
file) and prints a summary. Bad input: one line ``error: ...`` and exit 2, with every file this run wrote
removed (``--overwrite`` deletes the old files only once the first new one is ready). With no arguments: a dry
run that writes a small synthetic movie to ./fnn-ray-output/movie.npy and imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from fnn_model.synthetic import random_clips
from fnn_ray import storage
from fnn_ray.importers import import_clips
from fnn_ray.stimuli import ClipWriter
from jobs.cli import Parser, count, parse_size, parse_storage_options, positive

__all__ = ["main", "make_stimuli", "synthetic_movie"]

DRY_RUN_DIR = "fnn-ray-output"
#: Files are finished at this many bytes of frames: with one file in memory, this bounds the job's memory.
MAX_FILE_BYTES = 256 << 20


def synthetic_movie(frames: int, height: int = 144, width: int = 256, seed: int = 0, period: int = 15) -> np.ndarray:
    """A temporally smooth random movie, uint8 ``[frames, height, width]``: random keyframes
    (:func:`fnn_model.synthetic.random_clips`) every ``period`` frames, linearly interpolated in between."""
    keys = random_clips(1, frames // period + 2, height, width, seed=seed)[0].astype(np.float32)
    t = np.arange(frames)
    weight = (t % period / period)[:, None, None].astype(np.float32)
    movie = (1 - weight) * keys[t // period] + weight * keys[t // period + 1]
    return np.round(movie).astype(np.uint8)


def make_stimuli(
    source: str,
    output: str,
    *,
    clip_frames: int | None = None,
    boundaries: str | None = None,
    context_frames: int = 0,
    strict_context: bool = False,
    key: str | None = None,
    size: tuple[int, int] | None = None,
    resize: bool = False,
    fps: float | None = None,
    clips_per_file: int = 32,
    storage_options: dict | None = None,
    overwrite: bool = False,
) -> ClipWriter:
    """Stream the clips of ``source`` (:func:`fnn_ray.importers.import_clips`) into a stimulus dataset at
    ``output``; return the closed writer (its ``files``, ``clips``, ``frames``, ``context_frames``, ``bytes``).
    On any error every file written is removed and the error propagates."""
    clips = import_clips(source, clip_frames=clip_frames, boundaries=boundaries, context_frames=context_frames,
                         strict_context=strict_context, key=key, size=size, resize=resize, fps=fps,
                         storage_options=storage_options)
    columns = ["context_frames"] if context_frames else []  # in every file, also the first (context-free) one
    with ClipWriter(output, storage_options, clips_per_file=clips_per_file, max_file_bytes=MAX_FILE_BYTES,
                    overwrite=overwrite, columns=columns) as writer:
        for clip in clips:
            writer.write(clip)
        if not writer.clips:
            raise ValueError(f"{storage.redact_url(source)}: no clips")
    return writer


def _dry_run_source() -> str:
    path = os.path.join(DRY_RUN_DIR, "movie.npy")
    os.makedirs(DRY_RUN_DIR, exist_ok=True)
    np.save(path, synthetic_movie(300, 72, 128))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jobs.make_stimuli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", help="the movie: .npy, .npz, trial folder or video (URL or path)")
    parser.add_argument("--output", help="where to write the stimulus dataset (directory URL)")
    cuts = parser.add_mutually_exclusive_group()
    cuts.add_argument("--clip-frames", type=count(), help="cut each movie into clips of N frames")
    cuts.add_argument("--boundaries", help="file of clip starts (or start,stop pairs), one per line")
    parser.add_argument("--context-frames", type=count(0), default=0, help="frames of the movie before each clip (0)")
    parser.add_argument("--strict-context", action="store_true",
                        help="a clip with fewer context frames before it than asked is an error")
    parser.add_argument("--key", help=".npz: the frames array (default stimulus, stimuli or the only one)")
    parser.add_argument("--size", default="144x256",
                        help="HEIGHTxWIDTH of the release's stimulus frames (default 144x256, the MICrONS release)")
    parser.add_argument("--resize", action="store_true", help="resize movies of another frame size to --size")
    parser.add_argument("--fps", type=positive, help="video: frame rate of the clips (default 30)")
    parser.add_argument("--clips-per-file", type=count(), default=32)
    parser.add_argument("--storage-options", help="JSON fsspec options for every store (not echoed)")
    parser.add_argument("--overwrite", action="store_true", help="replace the Parquet files already at --output")
    args = parser.parse_args(argv)
    if args.source is None and args.output is None:
        print(f"dry run: a synthetic movie in ./{DRY_RUN_DIR}/movie.npy -> ./{DRY_RUN_DIR}/movie-stimuli/")
        args.source, args.output = _dry_run_source(), os.path.join(DRY_RUN_DIR, "movie-stimuli")
        args.clip_frames, args.context_frames, args.overwrite, args.size = 60, 30, True, "72x128"
    elif args.source is None or args.output is None:
        parser.error("give both --from and --output (or neither, for a dry run)")
    start = time.perf_counter()
    try:
        options = parse_storage_options(args.storage_options)
        writer = make_stimuli(
            args.source, args.output, clip_frames=args.clip_frames, boundaries=args.boundaries,
            context_frames=args.context_frames, strict_context=args.strict_context, key=args.key,
            size=parse_size(args.size), resize=args.resize, fps=args.fps, clips_per_file=args.clips_per_file,
            storage_options=options, overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {storage.redact_url(str(e))}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    output = storage.redact_url(args.output)
    print(f"wrote {writer.clips} clip(s), {writer.frames} frames ({writer.context_frames} of them context) in "
          f"{len(writer.files)} file(s), {writer.bytes / 1e6:.1f} MB, to {output} in {wall:.2f} s")
    print(f"next: python -m jobs.sweep --release RELEASE --stimuli {output} --output OUTPUT_URL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
