"""Structure of the network: release-compatible state dict, parameter counts, reset semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fnn_model import Network, NetworkConfig
from fnn_model.synthetic import make_core, make_head, random_clips


def test_state_dict_has_the_release_keys_and_shapes() -> None:
    net = Network(NetworkConfig(), units=7)
    state = net.state_dict()
    assert len(state) == 338
    assert sum(k.startswith("core.") for k in state) == 250
    assert state["core.recurrent.proj_x.0.mask"].dtype == torch.bool
    assert state["core.recurrent.proj_x.0.mask"].shape == (8, 8, 1, 1)
    assert state["core.recurrent.proj_x.0.zero"].shape == (8, 8, 32, 32)
    assert state["core.feedforward.blocks.2.convs.1.weights.3"].shape == (128, 32, 3, 3, 3)
    assert state["perspective.retina.grid"].shape == (128, 192, 3)
    assert state["perspective.monitor_pixel.power"].shape == ()
    assert state["readout.feature.weights.0"].shape == (7, 1, 128)
    assert not any(".skips.0." in k or "inputs.0.gains" in k or "skips.1.biases" in k for k in state)


@pytest.mark.parametrize("units", [7, 9941])
def test_parameter_count_matches_the_spec(units: int) -> None:
    net = Network(NetworkConfig(), units)
    assert sum(p.numel() for p in net.parameters()) == 4_538_229 + 522 * units
    assert sum(b.numel() for b in net.buffers()) == 139_331


def test_fresh_network_outputs_exactly_one() -> None:
    net = Network(NetworkConfig.tiny(), units=5).eval()
    out = net.predict(list(random_clips(1, 3, 32, 48)[0]))
    assert out.shape == (3, 5)
    np.testing.assert_array_equal(out, np.ones((3, 5), np.float32))


def test_predict_resets_state_between_calls_and_clips_are_independent() -> None:
    config = NetworkConfig.tiny()
    net = Network(config, 6, core=make_core(config, 1), head=make_head(config, 6, 2)).eval()
    clips = random_clips(3, 4, 36, 64, seed=3)
    first = net.predict(list(clips[0]))
    again = net.predict(list(clips[0]))
    np.testing.assert_array_equal(first, again)
    batch = net.predict(list(clips.transpose(1, 0, 2, 3)[..., None]))  # T x [N, H, W, 1]
    assert batch.shape == (4, 3, 6)
    np.testing.assert_allclose(batch[:, 0], first, rtol=1e-5)
    assert not np.allclose(batch[:, 1], batch[:, 0])


def test_output_at_t_depends_only_on_frames_up_to_t() -> None:
    config = NetworkConfig.tiny()
    net = Network(config, 4, core=make_core(config, 5), head=make_head(config, 4, 6)).eval()
    clip = random_clips(1, 5, 32, 48, seed=1)[0]
    changed = clip.copy()
    changed[3:] = 255 - changed[3:]
    a, b = net.predict(list(clip)), net.predict(list(changed))
    np.testing.assert_array_equal(a[:3], b[:3])
    assert not np.allclose(a[3:], b[3:])


def test_cached_weights_follow_parameter_changes() -> None:
    """Normalised kernels and readout tables are cached across calls, but never outlive a weight change."""
    config = NetworkConfig.tiny()
    net = Network(config, 4, core=make_core(config, 1), head=make_head(config, 4, 2)).eval()
    other = Network(config, 4, core=make_core(config, 3), head=make_head(config, 4, 4)).eval()
    clip = list(random_clips(1, 3, 32, 48, seed=9)[0])
    before = net.predict(clip)
    np.testing.assert_array_equal(net.predict(clip), before)
    net.load_state_dict(other.state_dict())
    np.testing.assert_array_equal(net.predict(clip), other.predict(clip))
    with torch.no_grad():
        net.core.recurrent.proj_o.gains[0].mul_(2.0)
        net.readout.position.mu.add_(0.3)
    changed = net.predict(clip)
    fresh = Network(config, 4)
    fresh.load_state_dict(net.state_dict())
    np.testing.assert_array_equal(changed, fresh.eval().predict(clip))
    assert not np.allclose(changed, other.predict(clip))


def test_whitened_core_output_is_centred_and_white() -> None:
    """`whiten_output` folds a ZCA transform into the core's last conv: on its clips the output channels are
    centred with covariance `scale^2 I` (every stream, shared weights)."""
    from fnn_model.synthetic import whiten_output
    import torch.nn.functional as F

    config = NetworkConfig.tiny()
    core = make_core(config, 2, input_gain=10.0, biases=False, shared_streams=True)
    clips = random_clips(3, 10, 36, 64, seed=4)
    whiten_output(core, clips, scale=0.5, burn_in=4)
    frames = torch.from_numpy(clips).float() / 255
    size = (config.perspective.retina_height, config.perspective.retina_width)
    modulation = torch.zeros(3, config.streams * config.modulation.lstm_features)
    core.reset_state()
    with torch.inference_mode():
        y = torch.stack([core(F.interpolate(frames[:, t, None], size=size, mode="bilinear", align_corners=False),
                              modulation) for t in range(10)], 1)[:, 4:].double()
    channels = config.recurrent.out_channels
    for s in range(config.streams):
        out = y[:, :, s * channels:(s + 1) * channels].transpose(0, 2).reshape(channels, -1)
        torch.testing.assert_close(out.mean(1), torch.zeros(channels, dtype=torch.double), atol=1e-4, rtol=0)
        centred = out - out.mean(1, keepdim=True)
        torch.testing.assert_close(centred @ centred.T / centred.shape[1], 0.25 * torch.eye(channels,
                                   dtype=torch.double), atol=1e-3, rtol=0)
