"""Multi-stream MLP of weight-normalised linear layers with variance-preserving GELU (spec 2.6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fnn_model.ops import gelu
from fnn_model.wconv import WConv


class Mlp(nn.Module):
    """Linear layers `features[0] -> features[1] -> ...`, each followed by `GELU * gain` unless it is the last
    layer and `activate_last` is false. The first layer uses raw (not normalised) weights, as in the release.

    Input `[N, S*features[0]]`, output `[N, S*features[-1]]`.
    """

    def __init__(self, features: Sequence[int], streams: int, activate_last: bool = True) -> None:
        super().__init__()
        pairs = list(zip(features[:-1], features[1:]))
        self.linears = nn.ModuleList(
            WConv(i, o, streams, wnorm=index > 0, gain=index > 0) for index, (i, o) in enumerate(pairs)
        )
        self.activate_last = activate_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, S*F_in]` -> `[N, S*F_out]`."""
        last = len(self.linears) - 1
        for index, linear in enumerate(self.linears):
            x = linear.linear(x)
            if index < last or self.activate_last:
                x = gelu(x)
        return x
