"""Objective, optimizer and schedule of the training path against plain computations of their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fnn_model import NetworkConfig
from fnn_model.release import Release
from fnn_model.synthetic import make_release
from fnn_model.training import (NonFiniteObjectiveError, OptimizerConfig, PoissonObjective, ScheduleConfig, TwinSgd,
                                WarmupCosine, build_optimizer, build_twin)
from fnn_model.training.optim import clip_gradient

UNITS = 7


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("release"))
    make_release(url, [(4, 7, 3)], NetworkConfig.tiny(), seed=1)
    return build_twin(Release.open(url), (4, 7), UNITS)


def test_poisson_objective_is_the_mean_after_burn_in() -> None:
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 12, 5))
    y = rng.poisson(2.0, size=(3, 12, 5)).astype(float)
    expected = np.mean([[[math.exp(r[b, t, u]) - r[b, t, u] * y[b, t, u] for u in range(5)] for t in range(10, 12)]
                        for b in range(3)])
    got = PoissonObjective(burn_in=10)(torch.from_numpy(r), torch.from_numpy(y))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    r[1, 11, 2] = np.inf
    with pytest.raises(NonFiniteObjectiveError):
        PoissonObjective(burn_in=10)(torch.from_numpy(r), torch.from_numpy(y))
    r[1, 11, 2] = np.nan
    with pytest.raises(NonFiniteObjectiveError):
        PoissonObjective(burn_in=10)(torch.from_numpy(r), torch.from_numpy(y))
    r[1, 11, 2] = 0
    y[0, 3, 0] = np.nan  # inside the burn-in: not part of the objective
    assert np.isfinite(PoissonObjective(burn_in=10)(torch.from_numpy(r), torch.from_numpy(y)).item())
    with pytest.raises(ValueError, match="burn-in"):
        PoissonObjective(burn_in=12)(torch.from_numpy(r), torch.from_numpy(y))


def test_schedule_follows_the_published_formula() -> None:
    schedule = WarmupCosine(0.1, ScheduleConfig())
    assert schedule.epochs == 100
    expected = [0.1 * (e + 0.5) / 10 for e in range(10)] + [0.1 * (np.cos(np.pi * t / 90) + 1) / 2 for t in range(90)]
    assert [schedule.lr_at(e) for e in range(100)] == pytest.approx(expected, rel=1e-12)
    assert schedule.lr_at(0) == pytest.approx(0.005) and schedule.lr_at(10) == pytest.approx(0.1)
    optimizer = TwinSgd([{"params": [torch.nn.Parameter(torch.zeros(2))]}])
    assert schedule.apply(optimizer, 55) == optimizer.param_groups[0]["lr"] == pytest.approx(expected[55])
    with pytest.raises(ValueError, match="epoch"):
        schedule.lr_at(100)
    short = WarmupCosine(1.0, ScheduleConfig(warmup=0, cosine=4))
    assert [short.lr_at(e) for e in range(4)] == pytest.approx([1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5,
                                                                0.5 + 0.5 * np.cos(3 * np.pi / 4)])


def test_weight_decay_reaches_only_weights(twin) -> None:
    optimizer = build_optimizer(twin, OptimizerConfig(lr=1.0, momentum=0.0, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in twin.named_trainable_parameters()}
    with torch.no_grad():  # non-zero values everywhere, zero gradients: only the decay moves anything
        for p in twin.trainable_parameters():
            p.add_(0.5)
            p.grad = torch.zeros_like(p)
    moved = {n: p.detach().clone() for n, p in twin.named_trainable_parameters()}
    optimizer.step()
    decayed = set()
    for name, p in twin.named_trainable_parameters():
        if torch.equal(p, moved[name]):
            continue
        torch.testing.assert_close(p, moved[name] * 0.9)
        decayed.add(name)
    assert decayed == {n for n in moved if ".weights." in n}
    assert "readout.feature.weights.0" in decayed and "perspective.mlp.linears.1.weights.0" in decayed
    for name in ("readout.position.mu", "readout.position.sigma", "readout.biases.0",
                 "perspective.mlp.linears.1.gains.0", "perspective.monitor.center", "perspective.retina_pixel.logit"):
        assert name not in decayed
    with torch.no_grad():
        for name, p in twin.named_trainable_parameters():
            p.copy_(before[name])
            p.grad = None


def clip_reference(grad: np.ndarray, param: np.ndarray, clip: float, eps: float, rows: bool) -> np.ndarray:
    """Row by row (or whole): scale a gradient slice down to `clip * max(|param slice|, eps)` if larger."""
    out = grad.copy()
    slices = range(len(grad)) if rows and grad.ndim > 1 else [slice(None)]
    for s in slices:
        limit = clip * max(np.sqrt(np.sum(param[s] ** 2)), eps)
        norm = np.sqrt(np.sum(grad[s] ** 2))
        if norm > limit:
            out[s] = grad[s] * limit / norm
    return out


@pytest.mark.parametrize("rows", [True, False])
def test_adaptive_clipping_matches_the_rule(rows: bool) -> None:
    rng = np.random.default_rng(1)
    param = rng.normal(size=(6, 1, 4))
    param[2] = 0  # a zero row: the floor eps sets its limit
    grad = rng.normal(size=(6, 1, 4)) * np.array([1e-4, 1, 1, 1e-6, 0.01, 10])[:, None, None]
    got = clip_gradient(torch.from_numpy(grad), torch.from_numpy(param), 0.01, 1e-3, rows).numpy()
    expected = clip_reference(grad, param, 0.01, 1e-3, rows)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert not np.allclose(got, grad)  # something was clipped
    vector = rng.normal(size=5)
    np.testing.assert_allclose(clip_gradient(torch.from_numpy(vector * 10), torch.from_numpy(vector), 0.01, 1e-3,
                                             rows).numpy(), clip_reference(vector * 10, vector, 0.01, 1e-3, rows))


@pytest.mark.parametrize("readout_clip, position_lr", [(None, 1.0), (1e9, 0.25)], ids=["public", "options"])
def test_step_scales_per_unit_gradients_then_clips(twin, readout_clip, position_lr) -> None:
    """One step: per-unit gradients x U, adaptive clipping (the readout's own clip when `readout_clip` is set), the
    positions' learning rate x `position_lr` (the options beyond the public recipe; their defaults keep it)."""
    optimizer = build_optimizer(twin, OptimizerConfig(lr=0.5, momentum=0.0, weight_decay=0.0, clip=0.05,
                                                      readout_clip=readout_clip, position_lr=position_lr))
    rng = np.random.default_rng(3)
    before = {n: p.detach().clone() for n, p in twin.named_trainable_parameters()}
    grads = {}
    with torch.no_grad():
        for name, p in twin.named_trainable_parameters():
            p.add_(torch.from_numpy(rng.normal(size=tuple(p.shape))).float())
            grads[name] = torch.from_numpy(rng.normal(size=tuple(p.shape)) * 0.01).float()
            p.grad = grads[name].clone()
    start = {n: p.detach().clone() for n, p in twin.named_trainable_parameters()}
    optimizer.step()
    for name, p in twin.named_trainable_parameters():
        per_unit = name.startswith("readout.")
        g = grads[name].double().numpy() * (UNITS if per_unit else 1)
        clip = readout_clip if per_unit and readout_clip is not None else 0.05
        rows = per_unit or ".weights." in name
        lr = 0.5 * (position_lr if name.startswith("readout.position.") else 1.0)
        expected = start[name].double().numpy() - lr * clip_reference(g, start[name].double().numpy(), clip, 1e-3,
                                                                        rows)
        np.testing.assert_allclose(p.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)
    with torch.no_grad():
        for name, p in twin.named_trainable_parameters():
            p.copy_(before[name])
            p.grad = None


def test_momentum_is_torch_sgd_nesterov_and_skips_missing_gradients() -> None:
    ours = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    reference = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    idle = torch.nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    mine = TwinSgd([{"params": [ours, idle], "scale": 1.0, "decay": True, "rows": False}],
                   OptimizerConfig(clip=1e9))
    for k in range(4):
        gradient = torch.tensor([0.3, -0.1, 0.2]) * (k + 1)
        ours.grad, reference.grad = gradient.clone(), gradient.clone()
        mine.step()
        sgd.step()
        torch.testing.assert_close(ours.detach(), reference.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(idle.detach(), torch.ones(2)) and idle not in mine.state
    restored = TwinSgd([{"params": [ours, idle], "scale": 1.0, "decay": True, "rows": False}])
    restored.load_state_dict(mine.state_dict())
    torch.testing.assert_close(restored.state[ours]["momentum_buffer"], mine.state[ours]["momentum_buffer"])
