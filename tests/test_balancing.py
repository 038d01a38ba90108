"""Load balancing on a (fake) multi-GPU cluster: one actor per GPU, scans spread by cost, work stealing.

Ray is started with 4 fake GPUs: the driver must create one GPU actor per GPU, and those actors must still run
the model on the CPU (torch sees no CUDA here). Stimuli and output are local Parquet (the S3 path is covered
by test_sweep.py); the model, Ray and the scheduler are real. Stealing from a slow worker is checked on simulated
workers (test_executor.py).
"""

from __future__ import annotations


import pytest

from fnn_model.config import NetworkConfig
from fnn_ray.sweep import SweepConfig, run_sweep
from fnn_ray.plan import HEAD_LOAD_COST, WorkItem
from fnn_ray.responses import read_responses
from faults import committed
from conftest import RAY_GPUS
from jobs.make_synthetic import make_synthetic

SCANS = [(4, 7, 9), (8, 5, 15), (9, 6, 12)]
CLIPS, FRAMES, SIZE = 16, 12, (36, 64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 scans x 8 shards (2 clips of <= 12 frames each) = 24 items, on the local disk."""
    root = tmp_path_factory.mktemp("balancing")
    release, stimuli = str(root / "release"), str(root / "stimuli")
    make_synthetic(release, stimuli, SCANS, CLIPS, FRAMES, NetworkConfig.tiny(), *SIZE, clips_per_file=8, seed=7)
    return release, stimuli, root


def config(data, name: str, **kw) -> SweepConfig:
    kw = {"clips_per_shard": 2, "clips_per_batch": 2, "progress": False, "verbose": False, "reuse_workers": True,
          **kw}
    return SweepConfig(release=data[0], stimuli=data[1], output=str(data[2] / name), **kw)


def cost_of(keys, items: dict) -> float:
    return sum(items[k].cost for k in keys)


def test_one_actor_per_gpu_scans_spread_by_cost(ray_cluster, data):
    summary = run_sweep(config(data, "even"))
    assert summary.ok and summary.items_done == 24
    assert summary.execution.actors == RAY_GPUS and summary.execution.device.endswith("(GPU cluster)")
    # a GPU each, but the model runs on the CPU since torch sees no CUDA device here
    assert sorted(w["gpu_ids"][0] for w in summary.execution.workers.values()) == ["0", "1", "2", "3"]
    assert all(w["device"] == "cpu" and len(w["gpu_ids"]) == 1 for w in summary.execution.workers.values())

    # every actor did work, and every item ran exactly once
    ran = [k for keys in summary.execution.ran.values() for k in keys]
    assert sorted(ran) == sorted(committed(data[2] / "even")) and len(set(ran)) == 24
    assert set(summary.execution.ran) == set(summary.execution.workers) and all(summary.execution.ran.values())

    # the initial assignment cuts the scan-ordered line into segments of equal cost counting the head loads
    # they imply: every actor gets a share, a few scans only, and at most scans + actors - 1 head loads
    from fnn_ray.stimuli import list_shards

    shards = {s.shard_id: s for s in list_shards(data[1], 2)}
    units = {(s, i): u for s, i, u in SCANS}
    items = {(s, i, sid): WorkItem(s, i, units[(s, i)], shards[sid])
             for keys in summary.execution.assigned.values() for s, i, sid in keys}
    assert len(items) == 24
    held = [{(s, i) for s, i, _ in keys} for keys in summary.execution.assigned.values()]
    costs = [cost_of(keys, items) + HEAD_LOAD_COST * len(h) for keys, h in zip(summary.execution.assigned.values(), held)]
    assert max(costs) <= 1.5 * min(costs), costs
    assert all(1 <= len(h) <= 2 for h in held) and sum(len(h) for h in held) <= len(SCANS) + RAY_GPUS - 1
    assert set().union(*held) == {(s, i) for s, i, _ in SCANS}

    table = read_responses(str(data[2] / "even"))
    assert len(table) == CLIPS * sum(u for *_, u in SCANS)
