"""Dense feedforward core ("InputDense", spec 3.2): per-block input projection, two temporal convs, pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fnn_model.config import FeedforwardConfig
from fnn_model.ops import gcat, gelu
from fnn_model.wconv import WConv

SQRT_HALF = 2**-0.5


class DenseBlock(nn.Module):
    """Two temporal convs with a skip from the activated block input; the block input and both layer outputs
    are concatenated per (stream, group): `[N, S*C, H, W]` -> `[N, S*3C, H/pool, W/pool]`.
    """

    def __init__(self, channels: int, groups: int, temporal: int, spatial: int, pool: int, streams: int):
        super().__init__()
        self.groups, self.pool, self.streams = groups, pool, streams

        def conv(init_gain: float) -> WConv:
            return WConv(channels, channels, streams, groups, groups, temporal, spatial, init_gain=init_gain)

        self.convs = nn.ModuleList([conv(1.0), conv(SQRT_HALF)])
        skip = WConv(channels, channels, streams, groups, groups, bias=False, init_gain=SQRT_HALF)
        self.skips = nn.ModuleList([None, skip])  # layer 0 has no skip: the release has no `skips.0.*`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, S*C, H, W]` -> `[N, S*3C, H', W']`."""
        y0 = gelu(x)
        x1 = self.convs[0](y0)
        x2 = self.convs[1](gelu(x1)) + self.skips[1](y0)
        parts = [x, x1, x2]
        if self.pool > 1:  # pooling is per channel, so pool before concatenating: 1/pool^2 of the copy traffic
            parts = [F.avg_pool2d(p.contiguous(memory_format=torch.channels_last), self.pool) for p in parts]
        return gcat(parts, self.streams * self.groups)


class Feedforward(nn.Module):
    """Retina image repeated over streams `[N, S, Hr, Wr]` -> features `[N, S*out, Hr/8, Wr/8]`."""

    def __init__(self, config: FeedforwardConfig, streams: int, stimuli: int = 1) -> None:
        super().__init__()
        c = config
        inputs, blocks, in_channels = [], [], stimuli
        for b, (channels, groups) in enumerate(zip(c.channels, c.groups)):
            first = b == 0
            inputs.append(
                WConv(
                    in_channels, channels, streams, out_groups=groups,
                    spatial=c.input_kernel if first else 1, stride=c.input_stride if first else 1,
                    padding="replicate", wnorm=not first, gain=not first,
                )
            )
            blocks.append(DenseBlock(channels, groups, c.temporal[b], c.spatial[b], c.pools[b], streams))
            in_channels = 3 * channels
        self.inputs = nn.ModuleList(inputs)
        self.blocks = nn.ModuleList(blocks)
        self.out = WConv(in_channels, c.out_channels, streams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, S*stimuli, Hr, Wr]` -> `[N, S*out, H', W']`."""
        for projection, block in zip(self.inputs, self.blocks):
            x = block(projection(x))
        return self.out(x)
