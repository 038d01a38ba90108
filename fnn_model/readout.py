"""Readout ("PositionFeature", spec 3.6): each unit samples the core output at a position and weighs features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fnn_model.cache import Derived
from fnn_model.wconv import StreamParameters


#: Floats of sampled features per unit block (~2 MB): `block = READOUT_BLOCK // (N * S * C)` units.
READOUT_BLOCK = 1 << 19


class Position(nn.Module):
    """Unit positions: `mu` `[U, 2]` (eval uses `tanh(mu)`), `sigma` `[U, 2, 2]` (training-only spread)."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(units, 2))
        self.sigma = nn.Parameter(torch.eye(2).repeat(units, 1, 1) * 0.4)

    def bilinear(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear sampling at `tanh(mu)` on a `height x width` map: flat indices and weights, `[U, 4]` each.

        Same weights as `grid_sample(..., mode="bilinear", padding_mode="border", align_corners=False)`:
        coordinates `((p + 1) * size - 1) / 2`, clamped to the map (border), then the four neighbours.
        """
        pos = torch.tanh(self.mu)
        x = (((pos[:, 0] + 1) * width - 1) / 2).clamp(0, width - 1)
        y = (((pos[:, 1] + 1) * height - 1) / 2).clamp(0, height - 1)
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        x0, y0 = x0.long(), y0.long()
        x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
        index = torch.stack([y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1], dim=1)
        weight = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=1)
        return index, weight


class Feature(nn.Module):
    """Per-stream feature weights `weights.{s}` `[U, 1, C]`."""

    def __init__(self, units: int, channels: int, streams: int) -> None:
        super().__init__()
        self.weights = StreamParameters(streams, units, 1, channels, fill=0.0)


class Readout(nn.Module):
    """Core output `[N, S*C, H, W]` -> per-stream log-rates `[N, S, U]`.

    Positions are fixed in eval, so the bilinear indices and weights are computed on first use and cached
    (until a parameter changes; checked at every sequence start) with the features laid out `[U, S, C]`. Units are processed
    in blocks whose sampled features (`[block, N, S, C]`) stay in cache.
    """

    def __init__(self, units: int, channels: int, streams: int) -> None:
        super().__init__()
        self.units, self.channels, self.streams = units, channels, streams
        self.position = Position(units)
        self.feature = Feature(units, channels, streams)
        self.biases = StreamParameters(streams, units, 1, fill=0.0)
        self._tables: Derived[tuple[torch.Tensor, ...]] = Derived()

    def reset_state(self) -> None:
        """Recheck the cached sampling tables against the parameters (start of a new sequence)."""
        self._tables.recheck()

    def _prepared(self, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """(indices `[U, 4]`, weights `[U, 4]`, features `[U, S, C]`, biases `[S, U]`) for this map size."""
        return self._tables.get(self, lambda: (
            *self.position.bilinear(height, width),
            self.feature.weights.stacked()[:, :, 0].transpose(0, 1).contiguous(),
            self.biases.stacked()[:, :, 0],
        ), key=(height, width))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """`[N, S*C, H, W]` -> `[N, S, U]`."""
        n, _, height, width = r.shape
        index, weight, features, biases = self._prepared(height, width)
        table = r.float().permute(2, 3, 0, 1).reshape(height * width, -1)  # [HW, N*S*C], cheap from channels-last
        out = r.new_empty(self.units, n, self.streams, dtype=torch.float32)
        block = max(1, READOUT_BLOCK // table.shape[1])
        for start in range(0, self.units, block):
            part = slice(start, start + block)
            sampled = F.embedding_bag(index[part], table, per_sample_weights=weight[part], mode="sum")
            out[part] = (sampled.view(-1, n, self.streams, self.channels) * features[part, None]).sum(dim=-1)
        return out.permute(1, 2, 0) + biases
