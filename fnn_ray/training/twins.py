"""Training twins: setup checks, the plan, one Ray Train trainer per twin side by side, the release at the end.

    summary = run_training(TrainConfig(release="microns", data=["s3://b/prep/4-7"], animal="27203",
                                       scans=[(4, 7)], output="s3://b/twin-27203"))

1. :func:`plan_training` checks everything before Ray starts: the foundation release and scan, every prepared
   dataset (its ``stats.json``: animal, scan, windows that fit), the output (writable; ``run.json`` of an earlier
   run must name the same animal -- a release holds one animal -- and the same settings).
2. :func:`run_training` takes the output's lease (:class:`fnn_ray.lease.OutputLease`), writes ``run.json``, prints
   the plan and starts one Ray task per unfinished twin (:func:`fnn_ray.training.trainer.fit_twin`); the tasks run
   side by side as the cluster's resources allow (a trainer of N ranks needs N GPUs, or N x CPUs), so 13 twins on G
   GPUs run G at a time. Rank 0 of each trainer sends a line per epoch through a Ray queue; the driver prints it.
3. When every twin is trained, the release (:mod:`fnn_ray.training.release_writer`) is written from each twin's
   best checkpoint. A rerun resumes every twin from its last intact checkpoint and skips finished ones.

Output layout: ``run.json``, ``twins/<session>-<scan_idx>/`` (``checkpoints/``, ``metrics.csv``, ``curves.png``,
``_ray/``), ``release/``, and with ``evaluate`` ``evaluation/<session>-<scan_idx>/`` (jobs.evaluate's output).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fnn_ray import preflight, storage
from fnn_ray.lease import OutputLease
from fnn_ray.progress import _duration
from fnn_ray.training.checkpoints import CheckpointStore
from fnn_ray.training.loop import TrainingSettings, TwinRun
from fnn_ray.training.prepare import read_stats

__all__ = ["TrainConfig", "TrainPlan", "TrainSummary", "plan_training", "run_training", "spread"]

Scan = tuple[int, int]
RUN_FILE = "run.json"


@dataclass(kw_only=True)
class TrainConfig:
    """A training run. ``data``: prepared datasets (one per twin); ``scans``: the twins to train (default: the scan
    of every dataset); ``settings``: sampling, schedule and optimizer
    (:class:`fnn_ray.training.loop.TrainingSettings`); ``workers``: ranks per twin; ``gpus``: one GPU per rank;
    ``max_failures``: worker-group restarts per twin; ``evaluate``: run jobs.evaluate on each twin's
    evaluation data at the end."""

    release: str
    data: Sequence[str]
    animal: str
    output: str
    scans: Sequence[Scan] | None = None
    foundation_scan: Scan = (4, 7)
    settings: TrainingSettings = field(default_factory=TrainingSettings)
    workers: int = 1
    gpus: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    evaluate: bool = False
    address: str | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    wait_for_lock: bool = False
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")


@dataclass
class TrainPlan:
    """What :func:`plan_training` found: the runs (one per twin), the release location, what is done already."""

    config: TrainConfig
    release_url: str
    release_options: Mapping[str, Any] | None
    output: str
    runs: list[TwinRun]
    stats: dict[Scan, dict[str, Any]]
    done_epochs: dict[Scan, int]
    inputs: dict[str, Any]

    def twin_url(self, scan: Scan) -> str:
        return storage.join(self.output, "twins", f"{scan[0]}-{scan[1]}")


@dataclass
class TrainSummary:
    """What a run did: per twin the last reported ``metrics`` (or the ``failures``), the ``release`` URL when it
    was written, evaluation tables, the signal that stopped it."""

    output: str
    twins: list[str]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    release: str | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    interrupted: str | None = None
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and self.interrupted is None and self.release is not None

    def __str__(self) -> str:
        lines = [f"train_twin: {len(self.twins)} twin(s) in {_duration(self.wall_s)}"]
        for name in self.twins:
            if name in self.failures:
                lines.append(f"  {name}: FAILED: {self.failures[name]}")
            elif name in self.metrics:
                m = self.metrics[name]
                lines.append(f"  {name}: epoch {m.get('epoch')}, validation {m.get('val', float('nan')):.5g}")
        if self.release:
            lines.append(f"  release: {storage.redact_url(self.release)}")
        if self.interrupted:
            lines.append(f"  interrupted by {self.interrupted}: checkpoints kept; rerun the same command to resume")
        return "\n".join(lines)


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def _read_run(output: str, so: Mapping[str, Any] | None) -> dict[str, Any] | None:
    fs, root = storage.filesystem(output, so)
    try:
        return json.loads(fs.cat_file(posixpath.join(root, RUN_FILE)))
    except FileNotFoundError:
        return None


def plan_training(config: TrainConfig) -> TrainPlan:
    """Check the setup (nothing is written, Ray is not started); ValueError / FileNotFoundError naming the flag,
    file or scan."""
    so = config.storage_options
    if not config.animal or "/" in config.animal:
        raise ValueError(f"--animal {config.animal!r}: expected an animal id")
    if not config.data:
        raise ValueError("--data is required: a prepared dataset (jobs.prepare_twin) per twin")
    release_url, release_so = preflight.release_location(config.release, so)
    preflight.open_release(release_url, [tuple(config.foundation_scan)], release_so)
    stats: dict[Scan, dict[str, Any]] = {}
    data_urls: dict[Scan, str] = {}
    for url in map(_absolute, config.data):
        found = read_stats(url, so)
        if found is None:
            raise FileNotFoundError(f"--data {storage.redact_url(url)}: not a prepared dataset (no stats.json); "
                                    f"run jobs.prepare_twin first")
        scan = (int(found["session"]), int(found["scan_idx"]))
        if found["animal"] != config.animal:
            raise ValueError(f"--data {storage.redact_url(url)} holds animal {found['animal']}'s recordings, not "
                             f"--animal {config.animal}'s")
        for split, longest in found["longest"].items():
            if longest < config.settings.window:
                raise ValueError(f"--window {config.settings.window}: the longest {split} trial of --data "
                                 f"{storage.redact_url(url)} has {longest} frames; use a shorter --window")
        if scan in stats:
            raise ValueError(f"--data {storage.redact_url(url)}: scan {scan[0]}-{scan[1]} is already given by "
                             f"{storage.redact_url(data_urls[scan])}")
        stats[scan], data_urls[scan] = found, url
    wanted = [tuple(s) for s in config.scans] if config.scans else list(stats)
    for scan in wanted:
        if scan not in stats:
            listing = ", ".join(f"{s}-{i}" for s, i in stats)
            raise ValueError(f"--scan {scan[0]}-{scan[1]}: no --data holds it (prepared scans: {listing})")
    output = _absolute(config.output)
    preflight.check_output(output, so)
    previous = _read_run(output, so)
    runs, done = [], {}
    plan = TrainPlan(config, release_url, release_so, output, runs, {s: stats[s] for s in wanted}, done, {})
    plan.inputs = {"animal": config.animal, "release": storage.redact_url(release_url),
                   "foundation_scan": list(config.foundation_scan), "twins": {}}
    for scan in wanted:
        run = TwinRun(release_url=release_url, data_url=data_urls[scan], twin_url=plan.twin_url(scan),
                      animal=config.animal, scan=scan, foundation_scan=tuple(config.foundation_scan),
                      units=int(stats[scan]["units"]), settings=config.settings,
                      threads=max(1, int(config.cpus_per_worker)), release_options=release_so, storage_options=so)
        runs.append(run)
        plan.inputs["twins"][run.name] = run.record()
    if previous is not None:
        if previous.get("animal") != config.animal:
            raise ValueError(f"output {storage.redact_url(output)} holds animal {previous.get('animal')}'s twins; a "
                             f"release holds one animal: use another --output for animal {config.animal}")
        for name, settings in plan.inputs["twins"].items():
            before = previous.get("twins", {}).get(name)
            if before is not None and before != settings:
                changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
                raise ValueError(f"output {storage.redact_url(output)} holds twin {name} trained with other "
                                 f"settings ({', '.join(changed)} differ): use the same options or another --output")
    for run in runs:
        epochs = CheckpointStore(run.twin_url, so).epochs()
        done[run.scan] = epochs[-1] if epochs else 0
    return plan


def spread(costs: Mapping[str, float], gpus: int) -> list[list[str]]:
    """Twins over ``gpus`` GPUs, longest first onto the least loaded GPU (what a FIFO cluster does with tasks of
    known length, up to order): per GPU the twins it runs one after another."""
    lanes: list[list[str]] = [[] for _ in range(gpus)]
    load = [0.0] * gpus
    for name in sorted(costs, key=lambda n: -costs[n]):
        g = min(range(gpus), key=lambda i: (load[i], i))
        lanes[g].append(name)
        load[g] += costs[name]
    return lanes


def format_spread(costs: Mapping[str, float], gpus: int, unit: str = "GPU-h") -> str:
    """The plan of :func:`spread` as text: per GPU its twins and load, then the wall time (the longest lane)."""
    lanes = spread(costs, gpus)
    lines = [f"{len(costs)} twin(s) over {gpus} GPU(s) (one trainer per twin, one GPU per rank):"]
    for g, lane in enumerate(lanes):
        lines.append(f"  GPU {g}: {', '.join(lane) or '-'} ({sum(costs[n] for n in lane):.1f} {unit})")
    wall = max(sum(costs[n] for n in lane) for lane in lanes)
    lines.append(f"  wall time {wall:.1f} {unit.split('-')[-1]} ({math.ceil(len(costs) / gpus)} wave(s)), "
                 f"{sum(costs.values()):.1f} {unit} in all")
    return "\n".join(lines)


def format_plan(plan: TrainPlan) -> str:
    """The plan printed before training: per twin units, trials, frames, epochs and what is done already."""
    c, t = plan.config, plan.config.settings
    per_epoch = c.workers * t.train_batches * t.batch * t.window
    lines = [f"train_twin: animal {c.animal}, {len(plan.runs)} twin(s) on {storage.redact_url(plan.release_url)} "
             f"(foundation scan {c.foundation_scan[0]}-{c.foundation_scan[1]}) -> {storage.redact_url(plan.output)}",
             f"  per twin: {c.workers} rank(s) ({'1 GPU' if c.gpus else f'{c.cpus_per_worker:g} CPU'} each), "
             f"{t.epochs} epochs x {t.train_batches} steps x {c.workers} x {t.batch} windows of {t.window} frames "
             f"= {per_epoch:,} sample-frames per epoch; {t.val_batches} validation batches"]
    for run in plan.runs:
        s = plan.stats[run.scan]
        done = plan.done_epochs.get(run.scan, 0)
        lines.append(f"  {run.name}: {s['units']:,} units, {s['trials']['training']} training + "
                     f"{s['trials']['validation']} validation trials, {s['frames']['training']:,} + "
                     f"{s['frames']['validation']:,} frames; "
                     + (f"resumes after epoch {done}" if 0 < done < t.epochs else
                        "trained" if done >= t.epochs else "starts"))
    lines.append("  estimated time: printed with every epoch at the measured rate (ETA)")
    return "\n".join(lines)


def _epoch_line(row: Mapping[str, Any]) -> str:
    left = row["epochs"] - row["epoch"]
    return (f"  [{row['twin']}] epoch {row['epoch']}/{row['epochs']}: train {row['train']:.5g}, val {row['val']:.5g}, "
            f"lr {row['lr']:.3g}, {row['samples_per_s']:,.0f} sample-frames/s, ETA {_duration(left * row['seconds'])}")


def _results(plan: TrainPlan) -> list:
    """Each twin's best checkpoint as a :class:`TwinResult`."""
    from fnn_ray.training.release_writer import TwinResult

    out = []
    for run in plan.runs:
        store = CheckpointStore(run.twin_url, plan.config.storage_options)
        best = store.best()
        checkpoint = store.load(best["epoch"]) if best else store.latest()
        out.append(TwinResult(scan=run.scan, unit_ids=plan.stats[run.scan]["unit_ids"], head=checkpoint.state["head"],
                              best_epoch=checkpoint.epoch, validation=float(checkpoint.meta["validation"]),
                              frozen_sha256=checkpoint.state["frozen_sha256"], foundation_scan=run.foundation_scan))
    return out


def run_training(config: TrainConfig, plan: TrainPlan | None = None) -> TrainSummary:
    """Train (or resume) every twin of ``config`` and write the release; see the module docstring. Raises
    :class:`fnn_ray.lease.LeaseHeld` when another run writes the output; KeyboardInterrupt subclasses (the CLI's
    signals) end the run with ``interrupted`` set, the checkpoints kept."""
    import ray
    from ray.util.queue import Queue

    from fnn_ray.pool import init_ray
    from fnn_ray.training.release_writer import write_twin_release
    from fnn_ray.training.trainer import fit_twin_task

    began = time.perf_counter()
    plan = plan or plan_training(config)
    so = config.storage_options
    say = print if config.verbose else (lambda *a, **k: None)
    summary = TrainSummary(plan.output, [run.name for run in plan.runs])
    lease = OutputLease(plan.output, so).acquire(wait=config.wait_for_lock)
    started_ray = False
    try:
        fs, root = storage.filesystem(plan.output, so)
        storage.commit_bytes(fs, posixpath.join(root, RUN_FILE), json.dumps(plan.inputs, indent=1).encode())
        say(format_plan(plan))
        todo = [run for run in plan.runs if plan.done_epochs.get(run.scan, 0) < run.settings.epochs]
        if todo:
            started_ray = init_ray(config.address)
            progress = Queue()
            task = fit_twin_task()
            refs = {task.remote(_with_progress(run, progress), config.workers, config.gpus, config.cpus_per_worker,
                                config.max_failures): run.name for run in todo}
            try:
                while refs:
                    ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                    _drain(progress, summary, say)
                    for ref in ready:
                        name = refs.pop(ref)
                        try:
                            summary.metrics[name] = {**summary.metrics.get(name, {}), **ray.get(ref)}
                        except Exception as e:  # the trainer failed beyond its retries
                            summary.failures[name] = _last_line(e)
                _drain(progress, summary, say)
            except KeyboardInterrupt as e:
                summary.interrupted = getattr(e, "signal_name", "SIGINT")
                for ref in refs:
                    ray.cancel(ref, force=True)
                return summary
        if not summary.failures:
            lease.ensure_held()
            release = storage.join(plan.output, "release")
            write_twin_release(release, plan.release_url, _results(plan), config.animal, so, plan.release_options)
            summary.release = release
            say(f"  release written: {storage.redact_url(release)}")
            if config.evaluate:
                summary.evaluation = _evaluate(plan, release)
    finally:
        lease.release()
        if started_ray:
            ray.shutdown()
        summary.wall_s = time.perf_counter() - began
    return summary


def _with_progress(run: TwinRun, progress: Any) -> TwinRun:
    from dataclasses import replace

    return replace(run, progress=progress)


def _drain(progress: Any, summary: TrainSummary, say) -> None:
    """Print the epoch lines the trainers' rank 0 sent."""
    from ray.util.queue import Empty
    while True:
        try:
            row = progress.get_nowait()
        except Empty:
            return
        summary.metrics[row["twin"]] = row
        say(_epoch_line(row))


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _evaluate(plan: TrainPlan, release: str) -> dict[str, Any]:
    """jobs.evaluate's logic on each twin's evaluation data (``<data>/evaluation``) -> per twin its tables."""
    from fnn_ray.evaluate import EvaluateConfig, format_performance, run_evaluate

    out = {}
    for run in plan.runs:
        if not plan.stats[run.scan]["evaluation"]["videos"]:
            continue
        evaluation = run_evaluate(EvaluateConfig(
            release=release, recordings=storage.join(run.data_url, "evaluation"), scans=[run.scan],
            output=storage.join(plan.output, "evaluation", run.name), storage_options=plan.config.storage_options,
            progress=False, verbose=False, address=plan.config.address))
        evaluation.summary.raise_for_failures()
        out[run.name] = evaluation.tables
        if plan.config.verbose:
            print(f"  evaluation of {run.name}:\n{format_performance(evaluation.tables)}")
    return out

