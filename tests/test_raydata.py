"""fnn_ray.raydata: FNNPredictor in a real Ray Data pipeline, against the engine run on each clip alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fnn_model.config import NetworkConfig
from fnn_model.engine import Engine
from fnn_model.release import Release
from fnn_model.synthetic import make_release, random_behaviour, random_clips
from fnn_ray.raydata import OUTPUT_SCHEMA, FNNPredictor, batch_to_clips
from fnn_ray.stimuli import Clip, dataset_files, write_clips

SCANS = ((4, 7, 6), (8, 5, 9))  # (session, scan_idx, units)
LENGTHS = (5, 3, 6, 4, 5)  # frames per clip


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Reference and in-process predictions on one thread: spinning OpenMP threads on a loaded 2-core machine
    slow the tiny model down tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(release URL, stimulus URL, clips): clips of different lengths, with and without eye and behaviour
    data, one with context frames."""
    root = tmp_path_factory.mktemp("raydata")
    release, stimuli = str(root / "release"), str(root / "stimuli")
    make_release(release, SCANS, NetworkConfig.tiny(), seed=5)
    video = random_clips(len(LENGTHS), max(LENGTHS), 36, 64, seed=5)
    eye, behaviour = random_behaviour(len(LENGTHS), max(LENGTHS), seed=5)
    clips = []
    for n, t in enumerate(LENGTHS):
        with_vectors = n != 1
        clips.append(Clip(f"clip-{n}", video[n, :t].copy(), eye[n, :t].copy() if with_vectors else None,
                          behaviour[n, :t].copy() if with_vectors else None, context_frames=2 if n == 4 else 0))
    write_clips(stimuli, clips, clips_per_file=3)
    return release, stimuli, clips


@pytest.fixture(scope="module")
def expected(data) -> dict[tuple[int, int, str], np.ndarray]:
    """(session, scan_idx, clip_id) -> float32 [T - context, U] from the engine, one clip and one scan at a
    time (no batching, no padding)."""
    release_url, _, clips = data
    release = Release.open(release_url)
    engine = Engine(release.load_core())
    out = {}
    for session, scan_idx, _ in SCANS:
        engine.add_head((session, scan_idx), release.load_head(session, scan_idx))
        for clip in clips:
            vectors = [None if v is None else v[None] for v in (clip.perspectives, clip.modulations)]
            rates = engine.predict(clip.frames[None], [(session, scan_idx)], *vectors)[(session, scan_idx)][0]
            out[(session, scan_idx, clip.clip_id)] = rates[clip.context_frames:]
    return out


def check_rows(table: pd.DataFrame, expected: dict, release_url: str) -> None:
    """Every (scan, clip, unit) once, each response equal to the engine's column for that unit."""
    release = Release.open(release_url)
    assert len(table) == len(LENGTHS) * sum(units for _, _, units in SCANS)
    assert not table.duplicated(["session", "scan_idx", "clip_id", "unit_id"]).any()
    for (session, scan_idx, clip_id), rates in expected.items():
        units = release.units(session, scan_idx)
        rows = table[(table.session == session) & (table.scan_idx == scan_idx) & (table.clip_id == clip_id)]
        assert sorted(rows.unit_id) == sorted(units.unit_id)
        for row in rows.itertuples():
            assert units.loc[row.readout_id].unit_id == row.unit_id
            np.testing.assert_allclose(np.asarray(row.response), rates[:, row.readout_id], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ray_data_pipeline_matches_the_engine(ray_cluster, data, expected) -> None:
    release, stimuli, _ = data
    dataset = ray_cluster.data.read_parquet(stimuli, override_num_blocks=2)
    out = dataset.map_batches(
        FNNPredictor,
        fn_constructor_kwargs={"release_url": release, "scans": [(8, 5), (4, 7)]},
        batch_size=2,
        compute=ray_cluster.data.ActorPoolStrategy(size=2),
    )
    check_rows(out.to_pandas(), expected, release)


@pytest.mark.parametrize("batch_format", ["numpy", "pandas", "pyarrow"])
def test_every_batch_format_gives_the_same_rows(data, expected, batch_format) -> None:
    release, stimuli, _ = data
    _, files = dataset_files(stimuli)
    table = pa.concat_tables([pq.read_table(path) for path, _ in files])
    batch = {"numpy": lambda: {name: table.column(name).to_numpy() for name in table.column_names},
             "pandas": table.to_pandas, "pyarrow": lambda: table}[batch_format]()
    out = FNNPredictor(release)(batch)
    assert out.schema == OUTPUT_SCHEMA
    check_rows(out.to_pandas(), expected, release)


def test_a_row_that_breaks_the_contract_is_named(data) -> None:
    _, stimuli, clips = data
    _, files = dataset_files(stimuli)
    table = pq.read_table(files[0][0]).to_pandas()
    assert batch_to_clips(table) == clips[:3]
    table.loc[1, "height"] = 35
    with pytest.raises(ValueError, match=r"row 1 \(clip_id 'clip-1'\): frames has 6912 bytes, expected "
                                         r"num_frames\*height\*width = 3\*35\*64 = 6720"):
        batch_to_clips(table)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['num_frames'\]"):
        batch_to_clips(table.drop(columns="num_frames"))
