"""End-to-end sweeps on a real local Ray, from s3:// stimuli (moto server) to s3:// Parquet responses."""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from fnn_model.config import NetworkConfig
from fnn_model.engine import Engine
from fnn_model.release import Release
from fnn_ray import storage
from fnn_ray.sweep import SweepConfig, run_sweep
from fnn_ray.responses import read_responses
from faults import committed
from fnn_ray.stimuli import read_shard, list_shards
from jobs.make_synthetic import make_synthetic

SCANS = [(4, 7, 13), (8, 5, 21)]
CLIPS, FRAMES, SIZE = 6, 8, (36, 64)


@pytest.fixture(scope="module")
def data(s3):
    """A tiny synthetic release (2 scans) and 6 clips of <= 8 frames in 2 files, on S3 (via AWS_* env only)."""
    root = s3.url(f"sweep-{uuid.uuid4().hex[:8]}")
    release, stimuli = f"{root}/release", f"{root}/stimuli"
    make_synthetic(release, stimuli, SCANS, CLIPS, FRAMES, NetworkConfig.tiny(), *SIZE, clips_per_file=4, seed=3)
    return release, stimuli


def reference(release_url: str, stimuli_url: str) -> dict[tuple[int, int, str], np.ndarray]:
    """(session, scan_idx, clip_id) -> Engine.predict of that clip alone, float32 [T, U] (columns by readout_id)."""
    release = Release.open(release_url)
    engine = Engine(release.load_core())
    out = {}
    for session, scan_idx, _ in SCANS:
        engine.add_head((session, scan_idx), release.load_head(session, scan_idx))
    for shard in list_shards(stimuli_url, 100):
        for clip in read_shard(shard):
            for session, scan_idx, _ in SCANS:
                pred = engine.predict(clip.frames[None], [(session, scan_idx)], clip.perspectives[None].copy(),
                                      clip.modulations[None].copy())[(session, scan_idx)]
                out[(session, scan_idx, clip.clip_id)] = pred[0]
    return out


def as_arrays(table) -> dict[tuple[int, int, str], np.ndarray]:
    """Response table -> (session, scan_idx, clip_id) -> float32 [T, U] ordered by readout_id."""
    df = table.to_pandas().sort_values(["session", "scan_idx", "clip_id", "readout_id"])
    out = {}
    for (session, scan_idx, clip_id), rows in df.groupby(["session", "scan_idx", "clip_id"], sort=False):
        assert rows.readout_id.tolist() == list(range(len(rows)))
        out[(int(session), int(scan_idx), clip_id)] = np.stack(rows.response.to_list()).T
    return out


def config(data, output, **kw) -> SweepConfig:
    release, stimuli = data
    kw = {"actors": 2, "cpus_per_actor": 1, "clips_per_shard": 2, "clips_per_batch": 2, "progress": False,
          "verbose": False, "reuse_workers": True, **kw}
    return SweepConfig(release=release, stimuli=stimuli, output=output, **kw)


def test_sweep_s3_equals_engine_and_rerun_is_noop(ray_cluster, data, s3, capsys):
    output = s3.url(f"out-{uuid.uuid4().hex[:8]}")
    # storage options given explicitly (as well as in the env): they must never be printed or stored
    summary = run_sweep(config(data, output, storage_options=s3.storage_options, verbose=True))
    assert summary.ok, summary.failures
    assert (summary.items_total, summary.items_done, summary.items_skipped) == (6, 6, 0)  # 2 scans x (2 + 1) shards
    assert summary.scan_frames == 2 * sum(max(1, FRAMES - (n % 4) * (FRAMES // 10)) for n in range(CLIPS))
    assert 50 < summary.execution.peak_memory_mb < 64 * 1024  # the workers' peak resident memory, MiB

    table = read_responses(output)
    keys = table.select(["session", "scan_idx", "clip_id", "unit_id"]).to_pandas()
    assert not keys.duplicated().any()
    assert len(table) == CLIPS * sum(u for *_, u in SCANS)
    got, want = as_arrays(table), reference(*data)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape, key
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=str(key))

    # unit ids come from the release's units.csv
    units = Release.open(data[0]).units(8, 5)
    part = table.filter(pq.filters_to_expression([("session", "=", 8), ("clip_id", "=", "clip-00000")]))
    assert sorted(part.column("unit_id").to_pylist()) == sorted(units.unit_id.tolist())

    # rerun: nothing computed, output unchanged (same files, same bytes)
    fs, root = storage.filesystem(output)
    before = {p: fs.info(p)["ETag"] for p in fs.find(root + "/responses")}
    again = run_sweep(config(data, output))
    assert again.ok and (again.items_done, again.items_skipped, again.scan_frames) == (0, 6, 0)
    after = {p: fs.info(p)["ETag"] for p in fs.find(root + "/responses")}
    assert before == after
    assert read_responses(output).equals(table)
    assert len(committed(output)) == 6

    printed = capsys.readouterr()
    manifest = fs.cat_file(root + "/manifest.json").decode()
    for text in (printed.out, printed.err, manifest, repr(config(data, output, storage_options=s3.storage_options))):
        assert s3.storage_options["secret"] not in text and s3.storage_options["key"] not in text


def test_bfloat16_sweep_runs(ray_cluster, data, s3):
    output = s3.url(f"bf16-{uuid.uuid4().hex[:8]}")
    summary = run_sweep(config(data, output, dtype="bfloat16", scans=[(8, 5)], actors=1))
    assert summary.ok and summary.items_done == 3
    got, want = as_arrays(read_responses(output)), reference(*data)
    for key, value in got.items():
        np.testing.assert_allclose(value, want[key], rtol=0.1, atol=0.05)


