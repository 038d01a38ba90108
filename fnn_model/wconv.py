"""Weight-normalised multi-stream convolution ("WConv", spec 2.1), the unit behind every learned linear map.

A WConv holds `S` independent copies (streams) of a grouped 3-D convolution with a temporal kernel `T` over a
FIFO of past (padded) inputs. Parameters per stream `s`: `weights.{s}` `[O, I/g_in, T, k, k]`, optional
`gains.{s}` and `biases.{s}` `[G_out, O/G_out]`. Tensors are stream-major: channel `s * C + c`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fnn_model.cache import Derived
from fnn_model.ops import EPS


def normalize(weight: torch.Tensor, gain: torch.Tensor | None, fan_dims: tuple[int, ...]) -> torch.Tensor:
    """Weight normalisation (spec 2.1): `(V - mean) * gain / sqrt(var * fan_in + eps)`.

    Statistics (mean, population variance) run over `fan_dims` of `weight`, `fan_in` is their total size and
    `gain` (None: unit gain) has the shape of `weight` with `fan_dims` removed.
    """
    fan_in = 1
    for d in fan_dims:
        fan_in *= weight.shape[d]
    mean = weight.mean(dim=fan_dims, keepdim=True)
    centered = weight - mean
    var = centered.square().mean(dim=fan_dims, keepdim=True)
    scale = 1 / torch.sqrt(var * fan_in + EPS)
    if gain is not None:
        scale = scale * gain.reshape(scale.shape)
    return centered * scale


class StreamParameters(nn.ParameterList):
    """One tensor per stream, named `.0 ... .S-1` in the state dict."""

    def __init__(self, streams: int, *shape: int, fill: float | None = None) -> None:
        tensors = [torch.empty(*shape) if fill is None else torch.full(shape, float(fill)) for _ in range(streams)]
        super().__init__([nn.Parameter(t) for t in tensors])

    def stacked(self) -> torch.Tensor:
        """All streams stacked on a new leading axis: `[S, *shape]`."""
        return torch.stack(list(self))


class WConv(nn.Module):
    """Multi-stream grouped convolution with optional weight normalisation and a temporal kernel.

    Input `[N, S*I, H, W]`, output `[N, S*O, H', W']`. With `temporal > 1` the module keeps the last
    `temporal - 1` frames' partial outputs (zeros after `reset_state`), equivalent to convolving the stack of
    padded inputs oldest-first, so kernel index `temporal - 1` multiplies the current frame.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        streams: int,
        in_groups: int = 1,
        out_groups: int = 1,
        temporal: int = 1,
        spatial: int = 1,
        stride: int = 1,
        padding: Literal["zeros", "replicate"] = "zeros",
        wnorm: bool = True,
        gain: bool = True,
        bias: bool = True,
        init_gain: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels % in_groups or out_channels % in_groups or out_channels % out_groups:
            raise ValueError(f"WConv: channels {in_channels}->{out_channels} do not divide into groups")
        self.streams, self.in_channels, self.out_channels = streams, in_channels, out_channels
        self.in_groups, self.temporal, self.spatial, self.stride = in_groups, temporal, spatial, stride
        self.padding, self.wnorm = padding, wnorm
        self.pad = (spatial - stride) // 2
        fan_in = in_channels // in_groups * temporal * spatial * spatial
        bound = (1 / fan_in) ** 0.5 if wnorm else (3 / fan_in) ** 0.5
        self.weights = StreamParameters(streams, out_channels, in_channels // in_groups, temporal, spatial, spatial)
        for w in self.weights:
            nn.init.uniform_(w, -bound, bound)
        group_shape = (out_groups, out_channels // out_groups)
        self.gains = StreamParameters(streams, *group_shape, fill=init_gain) if wnorm and gain else None
        self.biases = StreamParameters(streams, *group_shape, fill=init_bias) if bias else None
        self._history: list[torch.Tensor] | None = None
        self._kernel_cache: Derived[tuple[torch.Tensor, torch.Tensor | None]] = Derived()

    def reset_state(self) -> None:
        """Forget the carried temporal partial sums and recheck the cached kernel (start of a new sequence)."""
        self._history = None
        self._kernel_cache.recheck()

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kernel actually run `[T*S*O, I/g, k, k]` and its bias (or None), cached while the weights stay."""
        return self._kernel_cache.get(self, self._compute_kernel)

    def _compute_kernel(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.weights.stacked()  # [S, O, I/g, T, k, k]
        if self.wnorm:
            gain = self.gains.stacked().flatten(1) if self.gains is not None else None
            weight = normalize(weight, gain, fan_dims=(2, 3, 4, 5))
        bias = self.biases.stacked().flatten() if self.biases is not None else None
        return self._kernel(weight.flatten(0, 1), bias)

    def _kernel(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective weight `[S*O, I/g, T, k, k]` -> the 2-D kernel actually run, `[T*S*O, I/g, k, k]`.

        All temporal taps are applied to the current frame in one grouped conv2d: output channels are ordered
        (group, tap, channel) so each group's outputs stay contiguous; the bias goes to the current-frame tap.
        Spatial kernels are stored channels-last.
        """
        groups, taps = self.streams * self.in_groups, self.temporal
        per_group = weight.shape[0] // groups
        kernel = weight.unflatten(0, (groups, per_group)).movedim(3, 1).flatten(0, 2)
        if bias is not None and taps > 1:
            bias = torch.cat([torch.zeros(groups, taps - 1, per_group), bias.view(groups, 1, per_group)], 1)
        if self.spatial > 1:
            kernel = kernel.contiguous(memory_format=torch.channels_last)
        return kernel, None if bias is None else bias.flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, S*I, H, W]` -> `[N, S*O, H', W']`.

        With `T > 1`, `y_t = sum_tau conv(x_{t-T+1+tau}, W_tau)` is computed as tap outputs of the current
        frame plus the carried tap outputs of the previous `T - 1` frames (zeros after a reset).
        """
        kernel, bias = self.effective()
        if self.pad:
            mode = "constant" if self.padding == "zeros" else "replicate"
            x = F.pad(x, (self.pad,) * 4, mode=mode)
        if self.spatial > 1:  # oneDNN's grouped spatial convs are fastest channels-last; 1x1 convs are not
            x = x.contiguous(memory_format=torch.channels_last)
        groups = self.streams * self.in_groups
        if self.spatial == 1 and self.temporal == 1 and self.stride == 1:
            return self._pointwise(x, kernel, bias, groups)
        y = F.conv2d(x, kernel, bias, stride=self.stride, groups=groups)
        if self.temporal == 1:
            return y
        taps = y.unflatten(1, (groups, self.temporal, -1))  # [N, G, T, O/G, H', W']
        current = taps[:, :, -1]
        if self._history is not None:
            current = current + self._history[0]
        # carried[j] holds what frame t+1+j still needs from frames up to t
        carried = [taps[:, :, -2 - j] for j in range(self.temporal - 1)]
        if self._history is not None:
            carried = [c + h for c, h in zip(carried[:-1], self._history[1:])] + carried[-1:]
        self._history = carried
        return current.flatten(1, 2)

    @staticmethod
    def _pointwise(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        """A grouped 1x1 conv as one batched matmul `[G, O/G, I/G] @ [N, G, I/G, H*W]` (on CPU, faster than
        oneDNN's grouped 1x1 convs at every batch size we measured)."""
        n, _, height, width = x.shape
        weight = kernel.view(groups, kernel.shape[0] // groups, kernel.shape[1])
        y = torch.matmul(weight, x.reshape(n, groups, -1, height * width))  # [N, G, O/G, H*W]
        y = y.view(n, -1, height, width)
        return y if bias is None else y + bias[:, None, None]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """Apply as a per-stream linear layer: `[N, S*I]` -> `[N, S*O]` (spec 2.2)."""
        return self(x[:, :, None, None])[:, :, 0, 0]
