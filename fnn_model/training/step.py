"""One training step and the evaluation objective, usable by any loop (single process, Ray Train ranks ...)."""

from __future__ import annotations

import torch

from fnn_model.training.batch import Batch
from fnn_model.training.forward import draw, eval_log_rates, training_log_rates
from fnn_model.training.objective import PoissonObjective
from fnn_model.training.twin import Twin


def step(model: Twin, batch: Batch, stream: int | None, generator: torch.Generator,
         objective: PoissonObjective | None = None, checkpoint_frames: int | None = None,
         autocast: torch.dtype | None = None) -> float:
    """Forward (training mode) and backward of one batch; returns the objective.

    `stream`: the stream to train (None: drawn from `generator`). Gradients are ACCUMULATED into `.grad` of the
    trained parameters that took part (the other streams' per-stream tensors keep theirs, None after
    `optimizer.zero_grad()`); the caller zeroes them, averages them across ranks and steps the optimizer. Raises
    `NonFiniteObjectiveError` (before any backward) when the objective is NaN/inf. `checkpoint_frames`:
    activation checkpointing over time chunks (`forward.training_log_rates`). `autocast`: run the forward in
    this mixed-precision dtype (`torch.autocast`, e.g. `torch.bfloat16`; parameters, gradients and the objective
    stay in the parameters' dtype).
    """
    objective = objective or PoissonObjective()
    draws = draw(model, batch.size, generator, stream)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        log_rates = training_log_rates(model, batch, draws, checkpoint_frames)
    loss = objective(log_rates.to(next(model.parameters()).dtype), batch.units.to(device))
    loss.backward()
    return float(loss.detach())


def evaluate_objective(model: Twin, batch: Batch, objective: PoissonObjective | None = None) -> float:
    """The objective of `batch` in evaluation mode (all streams, positions `mu`, mean monitor pose; no autograd)."""
    objective = objective or PoissonObjective()
    log_rates = eval_log_rates(model, batch)
    return float(objective(log_rates, batch.units.to(log_rates.device)))
