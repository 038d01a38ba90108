"""Synthetic recordings of a *teacher* twin in the public ``training_data`` / ``evaluation_data`` layout (dry runs,
the planted-readout tests).

The teacher is :func:`fnn_model.training.teacher.make_teacher`: the release's frozen core, the foundation scan's
``modulation.lstm`` (what training copies and freezes), planted positions spread over the screen and random
feature weights. Responses are Poisson draws of its rates; eye and behaviour are smooth random traces; stimuli
are random images, each held for a few frames, or drifting gratings (``stimulus="gratings"``: a new direction,
spatial frequency, speed and phase every few frames). Deterministic in ``seed``.
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


def _gratings(n: int, frames: int, size: tuple[int, int], seed: int, hold: int = 8) -> np.ndarray:
    """``n`` movies of full-contrast drifting sine gratings, uint8 ``[n, frames, H, W]``: every ``hold`` frames a
    new direction, spatial frequency (0.5-1.25 cycles per screen width), speed and phase."""
    rng = np.random.default_rng(seed)
    height, width = size
    y, x = np.meshgrid(np.linspace(-1, 1, height) * height / width, np.linspace(-1, 1, width), indexing="ij")
    out = np.empty((n, frames, height, width), np.float32)
    for i in range(n):
        for start in range(0, frames, hold):
            theta, freq = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 2.5) * np.pi
            speed, phase = rng.uniform(0.2, 0.6) * np.pi, rng.uniform(0, 2 * np.pi)
            for t in range(start, min(start + hold, frames)):
                out[i, t] = np.sin(freq * (np.cos(theta) * x + np.sin(theta) * y) - speed * (t - start) + phase)
    return ((out + 1) * 127.5).round().astype(np.uint8)


def _movies(n: int, frames: int, size: tuple[int, int], seed: int, hold: int = 3, stimulus: str = "images"
            ) -> np.ndarray:
    """``n`` movies, uint8 ``[n, frames, H, W]``: random images each held for ``hold`` frames, or
    ``stimulus="gratings"`` (:func:`_gratings`, a new grating every ``hold`` frames)."""
    if stimulus == "gratings":
        return _gratings(n, frames, size, seed, hold)
    if stimulus != "images":
        raise ValueError(f"unknown stimulus {stimulus!r} (images or gratings)")
    images = random_clips(n, -(-frames // hold), *size, seed=seed)
    return np.repeat(images, hold, axis=1)[:, :frames]


def write_recordings(url: str, teacher: Twin, trials: int = 6, frames: int = 40, size: tuple[int, int] = (36, 64),
                     validation_every: int = 3, videos: int = 0, repeats: int = 0, seed: int = 0,
                     storage_options: Mapping[str, Any] | None = None, stimulus: str = "images",
                     hold: int = 3) -> None:
    """Write ``trials`` trials of ``frames`` frames (every ``validation_every``-th a validation trial) and, when
    ``videos``, ``evaluation_data`` with ``repeats`` repeats of each video (new movies; each repeat its own eye,
    behaviour and Poisson draw) of ``teacher``'s responses under ``url``. ``stimulus``, ``hold``: see
    :func:`_movies`."""
    rng = np.random.default_rng(seed)
    movies = _movies(trials, frames, size, seed, hold, stimulus)
    eye = np.stack([smooth_traces(rng, frames) for _ in range(trials)])
    behaviour = np.stack([smooth_traces(rng, frames) for _ in range(trials)])
    _, counts = teacher_responses(teacher, movies, eye, behaviour, seed=seed)
    for i in range(trials):
        write_trial(url, str(i), (i + 1) % validation_every != 0, movies[i], eye[i], behaviour[i], counts[i],
                    storage_options)
    if videos:
        clips = _movies(videos, frames, size, seed + 7919, hold, stimulus)
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
                  storage_options: Mapping[str, Any] | None = None, planted: bool = False) -> Example:
    """A tiny foundation release (``root/foundation``, one scan) and a teacher's recordings (``root/recordings``).

    ``planted=True``: the design of the planted-readout acceptance (docs/training.md): a foundation core that
    follows the stimulus (first conv x10, no biases: a short start transient) with identical streams (a stream
    alone computes the stream mean, so training mode can match the teacher) and a whitened output (centred, equal
    variance in every direction on other gratings: features learn at one rate), the teacher's perspective and
    modulation MLP the student's initial ones (``build_twin(seed=0)``, the trainer's default ``--seed``), planted
    positions within ``(-0.4, 0.4)^2`` (about a core-grid cell from the initial ``mu = 0``: the loss has its
    basin within about a cell of the planted position) and drifting gratings held 8 frames. Default False: the
    generic dry-run example, as before."""
    foundation = storage.join(root, "foundation")
    core = dict(input_gain=10.0, biases=False, shared_streams=True,
                whiten=_movies(8, 48, size, seed + 104729, 8, "gratings")) if planted else None
    make_release(foundation, [(*foundation_scan, 8)], NetworkConfig.tiny(), seed=seed,
                 storage_options=storage_options, core_options=core)
    release = Release.open(foundation, storage_options=storage_options)
    teacher = make_teacher(release, foundation_scan, units, seed=seed + 1, feature_scale=feature_scale,
                           log_rate=log_rate, head_seed=0 if planted else None, extent=0.4 if planted else 0.8)
    recordings = storage.join(root, "recordings")
    write_recordings(recordings, teacher, trials, frames, size, videos=videos, repeats=repeats, seed=seed,
                     storage_options=storage_options, stimulus="gratings" if planted else "images",
                     hold=8 if planted else 3)
    return Example(foundation, foundation_scan, recordings, teacher)
