"""Perspective ("MlpMonitorRetina", spec 3.4): the monitor image as seen by a rotating eye on a retina grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fnn_model.config import PerspectiveConfig
from fnn_model.mlp import Mlp
from fnn_model.ops import EPS


def rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices `Rz @ Ry @ Rx` for angles `[..., 3]` = (x, y, z) -> `[..., 3, 3]`."""
    cos, sin = angles.cos().unbind(-1), angles.sin().unbind(-1)
    one, zero = torch.ones_like(angles[..., 0]), torch.zeros_like(angles[..., 0])

    def matrix(*rows: torch.Tensor) -> torch.Tensor:
        return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))

    rx = matrix(one, zero, zero, zero, cos[0], -sin[0], zero, sin[0], cos[0])
    ry = matrix(cos[1], zero, sin[1], zero, one, zero, -sin[1], zero, cos[1])
    rz = matrix(cos[2], -sin[2], zero, sin[2], cos[2], zero, zero, zero, one)
    return rz @ ry @ rx


def retina_grid(height: int, width: int, degrees: float) -> torch.Tensor:
    """Unit ray directions of an angular retina `[height, width, 3]` (spec 3.4.3)."""
    x = torch.linspace(-1, 1, width) * ((width - 1) / width)
    y = torch.linspace(-1, 1, height) * height / width * ((width - 1) / width)
    y, x = torch.meshgrid(y, x, indexing="ij")
    rho = (torch.sqrt(x**2 + y**2) * (degrees / 180 * math.pi)).clamp(0, math.pi / 2)
    theta = torch.atan2(y, x)
    return torch.stack([rho.sin() * theta.cos(), rho.sin() * theta.sin(), rho.cos()], dim=-1)


class Monitor(nn.Module):
    """The monitor plane: `center` `[3]`, rotation `angle` `[3]` (the `*_std` tensors are training-only jitter)."""

    def __init__(self) -> None:
        super().__init__()
        self.center = nn.Parameter(torch.tensor([0.0, 0.0, 0.5]))
        self.angle = nn.Parameter(torch.zeros(3))
        self.center_std = nn.Parameter(torch.full((3,), 0.05))
        self.angle_std = nn.Parameter(torch.full((3,), 0.05))

    def project(self, rays: torch.Tensor, center: torch.Tensor | None = None, angle: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rays from the eye `[..., 3]` -> in-plane coordinates `(u, v)`, each `[...]`.

        `center`, `angle` `[3]`: a pose other than the mean one (training jitters it); default `center`, `angle`.
        """
        center = self.center if center is None else center
        axes = rotation(self.angle if angle is None else angle)
        x_axis, y_axis, normal = axes[:, 0], axes[:, 1], axes[:, 2]
        t = (normal @ center) / (rays @ normal).clamp(min=EPS)
        offset = t[..., None] * rays - center
        return offset @ x_axis, offset @ y_axis


class MonitorPixel(nn.Module):
    """Monitor luminance transform `I ** power * scale + offset` (0-d buffers read from the release)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("power", torch.tensor(1.7))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("offset", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(self.power) * self.scale + self.offset


class RetinaPixel(nn.Module):
    """Retina transform `(J + eps) ** sigmoid(logit) * scale + offset`."""

    def __init__(self) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(1))
        self.scale = nn.Parameter(torch.ones(1))
        self.offset = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + EPS).pow(torch.sigmoid(self.logit)) * self.scale + self.offset


class Retina(nn.Module):
    """Holds the ray grid buffer `grid` `[H_r, W_r, 3]` (loaded from the release, not recomputed)."""

    def __init__(self, height: int, width: int, degrees: float) -> None:
        super().__init__()
        self.register_buffer("grid", retina_grid(height, width, degrees))


class Perspective(nn.Module):
    """Stimulus `[N, C, H_i, W_i]` in [0, 1] and eye position `[N, P]` -> retina image `[N, C, H_r, W_r]`."""

    def __init__(self, config: PerspectiveConfig, perspectives: int = 2) -> None:
        super().__init__()
        c = config
        self.monitor = Monitor()
        self.monitor_pixel = MonitorPixel()
        self.retina = Retina(c.retina_height, c.retina_width, c.retina_degrees)
        self.retina_pixel = RetinaPixel()
        features = [perspectives] + [c.mlp_features] * c.mlp_layers + [3]
        self.mlp = Mlp(features, streams=1, activate_last=False)
        nn.init.zeros_(self.mlp.linears[0].weights[0])  # spec 5: a fresh eye rotation is the identity

    def sampling_grid(self, eye: torch.Tensor, height: int, width: int,
                      pose: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Eye positions `[N, P]` and stimulus size -> `grid_sample` grid `[N, H_r, W_r, 2]` (x, y).

        `pose`: per-sample monitor `(center, angle)`, `[N, 3]` each (training's jittered pose); default the mean.
        """
        rays = torch.einsum("nab,ijb->nija", rotation(self.mlp(eye)), self.retina.grid)
        if pose is None:
            u, v = self.monitor.project(rays)
        else:
            u, v = (torch.stack(c) for c in zip(*(self.monitor.project(r, c, a) for r, c, a in zip(rays, *pose))))
        grid_h, grid_w = self.retina.grid.shape[:2]
        k = width / (width - 1)
        gx = ((u * k) * (grid_w - 1)) / grid_w
        gy = (((v * width) / height) * k) * (grid_h - 1) / grid_h
        return torch.stack([gx, gy], dim=-1)

    def forward(self, stimulus: torch.Tensor, eye: torch.Tensor, periphery: str = "dark",
                grid: torch.Tensor | None = None) -> torch.Tensor:
        """`stimulus` `[N, C, H_i, W_i]`, `eye` `[N, P]` (same N) -> `[N, C, H_r, W_r]`.

        `grid`: `sampling_grid(eye, H_i, W_i)` computed beforehand, to reuse while the eye stays put (`eye` is
        then not read).
        """
        if grid is None:
            grid = self.sampling_grid(eye, stimulus.shape[2], stimulus.shape[3])
        padding = "zeros" if periphery == "dark" else "border"
        image = F.grid_sample(self.monitor_pixel(stimulus), grid, mode="bilinear", padding_mode=padding,
                              align_corners=False)
        return self.retina_pixel(image)
