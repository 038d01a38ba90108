"""The contracts every source and every reducer keeps (fsspec's style: one suite, parametrised over each of them).

A source's ``read(item)`` gives the clips of the item's part, in order, deterministically, as uint8 ``[T, H, W]``
frames adding up to the part's ``frames``; a part names itself (``part_id``: safe in a file name; ``where``). A
reducer's ``reduce(item, units, pairs)`` gives a Parquet-serialisable table, the same for the same input, to be
committed at ``file(item)`` under its ``data_dir``, one file per item.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from fnn_ray.generators import RigidMonet
from fnn_ray.ledger import parquet_bytes
from fnn_ray.plan import WorkItem, build_items
from fnn_ray.recordings import RecordingSource, RepeatsReducer, list_scan, write_repeat
from fnn_ray.reducers import FramesReducer, Units, WindowReducer
from fnn_ray.sources import GeneratedSource, ParquetSource, blocks
from fnn_ray.stimuli import list_shards, write_clips
from jobs.make_synthetic import synthetic_clips

SCAN, UNITS = (4, 7), 6
FAMILY = RigidMonet(directions=2, trials=1, block_frames=4, height=18, width=32, seed=1)


def _parquet(root):
    url = str(root / "stimuli")
    write_clips(url, synthetic_clips(5, 6, 18, 32, seed=2), clips_per_file=3)
    return ParquetSource(url), list_shards(url, 2)


def _generated(root):
    return GeneratedSource(FAMILY), blocks(FAMILY, 2)


def _recordings(root):
    url = str(root / "recordings" / "4-7")
    rng = np.random.default_rng(0)
    for video in ("a", "b"):
        frames = rng.integers(0, 255, (8, 18, 32), dtype=np.uint8)
        for repeat in ("0", "1", "2"):
            write_repeat(url, video, repeat, frames, rng.standard_normal((8, UNITS)).astype(np.float32),
                         rng.standard_normal((8, 2)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32))
    return RecordingSource(), list_scan(url, UNITS, burnin=2)


SOURCES = {"parquet": _parquet, "generated": _generated, "recordings": _recordings}
REDUCERS = {"frames": lambda source: FramesReducer(), "windows": lambda source: WindowReducer(FAMILY),
            "repeats": lambda source: RepeatsReducer(burnin=2)}
#: Which source each reducer is fed by in a job (a reducer may rely on its source's clips).
FED_BY = {"frames": "parquet", "windows": "generated", "repeats": "recordings"}


def items_of(name: str, root) -> tuple[object, list[WorkItem]]:
    source, parts = SOURCES[name](root)
    return source, build_items([(SCAN, UNITS)], parts)


@pytest.mark.parametrize("name", SOURCES)
def test_source_reads_each_part_in_order(name, tmp_path):
    source, items = items_of(name, tmp_path)
    assert items
    for item in items:
        clips = source.read(item)
        again = source.read(item)
        assert clips and [c.clip_id for c in clips] == [c.clip_id for c in again]
        assert sum(c.num_frames for c in clips) == item.part.frames
        for clip, other in zip(clips, again):
            assert clip.frames.dtype == np.uint8 and clip.frames.ndim == 3
            np.testing.assert_array_equal(clip.frames, other.frames)
        assert re.fullmatch(r"[A-Za-z0-9._=-]+", item.part.part_id) and item.part.where
    ids = [c.clip_id for item in items for c in source.read(item)]
    assert len(ids) == len(set(ids)), "a clip in two parts"


@pytest.mark.parametrize("name", REDUCERS)
def test_reducer_commits_one_deterministic_table_per_item(name, tmp_path):
    source, items = items_of(FED_BY[name], tmp_path)
    reducer = REDUCERS[name](source)
    units = Units(np.arange(100, 100 + UNITS, dtype=np.int64), np.arange(UNITS, dtype=np.int32)[::-1].copy())
    files = set()
    for item in items:
        clips = source.read(item)
        rng = np.random.default_rng(3)
        pairs = [(clip, rng.standard_normal((clip.num_frames - clip.context_frames, UNITS)).astype(np.float32))
                 for clip in clips]
        table = reducer.reduce(item, units, pairs)
        assert isinstance(table, pa.Table) and table.num_rows > 0
        assert table.equals(reducer.reduce(item, units, pairs))
        assert len(parquet_bytes(table)) > 0
        file = reducer.file(item)
        assert file.startswith(reducer.data_dir + "/") and file.endswith(".parquet")
        assert f"session={item.session}" in file and f"scan_idx={item.scan_idx}" in file
        files.add(file)
    assert len(files) == len(items), "two items would share a file"
