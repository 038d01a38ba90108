"""The sweep driver: plan the (scan x shard) work items, run them on Ray actors, survive failures, resume.

    summary = run_sweep(SweepConfig(release="s3://b/release", stimuli="s3://b/clips", output="s3://b/out"))

1. Open the release (scan and unit tables only) and check the requested scans.
2. List the stimulus shards (small columns only), build the work items and leave out the items already
   committed under the output (a rerun computes only what is missing); write ``<output>/manifest.json``.
3. Start :class:`fnn_ray.worker.SweepWorker` actors: one per GPU when the cluster has GPUs, else CPU actors
   (``actors`` overrides). Each loads the core once; heads load on demand.
4. Drive the :class:`fnn_ray.scheduler.Scheduler`: two items in flight per actor (one computing, one reading),
   a ``ray.wait`` loop; a dead actor's items go back to the others and a replacement actor joins (bounded);
   transient item errors are retried; data errors fail just that item (nothing is committed for it) and are
   reported with file / row / clip at the end.

Frames and responses never pass through the driver: workers read shards from and write Parquet to the stores.
"""

from __future__ import annotations

import inspect
import os
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fnn_ray import storage
from fnn_ray.manifest import Manifest, manifest_url
from fnn_ray.plan import HEAD_LOAD_COST, WorkItem, build_items, choose_clips_per_shard
from fnn_ray.progress import Progress, format_summary
from fnn_ray.responses import committed_items, responses_url
from fnn_ray.scheduler import Scheduler
from fnn_ray.stimuli import Shard, list_shards
from fnn_ray.worker import ItemResult, WorkerOptions, WorkerPool, item_label, torch_dtype

__all__ = ["SweepConfig", "SweepFailed", "SweepSummary", "init_ray", "parse_scans", "run_sweep"]

Scan = tuple[int, int]
Key = tuple[int, int, str]

#: Exceptions of an item that retrying cannot fix: bad or missing data, a bad release. Anything else raised
#: by an item (a store timing out, a full disk, ...) is retried up to ``max_retries`` times.
DATA_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError)

#: In-flight items per actor: one computing, one being read.
IN_FLIGHT = 2


@dataclass
class SweepConfig:
    """One sweep. URLs may be local paths, ``file://``, ``s3://`` (endpoint/keys also from ``AWS_*`` env vars).

    ``scans``: ``(session, scan_idx)`` pairs, default all scans of the release. ``actors``: how many workers
    (default: one per GPU; on a CPU-only cluster ``CPUs // 4``, at least 1). ``clips_per_shard``: clips per work
    item (default: the value recorded in the output's manifest, else chosen from the data size). ``dtype``:
    ``float32`` or ``bfloat16`` (autocast). ``storage_options`` go to every store and are never printed.
    When Ray is not initialised yet, the sweep joins the cluster it runs in (``RAY_ADDRESS`` or a running
    ``ray start``) or starts a local Ray; ``local_ray`` always starts a private local one (unless ``RAY_ADDRESS``).
    ``head_load_cost``: what loading a scan head costs, in core-frames (default ``fnn_ray.plan.HEAD_LOAD_COST``,
    a GPU estimate for the MICrONS network); the scheduler only steals across scans when that pays off.
    ``start_timeout_s``: how long to wait for the workers to start (resources to free up, nodes to join).
    ``reuse_workers`` keeps the workers (and their loaded core) for the next sweep of the same release in this
    process (:meth:`fnn_ray.worker.WorkerPool.shutdown` ends them).

    Test-only fault injection: ``max_items`` stops handing out work after that many items (as if the driver
    died); ``crash_on`` (``"session-scan_idx/item_id"``) makes the actor that first runs that item exit
    abruptly; ``actor_delay_s`` maps an initial actor's index to extra seconds per item (a slow device).
    """

    release: str
    stimuli: str
    output: str
    scans: Sequence[Scan] | None = None
    actors: int | None = None
    clips_per_batch: int = 8
    clips_per_shard: int | None = None
    dtype: str = "float32"
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    max_retries: int = 2
    max_actor_restarts: int = 4
    max_heads: int = 4
    head_load_cost: float | None = None
    cpus_per_actor: float | None = None
    start_timeout_s: float = 600.0
    progress: bool = True
    verbose: bool = True
    local_ray: bool = False
    reuse_workers: bool = False
    max_items: int | None = None
    crash_on: str | None = None
    actor_delay_s: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)  # validates
        if self.clips_per_batch < 1:
            raise ValueError(f"clips_per_batch must be >= 1, got {self.clips_per_batch}")
        if self.clips_per_shard is not None and self.clips_per_shard < 1:
            raise ValueError(f"clips_per_shard must be >= 1, got {self.clips_per_shard}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.scans is not None:
            self.scans = [(int(s), int(i)) for s, i in self.scans]


@dataclass
class SweepSummary:
    """What a sweep did. ``items_*`` count work items (one scan x one shard); ``scan_frames`` is the frames x
    scans computed by this run. ``failures`` hold one message per failed item (file / row / clip).
    ``assigned`` / ``ran`` map actor names to the item keys first queued on / run by that actor; ``workers``
    what each initial actor reported at start (device, threads, pid, GPU ids); ``timings`` total seconds per
    phase (read, wait, head, compute, write) summed over committed items; ``peak_memory_mb`` the largest peak
    memory a worker reported (GPU allocator peak on CUDA workers, else the worker process's resident set).
    """

    output_url: str
    scans: list[Scan]
    shards: int
    clips_per_shard: int
    items_total: int
    items_skipped: int
    items_done: int = 0
    items_failed: int = 0
    pending: int = 0
    scan_frames: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0
    actors: int = 0
    device: str = "-"
    actor_restarts: int = 0
    steals: int = 0
    requeued: int = 0
    retries: int = 0
    failures: list[str] = field(default_factory=list)
    assigned: dict[str, list[Key]] = field(default_factory=dict)
    ran: dict[str, list[Key]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    peak_memory_mb: float = 0.0

    @property
    def ok(self) -> bool:
        """Every item of the requested scans is committed."""
        return not self.items_failed and not self.pending

    @property
    def failed(self) -> bool:
        return bool(self.items_failed) or bool(self.failures)

    @property
    def scan_frames_per_s(self) -> float:
        """Throughput while the workers ran (``compute_s``: from all workers ready to the last item)."""
        seconds = self.compute_s or self.wall_s
        return self.scan_frames / seconds if seconds > 0 else 0.0

    @property
    def responses_url(self) -> str:
        return responses_url(self.output_url)

    @property
    def manifest_url(self) -> str:
        return manifest_url(self.output_url)

    def raise_for_failures(self) -> SweepSummary:
        """Raise :class:`SweepFailed` if any item failed or is still pending; else return self."""
        if not self.ok:
            raise SweepFailed(self)
        return self

    def __str__(self) -> str:
        return format_summary(self)


class SweepFailed(RuntimeError):
    """Some items failed (data errors, or no live actor left); ``summary`` says which."""

    def __init__(self, summary: SweepSummary) -> None:
        self.summary = summary
        head = f"{summary.items_failed} item(s) failed, {summary.pending} pending"
        super().__init__(head + "".join(f"\n  - {m}" for m in summary.failures[:20]))


# ------------------------------------------------------------------------------------------------ helpers
def parse_scans(text: str | None) -> list[Scan] | None:
    """``"8-5,9-6"`` -> ``[(8, 5), (9, 6)]``; empty or None -> None (all scans)."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            session, scan_idx = part.split("-")
            out.append((int(session), int(scan_idx)))
        except ValueError:
            raise ValueError(f"bad scan {part!r}: expected SESSION-SCAN_IDX, e.g. 8-5") from None
    return out or None


def init_ray(local: bool = False, **kwargs: Any) -> None:
    """Connect to the Ray cluster this runs in (``RAY_ADDRESS``, or a running ``ray start`` unless ``local``),
    else start a local Ray instance. No-op when Ray is initialised already."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", **kwargs)
        return
    if local:
        ray.init(address="local", include_dashboard=False, **kwargs)
        return
    try:
        ray.init(address="auto", **kwargs)
    except ConnectionError:
        ray.init(include_dashboard=False, **kwargs)


def _absolute(url: str) -> str:
    """Local paths made absolute (so a manifest compares equal whatever the cwd); URLs unchanged."""
    url = os.fspath(url)
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def _resolve_scans(release, wanted: Sequence[Scan] | None) -> list[tuple[Scan, int]]:
    """The requested scans with their unit counts; ValueError naming unknown scans and the available ones."""
    available = {info.key: info.units for info in release.scans}
    if wanted is None:
        return list(available.items())
    unknown = [s for s in wanted if s not in available]
    if unknown:
        names = ", ".join(f"{s}-{i}" for s, i in unknown)
        listing = ", ".join(f"{s}-{i}" for s, i in available)
        raise ValueError(f"unknown scan(s) {names} in release {storage.redact_url(release.url)}; available: {listing}")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"scans listed twice: {[s for s, n in Counter(wanted).items() if n > 1]}")
    return [(s, available[s]) for s in wanted]


def regroup(shards: Sequence[Shard], clips_per_shard: int) -> list[Shard]:
    """Merge one-clip shards (``list_shards(url, 1)``) into shards of ``clips_per_shard`` consecutive rows of one
    file: the same shards (and ids) as ``list_shards(url, clips_per_shard)``, without listing twice."""
    out: list[Shard] = []
    group: list[Shard] = []

    def flush() -> None:
        if group:
            first, last = group[0], group[-1]
            out.append(Shard(url=first.url, path=first.path, row_start=first.row_start, row_stop=last.row_stop,
                             clip_ids=tuple(c for s in group for c in s.clip_ids),
                             frames=sum(s.frames for s in group), file=first.file))
            group.clear()

    for shard in shards:
        if group and (shard.path != group[0].path or shard.row_start % clips_per_shard == 0):
            flush()
        group.append(shard)
    flush()
    return out


def _cluster_plan(config: SweepConfig) -> tuple[int, dict[str, float], str]:
    """``(actors, ray resource options per actor, device words)`` for this cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        actors = config.actors or gpus
        return actors, {"num_gpus": 1, "num_cpus": config.cpus_per_actor or 1}, "GPU"
    actors = config.actors or max(1, cpus // 4)
    per = config.cpus_per_actor or max(1, cpus // actors)
    return actors, {"num_cpus": per}, "CPU"


def _cause(error: BaseException) -> BaseException:
    """The exception an item raised inside a worker (unwrapped from Ray's RayTaskError)."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError):
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return error


# ------------------------------------------------------------------------------------------------ the sweep
def run_sweep(config: SweepConfig) -> SweepSummary:
    """Run (or resume) a sweep; return its summary. Items that failed are listed in ``summary.failures`` (call
    ``summary.raise_for_failures()`` to turn them into an exception). Configuration problems (unknown scan,
    unreachable or malformed stimuli, a release that cannot be read, an output written from other inputs)
    raise ``ValueError`` / ``FileNotFoundError`` before any work starts.
    """
    from fnn_model.release import Release

    start = time.perf_counter()
    so = config.storage_options
    release_url, stimuli_url, output_url = (_absolute(u) for u in (config.release, config.stimuli, config.output))
    say = print if config.verbose else (lambda *a, **k: None)

    release = Release.open(release_url, storage_options=so)  # ReleaseError (a ValueError) when unusable
    scans = _resolve_scans(release, config.scans)
    one_clip = list_shards(stimuli_url, 1, so)
    try:
        previous = Manifest.load(output_url, so)
        committed = committed_items(output_url, so)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # unreachable endpoint, permissions, ... (messages carry no credentials)
        raise FileNotFoundError(f"cannot reach output {storage.redact_url(output_url)}: {type(e).__name__}: {e}") from None
    if previous is not None:
        for what, old, new in (("release", previous.release_url, release_url),
                               ("stimuli", previous.stimuli_url, stimuli_url)):
            if old != storage.redact_url(new):
                raise ValueError(f"output {storage.redact_url(output_url)} holds a run of {what} {old}, not "
                                 f"{storage.redact_url(new)}: use another output URL")

    clips_per_shard = config.clips_per_shard or (previous.config.get("clips_per_shard") if previous else None)
    if previous is not None and committed and previous.config.get("clips_per_shard") not in (None, clips_per_shard):
        raise ValueError(f"output {storage.redact_url(output_url)} was written with clips_per_shard="
                         f"{previous.config['clips_per_shard']}; rerun with that value or use another output URL")
    if not clips_per_shard:
        init_ray(local=config.local_ray)
        planned, _, _ = _cluster_plan(config)
        clips_per_shard = choose_clips_per_shard(len(one_clip), len(scans), planned,
                                                 max_clips=max(8, config.clips_per_batch))
    shards = regroup(one_clip, int(clips_per_shard))
    everything = build_items(scans, shards)
    planned = {item.key for item in everything}
    foreign = sorted(k for k in committed if (k[0], k[1]) in dict(scans) and k not in planned)
    if foreign:  # other shard boundaries (clips_per_shard) or other stimuli: rows would be duplicated
        raise ValueError(f"output {storage.redact_url(output_url)} holds {len(foreign)} committed item(s) that this "
                         f"sweep would not write, e.g. {foreign[0]}: it was written with another clips_per_shard "
                         f"(this run: {clips_per_shard}) or other stimuli; use the same settings or another output URL")
    items = [item for item in everything if item.key not in committed]

    summary = SweepSummary(output_url=output_url, scans=[s for s, _ in scans], shards=len(shards),
                           clips_per_shard=int(clips_per_shard), items_total=len(everything),
                           items_skipped=len(everything) - len(items), pending=len(items))
    manifest = Manifest(
        release_url=release_url, stimuli_url=stimuli_url, scans=summary.scans, units=[u for _, u in scans],
        clips=len(one_clip), frames=sum(s.frames for s in one_clip), items_total=len(everything),
        items_done=[i.key for i in everything if i.key in committed],
        config={"clips_per_shard": int(clips_per_shard), "clips_per_batch": config.clips_per_batch,
                "dtype": config.dtype, "scans_filter": config.scans and [f"{s}-{i}" for s, i in config.scans]},
    )
    if previous is not None:
        manifest.started = previous.started
    manifest.save(output_url, so)
    say(f"fnn-ray sweep: {len(scans)} scan(s) x {len(shards)} shard(s) of <= {clips_per_shard} clip(s) = "
        f"{len(everything)} item(s); {summary.items_skipped} already committed, {len(items)} to compute")
    try:
        if items:
            _drive(config, release_url, output_url, items, summary, manifest)
    finally:  # also when interrupted: record what was committed
        manifest.save(output_url, so)
    summary.wall_s = time.perf_counter() - start
    return summary


def _drive(config: SweepConfig, release_url: str, output_url: str, items: list[WorkItem],
           summary: SweepSummary, manifest: Manifest) -> None:
    """Run ``items`` on Ray actors, filling ``summary`` and ``manifest`` as items commit."""
    import ray

    init_ray(local=config.local_ray)
    n_actors, resources, kind = _cluster_plan(config)
    n_actors = max(1, min(n_actors, len(items)))
    pool = WorkerPool(WorkerOptions(release_url=release_url, storage_options=config.storage_options,
                                    dtype=config.dtype, clips_per_batch=config.clips_per_batch,
                                    max_heads=config.max_heads), resources, reuse=config.reuse_workers)
    started = pool.start(n_actors, timeout_s=config.start_timeout_s)
    names = [f"actor-{i}" for i in range(n_actors)]
    handles: dict[str, Any] = {name: handle for name, (handle, _) in zip(names, started)}
    delays = {name: float(config.actor_delay_s.get(i, 0.0)) for i, name in enumerate(names)}
    devices = Counter(info["device"] for _, info in started)
    summary.workers = {name: info for name, (_, info) in zip(names, started)}
    summary.actors = n_actors
    summary.device = ", ".join(f"{n}x {d}" for d, n in devices.items()) + f" ({kind} cluster)"
    if config.verbose:
        print(f"fnn-ray sweep: {n_actors} actor(s) on {summary.device}")

    ready_at = time.perf_counter()
    # with a clock the scheduler measures each actor's speed and balances by estimated finishing time
    head_load = HEAD_LOAD_COST if config.head_load_cost is None else float(config.head_load_cost)
    clocked = "clock" in inspect.signature(Scheduler).parameters
    scheduler = (Scheduler(items, names, head_load, clock=time.monotonic) if clocked
                 else Scheduler(items, names, head_load))
    summary.assigned = {n: [i.key for i in scheduler.queue_of(n)] for n in names}
    summary.ran = defaultdict(list)
    inflight: dict[Any, tuple[str, WorkItem]] = {}  # object ref -> (actor, item)
    attempts: Counter[Key] = Counter()
    crashed = False
    handed_out = 0
    timings: Counter[str] = Counter()
    last_save = time.monotonic()
    progress = Progress(len(items), sum(i.frames for i in items), enabled=config.progress)
    completed = False

    def submit(name: str, item: WorkItem) -> None:
        nonlocal crashed
        crash = config.crash_on is not None and not crashed and item_label(item) == config.crash_on
        crashed = crashed or crash
        ref = handles[name].run.remote(item, output_url, delays.get(name, 0.0), crash)
        inflight[ref] = (name, item)

    def top_up() -> None:
        nonlocal handed_out
        for name in scheduler.actors:
            while sum(1 for n, _ in inflight.values() if n == name) < IN_FLIGHT:
                if config.max_items is not None and handed_out >= config.max_items:
                    return
                item = scheduler.next_item(name)
                if item is None:
                    break
                handed_out += 1
                submit(name, item)

    def actor_died(name: str, error: BaseException) -> None:
        for ref in [r for r, (n, _) in inflight.items() if n == name]:
            del inflight[ref]
        lost = scheduler.fail_actor(name)
        ray.kill(handles.pop(name), no_restart=True)
        progress.write(f"actor {name} died ({type(error).__name__}); {len(lost)} item(s) requeued")
        if summary.actor_restarts < config.max_actor_restarts:
            summary.actor_restarts += 1
            new = f"actor-r{summary.actor_restarts}"
            handles[new] = pool.spawn()
            scheduler.add_actor(new)

    try:
        top_up()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            if ref not in inflight:
                continue
            name, item = inflight.pop(ref)
            try:
                result: ItemResult = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                inflight[ref] = (name, item)  # actor_died drops every ref of the actor
                actor_died(name, e)
            except ray.exceptions.RayError as e:
                cause = _cause(e)
                attempts[item.key] += 1
                if isinstance(cause, DATA_ERRORS) or attempts[item.key] > config.max_retries:
                    scheduler.complete(name, item)
                    summary.items_failed += 1
                    summary.pending -= 1
                    summary.failures.append(_message(item, cause, attempts[item.key]))
                    progress.write(f"FAILED {summary.failures[-1]}")
                    progress.update(item.frames, failed=True)
                else:
                    summary.retries += 1
                    progress.write(f"retrying {item_label(item)} after {type(cause).__name__}: {cause}")
                    submit(name, item)  # same actor; the scheduler still counts it in flight there
            else:
                scheduler.complete(name, item)
                summary.items_done += 1
                summary.pending -= 1
                summary.scan_frames += result.scan_frames
                summary.ran[name].append(item.key)
                timings.update(result.timings)
                summary.peak_memory_mb = max(summary.peak_memory_mb, result.peak_memory_mb)
                manifest.mark_done([item.key])
                progress.update(result.scan_frames)
                if time.monotonic() - last_save > 10:
                    manifest.save(output_url, config.storage_options)
                    last_save = time.monotonic()
            top_up()
        if scheduler.pending and summary.pending and not (config.max_items is not None and
                                                          handed_out >= config.max_items):
            summary.failures.append(f"no live actor left after {summary.actor_restarts} restart(s): "
                                    f"{summary.pending} item(s) not computed; rerun to finish them")
        completed = True
    finally:
        summary.compute_s = time.perf_counter() - ready_at
        progress.close()
        if completed:
            pool.finish(list(handles.values()))
        else:  # interrupted: results may still be on their way; don't hand these workers to another sweep
            for handle in handles.values():
                ray.kill(handle, no_restart=True)
        summary.steals, summary.requeued = scheduler.steals, scheduler.requeued
        summary.ran = dict(summary.ran)
        summary.timings = dict(timings)


def _message(item: WorkItem, cause: BaseException, attempts: int) -> str:
    """One line per failed item: the worker's message names the item, file, row and clip."""
    text = str(cause).strip() or type(cause).__name__
    if not text.startswith("item "):
        text = f"item {item_label(item)} ({item.shard.file_url}): {type(cause).__name__}: {text}"
    if attempts > 1:
        text += f" (after {attempts} attempts)"
    return text
