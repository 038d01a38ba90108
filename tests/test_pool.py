"""Pools: the contract every :class:`fnn_ray.pool.Pool` keeps (on stand-in workers), and Ray start-up of a job
outside a cluster: a private local instance that advertises only the loopback address."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from faults import wait_for

from fnn_ray import pool
from fnn_ray.plan import WorkItem
from fnn_ray.pool import LocalPool
from fnn_ray.simpool import SimPool, SimWorker, SpeedProfile
from fnn_ray.stimuli import Shard
from fnn_ray.worker import ItemResult, WorkerOptions

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_private_local_ray_is_on_loopback():
    script = ("import ray; from fnn_ray.pool import init_ray\n"
              "assert init_ray()\n"
              "@ray.remote\n"
              "def where(): return ray.util.get_node_ip_address()\n"
              "print(sorted({n['NodeManagerAddress'] for n in ray.nodes()}), ray.get(where.remote()))\n"
              "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['127.0.0.1'] 127.0.0.1"
    assert "Token authentication is enabled" not in proc.stderr  # our private instance's start is quiet


class SlowRay:
    """Stands in for ``ray`` whose first ``fail`` starts time out as on a loaded machine: each leaves a process
    behind, as a half-started node does (Ray's own start is exercised by the test above)."""

    def __init__(self, fail: int) -> None:
        self.fail, self.calls, self.left = fail, 0, []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        self.calls += 1
        if self.calls <= self.fail:
            self.left.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
            raise Exception("The current node timed out during startup. This could happen because some of the "
                            "raylet failed to startup or the GCS has become overloaded.")


@pytest.mark.parametrize("fail", [1, pool.LOCAL_STARTS], ids=["then-up", "never-up"])
def test_a_local_ray_that_times_out_is_started_again(monkeypatch, caplog, fail):
    import ray

    fake = SlowRay(fail)
    for name in ("init", "is_initialized"):
        monkeypatch.setattr(ray, name, getattr(fake, name))
    monkeypatch.setattr(pool, "use_private_token", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if fail < pool.LOCAL_STARTS:
        assert pool.init_ray() is True
    else:
        with pytest.raises(RuntimeError, match=f"did not come up in {pool.LOCAL_STARTS} tries .*--address"):
            pool.init_ray()
    assert fake.calls == min(fail + 1, pool.LOCAL_STARTS)
    for process in fake.left:  # every failed start's processes were stopped before the next one
        wait_for(lambda: process.poll() is not None, "a failed start's process to be stopped")
    assert sum("starting it again" in r.getMessage() for r in caplog.records) == min(fail, pool.LOCAL_STARTS - 1)


# ------------------------------------------------------------------------------------------ the Pool contract
class Echo:
    """A stand-in worker: an item's result names the item; items of part ``bad`` raise ValueError."""

    def __init__(self, options) -> None:
        self.options = options

    def ready(self) -> dict:
        return {"device": "cpu"}

    def run(self, item, task):
        if item.part.part_id.startswith("bad"):
            raise ValueError(f"item {item.key}: bad")
        return ItemResult(key=item.key, file="", clips=1, frames=item.frames, units=item.units, rows=1, seconds=0.0,
                          timings={}, device="cpu")


def _items(*ids: str) -> list[WorkItem]:
    return [WorkItem(4, 7, 3, Shard("mem://s", "s/p.parquet", i, i + 1, (f"c{i}",), 5, file=part))
            for i, part in enumerate(ids)]


def _local() -> LocalPool:
    return LocalPool(WorkerOptions(release_url="unused"), task=None, actors=2, worker=Echo)


def _sim() -> SimPool:
    workers = [SimWorker(f"w{i}", SpeedProfile([(0.0, 1.0)])) for i in range(2)]
    return SimPool(workers, lambda item: 1.0, head_load_cost=1.0, spares=[SimWorker("s0", SpeedProfile([(0.0, 1.0)]))])


@pytest.mark.parametrize("make", [_local, _sim], ids=["local", "sim"])
def test_pool_contract(make):
    pool = make()
    names = pool.start(5)
    assert len(names) == 2 and set(pool.workers) == set(names) and pool.description != "-"
    items = _items("a", "b", "c")
    for item, name in zip(items, [names[0], names[0], names[1]]):
        pool.submit(name, item)
    assert (pool.in_flight(names[0]), pool.in_flight(names[1])) == (2, 1)
    outcomes = []
    wait_for(lambda: outcomes.append(pool.wait(5.0)) or len([o for o in outcomes if o]) == 3, "three outcomes")
    got = {(name, item.key, result.key) for name, item, result in filter(None, outcomes)}
    assert got == {(n, i.key, i.key) for i, n in zip(items, [names[0], names[0], names[1]])}
    assert pool.in_flight(names[0]) == pool.in_flight(names[1]) == 0
    before = pool.clock()
    assert pool.wait(0.01) is None and pool.clock() >= before  # nothing in flight: None after the timeout
    new = pool.replace(names[1], spawn=True)
    assert new not in (None, *names) and new in pool.workers and names[1] not in pool.workers
    assert pool.replace(names[0], spawn=False) is None and names[0] not in pool.workers
    pool.close(ok=True)


def test_local_pool_reports_an_items_exception_as_its_outcome():
    pool = _local()
    name = pool.start(1)[0]
    (item,) = _items("bad")
    pool.submit(name, item)
    outcomes = []
    wait_for(lambda: outcomes.append(pool.wait(5.0)) or any(outcomes), "the outcome")
    (outcome,) = filter(None, outcomes)
    assert outcome[:2] == (name, item) and isinstance(outcome[2], ValueError) and "bad" in str(outcome[2])
    pool.close(ok=True)
