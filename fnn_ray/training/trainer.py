"""One twin's Ray Train run: a ``TorchTrainer`` of :func:`fnn_ray.training.loop.train_twin_loop` whose storage is
the twin's folder on the output store.

``fit_twin`` builds and fits it (blocking); :data:`fit_twin_task` is the same as a Ray task (``num_cpus=0``: it
only waits on the trainer), so many twins are many tasks side by side, each its own trainer, and a driver
interrupted by a signal cancels them (the controller and workers belong to the task and go with it; the
checkpoints committed so far stay).

Ray Train places ``workers`` ranks (one GPU each with ``gpus``, else ``cpus_per_worker`` CPUs each) and sets up
the process group (gloo on CPU, NCCL on GPU); ``FailureConfig(max_failures)`` restarts the group after a worker
dies, and the loop resumes from the twin's last checkpoint. The model checkpoints are the twin's own
(:mod:`fnn_ray.training.checkpoints`: hash-verified, best kept): Ray Train's checkpoint registry is not used
(it has no integrity check or fallback); ``RunConfig(storage_path=...)`` keeps Ray Train's run state beside
them under ``<twin>/_ray``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fnn_ray import storage
from fnn_ray.training.loop import TwinRun, train_twin_loop

__all__ = ["arrow_filesystem", "fit_twin"]


def arrow_filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """``(pyarrow filesystem, path)`` for ``url``: the local filesystem, else the fsspec store wrapped
    (``PyFileSystem(FSSpecHandler(...))``), so Ray Train writes to any store fsspec reaches."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(url, storage_options)
    if storage.is_local(fs):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def fit_twin(run: TwinRun, workers: int = 1, gpus: bool = False, cpus_per_worker: float = 1.0,
             max_failures: int = 3) -> dict[str, Any]:
    """Train (or resume) one twin with ``workers`` ranks; returns its last reported metrics. Raises Ray Train's
    ``TrainingFailedError`` when the workers failed more than ``max_failures`` times."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    filesystem, path = arrow_filesystem(run.twin_url, run.storage_options)
    trainer = TorchTrainer(
        train_twin_loop, train_loop_config={"run": run},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if gpus else {})}),
        run_config=RunConfig(name="_ray", storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=max_failures)))
    result = trainer.fit()
    return dict(result.metrics or {})


def fit_twin_task():
    """:func:`fit_twin` as a Ray remote function (``num_cpus=0``)."""
    import ray

    return ray.remote(num_cpus=0, max_retries=0)(fit_twin)
