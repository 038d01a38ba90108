"""Where a job's items run: the :class:`Pool` protocol the executor drives, and its placements.

* :class:`Pool`: ``start`` workers, ``submit`` an item to one, ``wait`` for the next outcome, count what a worker
  has ``in_flight``, ``replace`` a dead one, ``close``; plus the pool's ``clock`` (simulated time for a simulated
  pool). The pool owns the in-flight bookkeeping; the executor only decides what goes where.
* :class:`RayPool`: :class:`fnn_ray.worker.Worker` actors on a Ray cluster (:func:`init_ray`,
  :func:`cluster_plan`), idle ones kept for reuse in this process;
* :class:`LocalPool`: workers in this process, each on its own two threads (tests, a laptop with one GPU);
* :class:`fnn_ray.simpool.SimPool`: simulated workers in simulated time (``jobs.simulate``).

A worker that died (its process, its node) is reported as a :class:`WorkerLost` outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Protocol

from fnn_ray.plan import WorkItem
from fnn_ray.ray_token import use_private_token
from fnn_ray.worker import ItemResult, Task, Worker, WorkerOptions

log = logging.getLogger(__name__)

__all__ = ["IN_FLIGHT", "LocalPool", "Outcome", "Pool", "RayPool", "WorkerLost", "cluster_plan", "init_ray",
           "shutdown_ray"]

#: In-flight items per worker: one computing, one being read or written.
IN_FLIGHT = 2
#: torch's OpenMP threads sleep between parallel regions instead of spinning (``PASSIVE``, unless this process has
#: its own setting): spinning threads of CPU workers that share cores starve each other (docs/performance.md).
WAIT_POLICY = "OMP_WAIT_POLICY"

#: What :meth:`Pool.wait` returns: (worker, item, its result or the exception it raised). The item is None for a
#: :class:`WorkerLost` of a worker that had nothing in flight.
Outcome = tuple[str, "WorkItem | None", "ItemResult | BaseException"]


class WorkerLost(RuntimeError):
    """A worker died (its process or its node): every item it held is lost and goes back to the others."""


class Pool(Protocol):
    """The placement the executor runs items on (see the module docstring). ``description`` says where the
    workers run (after :meth:`start`); ``workers`` maps each started worker to what it reported on start."""

    description: str
    workers: dict[str, dict[str, Any]]

    def start(self, n: int) -> list[str]:
        """Start up to ``n`` workers (the pool's own size bounds it); return their names. RuntimeError (one line)
        when they cannot start."""

    def submit(self, name: str, item: WorkItem) -> None:
        """Hand ``item`` to worker ``name`` (returns at once)."""

    def wait(self, timeout_s: float) -> Outcome | None:
        """The next outcome of a submitted item, or None after ``timeout_s`` seconds without one."""

    def in_flight(self, name: str) -> int:
        """Items submitted to ``name`` whose outcome has not been returned yet."""

    def replace(self, name: str, spawn: bool) -> str | None:
        """Drop worker ``name`` and whatever it held; with ``spawn`` start a new worker, returning its name."""

    def close(self, ok: bool) -> None:
        """The run is over (``ok``: normally; else interrupted: stop every worker at once)."""

    def clock(self) -> float:
        """Seconds on this pool's clock (monotonic; simulated for a simulated pool)."""


class Tracked:
    """The bookkeeping every pool shares: worker names (``actor-0``..., replacements ``actor-r1``...) and the
    outcome handles in flight, each with its (worker, item)."""

    def __init__(self) -> None:
        self.description = "-"
        self.workers: dict[str, dict[str, Any]] = {}
        self.pending: dict[Any, tuple[str, WorkItem]] = {}  # handle -> (worker, item)
        self.counts: Counter[str] = Counter()  # worker -> handles in flight
        self.replaced = 0

    def in_flight(self, name: str) -> int:
        return self.counts[name]

    def track(self, handle: Any, name: str, item: WorkItem) -> None:
        self.pending[handle] = (name, item)
        self.counts[name] += 1

    def untrack(self, handle: Any) -> tuple[str, WorkItem]:
        name, item = self.pending.pop(handle)
        self.counts[name] -= 1
        return name, item

    def drop(self, name: str) -> None:
        """Forget worker ``name`` and its handles in flight."""
        for handle in [h for h, (n, _) in self.pending.items() if n == name]:
            del self.pending[handle]
        self.counts.pop(name, None)
        self.workers.pop(name, None)

    def new_name(self) -> str:
        self.replaced += 1
        return f"actor-r{self.replaced}"

    def describe(self, kind: str) -> None:
        counts: dict[str, int] = {}
        for info in self.workers.values():
            counts[info["device"]] = counts.get(info["device"], 0) + 1
        self.description = ", ".join(f"{n}x {d}" for d, n in counts.items()) + f" ({kind})"

    @staticmethod
    def clock() -> float:
        return time.monotonic()


# ------------------------------------------------------------------------------------------------------ Ray
#: Tries at starting a private local Ray: Ray gives its raylet a fixed 30 s to register, which a loaded machine can
#: miss ("The current node timed out during startup"); the half-started node's processes are stopped before the
#: next try.
LOCAL_STARTS = 3
_NOT_STARTED = "timed out during startup"


def init_ray(address: str | None = None, **kwargs: Any) -> bool:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start a private local Ray on
    127.0.0.1 with no dashboard (up to ``LOCAL_STARTS`` tries; RuntimeError, one line, when none comes up).
    Returns True when this call started a local instance (the caller shuts it down). No-op (False) when Ray is
    initialised already."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        with _signals_kept():
            ray.init(address=address, **kwargs)
        return False
    use_private_token()  # Ray's default token file, ~/.ray/auth_token, would be readable by every user
    # a private instance keeps Ray's token authentication on; its notice on every start is noise here
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray replaces a loopback node address with the machine's external one unless clusters are off (its own
    # switch, read at import): turn it off for this private instance so nothing advertises another interface
    switch = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved, os.environ[switch] = os.environ.get(switch), "0"
    constants = ray._private.ray_constants
    cluster, constants.ENABLE_RAY_CLUSTER = constants.ENABLE_RAY_CLUSTER, False
    try:
        _start_local(ray, kwargs)
    finally:
        constants.ENABLE_RAY_CLUSTER = cluster
        if saved is None:
            os.environ.pop(switch)
        else:
            os.environ[switch] = saved
    return True


def _start_local(ray: Any, kwargs: dict[str, Any]) -> None:
    """``ray.init`` of a private instance, tried up to ``LOCAL_STARTS`` times while Ray's start times out."""
    for start in range(1, LOCAL_STARTS + 1):
        before = _descendants(os.getpid())
        try:
            with _signals_kept():
                ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
            return
        except Exception as e:
            if _NOT_STARTED not in str(e):
                raise
            for pid in _descendants(os.getpid()) - before:  # the half-started node's processes
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if start == LOCAL_STARTS:
                raise RuntimeError(f"a private local Ray did not come up in {LOCAL_STARTS} tries ({e}): is the "
                                   f"machine overloaded? Rerun, or join a running cluster with --address") from e
            log.warning("Ray did not come up in time (try %d of %d); starting it again", start, LOCAL_STARTS)


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (children, their children, ...), from ``/proc``; empty where there is none."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@contextlib.contextmanager
def _signals_kept() -> Iterator[None]:
    """Around ``ray.init``: Ray installs a SIGTERM handler of its own (exit at once, no cleanup, no summary);
    keep the caller's SIGINT / SIGTERM handlers instead, and deliver a signal that arrives while Ray starts to
    them once ``ray.init`` has returned (or failed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    arrived: list[int] = []
    install, ray_utils.set_sigterm_handler = ray_utils.set_sigterm_handler, lambda handler: None
    for sig in handlers:
        signal.signal(sig, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = install
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if arrived:
        signal.raise_signal(arrived[0])


def shutdown_ray() -> None:
    """``ray.shutdown()``, then the SIGINT / SIGTERM handlers installed again: shutting down Ray's core worker
    resets them to the default at the C level (Python still lists its own), so a signal would kill the process
    with no cleanup and no summary."""
    import ray

    ray.shutdown()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler is not None:
                signal.signal(sig, handler)


def cluster_plan(actors: int | None, cpus_per_actor: float | None) -> tuple[int, dict[str, float], str]:
    """``(actors, ray resource options per actor, "GPU"|"CPU")`` for the cluster Ray is connected to: one actor
    per GPU, else ``CPUs // 4`` CPU actors (at least 1); ``actors`` / ``cpus_per_actor`` override."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        return actors or gpus, {"num_gpus": 1, "num_cpus": cpus_per_actor or 1}, "GPU"
    actors = actors or max(1, cpus // 4)
    return actors, {"num_cpus": cpus_per_actor or max(1, cpus // actors)}, "CPU"


def _last_line(error: BaseException) -> str:
    """The gist of a Ray error (its last line, e.g. ``ReleaseError: release ...: no such directory``)."""
    cause = getattr(error, "cause", None)
    lines = [line.strip() for line in str(cause or error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class RayPool(Tracked):
    """:class:`fnn_ray.worker.Worker` actors on the Ray cluster at ``address`` (default ``RAY_ADDRESS``, else a
    private local Ray, shut down on :meth:`close`): ``actors`` of them (default one per GPU, else CPUs // 4),
    ``max_concurrency=2``, no Ray restarts (the executor replaces dead workers itself). With ``reuse`` the actors
    are kept after a normal close for the next job of this process with the same release and settings (the core
    stays loaded; don't rewrite a release in place meanwhile).
    """

    _idle: dict[str, list[Any]] = {}  # pool key -> idle actor handles, shared by the jobs of this process

    #: Environment variables passed on to the workers (which may run on other nodes): where the object store is,
    #: never credentials (those come from ``storage_options`` or each node's own AWS configuration).
    PROPAGATED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")

    def __init__(self, options: WorkerOptions, task: Task, *, actors: int | None = None,
                 cpus_per_actor: float | None = None, address: str | None = None, reuse: bool = False,
                 start_timeout_s: float = 600.0) -> None:
        import ray

        super().__init__()
        self.started_ray = init_ray(address)
        self.size, resources, self.kind = cluster_plan(actors, cpus_per_actor)
        self.options, self.task, self.resources, self.reuse = options, task, resources, reuse
        self.start_timeout_s = start_timeout_s
        self.handles: dict[str, Any] = {}
        env = {k: os.environ[k] for k in self.PROPAGATED_ENV if os.environ.get(k)}
        env[WAIT_POLICY] = os.environ.get(WAIT_POLICY) or "PASSIVE"
        self._remote = ray.remote(Worker).options(max_concurrency=2, max_restarts=0, **self.resources,
                                                  runtime_env={"env_vars": env})
        node = ray.get_runtime_context().get_node_id()  # a new cluster -> a new key (old handles are dead)
        self._key = json.dumps([node, options.release_url, options.dtype, options.clips_per_batch, options.max_heads,
                                options.device, options.threads, sorted(self.resources.items()),
                                options.storage_options, env], sort_keys=True, default=str)

    def start(self, n: int) -> list[str]:
        """Up to ``n`` ready actors (at most the planned size): idle ones first, then new ones. RuntimeError
        (with the worker's own error) when a new actor cannot start, or when not all are ready within the start
        timeout (e.g. the cluster lacks the resources)."""
        import ray

        n = max(1, min(n, self.size))
        idle = self._idle.get(self._key, []) if self.reuse else []
        handles = [idle.pop() for _ in range(min(n, len(idle)))]
        handles += [self._remote.remote(self.options) for _ in range(n - len(handles))]
        refs = [h.ready.remote() for h in handles]
        done, waiting = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s)
        problem = None
        for i, (handle, ref) in enumerate(zip(handles, refs)):
            if ref in waiting:
                problem = problem or (f"{len(waiting)} of {n} worker(s) did not start within "
                                      f"{self.start_timeout_s:.0f} s; each needs {self.resources} and the cluster has "
                                      f"{ {k: v for k, v in ray.cluster_resources().items() if '/' not in k and ':' not in k} }")
                continue
            try:
                self.workers[f"actor-{i}"] = ray.get(ref)
                self.handles[f"actor-{i}"] = handle
            except ray.exceptions.RayError as e:
                problem = problem or f"workers could not start: {_last_line(e)}"
        if problem:
            for handle in handles:
                ray.kill(handle, no_restart=True)
            self.handles.clear()
            raise RuntimeError(problem)
        self.describe(f"{self.kind} cluster")
        return list(self.handles)

    def submit(self, name: str, item: WorkItem) -> None:
        self.track(self.handles[name].run.remote(item, self.task), name, item)

    def wait(self, timeout_s: float) -> Outcome | None:
        import ray

        if not self.pending:
            time.sleep(timeout_s)
            return None
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout_s)
        if not ready:
            return None
        name, item = self.untrack(ready[0])
        try:
            return name, item, ray.get(ready[0])
        except ray.exceptions.RayActorError as e:
            return name, item, WorkerLost(f"{type(e).__name__}: {_last_line(e)}")
        except ray.exceptions.RayError as e:  # the item's own exception, raised in the worker
            cause = getattr(e, "cause", None)
            return name, item, cause if isinstance(cause, BaseException) else e

    def replace(self, name: str, spawn: bool) -> str | None:
        """Kill ``name``; with ``spawn`` a new actor (not waited for: its first item fails with WorkerLost if it
        cannot start)."""
        import ray

        self.drop(name)
        ray.kill(self.handles.pop(name), no_restart=True)
        if not spawn:
            return None
        new = self.new_name()
        self.handles[new] = self._remote.remote(self.options)
        self.workers[new] = {"device": "-"}
        return new

    def close(self, ok: bool) -> None:
        """Keep the live actors for reuse (``reuse`` and ``ok``) or kill them (an interrupted run's results may
        still be on their way: don't hand those actors to another job); stop the Ray this pool started."""
        import ray

        if ok and self.reuse:
            self._idle.setdefault(self._key, []).extend(self.handles.values())
        else:
            for handle in self.handles.values():
                ray.kill(handle, no_restart=True)
        self.handles.clear()
        self.pending.clear()
        self.counts.clear()
        if self.started_ray:
            shutdown_ray()

    @classmethod
    def shutdown(cls) -> int:
        """Kill every idle actor kept for reuse; returns how many."""
        import ray

        handles = [h for hs in cls._idle.values() for h in hs]
        cls._idle.clear()
        if ray.is_initialized():
            for handle in handles:
                ray.kill(handle, no_restart=True)
        return len(handles)


# ---------------------------------------------------------------------------------------------- in-process
class LocalPool(Tracked):
    """``actors`` workers (default 1) in this process, each built by ``worker(options)`` (default
    :class:`fnn_ray.worker.Worker`) and called on two threads of its own, like an actor with
    ``max_concurrency=2``. For tests (a faulty worker is injected through ``worker``) and one-GPU machines."""

    def __init__(self, options: WorkerOptions, task: Task, *, actors: int | None = None,
                 worker: Callable[[WorkerOptions], Any] = Worker) -> None:
        super().__init__()
        self.size, self.task, self.factory = actors or 1, task, worker
        # torch threads per worker (each computes on a thread of its own): the machine's CPUs shared out
        self.options = dataclasses.replace(options, threads=options.threads or max(1, (os.cpu_count() or 1)
                                                                                   // self.size))
        self.instances: dict[str, tuple[Any, ThreadPoolExecutor]] = {}

    def _spawn(self, name: str) -> None:
        try:
            instance = self.factory(self.options)
        except Exception as e:
            raise RuntimeError(f"workers could not start: {type(e).__name__}: {e}") from None
        self.instances[name] = instance, ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix=f"fnn-{name}")
        self.workers[name] = instance.ready()

    def start(self, n: int) -> list[str]:
        for i in range(max(1, min(n, self.size))):
            self._spawn(f"actor-{i}")
        self.describe("in-process")
        return list(self.instances)

    def submit(self, name: str, item: WorkItem) -> None:
        instance, threads = self.instances[name]
        self.track(threads.submit(instance.run, item, self.task), name, item)

    def wait(self, timeout_s: float) -> Outcome | None:
        if not self.pending:
            time.sleep(timeout_s)
            return None
        done, _ = wait_futures(list(self.pending), timeout=timeout_s, return_when=FIRST_COMPLETED)
        if not done:
            return None
        future: Future = next(iter(done))
        name, item = self.untrack(future)
        error = future.exception()
        return name, item, error if error is not None else future.result()

    def replace(self, name: str, spawn: bool) -> str | None:
        self.drop(name)
        _, threads = self.instances.pop(name)
        threads.shutdown(wait=False, cancel_futures=True)
        if not spawn:
            return None
        new = self.new_name()
        self._spawn(new)
        return new

    def close(self, ok: bool) -> None:
        for _, threads in self.instances.values():
            threads.shutdown(wait=ok, cancel_futures=not ok)
        self.instances.clear()
        self.pending.clear()
        self.counts.clear()

