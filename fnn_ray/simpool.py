"""A :class:`fnn_ray.pool.Pool` of simulated workers in simulated time, for ``jobs.simulate``.

Time is counted in core-frames of a speed-1.0 worker (:mod:`fnn_ray.plan`). A simulated worker models a real one
as the executor drives it: an item's data arrives ``fetch(item)`` after it is handed out (hidden behind the
computing item when it was prefetched); the first item of a scan the worker has not loaded yet costs
``head_load_cost`` before computing (loaded heads stay); computing takes ``cost / speed`` with the worker's speed
over time (:class:`SpeedProfile`); items compute one at a time in the order they were handed out. A worker may
die at ``fail_at`` (its items are lost, the partial work wasted) and a replacement joins from a list of spares.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fnn_ray.plan import Scan, WorkItem
from fnn_ray.pool import Outcome, Tracked, WorkerLost
from fnn_ray.worker import ItemResult

__all__ = ["SimPool", "SimWorker", "SpeedProfile"]


class SpeedProfile:
    """Piecewise-constant speed over time: ``[(t0, speed0), (t1, speed1), ...]`` with ``t0 == 0``."""

    def __init__(self, steps: Sequence[tuple[float, float]]):
        steps = sorted(steps)
        if not steps or steps[0][0] != 0.0 or any(s <= 0 for _, s in steps):
            raise ValueError("a profile starts at t=0 and has positive speeds")
        self.steps = list(steps)

    @property
    def max_speed(self) -> float:
        return max(s for _, s in self.steps)

    def _pieces(self, start: float):
        """Yield (t_from, t_to, speed) from ``start`` on."""
        for (t0, s), nxt in zip(self.steps, self.steps[1:] + [(math.inf, 0.0)]):
            if nxt[0] > start:
                yield max(t0, start), nxt[0], s

    def finish(self, start: float, work: float) -> float:
        """Time at which ``work`` started at ``start`` is done."""
        for t0, t1, s in self._pieces(start):
            if (t1 - t0) * s >= work:
                return t0 + work / s
            work -= (t1 - t0) * s
        raise AssertionError("unreachable: the last piece is infinite")

    def capacity(self, start: float, stop: float) -> float:
        """Work this profile can do in ``[start, stop]``."""
        total = 0.0
        for t0, t1, s in self._pieces(start):
            if t0 >= stop:
                break
            total += (min(t1, stop) - t0) * s
        return total


@dataclass
class SimWorker:
    """One simulated worker: its speed over time, when it can start (a replacement: when it has joined), and
    when (if ever) it dies."""

    name: str
    profile: SpeedProfile
    join_at: float = 0.0
    fail_at: float | None = None


@dataclass
class _Running:
    spec: SimWorker
    slots: list[tuple[int, WorkItem, float]] = field(default_factory=list)  # (handle, item, data ready at)
    computing_since: float | None = None
    loaded: set[Scan] = field(default_factory=set)


class SimPool(Tracked):
    """``workers`` in simulated time; ``spares`` join (in order, from their ``join_at``) when the executor
    replaces a dead worker. ``fetch(item)``: when an item's data arrives after it is handed out. Records
    ``head_loads``, ``wasted`` work of dead workers and ``makespan`` (the last completion)."""

    def __init__(self, workers: Sequence[SimWorker], fetch: Callable[[WorkItem], float], head_load_cost: float,
                 spares: Sequence[SimWorker] = ()) -> None:
        super().__init__()
        self.specs, self.spares, self.fetch, self.head_load_cost = list(workers), list(spares), fetch, head_load_cost
        self.running: dict[str, _Running] = {}
        self.events: list[tuple[float, int, str, str, int]] = []  # (time, seq, kind, worker, handle)
        self.seq = itertools.count()
        self.now = self.makespan = self.wasted = 0.0
        self.head_loads = 0

    def clock(self) -> float:
        return self.now

    def _join(self, spec: SimWorker) -> str:
        self.running[spec.name] = _Running(spec)
        self.workers[spec.name] = {"device": "sim"}
        if spec.fail_at is not None:
            heapq.heappush(self.events, (spec.fail_at, next(self.seq), "fail", spec.name, -1))
        return spec.name

    def start(self, n: int) -> list[str]:
        names = [self._join(spec) for spec in self.specs[:n]]
        self.describe("simulated")
        return names

    def _begin(self, run: _Running) -> None:
        """Start computing the first handed-out item of an idle worker."""
        handle, item, ready = run.slots[0]
        begin = max(self.now, ready, run.spec.join_at)
        if item.scan not in run.loaded:
            begin += self.head_load_cost
            run.loaded.add(item.scan)
            self.head_loads += 1
        run.computing_since = begin
        heapq.heappush(self.events, (run.spec.profile.finish(begin, item.cost), next(self.seq), "done",
                                     run.spec.name, handle))

    def submit(self, name: str, item: WorkItem) -> None:
        handle, run = next(self.seq), self.running[name]
        self.track(handle, name, item)
        run.slots.append((handle, item, self.now + self.fetch(item)))
        if run.computing_since is None:
            self._begin(run)

    def wait(self, timeout_s: float) -> Outcome | None:
        deadline = self.now + timeout_s
        while self.events and self.events[0][0] <= deadline:
            t, _, kind, name, handle = heapq.heappop(self.events)
            run = self.running.get(name)
            if run is None or (kind == "done" and handle not in self.pending):
                continue  # an event of a worker dropped meanwhile
            self.now = t
            if kind == "fail":
                if run.computing_since is not None and t > run.computing_since:
                    self.wasted += run.spec.profile.capacity(run.computing_since, t)
                return name, run.slots[0][1] if run.slots else None, WorkerLost(f"{name} failed at t={t:.0f}")
            _, item = self.untrack(handle)
            started = run.computing_since
            run.slots.pop(0)
            run.computing_since = None
            self.makespan = t
            if run.slots:
                self._begin(run)
            return name, item, ItemResult(key=item.key, file="", clips=0, frames=item.frames, units=item.units,
                                          rows=0, seconds=t - started, timings={"compute": t - started},
                                          device="sim")
        if math.isfinite(deadline):
            self.now = deadline
        return None

    def replace(self, name: str, spawn: bool) -> str | None:
        self.drop(name)
        del self.running[name]
        if not (spawn and self.spares):
            return None
        spare = self.spares.pop(0)
        spare.join_at = max(spare.join_at, self.now)
        return self._join(spare)

    def close(self, ok: bool) -> None:
        self.running.clear()
        self.pending.clear()
        self.counts.clear()
