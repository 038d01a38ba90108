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

__all__ = ["TwinRun", "train_twin_loop"]


@dataclass(frozen=True)
class TwinRun:
    """Everything a rank needs to train one twin (plain values: it travels to the workers).

    ``twin_url``: the twin's folder on the output store (checkpoints, curves); ``scan``: the new twin's
    (session, scan_idx); ``foundation_scan``: whose ``modulation.lstm`` is copied; sampling and schedule as
    :mod:`fnn_model.training.config`; ``threads``: torch threads per rank; ``progress``: a
    ``ray.util.queue.Queue`` the driver reads (or None).
    """

    release_url: str
    data_url: str
    twin_url: str
    animal: str
    scan: tuple[int, int]
    foundation_scan: tuple[int, int]
    units: int
    epochs: int
    warmup: int
    lr: float = 0.1
    clip: float = 0.01
    window: int = 100
    batch: int = 4
    train_batches: int = 500
    val_batches: int = 20
    burn_in: int = 10
    seed: int = 0
    threads: int = 1
    release_options: Mapping[str, Any] | None = field(default=None, repr=False)
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    progress: Any = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.scan[0]}-{self.scan[1]}"

    def settings(self) -> dict[str, Any]:
        """What decides the result (recorded with the run; a rerun with other settings is refused)."""
        skip = {"release_options", "storage_options", "progress", "threads", "twin_url"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in skip}


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _tensors(batch: Mapping[str, np.ndarray], device: torch.device):
    from fnn_model.training import Batch

    return Batch(*(torch.from_numpy(np.ascontiguousarray(batch[k])).to(device)
                   for k in ("stimuli", "perspectives", "modulations", "units")))


def train_twin_loop(config: Mapping[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config["run"]`` is a :class:`TwinRun`."""
    import ray.train
    import torch.distributed as dist

    from fnn_model.release import Release
    from fnn_model.training import (OptimizerConfig, PoissonObjective, ScheduleConfig, WarmupCosine,
                                    average_gradients, build_optimizer, build_twin, evaluate_objective, step)
    from fnn_ray.training.checkpoints import CheckpointStore
    from fnn_ray.training.curves import write_curves
    from fnn_ray.training.dataset import PreparedData

    run: TwinRun = config["run"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(run.threads)
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    release = Release.open(run.release_url, storage_options=run.release_options)
    twin = build_twin(release, run.foundation_scan, run.units, seed=run.seed).to(device)
    frozen = twin.frozen_state_hash()
    optimizer = build_optimizer(twin, OptimizerConfig(lr=run.lr, clip=run.clip))
    schedule = WarmupCosine(run.lr, ScheduleConfig(warmup=run.warmup, cosine=run.epochs - run.warmup))
    objective = PoissonObjective(burn_in=run.burn_in)
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
    validation = data.validation_windows(run.val_batches * run.batch, run.window, run.seed)[rank::world]

    for epoch in range(start, run.epochs):
        began = time.perf_counter()
        lr = schedule.apply(optimizer, epoch)
        rng = np.random.default_rng([run.seed, rank, epoch])
        generator = torch.Generator().manual_seed(_seed(run.seed, rank, epoch))
        twin.train()
        total = 0.0
        for _ in range(run.train_batches):
            batch = _tensors(data.batch(data.training_windows(rng, run.batch, run.window), run.window), device)
            optimizer.zero_grad(set_to_none=True)
            total += step(twin, batch, None, generator, objective)
            average_gradients(params)
            optimizer.step()
        twin.eval()
        sums = torch.zeros(3, dtype=torch.float64)  # training objective sum, validation sum, validation batches
        sums[0] = total / run.train_batches
        with torch.no_grad():
            for i in range(0, len(validation), run.batch):
                windows = validation[i:i + run.batch]
                sums[1] += evaluate_objective(twin, _tensors(data.batch(windows, run.window), device),
                                              objective) * len(windows)
                sums[2] += len(windows)
        if world > 1:
            dist.all_reduce(sums)
        seconds = time.perf_counter() - began
        row = {"epoch": epoch + 1, "lr": lr, "train": float(sums[0] / world), "val": float(sums[1] / sums[2]),
               "samples_per_s": world * run.train_batches * run.batch * run.window / seconds,
               "seconds": seconds, "ranks": world}
        history.append(row)
        if rank == 0:
            state = {"head": twin.head_state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "history": history, "frozen_sha256": frozen,
                     "rng": {"torch": generator.get_state(), "numpy": str(rng.bit_generator.state)}}
            store.save(epoch + 1, state, row, validation=row["val"])
            write_curves(run.twin_url, history, f"twin {run.animal} {run.name}", run.storage_options)
            if run.progress is not None:
                run.progress.put({"twin": run.name, **row, "epochs": run.epochs, "pid": os.getpid()})
        ray.train.report({k: v for k, v in row.items()})
