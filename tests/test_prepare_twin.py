"""jobs.prepare_twin: the checks (each bad input one line, exit 2, nothing written), imputation with masks, the
streaming statistics against a plain computation over the whole training set, the memory-mapped dataset and its
windows, and checkpoint integrity (a corrupt checkpoint is found by hash and the one before it used)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from fnn_ray.training.checkpoints import CheckpointStore
from fnn_ray.training.dataset import PreparedData
from fnn_ray.training.layout import write_trial
from fnn_ray.training.prepare import read_stats
from fnn_ray.recordings import write_repeat
from jobs import prepare_twin

SIZE, UNITS, FRAMES = (6, 8), 5, 12


def _trials(root: str, count: int = 4, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``count`` random trials (every third a validation trial) and one evaluation video; returns the arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        arrays = dict(stimuli=rng.integers(0, 256, (FRAMES + i, *SIZE), dtype=np.uint8),
                      perspectives=rng.standard_normal((FRAMES + i, 2)).astype(np.float32),
                      modulations=rng.standard_normal((FRAMES + i, 2)).astype(np.float32),
                      units=rng.poisson(2.0, (FRAMES + i, UNITS)).astype(np.float32))
        write_trial(root, str(i), i % 3 != 2, **arrays)
        out[str(i)] = {**arrays, "training": i % 3 != 2}
    for r in range(2):
        write_repeat(os.path.join(root, "evaluation_data"), "v0", str(r), arrays["stimuli"][:FRAMES],
                     arrays["units"][:FRAMES], arrays["perspectives"][:FRAMES], arrays["modulations"][:FRAMES])
    return out


def run(source: str, output: str, *extra: str) -> int:
    return prepare_twin.main(["--from", source, "--output", output, "--animal", "m1", "--scan", "4-7",
                              "--size", f"{SIZE[0]}x{SIZE[1]}", *extra])


def test_prepare_stats_and_windows(tmp_path):
    source, output = str(tmp_path / "lab"), str(tmp_path / "prepared")
    arrays = _trials(source)
    assert run(source, output) == 0
    stats = read_stats(output)
    assert (stats["animal"], stats["session"], stats["scan_idx"], stats["units"]) == ("m1", 4, 7, UNITS)
    train = [a for a in arrays.values() if a["training"]]
    for kind in ("perspectives", "modulations", "units"):
        whole = np.concatenate([a[kind] for a in train]).astype(np.float64)
        np.testing.assert_allclose(stats["moments"][kind]["mean"], whole.mean(0), rtol=1e-10)
        np.testing.assert_allclose(stats["moments"][kind]["sd"], whole.std(0, ddof=1), rtol=1e-10)
    pixels = np.concatenate([a["stimuli"].ravel() for a in train]).astype(np.float64)
    np.testing.assert_allclose(stats["moments"]["stimuli"]["mean"], [pixels.mean()], rtol=1e-10)
    data = PreparedData.open(output)
    assert isinstance(data.arrays["units"], np.memmap)
    windows = data.training_windows(np.random.default_rng(0), 5, 10)
    batch = data.batch(windows, 10)
    for (row, start), units in zip(windows, batch["units"]):
        trial = str(data.trials.trial[row])
        assert arrays[trial]["training"]
        np.testing.assert_array_equal(units, arrays[trial]["units"][start:start + 10])
    assert data.validation_windows(3, 10) == data.validation_windows(3, 10)
    assert all(not data.trials.training[r] for r, _ in data.validation_windows(3, 10))
    assert os.path.isfile(os.path.join(output, "evaluation", "4-7", "units", "v0", "1.npy"))
    assert run(source, output) == 0  # a rerun on the same inputs: nothing to do


def test_impute_fills_and_records_masks(tmp_path, capsys):
    source, output = str(tmp_path / "lab"), str(tmp_path / "prepared")
    arrays = _trials(source)
    eye = arrays["1"]["perspectives"].copy()
    eye[3:5, 0] = np.nan
    units = arrays["0"]["units"].copy()
    units[2, 1] = np.inf
    write_trial(source, "1", True, arrays["1"]["stimuli"], eye, arrays["1"]["modulations"], arrays["1"]["units"])
    write_trial(source, "0", True, arrays["0"]["stimuli"], arrays["0"]["perspectives"], arrays["0"]["modulations"],
                units)
    assert run(source, output) == 2
    assert "training_data/units/0.npy: frame 2, column 1 holds inf" in capsys.readouterr().err
    assert not os.path.exists(output)
    assert run(source, output, "--impute") == 0
    data = PreparedData.open(output)
    start = int(data.trials.start[data.trials.trial == "1"].iloc[0])
    filled = data.arrays["perspectives"][start + 3:start + 5, 0]
    np.testing.assert_allclose(filled, np.interp([3, 4], [2, 5], [eye[2, 0], eye[5, 0]]), rtol=1e-6)
    mask = np.load(os.path.join(output, "masks", "perspectives.npy"))
    assert mask.sum() == 2 and mask[start + 3] and mask[start + 4]
    stats = read_stats(output)
    assert data.arrays["units"][2, 1] == pytest.approx(stats["moments"]["units"]["mean"][1], rel=1e-6)
    unit_mask = np.unpackbits(np.load(os.path.join(output, "masks", "units.npy")), axis=1, count=UNITS)
    assert unit_mask.sum() == 1 and unit_mask[2, 1]
    assert stats["imputed"] == {"perspectives": 2, "modulations": 0, "units": 1}


def _bad_cases(source: str, arrays) -> dict[str, tuple]:
    a = arrays["1"]
    return {
        "missing kind": (lambda: shutil.rmtree(os.path.join(source, "training_data", "modulations")),
                         "training_data/modulations/ is missing"),
        "missing trial": (lambda: os.remove(os.path.join(source, "training_data", "units", "2.npy")),
                          "training_data/units/2.npy is missing"),
        "unit count": (lambda: write_trial(source, "1", True, a["stimuli"], a["perspectives"], a["modulations"],
                                           a["units"][:, :3]), "training_data/units/1.npy: 3 units"),
        "frame size": (lambda: write_trial(source, "1", True, a["stimuli"][:, :4], a["perspectives"],
                                           a["modulations"], a["units"]), "training_data/stimuli/1.npy: stimuli must"),
        "dtype": (lambda: write_trial(source, "1", True, a["stimuli"].astype(np.float32), a["perspectives"],
                                      a["modulations"], a["units"]), "stimuli must be uint8, got float32"),
        "nan units": (lambda: write_trial(source, "1", True, a["stimuli"], a["perspectives"], a["modulations"],
                                          np.where(np.arange(UNITS) == 4, np.nan, a["units"])),
                      "training_data/units/1.npy: frame 0, column 4"),
        "no validation": (lambda: write_trial(source, "2", True, arrays["2"]["stimuli"], arrays["2"]["perspectives"],
                                              arrays["2"]["modulations"], arrays["2"]["units"]), "no validation trial"),
        "empty": (lambda: shutil.rmtree(os.path.join(source, "training_data")), "training_data not found or empty"),
    }


@pytest.mark.parametrize("case", ["missing kind", "missing trial", "unit count", "frame size", "dtype", "nan units",
                                  "no validation", "empty"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    source, output = str(tmp_path / "lab"), str(tmp_path / "out" / "prepared")
    arrays = _trials(source)
    change, expected = _bad_cases(source, arrays)[case]
    change()
    assert run(source, output) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_output_of_another_dataset_is_refused(tmp_path, capsys):
    source, output = str(tmp_path / "lab"), str(tmp_path / "prepared")
    _trials(source)
    assert run(source, output) == 0
    before = json.loads(open(os.path.join(output, "stats.json")).read())
    assert prepare_twin.main(["--from", source, "--output", output, "--animal", "m2", "--scan", "4-7", "--size",
                              f"{SIZE[0]}x{SIZE[1]}"]) == 2
    assert "holds a prepared dataset of other inputs (animal m1" in capsys.readouterr().err
    assert json.loads(open(os.path.join(output, "stats.json")).read()) == before


def test_corrupt_checkpoint_is_detected_and_the_previous_used(tmp_path, capsys):
    store = CheckpointStore(str(tmp_path / "twin"))
    for epoch, val in ((1, 3.0), (2, 2.0), (3, 2.5)):
        store.save(epoch, {"w": torch.full((3,), float(epoch)), "epoch": epoch}, {"val": val}, validation=val)
    assert store.epochs() == [2, 3]  # the last two and the best (2) are kept
    assert store.best() == {"epoch": 2, "validation": 2.0}
    path = tmp_path / "twin" / "checkpoints" / "epoch-0003" / "state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    found = store.latest()
    assert found.epoch == 2 and torch.equal(found.state["w"], torch.full((3,), 2.0))
    assert "epoch-0003/state.pt: corrupt" in capsys.readouterr().err
