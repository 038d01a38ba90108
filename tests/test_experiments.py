"""The in-silico experiment jobs end to end on a real local Ray: their tables agree with a plain recomputation from
the per-frame responses of the same clips (run through `jobs.sweep`), and faults do not change them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from fnn_model.config import NetworkConfig
from fnn_model.synthetic import make_release
from fnn_ray.experiment import ExperimentConfig, run_experiment
from fnn_ray.outputs import read_results
from fnn_ray.generators import Dots, RigidMonet
from fnn_ray.responses import read_responses
from fnn_ray.sweep import SweepConfig, run_sweep
from jobs import receptive_fields, tuning
from faults import local_pool

SCANS = [(4, 7, 9), (8, 5, 14)]
SIZE = ["--size", "36x64", "--actors", "2", "--cpus-per-actor", "1", "--no-progress"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    url = str(root / "release")
    make_release(url, SCANS, NetworkConfig.tiny(), seed=3)
    return url, root


def window_means(output: str, metadata: dict, key: str) -> dict:
    """(session, scan_idx) -> {condition label: [U] mean over its windows of the unit's window-mean response},
    computed from the sweep's per-frame rows (units in readout order)."""
    df = read_responses(output).to_pandas()
    out = {}
    for (session, scan_idx), rows in df.groupby(["session", "scan_idx"]):
        sums: dict = {}
        for clip in metadata["clips"]:
            one = rows[rows.clip_id == clip["clip_id"]].sort_values("readout_id")
            frames = np.stack(one.response.to_numpy())  # [U, T]
            for w in clip["windows"]:
                label = key(w)
                sums.setdefault(label, []).append(frames[:, w["start"]:w["stop"]].mean(axis=1))
        out[(session, scan_idx)] = {label: np.mean(v, axis=0) for label, v in sums.items()}
    return out


def assert_dataset(path, units: int) -> None:
    """The result folder reads as one dataset, one row per unit, with exactly the two obvious calls."""
    for table in (pd.read_parquet(path), ds.dataset(path, format="parquet").to_table().to_pandas()):
        assert len(table) == units and not table.duplicated(["session", "scan_idx", "unit_id"]).any()


def test_tuning_matches_sweep_of_saved_stimuli(ray_cluster, release, tmp_path):
    url, _ = release
    out, clips = str(tmp_path / "tuning"), str(tmp_path / "clips")
    args = ["--release", url, "--output", out, "--directions", "8", "--trials", "2", "--block-frames", "10",
            "--pattern-width", "16", "--save-stimuli", clips, *SIZE]
    assert tuning.main(args) == 0
    files = tmp_path / "tuning/ori_dir_tuning/_files"
    metadata = json.loads((files / "metadata.json").read_text())
    directions = metadata["directions_deg"]
    assert directions == [45.0 * k for k in range(8)] and len(metadata["clips"]) == 2
    assert metadata["stimulus"]["family"] == "monet2" and metadata["stimulus"]["coherence"] == 1.5
    assert metadata["fit"]["kappa_starts"] == [1.0] and "OSI, DSI" in metadata["definitions"]
    table = read_results(out, "ori_dir_tuning")
    assert len(table) == sum(u for *_, u in SCANS) and (table.fit_status != "nonfinite").all()
    assert_dataset(tmp_path / "tuning/ori_dir_tuning", sum(u for *_, u in SCANS))
    csv = pd.read_csv(files / "units.csv")
    assert list(csv.columns) == ["session", "scan_idx", "unit_id", "OSI", "DSI", "gOSI", "gDSI", "pref_ori",
                                 "pref_dir", "stimulus", "stimulus_params", "fit", "definitions"]
    assert (csv.stimulus == "monet2").all() and json.loads(csv.fit[0])["kappa_starts"] == [1.0]
    assert json.loads(csv.stimulus_params[0])["pattern_width"] == 16
    assert len(list((files / "plots").glob("*.png"))) >= 2

    sweep = str(tmp_path / "sweep")
    assert run_sweep(SweepConfig(release=url, stimuli=clips, output=sweep, actors=2, cpus_per_actor=1,
                                 clips_per_shard=1, progress=False, verbose=False)).ok
    expected = window_means(sweep, metadata, lambda w: w["direction_deg"])
    theta = np.deg2rad(directions)
    for (session, scan_idx), by_direction in expected.items():
        curves = np.stack([by_direction[d] for d in directions], axis=1)  # [U, D]
        got = table[(table.session == session) & (table.scan_idx == scan_idx)].sort_values("readout_id")
        job_curves = np.stack(got.direction_responses.to_numpy())
        np.testing.assert_allclose(job_curves, curves, rtol=1e-4, atol=1e-7)
        for mine, expect in ((job_curves, 1e-6), (curves, 1e-4)):  # from the job's curves, then the sweep's
            gosi = np.abs((mine * np.exp(2j * theta)).sum(1)) / mine.sum(1)
            gdsi = np.abs((mine * np.exp(1j * theta)).sum(1)) / mine.sum(1)
            np.testing.assert_allclose(got.gOSI, gosi, rtol=0, atol=expect)
            np.testing.assert_allclose(got.gDSI, gdsi, rtol=0, atol=expect)


def test_receptive_fields_match_sweep_of_saved_stimuli(ray_cluster, release, tmp_path):
    url, _ = release
    out, clips = str(tmp_path / "rf"), str(tmp_path / "clips")
    args = ["--release", url, "--output", out, "--grid", "2x3", "--dot-frames", "3", "--save-stimuli", clips, *SIZE]
    assert receptive_fields.main(args) == 0
    metadata = json.loads((tmp_path / "rf/receptive_fields/_files/metadata.json").read_text())
    assert metadata["grid"] == [2, 3] and "ssi" in metadata["definitions"]
    table = read_results(out, "receptive_fields")
    assert_dataset(tmp_path / "rf/receptive_fields", sum(u for *_, u in SCANS))
    np.testing.assert_allclose(np.stack(table.sta_on_off), (np.stack(table.sta_on) + np.stack(table.sta_off)) / 2,
                               rtol=1e-6)
    sweep = str(tmp_path / "sweep")
    assert run_sweep(SweepConfig(release=url, stimuli=clips, output=sweep, actors=2, cpus_per_actor=1,
                                 clips_per_shard=1, progress=False, verbose=False)).ok
    expected = window_means(sweep, metadata, lambda w: (w["polarity"], w["row"], w["col"]))
    for (session, scan_idx), by_cell in expected.items():
        got = table[(table.session == session) & (table.scan_idx == scan_idx)].sort_values("readout_id")
        for polarity, column in (("on", "sta_on"), ("off", "sta_off")):
            sta = np.stack([by_cell[(polarity, r, c)] for r in range(2) for c in range(3)], axis=1)  # [U, R*C]
            np.testing.assert_allclose(np.stack(got[column].to_numpy()), sta, rtol=1e-4, atol=1e-7)


def test_faults_leave_tables_unchanged(ray_cluster, release, tmp_path):
    """A worker killed mid-experiment, and a driver stopped after one item then rerun: same tables as a clean run."""
    url, _ = release
    family = RigidMonet(directions=4, trials=3, block_frames=4, height=36, width=64, seed=1)
    common = dict(release=url, family=family, actors=2, cpus_per_actor=1, progress=False, verbose=False)

    def run(name: str, pool=None):
        config = ExperimentConfig(output=str(tmp_path / name), pool=pool, **common)
        return run_experiment("tuning", "ori_dir_tuning", config, None,
                              tuning.analyse(np.arange(4) * 90.0, tuning.FitConfig()), {}, tuning.CSV_COLUMNS,
                              lambda table, directory, caption: [])

    def table(name: str) -> pd.DataFrame:
        t = read_results(str(tmp_path / name), "ori_dir_tuning").sort_values(["session", "scan_idx", "readout_id"])
        return t.reset_index(drop=True)

    assert run("clean").ok
    killed = run("killed", local_pool(crash_on="8-5/clips-000001-000002"))
    assert killed.ok and killed.execution.actor_restarts == 1
    pd.testing.assert_frame_equal(table("killed"), table("clean"))
    stopped = run("stopped", local_pool(stop_after=1))
    assert not stopped.ok and stopped.items_done == 1
    again = run("stopped")
    assert again.ok and again.items_skipped == 1
    pd.testing.assert_frame_equal(table("stopped"), table("clean"))


def test_bad_experiment_input_is_a_setup_error(release, tmp_path, capsys):
    url, _ = release
    assert tuning.main(["--release", url, "--output", str(tmp_path / "o"), "--stimulus", "plaid", *SIZE]) == 2
    assert "unknown stimulus family 'plaid'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):  # the argument parser: one line, exit status 2
        tuning.main(["--release", url, "--output", str(tmp_path / "o"), "--directions", "0", *SIZE])
    assert capsys.readouterr().err == "error: argument --directions: must be >= 1, got 0\n"
    with pytest.raises(SystemExit, match="^2$"):
        tuning.main(["--release", url, "--output", str(tmp_path / "o"), "--trials", "0", *SIZE])
    assert capsys.readouterr().err == "error: argument --trials: must be >= 1, got 0\n"
    assert tuning.main(["--release", url, "--output", str(tmp_path / "o"), "--fit-starts", "1,99", "--pattern-width",
                        "16", *SIZE]) == 2
    assert "--fit-starts" in capsys.readouterr().err
    assert receptive_fields.main(["--release", url, "--output", str(tmp_path / "o"), "--grid", "0x3", *SIZE]) == 2
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="rows"):
        Dots(rows=0)
