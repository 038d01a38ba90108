"""Synthetic recordings of a *teacher* twin in the public ``training_data`` / ``evaluation_data`` layout (dry runs,
the planted-readout tests).

The teacher is a scan head on a release's frozen core whose ``modulation.lstm`` is the foundation scan's (what
training copies and freezes), with positions spread over the screen and random feature weights
(:func:`teacher_head`). Responses are Poisson draws of its rates; eye and behaviour are smooth random traces;
stimuli are temporally smooth random movies. Deterministic in ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fnn_model.config import NetworkConfig
from fnn_model.engine import Engine
from fnn_model.network import Core, ScanHead
from fnn_model.release import Release
from fnn_model.synthetic import make_head, make_release, random_clips
from fnn_ray import storage
from fnn_ray.recordings import write_repeat
from fnn_ray.training.layout import EVALUATION_DIR, write_trial

__all__ = ["Example", "smooth_traces", "teacher_head", "write_example", "write_recordings"]


def teacher_head(config: NetworkConfig, units: int, lstm_from: ScanHead, seed: int = 0, gain: float = 1.5,
                 rate: float = 3.0) -> ScanHead:
    """A random head of ``units`` units whose ``modulation.lstm`` is ``lstm_from``'s; feature weights scaled by
    ``gain`` and biases set so the typical rate is about ``rate`` events per frame."""
    head = make_head(config, units, seed=seed)
    with torch.no_grad():
        head.modulation.lstm.load_state_dict(lstm_from.modulation.lstm.state_dict())
        for w in head.readout.feature.weights:
            w.mul_(gain)
        for b in head.readout.biases:
            b.fill_(float(np.log(rate)))
    return head.eval()


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


def write_recordings(url: str, core: Core, head: ScanHead, trials: int = 6, frames: int = 40,
                     size: tuple[int, int] = (36, 64), validation_every: int = 3, videos: int = 0, repeats: int = 0,
                     seed: int = 0, storage_options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Write ``trials`` trials of ``frames`` frames (every ``validation_every``-th a validation trial) and,
    when ``videos``, ``evaluation_data`` with ``repeats`` repeats of each video (new movies; each repeat its own
    eye, behaviour and Poisson draw) under ``url``. Returns the teacher's rates per trial ``{trial: [n, U]}``."""
    rng = np.random.default_rng(seed)
    engine = Engine(core)
    engine.add_head((0, 0), head)

    def rates(movies: np.ndarray, eye: np.ndarray, behaviour: np.ndarray) -> np.ndarray:
        return engine.predict(movies, [(0, 0)], eye, behaviour)[(0, 0)]  # [N, T, U]

    movies = _movies(trials, frames, size, seed)
    eye = np.stack([smooth_traces(rng, frames) for _ in range(trials)])
    behaviour = np.stack([smooth_traces(rng, frames) for _ in range(trials)])
    truth = rates(movies, eye, behaviour)
    out = {}
    for i in range(trials):
        responses = rng.poisson(truth[i]).astype(np.float32)
        write_trial(url, str(i), (i + 1) % validation_every != 0, movies[i], eye[i], behaviour[i], responses,
                    storage_options)
        out[str(i)] = truth[i]
    if videos:
        clips = _movies(videos, frames, size, seed + 7919)
        folder = storage.join(url, EVALUATION_DIR)
        for v in range(videos):
            eyes = np.stack([smooth_traces(rng, frames) for _ in range(repeats)]) * 0.3
            behaviours = np.stack([smooth_traces(rng, frames) for _ in range(repeats)]) * 0.3
            truth = rates(np.repeat(clips[v:v + 1], repeats, axis=0), eyes, behaviours)
            for r in range(repeats):
                write_repeat(folder, f"video{v}", str(r), clips[v], rng.poisson(truth[r]).astype(np.float32),
                             eyes[r], behaviours[r], storage_options)
    return out


@dataclass
class Example:
    """What :func:`write_example` wrote: the ``foundation`` release URL, its ``scan``, the ``recordings`` URL and the
    ``teacher`` head."""

    foundation: str
    scan: tuple[int, int]
    recordings: str
    teacher: ScanHead


def write_example(root: str, units: int = 12, trials: int = 6, frames: int = 40, size: tuple[int, int] = (36, 64),
                  videos: int = 2, repeats: int = 4, seed: int = 0, foundation_scan: tuple[int, int] = (4, 7),
                  storage_options: Mapping[str, Any] | None = None) -> Example:
    """A tiny foundation release (``root/foundation``, one scan) and a teacher's recordings (``root/recordings``)."""
    foundation = storage.join(root, "foundation")
    make_release(foundation, [(*foundation_scan, 8)], NetworkConfig.tiny(), seed=seed,
                 storage_options=storage_options)
    release = Release.open(foundation, storage_options=storage_options)
    teacher = teacher_head(release.config, units, release.load_head(*foundation_scan), seed=seed + 1)
    recordings = storage.join(root, "recordings")
    write_recordings(recordings, release.load_core(), teacher, trials, frames, size, videos=videos, repeats=repeats,
                     seed=seed, storage_options=storage_options)
    return Example(foundation, foundation_scan, recordings, teacher)
