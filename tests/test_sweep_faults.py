"""Sweeps that go wrong: bad configuration, bad stimulus data, unreachable stores, dying actors, a dying driver.

Real moto S3 (the ``s3`` fixture), real Parquet; dying workers and a stopped driver run on in-process workers
(:mod:`faults`), the clean run and a killed driver process on a real local Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fnn_model.config import NetworkConfig
from fnn_model.engine import Engine
from fnn_model.release import Release, ReleaseError
from fnn_ray import storage
from fnn_ray.manifest import Manifest
from fnn_ray.sweep import SweepConfig, run_sweep
from fnn_ray.responses import read_responses
from fnn_ray.stimuli import list_shards, read_shard
from jobs import sweep as sweep_job
from faults import committed, local_pool, wait_for
from jobs.make_synthetic import make_synthetic, synthetic_clips
from fnn_ray.stimuli import write_clips

REPO = Path(__file__).resolve().parent.parent
SCANS = [(4, 7, 11), (8, 5, 17)]
CLIPS, FRAMES, SIZE = 6, 8, (36, 64)
ORDER = [("session", "ascending"), ("scan_idx", "ascending"), ("clip_id", "ascending"), ("readout_id", "ascending")]


@pytest.fixture(scope="module")
def data(s3):
    """Release (2 scans) and 6 clips in 2 files (4 + 2) on S3; with 2 clips per shard: 3 shards, 6 items."""
    root = s3.url(f"faults-{uuid.uuid4().hex[:8]}")
    release, stimuli = f"{root}/release", f"{root}/stimuli"
    make_synthetic(release, stimuli, SCANS, CLIPS, FRAMES, NetworkConfig.tiny(), *SIZE, clips_per_file=4, seed=5)
    return release, stimuli, root


def config(data, output, **kw) -> SweepConfig:
    kw = {"actors": 2, "cpus_per_actor": 1, "clips_per_shard": 2, "clips_per_batch": 2, "progress": False,
          "verbose": False, "reuse_workers": True, **kw}
    return SweepConfig(release=data[0], stimuli=data[1], output=output, **kw)


@pytest.fixture(scope="module")
def clean(ray_cluster, data):
    """The responses of a clean run (sorted), to compare faulty runs with."""
    output = f"{data[2]}/clean"
    summary = run_sweep(config(data, output))
    assert summary.ok and summary.items_done == 6
    return read_responses(output).sort_by(ORDER)


def assert_same_output(output: str, clean: pa.Table) -> None:
    table = read_responses(output)
    keys = table.select(["session", "scan_idx", "clip_id", "unit_id"]).to_pandas()
    assert not keys.duplicated().any(), "duplicate rows"
    assert table.sort_by(ORDER).equals(clean)


def stimulus_table(data) -> pa.Table:
    """The first stimulus file of the good dataset (4 clips, one row group each)."""
    fs, root = storage.filesystem(data[1])
    with fs.open(root + "/part-00000.parquet", "rb") as f:
        return pq.read_table(f)


def write_parquet(url: str, name: str, table: pa.Table) -> str:
    fs, root = storage.filesystem(url)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=1)
    fs.pipe_file(f"{root}/{name}", sink.getvalue().to_pybytes())
    return url


# ---------------------------------------------------------------------------------------------- configuration
def test_unknown_scan_is_a_clear_error(data, capsys):
    output = f"{data[2]}/unknown-scan"
    with pytest.raises(ValueError, match=r"unknown scan\(s\) 1-2 .*available: 4-7, 8-5"):
        run_sweep(config(data, output, scans=[(4, 7), (1, 2)]))
    code = sweep_job.main(["--release", data[0], "--stimuli", data[1], "--output", output, "--scans", "8-5,1-2"])
    assert code == 2
    assert "unknown scan(s) 1-2" in capsys.readouterr().err
    assert not committed(output)


def test_unreachable_urls_are_clear_errors(data, s3, tmp_path):
    missing = str(tmp_path / "no-such-stimuli")
    with pytest.raises(FileNotFoundError, match="stimulus dataset not found: .*no-such-stimuli"):
        run_sweep(config((data[0], missing, data[2]), f"{data[2]}/unreachable"))
    options = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s3cr3t-value",
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(ReleaseError, match="release s3://.* cannot be reached") as info:
        run_sweep(config(data, s3.url("unreachable"), storage_options=options))
    assert "s3cr3t-value" not in str(info.value)


@pytest.mark.parametrize("defect", ["duplicate clip_id", "missing column", "corrupt parquet", "bad num_frames"])
def test_bad_stimulus_listing_commits_nothing(data, s3, defect):
    table = stimulus_table(data)
    bad = s3.url(f"bad-{uuid.uuid4().hex[:8]}")
    if defect == "duplicate clip_id":
        ids = table.column("clip_id").to_pylist()
        ids[3] = ids[1]
        table = table.set_column(0, "clip_id", pa.array(ids, pa.string()))
        expect = r"duplicate clip_id 'clip-00001': .*part-00000.parquet row 1 and .*part-00000.parquet row 3"
    elif defect == "missing column":
        table = table.drop_columns(["num_frames"])
        expect = r"part-00000.parquet: missing column 'num_frames'"
    elif defect == "bad num_frames":
        values = table.column("num_frames").to_pylist()
        values[2] = 0
        table = table.set_column(table.schema.get_field_index("num_frames"), "num_frames", pa.array(values, pa.int32()))
        expect = r"part-00000.parquet row 2 \(clip_id 'clip-00002'\): num_frames must be > 0"
    write_parquet(bad, "part-00000.parquet", table)
    if defect == "corrupt parquet":
        fs, root = storage.filesystem(bad)
        fs.pipe_file(root + "/part-00000.parquet", b"PAR1 this is not parquet" * 10)
        expect = r"part-00000.parquet: not a valid parquet file"
    output = s3.url(f"bad-out-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ValueError, match=expect):
        run_sweep(config((data[0], bad, None), output))
    assert not committed(output)


def test_bad_frames_fail_only_their_items(ray_cluster, data, s3, capsys):
    table = stimulus_table(data)
    frames = table.column("frames").to_pylist()
    frames[2] = frames[2][:-7]  # row 2 (clip-00002) is 7 bytes short
    table = table.set_column(table.schema.get_field_index("frames"), "frames", pa.array(frames, pa.binary()))
    bad = s3.url(f"short-{uuid.uuid4().hex[:8]}")
    write_parquet(bad, "part-00000.parquet", table)
    output = s3.url(f"short-out-{uuid.uuid4().hex[:8]}")

    summary = run_sweep(config((data[0], bad, None), output))
    assert not summary.ok and summary.items_failed == 2 and summary.items_done == 2  # 2 shards x 2 scans
    for message in summary.failures:
        assert "part-00000.parquet row 2 (clip_id 'clip-00002'): frames has" in message
        assert "part-00000.000002-000004" in message
    good = committed(output)
    assert good == {(s, i, "part-00000.000000-000002") for s, i, _ in SCANS}
    with pytest.raises(Exception, match="clip-00002"):
        summary.raise_for_failures()

    # the CLI reports the same and exits 1; the good items are not recomputed
    code = sweep_job.main(["--release", data[0], "--stimuli", bad, "--output", output, "--actors", "1",
                           "--cpus-per-actor", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "2 failed" in out and "row 2 (clip_id 'clip-00002')" in out and "NOT committed" in out
    assert committed(output) == good


# ---------------------------------------------------------------------------------------------- dying actors
def test_actor_killed_mid_sweep(ray_cluster, data, clean):
    output = f"{data[2]}/actor-killed"
    summary = run_sweep(config(data, output, pool=local_pool(crash_on="8-5/part-00000.000002-000004")))
    assert summary.ok, summary.failures
    assert summary.execution.actor_restarts == 1 and summary.execution.requeued >= 1
    assert summary.items_done == 6  # every item committed exactly once by a live actor
    assert_same_output(output, clean)


def test_last_actor_dies_then_rerun(ray_cluster, data, clean):
    output = f"{data[2]}/last-actor"
    first = run_sweep(config(data, output, max_actor_restarts=0,
                             pool=local_pool(actors=1, crash_on="4-7/part-00001.000000-000002")))
    assert not first.ok and first.pending > 0
    assert any("no live worker left" in f for f in first.failures)
    done = len(committed(output))
    assert done == first.items_done < 6
    again = run_sweep(config(data, output))
    assert again.ok and again.items_skipped == done and again.items_done == 6 - done
    assert_same_output(output, clean)


# ---------------------------------------------------------------------------------------------- dying driver
def test_driver_stopped_then_rerun_computes_only_missing(ray_cluster, data, clean):
    output = f"{data[2]}/stopped"
    first = run_sweep(config(data, output, pool=local_pool(stop_after=2)))
    assert (first.items_done, first.pending, first.ok) == (2, 4, False)
    assert len(committed(output)) == 2
    again = run_sweep(config(data, output))
    assert again.ok and (again.items_skipped, again.items_done) == (2, 4)
    assert_same_output(output, clean)

    # other shard boundaries would duplicate rows: refused, with or without the manifest
    with pytest.raises(ValueError, match="was written with clips_per_shard=2"):
        run_sweep(config(data, output, clips_per_shard=3))
    fs, root = storage.filesystem(output)
    fs.rm_file(root + "/manifest.json")
    with pytest.raises(ValueError, match=r"holds committed items but no record of what computed them"):
        run_sweep(config(data, output, clips_per_shard=3))
    assert_same_output(output, clean)


def group_alive(pgid: int) -> bool:
    """True while a process of process group ``pgid`` is alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_driver_killed_then_rerun(ray_cluster, s3, data):
    """Kill -9 a real `python -m jobs.sweep` after a few commits; the rerun computes only the missing items."""
    root = s3.url(f"killed-{uuid.uuid4().hex[:8]}")
    stimuli, output = f"{root}/stimuli", f"{root}/out"
    write_clips(stimuli, synthetic_clips(16, 24, *SIZE, seed=9), clips_per_file=8)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "jobs.sweep", "--release", data[0], "--stimuli", stimuli, "--output", output,
           "--actors", "1", "--cpus-per-actor", "1", "--clips-per-shard", "1", "--clips-per-batch", "1",
           "--no-progress"]
    # its own session, so that killing the group kills its private Ray too (no orphaned worker commits later)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: len(committed(output)) >= 3 or proc.poll() is not None, "3 commits")
        assert proc.poll() is None, f"the sweep ended before it was killed:\n{proc.stdout.read()[-3000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_for(lambda: not group_alive(proc.pid), "every process of the killed run to exit")
    killed_at = committed(output)
    assert 3 <= len(killed_at) < 32

    summary = run_sweep(config((data[0], stimuli), output, clips_per_shard=None))
    assert summary.ok and Manifest.load(output).config["clips_per_shard"] == 1  # taken from the killed run's manifest
    assert summary.items_skipped == len(killed_at) and summary.items_done == 32 - len(killed_at)

    table = read_responses(output)
    keys = table.select(["session", "scan_idx", "clip_id", "unit_id"]).to_pandas()
    assert len(table) == 16 * sum(u for *_, u in SCANS) and not keys.duplicated().any()
    release = Release.open(data[0])
    engine = Engine(release.load_core())
    got = table.to_pandas()
    for session, scan_idx, _ in SCANS:
        engine.add_head((session, scan_idx), release.load_head(session, scan_idx))
    for shard in list_shards(stimuli, 100)[:1]:
        for clip in read_shard(shard)[:3]:
            for session, scan_idx, _ in SCANS:
                want = engine.predict(clip.frames[None], [(session, scan_idx)], clip.perspectives[None].copy(),
                                      clip.modulations[None].copy())[(session, scan_idx)][0]
                rows = got[(got.session == session) & (got.scan_idx == scan_idx) & (got.clip_id == clip.clip_id)]
                rows = rows.sort_values("readout_id")
                np.testing.assert_allclose(np.stack(rows.response.to_list()).T, want, rtol=1e-5, atol=1e-6)
