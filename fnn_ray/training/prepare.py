"""The prepared dataset of one scan: a lab's ``training_data`` checked, imputed on request and summarised in one
streaming pass, written in a layout a node memory-maps.

    summary = prepare(PrepareConfig(source="lab/train_digital_twin", output="s3://b/prepared/4-7", animal="27203",
                                    scan=(4, 7)))

Prepared layout (under the output URL; ``stats.json`` is written last and marks the dataset complete)::

    stimuli.npy        uint8 [F, H, W]   every trial's frames, trials one after the other (F frames in all)
    perspectives.npy   float32 [F, 2]
    modulations.npy    float32 [F, 2]
    units.npy          float32 [F, U]
    trials.csv         trial, start, frames, training (a trial is rows start..start+frames-1)
    masks/<kind>.npy   (only with --impute, when something was filled) bool [F] for perspectives / modulations
                       (a frame had a non-finite value), uint8 [F, ceil(U/8)] for units (np.packbits per frame)
    evaluation/<session>-<scan_idx>/...   a copy of evaluation_data (the layout jobs.evaluate reads), if given
    stats.json         animal, session, scan_idx, units, unit_ids, size, trials, frames, longest (trial per
                       split), moments (the training set's mean and SD per kind: per column, stimuli over all
                       pixels), imputed (values filled per kind), evaluation (videos, repeats), inputs (what it
                       was made from)

The pass reads one trial at a time (never the whole recording) into memory-mapped staging files on the local
disk and moves them into place at the end, so a bad input (one line naming the file and frame) leaves nothing in
the output. Imputation (``impute=True``): a non-finite eye or behaviour value is interpolated linearly in time
within its trial (the nearest finite value at the ends, 0 -- the z-scored mean -- when none is finite); a
non-finite response gets the unit's mean over the training trials. Statistics are over the training trials
(``training`` True), merged per trial (Chan et al.'s pairwise update, float64).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fnn_ray import storage
from fnn_ray.preflight import check_output
from fnn_ray.recordings import load_npy
from fnn_ray.training.layout import FRAME_KINDS, TrainingLayout, list_training

__all__ = ["FORMAT", "PrepareConfig", "PrepareSummary", "STATS_FILE", "prepare", "read_stats"]

FORMAT = "fnn-ray prepared twin data v1"
STATS_FILE = "stats.json"
TRIALS_FILE = "trials.csv"
#: What each per-frame kind holds (for messages).
_MEANING = {"perspectives": "eye position", "modulations": "behaviour", "units": "responses"}


@dataclass(frozen=True)
class PrepareConfig:
    """``source``: the lab's folder (``training_data/`` and optional ``evaluation_data/``); ``output``: the
    prepared dataset's URL; ``animal``, ``scan`` (session, scan_idx): the twin's identity, recorded in
    ``stats.json``; ``size``: the expected frame size (H, W); ``impute``: fill non-finite values (with masks)
    instead of refusing them."""

    source: str
    output: str
    animal: str
    scan: tuple[int, int]
    size: tuple[int, int] = (144, 256)
    impute: bool = False
    rate_hz: float = 30.0
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)


@dataclass
class PrepareSummary:
    """What :func:`prepare` did: the dataset's ``stats``, whether it was ``already`` prepared, the wall time."""

    output: str
    stats: dict[str, Any]
    already: bool = False
    wall_s: float = 0.0

    def __str__(self) -> str:
        s = self.stats
        head = "already prepared (same inputs): nothing to do\n" if self.already else ""
        imputed = ", ".join(f"{k} {v}" for k, v in s["imputed"].items() if v) or "nothing"
        return (f"{head}prepared {s['animal']} scan {s['session']}-{s['scan_idx']}: {s['units']} units, "
                f"{s['trials']['training']} training + {s['trials']['validation']} validation trials, "
                f"{s['frames']['training'] + s['frames']['validation']:,} frames of {s['size'][0]}x{s['size'][1]}, "
                f"{s['evaluation']['videos']} evaluation videos; imputed: {imputed}\n"
                f"  -> {storage.redact_url(self.output)} ({self.wall_s:.1f} s)")


class _Moments:
    """Running count, mean and sum of squared deviations per column (float64), merged batch by batch."""

    def __init__(self, columns: int) -> None:
        self.n, self.mean, self.m2 = 0, np.zeros(columns), np.zeros(columns)

    def add(self, x: np.ndarray) -> None:
        """``x`` ``[n, columns]``."""
        x = x.astype(np.float64, copy=False)
        n_b = len(x)
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / n
        self.n = n

    def summary(self) -> dict[str, list[float]]:
        sd = np.sqrt(self.m2 / max(self.n - 1, 1))
        return {"mean": self.mean.tolist(), "sd": sd.tolist()}


def _fingerprint(config: PrepareConfig, layout: TrainingLayout) -> dict[str, Any]:
    """What a prepared dataset was made from (a rerun on the same inputs finds it done)."""
    return {"source": storage.redact_url(config.source), "animal": config.animal,
            "scan": f"{config.scan[0]}-{config.scan[1]}", "impute": config.impute,
            "trials": [[t.name, t.frames, t.training] for t in layout.trials]}


def read_stats(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``stats.json`` of a prepared dataset, or None when there is none (not prepared, or unfinished)."""
    fs, root = storage.filesystem(url, storage_options)
    path = posixpath.join(root, STATS_FILE)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        stats = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{storage.join(storage.redact_url(url), STATS_FILE)}: not valid JSON ({e.msg})") from None
    if not isinstance(stats, dict) or stats.get("format") != FORMAT:
        raise ValueError(f"{storage.join(storage.redact_url(url), STATS_FILE)}: not a prepared dataset's stats "
                         f"(expected format {FORMAT!r})")
    return stats


def _impute_vectors(x: np.ndarray) -> np.ndarray:
    """Fill non-finite entries of ``x`` ``[n, d]`` by linear interpolation in time per column; returns the mask
    ``[n]`` of frames that had any."""
    bad = ~np.isfinite(x)
    t = np.arange(len(x))
    for c in range(x.shape[1]):
        good = ~bad[:, c]
        if bad[:, c].any():
            x[:, c] = np.interp(t, t[good], x[good, c]) if good.any() else 0.0
    return bad.any(axis=1)


def _first_bad(x: np.ndarray) -> tuple[int, int, float]:
    """(frame, column, value) of the first non-finite entry of ``x`` ``[n, d]``."""
    frame, column = np.argwhere(~np.isfinite(x))[0]
    return int(frame), int(column), float(x[frame, column])


def _read(fs: Any, layout: TrainingLayout, kind: str, trial: str) -> np.ndarray:
    url = layout.files[kind][trial]
    _, path = storage.filesystem(url)
    return load_npy(fs.cat_file(path), layout.shown(kind, trial))


def _stream(config: PrepareConfig, layout: TrainingLayout, staging: str) -> dict[str, Any]:
    """The pass: every trial checked, imputed, summarised and written to memory-mapped files in ``staging``."""
    fs, _ = storage.filesystem(config.source, config.storage_options)
    total, units = layout.frames, layout.units
    shapes = {"stimuli": (total, *layout.size), "perspectives": (total, 2), "modulations": (total, 2),
              "units": (total, units)}
    out = {kind: np.lib.format.open_memmap(os.path.join(staging, f"{kind}.npy"), mode="w+",
                                           dtype=np.uint8 if kind == "stimuli" else np.float32, shape=shapes[kind])
           for kind in FRAME_KINDS}
    masks = {"perspectives": np.zeros(total, bool), "modulations": np.zeros(total, bool),
             "units": np.zeros((total, (units + 7) // 8), np.uint8)}
    moments = {"stimuli": _Moments(1), "perspectives": _Moments(2), "modulations": _Moments(2),
               "units": _Moments(units)}
    imputed = {kind: 0 for kind in masks}
    start, rows = 0, []
    for trial in layout.trials:
        stop = start + trial.frames
        for kind in FRAME_KINDS:
            x = _read(fs, layout, kind, trial.name)
            if kind == "stimuli":
                x = x.reshape(trial.frames, *layout.size)
                if trial.training:
                    for chunk in range(0, len(x), 64):
                        moments[kind].add(x[chunk:chunk + 64].reshape(-1, 1))
                out[kind][start:stop] = x
                continue
            x = np.array(x, dtype=np.float32)
            if not np.isfinite(x).all():
                frame, column, value = _first_bad(x)
                if not config.impute:
                    raise ValueError(f"{layout.shown(kind, trial.name)}: frame {frame}, column {column} holds "
                                     f"{value} ({_MEANING[kind]} must be finite); pass --impute to fill gaps "
                                     f"(recorded in a mask)")
                if kind == "units":  # filled with the unit's training mean once it is known (below)
                    bad = ~np.isfinite(x)
                    imputed[kind] += int(bad.sum())
                    masks[kind][start:stop] = np.packbits(bad, axis=1)
                    if trial.training:  # the statistics leave out frames with a gap
                        moments[kind].add(x[~bad.any(axis=1)])
                    out[kind][start:stop] = x
                    continue
                masks[kind][start:stop] = _impute_vectors(x)
                imputed[kind] += int(masks[kind][start:stop].sum())
            if trial.training:
                moments[kind].add(x)
            out[kind][start:stop] = x
        rows.append(f"{trial.name},{start},{trial.frames},{trial.training}")
        start = stop
    if imputed["units"]:
        mean = np.asarray(moments["units"].mean, np.float32)
        for begin in range(0, total, 1024):
            bad = np.unpackbits(masks["units"][begin:begin + 1024], axis=1, count=units).astype(bool)
            block = out["units"][begin:begin + 1024]
            block[bad] = np.broadcast_to(mean, bad.shape)[bad]
    for kind, array in out.items():
        array.flush()
        del array
    if any(imputed.values()):
        os.makedirs(os.path.join(staging, "masks"))
        for kind, mask in masks.items():
            if imputed[kind]:
                np.save(os.path.join(staging, "masks", f"{kind}.npy"), mask)
    with open(os.path.join(staging, TRIALS_FILE), "w") as f:
        f.write("trial,start,frames,training\n" + "\n".join(rows) + "\n")
    train = [t for t in layout.trials if t.training]
    valid = [t for t in layout.trials if not t.training]
    return {
        "format": FORMAT, "animal": config.animal, "session": config.scan[0], "scan_idx": config.scan[1],
        "units": units, "unit_ids": list(layout.unit_ids), "size": list(layout.size), "rate_hz": config.rate_hz,
        "trials": {"training": len(train), "validation": len(valid)},
        "frames": {"training": sum(t.frames for t in train), "validation": sum(t.frames for t in valid)},
        "longest": {"training": max(t.frames for t in train), "validation": max(t.frames for t in valid)},
        "moments": {kind: moments[kind].summary() for kind in FRAME_KINDS},
        "imputed": imputed,
        "evaluation": {"videos": len(layout.evaluation),
                       "repeats": sum(len(p.repeats) for p in layout.evaluation)},
        "inputs": _fingerprint(config, layout),
    }


def _copy_evaluation(config: PrepareConfig, layout: TrainingLayout, staging: str) -> None:
    """Copy ``evaluation_data`` file by file into ``staging/evaluation/<session>-<scan_idx>/``."""
    fs, _ = storage.filesystem(config.source, config.storage_options)
    target = os.path.join(staging, "evaluation", f"{config.scan[0]}-{config.scan[1]}")
    kinds = ["stimuli", "units"] + [k for k in ("perspectives", "modulations")
                                    if all(getattr(p, k) for p in layout.evaluation)]
    for part in layout.evaluation:
        for kind in kinds:
            for repeat in part.repeats:
                _, path = storage.filesystem(part.file(kind, repeat))
                local = os.path.join(target, kind, part.video, f"{repeat}.npy")
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(path, local)


#: What an unfinished earlier run may have left in the output (a rerun replaces it).
_OURS = {*(f"{kind}.npy" for kind in FRAME_KINDS), TRIALS_FILE, "masks", "evaluation"}


def _check_empty(fs: Any, root: str, output: str) -> None:
    """Refuse an output that holds anything but an unfinished prepared dataset."""
    try:
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return
    foreign = sorted(names - _OURS)
    if foreign:
        raise ValueError(f"output {storage.redact_url(output)} is not empty and holds no prepared dataset (e.g. "
                         f"{foreign[0]}): use a new --output")


def _publish(staging: str, output: str, storage_options: Mapping[str, Any] | None) -> None:
    """Move the staged files into ``output``; ``stats.json`` last (it marks the dataset complete)."""
    fs, root = storage.filesystem(output, storage_options)
    names = sorted(os.path.relpath(os.path.join(d, f), staging) for d, _, fs_ in os.walk(staging) for f in fs_)
    names.remove(STATS_FILE)
    if storage.is_local(fs):
        if os.path.isdir(root):  # an unfinished earlier run (checked by _check_empty): replaced
            shutil.rmtree(root)
        os.makedirs(os.path.dirname(root), exist_ok=True)
        os.replace(staging, root)
        return
    for name in [*names, STATS_FILE]:
        storage.retry(fs.put_file, os.path.join(staging, name), posixpath.join(root, name), budget_s=60,
                      what=f"uploading {name}")


def prepare(config: PrepareConfig) -> PrepareSummary:
    """Check, impute, summarise and write the prepared dataset (see the module docstring).

    A rerun on the same inputs returns at once (``already``); an output holding a dataset of other inputs is
    refused. ValueError / FileNotFoundError naming the file and what was expected; nothing is written then.
    """
    start = time.perf_counter()
    so = config.storage_options
    output = config.output if "://" in config.output else os.path.abspath(os.path.expanduser(config.output))
    if not config.animal or "/" in config.animal or "," in config.animal:
        raise ValueError(f"--animal {config.animal!r}: expected an animal id (no '/' or ',')")
    layout = list_training(config.source, config.size, so)
    done = read_stats(output, so)
    if done is not None:
        if done.get("inputs") == _fingerprint(config, layout):
            return PrepareSummary(output, done, already=True, wall_s=time.perf_counter() - start)
        raise ValueError(f"output {storage.redact_url(output)} holds a prepared dataset of other inputs "
                         f"(animal {done.get('animal')}, scan {done.get('session')}-{done.get('scan_idx')}, "
                         f"source {done.get('inputs', {}).get('source')}): use another --output")
    check_output(output, so)
    fs, root = storage.filesystem(output, so)
    _check_empty(fs, root, output)
    parent = os.path.dirname(root) if storage.is_local(fs) else None
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".fnn-prepare-", dir=parent)
    try:
        stats = _stream(config, layout, staging)
        _copy_evaluation(config, layout, staging)
        with open(os.path.join(staging, STATS_FILE), "w") as f:
            json.dump(stats, f, indent=1)
        _publish(staging, output, so)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return PrepareSummary(output, stats, wall_s=time.perf_counter() - start)
