"""The training path on the tiny network: what is frozen, training vs evaluation mode, gradients against finite
differences (float64), the frozen tensors after optimizer steps, and the planted teacher."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fnn_model import NetworkConfig
from fnn_model.network import ScanHead
from fnn_model.release import Release
from fnn_model.synthetic import make_release, random_behaviour, random_clips
from fnn_model.training import (Batch, NonFiniteObjectiveError, OptimizerConfig, PoissonObjective, build_optimizer,
                                build_twin, evaluate_objective, step)
from fnn_model.training.forward import draw, eval_log_rates, training_log_rates
from fnn_model.training.teacher import make_teacher, planted_positions, teacher_responses
from fnn_model.training.twin import Twin

UNITS = 5


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    url = str(tmp_path_factory.mktemp("release"))
    make_release(url, [(4, 7, 3), (8, 5, 4)], NetworkConfig.tiny(), seed=1)
    return Release.open(url)


def batch_of(n: int = 2, frames: int = 6, units: int = UNITS, seed: int = 0) -> Batch:
    eye, behaviour = random_behaviour(n, frames, seed=seed)
    responses = np.random.default_rng(seed).poisson(1.0, size=(n, frames, units)).astype(np.float32)
    return Batch(random_clips(n, frames, 18, 32, seed=seed), eye, behaviour, responses)


def randomized(twin: Twin, seed: int = 0) -> Twin:
    """The twin with every trained tensor moved off its initial value (so every one of them matters)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in twin.named_trainable_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if name.endswith("_std"):
                p.copy_(0.05 + 0.02 * noise.abs())
            elif name == "readout.position.sigma":
                p.copy_(0.3 * torch.eye(2) + 0.05 * noise)
            elif name == "readout.position.mu":
                p.copy_(0.5 * noise)
            else:
                p.add_((0.3 if ".weights." in name else 0.1) * noise)
    return twin


def test_build_twin_freezes_the_core_and_lstm_and_starts_a_fresh_head(release: Release) -> None:
    twin = build_twin(release, (8, 5), UNITS)
    foundation = release.load_head(8, 5)
    trained = {name for name, _ in twin.named_trainable_parameters()}
    frozen = {name for name, p in twin.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in twin.named_parameters() if n.startswith(("core.", "modulation.lstm."))}
    assert trained == {n for n, _ in twin.named_parameters()} - frozen
    assert any(n.startswith("perspective.") for n in trained) and "readout.position.mu" in trained
    assert any(n.startswith("modulation.mlp.") for n in trained)
    for key, value in foundation.modulation.lstm.state_dict().items():
        assert torch.equal(twin.modulation.lstm.state_dict()[key], value)
    for key, value in release.load_core().state_dict().items():
        assert torch.equal(twin.core.state_dict()[key], value)
    readout = twin.readout
    assert not readout.position.mu.any() and all(not w.any() for w in readout.feature.weights)
    assert torch.equal(readout.position.sigma, 0.4 * torch.eye(2).expand(UNITS, 2, 2))
    assert not twin.perspective.mlp.linears[0].weights[0].any()  # identity eye rotation at first
    with pytest.raises(ValueError, match="unknown scan 1-1"):
        build_twin(release, (1, 1), UNITS)


def test_head_state_dict_has_exactly_a_public_head_files_keys_and_shapes(release: Release) -> None:
    twin = build_twin(release, (4, 7), UNITS)
    head = twin.head_state_dict()
    reference = ScanHead(release.config, UNITS).state_dict()  # the keys a release's params_<s>_<i>.pt must hold
    assert list(head) == list(reference)
    assert {k: (v.shape, v.dtype) for k, v in head.items()} == {k: (v.shape, v.dtype) for k, v in reference.items()}
    assert not any(k.startswith("core.") for k in head)
    other = build_twin(release, (4, 7), UNITS, seed=3)
    other.load_head_state_dict(randomized(twin).head_state_dict())
    assert torch.equal(other.readout.position.mu, twin.readout.position.mu)


@pytest.mark.slow
def test_frozen_tensors_are_bit_identical_after_optimizer_steps(release: Release) -> None:
    twin = randomized(build_twin(release, (4, 7), UNITS))
    before = {k: v.clone() for k, v in twin.frozen_state().items()}
    digest, head = twin.frozen_state_hash(), twin.head_state_dict()
    optimizer = build_optimizer(twin, OptimizerConfig(lr=0.5, clip=1.0))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        step(twin, batch_of(), None, generator, PoissonObjective(burn_in=2))
        optimizer.step()
    assert twin.frozen_state_hash() == digest
    assert all(torch.equal(before[k], v) for k, v in twin.frozen_state().items())
    changed = [k for k, v in twin.head_state_dict().items() if not torch.equal(v, head[k])]
    assert "readout.position.mu" in changed and not any(k.startswith("modulation.lstm.") for k in changed)
    with torch.no_grad():  # the hash sees a change of any frozen tensor
        twin.core.recurrent.scales[0][0, 0] += 1e-6
    assert twin.frozen_state_hash() != digest


def test_evaluation_mode_is_predict_exactly(release: Release) -> None:
    twin = randomized(build_twin(release, (4, 7), UNITS))
    batch = batch_of(n=2, frames=5)
    rates = torch.exp(eval_log_rates(twin, batch)).numpy()  # exp as `predict` takes it (numpy's may differ by an ulp)
    stimuli = batch.stimuli.numpy()
    expected = twin.predict(list(stimuli.transpose(1, 0, 2, 3)[..., None]), list(batch.perspectives.numpy()
                            .transpose(1, 0, 2)), list(batch.modulations.numpy().transpose(1, 0, 2)))  # [T, N, U]
    assert np.array_equal(rates, expected.transpose(1, 0, 2))
    objective = PoissonObjective(burn_in=2)
    y = batch.units.numpy()[:, 2:].astype(np.float64)
    r = np.log(expected.transpose(1, 0, 2)[:, 2:].astype(np.float64))
    assert evaluate_objective(twin, batch, objective) == pytest.approx(np.mean(np.exp(r) - r * y), rel=1e-5)


def stream_output(twin: Twin, batch: Batch, stream: int, row: int) -> torch.Tensor:
    """Evaluation-mode log-rates `[T, U]` of one stream for one window (the full multi-stream network)."""
    twin.reset()
    out = []
    with torch.no_grad():
        for t in range(batch.frames):
            image, features = twin.head.encode(batch.stimuli[row:row + 1, t, None].float() / 255,
                                               batch.perspectives[row:row + 1, t], batch.modulations[row:row + 1, t])
            out.append(twin.readout(twin.core(image, features))[0, stream])
    twin.reset()
    return torch.stack(out)


def test_training_mode_is_one_stream_at_sampled_positions_and_jittered_pose(release: Release) -> None:
    """Each window of a training batch equals the evaluation network's output of the drawn stream with `mu` moved
    to the window's sampled position and the monitor moved to its jittered pose (an independent computation)."""
    twin = randomized(build_twin(release, (4, 7), UNITS))
    batch = batch_of(n=2, frames=5)
    draws = draw(twin, batch.size, torch.Generator().manual_seed(5))
    got = training_log_rates(twin, batch, draws).detach()
    assert got.shape == (2, 5, UNITS)
    for row in range(batch.size):
        moved = copy.deepcopy(twin)
        with torch.no_grad():
            p, m = moved.readout.position, moved.perspective.monitor
            p.mu.add_((p.sigma @ draws.positions[row, :, :, None])[..., 0])
            m.center.add_(m.center_std * draws.center[row])
            m.angle.add_(m.angle_std * draws.angle[row])
        expected = stream_output(moved, batch, draws.stream, row)
        torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)
    plain = stream_output(twin, batch, draws.stream, 0)
    assert (got[0] - plain).abs().max() > 1e-3  # the noise matters
    other = draw(twin, batch.size, torch.Generator().manual_seed(5), stream=1 - draws.stream)
    assert (training_log_rates(twin, batch, other).detach() - got).abs().max() > 1e-3


def test_step_is_deterministic_and_trains_only_the_drawn_stream(release: Release) -> None:
    results = []
    for _ in range(2):
        twin = randomized(build_twin(release, (4, 7), UNITS))
        loss = step(twin, batch_of(), None, torch.Generator().manual_seed(11), PoissonObjective(burn_in=2))
        results.append((loss, {n: p.grad for n, p in twin.named_trainable_parameters()}))
    (loss, grads), (loss2, grads2) = results
    assert loss == loss2
    assert all((g is None and grads2[n] is None) or torch.equal(g, grads2[n]) for n, g in grads.items())
    stream = draw(twin, 2, torch.Generator().manual_seed(11)).stream
    for name, grad in grads.items():
        per_stream = name.startswith(("modulation.", "readout.feature.", "readout.biases."))
        if per_stream and not name.endswith(f".{stream}"):
            assert grad is None, name
        else:
            assert grad is not None and grad.abs().sum() > 0, name


def test_caches_stay_correct_across_steps(release: Release) -> None:
    """After optimizer steps, the training and evaluation outputs equal those of a fresh copy (no stale cache)."""
    twin = randomized(build_twin(release, (4, 7), UNITS))
    optimizer = build_optimizer(twin, OptimizerConfig(lr=0.5, clip=1.0))
    generator = torch.Generator().manual_seed(0)
    batch = batch_of()
    eval_log_rates(twin, batch)  # inference-mode caches first
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        step(twin, batch, None, generator, PoissonObjective(burn_in=2))
        optimizer.step()
    fresh = copy.deepcopy(twin)
    draws = draw(twin, batch.size, torch.Generator().manual_seed(1))
    assert torch.equal(training_log_rates(twin, batch, draws), training_log_rates(fresh, batch, draws))
    assert torch.equal(eval_log_rates(twin, batch), eval_log_rates(fresh, batch))


def test_non_finite_objective_is_an_error(release: Release) -> None:
    twin = build_twin(release, (4, 7), UNITS)
    batch = batch_of()
    units = batch.units.clone()
    units[1, 4, 2] = float("nan")
    bad = Batch(batch.stimuli, batch.perspectives, batch.modulations, units)
    with pytest.raises(NonFiniteObjectiveError):
        step(twin, bad, 0, torch.Generator().manual_seed(0), PoissonObjective(burn_in=2))
    assert all(p.grad is None for p in twin.trainable_parameters())  # nothing reached the gradients


def loss_at(twin: Twin, batch: Batch, seed: int) -> torch.Tensor:
    draws = draw(twin, batch.size, torch.Generator().manual_seed(seed))
    return PoissonObjective(burn_in=1)(training_log_rates(twin, batch, draws), batch.units.double())


@pytest.mark.slow
def test_gradients_match_central_differences_in_float64(release: Release) -> None:
    twin = randomized(build_twin(release, (4, 7), 3)).double()
    batch = batch_of(n=2, frames=4, units=3, seed=2)
    loss_at(twin, batch, seed=4).backward()
    rng = np.random.default_rng(0)
    h = 1e-6
    checked = 0
    for name, p in twin.named_trainable_parameters():
        flat = p.detach().view(-1)
        for index in rng.choice(p.numel(), size=min(2, p.numel()), replace=False):
            with torch.no_grad():
                original = flat[index].item()
                flat[index] = original + h
                up = loss_at(twin, batch, seed=4).item()
                flat[index] = original - h
                down = loss_at(twin, batch, seed=4).item()
                flat[index] = original
            numeric = (up - down) / (2 * h)
            analytic = 0.0 if p.grad is None else p.grad.view(-1)[index].item()
            assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-8), f"{name}[{index}]"
            checked += 1
    assert checked > 30


def test_teacher_has_planted_positions_and_poisson_responses(release: Release) -> None:
    positions = planted_positions(36, seed=2)
    assert positions.shape == (36, 2) and positions.abs().max() < 0.8
    cells = ((positions + 0.8) / 1.6 * 6).floor().long()  # a 6 x 6 grid over [-0.8, 0.8]^2: one unit per cell
    assert sorted((cells[:, 0] * 6 + cells[:, 1]).tolist()) == list(range(36))
    assert not torch.equal(planted_positions(36, seed=3), positions)
    teacher = make_teacher(release, (4, 7), 6, seed=2, feature_scale=2.0, log_rate=0.5)
    torch.testing.assert_close(torch.tanh(teacher.readout.position.mu), planted_positions(6, seed=2))
    clips = random_clips(2, 5, 18, 32, seed=1)
    rates, counts = teacher_responses(teacher, clips, seed=3)
    assert rates.shape == counts.shape == (2, 5, 6) and rates.dtype == np.float32
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    expected = teacher.predict(list(clips.transpose(1, 0, 2, 3)[..., None]))  # [T, N, U]
    assert np.allclose(rates, expected.transpose(1, 0, 2), rtol=1e-6)
    _, again = teacher_responses(teacher, clips, seed=3)
    assert np.array_equal(counts, again)


def test_checkpointing_over_time_chunks_gives_the_same_loss_and_gradients(release: Release) -> None:
    twin = randomized(build_twin(release, (4, 7), UNITS))
    batch = batch_of(n=2, frames=7)
    results = []
    for frames in (None, 3, 1):
        twin.zero_grad(set_to_none=True)
        draws = draw(twin, batch.size, torch.Generator().manual_seed(2))
        loss = PoissonObjective(burn_in=2)(training_log_rates(twin, batch, draws, checkpoint_frames=frames),
                                          batch.units)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in twin.named_trainable_parameters()
                                      if p.grad is not None}))
    (loss, grads), *others = results
    for other_loss, other_grads in others:
        assert other_loss == pytest.approx(loss, rel=1e-6)
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_stream_views_share_the_streams_tensors_and_follow_dtype_changes(release: Release) -> None:
    twin = build_twin(release, (4, 7), UNITS)
    core, modulation = twin.stream(1)
    originals = {id(p) for p in twin.parameters()}
    assert {id(p) for p in core.parameters()} <= originals and {id(p) for p in modulation.parameters()} <= originals
    assert core.feedforward.out.weights[0] is twin.core.feedforward.out.weights[1]
    assert modulation.lstm.proj_i.biases[0] is twin.modulation.lstm.proj_i.biases[1]
    twin.double()
    core, _ = twin.stream(1)
    assert core.recurrent.proj_x[0].zero.dtype == torch.float64  # rebuilt: buffers follow the twin
    assert core.feedforward.out.weights[0] is twin.core.feedforward.out.weights[1]
    with pytest.raises(ValueError, match="stream"):
        twin.stream(2)
