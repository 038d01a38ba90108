"""The one loop that runs every job's items on a :class:`fnn_ray.pool.Pool`: hand out, collect, retry, replace.

:func:`execute` asks the pure :class:`fnn_ray.scheduler.Scheduler` what each worker runs next and keeps
:data:`fnn_ray.pool.IN_FLIGHT` items per worker (one computing, one reading or writing); it knows nothing of what
an item computes nor where it runs (Ray actors, threads of this process, simulated workers). A lost worker's items
go back to the others and a replacement joins (bounded); what happens to an item that raised is
:func:`decide`'s call: a pure function of the error, the attempts and the time since the item's first fault.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fnn_ray import storage
from fnn_ray.plan import Key, WorkItem
from fnn_ray.pool import IN_FLIGHT, Pool, WorkerLost
from fnn_ray.progress import Progress
from fnn_ray.scheduler import Scheduler
from fnn_ray.worker import ItemResult, item_label

__all__ = ["DATA_ERRORS", "Execution", "Fail", "Policy", "Resubmit", "RetryAt", "decide", "execute"]

#: Exceptions of an item that retrying cannot fix: bad or missing data, a bad release.
DATA_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError)


@dataclass(frozen=True)
class Policy:
    """When to give up: ``max_retries`` retries after an ordinary error; store faults are ridden out for
    ``store_timeout_s`` since the item's first fault, waiting ``jitter(min(backoff_cap_s, backoff_base_s *
    2**attempts))`` before each retry (full jitter); at most ``max_actor_restarts`` replacement workers. The loop
    wakes at least every ``tick_s`` seconds of the pool's clock (progress lines) while nothing comes back."""

    max_retries: int = 2
    max_actor_restarts: int = 4
    store_timeout_s: float = 300.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    jitter: Callable[[float], float] = field(default=lambda cap: random.uniform(0.0, cap), repr=False)
    tick_s: float = 1.0


@dataclass(frozen=True)
class Fail:
    """Give the item up with ``error``."""

    error: BaseException


@dataclass(frozen=True)
class RetryAt:
    """Submit the item again to the same worker at time ``at`` (a store fault: let the store recover)."""

    at: float


@dataclass(frozen=True)
class Resubmit:
    """Submit the item again to the same worker now."""


def decide(cause: BaseException, attempts: int, first_fault: float, now: float, policy: Policy
           ) -> Fail | RetryAt | Resubmit:
    """What to do with an item whose ``attempts``-th attempt raised ``cause`` at ``now`` (its first fault was at
    ``first_fault``): data errors and a store already given up on fail at once; store faults are retried after a
    backoff until ``policy.store_timeout_s`` has passed since the first fault; anything else is resubmitted
    ``policy.max_retries`` times."""
    if isinstance(cause, DATA_ERRORS) or isinstance(cause, storage.StoreUnavailable):
        return Fail(cause)
    if storage.is_transient(cause):
        if now - first_fault >= policy.store_timeout_s:
            return Fail(storage.StoreUnavailable(f"store unreachable for {now - first_fault:.0f} s: "
                                                 f"{type(cause).__name__}: {cause}; rerun when it is back",
                                                 what="an item"))
        return RetryAt(now + policy.jitter(min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** min(attempts, 6))))
    return Fail(cause) if attempts > policy.max_retries else Resubmit()


@dataclass
class Execution:
    """What :func:`execute` did: counts, failures (one line each), per-worker assignments and runs, worker info,
    summed phase timings of committed items, the largest worker peak memory and stimulus bytes read."""

    done: int = 0
    failed: int = 0
    scan_frames: int = 0
    compute_s: float = 0.0
    actors: int = 0
    device: str = "-"
    actor_restarts: int = 0
    steals: int = 0
    requeued: int = 0
    retries: int = 0
    failures: list[str] = field(default_factory=list)
    store_failures: int = 0
    assigned: dict[str, list[Key]] = field(default_factory=dict)
    ran: dict[str, list[Key]] = field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    bytes_read: int = 0
    frame_bytes: int = 0

    def record(self, name: str, item: WorkItem, result: ItemResult) -> None:
        """Count one committed item."""
        self.done += 1
        self.scan_frames += result.scan_frames
        self.ran.setdefault(name, []).append(item.key)
        for phase, seconds in result.timings.items():
            self.timings[phase] = self.timings.get(phase, 0.0) + seconds
        self.peak_memory_mb = max(self.peak_memory_mb, result.peak_memory_mb)
        self.bytes_read += result.bytes_read
        self.frame_bytes += result.frame_bytes


def _message(item: WorkItem, cause: BaseException, attempts: int) -> str:
    """One line per failed item: the worker's message names the item, file, row and clip."""
    text = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
    if not text.startswith("item "):
        text = f"item {item_label(item)} ({item.part.where}): {type(cause).__name__}: {text}"
    return text + (f" (after {attempts} attempts)" if attempts > 1 else "")


class Loop:
    """What the loop holds between two outcomes: the pool, the scheduler, the policy, the record so far
    (:class:`Execution`), items waiting out a store fault ``(at, worker, item)``, attempts and first-fault times
    per item, and whether the store is down (then nothing more is handed out)."""

    def __init__(self, pool: Pool, scheduler: Scheduler, policy: Policy, progress: Progress) -> None:
        self.pool, self.scheduler, self.policy, self.progress = pool, scheduler, policy, progress
        self.run = Execution(assigned={n: [i.key for i in scheduler.queue_of(n)] for n in scheduler.actors})
        self.delayed: list[tuple[float, str, WorkItem]] = []
        self.attempts: Counter[Key] = Counter()
        self.first_fault: dict[Key, float] = {}
        self.store_down = False

    def busy(self) -> bool:
        return bool(self.delayed) or any(self.pool.in_flight(name) for name in self.scheduler.actors)

    def held(self, name: str) -> int:
        return self.pool.in_flight(name) + sum(1 for _, n, _ in self.delayed if n == name)

    def top_up(self, reported: str | None = None) -> None:
        """Fill the free slots of ``reported`` (None: of every worker) and of idle workers."""
        for name in [] if self.store_down else self.scheduler.actors:
            if reported in (None, name) or not self.held(name):
                while (self.scheduler.queued and self.held(name) < IN_FLIGHT
                       and (item := self.scheduler.next_item(name)) is not None):
                    self.pool.submit(name, item)

    def resubmit_due(self) -> float:
        """Hand back the items whose back-off is over; return how long to wait for an outcome."""
        now = self.pool.clock()
        for entry in [d for d in self.delayed if d[0] <= now]:
            self.delayed.remove(entry)
            self.pool.submit(entry[1], entry[2])
        return max(0.05, min(d[0] for d in self.delayed) - now) if self.delayed else self.policy.tick_s

    def lost(self, name: str, error: BaseException) -> None:
        """``name`` died: its items go back to the others; a replacement joins while restarts are left."""
        self.delayed = [d for d in self.delayed if d[1] != name]
        requeued = self.scheduler.fail_actor(name)
        new = self.pool.replace(name, spawn=self.run.actor_restarts < self.policy.max_actor_restarts)
        self.progress.write(f"worker {name} died ({error}); {len(requeued)} item(s) requeued")
        if new is not None:
            self.run.actor_restarts += 1
            self.scheduler.add_actor(new)

    def failed(self, name: str, item: WorkItem, cause: BaseException) -> None:
        """An attempt of ``item`` on ``name`` raised ``cause``: as :func:`decide` says."""
        now = self.pool.clock()
        self.attempts[item.key] += 1
        action = decide(cause, self.attempts[item.key], self.first_fault.setdefault(item.key, now), now, self.policy)
        if isinstance(action, Fail):
            return self.fail(name, item, action.error)
        self.run.retries += 1
        if isinstance(action, RetryAt):
            self.delayed.append((action.at, name, item))
        else:
            self.progress.write(f"retrying {item_label(item)} after {type(cause).__name__}: {cause}")
            self.pool.submit(name, item)  # same worker: the scheduler still counts it in flight there

    def fail(self, name: str, item: WorkItem, error: BaseException) -> None:
        self.scheduler.complete(name, item)
        self.run.failed += 1
        if isinstance(error, storage.StoreUnavailable) or storage.is_transient(error):
            self.run.store_failures += 1
            self.store_down = True  # an outage is not an item's fault: hand out nothing more
        self.run.failures.append(_message(item, error, self.attempts[item.key]))
        self.progress.write(f"FAILED {self.run.failures[-1]}")
        self.progress.update(item.frames, failed=True)

    def finish(self, started: float) -> Execution:
        """The record, with a line for what is left (the store went down, or no worker is left)."""
        run, pending = self.run, self.scheduler.pending
        if pending:
            run.failures.append(
                f"store unreachable for {self.policy.store_timeout_s:.0f} s: {pending} more item(s) not attempted; "
                f"rerun when it is back" if self.store_down else f"no live worker left after {run.actor_restarts} "
                f"restart(s): {pending} item(s) not computed; rerun to finish them")
        run.compute_s, run.steals, run.requeued = self.pool.clock() - started, self.scheduler.steals, \
            self.scheduler.requeued
        return run


def execute(items: list[WorkItem], pool: Pool, scheduler: Scheduler, on_result: Callable[[ItemResult], None], *,
            policy: Policy = Policy(), progress: Progress | None = None) -> Execution:
    """Run ``items`` on the started ``pool`` as ``scheduler`` (built over the pool's workers) places them;
    ``on_result`` is called on this thread for each committed item. The caller closes the pool."""
    started = pool.clock()
    loop = Loop(pool, scheduler, policy, progress or Progress(len(items), 0, enabled=False))
    loop.top_up()
    while loop.busy():
        outcome = pool.wait(loop.resubmit_due())
        loop.progress.tick()
        if outcome is None:
            continue
        name, item, result = outcome
        if isinstance(result, WorkerLost):
            loop.lost(name, result)
            name = None  # every worker may take over its items
        elif isinstance(result, BaseException):
            loop.failed(name, item, result)
        else:
            scheduler.complete(name, item)
            loop.run.record(name, item, result)
            on_result(result)
            loop.progress.update(result.scan_frames)
        loop.top_up(name)
    return loop.finish(started)
