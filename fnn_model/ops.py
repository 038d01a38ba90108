"""Stateless tensor operations shared by the modules: variance-preserving GELU and group-wise concatenation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: 1 / std(GELU(z)), z ~ N(0, 1): the variance-preserving gain applied after every GELU (spec 2.6).
GELU_GAIN = 1.7015043497085571

#: Stabiliser used by weight normalisation and the retina pixel transform.
EPS = 1e-5


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU scaled by `GELU_GAIN`."""
    return F.gelu(x).mul_(GELU_GAIN)


def gcat(tensors: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """Concatenate channels group by group (spec 2.3), broadcasting later tensors to the first one.

    Each tensor is `[N_i, groups * c_i, *spatial_i]`; tensors after the first are expanded to the first tensor's
    batch and spatial size (a recurrent state may still be `[1, C, 1, 1]`). The output is
    `[N, groups * sum(c_i), *spatial]`, channels-last, with, for every group g, chunk g of tensor 1, then of
    tensor 2, ...
    """
    first = tensors[0]
    batch, spatial = first.shape[0], first.shape[2:]
    parts = [  # [N, *spatial, groups, c_i]: a view of channels-last inputs
        t.expand(batch, t.shape[1], *spatial).movedim(1, -1).unflatten(-1, (groups, -1)) for t in tensors
    ]
    return torch.cat(parts, dim=-1).flatten(-2).movedim(-1, 1)
