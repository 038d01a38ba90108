"""The public ``training_data`` layout of a lab's recordings: listing and every check that needs no array data.

Layout, on any fsspec URL (the public ``train_digital_twin`` folder)::

    DIR/training_data/training/<trial>.npy      bool, one value: a training (True) or validation (False) trial
    DIR/training_data/samples/<trial>.npy       int, one value: the trial's frames n
    DIR/training_data/stimuli/<trial>.npy       uint8 [n, H, W, 1] (or [n, H, W]) at 30 Hz
    DIR/training_data/perspectives/<trial>.npy  float [n, 2]   pupil x/y (z-scored on the training set)
    DIR/training_data/modulations/<trial>.npy   float [n, 2]   pupil radius, treadmill speed (z-scored)
    DIR/training_data/units/<trial>.npy         float [n, U]   responses, same units in the same order in every trial
    DIR/evaluation_data/{stimuli,perspectives,modulations,units}/<video>/<repeat>.npy   (optional; the layout
                                                 jobs.evaluate reads, see fnn_ray.recordings)
    DIR/unit_ids.npy                            int [U] (optional; default 0..U-1)

:func:`list_training` reads the listing, the ``.npy`` headers and the one-value ``training`` / ``samples`` arrays,
never the frames. Each failure is one line naming the file and what was expected. Non-finite values are found by
the streaming pass (:mod:`fnn_ray.training.prepare`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fnn_ray import storage
from fnn_ray.recordings import (VideoRepeats, list_scan, load_npy, natural_key, npy_bytes, npy_header,
                                read_npy_headers)

__all__ = ["FRAME_KINDS", "KINDS", "TrainingLayout", "Trial", "list_training", "write_trial"]

#: Every kind of the layout, in the order they are checked.
KINDS = ("training", "samples", "stimuli", "perspectives", "modulations", "units")
#: The kinds with one row per frame.
FRAME_KINDS = ("stimuli", "perspectives", "modulations", "units")
TRAINING_DIR, EVALUATION_DIR, UNIT_IDS = "training_data", "evaluation_data", "unit_ids.npy"


@dataclass(frozen=True)
class Trial:
    """One trial: its ``name``, ``frames`` n and whether it is a ``training`` (else validation) trial."""

    name: str
    frames: int
    training: bool


@dataclass(frozen=True)
class TrainingLayout:
    """A checked ``DIR``: its ``trials`` (name order), ``units`` U, frame ``size`` (H, W), ``unit_ids`` ``[U]``,
    the ``files`` ``{kind: {trial: URL}}`` and the evaluation videos (``evaluation``: empty without
    ``evaluation_data``)."""

    url: str
    trials: tuple[Trial, ...]
    units: int
    size: tuple[int, int]
    unit_ids: tuple[int, ...]
    files: Mapping[str, Mapping[str, str]]
    evaluation: tuple[VideoRepeats, ...] = ()

    @property
    def frames(self) -> int:
        return sum(t.frames for t in self.trials)

    def shown(self, kind: str, trial: str) -> str:
        """The file's URL as shown to a user (``DIR/training_data/<kind>/<trial>.npy``)."""
        return storage.redact_url(self.files[kind][trial])


def _listing(fs: Any, root: str, shown: str) -> dict[str, dict[str, tuple[str, int]]]:
    """``{kind: {trial: (path, size)}}`` of ``root/training_data``."""
    base = posixpath.join(root, TRAINING_DIR)
    fs.invalidate_cache(base)
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        found = {}
    if not found:
        raise FileNotFoundError(f"{storage.join(shown, TRAINING_DIR)} not found or empty: expected "
                                f"{TRAINING_DIR}/<kind>/<trial>.npy with kinds {', '.join(KINDS)}")
    files: dict[str, dict[str, tuple[str, int]]] = {kind: {} for kind in KINDS}
    for path, info in sorted(found.items()):
        rel = path[len(base):].strip("/")
        parts = rel.split("/")
        if not rel.endswith(".npy") or any(p.startswith(("_", ".")) for p in parts):
            continue
        where = storage.join(shown, TRAINING_DIR, rel)
        if len(parts) != 2 or parts[0] not in KINDS:
            raise ValueError(f"{where}: unexpected file; expected {TRAINING_DIR}/<kind>/<trial>.npy with kinds "
                             f"{', '.join(KINDS)}")
        files[parts[0]][parts[1][: -len(".npy")]] = (path, int(info.get("size") or 0))
    for kind in KINDS:
        if not files[kind]:
            raise FileNotFoundError(f"{storage.join(shown, TRAINING_DIR, kind)}/ is missing or empty: expected "
                                    f"one {kind}/<trial>.npy per trial")
    trials = set(files["stimuli"])
    for kind in KINDS:
        for name in sorted(trials ^ set(files[kind]), key=natural_key)[:1]:
            lacking, having = (kind, "stimuli") if name in trials else ("stimuli", kind)
            raise FileNotFoundError(f"{storage.join(shown, TRAINING_DIR, lacking, name + '.npy')} is missing "
                                    f"({storage.join(shown, TRAINING_DIR, having, name + '.npy')} exists)")
    return files


def _scalar(data: bytes, where: str, kind: str) -> bool | int:
    array = load_npy(data, where)
    if array.size != 1:
        raise ValueError(f"{where}: {kind} must hold one value, got shape {list(array.shape)}")
    value = array.reshape(()).item()
    if kind == "training":
        if array.dtype != np.bool_ and not (np.issubdtype(array.dtype, np.integer) and value in (0, 1)):
            raise ValueError(f"{where}: training must be a bool (True: training trial, False: validation), "
                             f"got {array.dtype} {value!r}")
        return bool(value)
    if not np.issubdtype(array.dtype, np.integer) or value < 1:
        raise ValueError(f"{where}: samples must be an integer >= 1 (the trial's frames), got {array.dtype} "
                         f"{value!r}")
    return int(value)


def _check_frames(kind: str, shape: tuple[int, ...], dtype: np.dtype, where: str, size: tuple[int, int]) -> int:
    """Check a per-frame array's dtype and shape; return its frame count (units: its U is checked by the caller)."""
    if kind == "stimuli":
        if dtype != np.uint8:
            raise ValueError(f"{where}: stimuli must be uint8, got {dtype}")
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or tuple(shape[1:3]) != size:
            raise ValueError(f"{where}: stimuli must be [n, {size[0]}, {size[1]}, 1] (frame size --size "
                             f"{size[0]}x{size[1]}), got {list(shape)}")
    else:
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"{where}: {kind} must be a float array, got {dtype}")
        if len(shape) != 2 or (kind != "units" and shape[1] != 2) or shape[1] < 1:
            expected = "[n, U]" if kind == "units" else "[n, 2]"
            raise ValueError(f"{where}: {kind} must be {expected}, got {list(shape)}")
    if shape[0] < 1:
        raise ValueError(f"{where}: no frames")
    return int(shape[0])


def _unit_ids(fs: Any, root: str, shown: str, units: int) -> tuple[int, ...]:
    path = posixpath.join(root, UNIT_IDS)
    if not fs.exists(path):
        return tuple(range(units))
    where = storage.join(shown, UNIT_IDS)
    ids = load_npy(fs.cat_file(path), where)
    if not np.issubdtype(ids.dtype, np.integer) or ids.shape != (units,):
        raise ValueError(f"{where}: expected int [U] = [{units}] unit ids, got {ids.dtype} {list(ids.shape)}")
    if len(np.unique(ids)) != units:
        raise ValueError(f"{where}: unit ids must be distinct")
    return tuple(int(i) for i in ids)


def list_training(url: str, size: tuple[int, int] = (144, 256),
                  storage_options: Mapping[str, Any] | None = None) -> TrainingLayout:
    """List and check ``url`` (see the module docstring); ``size``: the expected frame size (H, W).

    ValueError / FileNotFoundError naming the file: a missing kind or trial, a wrong dtype or shape, a file
    shorter or longer than its header says, ``samples`` disagreeing with a per-frame array, unit counts that
    differ between trials, no training or no validation trial, bad ``evaluation_data``.
    """
    shown = storage.redact_url(url)
    fs, root = storage.filesystem(url, storage_options)
    root = root.rstrip("/")
    listing = _listing(fs, root, shown)
    names = sorted(listing["stimuli"], key=natural_key)

    def where(kind: str, name: str) -> str:
        return storage.join(shown, TRAINING_DIR, kind, f"{name}.npy")

    small = {kind: dict(zip(names, fs.cat_ranges([listing[kind][n][0] for n in names], [0] * len(names),
                                                    [None] * len(names), on_error="raise")))
             for kind in ("training", "samples")}
    flags = {n: _scalar(bytes(small["training"][n]), where("training", n), "training") for n in names}
    samples = {n: _scalar(bytes(small["samples"][n]), where("samples", n), "samples") for n in names}
    units = None
    for kind in FRAME_KINDS:
        paths = [listing[kind][n][0] for n in names]
        headers = read_npy_headers(fs, paths, [where(kind, n) for n in names])
        for name, (shape, dtype, offset) in zip(names, headers):
            w = where(kind, name)
            actual, expected = listing[kind][name][1], offset + int(np.prod(shape)) * dtype.itemsize
            if actual != expected:
                raise ValueError(f"{w}: {actual} bytes, its header ({dtype} {list(shape)}) needs {expected}: "
                                 f"truncated or corrupt")
            frames = _check_frames(kind, shape, dtype, w, size)
            if frames != samples[name]:
                raise ValueError(f"{w}: {frames} frames, but {where('samples', name)} says {samples[name]}")
            if kind == "units":
                if units is None:
                    units, first = shape[1], name
                elif shape[1] != units:
                    raise ValueError(f"{w}: {shape[1]} units, but {where('units', first)} has {units}: every "
                                     f"trial must record the same units in the same order")
    if not any(flags.values()):
        raise ValueError(f"{storage.join(shown, TRAINING_DIR, 'training')}/: no training trial (every trial is "
                         f"marked False); expected training trials (True) and validation trials (False)")
    if all(flags.values()):
        raise ValueError(f"{storage.join(shown, TRAINING_DIR, 'training')}/: no validation trial (every trial is "
                         f"marked True); expected some trials marked False for validation")
    evaluation: tuple[VideoRepeats, ...] = ()
    if fs.isdir(posixpath.join(root, EVALUATION_DIR)):
        evaluation = tuple(list_scan(storage.join(url, EVALUATION_DIR), units, 0, storage_options))
        for part in evaluation:
            h, w = _eval_size(fs, part, storage_options)
            if (h, w) != tuple(size):
                raise ValueError(f"{storage.redact_url(part.file('stimuli', part.repeats[0]))}: frames of "
                                 f"{h}x{w}, expected {size[0]}x{size[1]} like the training data")
    return TrainingLayout(
        url=url, trials=tuple(Trial(n, samples[n], flags[n]) for n in names), units=int(units),
        size=tuple(size), unit_ids=_unit_ids(fs, root, shown, int(units)),
        files={kind: {n: storage.join(url, TRAINING_DIR, kind, f"{n}.npy") for n in names} for kind in KINDS},
        evaluation=evaluation)


def _eval_size(fs: Any, part: VideoRepeats, storage_options: Mapping[str, Any] | None) -> tuple[int, int]:
    """The frame size of an evaluation video (from its first repeat's header)."""
    efs, path = storage.filesystem(part.file("stimuli", part.repeats[0]), storage_options)
    shape, _, _ = npy_header(efs.cat_file(path, start=0, end=1024), storage.redact_url(part.file("stimuli", "")))
    return int(shape[1]), int(shape[2])


def write_trial(url: str, name: str, training: bool, stimuli: np.ndarray, perspectives: np.ndarray,
                modulations: np.ndarray, units: np.ndarray, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write one trial into ``url/training_data`` (synthetic recordings, tests): ``stimuli`` uint8 ``[n, H, W]``
    (stored ``[n, H, W, 1]``), ``perspectives`` / ``modulations`` ``[n, 2]``, ``units`` ``[n, U]`` (float32)."""
    fs, root = storage.filesystem(url, storage_options)
    frames = np.asarray(stimuli)
    arrays = {"training": np.array(bool(training)), "samples": np.array(len(frames), np.int64),
              "stimuli": frames[..., None] if frames.ndim == 3 else frames,
              "perspectives": np.asarray(perspectives, np.float32), "modulations": np.asarray(modulations, np.float32),
              "units": np.asarray(units, np.float32)}
    for kind, array in arrays.items():
        fs.makedirs(posixpath.join(root, TRAINING_DIR, kind), exist_ok=True)
        fs.pipe_file(posixpath.join(root, TRAINING_DIR, kind, f"{name}.npy"), npy_bytes(array))
