"""A job: a stimulus source, a reducer, scans and an output; planned, resumed and run on the one executor.

    summary = run_job(Job(name="sweep", release_url=..., output_url=..., source=ParquetSource(...),
                          reducer=FramesReducer(), parts=shards, scans=[((8, 5), 9941)], ...), JobConfig(...))

1. Take the output's lease (:mod:`fnn_ray.lease`: one writer per output; a stale lease of a killed run is taken
   over), remove staging objects left by earlier runs.
2. Read the ledger (:mod:`fnn_ray.ledger`): verified commits are skipped; commits whose file is missing,
   truncated or replaced are forgotten and recomputed; files no commit wrote are reported.
3. Write ``<output>/manifest.json`` (reconciled with the ledger), print the plan (scans, units, clips, frames,
   scan-frames, output size), start the workers and run the items (:func:`fnn_ray.executor.execute`).
4. Always: reconcile and save the manifest (a failing save is reported, not raised), release the lease, stop the
   local Ray this job started.

Everything that can be checked before Ray starts is checked by the caller (:func:`fnn_ray.preflight`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fnn_ray import fingerprint, storage
from fnn_ray.executor import Execution, Policy, execute
from fnn_ray.ledger import Ledger
from fnn_ray.lease import OutputLease
from fnn_ray.manifest import Manifest, manifest_url
from fnn_ray.plan import HEAD_LOAD_COST, Part, Scan, build_items
from fnn_ray.pool import Pool, RayPool
from fnn_ray.progress import Progress, format_plan, format_summary
from fnn_ray.reducers import Reducer
from fnn_ray.scheduler import Scheduler
from fnn_ray.sources import Source
from fnn_ray.worker import Task, WorkerOptions, torch_dtype

__all__ = ["Job", "JobConfig", "JobFailed", "JobSummary", "PoolFactory", "run_job"]

#: Builds the pool a job's items run on from the workers' options and the job's task.
PoolFactory = Callable[[WorkerOptions, Task], Pool]


@dataclass
class JobConfig:
    """How a job runs (the options every CLI shares).

    ``actors``: how many workers (default one per GPU; CPU-only: ``CPUs // 4``). ``dtype``: ``float32`` or
    ``bfloat16`` (autocast). ``storage_options`` reach every store and are never printed. ``address``: the Ray
    cluster to join (default ``RAY_ADDRESS``, which ``ray job submit`` sets; else a private local Ray on loopback).
    ``store_timeout_s``: how long store faults are ridden out before an item fails. ``wait_for_lock``: wait for
    another run's lease on the output instead of failing. ``overwrite``: start a clean output, removing what earlier
    runs committed there (else a rerun with another fingerprint is refused). ``head_load_cost``: what loading a
    scan head costs in core-frames (the scheduler steals across scans only when that pays off). ``reuse_workers``
    keeps the workers (and their loaded core) for the next job of the same release in this process. ``pool``:
    where the workers run (default: :class:`fnn_ray.pool.RayPool` with the options above; e.g.
    ``lambda options, task: LocalPool(options, task, actors=2)`` runs them in this process).
    """

    actors: int | None = None
    clips_per_batch: int = 8
    dtype: str = "float32"
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    address: str | None = None
    max_retries: int = 2
    max_actor_restarts: int = 4
    max_heads: int = 4
    head_load_cost: float | None = None
    cpus_per_actor: float | None = None
    start_timeout_s: float = 600.0
    store_timeout_s: float = 300.0
    wait_for_lock: bool = False
    overwrite: bool = False
    lease_ttl_s: float = 60.0
    progress: bool = True
    verbose: bool = True
    reuse_workers: bool = False
    pool: PoolFactory | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)  # validates
        for name in ("clips_per_batch", "max_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.store_timeout_s <= 0:
            raise ValueError(f"store timeout must be > 0 s, got {self.store_timeout_s}")


@dataclass(frozen=True)
class Job:
    """One job. ``scans``: ``((session, scan_idx), units)`` pairs; ``parts``: the source's parts, the same for
    every scan or per scan; ``clips`` / ``frames``: the stimulus size (for the plan); ``inputs``: what the manifest
    records as the job's inputs (URLs, generator parameters; for people); ``fingerprint``: what determines the
    numbers (:mod:`fnn_ray.fingerprint`: a rerun with another one is refused); ``products``: folders under the
    output written from the committed items after the run (``overwrite`` removes them too);
    ``release_options``: storage options for the release alone (None: the job's ``storage_options``);
    ``bytes_per_unit_frame`` / ``bytes_per_unit``: the committed size per (unit, frame) and per unit, for the
    size estimate printed with the plan."""

    name: str
    release_url: str
    output_url: str
    source: Source
    reducer: Reducer
    scans: Sequence[tuple[Scan, int]]
    parts: Sequence[Part] | Mapping[Scan, Sequence[Part]]
    clips: int
    frames: int
    inputs: Mapping[str, Any]
    settings: Mapping[str, Any] = field(default_factory=dict)
    fingerprint: Mapping[str, Any] = field(default_factory=dict)
    products: Sequence[str] = ()
    release_options: Mapping[str, Any] | None = field(default=None, repr=False)
    bytes_per_unit_frame: float = 4.0
    bytes_per_unit: float = 0.0


@dataclass
class JobSummary:
    """What a job did: items (one scan x one part) total, skipped (committed before), done, failed, pending;
    ``repaired``: commits found broken and recomputed; ``strays``: files in the output no commit wrote;
    ``execution``: the executor's record (None when nothing ran); ``interrupted``: the signal that stopped it."""

    job: str
    output_url: str
    data_dir: str
    scans: list[Scan]
    units: int
    parts: int
    items_total: int
    items_skipped: int
    items_done: int = 0
    items_failed: int = 0
    pending: int = 0
    repaired: list[str] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    execution: Execution | None = None
    wall_s: float = 0.0
    interrupted: str | None = None

    @property
    def ok(self) -> bool:
        """Every item of the requested scans is committed."""
        return not self.items_failed and not self.pending and not self.failures

    @property
    def failures(self) -> list[str]:
        return self.execution.failures if self.execution else []

    @property
    def committed(self) -> int:
        return self.items_skipped + self.items_done

    @property
    def scan_frames(self) -> int:
        return self.execution.scan_frames if self.execution else 0

    @property
    def scan_frames_per_s(self) -> float:
        """Throughput while the workers ran."""
        seconds = self.execution.compute_s if self.execution else 0.0
        return self.scan_frames / seconds if seconds > 0 else 0.0

    @property
    def manifest_url(self) -> str:
        return manifest_url(self.output_url)

    def raise_for_failures(self) -> JobSummary:
        """Raise :class:`JobFailed` if any item failed or is still pending; else return self."""
        if not self.ok:
            raise JobFailed(self)
        return self

    def __str__(self) -> str:
        return format_summary(self)


class JobFailed(RuntimeError):
    """Some items failed (data or store errors, or no live worker left); ``summary`` says which."""

    def __init__(self, summary: JobSummary) -> None:
        self.summary = summary
        head = f"{summary.items_failed} item(s) failed, {summary.pending} pending"
        super().__init__(head + "".join(f"\n  - {m}" for m in summary.failures[:20]))


def _remove_staging(ledger: Ledger) -> int:
    """Delete staging objects under the output (left by killed runs; only the lease holder calls this)."""
    try:
        paths = [p for p in ledger.fs.find(ledger.root) if f"/{storage.STAGING_DIR}/" in p]
    except FileNotFoundError:
        return 0
    for path in paths:
        try:
            ledger.fs.rm_file(path)
        except FileNotFoundError:
            pass
    return len(paths)


def _save_manifest(manifest: Manifest, job: Job, so: Mapping[str, Any] | None, warnings: list[str],
                   budget_s: float) -> None:
    try:
        storage.retry(manifest.save, job.output_url, so, budget_s=budget_s, what="saving the manifest")
    except Exception as e:  # reported, never raised: the ledger, not the manifest, says what is committed
        warnings.append(f"could not save {storage.redact_url(manifest_url(job.output_url))}: {type(e).__name__}: "
                        f"{e}; the commits are safe (the next run rewrites it)")


def run_job(job: Job, config: JobConfig) -> JobSummary:
    """Run (or resume) ``job``; return its summary (``summary.raise_for_failures()`` turns failures into an
    exception). Raises :class:`fnn_ray.lease.LeaseHeld` when another run writes the output,
    :class:`fnn_ray.fingerprint.OtherComputation` (a ValueError) when it holds items computed with another
    fingerprint and ``config.overwrite`` is off, and KeyboardInterrupt (after recording what was committed) when
    interrupted."""
    start = time.perf_counter()
    so = config.storage_options
    say = print if config.verbose else (lambda *a, **k: None)
    if not config.overwrite:
        fingerprint.check(job, so)  # before the lease: a refused rerun writes nothing
    previous = None if config.overwrite else Manifest.load(job.output_url, so)

    budget = min(config.store_timeout_s, 30.0)  # for the driver's own store calls at the end
    lease = OutputLease(job.output_url, so, ttl_s=config.lease_ttl_s, retry_budget_s=budget).acquire(
        wait=config.wait_for_lock)
    summary: JobSummary | None = None
    manifest: Manifest | None = None
    try:
        if config.overwrite:
            removed = fingerprint.clear(job, so, budget)
            say(f"--overwrite: removed {', '.join(removed) or 'nothing'} of earlier runs")
        else:
            fingerprint.check(job, so)  # again under the lease: another run may have written meanwhile
        ledger = Ledger(job.output_url, so)
        _remove_staging(ledger)
        commits = ledger.commits()
        good, bad = ledger.verify(commits)
        everything = build_items(job.scans, job.parts)
        planned = {item.key for item in everything}
        strays = ledger.strays(job.reducer.data_dir, commits)  # a broken commit's file is recomputed, not a stray
        if bad:
            ledger.forget(bad)
        items = [item for item in everything if item.key not in good]
        summary = JobSummary(
            job=job.name, output_url=job.output_url, data_dir=job.reducer.data_dir, scans=[s for s, _ in job.scans],
            units=sum(u for _, u in job.scans), parts=len({i.part_id for i in everything}),
            items_total=len(everything), items_skipped=len(everything) - len(items), pending=len(items),
            repaired=[f"{storage.join(storage.redact_url(job.output_url), bad[k].split(' ', 1)[0])}: "
                      f"{bad[k].split(' ', 1)[1]}" for k in sorted(bad)],
            strays=strays)
        foreign = sorted(k for k in good if (k[0], k[1]) in dict(job.scans) and k not in planned)
        if foreign:  # other part boundaries or other stimuli: rows would be duplicated
            raise ValueError(f"output {storage.redact_url(job.output_url)} holds {len(foreign)} committed item(s) "
                             f"that this run would not write, e.g. {foreign[0]}: it was written with other settings: "
                             f"another clips_per_shard or other stimuli; use the same settings or another output URL")
        manifest = Manifest(
            job=job.name, release_url=job.release_url, inputs=dict(job.inputs), scans=summary.scans,
            units=[u for _, u in job.scans], clips=job.clips, frames=job.frames, items_total=len(everything),
            items_done=sorted(k for k in good if k in planned),
            config={**dict(job.settings), "clips_per_batch": config.clips_per_batch, "dtype": config.dtype},
            fingerprint=dict(job.fingerprint))
        if previous is not None:
            manifest.started = previous.started
        manifest.save(job.output_url, so)
        say(format_plan(job, summary, sum(item.frames for item in everything)))
        if items:
            _execute(job, config, items, manifest, summary, budget)
    finally:
        if summary is not None and summary.execution is not None and summary.execution.store_failures:
            budget = lease.retry_budget_s = 5.0  # the store is down: record what we can, don't wait for it
        if summary is not None and manifest is not None:  # reconcile with what is really committed
            try:
                now_good, _ = Ledger(job.output_url, so).verify()
                manifest.items_done = sorted(k for k in now_good if k in planned)
            except Exception as e:
                summary.warnings.append(f"could not read the ledger: {type(e).__name__}: {e}")
            done_keys = set(manifest.items_done)
            summary.items_done = len(done_keys) - summary.items_skipped
            summary.items_failed = summary.execution.failed if summary.execution else 0
            summary.pending = summary.items_total - len(done_keys) - summary.items_failed
            _save_manifest(manifest, job, so, summary.warnings, budget)
            summary.wall_s = time.perf_counter() - start
        lease.release()
    return summary


def _make_pool(config: JobConfig, options: WorkerOptions, task: Task) -> Pool:
    if config.pool is not None:
        return config.pool(options, task)
    return RayPool(options, task, actors=config.actors, cpus_per_actor=config.cpus_per_actor, address=config.address,
                   reuse=config.reuse_workers, start_timeout_s=config.start_timeout_s)


def _execute(job: Job, config: JobConfig, items: list, manifest: Manifest, summary: JobSummary, budget: float
             ) -> None:
    """Start the pool, run ``items`` on the executor (recording commits in ``manifest``), close the pool."""
    so = config.storage_options
    options = WorkerOptions(release_url=job.release_url, storage_options=so, release_options=job.release_options,
                            dtype=config.dtype, clips_per_batch=config.clips_per_batch, max_heads=config.max_heads)
    progress = Progress(len(items), sum(i.frames for i in items), enabled=config.progress, desc=job.name)
    last_save = [time.monotonic()]

    def on_commit(result) -> None:
        manifest.mark_done([result.key])
        if time.monotonic() - last_save[0] > 10:
            _save_manifest(manifest, job, so, summary.warnings, budget)
            last_save[0] = time.monotonic()

    pool, ok = _make_pool(config, options, Task(job.source, job.reducer, job.output_url, config.store_timeout_s)), False
    try:
        names = pool.start(len(items))
        workers = dict(pool.workers)
        progress.write(f"{len(names)} worker(s) on {pool.description}")
        cost = HEAD_LOAD_COST if config.head_load_cost is None else config.head_load_cost
        policy = Policy(max_retries=config.max_retries, max_actor_restarts=config.max_actor_restarts,
                        store_timeout_s=config.store_timeout_s)
        summary.execution = execute(items, pool, Scheduler(items, names, cost, clock=pool.clock), on_commit,
                                    policy=policy, progress=progress)
        summary.execution.actors, summary.execution.device = len(names), pool.description
        summary.execution.workers = workers
        ok = True
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM turned into one by the CLI
        summary.interrupted = getattr(e, "signal_name", "SIGINT")
    finally:
        pool.close(ok)
        progress.close()

