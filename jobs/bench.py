"""Throughput benchmark: the original per-frame `predict`, the multi-scan engine, and a Ray sweep, in ONE run on
the same machine and weights (a synthetic release of the MICrONS architecture, 10,000 units per scan, 144x256
frames).

    python -m jobs.bench [--quick] [--json out.json] [--device cpu|cuda] [--dtypes float32,bfloat16]
                         [--scans K] [--units U] [--batches 1,2,4,8] [--repeats 3] [--no-sweep]
                         [--training [--training-frames F] [--checkpoint-frames C]] [--shared-cores]

Rows: a) baseline = `Network.predict`, frame by frame, batch 1, one scan at a time, float32; b) engine = clips x
scans in one batch, in each of `--dtypes` (a curve over total batch sizes; the best is reported); c) sweep =
`jobs.sweep` through Ray with one actor on the same device, with the best engine's dtype and batch, stimuli and
output on local disk; and `jobs.tuning`'s job (16-direction RigidMonet clips generated and reduced on one actor).
Every row counts the fastest of `--repeats` timed runs (the actor is kept).
With `--training`: one training step of a twin on the release's core (forward + backward, one stream, batch 4
windows of `--training-frames` frames): the training path (`fnn_model.training.step`) vs a plain loop of the
same model (its multi-stream forward under autograd), their ratio `training.training_vs_plain`, the tensors a step
saves for backward (per sample-frame), the training path with activation checkpointing every
`--checkpoint-frames` frames (`checkpoint_saved_ratio`, `checkpoint_time_ratio`), and the training path in the
mixed-precision dtype of `--dtypes` (bfloat16 autocast: `autocast_vs_float32`; `autocast_gradient_error`, the
relative error of all gradients together, and `autocast_gradient_error_max`, that of the worst tensor).
With `--shared-cores` (CPU): the engine in separate processes, each with one torch thread per core, alone and two
at once (two CPU workers on one node, a worker beside a busy driver), with torch's OpenMP threads spinning between
parallel regions (`OMP_WAIT_POLICY=ACTIVE`) and sleeping (`PASSIVE`, what the jobs and their workers set):
`shared_cores[policy]["alone" | "shared"]`, scan-frames/s of all processes together (each its fastest of
`--repeats`), and `shared_cores["passive_vs_active_shared"]`, `["passive_vs_active_alone"]`.
Each row gives scan-frames/s, achieved GFLOP/s (conv + matmul FLOPs counted by torch's FlopCounterMode), the
fraction of this machine's measured matmul peak in the row's dtype and peak memory (per row: the GPU allocator's
peak, or the process's peak resident set; the sweep's is its worker's). The JSON holds every figure plus the
ratios `engine_vs_baseline` (best engine, any dtype), `engine_float32_vs_baseline`, `sweep_vs_engine`,
`tuning_vs_engine` (with `tuning_analysis_s`, the driver's merge and analysis after the workers), and
`bfloat16_max_rel_error`: the largest relative difference of any response between the bfloat16 and the float32
engine on the same clips.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fnn_model import NetworkConfig
from fnn_model.engine import Engine
from fnn_model.release import Release
from fnn_model.synthetic import random_clips
from fnn_ray.worker import peak_memory_mb, torch_dtype

T = TypeVar("T")


@dataclass
class Row:
    """One measured configuration."""

    name: str
    dtype: str
    scans: int
    clips: int
    frames: int
    seconds: float
    scan_frames_per_s: float
    gflops: float
    peak_fraction: float
    peak_memory_mb: float


class Memory:
    """Peak memory of a phase: the GPU allocator's peak on CUDA; on CPU the process's peak resident set since
    `reset` (Linux: VmHWM, reset through /proc/self/clear_refs), else its peak RSS so far."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            pass

    def peak_mb(self) -> float:
        return peak_memory_mb(self.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 30) -> float:
    """Best measured FLOP/s of a square matmul on `device` in `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def flops_per_scan_frame(release: Release, scan: tuple[int, int]) -> float:
    """Steady-state FLOPs of one frame of one scan (the second frame of a clip, batch 1)."""
    net = release.load_network(*scan)
    frames = torch.from_numpy(random_clips(1, 2, seed=1)[0])[:, None, None].float() / 255
    zeros = torch.zeros(1, 2)
    net.reset()
    with torch.inference_mode():
        net(frames[0], zeros, zeros)
        counter = FlopCounterMode(display=False)
        with counter:
            net(frames[1], zeros, zeros)
    net.reset()
    return float(counter.get_total_flops())


def make_row(name: str, dtype: str, scans: int, clips: int, frames: int, seconds: float, flops: float, peak: float,
             memory: Memory) -> Row:
    rate = scans * clips * frames / seconds
    return Row(name, dtype, scans, clips, frames, seconds, rate, rate * flops / 1e9, rate * flops / peak,
               memory.peak_mb())


def best_time(run: Callable[[], T], repeats: int, device: torch.device, memory: Memory) -> tuple[float, T]:
    """The fastest of `repeats` timed calls of `run` (the usual defence against a noisy machine) and the result of
    the last; peak memory is tracked from the first call on."""
    memory.reset()
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        sync(device)
        start = time.perf_counter()
        result = run()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_baseline(release: Release, scans: list[tuple[int, int]], frames: int, device: torch.device,
                   flops: float, peak: float, memory: Memory, repeats: int) -> Row:
    """The original way: `predict`, frame by frame, batch 1, one scan after the other."""
    clip = list(random_clips(1, frames, seed=2)[0])
    nets = [release.load_network(*scan).to(device) for scan in scans]
    nets[0].predict(clip[:2])  # warm-up
    seconds, _ = best_time(lambda: [net.predict(clip) for net in nets], repeats, device, memory)
    return make_row("baseline: predict, batch 1", "float32", len(scans), 1, frames, seconds, flops, peak, memory)


def bench_engine(engine: Engine, scans: list[tuple[int, int]], clips: int, frames: int, flops: float, peak: float,
                 memory: Memory, repeats: int) -> tuple[Row, dict]:
    """`clips` clips x all scans in one batch per frame -> the row and the responses (per scan `[N, T, U]`)."""
    data = random_clips(clips, frames, seed=3)
    engine.predict(data[:, :2], scans)  # warm-up at this batch size
    seconds, responses = best_time(lambda: engine.predict(data, scans), repeats, engine.device, memory)
    dtype = str(engine.dtype).removeprefix("torch.")
    row = make_row(f"engine {dtype}: {len(scans)} scans x {clips} clips", dtype, len(scans), clips, frames,
                   seconds, flops, peak, memory)
    return row, responses


def max_rel_error(approx: dict, exact: dict) -> float:
    """Largest `|approx - exact| / |exact|` over every response of every scan."""
    return max(float(np.max(np.abs(approx[k] - exact[k]) / np.abs(exact[k]))) for k in exact)


def release_bf16_error(url: str, device: torch.device, clips: int = 2, frames: int = 30) -> float:
    """bfloat16 vs float32 engine on another release's weights (e.g. the golden one, whose weights give a far
    wider range of responses than the synthetic ones), all its scans, random 144x256 clips."""
    release = Release.open(url)
    scans = [info.key for info in release.scans]
    data = random_clips(clips, frames, seed=5)
    exact, approx = (load_engine(release, scans, device, dtype).predict(data, scans)
                     for dtype in (torch.float32, torch.bfloat16))
    return max_rel_error(approx, exact)


def load_engine(release: Release, scans: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> Engine:
    """An engine on `device` holding the release's core and the heads of `scans`."""
    engine = Engine(release.load_core(), device, dtype)
    for key in scans:
        engine.add_head(key, release.load_head(*key))
    return engine


def bench_sweep(release_url: str, root: Path, scans: list[tuple[int, int]], clips: int, frames: int,
                clips_per_batch: int, device: torch.device, dtype: str, flops: float, peak: float,
                memory: Memory, repeats: int) -> Row:
    """A Ray sweep with one actor on the same device; stimuli and output on local disk. The fastest of `repeats`
    sweeps (each to a new output) counts; the actor is kept between them, as a session's sweeps keep it."""
    from fnn_ray.sweep import SweepConfig, run_sweep
    from fnn_ray.stimuli import Clip, write_clips
    import ray

    from fnn_ray.pool import RayPool, init_ray

    stimuli = root / "stimuli"
    data = random_clips(clips, frames, seed=4)
    write_clips(str(stimuli), [Clip(f"clip-{n:04d}", data[n]) for n in range(clips)], clips_per_file=clips)
    config = SweepConfig(release=release_url, stimuli=str(stimuli), output=str(root / "output-0"), scans=scans,
                         actors=1, clips_per_batch=clips_per_batch, clips_per_shard=clips_per_batch, dtype=dtype,
                         progress=False, verbose=False, reuse_workers=True,
                         cpus_per_actor=float(torch.get_num_threads()) if device.type == "cpu" else None)
    seconds, peak_mb = float("inf"), 0.0
    started = init_ray()  # one Ray for every repeat, so the actor (and its loaded core) is kept between them
    try:
        for run in range(max(1, repeats)):
            summary = run_sweep(replace(config, output=str(root / f"output-{run}"))).raise_for_failures()
            seconds = min(seconds, summary.scan_frames / summary.scan_frames_per_s)
            peak_mb = max(peak_mb, summary.execution.peak_memory_mb)
    finally:
        RayPool.shutdown()
        if started:
            ray.shutdown()
    row = make_row(f"sweep {dtype}: Ray, 1 actor, batch {clips_per_batch}", dtype, len(scans), clips, frames,
                   seconds, flops, peak, memory)
    row.peak_memory_mb = peak_mb  # the actor's process (GPU: its allocator), not this one
    return row


def bench_tuning(release_url: str, root: Path, scans: list[tuple[int, int]], clips: int, frames: int,
                 clips_per_batch: int, device: torch.device, dtype: str, flops: float, peak: float,
                 memory: Memory, repeats: int) -> tuple[Row, float]:
    """The tuning job (16-direction RigidMonet clips generated on one actor, window sums reduced there) on one actor,
    timed like the sweep row (the workers' time, fastest of `repeats`); returns the row and the fastest time of
    the driver's merge and analysis afterwards (reported apart: it does not grow with the frames)."""
    import time as _time

    from fnn_ray.analysis.tuning import tuning_table
    from fnn_ray.experiment import ExperimentConfig, condition_means, plan_experiment
    from fnn_ray.generators import RigidMonet
    from fnn_ray.job import run_job
    import ray

    from fnn_ray.pool import RayPool, init_ray

    family = RigidMonet(directions=16, trials=clips, block_frames=max(2, frames // 4), seed=0)
    seconds, analysis, peak_mb, scan_frames = float("inf"), float("inf"), 0.0, 0
    started = init_ray()
    try:
        for run in range(max(1, repeats)):
            config = ExperimentConfig(release=release_url, output=str(root / f"tuning-{run}"), family=family,
                                      scans=scans, actors=1, clips_per_batch=clips_per_batch,
                                      clips_per_part=clips_per_batch, dtype=dtype, progress=False, verbose=False,
                                      reuse_workers=True,
                                      cpus_per_actor=float(torch.get_num_threads()) if device.type == "cpu" else None)
            job = plan_experiment("tuning", config)
            summary = run_job(job, config).raise_for_failures()
            start = _time.perf_counter()
            for means in condition_means(job).values():
                tuning_table(means.means, [c["direction_deg"] for c in family.conditions])
            analysis = min(analysis, _time.perf_counter() - start)
            seconds = min(seconds, summary.execution.compute_s)
            peak_mb = max(peak_mb, summary.execution.peak_memory_mb)
            scan_frames = summary.scan_frames
    finally:
        RayPool.shutdown()
        if started:
            ray.shutdown()
    row = make_row(f"tuning {dtype}: Ray, 1 actor, batch {clips_per_batch}", dtype, len(scans), family.num_clips,
                   scan_frames // max(1, len(scans) * family.num_clips), seconds, flops, peak, memory)
    row.peak_memory_mb = peak_mb
    return row, analysis


@dataclass
class TrainingRow:
    """One measured training step: `batch` windows of `frames` frames, forward + backward. `saved_mb`: the
    tensors autograd saved for backward (distinct storages; in a checkpointed run those outside its chunks),
    `saved_per_sample_frame_mb` that over `batch * frames`; `peak_memory_mb` as the other rows; on a GPU
    `step_peak_mb`, the allocator's peak during a step above what was allocated before it (None on a CPU, whose
    resident set keeps freed memory), and that per sample-frame."""

    name: str
    batch: int
    frames: int
    seconds: float
    sample_frames_per_s: float
    peak_memory_mb: float
    saved_mb: float
    saved_per_sample_frame_mb: float
    step_peak_mb: float | None
    step_peak_per_sample_frame_mb: float | None


class SavedTensors:
    """Counts the bytes of the distinct storages autograd saves for backward while active (a saved-tensor hook;
    the tensors themselves are saved as usual)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def __enter__(self) -> SavedTensors:
        self.storages.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def mb(self) -> float:
        return sum(self.storages.values()) / 2**20


def plain_training_step(twin, batch, objective) -> float:  # noqa: ANN001 (fnn_model.training types)
    """The same model trained by a plain loop: the twin's multi-stream `forward` (all streams, positions `mu`,
    mean monitor pose) frame by frame under autograd, the objective, backward."""
    device = next(twin.parameters()).device
    stimuli, eye, behaviour = (x.to(device) for x in (batch.stimuli, batch.perspectives, batch.modulations))
    twin.reset()
    log_rates = []
    for t in range(batch.frames):
        image, features = twin.head.encode(stimuli[:, t, None].float() / 255, eye[:, t], behaviour[:, t])
        log_rates.append(twin.readout(twin.core(image, features)).mean(dim=1))
    loss = objective(torch.stack(log_rates, dim=1), batch.units.to(device))
    loss.backward()
    twin.reset()
    return float(loss.detach())


def autocast_gradient_error(twin, batch, objective, dtype: torch.dtype) -> tuple[float, float]:  # noqa: ANN001
    """One step's gradients with the forward in `dtype` autocast vs float32 (same stream and random numbers):
    `|g_mixed - g| / |g|` over all trained tensors together, and the largest of it per tensor."""
    from fnn_model.training import step

    grads = []
    for autocast in (None, dtype):
        twin.zero_grad(set_to_none=True)
        step(twin, batch, None, torch.Generator().manual_seed(7), objective, autocast=autocast)
        grads.append({n: p.grad.detach().clone() for n, p in twin.named_trainable_parameters() if p.grad is not None})
    exact, mixed = grads
    twin.zero_grad(set_to_none=True)
    total = (sum(float((mixed[n] - g).square().sum()) for n, g in exact.items())
             / sum(float(g.square().sum()) for g in exact.values())) ** 0.5
    return total, max(float((mixed[n] - g).norm() / g.norm()) for n, g in exact.items() if g.norm() > 0)


def bench_training(release: Release, scan: tuple[int, int], units: int, frames: int, batch_size: int,
                   device: torch.device, repeats: int, checkpoint_frames: int | None,
                   autocast: torch.dtype | None = None) -> dict:
    """One training step (forward + backward, one stream, `batch_size` windows of `frames` 144x256 frames) of a
    twin of `units` units on `release`'s core: the training path (`fnn_model.training.step`), a plain loop of
    the same model (`plain_training_step`) and, with `checkpoint_frames`, the training path with activation
    checkpointing over time chunks, and with `autocast` the training path in that mixed-precision dtype (and its
    gradient error, `autocast_gradient_error`). Each row is the fastest of `repeats` steps after a warm-up step
    whose saved tensors are counted (`SavedTensors`)."""
    from fnn_model.training import Batch, PoissonObjective, build_twin, step

    twin = build_twin(release, scan, units).to(device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero readout features: the gradient reaches through the whole head
        for w in twin.readout.feature.weights:
            w.copy_(torch.randn(w.shape, generator=generator) * twin.readout.channels**-0.5)
    eye, behaviour = (np.random.default_rng(1).standard_normal((2, batch_size, frames, 2)).astype(np.float32))
    batch = Batch(random_clips(batch_size, frames, seed=6), eye, behaviour,
                  np.random.default_rng(2).poisson(1.0, (batch_size, frames, units)).astype(np.float32))
    objective = PoissonObjective(burn_in=0)
    memory = Memory(device)
    runs = {"training path: one stream": lambda: step(twin, batch, None, generator, objective),
            "plain loop: multi-stream forward": lambda: plain_training_step(twin, batch, objective)}
    if checkpoint_frames:
        runs[f"training path, checkpoint every {checkpoint_frames} frames"] = (
            lambda: step(twin, batch, None, generator, objective, checkpoint_frames))
    if autocast is not None:
        runs[f"training path: one stream, {str(autocast).removeprefix('torch.')} autocast"] = (
            lambda: step(twin, batch, None, generator, objective, autocast=autocast))
    rows = []
    sample_frames = batch_size * frames
    for name, run in runs.items():
        twin.zero_grad(set_to_none=True)
        with SavedTensors() as saved:
            run()  # also the warm-up
        step_peak = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            run()
            torch.cuda.synchronize(device)
            step_peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        seconds, _ = best_time(run, repeats, device, memory)
        rows.append(TrainingRow(name, batch_size, frames, seconds, sample_frames / seconds, memory.peak_mb(),
                                saved.mb, saved.mb / sample_frames, step_peak,
                                None if step_peak is None else step_peak / sample_frames))
    path, plain = rows[0], rows[1]
    result = {"rows": [asdict(r) for r in rows], "units": units,
              "training_vs_plain": path.sample_frames_per_s / plain.sample_frames_per_s}
    if checkpoint_frames:
        checkpointed = rows[2]
        result["checkpoint_frames"] = checkpoint_frames
        result["checkpoint_saved_ratio"] = checkpointed.saved_mb / path.saved_mb
        result["checkpoint_time_ratio"] = checkpointed.seconds / path.seconds
    if autocast is not None:
        result["autocast"] = str(autocast).removeprefix("torch.")
        result["autocast_vs_float32"] = rows[-1].sample_frames_per_s / path.sample_frames_per_s
        result["autocast_gradient_error"], result["autocast_gradient_error_max"] = autocast_gradient_error(
            twin, batch, objective, autocast)
    return result


def print_training(result: dict) -> None:
    print(f"{'training step':48s} {'sample-frames/s':>15s} {'saved MB':>9s} {'MB/sample-frame':>15s} "
          f"{'step peak MB':>12s}")
    for row in result["rows"]:
        peak = "-" if row["step_peak_mb"] is None else f"{row['step_peak_mb']:.0f}"
        print(f"{row['name']:48s} {row['sample_frames_per_s']:15.3f} {row['saved_mb']:9.0f} "
              f"{row['saved_per_sample_frame_mb']:15.2f} {peak:>12s}")
    line = f"training path / plain loop {result['training_vs_plain']:.2f}x"
    if "checkpoint_frames" in result:
        line += (f"; checkpointing every {result['checkpoint_frames']} frames: saved x"
                 f"{result['checkpoint_saved_ratio']:.2f}, time x{result['checkpoint_time_ratio']:.2f}")
    if "autocast" in result:
        line += (f"; {result['autocast']} autocast {result['autocast_vs_float32']:.2f}x float32, gradient error "
                 f"{result['autocast_gradient_error']:.2e} (worst tensor {result['autocast_gradient_error_max']:.2e})")
    print(line)


def engine_rate(release_url: str, scan: tuple[int, int], clips: int, frames: int, repeats: int) -> float:
    """Scan-frames/s of the engine on `clips` random clips of `frames` frames of one scan, CPU float32, the fastest
    of `repeats` (the child process of :func:`bench_shared_cores`)."""
    release = Release.open(release_url)
    engine = load_engine(release, [scan], torch.device("cpu"), torch.float32)
    inputs = random_clips(clips, frames, 144, 256, seed=1)
    seconds, _ = best_time(lambda: engine.predict(inputs, [scan]), repeats, torch.device("cpu"),
                           Memory(torch.device("cpu")))
    return clips * frames / seconds


def bench_shared_cores(release_url: str, scan: tuple[int, int], clips: int, frames: int, repeats: int
                       ) -> dict[str, object]:
    """The engine in 1 and in 2 processes at once, each with one torch thread per core, under each OpenMP wait
    policy: ``{policy: {"alone": rate, "shared": summed rate}}`` plus the PASSIVE/ACTIVE ratios."""
    code = ("import sys; from jobs.bench import engine_rate; a = sys.argv[1:]; "
            "print(engine_rate(a[0], (int(a[1]), int(a[2])), *map(int, a[3:])))")
    args = [sys.executable, "-c", code, release_url, *map(str, (*scan, clips, frames, repeats))]
    threads = str(os.cpu_count() or 1)
    result: dict[str, object] = {"threads_per_process": int(threads)}
    for policy in ("ACTIVE", "PASSIVE"):
        env = dict(os.environ, OMP_WAIT_POLICY=policy, OMP_NUM_THREADS=threads)
        rates = {}
        for name, n in (("alone", 1), ("shared", 2)):
            children = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
            outs = [child.communicate()[0] for child in children]
            if any(child.returncode for child in children):
                raise RuntimeError(f"a --shared-cores child failed ({policy}, {name})")
            rates[name] = sum(float(out.strip().splitlines()[-1]) for out in outs)
        result[policy] = rates
        print(f"{'shared cores ' + policy:<34} alone {rates['alone']:8.1f}  two at once {rates['shared']:8.1f} "
              f"scan-frames/s")
    for name in ("alone", "shared"):
        result[f"passive_vs_active_{name}"] = result["PASSIVE"][name] / result["ACTIVE"][name]  # type: ignore[index]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run (< 3 minutes on a 2-core CPU)")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="engine dtypes, comma-separated (float32, bfloat16); the baseline is always float32")
    parser.add_argument("--scans", type=int, default=None, help="scans (default 4, quick 2)")
    parser.add_argument("--units", type=int, default=10_000, help="units per scan")
    parser.add_argument("--config", choices=["full", "tiny"], default="full",
                        help="network size (tiny: a check of the bookkeeping, not a benchmark; no --error-release "
                             "by default)")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default 16, quick 8)")
    parser.add_argument("--batches", default=None, help="clips per engine call, comma-separated (default 1,2,4,8)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each row; the fastest counts (default 3)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the Ray sweep row")
    parser.add_argument("--no-tuning", action="store_true", help="skip the tuning-job row")
    parser.add_argument("--training", action="store_true",
                        help="also time one training step (forward + backward, one stream, batch 4)")
    parser.add_argument("--training-frames", type=int, default=None,
                        help="frames per training window (default 4, quick 2; 100 is the public window)")
    parser.add_argument("--checkpoint-frames", type=int, default=None,
                        help="also time the training step with activation checkpointing every this many frames "
                             "(default: half the training window; 0: off)")
    parser.add_argument("--shared-cores", action="store_true",
                        help="also time the engine in two processes at once, OpenMP threads spinning vs sleeping")
    parser.add_argument("--error-release", default=None,
                        help="also report the bfloat16 error on this release's weights (default: the golden release "
                             "at $FNN_GOLDEN or ../shared/golden, when there)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtypes = {str(dtype).removeprefix("torch."): dtype for dtype in map(torch_dtype, args.dtypes.split(","))}
    n_scans = args.scans or (2 if args.quick else 4)
    frames = args.frames or (8 if args.quick else 16)
    batches = [int(b) for b in (args.batches or ("1,2,4" if args.quick else "1,2,4,8")).split(",")]
    scan_keys = [(100 + k, 1) for k in range(n_scans)]

    with tempfile.TemporaryDirectory(prefix="fnn-bench-") as tmp:
        root = Path(tmp)
        release_url = str(root / "release")
        from fnn_model.synthetic import make_release

        network = NetworkConfig.tiny() if args.config == "tiny" else NetworkConfig()
        make_release(release_url, [(s, i, args.units) for s, i in scan_keys], network, seed=0)
        release = Release.open(release_url)
        # the tiny config checks bookkeeping: a smaller matmul (a CPU bfloat16 2048^3 matmul takes seconds) suffices
        size = 512 if args.config == "tiny" else 2048
        peaks = {name: matmul_peak(device, dtype, size) for name, dtype in {"float32": torch.float32, **dtypes}.items()}
        flops = flops_per_scan_frame(release, scan_keys[0])
        memory = Memory(device)
        print(f"device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
              f"{flops / 1e9:.3f} GFLOP per scan-frame; matmul peak "
              + ", ".join(f"{name} {peak / 1e9:.1f}" for name, peak in peaks.items()) + " GFLOP/s")

        rows = [bench_baseline(release, scan_keys, frames, device, flops, peaks["float32"], memory, args.repeats)]
        print_row(rows[-1], header=True)
        curve, responses = [], {}
        for name, dtype in dtypes.items():
            engine = load_engine(release, scan_keys, device, dtype)
            for clips in batches:
                row, responses[name, clips] = bench_engine(engine, scan_keys, clips, frames, flops, peaks[name],
                                                           memory, args.repeats)
                curve.append(row)
                print_row(row)
            del engine
        best = max(curve, key=lambda r: r.scan_frames_per_s)
        rows += curve
        sweep = None
        if not args.no_sweep:
            per_item = best.clips * n_scans  # one scan per item: the best engine batch, in clips of that scan
            sweep = bench_sweep(release_url, root, scan_keys, 3 * per_item, frames, per_item, device, best.dtype,
                                flops, peaks[best.dtype], memory, args.repeats)  # 3 items per scan: I/O overlaps
            rows.append(sweep)
            print_row(sweep)
        tuning, tuning_analysis_s = None, None
        if not args.no_tuning:
            per_item = best.clips  # generated clips per item: the best engine batch
            tuning, tuning_analysis_s = bench_tuning(release_url, root, scan_keys, 3 * per_item, frames, per_item,
                                                     device, best.dtype, flops, peaks[best.dtype], memory,
                                                     args.repeats)
            rows.append(tuning)
            print_row(tuning)
        training = None
        if args.training:
            training_frames = args.training_frames or (2 if args.quick else 4)
            checkpoint = (args.checkpoint_frames if args.checkpoint_frames is not None
                          else max(1, training_frames // 2))
            training = bench_training(release, scan_keys[0], args.units, training_frames, 4, device, args.repeats,
                                      checkpoint or None, next((d for d in dtypes.values() if d != torch.float32),
                                                               None))
            print_training(training)
        shared = None
        if args.shared_cores:
            shared = bench_shared_cores(release_url, scan_keys[0], batches[-1], frames, args.repeats)

    def best_of(dtype: str) -> Row | None:
        return max((r for r in curve if r.dtype == dtype), key=lambda r: r.scan_frames_per_s, default=None)

    exact = {clips: responses[name, clips] for name, clips in responses if name == "float32"}
    approx = {clips: responses[name, clips] for name, clips in responses if name == "bfloat16"}
    bf16_error = max((max_rel_error(approx[c], exact[c]) for c in exact if c in approx), default=None)
    error_release = args.error_release or (default_error_release() if args.config == "full" else None)
    release_error = None
    if error_release and "bfloat16" in dtypes:
        release_error = release_bf16_error(error_release, device)
    baseline_rate = rows[0].scan_frames_per_s
    result = {
        "machine": {"device": str(device), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "settings": {"dtypes": list(dtypes), "scans": n_scans, "units": args.units, "frames": frames,
                     "batches": batches, "quick": args.quick, "repeats": args.repeats},
        "flops_per_scan_frame": flops,
        "matmul_peak_flops": peaks,
        "rows": [asdict(r) for r in rows],
        "baseline": asdict(rows[0]),
        "engine_best": asdict(best),
        "sweep": asdict(sweep) if sweep else None,
        "engine_vs_baseline": best.scan_frames_per_s / baseline_rate,
        **{f"engine_{name}_vs_baseline": best_of(name).scan_frames_per_s / baseline_rate for name in dtypes},
        "sweep_vs_engine": sweep.scan_frames_per_s / best.scan_frames_per_s if sweep else None,
        "tuning": asdict(tuning) if tuning else None,
        "tuning_vs_engine": tuning.scan_frames_per_s / best.scan_frames_per_s if tuning else None,
        "tuning_analysis_s": tuning_analysis_s,
        "training": training,
        "shared_cores": shared,
        "bfloat16_max_rel_error": bf16_error,
        "bfloat16_error_release": error_release,
        "bfloat16_max_rel_error_on_that_release": release_error,
    }
    ratio = f"engine/baseline {result['engine_vs_baseline']:.2f}x ({best.dtype})"
    ratio += "".join(f", {name} {result[f'engine_{name}_vs_baseline']:.2f}x" for name in dtypes)
    if sweep:
        ratio += f"; sweep/engine {result['sweep_vs_engine']:.2f}x"
    if tuning:
        ratio += (f"; tuning/engine {result['tuning_vs_engine']:.2f}x (then {tuning_analysis_s:.1f} s of merge and "
                  f"analysis for {n_scans * args.units:,} units)")
    if bf16_error is not None:
        ratio += f"; bfloat16 max relative error vs float32 {bf16_error:.2e}"
    print(ratio)
    if release_error is not None:
        print(f"bfloat16 max relative error vs float32 on {error_release}: {release_error:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=lambda v: None))
        print(f"wrote {args.json}")
    return result


def default_error_release() -> str | None:
    """The golden release ($FNN_GOLDEN or ../shared/golden next to the repository), if present."""
    root = Path(os.environ.get("FNN_GOLDEN") or Path(__file__).resolve().parents[2] / "shared" / "golden")
    return str(root / "release") if (root / "release").is_dir() else None


def print_row(row: Row, header: bool = False) -> None:
    if header:
        print(f"{'configuration':48s} {'scan-frames/s':>13s} {'GFLOP/s':>8s} {'of peak':>8s} {'peak MB':>8s}")
    print(f"{row.name:48s} {row.scan_frames_per_s:13.2f} {row.gflops:8.1f} {row.peak_fraction:8.1%} "
          f"{row.peak_memory_mb:8.0f}")


if __name__ == "__main__":
    main()
