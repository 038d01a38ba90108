"""`predict` input forms: clear errors for bad input, broadcasting for good input."""

from __future__ import annotations

import numpy as np
import pytest

from fnn_model import Network, NetworkConfig
from fnn_model.synthetic import make_core, make_head, random_clips

CONFIG = NetworkConfig.tiny()


@pytest.fixture(scope="module")
def net() -> Network:
    return Network(CONFIG, 3, core=make_core(CONFIG, 0), head=make_head(CONFIG, 3, 1)).eval()


FRAMES = list(random_clips(1, 2, 32, 48)[0])


@pytest.mark.parametrize(
    ("stimuli", "perspectives", "error", "match"),
    [
        ([f.astype(np.float32) for f in FRAMES], None, TypeError, "must be uint8"),
        ([f[None, None, None] for f in FRAMES], None, ValueError, "got a 5-D frame"),
        ([f[..., None].repeat(3, -1) for f in FRAMES], None, ValueError, "C = 1 channels"),
        ([FRAMES[0], FRAMES[1][:, :40]], None, ValueError, "same shape"),
        ([], None, ValueError, "at least one frame"),
        (FRAMES, [np.zeros(3)] * 2, ValueError, r"perspectives: each entry must be \[2\]"),
        (FRAMES, [np.zeros(2)], ValueError, "one entry per frame"),
        ([np.stack([f] * 3)[..., None] for f in FRAMES], [np.zeros((2, 2))] * 2, ValueError, "batch sizes"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(net, stimuli, perspectives, error, match) -> None:
    with pytest.raises(error, match=match):
        net.predict(stimuli, perspectives)


def test_singular_inputs_broadcast_over_a_batch(net) -> None:
    eyes = np.random.default_rng(0).standard_normal((2, 4, 2)).astype(np.float32)  # T x [N, 2]
    batched = net.predict(FRAMES, list(eyes), [np.array([0.5, -1.0], np.float32)] * 2)
    assert batched.shape == (2, 4, 3)
    for n in range(4):
        single = net.predict(FRAMES, list(eyes[:, n]), [np.array([0.5, -1.0], np.float32)] * 2)
        np.testing.assert_allclose(batched[:, n], single, rtol=1e-5)


def test_hw1_frames_equal_hw_frames(net) -> None:
    np.testing.assert_array_equal(net.predict([f[..., None] for f in FRAMES]), net.predict(FRAMES))
