"""The two modes of a twin on a batch of windows: training (one stream, sampled positions, jittered monitor) and
evaluation (all streams averaged, positions `mu`, mean monitor pose: exactly `predict`).

Training mode (TRAINING.md): per step one stream `s` runs alone (its single-stream views, `Twin.stream`); the
readout positions are drawn once per sequence and batch element as `tanh(mu + sigma @ eps)`, `eps ~ N(0, I)`;
the monitor pose is drawn once per sequence and batch element as `center + center_std * e_c`,
`angle + angle_std * e_a`. All random numbers of a step come from one `torch.Generator` (`draw`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def training_log_rates(twin: Twin, batch: Batch, draws: Draws, checkpoint_frames: int | None = None
                       ) -> torch.Tensor:
    """Training mode: log-rates `[B, T, U]` of stream `draws.stream`, with autograd through the frozen core.

    `checkpoint_frames`: activation checkpointing over time chunks of that many frames. The first chunk keeps its
    activations (it computes the derived weights every later frame reuses); every later chunk keeps only its
    output and the state it hands on (recurrent states, temporal-conv histories) and is recomputed in backward.
    Same numbers, less memory, about one more forward of the checkpointed frames.
    """
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

    def frames(start: int, stop: int) -> torch.Tensor:
        out = []
        for t in range(start, stop):
            stimulus = stimuli[:, t, None].to(dtype) / 255  # [B, 1, H, W]
            with torch.autocast(device.type, enabled=False):  # eye geometry in full precision (tiny cost)
                sampling = twin.perspective.sampling_grid(eye[:, t], height, width, pose)
                image = twin.perspective(stimulus, eye[:, t], grid=sampling)
            r = core(image, modulation(behaviour[:, t]))  # [B, C, h, w]
            sampled = F.grid_sample(r.to(grid.dtype), grid, mode="bilinear", padding_mode="border",
                                    align_corners=False)  # the grid's dtype: autocast may have lowered r's
            out.append(torch.einsum("bcu,uc->bu", sampled[..., 0], features) + bias)  # sampled [B, C, U, 1]
        return torch.stack(out, dim=1)

    total = stimuli.shape[1]
    if checkpoint_frames is None or checkpoint_frames >= total:
        out = frames(0, total)
        for module in (core, modulation, twin.perspective):
            reset_state(module)  # drop the histories and derived weights: the graph holds what backward needs
        return out
    if checkpoint_frames < 1:
        raise ValueError(f"training_log_rates: checkpoint_frames must be >= 1, got {checkpoint_frames}")
    carriers = [m for root in (core, modulation) for m in root.modules() if hasattr(type(m), "sequence_state")]
    chunks = [frames(0, checkpoint_frames)]
    for start in range(checkpoint_frames, total, checkpoint_frames):
        stop = min(start + checkpoint_frames, total)
        sizes = [len(m.sequence_state) for m in carriers]
        out_sizes: list[int] = []

        def chunk(*state: torch.Tensor, start: int = start, stop: int = stop, sizes: list[int] = sizes,
                  out_sizes: list[int] = out_sizes) -> tuple[torch.Tensor, ...]:
            _scatter(carriers, sizes, state)
            out = frames(start, stop)
            out_sizes[:] = [len(m.sequence_state) for m in carriers]
            return (out, *(t for m in carriers for t in m.sequence_state))

        state = [t for m in carriers for t in m.sequence_state]
        out, *state = checkpoint(chunk, *state, use_reentrant=False)
        _scatter(carriers, out_sizes, state)  # the next chunk continues from the checkpoint's outputs
        chunks.append(out)
    return torch.cat(chunks, dim=1)  # derived weights stay cached until the next reset: a recompute reuses them


def _scatter(carriers: list[nn.Module], sizes: list[int], tensors: Sequence[torch.Tensor]) -> None:
    """Hand `tensors` back to the modules that carry state, `sizes[i]` tensors to module i, in order."""
    offset = 0
    for module, size in zip(carriers, sizes):
        module.sequence_state = list(tensors[offset:offset + size])
        offset += size


def eval_log_rates(twin: Twin, batch: Batch) -> torch.Tensor:
    """Evaluation mode, no autograd: stream-mean log-rates `[B, T, U]`; `exp` of them is `twin.predict`'s output
    for the same clips (the same computation, frame by frame from a reset state)."""
    stimuli, eye, behaviour = (x.transpose(0, 1).contiguous() for x in _inputs(twin, batch))  # time-major, as
    out = torch.empty(stimuli.shape[0], stimuli.shape[1], twin.units, device=eye.device)  # `predict` lays them out
    twin.reset()
    with torch.inference_mode():
        for t in range(len(stimuli)):
            image, features = twin.head.encode(stimuli[t, :, None].to(eye.dtype) / 255, eye[t], behaviour[t])
            out[t] = twin.readout(twin.core(image, features)).mean(dim=1)
    twin.reset()
    return out.transpose(0, 1)
