"""InterGroup projection (spec 2.4): a 1x1 map where each output group reads only the *other* input groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fnn_model.cache import Derived, autocast_dtype
from fnn_model.wconv import StreamParameters, normalize


class InterGroup(nn.Module):
    """Per stream, `G` groups of `c_in` -> `G` groups of `c_out` channels, no within-group connection, no bias.

    Parameters per stream: `weights.{s}` `[G, G-1, c_out, c_in]` (slot j of output group o is source group
    `j if j < o else j + 1`) and `gains.{s}` `[G, c_out]`. The buffers `mask` (bool `[G, G, 1, 1]`, off-diagonal)
    and `zero` (`[G, G, c_out, c_in]`) carry no information but are part of the release's state dict.
    Input `[N, S*G*c_in, H, W]`, output `[N, S*G*c_out, H, W]`.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, streams: int, init_gain: float = 1.0):
        super().__init__()
        self.groups, self.streams = groups, streams
        c_in, c_out = in_channels // groups, out_channels // groups
        self.register_buffer("mask", ~torch.eye(groups, dtype=torch.bool)[:, :, None, None])
        self.register_buffer("zero", torch.zeros(groups, groups, c_out, c_in))
        bound = (c_in * (groups - 1)) ** -0.5
        self.weights = StreamParameters(streams, groups, groups - 1, c_out, c_in)
        for w in self.weights:
            nn.init.uniform_(w, -bound, bound)
        self.gains = StreamParameters(streams, groups, c_out, fill=init_gain)
        self._dense = Derived()

    def reset_state(self) -> None:
        """Recheck the cached dense weight against the parameters (start of a new sequence)."""
        self._dense.recheck()

    def dense(self) -> torch.Tensor:
        """The stacked dense 1x1 weight `[S*G*c_out, G*c_in, 1, 1]` with zero diagonal blocks (cached, in the
        autocast dtype when autocast is on)."""
        dtype = autocast_dtype(self.weights[0].device)
        return self._dense.get(self, lambda: self._compute_dense(dtype), key=dtype)

    def _compute_dense(self, dtype: torch.dtype | None) -> torch.Tensor:
        g = self.groups
        _, _, c_out, c_in = self.zero.shape
        weight = normalize(self.weights.stacked(), self.gains.stacked(), fan_dims=(2, 4))  # [S, G, G-1, co, ci]
        mask = self.mask.expand(g, g, c_out, c_in)
        blocks = [self.zero.masked_scatter(mask, w) for w in weight]  # each [G(out), G(in), c_out, c_in]
        dense = torch.stack(blocks).permute(0, 1, 3, 2, 4).reshape(-1, g * c_in, 1, 1)
        return dense if dtype is None else dense.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, S*G*c_in, H, W]` -> `[N, S*G*c_out, H, W]`."""
        return F.conv2d(x, self.dense(), groups=self.streams)
