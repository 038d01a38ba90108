"""Random releases in the real format and random stimulus clips, for dry runs, tests and benchmarks.

The weights are drawn so that every tensor influences the output (gains and biases perturbed, non-zero first
MLP layers, readout features scaled so that log-rates stay O(1)); they are not the trained model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fnn_model.config import NetworkConfig
from fnn_model.network import Core, ScanHead
from fnn_model.release import write_release
from fnn_model.wconv import EPS


def _perturb(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give gains, biases and raw first layers random values of the right scale (weights keep their init)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            leaf = name.split(".")[-2] if name.split(".")[-1].isdigit() else name.split(".")[-1]
            if leaf == "gains":
                p.mul_(torch.exp(0.2 * noise))
            elif leaf in ("biases", "scales"):
                p.add_(0.1 * noise)
            elif name.startswith("mlp.linears.0.weights"):
                p.copy_(0.5 * noise)


def make_core(config: NetworkConfig, seed: int = 0, input_gain: float = 1.0, biases: bool = True,
              shared_streams: bool = False, whiten: np.ndarray | None = None, whiten_scale: float = 0.25) -> Core:
    """A core with seeded random weights (eval mode).

    The options make a core for planted-teacher tests (`fnn_ray.training.synthetic_data.write_example`); the
    defaults leave the random core as it always was. `input_gain` scales the first conv's raw weights (the default
    core barely follows the stimulus: its output varies ~0.01 over time against ~0.16 over channels);
    `biases=False` zeroes every bias (the output settles from a reset state in ~12 frames instead of ~25);
    `shared_streams` gives every stream stream 0's weights (then each stream alone computes the stream mean);
    `whiten` (uint8 clips `[N, T, H, W]`): `whiten_output` on them, after the other options."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    core = Core(config)
    _perturb(core, generator)
    with torch.no_grad():
        params = dict(core.named_parameters())
        for name, p in params.items():
            if input_gain != 1.0 and name.startswith("feedforward.inputs.0.weights."):
                p.mul_(input_gain)
            if not biases and ".biases." in name:
                p.zero_()
        if shared_streams:
            for name, p in params.items():
                prefix, _, index = name.rpartition(".")
                if index.isdigit() and int(index) > 0 and f"{prefix}.0" in params:
                    p.copy_(params[f"{prefix}.0"])
    if whiten is not None:
        whiten_output(core, whiten, whiten_scale)
    return core.eval()


def whiten_output(core: Core, clips: np.ndarray, scale: float = 0.25, burn_in: int = 12) -> None:
    """Make the core's output well-conditioned on `clips` (uint8 `[N, T, H, W]`, resized to the retina, zero
    modulation features, frames after `burn_in`): the last 1x1 conv (`recurrent.out`) is followed by the ZCA
    transform `scale * cov^-1/2 (y - mean)`, folded into its weights, gains and biases, so every output channel is
    centred with covariance `scale^2 I` over frames and positions. Every stream's last conv becomes stream 0's
    whitened one (meant for `shared_streams`). The raw output's mean (~0.17 per channel) and ~100x eigenvalue
    spread make a readout's features learn slowly."""
    config, out = core.config, core.recurrent.out
    channels = config.recurrent.out_channels
    size = (config.perspective.retina_height, config.perspective.retina_width)
    frames = torch.from_numpy(clips).float() / 255
    modulation = frames.new_zeros(len(clips), config.streams * config.modulation.lstm_features)
    core.reset_state()
    with torch.inference_mode():
        y = torch.stack([core(F.interpolate(frames[:, t, None], size=size, mode="bilinear", align_corners=False)
                              .repeat(1, config.stimuli, 1, 1), modulation)[:, :channels]
                         for t in range(frames.shape[1])], 1)[:, burn_in:].double()  # [N, T', O, h, w]
    core.reset_state()
    mean = y.mean(dim=(0, 1, 3, 4))
    centred = (y - mean[:, None, None]).transpose(0, 2).reshape(channels, -1)
    values, vectors = torch.linalg.eigh(centred @ centred.T / centred.shape[1])
    transform = scale * vectors @ torch.diag(values.clamp(min=1e-12) ** -0.5) @ vectors.T  # [O, O]
    with torch.no_grad():
        kernels, bias = out.effective()
        kernel = transform @ kernels[0][:channels].double().reshape(channels, -1)
        bias = transform @ ((bias[:channels].double() if bias is not None else 0) - mean)
        for s in range(config.streams):
            out.weights[s].copy_(kernel.reshape(out.weights[s].shape))
            out.gains[s].copy_(torch.sqrt(kernel.square().sum(1) + EPS).reshape(out.gains[s].shape))
            out.biases[s].copy_(bias.reshape(out.biases[s].shape))
    out.reset_state()


def make_head(config: NetworkConfig, units: int, seed: int = 0) -> ScanHead:
    """A scan head with seeded random weights: small eye rotation, jittered monitor, spread-out unit positions."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = ScanHead(config, units)
    for part in (head.perspective, head.modulation):
        _perturb(part, generator)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    with torch.no_grad():
        p = head.perspective
        p.mlp.linears[0].weights[0].copy_(0.1 * randn(*p.mlp.linears[0].weights[0].shape))
        p.monitor.center.add_(0.02 * randn(3))
        p.monitor.angle.add_(0.05 * randn(3))
        p.retina_pixel.logit.add_(0.2 * randn(1))
        r = head.readout
        r.position.mu.copy_(torch.rand(units, 2, generator=generator) * 2.4 - 1.2)
        for w in r.feature.weights:
            w.copy_(randn(*w.shape) / r.channels**0.5)
        for b in r.biases:
            b.copy_(0.1 * randn(*b.shape))
    return head.eval()


def make_release(
    url: str,
    scans: Sequence[tuple[int, int, int]] = ((4, 7, 23), (8, 5, 64), (9, 6, 41)),
    config: NetworkConfig | None = None,
    seed: int = 0,
    storage_options: Mapping[str, object] | None = None,
    core_options: Mapping[str, object] | None = None,
) -> None:
    """Write a random release of `(session, scan_idx, units)` scans to `url` (a directory or `.zip`).
    `core_options`: keyword arguments of `make_core` (default: none, the usual random core)."""
    config = config or NetworkConfig()
    core = make_core(config, seed, **(core_options or {}))
    heads, unit_tables = {}, []
    rng = np.random.default_rng(seed)
    for session, scan_idx, units in scans:
        heads[(session, scan_idx)] = make_head(config, units, seed=seed * 1_000_003 + session * 1000 + scan_idx)
        unit_ids = np.sort(rng.choice(units * 20, size=units, replace=False))
        unit_tables.append(pd.DataFrame({"session": session, "scan_idx": scan_idx, "unit_id": unit_ids,
                                         "readout_id": np.arange(units)}))
    write_release(url, core, heads, pd.concat(unit_tables, ignore_index=True), storage_options=storage_options)


def random_clips(n: int, frames: int, height: int = 144, width: int = 256, seed: int = 0) -> np.ndarray:
    """Random uint8 clips `[n, frames, height, width]`: coarse and fine random blobs plus pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    total = n * frames
    image = torch.zeros(total, 1, height, width)
    for cells, weight in ((4, 0.5), (16, 0.3)):
        coarse = torch.rand(total, 1, cells, cells * 2, generator=generator)
        image += weight * F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    image += 0.2 * torch.rand(total, 1, height, width, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).reshape(n, frames, height, width).numpy()


def random_behaviour(n: int, frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal eye positions and behaviour, float32 `[n, frames, 2]` each."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, frames, 2), dtype=np.float32),
            rng.standard_normal((n, frames, 2), dtype=np.float32))
