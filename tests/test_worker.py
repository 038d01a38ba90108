"""The Worker outside Ray: items run from several calling threads at once (as Ray's threaded actor does) give the
same committed responses as one item after the other, and errors from the compute thread reach the caller."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest

from fnn_model.config import NetworkConfig
from fnn_ray.plan import build_items
from fnn_ray.stimuli import list_shards
from fnn_ray.reducers import FramesReducer
from fnn_ray.sources import ParquetSource
from fnn_ray.worker import Task, Worker, WorkerOptions
from jobs.make_synthetic import make_synthetic

SCANS = [(4, 7, 13), (8, 5, 21)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic release (2 scans) and 6 clips of 5 frames, 2 per shard -> 6 items."""
    root = tmp_path_factory.mktemp("worker")
    release, stimuli = str(root / "release"), str(root / "stimuli")
    make_synthetic(release, stimuli, SCANS, 6, 5, NetworkConfig.tiny(), 36, 64, clips_per_file=3, seed=4)
    items = build_items([((s, i), u) for s, i, u in SCANS], list_shards(stimuli, 2))
    return release, items, stimuli


def task(data, output) -> Task:
    return Task(ParquetSource(data[2]), FramesReducer(), str(output))


def committed(output: str, items) -> dict:
    """item key -> its committed part file as a table (rows in file order)."""
    return {item.key: pq.read_table(f"{output}/responses/session={item.session}/scan_idx={item.scan_idx}/"
                                    f"{item.part_id}.parquet") for item in items}


def test_an_in_process_worker_starts_no_ray(data, monkeypatch):
    """Outside Ray (a LocalPool) the worker reports no node and no GPUs without calling Ray, whose calls would start
    a whole local cluster by themselves."""
    import ray

    calls: list[str] = []

    def would_start_a_ray(name: str):
        def call(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"ray.{name} outside Ray")
        return call

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a process where no Ray runs
    for name in ("get_gpu_ids", "get_runtime_context", "init"):
        monkeypatch.setattr(ray, name, would_start_a_ray(name))
    info = Worker(WorkerOptions(data[0], device="cpu", threads=1)).ready()
    assert calls == []
    assert (info["node"], info["gpu_ids"], info["device"], info["threads"]) == ("", [], "cpu", 1)


def test_concurrent_calls_match_sequential(data, tmp_path):
    release, items, _ = data
    worker = Worker(WorkerOptions(release, clips_per_batch=2, max_heads=1, device="cpu", threads=1))
    assert worker.ready()["threads"] == 1
    for item in items:
        worker.run(item, task(data, tmp_path / "one-by-one"))
    with ThreadPoolExecutor(max_workers=3) as pool:  # max_heads=1: heads are swapped while calls overlap
        results = list(pool.map(lambda item: worker.run(item, task(data, tmp_path / "overlapped")), items))
    assert [r.key for r in results] == [item.key for item in items]
    assert all(r.timings["wait"] >= 0 and r.timings["compute"] > 0 for r in results)
    assert all(50 < r.peak_memory_mb < 64 * 1024 for r in results)  # this process's peak resident set, MiB
    assert len(worker.heads()) == 1
    sequential = committed(str(tmp_path / "one-by-one"), items)
    overlapped = committed(str(tmp_path / "overlapped"), items)
    for key, table in sequential.items():
        assert table.column_names == overlapped[key].column_names
        assert table.num_rows == overlapped[key].num_rows > 0
        for name in table.column_names:
            left, right = table.column(name).to_pylist(), overlapped[key].column(name).to_pylist()
            if name == "response":
                np.testing.assert_array_equal(np.array(left), np.array(right), err_msg=f"{key}")
            else:
                assert left == right, (key, name)


def test_errors_on_the_compute_thread_name_the_item(data, tmp_path):
    release, items, _ = data
    worker = Worker(WorkerOptions(release, device="cpu", threads=1))
    missing = type(items[0])(99, 1, 5, items[0].part)  # a scan the release does not have
    with pytest.raises((KeyError, ValueError, FileNotFoundError), match="99-1"):
        worker.run(missing, task(data, tmp_path / "out"))
    assert worker.run(items[0], task(data, tmp_path / "out")).rows > 0  # the worker still works afterwards
