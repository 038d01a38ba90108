"""Readout locations in screen coordinates: where on the stimulus each unit's readout position looks.

A unit's readout samples the core's output map at ``tanh(mu)`` (``grid_sample`` coordinates of that map,
``align_corners=False``: x right, y DOWN, ``[-1, 1]`` the map's edges, ``shared/FNN_ARCHITECTURE.md`` §3.6). The
map covers the retina image, whose pixel ``(i, j)`` shows the stimulus at the perspective's sampling grid
``grid[i, j]`` (``grid_sample`` coordinates of the stimulus, §3.4.6). So the stimulus point a unit reads is the
sampling grid interpolated (bilinear, border) at ``tanh(mu)``; with ``y`` flipped it is in the published
convention (``IN_SILICO.md`` §1, §6): normalised screen coordinates, x right, y UP, ``(-1, -1)`` the bottom-left
corner, ``(1, 1)`` the top-right. Points outside the screen (the retina sees more than the monitor) lie beyond
``[-1, 1]``. The grid depends on the eye position: the default is the model's input when eye data is absent
(zeros).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fnn_model.network import ScanHead

__all__ = ["screen_locations"]


def screen_locations(head: ScanHead, height: int = 144, width: int = 256,
                     eye: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """The readout location of every unit of ``head`` in normalised screen coordinates: float32 ``[U, 2]``
    (x right, y up), for a ``height x width`` stimulus and the eye position ``eye``."""
    with torch.no_grad():
        eye_t = torch.tensor([list(eye)], dtype=torch.float32)
        grid = head.perspective.sampling_grid(eye_t, height, width)  # [1, H_r, W_r, 2]: stimulus x, y (down)
        position = torch.tanh(head.readout.position.mu.float())  # [U, 2]: core map x, y (down)
        sampled = F.grid_sample(grid.permute(0, 3, 1, 2), position[None, :, None, :], mode="bilinear",
                                padding_mode="border", align_corners=False)  # [1, 2, U, 1]
        x, y = sampled[0, :, :, 0]
    return torch.stack([x, -y], dim=1).numpy().astype(np.float32)
