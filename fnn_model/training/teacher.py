"""A planted teacher for tests of the training path: a twin with known readout positions and feature weights on
the frozen core, producing Poisson responses to given stimuli (the recordings a student twin is fitted to)."""

from __future__ import annotations

import math

import numpy as np
import torch

from fnn_model.release import Release
from fnn_model.training.batch import Batch
from fnn_model.training.forward import eval_log_rates
from fnn_model.training.twin import Twin, build_twin


def planted_positions(units: int, seed: int = 0, extent: float = 0.8) -> torch.Tensor:
    """Readout positions `[U, 2]` (x, y) in `(-extent, extent)`, spread over the screen: one per cell of a
    `ceil(sqrt(U))`-square grid (cells drawn without repeats), jittered uniformly within its cell."""
    rng = np.random.default_rng(seed)
    side = math.ceil(math.sqrt(units))
    cells = rng.permutation(side * side)[:units]
    corner = np.stack([cells % side, cells // side], axis=1)
    unit = (corner + rng.uniform(0.05, 0.95, size=(units, 2))) / side  # [U, 2] in (0, 1)
    return torch.from_numpy((2 * unit - 1) * extent).float()


def make_teacher(release: Release, foundation_scan: tuple[int, int], units: int, seed: int = 0,
                 feature_scale: float = 1.0, log_rate: float = 0.0, head_seed: int | None = None,
                 extent: float = 0.8) -> Twin:
    """A teacher twin: `release`'s frozen core and the foundation scan's `modulation.lstm`, a fresh perspective and
    modulation MLP, planted positions (`tanh(mu)` = `planted_positions(units, seed, extent)`), random feature weights
    `N(0, feature_scale^2 / C)` per stream (the same on every stream) and biases `log_rate` (the log of a unit's
    typical rate). Eval mode. `head_seed` (default `seed`): the seed of `build_twin`'s fresh perspective and
    modulation MLP; the trainer's `--seed` makes them the student's initial ones, so only the readout is to learn."""
    teacher = build_twin(release, foundation_scan, units, seed=seed if head_seed is None else head_seed)
    generator = torch.Generator().manual_seed(seed)
    readout = teacher.readout
    with torch.no_grad():
        readout.position.mu.copy_(torch.atanh(planted_positions(units, seed, extent)))
        weights = torch.randn(readout.feature.weights[0].shape, generator=generator)
        for w in readout.feature.weights:
            w.copy_(weights * feature_scale / readout.channels**0.5)
        for b in readout.biases:
            b.fill_(log_rate)
    return teacher.eval()


def teacher_responses(teacher: Twin, stimuli: np.ndarray, perspectives: np.ndarray | None = None,
                      modulations: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's rates and Poisson counts, float32 `[N, T, U]` each, for uint8 clips `[N, T, H, W]` with eye
    positions / behaviour float `[N, T, 2]` (zeros when None). Each clip starts from a reset state (eval mode:
    all streams, positions `mu`, mean monitor pose). Counts are drawn from a generator seeded by `seed`."""
    n, t = stimuli.shape[:2]
    config = teacher.config
    zeros = np.zeros((n, t, config.perspectives), np.float32)
    batch = Batch(stimuli, zeros if perspectives is None else perspectives,
                  np.zeros((n, t, config.modulations), np.float32) if modulations is None else modulations,
                  np.zeros((n, t, teacher.units), np.float32))
    rates = torch.exp(eval_log_rates(teacher, batch)).cpu()
    counts = torch.poisson(rates, generator=torch.Generator().manual_seed(seed))
    return rates.numpy(), counts.numpy()
