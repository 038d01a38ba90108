"""Synthetic recordings of a *teacher* twin in the public ``training_data`` / ``evaluation_data`` layout (dry runs,
the planted-readout tests).

The teacher is :func:`fnn_model.training.teacher.make_teacher`: the release's frozen core, the foundation scan's
``modulation.lstm`` (what training copies and freezes), planted positions spread over the screen and random
feature weights. Responses are Poisson draws of its rates; eye and behaviour are smooth random traces; stimuli
are random images, each held for a few frames. Deterministic in ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fnn_model.config import NetworkConfig
from fnn_model.release import Release
from fnn_model.synthetic import make_release, random_clips
from fnn_model.training.teacher import make_teacher, teacher_responses
from fnn_model.training.twin import Twin
from fnn_ray import storage
from fnn_ray.recordings import write_repeat
from fnn_ray.training.layout import EVALUATION_DIR, write_trial

__all__ = ["Example", "smooth_traces", "write_example", "write_recordings"]


def smooth_traces(rng: np.random.Generator, frames: int, channels: int = 2, period: int = 10) -> np.ndarray:
    """Standard-normal-ish traces, float32 ``[frames, channels]``: random keys every ``period`` frames, linearly
    interpolated."""
    keys = rng.standard_normal((frames // period + 2, channels))
    t = np.arange(frames) / period
    return np.stack([np.interp(t, np.arange(len(keys)), keys[:, c]) for c in range(channels)], 1).astype(np.float32)


def _movies(n: int, frames: int, size: tuple[int, int], seed: int, hold: int = 3) -> np.ndarray:
    """``n`` random movies, uint8 ``[n, frames, H, W]``, each image held for ``hold`` frames."""
    images = random_clips(n, -(-frames // hold), *size, seed=seed)
    return np.repeat(images, hold, axis=1)[:, :frames]


def write_recordings(url: str, teacher: Twin, trials: int = 6, frames: int = 40, size: tuple[int, int] = (36, 64),
                     validation_every: int = 3, videos: int = 0, repeats: int = 0, seed: int = 0,
                     storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``trials`` trials of ``frames`` frames (every ``validation_every``-th a validation trial) and, when
    ``videos``, ``evaluation_data`` with ``repeats`` repeats of each video (new movies; each repeat its own eye,
    behaviour and Poisson draw) of ``teacher``'s responses under ``url``."""
    rng = np.random.default_rng(seed)
    movies = _movies(trials, frames, size, seed)
    eye = np.stack([smooth_traces(rng, frames) for _ in range(trials)])
    behaviour = np.stack([smooth_traces(rng, frames) for _ in range(trials)])
    _, counts = teacher_responses(teacher, movies, eye, behaviour, seed=seed)
    for i in range(trials):
        write_trial(url, str(i), (i + 1) % validation_every != 0, movies[i], eye[i], behaviour[i], counts[i],
                    storage_options)
    if videos:
        clips = _movies(videos, frames, size, seed + 7919)
        folder = storage.join(url, EVALUATION_DIR)
        for v in range(videos):
            eyes = np.stack([smooth_traces(rng, frames) for _ in range(repeats)]) * 0.3
            behaviours = np.stack([smooth_traces(rng, frames) for _ in range(repeats)]) * 0.3
            _, counts = teacher_responses(teacher, np.repeat(clips[v:v + 1], repeats, axis=0), eyes, behaviours,
                                          seed=seed * 7 + v + 1)
            for r in range(repeats):
                write_repeat(folder, f"video{v}", str(r), clips[v], counts[r], eyes[r], behaviours[r],
                             storage_options)


@dataclass
class Example:
    """What :func:`write_example` wrote: the ``foundation`` release URL, its ``scan``, the ``recordings`` URL and the
    ``teacher`` head."""

    foundation: str
    scan: tuple[int, int]
    recordings: str
    teacher: Twin


def write_example(root: str, units: int = 12, trials: int = 6, frames: int = 40, size: tuple[int, int] = (36, 64),
                  videos: int = 2, repeats: int = 4, seed: int = 0, foundation_scan: tuple[int, int] = (4, 7),
                  feature_scale: float = 1.5, log_rate: float = 1.0,
                  storage_options: Mapping[str, Any] | None = None) -> Example:
    """A tiny foundation release (``root/foundation``, one scan) and a teacher's recordings (``root/recordings``)."""
    foundation = storage.join(root, "foundation")
    make_release(foundation, [(*foundation_scan, 8)], NetworkConfig.tiny(), seed=seed,
                 storage_options=storage_options)
    release = Release.open(foundation, storage_options=storage_options)
    teacher = make_teacher(release, foundation_scan, units, seed=seed + 1, feature_scale=feature_scale,
                           log_rate=log_rate)
    recordings = storage.join(root, "recordings")
    write_recordings(recordings, teacher, trials, frames, size, videos=videos, repeats=repeats, seed=seed,
                     storage_options=storage_options)
    return Example(foundation, foundation_scan, recordings, teacher)
