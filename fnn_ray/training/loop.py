"""The per-rank training loop of one twin, as Ray Train runs it on every worker (``train_loop_per_worker``).

Every rank builds the twin (the release's core and the foundation scan's ``modulation.lstm``, frozen; a fresh
head), maps the prepared dataset on its node and resumes from the newest intact checkpoint of the twin's store.
Per epoch: the schedule's learning rate; ``train_batches`` steps in which each rank draws its own windows, stream,
readout-position noise and monitor jitter from generators seeded by (seed, rank, epoch), so an epoch replays
exactly after a restart; gradients averaged over the ranks that hold them
(:func:`fnn_model.training.average_gradients`); the validation objective on fixed windows (shared out over the
ranks, summed); then rank 0 commits the checkpoint (head, optimizer, schedule position, RNG states, history,
frozen hash), rewrites ``metrics.csv`` / ``curves.png`` and reports the epoch to the driver. ``ray.train.report``
on every rank closes the epoch (a barrier). A worker that dies makes Ray Train restart the group, which resumes
here from the last checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fnn_ray import storage

__all__ = ["TrainingSettings", "TwinRun", "train_twin_loop"]


@dataclass(frozen=True)
class TrainingSettings:
    """What decides a twin's training (the command line's flags): ``epochs`` (``warmup`` of them warm-up, default
    ``max(1, epochs // 10)``), peak ``lr``, adaptive ``clip``, windows of ``window`` frames, ``batch`` windows per
    step and rank, ``train_batches`` steps and ``val_batches`` validation batches per epoch, ``burn_in`` frames not
    scored, ``seed``; ``checkpoint_frames``: activation checkpointing (memory only: not part of the result).
    Beyond the public recipe (defaults keep it): ``readout_clip``, the clip of the readout alone (None: ``clip``),
    and ``position_lr``, the learning-rate scale of the readout positions (``OptimizerConfig``)."""

    epochs: int = 100
    warmup: int | None = None
    lr: float = 0.1
    clip: float = 0.01
    window: int = 100
    batch: int = 4
    train_batches: int = 500
    val_batches: int = 20
    burn_in: int = 10
    seed: int = 0
    checkpoint_frames: int | None = None
    readout_clip: float | None = None
    position_lr: float = 1.0

    def __post_init__(self) -> None:
        for name, least in (("epochs", 1), ("window", 2), ("batch", 1), ("train_batches", 1), ("val_batches", 1),
                            ("burn_in", 0), ("checkpoint_frames", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
        if self.burn_in >= self.window:
            raise ValueError(f"--burn-in ({self.burn_in}) must be less than --window ({self.window})")
        warmup = self.warmup if self.warmup is not None else max(1, self.epochs // 10) if self.epochs > 1 else 0
        if not 0 <= warmup < self.epochs:
            raise ValueError(f"--warmup must be in 0..{self.epochs - 1} epochs, got {warmup}")
        object.__setattr__(self, "warmup", warmup)
        for name in ("lr", "clip", "readout_clip", "position_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")

    def record(self) -> dict[str, Any]:
        """The fields that decide the result."""
        return {k: v for k, v in asdict(self).items() if k != "checkpoint_frames"}


@dataclass(frozen=True)
class TwinRun:
    """Everything a rank needs to train one twin (plain values: it travels to the workers).

    ``twin_url``: the twin's folder on the output store (checkpoints, curves); ``scan``: the new twin's
    (session, scan_idx); ``foundation_scan``: whose ``modulation.lstm`` is copied; ``settings``: sampling,
    schedule and optimizer (:class:`TrainingSettings`); ``threads``: torch threads per rank; ``progress``: a
    ``ray.util.queue.Queue`` the driver reads (or None).
    """

    release_url: str
    data_url: str
    twin_url: str
    animal: str
    scan: tuple[int, int]
    foundation_scan: tuple[int, int]
    units: int
    settings: TrainingSettings
    threads: int = 1
    release_options: Mapping[str, Any] | None = field(default=None, repr=False)
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    progress: Any = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.scan[0]}-{self.scan[1]}"

    def record(self) -> dict[str, Any]:
        """What decides the result (recorded with the run; a rerun with other settings is refused)."""
        return {"data_url": storage.redact_url(self.data_url), "animal": self.animal, "scan": list(self.scan),
                "foundation_scan": list(self.foundation_scan), "units": self.units, **self.settings.record()}


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _tensors(batch: Mapping[str, np.ndarray], device: torch.device):
    from fnn_model.training import Batch

    return Batch(*(torch.from_numpy(np.ascontiguousarray(batch[k])).to(device)
                   for k in ("stimuli", "perspectives", "modulations", "units")))


def train_twin_loop(config: Mapping[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config["run"]`` is a :class:`TwinRun`."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from fnn_model.release import Release
    from fnn_model.training import (OptimizerConfig, PoissonObjective, ScheduleConfig, WarmupCosine,
                                    average_gradients, build_optimizer, build_twin, evaluate_objective, step)
    from fnn_ray.training.checkpoints import CheckpointStore
    from fnn_ray.training.curves import write_curves
    from fnn_ray.training.dataset import PreparedData

    run: TwinRun = config["run"]
    settings = run.settings
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(run.threads)
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    release = Release.open(run.release_url, storage_options=run.release_options)
    twin = build_twin(release, run.foundation_scan, run.units, seed=settings.seed).to(device)
    frozen = twin.frozen_state_hash()
    optimizer = build_optimizer(twin, OptimizerConfig(lr=settings.lr, clip=settings.clip,
                                                      readout_clip=settings.readout_clip,
                                                      position_lr=settings.position_lr))
    schedule = WarmupCosine(settings.lr, ScheduleConfig(warmup=settings.warmup,
                                                        cosine=settings.epochs - settings.warmup))
    objective = PoissonObjective(burn_in=settings.burn_in)
    data = PreparedData.open(run.data_url, run.storage_options)
    store = CheckpointStore(run.twin_url, run.storage_options)
    params = twin.trainable_parameters()

    start, history = 0, []
    found = store.latest()
    if found is not None:
        if found.state["frozen_sha256"] != frozen:
            raise ValueError(f"{store.url}: checkpoint of epoch {found.epoch} was trained on another frozen core "
                             f"(hash {found.state['frozen_sha256'][:12]}, this release {frozen[:12]})")
        twin.load_head_state_dict(found.state["head"])
        optimizer.load_state_dict(found.state["optimizer"])
        start, history = found.epoch, list(found.state["history"])
    count = settings.val_batches * settings.batch
    validation = data.validation_windows(count, settings.window, settings.seed)[rank::world]

    for epoch in range(start, settings.epochs):
        began = time.perf_counter()
        lr = schedule.apply(optimizer, epoch)
        rng = np.random.default_rng([settings.seed, rank, epoch])
        generator = torch.Generator().manual_seed(_seed(settings.seed, rank, epoch))
        twin.train()
        total = 0.0
        for _ in range(settings.train_batches):
            windows = data.training_windows(rng, settings.batch, settings.window)
            batch = _tensors(data.batch(windows, settings.window), device)
            optimizer.zero_grad(set_to_none=True)
            total += step(twin, batch, None, generator, objective, checkpoint_frames=settings.checkpoint_frames)
            average_gradients(params)
            optimizer.step()
        twin.eval()
        sums = torch.zeros(3, dtype=torch.float64)  # training objective sum, validation sum, validation batches
        sums[0] = total / settings.train_batches
        with torch.no_grad():
            for i in range(0, len(validation), settings.batch):
                windows = validation[i:i + settings.batch]
                sums[1] += evaluate_objective(twin, _tensors(data.batch(windows, settings.window), device),
                                              objective) * len(windows)
                sums[2] += len(windows)
        if world > 1:
            dist.all_reduce(sums)
        seconds = time.perf_counter() - began
        row = {"epoch": epoch + 1, "lr": lr, "train": float(sums[0] / world), "val": float(sums[1] / sums[2]),
               "samples_per_s": world * settings.train_batches * settings.batch * settings.window / seconds,
               "seconds": seconds, "ranks": world}
        history.append(row)
        if rank == 0:
            state = {"head": twin.head_state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "history": history, "frozen_sha256": frozen,
                     "rng": {"torch": generator.get_state(), "numpy": str(rng.bit_generator.state)}}
            store.save(epoch + 1, state, row, validation=row["val"])
            write_curves(run.twin_url, history, f"twin {run.animal} {run.name}", run.storage_options)
            if run.progress is not None:
                run.progress.put({"twin": run.name, **row, "epochs": settings.epochs, "pid": os.getpid()})
        ray.train.report({k: v for k, v in row.items()})
