"""The multi-scan engine: same numbers as per-scan `predict`, ragged clip lengths, bfloat16 error bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fnn_model import Network, NetworkConfig
from fnn_model.engine import Engine
from fnn_model.synthetic import make_core, make_head, random_behaviour, random_clips

CONFIG = NetworkConfig.tiny()
SCANS = {(4, 7): 5, (8, 5): 11, (9, 6): 3}


@pytest.fixture(scope="module")
def parts():
    core = make_core(CONFIG, 1)
    heads = {key: make_head(CONFIG, units, seed=key[0] * 10 + key[1]) for key, units in SCANS.items()}
    return core, heads


@pytest.fixture(scope="module")
def engine(parts) -> Engine:
    core, heads = parts
    engine = Engine(core)
    for key, head in heads.items():
        engine.add_head(key, head)
    return engine


def test_engine_equals_predict_for_every_scan_and_clip(parts, engine) -> None:
    core, heads = parts
    clips = random_clips(3, 4, 36, 64, seed=2)
    eye, behaviour = random_behaviour(3, 4, seed=2)
    out = engine.predict(clips, list(SCANS), eye, behaviour)
    for key, head in heads.items():
        assert out[key].shape == (3, 4, SCANS[key])
        net = Network(CONFIG, head.units, core=core, head=head)
        for n in range(3):
            expected = net.predict(list(clips[n]), list(eye[n]), list(behaviour[n]))
            np.testing.assert_allclose(out[key][n], expected, rtol=1e-5)


@pytest.mark.parametrize("moving", [False, True], ids=["eyes-still", "one-eye-moving"])
def test_eye_held_still_or_moving_matches_predict(parts, engine, moving) -> None:
    """A still eye (the engine samples each head's grid once per call) gives the per-frame `predict` numbers."""
    core, heads = parts
    clips = random_clips(2, 4, 36, 64, seed=6)
    eye, behaviour = random_behaviour(2, 4, seed=6)
    eye[:] = eye[:, :1]  # each clip's eye stays where it started (the two clips' positions differ)
    if moving:
        eye[1, 2:] += 0.5
    out = engine.predict(clips, [(8, 5)], eye, behaviour)
    net = Network(CONFIG, heads[(8, 5)].units, core=core, head=heads[(8, 5)])
    for n in range(2):
        expected = net.predict(list(clips[n]), list(eye[n]), list(behaviour[n]))
        np.testing.assert_allclose(out[(8, 5)][n], expected, rtol=1e-5)


def test_ragged_lengths_match_clips_run_alone(engine) -> None:
    clips = random_clips(2, 6, 32, 48, seed=4)
    short = clips[1, :3]
    padded = clips.copy()
    padded[1, 3:] = 0
    out = engine.predict(padded, [(8, 5)], lengths=[6, 3])
    alone = engine.predict(short[None], [(8, 5)])
    np.testing.assert_allclose(out[(8, 5)][1, :3], alone[(8, 5)][0], rtol=1e-5)
    full = engine.predict(clips[:1], [(8, 5)])
    np.testing.assert_allclose(out[(8, 5)][0], full[(8, 5)][0], rtol=1e-5)


def test_subset_of_scans_and_scan_order_do_not_matter(engine) -> None:
    clips = random_clips(2, 3, 32, 48, seed=5)
    everything = engine.predict(clips, [(4, 7), (8, 5), (9, 6)])
    reordered = engine.predict(clips, [(9, 6), (4, 7)])
    for key in reordered:
        np.testing.assert_allclose(reordered[key], everything[key], rtol=1e-5)


def test_bfloat16_stays_close_to_float32(parts) -> None:
    core, heads = parts
    engine = Engine(core, dtype=torch.bfloat16)
    engine.add_head((8, 5), heads[(8, 5)])
    clips = random_clips(2, 4, 32, 48, seed=6)
    low = engine.predict(clips, [(8, 5)])[(8, 5)]
    exact = Engine(core)
    exact.add_head((8, 5), heads[(8, 5)])
    high = exact.predict(clips, [(8, 5)])[(8, 5)]
    error = np.max(np.abs(low - high) / np.abs(high))
    assert low.dtype == np.float32 and 0 < error < 0.1


def test_engine_refuses_bad_input(engine) -> None:
    clips = random_clips(1, 2, 32, 48)
    with pytest.raises(ValueError, match=r"clips must be uint8 \[N, T, H, W\]"):
        engine.predict(clips.astype(np.float32), [(8, 5)])
    with pytest.raises(KeyError, match=r"no head loaded for scan\(s\) \[\(1, 1\)\]"):
        engine.predict(clips, [(1, 1)])
    with pytest.raises(ValueError, match=r"perspectives must be \[N, T, 2\]"):
        engine.predict(clips, [(8, 5)], perspectives=np.zeros((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="another network config"):
        engine.add_head((1, 1), make_head(NetworkConfig(), 2))
