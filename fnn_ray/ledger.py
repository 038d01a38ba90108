"""The commit ledger: which work items are done, whatever their reducer wrote.

A worker commits an item in two steps: the reducer's file goes into place atomically
(:func:`fnn_ray.storage.commit_bytes`), then a small JSON marker records what was written::

    <output>/_ledger/session=<s>/scan_idx=<i>/<part_id>.json
        {"item": [s, i, part_id], "file": "responses/session=.../part-<id>.parquet", "bytes": N, "rows": R,
         "committed": "2026-12-03T08:00:00+00:00"}

An item is committed when its marker exists AND its file still has the recorded size and a Parquet footer
(:meth:`Ledger.verify`): a truncated or replaced file makes the item pending again, so a resume recomputes it.
Files in a data directory that no marker names are *strays* (:meth:`Ledger.strays`): reported, never read by
:meth:`Ledger.committed_files`. The ledger knows nothing of the file layout a reducer chooses; every job uses it.
"""

from __future__ import annotations

import datetime as _dt
import json
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fnn_ray import storage
from fnn_ray.plan import Key

__all__ = ["LEDGER_DIR", "Commit", "Ledger", "parquet_bytes"]

#: Directory of the markers under the output URL (the leading '_' hides it from pyarrow.dataset).
LEDGER_DIR = "_ledger"

_PARQUET_MAGIC = b"PAR1"


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as a Parquet file (snappy; ``clip_id`` dictionary-encoded when present)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, min(table.num_rows, 1 << 20)), compression="snappy",
                   use_dictionary=[c for c in ("clip_id",) if c in table.column_names])
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class Commit:
    """One committed item: ``file`` (relative to the output URL) holds ``rows`` rows in ``bytes`` bytes."""

    key: Key
    file: str
    bytes: int
    rows: int
    committed: str = ""

    def to_json(self) -> str:
        return json.dumps({"item": list(self.key), "file": self.file, "bytes": self.bytes, "rows": self.rows,
                           "committed": self.committed})

    @classmethod
    def from_json(cls, text: str | bytes) -> Commit:
        d = json.loads(text)
        s, i, part_id = d["item"]
        return cls((int(s), int(i), str(part_id)), str(d["file"]), int(d["bytes"]), int(d["rows"]),
                   str(d.get("committed", "")))


class Ledger:
    """The commit markers of one output URL (``storage_options`` reach the store; never printed)."""

    def __init__(self, output_url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.output_url = output_url
        self.fs, self.root = storage.filesystem(output_url, storage_options)
        self.root = self.root.rstrip("/")

    def _marker(self, key: Key) -> str:
        s, i, part_id = key
        return posixpath.join(self.root, LEDGER_DIR, f"session={int(s)}", f"scan_idx={int(i)}", f"{part_id}.json")

    def path(self, file: str) -> str:
        """The store path of ``file`` (relative to the output URL)."""
        return posixpath.join(self.root, file)

    # ------------------------------------------------------------------ writing (workers)
    def commit_table(self, key: Key, file: str, table: pa.Table) -> Commit:
        """Commit ``table`` as the Parquet file ``file`` (relative to the output URL; atomically, replacing an
        earlier one) and record it as item ``key``'s commit."""
        data = parquet_bytes(table)
        storage.commit_bytes(self.fs, self.path(file), data)
        return self.record(key, file, len(data), table.num_rows)

    def record(self, key: Key, file: str, nbytes: int, rows: int) -> Commit:
        """Record that ``file`` (already in place) completes item ``key``; atomic, idempotent."""
        commit = Commit(key, file, int(nbytes), int(rows),
                        _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        marker = self._marker(key)
        storage.commit_bytes(self.fs, marker, commit.to_json().encode(),
                             posixpath.join(self.root, LEDGER_DIR, storage.STAGING_DIR))
        return commit

    def forget(self, keys: Iterable[Key]) -> None:
        """Remove the markers of ``keys`` (their items become pending)."""
        for key in keys:
            try:
                self.fs.rm_file(self._marker(key))
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ reading (driver, readers)
    def commits(self) -> dict[Key, Commit]:
        """Every marker, unverified (see :meth:`verify`)."""
        base = posixpath.join(self.root, LEDGER_DIR)
        self.fs.invalidate_cache(base)
        try:
            paths = [p for p in self.fs.find(base) if p.endswith(".json") and f"/{storage.STAGING_DIR}/" not in p]
        except FileNotFoundError:
            return {}
        if not paths:
            return {}
        out: dict[Key, Commit] = {}
        for path, data in self.fs.cat(paths, on_error="omit").items():
            try:
                commit = Commit.from_json(data)
            except (ValueError, KeyError, TypeError):
                continue  # a damaged marker: the item is simply not committed
            out[commit.key] = commit
        return out

    def verify(self, commits: Mapping[Key, Commit] | None = None) -> tuple[dict[Key, Commit], dict[Key, str]]:
        """Check each commit's file: it exists, has the recorded size and ends with a Parquet footer.

        Returns ``(good, bad)``: the commits that hold, and for the others the reason (``"size 10000, recorded
        20623"``...). Costs one listing per data directory and one 4-byte ranged read per file.
        """
        commits = self.commits() if commits is None else dict(commits)
        sizes = self._sizes({posixpath.dirname(self.path(c.file)) for c in commits.values()})
        good: dict[Key, Commit] = {}
        bad: dict[Key, str] = {}
        tails: dict[str, Key] = {}
        for key, commit in commits.items():
            path = self.path(commit.file)
            size = sizes.get(path)
            if size is None:
                bad[key] = f"{commit.file} is missing"
            elif size != commit.bytes:
                bad[key] = f"{commit.file} has {size} bytes, {commit.bytes} were committed"
            else:
                tails[path] = key
        if tails:
            paths = list(tails)
            ends = self.fs.cat_ranges(paths, [sizes[p] - 4 for p in paths], [sizes[p] for p in paths],
                                      on_error="return")
            for path, end in zip(paths, ends):
                key = tails[path]
                if isinstance(end, bytes) and end == _PARQUET_MAGIC:
                    good[key] = commits[key]
                else:
                    bad[key] = f"{commits[key].file} has no Parquet footer"
        return good, bad

    def strays(self, data_dir: str, commits: Mapping[Key, Commit]) -> list[str]:
        """Files under ``data_dir`` (relative to the output URL) that no commit names, staging objects excepted;
        relative to the output URL."""
        known = {c.file for c in commits.values()}
        base = self.path(data_dir)
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        rels = [p[len(self.root):].lstrip("/") for p in found if p.startswith(self.root)]
        return sorted(r for r in rels if r not in known and f"/{storage.STAGING_DIR}/" not in f"/{r}")

    def committed_files(self, data_dir: str) -> list[Commit]:
        """The verified commits whose file lies under ``data_dir`` (relative to the output URL), in key order;
        a commit's file is at ``ledger.path(commit.file)`` on ``ledger.fs``."""
        good, _ = self.verify()
        prefix = data_dir.rstrip("/") + "/"
        return [c for _, c in sorted(good.items()) if c.file.startswith(prefix)]

    def _sizes(self, dirs: Iterable[str]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for d in dirs:
            self.fs.invalidate_cache(d)
            try:
                listing = self.fs.ls(d, detail=True)
            except FileNotFoundError:
                continue
            for entry in listing:
                if entry.get("type") == "file":
                    sizes[entry["name"].rstrip("/")] = int(entry["size"])
        return sizes
