"""The one loop that runs every job's items on Ray actors: hand out, collect, retry, replace, report.

:func:`execute` drives the pure :class:`fnn_ray.scheduler.Scheduler` over a :class:`fnn_ray.pool.WorkerPool`:
``IN_FLIGHT`` items per actor (one computing, one reading or writing), a ``ray.wait`` loop; a dead actor's items go
back to the others and a replacement joins (bounded); an item that failed on a store fault is resubmitted after an
exponential backoff until ``store_timeout_s`` has passed since its first fault; other errors are retried
``max_retries`` times, data errors never. It knows nothing of what the items compute (that is the :class:`Task`).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fnn_ray import storage
from fnn_ray.plan import WorkItem
from fnn_ray.pool import WorkerPool
from fnn_ray.progress import Progress
from fnn_ray.scheduler import Scheduler
from fnn_ray.worker import ItemResult, Task, item_label

__all__ = ["DATA_ERRORS", "Execution", "Faults", "execute"]

Key = tuple[int, int, str]

#: Exceptions of an item that retrying cannot fix: bad or missing data, a bad release.
DATA_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError)

#: In-flight items per actor: one computing, one being read or written.
IN_FLIGHT = 2


@dataclass(frozen=True)
class Faults:
    """Test-only fault injection: stop handing out work after ``max_items`` items (as if the driver died);
    ``crash_on`` (``"session-scan_idx/item_id"``) makes the actor that first runs that item exit abruptly;
    ``actor_delay_s`` maps an initial actor's index to extra seconds per item (a slow device)."""

    max_items: int | None = None
    crash_on: str | None = None
    actor_delay_s: dict[int, float] = field(default_factory=dict)


@dataclass
class Execution:
    """What :func:`execute` did: counts, failures (one line each), per-actor assignments and runs, worker info,
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
    stopped_early: bool = False


def _cause(error: BaseException) -> BaseException:
    """The exception an item raised inside a worker (unwrapped from Ray's RayTaskError)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def _message(item: WorkItem, cause: BaseException, attempts: int) -> str:
    """One line per failed item: the worker's message names the item, file, row and clip."""
    text = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
    if not text.startswith("item "):
        text = f"item {item_label(item)} ({item.part.where}): {type(cause).__name__}: {text}"
    if attempts > 1:
        text += f" (after {attempts} attempts)"
    return text


def execute(items: list[WorkItem], task: Task, pool: WorkerPool, n_actors: int, kind: str, *,
            head_load_cost: float, max_retries: int, max_actor_restarts: int, start_timeout_s: float,
            progress: Progress, on_commit: Callable[[ItemResult], None], faults: Faults = Faults()) -> Execution:
    """Run ``items`` of ``task`` on ``n_actors`` workers of ``pool``; ``on_commit`` is called (on this thread) for
    each committed item. Returns what happened; raises KeyboardInterrupt (after killing the workers) when
    interrupted."""
    import ray

    run = Execution()
    started = pool.start(n_actors, timeout_s=start_timeout_s)
    names = [f"actor-{i}" for i in range(n_actors)]
    handles: dict[str, Any] = {name: handle for name, (handle, _) in zip(names, started)}
    delays = {name: float(faults.actor_delay_s.get(i, 0.0)) for i, name in enumerate(names)}
    devices = Counter(info["device"] for _, info in started)
    run.workers = {name: info for name, (_, info) in zip(names, started)}
    run.actors = n_actors
    run.device = ", ".join(f"{n}x {d}" for d, n in devices.items()) + f" ({kind} cluster)"
    progress.write(f"{n_actors} worker(s) on {run.device}")

    ready_at = time.perf_counter()
    scheduler = Scheduler(items, names, head_load_cost, clock=time.monotonic)
    run.assigned = {n: [i.key for i in scheduler.queue_of(n)] for n in names}
    ran: dict[str, list[Key]] = {}
    inflight: dict[Any, tuple[str, WorkItem]] = {}  # object ref -> (actor, item)
    delayed: list[tuple[float, str, WorkItem]] = []  # (resubmit at, actor, item) after a store fault
    attempts: Counter[Key] = Counter()
    first_fault: dict[Key, float] = {}
    timings: Counter[str] = Counter()
    state = {"crashed": False, "handed_out": 0, "store_down": False}
    completed = False

    def submit(name: str, item: WorkItem) -> None:
        crash = faults.crash_on is not None and not state["crashed"] and item_label(item) == faults.crash_on
        state["crashed"] = state["crashed"] or crash
        inflight[handles[name].run.remote(item, task, delays.get(name, 0.0), crash)] = (name, item)

    def busy(name: str) -> int:
        return sum(1 for n, _ in inflight.values() if n == name) + sum(1 for _, n, _ in delayed if n == name)

    def top_up() -> None:
        if state["store_down"]:
            return
        for name in scheduler.actors:
            while busy(name) < IN_FLIGHT:
                if faults.max_items is not None and state["handed_out"] >= faults.max_items:
                    run.stopped_early = True
                    return
                item = scheduler.next_item(name)
                if item is None:
                    break
                state["handed_out"] += 1
                submit(name, item)

    def actor_died(name: str, error: BaseException) -> None:
        for ref in [r for r, (n, _) in inflight.items() if n == name]:
            del inflight[ref]
        delayed[:] = [d for d in delayed if d[1] != name]
        lost = scheduler.fail_actor(name)
        ray.kill(handles.pop(name), no_restart=True)
        progress.write(f"worker {name} died ({type(error).__name__}); {len(lost)} item(s) requeued")
        if run.actor_restarts < max_actor_restarts:
            run.actor_restarts += 1
            new = f"actor-r{run.actor_restarts}"
            handles[new] = pool.spawn()
            scheduler.add_actor(new)

    def fail(name: str, item: WorkItem, cause: BaseException) -> None:
        scheduler.complete(name, item)
        run.failed += 1
        if isinstance(cause, storage.StoreUnavailable) or storage.is_transient(cause):
            run.store_failures += 1
            state["store_down"] = True  # an outage is not an item's fault: hand out nothing more
        run.failures.append(_message(item, cause, attempts[item.key]))
        progress.write(f"FAILED {run.failures[-1]}")
        progress.update(item.frames, failed=True)

    def failed_attempt(name: str, item: WorkItem, cause: BaseException) -> None:
        attempts[item.key] += 1
        now = time.monotonic()
        if isinstance(cause, DATA_ERRORS) or isinstance(cause, storage.StoreUnavailable):
            fail(name, item, cause)
        elif storage.is_transient(cause):
            first = first_fault.setdefault(item.key, now)
            if now - first >= task.store_timeout_s:
                fail(name, item, storage.StoreUnavailable(
                    f"store unreachable for {now - first:.0f} s: {type(cause).__name__}: {cause}; "
                    f"rerun when it is back", what=item_label(item)))
            else:
                backoff = random.uniform(0, min(30.0, 0.5 * 2 ** min(attempts[item.key], 6)))
                run.retries += 1
                delayed.append((now + backoff, name, item))
        elif attempts[item.key] > max_retries:
            fail(name, item, cause)
        else:
            run.retries += 1
            progress.write(f"retrying {item_label(item)} after {type(cause).__name__}: {cause}")
            submit(name, item)  # same actor; the scheduler still counts it in flight there

    try:
        top_up()
        while inflight or delayed:
            now = time.monotonic()
            for entry in [d for d in delayed if d[0] <= now]:
                delayed.remove(entry)
                if entry[1] in handles:
                    submit(entry[1], entry[2])
            if not inflight:
                time.sleep(max(0.0, min(d[0] for d in delayed) - time.monotonic()) if delayed else 0)
                continue
            wait_s = max(0.05, min(d[0] for d in delayed) - now) if delayed else 1.0
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait_s)
            progress.tick()
            if not ready:
                continue
            name, item = inflight.pop(ready[0])
            try:
                result: ItemResult = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                inflight[ready[0]] = (name, item)  # actor_died drops every ref of the actor
                actor_died(name, e)
            except ray.exceptions.RayError as e:
                failed_attempt(name, item, _cause(e))
            else:
                scheduler.complete(name, item)
                run.done += 1
                run.scan_frames += result.scan_frames
                ran.setdefault(name, []).append(item.key)
                timings.update(result.timings)
                run.peak_memory_mb = max(run.peak_memory_mb, result.peak_memory_mb)
                run.bytes_read += result.bytes_read
                run.frame_bytes += result.frame_bytes
                on_commit(result)
                progress.update(result.scan_frames)
            top_up()
        pending = scheduler.pending
        if pending and state["store_down"]:
            run.failures.append(f"store unreachable for {task.store_timeout_s:.0f} s: {pending} more item(s) not "
                                f"attempted; rerun when it is back")
        elif pending and not run.stopped_early:
            run.failures.append(f"no live worker left after {run.actor_restarts} restart(s): {pending} item(s) not "
                                f"computed; rerun to finish them")
        completed = True
    finally:
        run.compute_s = time.perf_counter() - ready_at
        if completed:
            pool.finish(list(handles.values()))
        else:  # interrupted: results may still be on their way; don't hand these workers to another job
            for handle in handles.values():
                ray.kill(handle, no_restart=True)
        run.steals, run.requeued = scheduler.steals, scheduler.requeued
        run.ran = ran
        run.timings = dict(timings)
    return run
