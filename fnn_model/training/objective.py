"""The training objective: Poisson negative log-likelihood of the responses given the log-rates (TRAINING.md)."""

from __future__ import annotations

import torch


class NonFiniteObjectiveError(FloatingPointError):
    """The objective is NaN or infinite: the inputs hold NaN/inf or the model diverged."""


class PoissonObjective:
    """`mean(exp(r) - r * y)` over frames after the first `burn_in`, units and batch (no `log y!` term).

    `log_rates` and `units` are `[B, T, U]`; the result is a 0-d tensor. A non-finite result raises
    `NonFiniteObjectiveError` (it is checked on the host: one synchronisation per call).
    """

    def __init__(self, burn_in: int = 10) -> None:
        if burn_in < 0:
            raise ValueError(f"PoissonObjective: burn_in must be >= 0, got {burn_in}")
        self.burn_in = burn_in

    def __call__(self, log_rates: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        if log_rates.shape != units.shape or log_rates.dim() != 3:
            raise ValueError(f"PoissonObjective: log-rates {list(log_rates.shape)} and units {list(units.shape)} "
                             "must both be [B, T, U]")
        if log_rates.shape[1] <= self.burn_in:
            raise ValueError(f"PoissonObjective: windows of {log_rates.shape[1]} frames leave nothing after the "
                             f"burn-in of {self.burn_in} frames")
        r, y = log_rates[:, self.burn_in:], units[:, self.burn_in:].to(log_rates.dtype)
        loss = (torch.exp(r) - r * y).mean()
        if not torch.isfinite(loss):
            raise NonFiniteObjectiveError(f"Poisson objective is {loss.item()} (non-finite): check the inputs for "
                                          "NaN/inf, or lower the learning rate")
        return loss
