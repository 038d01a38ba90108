"""A prepared dataset on a training node: memory-mapped, never read whole, and the seeded training windows.

    data = PreparedData.open("s3://b/prepared/4-7")      # remote: copied once to a node-local cache, then mapped
    batch = data.batch(data.training_windows(rng, count=4, length=100))   # {"stimuli": uint8 [4, 100, H, W], ...}

A local dataset is mapped in place. A remote one is copied file by file into ``$FNN_RAY_CACHE`` (default
``<tmp>/fnn-ray-data``) under a folder named after its URL and ``stats.json`` (the copy is reused by every rank and
every later run on the node; a file is renamed into place once whole, so a killed copy is redone). Windows read
only their rows of the mapped arrays: no per-step object-store reads, no copy of the dataset in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fnn_ray import storage
from fnn_ray.training.layout import FRAME_KINDS
from fnn_ray.training.prepare import STATS_FILE, TRIALS_FILE, read_stats

__all__ = ["PreparedData", "Window", "cache_dir"]

#: A window: (row of trials.csv, first frame within the trial).
Window = tuple[int, int]


def cache_dir() -> str:
    """The node-local cache of remote prepared datasets."""
    return os.environ.get("FNN_RAY_CACHE") or os.path.join(tempfile.gettempdir(), "fnn-ray-data")


def _local_copy(url: str, stats: bytes, storage_options: Mapping[str, Any] | None) -> str:
    """Copy the remote dataset at ``url`` into the node cache (each file renamed into place once whole)."""
    fs, root = storage.filesystem(url, storage_options)
    key = hashlib.sha256(storage.redact_url(url).encode() + stats).hexdigest()[:16]
    target = os.path.join(cache_dir(), key)
    os.makedirs(target, exist_ok=True)
    for path in sorted(fs.find(root)):
        rel = path[len(root):].strip("/")
        local = os.path.join(target, *rel.split("/"))
        if rel.startswith("evaluation/"):
            continue
        size = fs.info(path)["size"]
        if os.path.exists(local) and os.path.getsize(local) == size:
            continue
        os.makedirs(os.path.dirname(local), exist_ok=True)
        partial = f"{local}.{uuid.uuid4().hex}.part"
        storage.retry(fs.get_file, path, partial, budget_s=300, what=f"copying {rel} to the node")
        os.replace(partial, local)
    return target


@dataclass
class PreparedData:
    """A prepared dataset (see :mod:`fnn_ray.training.prepare`), its arrays memory-mapped read-only.

    ``stats``: its ``stats.json``; ``trials``: trial, start, frames, training; ``arrays``: ``stimuli`` uint8
    ``[F, H, W]``, ``perspectives`` / ``modulations`` float32 ``[F, 2]``, ``units`` float32 ``[F, U]``.
    """

    url: str
    stats: dict[str, Any]
    trials: pd.DataFrame
    arrays: dict[str, np.ndarray]

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> PreparedData:
        """Map the dataset at ``url`` (a remote one via the node cache). FileNotFoundError when it is not a
        finished prepared dataset."""
        stats = read_stats(url, storage_options)
        if stats is None:
            raise FileNotFoundError(f"{storage.redact_url(url)} is not a prepared dataset (no {STATS_FILE}): "
                                    f"run jobs.prepare_twin first")
        fs, root = storage.filesystem(url, storage_options)
        local = root if storage.is_local(fs) else _local_copy(url, json.dumps(stats, sort_keys=True).encode(),
                                                                 storage_options)
        trials = pd.read_csv(os.path.join(local, TRIALS_FILE), dtype={"trial": str})
        arrays = {kind: np.load(os.path.join(local, f"{kind}.npy"), mmap_mode="r") for kind in FRAME_KINDS}
        return cls(url, stats, trials, arrays)

    @property
    def units(self) -> int:
        return int(self.stats["units"])

    def _pool(self, training: bool, length: int) -> np.ndarray:
        """Rows of the trials of the split that hold at least ``length`` frames."""
        rows = np.flatnonzero((self.trials.training.to_numpy() == training) & (self.trials.frames.to_numpy() >= length))
        if not len(rows):
            split = "training" if training else "validation"
            raise ValueError(f"{storage.redact_url(self.url)}: no {split} trial holds a window of {length} frames "
                             f"(longest: {int(self.trials.frames[self.trials.training == training].max())}); "
                             f"use a shorter --window")
        return rows

    def training_windows(self, rng: np.random.Generator, count: int, length: int) -> list[Window]:
        """``count`` windows of ``length`` frames: training trials drawn with replacement, start uniform."""
        rows = self._pool(True, length)
        picked = rng.choice(rows, size=count, replace=True)
        frames = self.trials.frames.to_numpy()
        return [(int(r), int(rng.integers(0, frames[r] - length + 1))) for r in picked]

    def validation_windows(self, count: int, length: int, seed: int = 0) -> list[Window]:
        """``count`` fixed windows of ``length`` frames from the validation trials (the same for every epoch
        and every run with the same ``seed``)."""
        rng = np.random.default_rng([seed, 0x7A1])
        rows = self._pool(False, length)
        picked = rng.choice(rows, size=count, replace=True)
        frames = self.trials.frames.to_numpy()
        return [(int(r), int(rng.integers(0, frames[r] - length + 1))) for r in picked]

    def batch(self, windows: Sequence[Window], length: int) -> dict[str, np.ndarray]:
        """The arrays of ``windows``: ``stimuli`` uint8 ``[B, T, H, W]``, ``perspectives`` / ``modulations``
        ``[B, T, 2]``, ``units`` ``[B, T, U]`` (T = ``length``; copies of just those rows)."""
        starts = self.trials.start.to_numpy()
        out = {}
        for kind, array in self.arrays.items():
            out[kind] = np.stack([array[starts[r] + s: starts[r] + s + length] for r, s in windows])
        return out
