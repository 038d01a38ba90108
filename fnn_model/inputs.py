"""Input forms of `predict` (spec 1.2): frames, eye positions and behaviour, checked and broadcast to one batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fnn_model.config import NetworkConfig


@dataclass(frozen=True)
class FrameInputs:
    """A clip in canonical form: `frames` uint8 `[T, N, C, H, W]`, `eye` float32 `[T, N, P]`,
    `behaviour` float32 `[T, N, M]`; `batched` tells whether the caller used a batch form."""

    frames: torch.Tensor
    eye: torch.Tensor
    behaviour: torch.Tensor
    batched: bool

    def to(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.frames.to(device), self.eye.to(device), self.behaviour.to(device)


def _frames(stimuli: Sequence[np.ndarray] | np.ndarray, channels: int) -> tuple[np.ndarray, bool]:
    """T frames of one form -> uint8 `[T, N, C, H, W]` and whether the form was batched."""
    arrays = [np.asarray(f) for f in stimuli]
    if not arrays:
        raise ValueError("stimuli: expected at least one frame, got none")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"stimuli: every frame must have the same shape, got {sorted(shapes)}")
    first = arrays[0]
    if first.dtype != np.uint8:
        raise TypeError(f"stimuli: frames must be uint8 (values 0..255), got dtype {first.dtype}")
    clip = np.stack(arrays)
    if first.ndim == 2:  # [H, W]
        return clip[:, None, None], False
    if first.ndim not in (3, 4):
        raise ValueError(
            f"stimuli: each frame must be [H, W], [H, W, C] or [N, H, W, C]; got a {first.ndim}-D frame {first.shape}"
        )
    if first.shape[-1] != channels:
        raise ValueError(f"stimuli: frames of shape {first.shape} must end in C = {channels} channels")
    if first.ndim == 3:  # [H, W, C]
        return clip.transpose(0, 3, 1, 2)[:, None], False
    return clip.transpose(0, 1, 4, 2, 3), True  # [T, N, H, W, C]


def _vectors(values: Sequence[np.ndarray] | np.ndarray | None, frames: int, size: int, name: str
             ) -> tuple[np.ndarray, bool]:
    """T vectors `[P]` or `[N, P]` (None: zeros) -> float32 `[T, N, P]` and whether batched."""
    if values is None:
        return np.zeros((frames, 1, size), np.float32), False
    arrays = [np.asarray(v, dtype=np.float32) for v in values]
    if len(arrays) != frames:
        raise ValueError(f"{name}: expected one entry per frame ({frames}), got {len(arrays)}")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{name}: every frame's entry must have the same shape, got {sorted(shapes)}")
    shape = arrays[0].shape
    if len(shape) not in (1, 2) or shape[-1] != size:
        raise ValueError(f"{name}: each entry must be [{size}] or [N, {size}], got {list(shape)}")
    stacked = np.stack(arrays)
    return (stacked, True) if len(shape) == 2 else (stacked[:, None], False)


def parse_inputs(
    stimuli: Sequence[np.ndarray] | np.ndarray,
    perspectives: Sequence[np.ndarray] | np.ndarray | None,
    modulations: Sequence[np.ndarray] | np.ndarray | None,
    config: NetworkConfig,
) -> FrameInputs:
    """Check the three per-frame inputs and broadcast them to one batch size N (each must have batch 1 or N)."""
    frames, frames_batched = _frames(stimuli, config.stimuli)
    eye, eye_batched = _vectors(perspectives, len(frames), config.perspectives, "perspectives")
    behaviour, behaviour_batched = _vectors(modulations, len(frames), config.modulations, "modulations")
    sizes = {"stimuli": frames.shape[1], "perspectives": eye.shape[1], "modulations": behaviour.shape[1]}
    n = max(sizes.values())
    wrong = {k: v for k, v in sizes.items() if v not in (1, n)}
    if wrong:
        raise ValueError(f"batch sizes must be 1 or {n}; got {sizes}")
    t = len(frames)
    frames_t = torch.from_numpy(np.ascontiguousarray(frames))
    return FrameInputs(
        frames=frames_t.expand(t, n, *frames_t.shape[2:]),
        eye=torch.from_numpy(eye).expand(t, n, -1),
        behaviour=torch.from_numpy(behaviour).expand(t, n, -1),
        batched=frames_batched or eye_batched or behaviour_batched,
    )
