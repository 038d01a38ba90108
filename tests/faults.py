"""Faults the tests inject into a run (production code has none): a worker that dies mid-item, workers that hold
their items until the test lets them go, and a pool that stops handing out work after a few items (a driver
that was stopped). All run on :class:`fnn_ray.pool.LocalPool`, in this process.

    config = SweepConfig(..., pool=local_pool(actors=2, crash_on="8-5/part-00000.000002-000004"))
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from typing import Any

from fnn_ray.job import PoolFactory
from fnn_ray.ledger import Ledger
from fnn_ray.plan import WorkItem
from fnn_ray.pool import LocalPool, Outcome, Pool, WorkerLost
from fnn_ray.worker import ItemResult, Task, Worker, WorkerOptions, item_label

#: How long a held item waits for the test to let it go before the test fails.
GATE_TIMEOUT_S = 300.0


@dataclasses.dataclass
class Faults:
    """Shared by the workers of one pool. ``crash_on``: the label (``"session-scan_idx/part_id"``) of the item
    whose first run kills its worker once the item is computed, before it is committed (a lost node); ``gate``:
    every item but the first ``free`` waits for this event before it is committed."""

    crash_on: str | None = None
    gate: threading.Event | None = None
    free: int = 0
    crashed: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def pass_free(self) -> bool:
        """True for the first ``free`` items that ask."""
        with self.lock:
            self.free -= 1
            return self.free >= 0


class _Guarded:
    """The job's reducer, with ``check(item)`` run first (on the worker's call thread, before the commit)."""

    def __init__(self, reducer: Any, check) -> None:
        self._reducer, self._check = reducer, check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reducer, name)

    def reduce(self, item: WorkItem, units: Any, pairs: Any) -> Any:
        self._check(item)
        return self._reducer.reduce(item, units, pairs)


class FaultyWorker(Worker):
    """A real :class:`fnn_ray.worker.Worker` subject to ``faults``; once dead, every item it holds is lost."""

    def __init__(self, options: WorkerOptions, faults: Faults) -> None:
        super().__init__(options)
        self.faults, self.dead = faults, False

    def run(self, item: WorkItem, task: Task) -> ItemResult:
        if self.dead:
            raise WorkerLost("worker is dead")
        return super().run(item, dataclasses.replace(task, reducer=_Guarded(task.reducer, self._check)))

    def _check(self, item: WorkItem) -> None:
        if self.faults.crash_on == item_label(item) and not self.faults.crashed:
            self.faults.crashed = self.dead = True
        if (self.faults.gate is not None and not self.faults.pass_free()
                and not self.faults.gate.wait(GATE_TIMEOUT_S)):
            raise AssertionError(f"the test never let {item_label(item)} go")
        if self.dead:
            raise WorkerLost(f"worker died running {item_label(item)}")


class StopAfter:
    """``pool`` handing out only its first ``n`` items; once they are done the run is stopped (KeyboardInterrupt,
    as a stopped driver): what was committed stays, a rerun resumes."""

    def __init__(self, pool: Pool, n: int) -> None:
        self.pool, self.left, self.held = pool, n, Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def submit(self, name: str, item: WorkItem) -> None:
        if self.left > 0:
            self.left -= 1
            self.pool.submit(name, item)
        else:
            self.held[name] += 1

    def in_flight(self, name: str) -> int:
        return self.pool.in_flight(name) + self.held[name]

    def wait(self, timeout_s: float) -> Outcome | None:
        if +self.held and not any(self.pool.in_flight(n) for n in list(self.pool.workers)):
            raise KeyboardInterrupt("stopped by the test")
        return self.pool.wait(timeout_s)


def local_pool(actors: int = 2, crash_on: str | None = None, gate: threading.Event | None = None, free: int = 0,
               stop_after: int | None = None) -> PoolFactory:
    """A :data:`fnn_ray.job.PoolFactory` of ``actors`` in-process :class:`FaultyWorker` s (see :class:`Faults`),
    handing out only ``stop_after`` items when given (:class:`StopAfter`)."""
    faults = Faults(crash_on=crash_on, gate=gate, free=free)

    def make(options: WorkerOptions, task: Task) -> Pool:
        # one torch thread per worker, as the Ray workers of the tests get: bit-identical results
        pool = LocalPool(dataclasses.replace(options, threads=1), task, actors=actors,
                         worker=lambda o: FaultyWorker(o, faults))
        return pool if stop_after is None else StopAfter(pool, stop_after)

    return make


def wait_for(condition, what: str, timeout_s: float = 300.0, poll_s: float = 0.05) -> None:
    """Poll ``condition()`` until it is true; fail the test naming ``what`` after a generous ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def committed(output_url: str, storage_options=None, data_dir: str = "responses") -> set:
    """The keys of the items committed (intact) under ``output_url``: what a run left behind."""
    return {c.key for c in Ledger(output_url, storage_options).committed_files(data_dir)}
