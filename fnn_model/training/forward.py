"""The two modes of a twin on a batch of windows: training (one stream, sampled positions, jittered monitor) and
evaluation (all streams averaged, positions `mu`, mean monitor pose: exactly `predict`).

Training mode (TRAINING.md): per step one stream `s` runs alone (its single-stream views, `Twin.stream`); the
readout positions are drawn once per sequence and batch element as `tanh(mu + sigma @ eps)`, `eps ~ N(0, I)`;
the monitor pose is drawn once per sequence and batch element as `center + center_std * e_c`,
`angle + angle_std * e_a`. All random numbers of a step come from one `torch.Generator` (`draw`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fnn_model.network import reset_state
from fnn_model.training.batch import Batch
from fnn_model.training.twin import Twin


@dataclass(frozen=True)
class Draws:
    """The random numbers of one training step: the `stream`, position noise `positions` `[B, U, 2]`, monitor
    noise `center` and `angle` `[B, 3]` (standard normal, CPU float32)."""

    stream: int
    positions: torch.Tensor
    center: torch.Tensor
    angle: torch.Tensor


def draw(twin: Twin, batch_size: int, generator: torch.Generator, stream: int | None = None) -> Draws:
    """Draw a step's random numbers from `generator` (CPU): the stream (unless given), then position noise, then
    monitor noise. The same generator state gives the same draws."""
    if stream is None:
        stream = int(torch.randint(twin.config.streams, (1,), generator=generator))
    positions = torch.randn(batch_size, twin.units, 2, generator=generator)
    center, angle = torch.randn(2, batch_size, 3, generator=generator)
    return Draws(stream, positions, center, angle)


def _inputs(twin: Twin, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = next(twin.parameters())
    batch.check(twin.config.perspectives, twin.config.modulations, twin.units)
    return (batch.stimuli.to(p.device), batch.perspectives.to(p.device, p.dtype),
            batch.modulations.to(p.device, p.dtype))


def training_log_rates(twin: Twin, batch: Batch, draws: Draws) -> torch.Tensor:
    """Training mode: log-rates `[B, T, U]` of stream `draws.stream`, with autograd through the frozen core."""
    stimuli, eye, behaviour = _inputs(twin, batch)
    dtype, device = eye.dtype, eye.device
    core, modulation = twin.stream(draws.stream)
    for module in (core, modulation, twin.perspective):
        reset_state(module)
    monitor, position = twin.perspective.monitor, twin.readout.position
    pose = (monitor.center + monitor.center_std * draws.center.to(device, dtype),
            monitor.angle + monitor.angle_std * draws.angle.to(device, dtype))  # [B, 3] each
    eps = draws.positions.to(device, dtype)[..., None]  # [B, U, 2, 1]
    grid = torch.tanh(position.mu + (position.sigma @ eps)[..., 0])[:, :, None]  # [B, U, 1, 2]
    features = twin.readout.feature.weights[draws.stream][:, 0]  # [U, C]
    bias = twin.readout.biases[draws.stream][:, 0]  # [U]
    height, width = stimuli.shape[2:]
    out = []
    for t in range(stimuli.shape[1]):
        stimulus = stimuli[:, t, None].to(dtype) / 255  # [B, 1, H, W]
        sampling = twin.perspective.sampling_grid(eye[:, t], height, width, pose)
        image = twin.perspective(stimulus, eye[:, t], grid=sampling)
        r = core(image, modulation(behaviour[:, t]))  # [B, C, h, w]
        sampled = F.grid_sample(r, grid, mode="bilinear", padding_mode="border", align_corners=False)  # [B,C,U,1]
        out.append(torch.einsum("bcu,uc->bu", sampled[..., 0], features) + bias)
    for module in (core, modulation):
        reset_state(module)  # drop the histories (they hold the graph)
    return torch.stack(out, dim=1)


def eval_log_rates(twin: Twin, batch: Batch) -> torch.Tensor:
    """Evaluation mode, no autograd: stream-mean log-rates `[B, T, U]`; `exp` of them is `twin.predict`'s output
    for the same clips (the same computation, frame by frame from a reset state)."""
    stimuli, eye, behaviour = _inputs(twin, batch)
    out = torch.empty(stimuli.shape[0], stimuli.shape[1], twin.units, device=eye.device, dtype=eye.dtype)
    twin.reset()
    with torch.inference_mode():
        for t in range(stimuli.shape[1]):
            image, features = twin.head.encode(stimuli[:, t, None].to(eye.dtype) / 255, eye[:, t], behaviour[:, t])
            out[:, t] = twin.readout(twin.core(image, features)).mean(dim=1)
    twin.reset()
    return out
