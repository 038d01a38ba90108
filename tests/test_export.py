"""The export to the published layout: a real sweep (local Ray) exported and checked against the engine."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fnn_model.config import NetworkConfig
from fnn_model.engine import Engine
from fnn_model.release import Release
from fnn_model.synthetic import make_release
from fnn_ray import storage
from fnn_ray.ledger import LEDGER_DIR, Ledger
from fnn_ray.locations import screen_locations
from fnn_ray.manifest import Manifest
from fnn_ray.stimuli import write_clips
from fnn_ray.sweep import SweepConfig, run_sweep
from jobs.export import main
from jobs.make_synthetic import synthetic_clips

SCANS = [(8, 5, 11), (4, 7, 7)]  # release order: 8-5 first (not sorted), so order is checked
CLIPS, FRAMES, SIZE = 5, 12, (36, 64)
CONTEXT = {1: 3, 3: 2}  # clip index -> context frames (run, not written)


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    """A tiny release (2 scans), 5 clips of 9-12 frames (two with context frames) in 2 files, swept locally."""
    root = tmp_path_factory.mktemp("export")
    release, stimuli, output = str(root / "release"), str(root / "stimuli"), str(root / "output")
    make_release(release, SCANS, NetworkConfig.tiny(), seed=5)
    clips = synthetic_clips(CLIPS, FRAMES, *SIZE, seed=5)
    for n, c in CONTEXT.items():
        clips[n].context_frames = c
    write_clips(stimuli, clips, clips_per_file=3)
    summary = run_sweep(SweepConfig(release=release, stimuli=stimuli, output=output, actors=1, cpus_per_actor=1,
                                    clips_per_shard=2, clips_per_batch=2, progress=False, verbose=False))
    assert summary.ok and summary.items_total == 6, summary.failures  # 2 scans x 3 parts (2 + 1 | 2 clips)
    return release, clips, output


def engine_responses(release_url: str, clips) -> dict[tuple[int, int], list[np.ndarray]]:
    """scan -> per clip (dataset order) the engine's float32 [T - context, U] prediction of that clip alone."""
    release = Release.open(release_url)
    engine = Engine(release.load_core())
    out = {}
    for session, scan_idx, _ in SCANS:
        engine.add_head((session, scan_idx), release.load_head(session, scan_idx))
        out[(session, scan_idx)] = [
            engine.predict(c.frames[None], [(session, scan_idx)], c.perspectives[None], c.modulations[None])[
                (session, scan_idx)][0, c.context_frames:] for c in clips]
    return out


def test_responses_export_equals_engine(sweep, s3, tmp_path, capsys):
    release_url, clips, output = sweep
    to = str(tmp_path / "published")
    lengths = [c.num_frames - c.context_frames for c in clips]  # 12, 11 - 3, 10, 9 - 2, 12
    assert main(["--output", output, "--to", to]) == 0
    assert f"exported 2 scan(s), array [18, {sum(lengths)}] float32" in capsys.readouterr().out
    assert sorted(os.listdir(to)) == ["responses"]  # no staging left behind
    assert sorted(os.listdir(f"{to}/responses")) == ["clips.csv", "metadata.csv", "responses.npy", "units.csv"]

    array = np.load(f"{to}/responses/responses.npy", mmap_mode="r")
    assert array.dtype == np.float32 and array.shape == (7 + 11, sum(lengths)) and array.flags.c_contiguous

    # rows: scans in the sweep's (release) order, each scan's units by readout_id, ids from the release
    units = pd.read_csv(f"{to}/responses/units.csv")
    release = Release.open(release_url)
    expected = pd.concat([release.units(s, i)[["session", "scan_idx", "unit_id", "readout_id"]] for s, i, _ in SCANS])
    assert units.columns.tolist() == ["session", "scan_idx", "unit_id", "readout_id"]
    assert units.values.tolist() == expected.values.tolist()

    # every clip x unit against the engine, at the clip's columns (clips in dataset order, context dropped)
    want = engine_responses(release_url, clips)
    checked = 0
    for row, (session, scan_idx, unit_id, readout_id) in enumerate(units.itertuples(index=False)):
        start = 0
        for c, length in enumerate(lengths):
            np.testing.assert_allclose(array[row, start:start + length], want[(session, scan_idx)][c][:, readout_id],
                                       rtol=1e-5, atol=1e-7, err_msg=f"unit {unit_id} clip {c}")
            start += length
            checked += 1
    assert checked == 18 * CLIPS

    metadata = pd.read_csv(f"{to}/responses/metadata.csv")
    stimuli = Manifest.load(output).inputs["stimuli"]
    assert metadata.to_dict("records") == [
        {"session": s, "scan_idx": i, "sampling_frequency": 30.0, "stimulus_height": SIZE[0],
         "stimulus_width": SIZE[1], "burnin_frames": 10, "frames": sum(lengths), "stimulus": stimuli,
         "clip_table": "clips.csv"} for s, i, _ in SCANS]

    # --scans picks rows (sweep order kept); a remote --to holds the same bytes
    remote = s3.url(f"export-{uuid.uuid4().hex[:8]}")
    assert main(["--output", output, "--to", remote, "--scans", "4-7"]) == 0
    fs, root = storage.filesystem(remote)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(root)) == ["clips.csv", "metadata.csv", "responses.npy",
                                                                  "units.csv"]
    with fs.open(f"{root}/responses/responses.npy", "rb") as f:
        only = np.load(f)
    np.testing.assert_array_equal(only, array[11:])
    assert pd.read_csv(fs.open(f"{root}/responses/units.csv")).values.tolist() == units.values[11:].tolist()


def test_stimulus_clip_table_and_no_silent_overwrite(sweep, s3, tmp_path, capsys):
    _, clips, output = sweep
    for to in (str(tmp_path / "published"), s3.url(f"export-{uuid.uuid4().hex[:8]}")):
        fs, root = storage.filesystem(to)
        assert main(["--output", output, "--to", to, "--stimulus"]) == 0
        with fs.open(f"{root}/responses/stimulus.npy", "rb") as f:
            frames = np.load(f)
        # column j of responses.npy responds to frame j: every clip's frames without its context, in dataset order
        np.testing.assert_array_equal(frames, np.concatenate([c.frames[c.context_frames:] for c in clips]))
        assert pd.read_csv(fs.open(f"{root}/responses/metadata.csv")).stimulus.tolist() == ["stimulus.npy"] * 2

        table = pd.read_csv(fs.open(f"{root}/responses/clips.csv"))
        starts = np.cumsum([0] + [c.num_frames - c.context_frames for c in clips])
        assert table.to_dict("records") == [
            {"clip_id": c.clip_id, "start": int(starts[n]), "stop": int(starts[n + 1]),
             "context_frames": c.context_frames,
             "burnin_frames": min(int(starts[n + 1] - starts[n]), max(0, 10 - c.context_frames))}
            for n, c in enumerate(clips)]

        # an export is never written over silently; --overwrite replaces it and drops what it no longer has
        before = fs.cat_file(f"{root}/responses/responses.npy")
        capsys.readouterr()
        assert main(["--output", output, "--to", to]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "already holds an export" in err[0] and "--overwrite" in err[0], err
        assert fs.exists(f"{root}/responses/stimulus.npy")
        assert main(["--output", output, "--to", to, "--overwrite"]) == 0
        fs.invalidate_cache()
        assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{root}/responses")) == [
            "clips.csv", "metadata.csv", "responses.npy", "units.csv"]
        assert fs.cat_file(f"{root}/responses/responses.npy") == before


def test_incomplete_or_bad_sweep_writes_nothing(sweep, tmp_path, capsys):
    _, _, output = sweep
    copy = str(tmp_path / "copy")
    shutil.copytree(output, copy)
    to = str(tmp_path / "published")

    # one ledger marker gone: the item is missing, named, and nothing is written
    marker = Path(copy, LEDGER_DIR, "session=4", "scan_idx=7", "part-00001.000000-000002.json")
    saved = marker.read_bytes()
    marker.unlink()
    capsys.readouterr()
    assert main(["--output", copy, "--to", to]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"error: sweep {copy} is incomplete: 1 of 6 planned item(s) not committed: "
                    f"4-7/part-00001.000000-000002; rerun the sweep to finish it")]
    assert not os.path.exists(to)
    assert main(["--output", copy, "--to", to, "--scans", "8-5"]) == 0  # the complete scan alone exports
    shutil.rmtree(to)
    marker.write_bytes(saved)

    # a committed part that disagrees with the others (a unit id): found while filling, nothing left at --to
    ledger = Ledger(copy)
    key = (4, 7, "part-00001.000000-000002")
    commit = ledger.commits()[key]
    table = pq.read_table(ledger.path(commit.file))
    unit_ids = table.column("unit_id").to_numpy().copy()
    unit_ids[3] += 1000
    ledger.commit_table(key, commit.file, table.set_column(1, "unit_id", pc.cast(unit_ids, "int64")))
    os.makedirs(to)
    Path(to, "keep.txt").touch()
    assert main(["--output", copy, "--to", to]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part-00001.000000-000002.parquet: clip 'clip-00003' gives readout_id" in err[0]
    assert os.listdir(to) == ["keep.txt"]

    # not a sweep, unknown scan
    assert main(["--output", str(tmp_path / "nothing"), "--to", to]) == 2
    assert main(["--output", copy, "--to", to, "--scans", "1-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "no manifest.json" in err[0]
    assert err[1] == f"error: scan(s) 1-1 not in the sweep at {copy}; it has 8-5, 4-7"
    assert os.listdir(to) == ["keep.txt"]


def test_readout_export_matches_head_parameters(sweep, tmp_path):
    release_url, _, _ = sweep
    to = str(tmp_path / "published")
    assert main(["--readout", "--release", release_url, "--to", to, "--scans", "4-7,8-5"]) == 0
    assert main(["--readout", "--release", release_url, "--to", to]) == 2  # not over the first one
    assert main(["--readout", "--release", release_url, "--to", to, "--scans", "4-7,8-5", "--overwrite"]) == 0
    assert sorted(os.listdir(f"{to}/readout")) == ["readout_locations.npy", "readout_weights.npy", "units.csv"]
    weights = np.load(f"{to}/readout/readout_weights.npy")
    locations = np.load(f"{to}/readout/readout_locations.npy")
    units = pd.read_csv(f"{to}/readout/units.csv")
    release = Release.open(release_url)
    config = NetworkConfig.tiny()
    streams, channels = config.streams, config.recurrent.out_channels
    assert weights.shape == (18, streams * channels) and locations.shape == (18, 2)
    assert units.columns.tolist() == ["session", "scan_idx", "unit_id"]
    row = 0
    for session, scan_idx, count in SCANS:  # release order, whatever --scans says
        head = release.load_head(session, scan_idx)
        params, screen = dict(head.named_parameters()), screen_locations(head)  # published convention
        ids = release.units(session, scan_idx)
        for u in range(count):
            assert units.iloc[row].tolist() == [session, scan_idx, ids.unit_id.iloc[u]]
            for s in range(streams):
                for c in range(channels):
                    assert weights[row, s * channels + c] == params[f"readout.feature.weights.{s}"][u, 0, c].item()
            assert locations[row].tolist() == screen[u].tolist()
            row += 1
    assert row == 18


def test_movie_npy_to_published_layout(ray_cluster, tmp_path):
    """A synthetic movie .npy -> jobs.make_stimuli (clips with context) -> jobs.sweep -> jobs.export: each clip's
    columns of responses.npy equal the engine's prediction of that clip (context run, then dropped)."""
    from jobs import make_stimuli
    from jobs.make_stimuli import synthetic_movie

    release, movie_path = str(tmp_path / "release"), tmp_path / "movie.npy"
    make_release(release, SCANS, NetworkConfig.tiny(), seed=6)
    movie = synthetic_movie(50, *SIZE, seed=3)
    np.save(movie_path, movie)
    stimuli, output, to = str(tmp_path / "stimuli"), str(tmp_path / "out"), str(tmp_path / "published")
    assert make_stimuli.main(["--from", str(movie_path), "--output", stimuli, "--clip-frames", "20",
                              "--context-frames", "5", "--size", f"{SIZE[0]}x{SIZE[1]}"]) == 0
    summary = run_sweep(SweepConfig(release=release, stimuli=stimuli, output=output, actors=1, cpus_per_actor=1,
                                    progress=False, verbose=False))
    assert summary.ok, summary.failures
    assert main(["--output", output, "--to", to]) == 0
    array = np.load(f"{to}/responses/responses.npy", mmap_mode="r")
    assert array.shape == (sum(u for *_, u in SCANS), 50)  # every movie frame once, in movie order
    # the movie's first clip ran from the reset at the movie's start: its first 10 frames are burn-in; the others
    # ran their 5 context frames first, so 5 of their frames lie within 10 frames of their reset
    clips = pd.read_csv(f"{to}/responses/clips.csv")
    assert clips[["start", "stop", "context_frames", "burnin_frames"]].values.tolist() == [
        [0, 20, 0, 10], [20, 40, 5, 5], [40, 50, 5, 5]]
    engine = Engine(Release.open(release).load_core())
    starts, row = [0, 20, 40], 0
    for session, scan_idx, units in SCANS:
        engine.add_head((session, scan_idx), Release.open(release).load_head(session, scan_idx))
        for start in starts:
            first = max(0, start - 5)
            clip = movie[first:start + 20][None]
            want = engine.predict(clip, [(session, scan_idx)])[(session, scan_idx)][0, start - first:]  # [T, U]
            np.testing.assert_allclose(array[row:row + units, start:start + want.shape[0]], want.T, rtol=1e-5,
                                       atol=1e-7)
        row += units
