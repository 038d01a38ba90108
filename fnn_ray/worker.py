"""The Ray actor that runs work items: one shared core per actor, scan heads loaded on demand.

An item (:class:`fnn_ray.plan.WorkItem`: one scan x one part of a stimulus source) goes through
:meth:`Worker.run` with the job's :class:`Task` (source, reducer, output):

1. read the part's clips (:meth:`fnn_ray.sources.Source.read`: from object storage, or generated here);
2. on the worker's compute thread: make sure the scan's head is loaded (bounded LRU cache), then predict the
   clips in batches of ``clips_per_batch`` clips, padded to the longest clip of the batch (``lengths`` tells the
   engine where each clip ends); a clip's ``context_frames`` are run but dropped;
3. reduce the responses (:mod:`fnn_ray.reducers`), commit the table atomically and record the commit in the
   ledger (:mod:`fnn_ray.ledger`). Store I/O is retried through transient faults for ``store_timeout_s``.

Only a small :class:`ItemResult` goes back to the driver; frames and responses never pass through it.

Overlap of I/O and compute: the actor is created with ``max_concurrency=2`` and the driver keeps two items in
flight per actor, so one call reads (or writes) while the other computes. Steps 1 and 3 run on Ray's call
threads; step 2 (and everything else that touches the engine or the head cache) runs on ONE compute thread
owned by the worker, so batches compute one at a time. One thread also matters for speed: the CPU kernels'
OpenMP keeps a thread team per calling thread, and two calling threads taking turns leave the idle team's
threads spinning against the busy one (measured on 2 cores: 15-25% slower than one calling thread).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from fnn_ray.plan import Scan, WorkItem
from fnn_ray.reducers import Reducer, Units
from fnn_ray.sources import Source
from fnn_ray.stimuli import Clip

__all__ = ["ItemResult", "Task", "Worker", "WorkerOptions", "batch_clips", "item_label", "peak_memory_mb",
           "predict_clips", "torch_dtype"]

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
    """How one :class:`Worker` is built.

    ``storage_options`` reach the release, stimuli and output stores (never printed: ``repr=False``).
    The output URL is given per item, so that one worker can serve several sweeps of the same release.
    """

    release_url: str
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    release_options: Mapping[str, Any] | None = field(default=None, repr=False)  # None: storage_options
    dtype: str = "float32"
    clips_per_batch: int = 8
    max_heads: int = 4
    device: str | None = None  # None: cuda when the actor got a GPU and torch sees one, else cpu
    threads: int | None = None  # torch intra-op threads; None: the actor's CPU share


@dataclass(frozen=True)
class Task:
    """What a job asks of a worker for each of its items: read from ``source``, reduce with ``reducer``, commit
    under ``output_url``; store I/O rides out transient faults for ``store_timeout_s`` seconds."""

    source: Source
    reducer: Reducer
    output_url: str
    store_timeout_s: float = 300.0


@dataclass(frozen=True)
class ItemResult:
    """What a worker reports for one committed item (small: no frames, no responses).

    ``file``: the committed file, relative to the output URL. ``timings`` holds seconds spent in ``read``,
    ``wait`` (for the compute thread), ``head`` (loading a head), ``compute``, ``reduce`` and ``write``; ``seconds`` is the whole call. ``peak_memory_mb``: the worker's peak so far, the
    GPU allocator's on a CUDA worker, else the process's resident set. ``bytes_read`` / ``frame_bytes``: stimulus
    bytes fetched from the store and the frame bytes they held (0 for generated stimuli).
    """

    key: tuple[int, int, str]
    file: str
    clips: int
    frames: int
    units: int
    rows: int
    seconds: float
    timings: dict[str, float]
    device: str
    peak_memory_mb: float = float("nan")
    bytes_read: int = 0
    frame_bytes: int = 0

    @property
    def scan_frames(self) -> int:
        """Frames x scans of this item (one scan per item)."""
        return self.frames


def item_label(item: WorkItem) -> str:
    """``"{session}-{scan_idx}/{part_id}"``: how items are named in messages."""
    return f"{item.session}-{item.scan_idx}/{item.part_id}"


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


def predict_clips(engine, scan: Scan, clips: Sequence[Clip], clips_per_batch: int) -> list[np.ndarray]:
    """Responses of one scan to ``clips``: float32 ``[T_c - context_c, U]`` per clip, in order.

    Clips are batched ``clips_per_batch`` at a time (same frame size per batch), padded to the longest clip of
    the batch as uint8 ``[N, T_max, H, W]`` with ``lengths``; each clip starts from a reset state, and the
    responses to its first ``context_frames`` frames (movie context, run but not kept) are dropped.
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
            out[i] = np.ascontiguousarray(result[n, clips[i].context_frames: lengths[n]])
    return out  # type: ignore[return-value]


class Worker:
    """Runs work items on one device. Use as a Ray actor: ``ray.remote(Worker).options(...).remote(opts)``.

    The core is loaded once (``Release.open(...).load_core()``) into an :class:`fnn_model.engine.Engine`; scan
    heads and their unit tables are loaded on demand and kept in an LRU cache of ``max_heads`` scans.
    """

    def __init__(self, options: WorkerOptions) -> None:
        from fnn_model.release import Release

        self.options = options
        self.device = options.device or _default_device()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fnn-compute")
        self.release = Release.open(options.release_url, storage_options=options.release_options
                                    if options.release_options is not None else options.storage_options)
        self.engine = self._on_compute_thread(self._load_engine, options.threads or _assigned_cpus())
        self._heads: OrderedDict[Scan, Units] = OrderedDict()

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

        gpu_ids, node = [], ""
        try:
            import ray

            if ray.is_initialized():  # an in-process worker must not start a Ray (Ray's calls would, by themselves)
                gpu_ids, node = [str(g) for g in ray.get_gpu_ids()], ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        threads = self._on_compute_thread(torch.get_num_threads)
        return {"device": str(self.engine.device), "threads": threads, "pid": os.getpid(), "node": node,
                "gpu_ids": gpu_ids}

    def heads(self) -> list[Scan]:
        """Scans whose heads are loaded, least recently used first."""
        return list(self._heads)

    # ------------------------------------------------------------------ work
    def _head(self, scan: Scan) -> Units:
        """Make sure ``scan``'s head is on the engine (compute thread only); return its units."""
        if scan in self._heads:
            self._heads.move_to_end(scan)
            return self._heads[scan]
        while len(self._heads) >= max(1, self.options.max_heads):
            old, _ = self._heads.popitem(last=False)
            self.engine.remove_head(old)
        head = self.release.load_head(*scan)
        units = self.release.units(*scan)
        self.engine.add_head(scan, head)
        ids = Units(units.unit_id.to_numpy(np.int64), units.readout_id.to_numpy(np.int32))
        self._heads[scan] = ids
        return ids

    def run(self, item: WorkItem, task: Task) -> ItemResult:
        """Read, predict, reduce and commit one item of ``task``; return its descriptor.

        Raises ``ValueError`` / ``FileNotFoundError`` (bad or missing data: the message names the item and the
        file, row and clip), :class:`fnn_ray.storage.StoreUnavailable` (the store stayed unreachable for
        ``task.store_timeout_s``) or whatever else went wrong.
        """
        label = item_label(item)
        try:
            return self._run(item, task)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"item {label}: {e}") from None
        except (ValueError, KeyError) as e:
            raise ValueError(f"item {label}: {e}") from None

    def _run(self, item: WorkItem, task: Task) -> ItemResult:
        from fnn_ray import storage
        from fnn_ray.ledger import Ledger

        start = time.perf_counter()
        timings: dict[str, float] = {}
        io: dict[str, float] = {}
        label = item_label(item)
        clips = storage.retry(task.source.read, item, io, budget_s=task.store_timeout_s, what=f"reading {label}")
        timings["read"] = time.perf_counter() - start

        units, rates = self._on_compute_thread(self._predict, item, clips, timings, time.perf_counter())
        mark = time.perf_counter()
        table = task.reducer.reduce(item, units, zip(clips, rates))
        timings["reduce"] = time.perf_counter() - mark

        mark = time.perf_counter()
        ledger = Ledger(task.output_url, self.options.storage_options)
        file = task.reducer.file(item)
        storage.retry(ledger.commit_table, item.key, file, table, budget_s=task.store_timeout_s,
                      what=f"committing {label}")
        timings["write"] = time.perf_counter() - mark
        return ItemResult(
            key=item.key, file=file, clips=len(clips), frames=sum(c.num_frames for c in clips),
            units=len(units.unit_ids), rows=table.num_rows, seconds=time.perf_counter() - start, timings=timings,
            device=str(self.engine.device), peak_memory_mb=peak_memory_mb(self.engine.device),
            bytes_read=int(io.get("bytes_read", 0)), frame_bytes=int(io.get("frame_bytes", 0)),
        )

    def _predict(self, item: WorkItem, clips: list[Clip], timings: dict[str, float], queued: float
                 ) -> tuple[Units, list[np.ndarray]]:
        """Step 2 of an item, on the compute thread: (units, responses per clip); fills ``timings``."""
        mark = time.perf_counter()
        timings["wait"] = mark - queued
        units = self._head(item.scan)
        timings["head"] = time.perf_counter() - mark
        mark = time.perf_counter()
        rates = predict_clips(self.engine, item.scan, clips, self.options.clips_per_batch)
        timings["compute"] = time.perf_counter() - mark
        return units, rates


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
