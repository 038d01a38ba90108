"""WConv against the spec's definition: a 3-D conv over the FIFO of padded inputs; kernels cached per dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fnn_model.wconv import WConv


def reference(conv: WConv, frames: list[torch.Tensor]) -> list[torch.Tensor]:
    """Spec 2.1 / 1.3: per frame, conv3d over `[x_{t-2}, x_{t-1}, x_t]` (zeros before the first frame)."""
    weight = torch.cat(list(conv.weights))  # [S*O, I/g, T, k, k]
    centered = weight - weight.mean(dim=(1, 2, 3, 4), keepdim=True)
    fan_in = weight[0].numel()
    scale = torch.cat(list(conv.gains)).flatten() / torch.sqrt(centered.square().mean(dim=(1, 2, 3, 4)) * fan_in + 1e-5)
    weight = centered * scale[:, None, None, None, None]
    bias = torch.cat(list(conv.biases)).flatten()
    p = conv.pad
    padded = [F.pad(x, (p,) * 4) for x in frames]
    history = [torch.zeros_like(padded[0])] * (conv.temporal - 1) + padded
    outputs = []
    for t in range(len(frames)):
        stack = torch.stack(history[t:t + conv.temporal], dim=2)  # [N, C, T, H+2p, W+2p]
        outputs.append(F.conv3d(stack, weight, bias, groups=conv.groups)[:, :, 0])
    return outputs


def test_temporal_conv_equals_a_3d_conv_over_the_padded_history() -> None:
    torch.manual_seed(0)
    conv = WConv(8, 8, streams=2, in_groups=2, out_groups=2, temporal=3, spatial=3).eval()
    for gain, bias in zip(conv.gains, conv.biases):
        torch.nn.init.uniform_(gain, 0.5, 2.0)
        torch.nn.init.uniform_(bias, -1.0, 1.0)
    frames = [torch.randn(3, 16, 6, 7) for _ in range(7)]  # more frames than taps: the ring buffer wraps twice
    with torch.inference_mode():
        for _ in range(2):  # and again after a reset
            conv.reset_state()
            got = [conv(x) for x in frames]
            for t, (g, e) in enumerate(zip(got, reference(conv, frames))):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"frame {t}")


def test_kernels_follow_the_autocast_dtype_and_come_back() -> None:
    torch.manual_seed(1)
    conv = WConv(4, 6, streams=2, temporal=1, spatial=3).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.inference_mode():
        exact = conv(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kernels, bias = conv.effective()
            low = conv(x)
        assert {k.dtype for k in kernels} == {torch.bfloat16} and bias.dtype == torch.bfloat16
        assert conv.effective()[0][0].dtype == torch.float32
        torch.testing.assert_close(conv(x), exact, rtol=0, atol=0)
    torch.testing.assert_close(low.float(), exact, rtol=0.05, atol=0.05)


def test_temporal_conv_needs_zero_padding() -> None:
    with pytest.raises(ValueError, match="zero padding"):
        WConv(4, 4, streams=1, temporal=3, spatial=3, padding="replicate")
