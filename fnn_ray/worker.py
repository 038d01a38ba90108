"""The Ray actor that runs sweep work items: one shared core per actor, scan heads loaded on demand.

An item (:class:`fnn_ray.plan.WorkItem`: one scan x one stimulus shard) goes through :meth:`SweepWorker.run`:

1. read the shard's clips straight from object storage (:func:`fnn_ray.stimuli.read_shard`);
2. on the worker's compute thread: make sure the scan's head is loaded (bounded LRU cache), then predict the
   clips in batches of ``clips_per_batch`` clips, padded to the longest clip of the batch (``lengths`` tells the
   engine where each clip ends);
3. write the responses straight back (:func:`fnn_ray.responses.write_responses`, an atomic commit).

Only a small :class:`ItemResult` goes back to the driver; frames and responses never pass through it.

Overlap of I/O and compute: the actor is created with ``max_concurrency=2`` and the driver keeps two items in
flight per actor, so one call reads (or writes) while the other computes. Steps 1 and 3 run on Ray's call
threads; step 2 (and everything else that touches the engine or the head cache) runs on ONE compute thread
owned by the worker, so batches compute one at a time. One thread also matters for speed: the CPU kernels'
OpenMP keeps a thread team per calling thread, and two calling threads taking turns leave the idle team's
threads spinning against the busy one (measured on 2 cores: 15-25% slower than one calling thread).
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from fnn_ray.plan import WorkItem
from fnn_ray.stimuli import Clip

__all__ = ["ItemResult", "SweepWorker", "WorkerOptions", "WorkerPool", "batch_clips", "peak_memory_mb",
           "predict_clips", "torch_dtype"]

ScanKey = tuple[int, int]
T = TypeVar("T")


def torch_dtype(name: str):
    """``"float32"`` / ``"bfloat16"`` -> the torch dtype (ValueError for anything else)."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return table[str(name).lower()]
    except KeyError:
        raise ValueError(f"dtype must be float32 or bfloat16, got {name!r}") from None


def peak_memory_mb(device) -> float:
    """Peak memory in MiB for work on ``device`` (a ``torch.device``): the CUDA allocator's peak on a GPU, else
    the process's peak resident set (Linux: ``VmHWM``, which ``/proc/self/clear_refs`` can reset; elsewhere the
    lifetime peak from ``getrusage``)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@dataclass(frozen=True)
class WorkerOptions:
    """How one :class:`SweepWorker` is built.

    ``storage_options`` reach the release, stimuli and output stores (never printed: ``repr=False``).
    The output URL is given per item, so that one worker can serve several sweeps of the same release.
    """

    release_url: str
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    dtype: str = "float32"
    clips_per_batch: int = 8
    max_heads: int = 4
    device: str | None = None  # None: cuda when the actor got a GPU and torch sees one, else cpu
    threads: int | None = None  # torch intra-op threads; None: the actor's CPU share


@dataclass(frozen=True)
class ItemResult:
    """What a worker reports for one committed item (small: no frames, no responses).

    ``timings`` holds seconds spent in ``read``, ``wait`` (for the compute thread), ``head`` (loading a head),
    ``compute`` and ``write``; ``seconds`` is the whole call. ``peak_memory_mb``: the worker's peak so far, the
    GPU allocator's on a CUDA worker, else the process's resident set.
    """

    key: tuple[int, int, str]
    url: str
    clips: int
    frames: int
    units: int
    rows: int
    seconds: float
    timings: dict[str, float]
    device: str
    peak_memory_mb: float = float("nan")

    @property
    def scan_frames(self) -> int:
        """Frames x scans of this item (one scan per item)."""
        return self.frames


def item_label(item: WorkItem) -> str:
    """``"{session}-{scan_idx}/{item_id}"``: how items are named in messages and fault-injection options."""
    return f"{item.session}-{item.scan_idx}/{item.item_id}"


def batch_clips(clips: Sequence[Clip], clips_per_batch: int) -> list[list[int]]:
    """Split clip indices into batches of at most ``clips_per_batch`` consecutive clips of one frame size."""
    batches: list[list[int]] = []
    size = None
    for i, clip in enumerate(clips):
        shape = clip.frames.shape[1:]
        if not batches or len(batches[-1]) >= clips_per_batch or shape != size:
            batches.append([])
            size = shape
        batches[-1].append(i)
    return batches


def _stack_vectors(values: Sequence[np.ndarray | None], steps: int) -> np.ndarray | None:
    """Per-clip ``[T_c, 2]`` arrays (or None: zeros) -> float32 ``[N, steps, 2]`` zero-padded; None if all None."""
    if all(v is None for v in values):
        return None
    out = np.zeros((len(values), steps, 2), np.float32)
    for n, v in enumerate(values):
        if v is not None:
            out[n, : len(v)] = v
    return out


def predict_clips(engine, scan: ScanKey, clips: Sequence[Clip], clips_per_batch: int) -> list[np.ndarray]:
    """Responses of one scan to ``clips``: float32 ``[T_c, U]`` per clip, in order.

    Clips are batched ``clips_per_batch`` at a time (same frame size per batch), padded to the longest clip of
    the batch as uint8 ``[N, T_max, H, W]`` with ``lengths``; each clip starts from a reset state.
    """
    out: list[np.ndarray | None] = [None] * len(clips)
    for batch in batch_clips(clips, max(1, int(clips_per_batch))):
        chosen = [clips[i] for i in batch]
        lengths = [c.num_frames for c in chosen]
        steps = max(lengths)
        height, width = chosen[0].frames.shape[1:]
        frames = np.zeros((len(chosen), steps, height, width), np.uint8)
        for n, clip in enumerate(chosen):
            frames[n, : clip.num_frames] = clip.frames
        result = engine.predict(
            frames,
            [scan],
            perspectives=_stack_vectors([c.perspectives for c in chosen], steps),
            modulations=_stack_vectors([c.modulations for c in chosen], steps),
            lengths=lengths,
        )[scan]  # [N, T_max, U]
        for n, i in enumerate(batch):
            out[i] = np.ascontiguousarray(result[n, : lengths[n]])
    return out  # type: ignore[return-value]


class SweepWorker:
    """Runs work items on one device. Use as a Ray actor: ``ray.remote(SweepWorker).options(...).remote(opts)``.

    The core is loaded once (``Release.open(...).load_core()``) into an :class:`fnn_model.engine.Engine`; scan
    heads and their unit tables are loaded on demand and kept in an LRU cache of ``max_heads`` scans.
    """

    def __init__(self, options: WorkerOptions) -> None:
        from fnn_model.release import Release

        self.options = options
        self.device = options.device or _default_device()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fnn-compute")
        self.release = Release.open(options.release_url, storage_options=options.storage_options)
        self.engine = self._on_compute_thread(self._load_engine, options.threads or _assigned_cpus())
        self._heads: OrderedDict[ScanKey, tuple[np.ndarray, np.ndarray]] = OrderedDict()  # scan -> unit/readout ids
        self.items_done = 0

    def _on_compute_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the compute thread and wait for it (its exception is raised here)."""
        return self._compute.submit(fn, *args).result()

    def _load_engine(self, threads: int | None):
        import torch

        from fnn_model.engine import Engine

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        return Engine(self.release.load_core(), device=self.device, dtype=torch_dtype(self.options.dtype))

    # ------------------------------------------------------------------ queries
    def ready(self) -> dict[str, Any]:
        """Where this worker runs: ``{"device", "threads", "pid", "node", "gpu_ids"}`` (proves the core loaded)."""
        import torch

        try:
            import ray

            gpu_ids, node = [str(g) for g in ray.get_gpu_ids()], ray.get_runtime_context().get_node_id()
        except Exception:  # not inside Ray
            gpu_ids, node = [], ""
        threads = self._on_compute_thread(torch.get_num_threads)
        return {"device": str(self.engine.device), "threads": threads, "pid": os.getpid(), "node": node,
                "gpu_ids": gpu_ids}

    def heads(self) -> list[ScanKey]:
        """Scans whose heads are loaded, least recently used first."""
        return list(self._heads)

    # ------------------------------------------------------------------ work
    def _head(self, scan: ScanKey) -> tuple[np.ndarray, np.ndarray]:
        """Make sure ``scan``'s head is on the engine (compute thread only); return its (unit_ids, readout_ids)."""
        if scan in self._heads:
            self._heads.move_to_end(scan)
            return self._heads[scan]
        while len(self._heads) >= max(1, self.options.max_heads):
            old, _ = self._heads.popitem(last=False)
            self.engine.remove_head(old)
        head = self.release.load_head(*scan)
        units = self.release.units(*scan)
        self.engine.add_head(scan, head)
        ids = (units.unit_id.to_numpy(np.int64), units.readout_id.to_numpy(np.int32))
        self._heads[scan] = ids
        return ids

    def load_heads(self, scans: Sequence[ScanKey]) -> list[ScanKey]:
        """Preload heads (at most ``max_heads``); returns the loaded scans."""
        for scan in list(scans)[: max(1, self.options.max_heads)]:
            self._on_compute_thread(self._head, tuple(scan))
        return self.heads()

    def run(self, item: WorkItem, output_url: str, delay_s: float = 0.0, crash: bool = False) -> ItemResult:
        """Read, predict and commit one item under ``output_url``; return its descriptor.

        Raises ``ValueError`` / ``FileNotFoundError`` (bad or missing data: the message names the item and the
        stimulus file, row and clip) or whatever the store raised (transient errors: the driver retries).
        Test-only fault injection: ``delay_s`` more seconds of compute (a slow device); ``crash``: the process
        exits abruptly in the middle of the item (a lost node).
        """
        label = item_label(item)
        try:
            return self._run(item, label, output_url, delay_s, crash)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"item {label}: {e}") from None
        except (ValueError, KeyError) as e:
            raise ValueError(f"item {label}: {e}") from None

    def _run(self, item: WorkItem, label: str, output_url: str, delay_s: float, crash: bool) -> ItemResult:
        from fnn_ray import responses, stimuli

        start = time.perf_counter()
        timings: dict[str, float] = {}
        clips = stimuli.read_shard(item.shard, self.options.storage_options)
        if [c.clip_id for c in clips] != list(item.shard.clip_ids):
            raise ValueError(f"{item.shard.file_url} rows [{item.shard.row_start}, "
                             f"{item.shard.row_stop}) do not hold the listed clips")
        timings["read"] = time.perf_counter() - start

        unit_ids, readout_ids, rates = self._on_compute_thread(
            self._predict, item, clips, timings, time.perf_counter(), delay_s, crash)

        mark = time.perf_counter()
        url = responses.write_responses(
            output_url, item.session, item.scan_idx, item.item_id,
            [c.clip_id for c in clips], rates, unit_ids, readout_ids, self.options.storage_options,
        )
        timings["write"] = time.perf_counter() - mark
        self.items_done += 1
        frames = sum(c.num_frames for c in clips)
        return ItemResult(
            key=item.key, url=url, clips=len(clips), frames=frames, units=len(unit_ids),
            rows=len(clips) * len(unit_ids), seconds=time.perf_counter() - start, timings=timings,
            device=str(self.engine.device), peak_memory_mb=peak_memory_mb(self.engine.device),
        )

    def _predict(self, item: WorkItem, clips: list[Clip], timings: dict[str, float], queued: float, delay_s: float,
                 crash: bool) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Step 2 of an item, on the compute thread: (unit_ids, readout_ids, rates per clip); fills ``timings``."""
        mark = time.perf_counter()
        timings["wait"] = mark - queued
        unit_ids, readout_ids = self._head(item.scan)
        timings["head"] = time.perf_counter() - mark
        mark = time.perf_counter()
        rates = predict_clips(self.engine, item.scan, clips, self.options.clips_per_batch)
        if crash:
            os._exit(17)  # test-only: the actor dies mid-item, like a lost node (no cleanup)
        if delay_s:
            time.sleep(delay_s)
        timings["compute"] = time.perf_counter() - mark
        return unit_ids, readout_ids, rates


def _last_line(error: BaseException) -> str:
    """The gist of a Ray error (its last line, e.g. ``ReleaseError: release ...: no such directory``)."""
    cause = getattr(error, "cause", None)
    lines = [line.strip() for line in str(cause or error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _default_device() -> str:
    """``cuda`` when Ray gave this actor a GPU and torch can use one; else ``cpu`` (e.g. fake GPUs in tests)."""
    import torch

    try:
        import ray

        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:
        gpus = []
    return "cuda" if gpus and torch.cuda.is_available() else "cpu"


def _assigned_cpus() -> int | None:
    """CPUs Ray assigned to this actor (None outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        return int(round(cpus)) if cpus else None
    except Exception:
        return None


class WorkerPool:
    """The Ray actors of a sweep: starts them (``max_concurrency=2``, no Ray restarts: the driver replaces dead
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
        self._remote = ray.remote(SweepWorker).options(max_concurrency=2, max_restarts=0, **self.resources, **extra)
        node = ray.get_runtime_context().get_node_id()  # a new cluster -> a new key (old handles are dead)
        self._key = json.dumps([node, options.release_url, options.dtype, options.clips_per_batch, options.max_heads,
                                options.device, options.threads, sorted(self.resources.items()),
                                options.storage_options, env], sort_keys=True, default=str)

    def spawn(self) -> Any:
        """A new actor (not waited for: its first call fails with RayActorError if it cannot start)."""
        return self._remote.remote(self.options)

    def start(self, n: int, timeout_s: float | None = None) -> list[tuple[Any, dict[str, Any]]]:
        """``n`` ready actors with their :meth:`SweepWorker.ready` info: idle ones first, then new ones.

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
                problem = problem or (f"{len(waiting)} of {n} sweep worker(s) did not start within {timeout_s:.0f} s; "
                                      f"each needs {self.resources} and the cluster has "
                                      f"{ {k: v for k, v in ray.cluster_resources().items() if '/' not in k and ':' not in k} }")
                continue
            try:
                out.append((handle, ray.get(ref)))
            except ray.exceptions.RayError as e:
                problem = problem or f"sweep workers could not start: {_last_line(e)}"
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
