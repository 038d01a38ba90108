"""The learning-rate schedule of TRAINING.md: a warm-up, then a cosine to zero, per epoch."""

from __future__ import annotations

import math

import torch

from fnn_model.training.config import ScheduleConfig


class WarmupCosine:
    """`lr * (e + 0.5) / warmup` for epochs `e < warmup`, then `lr * (cos(pi * t / cosine) + 1) / 2` with
    `t = e - warmup` for `t = 0 .. cosine - 1`. Stateless: the position is the epoch (resuming needs nothing else).
    """

    def __init__(self, lr: float = 0.1, config: ScheduleConfig = ScheduleConfig()) -> None:
        if config.warmup < 0 or config.cosine < 1:
            raise ValueError(f"WarmupCosine: need warmup >= 0 and cosine >= 1 epochs, got {config}")
        self.lr, self.warmup, self.cosine = lr, config.warmup, config.cosine

    @property
    def epochs(self) -> int:
        return self.warmup + self.cosine

    def lr_at(self, epoch: int) -> float:
        """The learning rate of `epoch` (0-based, `0 <= epoch < epochs`)."""
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"WarmupCosine: epoch must be in 0..{self.epochs - 1}, got {epoch}")
        if epoch < self.warmup:
            return self.lr * (epoch + 0.5) / self.warmup
        return self.lr * (math.cos(math.pi * (epoch - self.warmup) / self.cosine) + 1) / 2

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int) -> float:
        """Set every param group's `lr` to `lr_at(epoch)`; returns it."""
        lr = self.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
