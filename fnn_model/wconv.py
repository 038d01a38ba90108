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

from fnn_model.cache import Derived, autocast_dtype
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

    Input `[N, S*I, H, W]`, output `[N, S*O, H', W']`. With `temporal > 1` the module keeps the last `temporal`
    padded inputs in a ring buffer (zeros after `reset_state`) and convolves their stack oldest-first, so kernel
    index `temporal - 1` multiplies the current frame. While autograd is on, the past inputs are kept as a list
    instead (no in-place writes into tensors the graph holds) and each tap is convolved apart and summed.
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
        if temporal > 1 and padding != "zeros":
            raise ValueError("WConv: temporal kernels need zero padding (the released network has no other)")
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
        self._frames: torch.Tensor | None = None
        self._step = 0
        self._history: list[torch.Tensor] = []
        self._kernel_cache: Derived[tuple[list[torch.Tensor], torch.Tensor | None]] = Derived()

    @property
    def groups(self) -> int:
        """Groups of the underlying conv: `streams * in_groups`."""
        return self.streams * self.in_groups

    def reset_state(self) -> None:
        """Forget the buffered past inputs and recheck the cached kernels (start of a new sequence)."""
        self._frames, self._step, self._history = None, 0, []
        self._kernel_cache.recheck()

    @property
    def sequence_state(self) -> list[torch.Tensor]:
        """The state carried to the next frame under autograd: the past inputs of a temporal conv, oldest first."""
        return list(self._history)

    @sequence_state.setter
    def sequence_state(self, tensors: list[torch.Tensor]) -> None:
        self._history = list(tensors)

    def effective(self, per_tap: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The 2-D kernels actually run and the bias (or None), cached while the weights stay, in the autocast
        dtype when autocast is on (normalised in float32 first).

        Without a temporal kernel: one kernel `[S*O, I/g, k, k]`. With `T > 1` taps: `T` kernels
        `[S*O, T*I/g, k, k]`, kernel `r` for the ring buffer whose newest frame sits in slot `r`; with `per_tap`
        (the autograd path) `T` kernels `[S*O, I/g, k, k]`, kernel `tau` for tap `tau` (`T - 1`: current frame).
        """
        dtype = autocast_dtype(self.weights[0].device)
        return self._kernel_cache.get(self, lambda: self._compute_kernels(dtype, per_tap), key=(dtype, per_tap))

    def _compute_kernels(self, dtype: torch.dtype | None, per_tap: bool
                         ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        weight = self.weights.stacked()  # [S, O, I/g, T, k, k]
        if self.wnorm:
            gain = self.gains.stacked().flatten(1) if self.gains is not None else None
            weight = normalize(weight, gain, fan_dims=(2, 3, 4, 5))
        weight = weight.flatten(0, 1)  # [S*O, I/g, T, k, k]
        taps = self.temporal
        if per_tap:
            kernels = [weight[:, :, tap] for tap in range(taps)]
        else:
            kernels = []
            for newest in range(taps):
                # slot s of the ring buffer holds the frame (newest - s) mod T steps old, i.e. tap T - 1 - that
                order = [taps - 1 - (newest - slot) % taps for slot in range(taps)]
                kernels.append(weight[:, :, order].transpose(1, 2).flatten(1, 2))  # [S*O, T*I/g, k, k] (slot, c)
        kernels = [k.contiguous(memory_format=torch.channels_last) for k in kernels]
        kernels = kernels if dtype is None else [k.to(dtype) for k in kernels]
        bias = self.biases.stacked().flatten() if self.biases is not None else None
        return kernels, bias if bias is None or dtype is None else bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, S*I, H, W]` -> `[N, S*O, H', W']`, channels-last (oneDNN's grouped convs, 1x1 included, are
        fastest channels-last on CPU, and the core keeps every feature map in that layout)."""
        if self.temporal > 1 and torch.is_grad_enabled():
            return self._taps(x, *self.effective(per_tap=True))
        kernels, bias = self.effective()
        if self.temporal > 1:
            return self._temporal(x, kernels, bias)
        if x.shape[2:] == (1, 1) and self.spatial == 1:
            return self._pointwise(x, self.group_matrices(), bias)
        padding = self.pad
        if padding and self.padding == "replicate":
            x, padding = F.pad(x, (padding,) * 4, mode="replicate"), 0
        x = x.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, kernels[0], bias, stride=self.stride, padding=padding, groups=self.groups)

    def _temporal(self, x: torch.Tensor, kernels: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        """Write the current frame into its ring-buffer slot, then convolve all `T` slots in one conv2d.

        The buffer is `[N, G*T*I/g, H+2p, W+2p]` channels-last with channels ordered (group, slot, channel); its
        zero border is the zero padding, so a frame costs one strided copy and one conv.
        """
        n, _, height, width = x.shape
        p, taps = self.pad, self.temporal
        if self._frames is None:
            shape = (n, self.groups * taps * (self.in_channels // self.in_groups), height + 2 * p, width + 2 * p)
            self._frames = torch.zeros(shape, dtype=x.dtype, device=x.device).contiguous(
                memory_format=torch.channels_last)
        newest = self._step % taps
        slots = self._frames.permute(0, 2, 3, 1).unflatten(3, (self.groups, taps, -1))  # [N, H', W', G, T, I/g]
        slots[:, p:p + height, p:p + width, :, newest] = x.permute(0, 2, 3, 1).unflatten(3, (self.groups, -1))
        self._step += 1
        return F.conv2d(self._frames, kernels[newest], bias, stride=self.stride, groups=self.groups)

    def _taps(self, x: torch.Tensor, kernels: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        """Autograd path of a temporal conv: `sum_tau conv2d(x_{t-T+1+tau}, W[:, :, tau])` over the inputs seen so
        far (zero history contributes nothing); `kernels[tau]` is tap `tau`. Every past input is held (and saved
        for backward) once, not stacked per frame."""
        taps = self.temporal
        self._history = [*self._history[1 - taps:], x]
        y = None
        for back, past in enumerate(reversed(self._history)):
            term = F.conv2d(past, kernels[taps - 1 - back], stride=self.stride, padding=self.pad, groups=self.groups)
            y = term if y is None else y + term
        return y if bias is None else y + bias[:, None, None]

    def group_matrices(self) -> torch.Tensor:
        """A 1x1 (non-temporal) conv's effective kernel as one matrix per group, `[G, O/G, I/G]` (a view of the
        cached kernel), for running it as a batched matmul."""
        if self.spatial != 1 or self.temporal != 1:
            raise ValueError(f"WConv: group matrices need a 1x1 kernel, this one is {self.temporal}x{self.spatial}")
        kernel = self.effective()[0][0]  # [G*O/G, I/G, 1, 1]
        return kernel.view(self.groups, -1, kernel.shape[1])

    @staticmethod
    def _pointwise(x: torch.Tensor, matrices: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A grouped 1x1 conv of a `[N, G*I/G, 1, 1]` input (a linear layer) as one batched matmul
        `[G, O/G, I/G] @ [N, G, I/G, 1]` (cheaper than a oneDNN conv call at this size)."""
        y = torch.matmul(matrices, x.reshape(len(x), len(matrices), -1, 1)).view(len(x), -1, 1, 1)  # [N, G*O/G, 1, 1]
        return y if bias is None else y + bias[:, None, None]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """Apply as a per-stream linear layer: `[N, S*I]` -> `[N, S*O]` (spec 2.2)."""
        return self(x[:, :, None, None])[:, :, 0, 0]
