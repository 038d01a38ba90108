"""Recurrent core ("CvtLstm", spec 3.3): an LSTM whose gates read a 3x3 conv and global attention per group."""

from __future__ import annotations

import torch
from torch import nn

from fnn_model.cache import Derived
from fnn_model.config import RecurrentConfig
from fnn_model.intergroup import InterGroup
from fnn_model.ops import gcat
from fnn_model.state import CellState
from fnn_model.wconv import StreamParameters, WConv

THIRD_ROOT = 3**-0.5

#: (stream, group) attention maps computed at once: 8 maps of 384 x 384 floats are ~4.7 MB.
ATTENTION_CHUNK = 8


def _unit(x: torch.Tensor) -> torch.Tensor:
    """`x` divided by its L2 norm over the last dim (no epsilon)."""
    return x / x.square().sum(dim=-1, keepdim=True).sqrt_()


class Recurrent(CellState, nn.Module):
    """Feedforward features `f` `[N, S*F, H, W]` and modulation `m` `[N, S*M]` -> output `[N, S*out, H, W]`.

    State `h, c` `[N, S*hidden, H, W]` (zeros `[1, S*hidden, 1, 1]` after `reset_state`).
    """

    def __init__(self, config: RecurrentConfig, feature_channels: int, modulation_features: int, streams: int):
        super().__init__()
        c, s, g = config, streams, config.groups
        self.groups, self.streams, self.hidden = g, s, c.hidden_channels
        self.conv = WConv(c.in_channels + c.hidden_channels, c.common_channels, s, g, g, spatial=c.spatial, gain=False,
                          bias=False)
        self.scales = StreamParameters(s, g, c.common_channels // g, fill=1.0)
        self._scales: Derived[torch.Tensor] = Derived()
        self.proj_x = nn.ModuleList([
            InterGroup(c.hidden_channels, c.in_channels, g, s, init_gain=THIRD_ROOT),
            WConv(feature_channels, c.in_channels, s, out_groups=g, init_gain=THIRD_ROOT),
            WConv(modulation_features, c.in_channels, s, out_groups=g, bias=False, init_gain=THIRD_ROOT),
        ])

        def common() -> WConv:
            return WConv(c.common_channels, c.common_channels, s, g, g, gain=False, bias=False)

        def gate(init_bias: float) -> WConv:
            return WConv(2 * c.common_channels, c.hidden_channels, s, g, g, init_bias=init_bias)

        self.proj_q, self.proj_k, self.proj_v = common(), common(), common()
        self.proj_i, self.proj_f, self.proj_g, self.proj_o = gate(-1.0), gate(1.0), gate(0.0), gate(0.0)
        self.out = WConv(c.hidden_channels, c.out_channels, s)
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_state(self) -> None:
        """Zero the LSTM state and recheck the cached attention scales (start of a new sequence)."""
        self._state = None
        self._scales.recheck()

    def attention(self, z: torch.Tensor) -> torch.Tensor:
        """Global attention within each (stream, group) over the flattened positions: `[N, S*C, H, W]` -> same
        (channels-last).

        Queries and keys are L2-normalised over the group's channels (no epsilon); queries are then scaled
        per channel by `scales`; the softmax runs over key positions. The q/k/v projections (grouped 1x1 convs)
        run as one batched matmul each over a head-major view of the channels-last `z`, so they come out as
        `[S*G, N*P, C/G]` without a layout copy.
        """
        n, _, height, width = z.shape
        heads, positions = self.streams * self.groups, height * width
        by_head = z.permute(0, 2, 3, 1).reshape(n * positions, heads, -1).transpose(0, 1)  # [S*G, N*P, C/G] view
        q, k, v = (torch.bmm(by_head, proj.group_matrices().transpose(1, 2))  # [S*G, N*P, C/G]
                   for proj in (self.proj_q, self.proj_k, self.proj_v))
        scales = self._scales.get(self, lambda: self.scales.stacked().flatten(0, 1).to(q.dtype), key=q.dtype)
        q = (_unit(q) * scales[:, None]).view(heads * n, positions, -1)  # scales [S*G, C/G]
        k, v = _unit(k).view(heads * n, positions, -1), v.view(heads * n, positions, -1)  # [S*G*N, P, C/G]
        chunks = range(0, len(q), ATTENTION_CHUNK)  # keeps each [chunk, P, P] weight block in cache
        if torch.is_grad_enabled():  # `out=` writes are not differentiable
            out = torch.cat([self._attend(q, k, v, slice(c, c + ATTENTION_CHUNK)) for c in chunks])
        else:
            out = torch.empty_like(v)
            for c in chunks:
                torch.matmul(self._attend(q, k, None, slice(c, c + ATTENTION_CHUNK)), v[c:c + ATTENTION_CHUNK],
                             out=out[c:c + ATTENTION_CHUNK])
        out = out.view(heads, n, height, width, -1).permute(1, 2, 3, 0, 4).reshape(n, height, width, -1)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, part: slice) -> torch.Tensor:
        """Softmax attention weights `[chunk, P, P']` of one chunk of heads, applied to `v` when given."""
        weights = torch.softmax(q[part] @ k[part].transpose(1, 2), dim=-1)
        return weights if v is None else weights @ v[part]

    def forward(self, f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """`f` `[N, S*F, H, W]`, `m` `[N, S*M]` -> `[N, S*out, H, W]`."""
        if self._state is None:
            zeros = f.new_zeros(1, self.streams * self.hidden, 1, 1)
            self._state = (zeros, zeros)
        h, c = self._state
        groups = self.streams * self.groups
        x = torch.tanh(self.proj_x[0](h) + self.proj_x[1](f) + self.proj_x[2](m[:, :, None, None]))
        z = self.conv(gcat([x, h], groups))
        za = gcat([z, self.attention(z)], groups)
        c = torch.sigmoid(self.proj_f(za)) * c + torch.sigmoid(self.proj_i(za)) * torch.tanh(self.proj_g(za))
        h = torch.sigmoid(self.proj_o(za)) * torch.tanh(c)
        self._state = (h, c)
        return self.out(h)
