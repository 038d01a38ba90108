"""Parity with the original implementation on the golden release (../shared/golden, or $FNN_GOLDEN).

Each (case, scan) output is computed once: the `predict` path runs one scan of a case, the engine the case's other
scans at once, and the `intermediates` case (one scan) runs stage by stage. The full-size network dominates the
suite's time here, so this module computes on every core (the session's Ray workers are idle meanwhile).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fnn_model import microns
from fnn_model.engine import Engine
from fnn_model.release import Release

CASES = ["default_inputs", "behavior", "batch", "odd_size", "broadcast", "long_constant", "intermediates"]
SCANS = [(4, 7), (8, 5), (9, 6)]
RTOL = 1e-4


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape, f"shape {got.shape} != expected {expected.shape}"
    return float(np.max(np.abs(got - expected) / (np.abs(expected) + 1e-6)))


def load_case(golden_dir: Path, case: str) -> dict[str, np.ndarray]:
    with np.load(golden_dir / "cases" / f"{case}.npz") as data:
        return {k: data[k] for k in data.files}


def predict_args(data: dict[str, np.ndarray]) -> tuple:
    return (list(data["stimuli"]), list(data["perspectives"]) if "perspectives" in data else None,
            list(data["modulations"]) if "modulations" in data else None)


@pytest.fixture(scope="module")
def release(golden_dir: Path) -> Release:
    return Release.open(str(golden_dir / "release"))


@pytest.fixture(scope="module", autouse=True)
def every_core() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


#: The `predict` path runs one scan per case, the scans taken in turn so that every scan is covered; the engine
#: runs the case's other scans at once (so a case's output for a scan is computed once).
CASE_SCANS = [(case, SCANS[i % len(SCANS)]) for i, case in enumerate(CASES) if case != "intermediates"]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("case", "scan"), CASE_SCANS, ids=lambda v: v if isinstance(v, str) else f"{v[0]}-{v[1]}")
def test_predict_matches_reference(golden_dir: Path, case: str, scan: tuple[int, int]) -> None:
    data = load_case(golden_dir, case)
    key = f"expected_{scan[0]}_{scan[1]}"
    model, units = microns.scan(*scan, directory=str(golden_dir / "release"))
    got = model.predict(*predict_args(data))
    assert got.dtype == np.float32
    assert list(units.index) == list(range(model.units))
    assert relative_error(got, data[key]) <= RTOL


def engine_inputs(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, bool]:
    """A golden case's per-frame inputs -> engine inputs `[N, T, ...]` and whether the case output is batched."""
    stimuli = data["stimuli"]
    if stimuli.ndim == 5:  # T x [N, H, W, 1]
        clips = stimuli[..., 0].transpose(1, 0, 2, 3)
    else:  # T x [H, W] or T x [H, W, 1]
        clips = (stimuli[..., 0] if stimuli.ndim == 4 else stimuli)[None]
    vectors = []
    for name in ("perspectives", "modulations"):
        v = data.get(name)
        vectors.append(None if v is None else (v.transpose(1, 0, 2) if v.ndim == 3 else v[None]))
    n = max([clips.shape[0]] + [v.shape[0] for v in vectors if v is not None])
    clips = np.broadcast_to(clips, (n, *clips.shape[1:]))
    vectors = [None if v is None else np.broadcast_to(v, (n, *v.shape[1:])).astype(np.float32) for v in vectors]
    batched = stimuli.ndim == 5 or any(data.get(k) is not None and data[k].ndim == 3
                                       for k in ("perspectives", "modulations"))
    return np.ascontiguousarray(clips), vectors[0], vectors[1], batched


@pytest.mark.parametrize(("case", "predicted"), CASE_SCANS, ids=[case for case, _ in CASE_SCANS])
def test_engine_matches_reference_for_the_other_scans_at_once(release: Release, golden_dir: Path, case: str,
                                                              predicted: tuple[int, int]) -> None:
    data = load_case(golden_dir, case)
    scans = [tuple(s) for s in data["scans"].tolist() if tuple(s) != predicted]
    assert len(scans) >= 2  # several heads on one core at once
    engine = Engine(release.load_core())
    for scan in scans:
        engine.add_head(scan, release.load_head(*scan))
    clips, eye, behaviour, batched = engine_inputs(data)
    out = engine.predict(clips, scans, eye, behaviour)
    for scan in scans:
        expected = data[f"expected_{scan[0]}_{scan[1]}"]
        got = out[scan].transpose(1, 0, 2) if batched else out[scan][0]
        assert relative_error(got, expected) <= RTOL, scan


def test_intermediate_stages_match(release: Release, golden_dir: Path) -> None:
    """Each top-level stage (perspective, modulation, core, per-stream readout) and the rates match frame by
    frame."""
    data = load_case(golden_dir, "intermediates")
    net = release.load_network(4, 7)
    net.reset()
    with torch.inference_mode():
        for t in range(len(data["stimuli"])):
            stimulus = torch.from_numpy(data["stimuli"][t])[None, None].float() / 255
            eye = torch.from_numpy(data["perspectives"][t])[None]
            behaviour = torch.from_numpy(data["modulations"][t])[None]
            image, features = net.head.encode(stimulus, eye, behaviour)
            core = net.core(image, features)
            readout = net.readout(core)
            rates = net.head.rates(core)
            for name, got in (("perspective", image), ("modulation", features), ("core", core),
                              ("readout", readout), ("expected", rates)):
                expected = data[f"{name}_4_7"][t]
                scale = np.abs(expected).max()
                error = np.abs(got[0].numpy() - expected).max() / scale
                assert error <= RTOL, f"{name} at frame {t}: max error {error:.2e} of its scale"
