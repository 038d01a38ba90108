"""Progress display of a sweep: a tqdm bar in scan-frames, and the final summary printout.

A *scan-frame* is one stimulus frame through the model of one scan; an item (one scan x one shard) is worth
its shard's frame count. The bar's total is the scan-frames still to compute, so its rate is scan-frames/s
and its ETA is by work, not by item count; the postfix shows items done/total and failures.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from fnn_ray.driver import SweepSummary

__all__ = ["Progress", "format_summary", "read_snippet"]


class Progress:
    """A tqdm bar over ``scan_frames`` scan-frames of ``items`` items (``enabled=False``: silent)."""

    def __init__(self, items: int, scan_frames: int, enabled: bool = True, file: TextIO | None = None) -> None:
        self.items, self.done, self.failed = items, 0, 0
        self._bar = None
        if enabled and items:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=scan_frames, unit="scan-frame", unit_scale=True, dynamic_ncols=True,
                desc="sweep", file=file or sys.stderr, smoothing=0.1,
            )
            self._postfix()

    def _postfix(self) -> None:
        if self._bar is not None:
            text = f"items {self.done}/{self.items}"
            if self.failed:
                text += f", {self.failed} failed"
            self._bar.set_postfix_str(text, refresh=False)

    def update(self, scan_frames: int, failed: bool = False) -> None:
        """One item finished (``failed``: it did not commit) worth ``scan_frames``."""
        self.done += 1
        self.failed += int(failed)
        if self._bar is not None:
            self._postfix()
            self._bar.update(scan_frames)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_snippet(output_url: str) -> str:
    """A short pandas / pyarrow snippet that reads the responses written under ``output_url``."""
    from fnn_ray.responses import responses_url
    from fnn_ray.storage import redact_url

    url = redact_url(responses_url(output_url))
    return (
        "import pyarrow.dataset as ds, pandas as pd, numpy as np\n"
        f"table = ds.dataset({url!r}, format='parquet', partitioning='hive').to_table()\n"
        "df = table.to_pandas()   # columns: clip_id, unit_id, readout_id, response (float32 per frame), "
        "session, scan_idx\n"
        "one = df[(df.session == df.session[0]) & (df.clip_id == df.clip_id[0])]\n"
        "rates = np.stack(one.sort_values('readout_id').response)   # [units, frames] of one clip and scan\n"
        "# or: from fnn_ray.responses import read_responses; read_responses(OUTPUT_URL)"
    )


def format_summary(summary: SweepSummary) -> str:
    """The end-of-run printout: items, scan-frames, wall time, rate, failures, and how to read the output."""
    from fnn_ray.storage import redact_url

    s = summary
    lines = [
        "",
        f"fnn-ray sweep {'finished' if s.ok else 'FAILED' if s.failed else 'stopped'}: "
        f"{s.items_done} item(s) computed, {s.items_skipped} already committed, {s.items_failed} failed, "
        f"{s.items_total} in total ({len(s.scans)} scan(s) x {s.shards} shard(s))",
        f"  scan-frames: {s.scan_frames:,} (frames x scans) in {s.wall_s:.1f} s wall, {s.compute_s:.1f} s on the "
        f"workers = {s.scan_frames_per_s:,.1f} scan-frames/s",
        f"  workers: {s.actors} actor(s) on {s.device}; {s.actor_restarts} restart(s), {s.steals} steal(s), "
        f"{s.requeued} requeued, {s.retries} retry(ies); peak worker memory {s.peak_memory_mb:,.0f} MiB",
    ]
    if s.failures:
        lines.append(f"  {len(s.failures)} item(s) failed and were NOT committed:")
        lines += [f"    - {message}" for message in s.failures[:20]]
        if len(s.failures) > 20:
            lines.append(f"    ... and {len(s.failures) - 20} more")
        lines.append("  fix the data, then rerun the same command: only the missing items are computed.")
    if s.pending and not s.failures:
        lines.append(f"  {s.pending} item(s) not computed yet: rerun the same command to finish.")
    lines.append(f"  output: {redact_url(s.responses_url)}  (manifest: {redact_url(s.manifest_url)})")
    lines.append("  read it with:")
    lines += ["    " + line for line in read_snippet(s.output_url).splitlines()]
    return "\n".join(lines)
