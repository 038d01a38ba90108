"""Readout ("PositionFeature", spec 3.6): each unit samples the core output at a position and weighs features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fnn_model.wconv import StreamParameters


class Position(nn.Module):
    """Unit positions: `mu` `[U, 2]` (eval uses `tanh(mu)`), `sigma` `[U, 2, 2]` (training-only spread)."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(units, 2))
        self.sigma = nn.Parameter(torch.eye(2).repeat(units, 1, 1) * 0.4)


class Feature(nn.Module):
    """Per-stream feature weights `weights.{s}` `[U, 1, C]`."""

    def __init__(self, units: int, channels: int, streams: int) -> None:
        super().__init__()
        self.weights = StreamParameters(streams, units, 1, channels, fill=0.0)


class Readout(nn.Module):
    """Core output `[N, S*C, H, W]` -> per-stream log-rates `[N, S, U]`."""

    def __init__(self, units: int, channels: int, streams: int) -> None:
        super().__init__()
        self.units, self.channels, self.streams = units, channels, streams
        self.position = Position(units)
        self.feature = Feature(units, channels, streams)
        self.biases = StreamParameters(streams, units, 1, fill=0.0)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """`[N, S*C, H, W]` -> `[N, S, U]`."""
        n = r.shape[0]
        grid = torch.tanh(self.position.mu).expand(n, self.units, 2)[:, :, None, :]  # [N, U, 1, 2]
        sampled = F.grid_sample(r, grid, mode="bilinear", padding_mode="border", align_corners=False)
        sampled = sampled.view(n, self.streams, self.channels, self.units)  # [N, S, C, U]
        weights = self.feature.weights.stacked()[:, :, 0]  # [S, U, C]
        out = torch.einsum("nscu,suc->nsu", sampled, weights)
        return out + self.biases.stacked()[None, :, :, 0]
