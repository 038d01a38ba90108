"""Modulation ("MlpLstm", spec 3.5): behaviour (pupil, treadmill) -> per-stream features via MLP and LSTM."""

from __future__ import annotations

import torch
from torch import nn

from fnn_model.config import ModulationConfig
from fnn_model.mlp import Mlp
from fnn_model.ops import gcat
from fnn_model.state import CellState
from fnn_model.wconv import WConv


class Lstm(CellState, nn.Module):
    """Flat multi-stream LSTM cell (spec 2.7): `[N, S*F_x]` -> `h` `[N, S*F_h]`; state zeros after reset."""

    def __init__(self, in_features: int, features: int, streams: int) -> None:
        super().__init__()
        self.streams, self.features = streams, features

        def gate(init_bias: float) -> WConv:
            return WConv(in_features + features, features, streams, init_bias=init_bias)

        self.proj_i, self.proj_f, self.proj_g, self.proj_o = gate(-1.0), gate(1.0), gate(0.0), gate(0.0)
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_state(self) -> None:
        """Zero the state."""
        self._state = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, S*F_x]` -> `[N, S*F_h]`."""
        if self._state is None:
            zeros = x.new_zeros(1, self.streams * self.features)
            self._state = (zeros, zeros)
        h, c = self._state
        xh = gcat([x, h], self.streams)
        c = torch.sigmoid(self.proj_f.linear(xh)) * c + torch.sigmoid(self.proj_i.linear(xh)) * torch.tanh(
            self.proj_g.linear(xh)
        )
        h = torch.sigmoid(self.proj_o.linear(xh)) * torch.tanh(c)
        self._state = (h, c)
        return h


class Modulation(nn.Module):
    """Behaviour `[N, M]` -> modulation features `[N, S*F]` (stream-major), stateful over frames."""

    def __init__(self, config: ModulationConfig, modulations: int, streams: int) -> None:
        super().__init__()
        self.streams = streams
        self.mlp = Mlp([modulations, config.mlp_features], streams)
        for weight in self.mlp.linears[0].weights:  # spec 5: a fresh modulation MLP ignores the behaviour
            nn.init.zeros_(weight)
        self.lstm = Lstm(config.mlp_features, config.lstm_features, streams)

    def forward(self, behaviour: torch.Tensor) -> torch.Tensor:
        """`[N, M]` -> `[N, S*F]`."""
        return self.lstm(self.mlp(behaviour.repeat(1, self.streams)))
