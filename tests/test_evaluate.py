"""The evaluation job (model performance against recorded repeats) end to end: real local Ray, real moto S3.

The recordings are the model's own predictions plus noise (``jobs.evaluate.synthetic_recordings``): scan 4-7 with
little noise and every repeat recorded, scan 8-5 noisy and with gaps (a missing repeat in every other video, a
never-recorded unit, a constant unit, a unit missing from one repeat). The job's metrics are compared
with a plain implementation of ``shared/IN_SILICO.md`` §4 written below (one unit at a time, on the padded,
concatenated arrays), the model's predictions made here one video at a time (its repeats in one batch, as the
workers batch them: float32 batches of other sizes round differently, and cc_norm amplifies that).
"""

from __future__ import annotations

import io
import uuid

import numpy as np
import pandas as pd
import pytest

from fnn_model.config import NetworkConfig
from fnn_model.engine import Engine
from fnn_model.release import Release
from fnn_model.synthetic import make_release
from fnn_ray import storage
from fnn_ray.evaluate import EvaluateConfig, run_evaluate
from fnn_ray.recordings import npy_bytes, write_repeat
from faults import local_pool
from jobs import evaluate as evaluate_job

SCANS = [(4, 7, 9), (8, 5, 12)]
VIDEOS, REPEATS, FRAMES, SIZE, BURNIN = 3, 3, 12, (18, 32), 4
METRICS = ["cc_abs", "cc_max", "cc_norm"]


@pytest.fixture(scope="module")
def data(s3):
    """A tiny release and its recordings on S3; returns (release, recordings, root) URLs."""
    root = s3.url(f"evaluate-{uuid.uuid4().hex[:8]}")
    release, recordings = f"{root}/release", f"{root}/recordings"
    make_release(release, SCANS, NetworkConfig.tiny(), seed=3)
    # scan 4-7: little noise, every repeat and unit recorded; scan 8-5: noisy, with gaps (see the module docstring)
    evaluate_job.synthetic_recordings(release, recordings, VIDEOS, REPEATS, FRAMES, *SIZE, noise=0.02, jitter=0.02,
                                      gaps=False, seed=4, scans=[(4, 7)])
    evaluate_job.synthetic_recordings(release, recordings, VIDEOS, REPEATS, FRAMES, *SIZE, noise=1.0, gaps=True,
                                      seed=5, scans=[(8, 5)])
    return release, recordings, root


def config(data, output, **kw) -> EvaluateConfig:
    kw = {"actors": 2, "cpus_per_actor": 1, "clips_per_batch": 4, "burnin": BURNIN, "progress": False,
          "verbose": False, "reuse_workers": True, **kw}
    return EvaluateConfig(release=data[0], recordings=data[1], output=output, **kw)


def read_tables(output: str) -> tuple[dict[tuple[int, int], pd.DataFrame], str]:
    """The per-scan tables and the text of units.csv as written under ``output``."""
    fs, root = storage.filesystem(output)
    tables = {}
    for session, scan_idx, _ in SCANS:
        with fs.open(f"{root}/performance/scan-{session}-{scan_idx}.parquet", "rb") as f:
            tables[(session, scan_idx)] = pd.read_parquet(f).drop(columns=["session", "scan_idx"])
    return tables, fs.cat_file(f"{root}/performance/_files/units.csv").decode()


@pytest.fixture(scope="module")
def clean(ray_cluster, data):
    output = f"{data[2]}/clean"
    evaluation = run_evaluate(config(data, output))
    assert evaluation.summary.ok and evaluation.summary.items_done == 2 * VIDEOS
    return evaluation, output


# ------------------------------------------------------------------------------------------ the definitions
def unit_metrics(x: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """cc_abs, cc_max, cc_norm of one unit from recorded ``x`` and predicted ``p`` ``[R, T]`` (NaN-padded).

    An entry counts where both values are finite; samples without any counting repeat are left out; TP averages
    the variances of the repeats with at least 2 samples."""
    valid = np.isfinite(x) & np.isfinite(p)
    counts = valid.sum(axis=0)
    keep = counts >= 1
    x, p, t = np.where(valid, x, np.nan)[:, keep], np.where(valid, p, np.nan)[:, keep], counts[keep]
    if t.size < 2:
        return np.nan, np.nan, np.nan
    xbar, pbar = np.nanmean(x, axis=0), np.nanmean(p, axis=0)
    if xbar.var() == 0 or pbar.var() == 0:
        cc_abs = np.nan
    else:
        cc_abs = float(np.corrcoef(xbar, pbar)[0, 1])
    harmonic = np.sum((t - 1) / t**2)
    n = np.sqrt((t.sum() - t.size) / harmonic) if harmonic > 0 else np.nan
    signal = xbar.var(ddof=1)
    total = np.mean([np.nanvar(row, ddof=1) for row in x if np.isfinite(row).sum() >= 2])
    power = (n * signal - total) / (n - 1)
    cc_max = float(np.sqrt(power / xbar.var())) if power > 0 and xbar.var() > 0 else np.nan
    return cc_abs, cc_max, cc_abs / cc_max


def reference(data, session: int, scan_idx: int) -> pd.DataFrame:
    """The metrics of every unit of one scan, computed from the files with the definitions above."""
    release = Release.open(data[0])
    engine = Engine(release.load_core())
    engine.add_head((session, scan_idx), release.load_head(session, scan_idx))
    fs, root = storage.filesystem(f"{data[1]}/{session}-{scan_idx}")

    def load(kind: str, video: str, repeat: str) -> np.ndarray:
        return np.load(io.BytesIO(fs.cat_file(f"{root}/{kind}/{video}/{repeat}.npy")))

    recorded, predicted = [], []
    for video in [f"video{v}" for v in range(VIDEOS)]:
        repeats = sorted(p.rsplit("/", 1)[1][:-4] for p in fs.ls(f"{root}/units/{video}", detail=False))
        inputs = [np.stack([load(kind, video, r) for r in repeats]) for kind in ("stimuli", "perspectives",
                                                                                 "modulations")]
        response = engine.predict(inputs[0][..., 0], [(session, scan_idx)], *inputs[1:])[(session, scan_idx)]
        recorded.append(np.stack([load("units", video, r) for r in repeats])[:, BURNIN:])
        predicted.append(response[:, BURNIN:])
    most = max(len(x) for x in recorded)

    def padded(parts: list[np.ndarray]) -> np.ndarray:  # [R, T_total, U]
        return np.concatenate([np.concatenate([a, np.full((most - len(a), *a.shape[1:]), np.nan)]) for a in parts],
                              axis=1)

    x, p = padded(recorded), padded(predicted)
    rows = [unit_metrics(x[:, :, u], p[:, :, u]) for u in range(x.shape[2])]
    units = release.units(session, scan_idx)
    return pd.DataFrame({"unit_id": units.unit_id.to_numpy(), "readout_id": units.readout_id.to_numpy(),
                         **dict(zip(METRICS, np.array(rows).T))})


# ------------------------------------------------------------------------------------------ results
def test_metrics_follow_the_definitions(clean, data):
    evaluation, output = clean
    tables, text = read_tables(output)
    csv = pd.read_csv(io.StringIO(text))
    for session, scan_idx, units in SCANS:
        want = reference(data, session, scan_idx)
        got = tables[(session, scan_idx)]
        assert list(got.columns) == ["unit_id", "readout_id", *METRICS, "frames"] and len(got) == units
        np.testing.assert_array_equal(got.unit_id, want.unit_id)
        np.testing.assert_array_equal(got.readout_id, want.readout_id)
        for metric in METRICS:
            np.testing.assert_allclose(got[metric], want[metric], rtol=1e-6, atol=1e-6, err_msg=metric)
        every = VIDEOS * (FRAMES - BURNIN)
        assert evaluation.scan_frames[(session, scan_idx)] == every
        if (session, scan_idx) == (8, 5):  # unit 0 never recorded, unit 1 constant: NaN; the others correlate
            assert got.loc[:1, METRICS].isna().all().all() and np.isfinite(got.cc_abs[2:]).all()
            assert got.frames[0] == 0 and (got.frames[1:] == every).all()  # unit 2 misses one repeat only
        else:
            assert np.isfinite(got[METRICS].to_numpy()).all() and (got.frames == every).all()
        pd.testing.assert_frame_equal(got, evaluation.tables[(session, scan_idx)])
        rows = csv[(csv.session == session) & (csv.scan_idx == scan_idx)].reset_index(drop=True)
        np.testing.assert_array_equal(rows.unit_id, got.unit_id)
        np.testing.assert_allclose(rows[METRICS], got[METRICS], rtol=1e-12)
    assert list(csv.columns) == ["session", "scan_idx", "unit_id", *METRICS, "frames"]
    fs, root = storage.filesystem(output)
    assert fs.cat_file(f"{root}/performance/_files/plots/performance.png")[:4] == b"\x89PNG"


def test_small_noise_gives_cc_norm_near_one(clean):
    small = clean[0].tables[(4, 7)]
    assert (small.cc_abs > 0.99).all() and np.allclose(small.cc_norm, 1, atol=0.05)
    noisy = clean[0].tables[(8, 5)].dropna()
    assert noisy.cc_abs.median() < small.cc_abs.median()


# ------------------------------------------------------------------------------------------ faults
def test_killed_worker_gives_identical_tables(clean, data):
    output = f"{data[2]}/killed-worker"
    evaluation = run_evaluate(config(data, output, pool=local_pool(crash_on="8-5/video-video1")))
    assert evaluation.summary.ok, evaluation.summary.failures
    assert evaluation.summary.execution.actor_restarts == 1
    assert_same(read_tables(output), read_tables(clean[1]))


def test_stopped_driver_then_rerun_gives_identical_tables(clean, data):
    output = f"{data[2]}/stopped"
    first = run_evaluate(config(data, output, pool=local_pool(stop_after=1)))
    assert not first.summary.ok and first.summary.items_done == 1 and not first.tables
    fs, root = storage.filesystem(output)
    assert not fs.exists(f"{root}/performance")
    again = run_evaluate(config(data, output))
    assert again.summary.ok and (again.summary.items_skipped, again.summary.items_done) == (1, 2 * VIDEOS - 1)
    assert_same(read_tables(output), read_tables(clean[1]))


def assert_same(a, b) -> None:
    """Identical per-scan tables (NaN equal to NaN) and identical units.csv text."""
    assert a[0].keys() == b[0].keys()
    for scan in a[0]:
        pd.testing.assert_frame_equal(a[0][scan], b[0][scan], check_exact=True)
    assert a[1] == b[1]


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def local_recordings(tmp_path_factory, data):
    """Good recordings of scan 8-5 on the local disk (random responses: the checks never predict)."""
    root = tmp_path_factory.mktemp("recordings")
    rng = np.random.default_rng(0)
    for video in ("a", "b"):
        for repeat in ("0", "1"):
            write_repeat(str(root / "8-5"), video, repeat, rng.integers(0, 255, (FRAMES, *SIZE), np.uint8),
                         rng.standard_normal((FRAMES, 12), np.float32), rng.standard_normal((FRAMES, 2), np.float32),
                         rng.standard_normal((FRAMES, 2), np.float32))
    return root


@pytest.mark.parametrize("defect, file, message", [
    ("short perspectives", "8-5/perspectives/b/1.npy", "11 frames, but"),
    ("wrong unit count", "8-5/units/a/0.npy", r"units must be [T, U] = [T, 12], got [12, 11]"),
    ("scan not in release", "5-5", "scan 5-5 is not in release"),
    ("stimuli not uint8", "8-5/stimuli/b/0.npy", "stimuli must be uint8, got float32"),
    ("missing units", "8-5/units/a/1.npy", "is missing"),
    ("NaN eye position", "8-5/perspectives/b/1.npy", "frame 5 is [nan, "),
    ("NaN behaviour", "8-5/modulations/a/0.npy", "frame 0 is ["),
    ("inf response", "8-5/units/b/0.npy", "frame 7, unit column 3 is inf"),
])
def test_bad_input_exits_2_naming_the_file(local_recordings, data, tmp_path, capsys, defect, file, message):
    import shutil

    recordings = tmp_path / "recordings"
    shutil.copytree(local_recordings, recordings)
    scan = recordings / "8-5"
    if defect == "short perspectives":
        (scan / "perspectives/b/1.npy").write_bytes(npy_bytes(np.zeros((FRAMES - 1, 2), np.float32)))
    elif defect == "wrong unit count":
        (scan / "units/a/0.npy").write_bytes(npy_bytes(np.zeros((FRAMES, 11), np.float32)))
    elif defect == "scan not in release":
        shutil.copytree(scan, recordings / "5-5")
    elif defect == "stimuli not uint8":
        (scan / "stimuli/b/0.npy").write_bytes(npy_bytes(np.zeros((FRAMES, *SIZE, 1), np.float32)))
    elif defect == "missing units":
        (scan / "units/a/1.npy").unlink()
    else:
        path = scan / file.split("/", 1)[1]
        array = np.load(path)
        array[{"NaN eye position": (5, 0), "NaN behaviour": (0, 1), "inf response": (7, 3)}[defect]] = (
            np.inf if defect == "inf response" else np.nan)
        path.write_bytes(npy_bytes(array))
    output = tmp_path / "output"
    code = evaluate_job.main(["--release", data[0], "--recordings", str(recordings), "--output", str(output),
                              "--burnin", str(BURNIN), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and str(recordings / file) in err[0], err
    assert message in err[0]
    assert not output.exists()


def test_impute_fills_by_linear_interpolation():
    """The documented rule, against a frame-by-frame loop."""
    from fnn_ray.recordings import impute_inputs

    array = np.array([[np.nan, 1.0], [2.0, np.nan], [np.nan, np.nan], [8.0, 4.0], [np.nan, np.inf]], np.float32)
    want = array.copy()
    for c in range(2):
        good = [t for t in range(5) if np.isfinite(array[t, c])]
        for t in range(5):
            if not np.isfinite(array[t, c]):
                before, after = [g for g in good if g < t], [g for g in good if g > t]
                if before and after:
                    a, b = before[-1], after[0]
                    want[t, c] = array[a, c] + (array[b, c] - array[a, c]) * (t - a) / (b - a)
                else:
                    want[t, c] = array[(before or after)[-1 if before else 0], c]
    np.testing.assert_allclose(impute_inputs(array), want)
    assert (impute_inputs(np.full((3, 2), np.nan, np.float32)) == 0).all()


def test_impute_completes_and_counts_frames(ray_cluster, local_recordings, data, tmp_path, capsys):
    """One NaN eye frame: with --impute the evaluation completes, records the rule and the count; a unit not
    recorded in some frames of every repeat is scored on fewer frames (frames column, summary warning); the
    result folder reads as one dataset, one row per unit, with pandas and pyarrow."""
    import json
    import shutil

    import pyarrow.dataset as ds

    recordings = tmp_path / "recordings"
    shutil.copytree(local_recordings, recordings)
    eye = np.load(recordings / "8-5/perspectives/a/0.npy")
    eye[3] = np.nan
    (recordings / "8-5/perspectives/a/0.npy").write_bytes(npy_bytes(eye))
    for repeat in ("0", "1"):  # unit 4 not recorded in frames 4-8 of video b: 5 of the 16 frames after burn-in
        units = np.load(recordings / f"8-5/units/b/{repeat}.npy")
        units[4:9, 4] = np.nan
        (recordings / f"8-5/units/b/{repeat}.npy").write_bytes(npy_bytes(units))
    output = tmp_path / "output"
    code = evaluate_job.main(["--release", data[0], "--recordings", str(recordings), "--output", str(output),
                              "--burnin", str(BURNIN), "--no-progress", "--impute", "--actors", "1",
                              "--cpus-per-actor", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "WARNING: scan 8-5: 1 unit(s) scored on fewer than 90% of its 16 frames (e.g. unit_id" in out
    result = str(output / "performance")
    for table in (pd.read_parquet(result), ds.dataset(result, format="parquet").to_table().to_pandas()):
        assert len(table) == 12 and table.unit_id.is_unique and set(table.session) == {8}
        assert list(table.frames) == [16] * 4 + [11] + [16] * 7
    metadata = json.loads((output / "performance/_files/metadata.json").read_text())
    assert metadata["imputed"] == {"perspectives": 1, "modulations": 0} and "linear interpolation" in metadata["impute"]
