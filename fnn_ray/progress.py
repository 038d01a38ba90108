"""What a job tells its user: the plan before it computes, progress while it runs, the summary at the end.

Progress is counted in *scan-frames* (one stimulus frame through the model of one scan; an item is worth its
part's frames). On a terminal it is a tqdm bar; in a log (``ray job logs``, CI, a file) it is one line every
``log_every_s`` seconds or 5% of the work, whichever comes first, with the rate and an ETA at the measured rate.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from fnn_ray.job import Job, JobSummary

__all__ = ["Progress", "format_bytes", "format_plan", "format_summary"]


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Progress over ``scan_frames`` scan-frames of ``items`` items (``enabled=False``: silent)."""

    def __init__(self, items: int, scan_frames: int, enabled: bool = True, file: TextIO | None = None,
                 desc: str = "run", log_every_s: float = 10.0) -> None:
        self.items, self.total, self.done, self.failed, self.frames = items, scan_frames, 0, 0, 0
        self.file = file or sys.stderr
        self.enabled, self.desc, self.log_every_s = enabled and items > 0, desc, log_every_s
        self._start = time.monotonic()
        self._last_line, self._last_fraction = self._start, 0.0
        self._bar = None
        if self.enabled and self.file.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=scan_frames, unit="scan-frame", unit_scale=True, dynamic_ncols=True, desc=desc,
                             file=self.file, smoothing=0.1)
            self._postfix()

    def _postfix(self) -> None:
        if self._bar is not None:
            text = f"items {self.done}/{self.items}" + (f", {self.failed} failed" if self.failed else "")
            self._bar.set_postfix_str(text, refresh=False)

    def update(self, scan_frames: int, failed: bool = False) -> None:
        """One item finished (``failed``: it did not commit) worth ``scan_frames``."""
        self.done += 1
        self.failed += int(failed)
        self.frames += scan_frames
        if self._bar is not None:
            self._postfix()
            self._bar.update(scan_frames)
        self.tick()

    def line(self) -> str:
        """``"tuning: 12/48 items (25%), 1,234 scan-frames/s, ETA 3m05s"``."""
        elapsed = time.monotonic() - self._start
        fraction = self.frames / self.total if self.total else 1.0
        rate = self.frames / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {_duration((self.total - self.frames) / rate)}" if rate > 0 and self.frames < self.total else ""
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{self.desc}: {self.done}/{self.items} items ({100 * fraction:.0f}%){failed}, "
                f"{rate:,.1f} scan-frames/s{eta}")

    def tick(self) -> None:
        """In a log: print :meth:`line` when ``log_every_s`` passed or 5% more work is done since the last one."""
        if not self.enabled or self._bar is not None or not self.done:
            return
        now, fraction = time.monotonic(), self.frames / self.total if self.total else 1.0
        if now - self._last_line >= self.log_every_s or fraction - self._last_fraction >= 0.05 or \
                self.done == self.items and self._last_fraction < 1.0:
            self._last_line, self._last_fraction = now, fraction
            print(self.line(), file=self.file, flush=True)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        elif self.enabled:
            print(message, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_plan(job: Job, summary: JobSummary, scan_frames: int) -> str:
    """What a job is about to do: scans, units, clips, frames, ``scan_frames`` (over all its items) and the size
    of its output."""
    from fnn_ray.storage import redact_url

    scans = ", ".join(f"{s}-{i}" for s, i in summary.scans)
    size = sum(u for _, u in job.scans) * (job.frames * job.bytes_per_unit_frame + job.bytes_per_unit)
    to_do = summary.items_total - summary.items_skipped
    lines = [
        f"fnn-ray {job.name}: {len(summary.scans)} scan(s) ({scans}), {summary.units:,} units; {job.clips:,} clips, "
        f"{job.frames:,} frames -> {scan_frames:,} scan-frames",
        f"  {summary.items_total} item(s) ({len(summary.scans)} scan(s) x {summary.parts} part(s)): "
        f"{summary.items_skipped} already committed, {to_do} to compute",
        f"  output {redact_url(job.output_url)}: about {format_bytes(size)} in {job.reducer.data_dir}/",
    ]
    lines += [f"  recomputing a damaged commit: {r}" for r in summary.repaired]
    if summary.strays:
        lines.append(f"  WARNING: {len(summary.strays)} file(s) in {job.reducer.data_dir}/ were not written by a "
                     f"commit and are ignored (read results with fnn_ray's readers, or delete them): "
                     + ", ".join(summary.strays[:5]) + (" ..." if len(summary.strays) > 5 else ""))
    lines += [f"  WARNING: {w}" for w in summary.warnings]
    return "\n".join(lines)


def format_summary(summary: JobSummary) -> str:
    """The end-of-run printout: items, scan-frames, wall time, rate, failures and what to do next."""
    from fnn_ray.storage import redact_url

    s, run = summary, summary.execution
    state = ("interrupted" if s.interrupted else "finished" if s.ok else "FAILED" if s.items_failed or s.failures
             else "stopped")
    lines = [
        "",
        f"fnn-ray {s.job} {state}: {s.items_done} item(s) computed, {s.items_skipped} already committed, "
        f"{s.items_failed} failed, {s.pending} pending; {s.items_total} in total ({len(s.scans)} scan(s) x "
        f"{s.parts} part(s))",
    ]
    if run is not None:
        lines += [
            f"  scan-frames: {run.scan_frames:,} in {s.wall_s:.1f} s wall, {run.compute_s:.1f} s on the workers = "
            f"{s.scan_frames_per_s:,.1f} scan-frames/s",
            f"  workers: {run.actors} on {run.device}; {run.actor_restarts} restart(s), {run.steals} steal(s), "
            f"{run.requeued} requeued, {run.retries} retry(ies); peak worker memory {run.peak_memory_mb:,.0f} MiB",
        ]
        if run.frame_bytes:
            lines.append(f"  stimulus reads: {format_bytes(run.bytes_read)} for {format_bytes(run.frame_bytes)} of "
                         f"frames ({run.bytes_read / run.frame_bytes:.2f} bytes read per frame byte)")
    if s.failures:
        lines.append(f"  {len(s.failures)} problem(s); failed items were NOT committed:")
        lines += [f"    - {message}" for message in s.failures[:20]]
        if len(s.failures) > 20:
            lines.append(f"    ... and {len(s.failures) - 20} more")
        store = run is not None and run.store_failures
        data = s.items_failed - (run.store_failures if run else 0)
        if store:
            lines.append(f"  {run.store_failures} item(s) failed because the store was unreachable: rerun the same "
                         f"command when it is back; only the missing items are computed.")
        if data > 0:
            lines.append("  fix the data named above, then rerun the same command: only the missing items are "
                         "computed.")
    if s.interrupted:
        lines.append(f"  stopped by {s.interrupted}: {s.committed} of {s.items_total} item(s) are committed; rerun "
                     f"the same command to resume.")
    elif s.pending and not s.failures:
        lines.append(f"  {s.pending} item(s) not computed yet: rerun the same command to finish.")
    lines += [f"  WARNING: {w}" for w in s.warnings]
    where = redact_url(s.output_url) + ("" if s.data_dir.startswith("_") else f"/{s.data_dir}")  # partials: internal
    lines.append(f"  output: {where}  (manifest: {redact_url(s.manifest_url)})")
    return "\n".join(lines)
