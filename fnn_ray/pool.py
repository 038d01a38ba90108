"""The worker actors of a job and the Ray instance they run on.

* :func:`init_ray`: join the cluster named by ``address`` / ``RAY_ADDRESS`` (what ``ray job submit`` sets), else
  start a private local Ray bound to loopback (never attach to a local Ray left behind by another run);
* :func:`cluster_plan`: how many workers, with which resources, on this cluster;
* :class:`WorkerPool`: starts :class:`fnn_ray.worker.Worker` actors, keeps idle ones for reuse in this process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fnn_ray.ray_token import use_private_token
from fnn_ray.worker import Worker, WorkerOptions

__all__ = ["WorkerPool", "cluster_plan", "init_ray", "shutdown_ray"]


def init_ray(address: str | None = None, **kwargs: Any) -> bool:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start a private local Ray on
    127.0.0.1 with no dashboard. Returns True when this call started a local instance (the caller shuts it down).
    No-op (False) when Ray is initialised already."""
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
        with _signals_kept():
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    finally:
        constants.ENABLE_RAY_CLUSTER = cluster
        if saved is None:
            os.environ.pop(switch)
        else:
            os.environ[switch] = saved
    return True


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


class WorkerPool:
    """The Ray actors of a job: starts them (``max_concurrency=2``, no Ray restarts: the driver replaces dead
    workers itself), and with ``reuse`` keeps them after the sweep for the next sweep in this process that uses
    the same release and settings (the core stays loaded; don't rewrite a release in place meanwhile).
    """

    _idle: dict[str, list[Any]] = {}  # pool key -> idle actor handles, shared by the sweeps of this process

    #: Environment variables passed on to the workers (which may run on other nodes): where the object store is,
    #: never credentials (those come from ``storage_options`` or each node's own AWS configuration).
    PROPAGATED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")

    def __init__(self, options: WorkerOptions, resources: Mapping[str, float], reuse: bool = False) -> None:
        import ray

        self.options, self.resources, self.reuse = options, dict(resources), reuse
        env = {k: os.environ[k] for k in self.PROPAGATED_ENV if os.environ.get(k)}
        extra = {"runtime_env": {"env_vars": env}} if env else {}
        self._remote = ray.remote(Worker).options(max_concurrency=2, max_restarts=0, **self.resources, **extra)
        node = ray.get_runtime_context().get_node_id()  # a new cluster -> a new key (old handles are dead)
        self._key = json.dumps([node, options.release_url, options.dtype, options.clips_per_batch, options.max_heads,
                                options.device, options.threads, sorted(self.resources.items()),
                                options.storage_options, env], sort_keys=True, default=str)

    def spawn(self) -> Any:
        """A new actor (not waited for: its first call fails with RayActorError if it cannot start)."""
        return self._remote.remote(self.options)

    def start(self, n: int, timeout_s: float | None = None) -> list[tuple[Any, dict[str, Any]]]:
        """``n`` ready actors with their :meth:`Worker.ready` info: idle ones first, then new ones.

        Raises RuntimeError (with the worker's own error) when a new actor cannot start, or when not all are
        ready within ``timeout_s`` (e.g. the cluster lacks the resources for ``n`` workers).
        """
        import ray

        idle = self._idle.get(self._key, []) if self.reuse else []
        handles = [idle.pop() for _ in range(min(n, len(idle)))]
        handles += [self.spawn() for _ in range(n - len(handles))]
        refs = [h.ready.remote() for h in handles]
        done, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out, problem = [], None
        for handle, ref in zip(handles, refs):
            if ref in waiting:
                problem = problem or (f"{len(waiting)} of {n} worker(s) did not start within {timeout_s:.0f} s; "
                                      f"each needs {self.resources} and the cluster has "
                                      f"{ {k: v for k, v in ray.cluster_resources().items() if '/' not in k and ':' not in k} }")
                continue
            try:
                out.append((handle, ray.get(ref)))
            except ray.exceptions.RayError as e:
                problem = problem or f"workers could not start: {_last_line(e)}"
        if problem:
            for handle in handles:
                ray.kill(handle, no_restart=True)
            raise RuntimeError(problem)
        return out

    def finish(self, handles: Sequence[Any]) -> None:
        """The sweep is over: keep live ``handles`` for reuse, or kill them."""
        import ray

        if self.reuse:
            self._idle.setdefault(self._key, []).extend(handles)
        else:
            for handle in handles:
                ray.kill(handle, no_restart=True)

    @classmethod
    def shutdown(cls) -> int:
        """Kill every idle worker kept for reuse; returns how many."""
        import ray

        handles = [h for hs in cls._idle.values() for h in hs]
        cls._idle.clear()
        if ray.is_initialized():
            for handle in handles:
                ray.kill(handle, no_restart=True)
        return len(handles)
