"""Training settings: dataclasses whose defaults are the public pipeline's published values (TRAINING.md)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OptimizerConfig:
    """SGD with Nesterov momentum, weight decay on weights only, per-unit gradient scaling and adaptive clipping.

    `clip` and `clip_eps`: a gradient slice is rescaled to at most `clip * max(|p_slice|, clip_eps)` (see
    `fnn_model.training.optim`). Two options beyond the public recipe (their defaults keep it):
    `readout_clip` (None: `clip`) is the clip of the readout's per-unit tensors alone (the zero-initialised features
    barely grow under a clip relative to their norm); `position_lr` (1: the same) scales the learning rate of the
    readout positions `mu` and `sigma` (their curvature is ~100x the features' when the features are strong).
    """

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    clip: float = 0.01
    clip_eps: float = 1e-3
    readout_clip: float | None = None
    position_lr: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning rate per epoch: `warmup` epochs at `lr * (e + 0.5) / warmup`, then a cosine over `cosine` epochs."""

    warmup: int = 10
    cosine: int = 90

    @property
    def epochs(self) -> int:
        return self.warmup + self.cosine


@dataclass(frozen=True)
class SamplingConfig:
    """Training windows: `window` frames, `batch` windows per step, batches per epoch (training / validation)."""

    window: int = 100
    batch: int = 4
    train_batches: int = 500
    val_batches: int = 20


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run needs besides the data: objective burn-in (frames), the foundation scan whose
    `modulation.lstm.*` is copied and frozen, optimizer, schedule and sampling."""

    burn_in: int = 10
    foundation_scan: tuple[int, int] = (4, 7)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
