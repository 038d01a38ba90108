"""Readout locations in screen coordinates (fnn_ray.locations, the --readout export): a unit whose readout
position is planted at a screen point has its strongest flashing-dot response there (tiny model, planted weights)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fnn_model.config import NetworkConfig
from fnn_model.release import Release
from fnn_model.synthetic import make_release
from fnn_ray.export import export_readout
from fnn_ray.locations import screen_locations

H, W, R, C = 36, 64, 3, 5
#: Cells (row, col) of the dot grid, row 0 at the top, within the reach of the retina (which ends above the bottom row).
TARGETS = [(1, 1), (1, 2), (1, 3), (0, 2), (0, 1), (0, 3)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny release (retina 64 x 96) whose units' readout positions are planted at the TARGETS' centres, with
    a local core: no attention (value projections zero) and every spatial kernel reduced to its central taps."""
    config = NetworkConfig.tiny()
    config = dataclasses.replace(config, perspective=dataclasses.replace(config.perspective, retina_height=64,
                                                                         retina_width=96))
    root = tmp_path_factory.mktemp("release")
    make_release(str(root), [(1, 1, len(TARGETS))], config, seed=0)
    network = Release.open(str(root)).load_network(1, 1)
    grid = network.head.perspective.sampling_grid(torch.zeros(1, 2), H, W)[0]  # [H_r, W_r, 2], y down
    mus = []
    for row, col in TARGETS:  # the retina pixel that shows the target point, as a readout position
        x, y = 2 * (col + 0.5) / C - 1, 1 - 2 * (row + 0.5) / R
        i, j = np.unravel_index(int(torch.argmin((grid[..., 0] - x) ** 2 + (grid[..., 1] + y) ** 2)), grid.shape[:2])
        mus.append([np.arctanh((2 * j + 1) / grid.shape[1] - 1), np.arctanh((2 * i + 1) / grid.shape[0] - 1)])
    with torch.no_grad():
        for name, value in network.named_parameters():
            if "proj_v" in name:
                value.zero_()
            elif value.ndim == 5 and value.shape[-1] > 1:
                k = value.shape[-1]
                keep = torch.zeros(k, k)
                keep[(k - 1) // 2 : k - (k - 1) // 2, (k - 1) // 2 : k - (k - 1) // 2] = 1
                value.mul_(keep)
        network.head.readout.position.mu.copy_(torch.tensor(mus, dtype=torch.float32))
    return network


def test_locations_are_the_planted_screen_points(planted):
    locations = screen_locations(planted.head, H, W)
    want = [(2 * (c + 0.5) / C - 1, 1 - 2 * (r + 0.5) / R) for r, c in TARGETS]
    np.testing.assert_allclose(locations, want, atol=0.06)  # the nearest retina pixel's point


@pytest.mark.slow
def test_strongest_dot_response_is_at_the_location(planted):
    """White dots on every cell (3 gray frames, then 3 dot frames, one clip per cell in a batch): the cell with the
    largest change of a unit's mean response contains the unit's exported location."""
    frames = np.full((R * C, H, W, 1), 128, np.uint8)
    for r in range(R):
        for c in range(C):
            frames[r * C + c, r * H // R : (r + 1) * H // R, c * W // C : (c + 1) * W // C] = 255
    gray = np.full_like(frames, 128)
    responses = planted.predict([gray] * 3 + [frames] * 3)[3:].mean(axis=0)  # [cells, U]
    change = np.abs(responses - np.median(responses, axis=0))
    locations = screen_locations(planted.head, H, W)
    for u, (x, y) in enumerate(locations):
        cell = (int((1 - y) / 2 * R), int((x + 1) / 2 * C))
        assert np.unravel_index(np.argmax(change[:, u]), (R, C)) == cell, (u, x, y)


def test_export_writes_screen_locations(tmp_path):
    """The --readout export holds screen_locations of each head (scans in order), not the raw mu."""
    release = tmp_path / "release"
    make_release(str(release), [(2, 3, 4), (5, 6, 3)], NetworkConfig.tiny(), seed=1)
    heads = [Release.open(str(release)).load_head(*scan) for scan in ((2, 3), (5, 6))]
    export_readout(str(release), str(tmp_path / "out"))
    written = np.load(tmp_path / "out/readout/readout_locations.npy")
    np.testing.assert_allclose(written, np.concatenate([screen_locations(h) for h in heads]), rtol=1e-6, atol=1e-7)
    mu = np.concatenate([h.readout.position.mu.detach().numpy() for h in heads])
    assert not np.allclose(written, mu, atol=0.01)
