"""Committed results: the one reader of a job's item files (it checks that every item is committed) and the
writers of a job's final outputs (committed atomically; a rerun rewrites them identically).

* :func:`committed`: the commits of a set of planned items, ValueError naming how many and which are not
  committed; commits of other items in the output are left out;
* :func:`committed_tables`: ``(key, table)`` of every item of a job (its items checked by :func:`committed`);
* :func:`write_file`, :func:`write_table`, :func:`csv_bytes`, :func:`files_url`: a job's final files;
* :func:`read_results`: an analysis table of every scan (``ori_dir_tuning``, ``receptive_fields``, ``performance``).

Every analysis result folder is a Parquet dataset, one row per unit::

    OUTPUT/<result>/scan-<session>-<scan_idx>.parquet    session, scan_idx, unit_id, readout_id, ...
    OUTPUT/<result>/_files/                               metadata.json, units.csv, plots/*.png

so ``pandas.read_parquet("OUTPUT/<result>")`` and ``pyarrow.dataset.dataset("OUTPUT/<result>",
format="parquet")`` read every scan (both skip names starting with ``_``), with ``session`` and ``scan_idx``
as ordinary columns.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fnn_ray import storage
from fnn_ray.ledger import Commit, Ledger, parquet_bytes
from fnn_ray.plan import Key, Scan, build_items

if TYPE_CHECKING:
    from fnn_ray.job import Job

__all__ = ["FILES_DIR", "committed", "committed_tables", "csv_bytes", "files_url", "read_results", "write_file",
           "write_table"]

#: The folder of a result's figures, CSV and metadata, beside its Parquet files (dataset readers skip ``_``).
FILES_DIR = "_files"
#: How many missing items an error names.
SHOWN_MISSING = 5


def committed(ledger: Ledger, data_dir: str, planned: Sequence[Key], job: str) -> list[Commit]:
    """The commits of the ``planned`` items of a ``job`` (its name, e.g. ``"sweep"``; their files under
    ``data_dir``), in plan order; ValueError (one line, before anything is read) naming how many and which of them
    are not committed."""
    commits = {c.key: c for c in ledger.committed_files(data_dir)}
    missing = [key for key in planned if key not in commits]
    if missing:
        names = ", ".join(f"{s}-{i}/{part}" for s, i, part in missing[:SHOWN_MISSING])
        more = f" and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        shown = storage.redact_url(ledger.output_url)
        raise ValueError(f"{job} {shown} is incomplete: {len(missing)} of {len(planned)} planned item(s) not "
                         f"committed: {names}{more}; rerun the {job} to finish it")
    return [commits[key] for key in planned]


def committed_tables(job: Job, storage_options: Mapping[str, Any] | None = None) -> Iterator[tuple[Key, pa.Table]]:
    """``(key, table)`` of every item of ``job`` in plan order; ValueError (before any table is read) when some
    item is not committed (see :func:`committed`)."""
    ledger = Ledger(job.output_url, storage_options)
    planned = [item.key for item in build_items(job.scans, job.parts)]
    for commit in committed(ledger, job.reducer.data_dir, planned, job.name):
        with ledger.fs.open(ledger.path(commit.file), "rb") as f:
            yield commit.key, pq.read_table(f)


def write_file(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> str:
    """Commit ``data`` at ``url`` atomically; return ``url``."""
    fs, path = storage.filesystem(url, storage_options)
    storage.commit_bytes(fs, path, data)
    return url


def write_table(output_url: str, data_dir: str, scan: Scan, frame: pd.DataFrame,
                storage_options: Mapping[str, Any] | None = None) -> str:
    """Commit one scan's table as ``OUTPUT/<data_dir>/scan-<s>-<i>.parquet``, with int64 ``session`` and
    ``scan_idx`` columns first (one row per unit); returns its URL."""
    frame = frame.drop(columns=["session", "scan_idx"], errors="ignore")
    frame.insert(0, "scan_idx", np.int64(scan[1]))
    frame.insert(0, "session", np.int64(scan[0]))
    url = storage.join(output_url, data_dir, f"scan-{scan[0]}-{scan[1]}.parquet")
    return write_file(url, parquet_bytes(pa.Table.from_pandas(frame, preserve_index=False)), storage_options)


def files_url(output_url: str, data_dir: str, *names: str) -> str:
    """``OUTPUT/<data_dir>/_files/<names...>``: where a result's figures, CSV and metadata go."""
    return storage.join(output_url, data_dir, FILES_DIR, *names)


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` as CSV (no index)."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def read_results(output_url: str, data_dir: str, storage_options: Mapping[str, Any] | None = None,
                 filter: Any = None) -> pd.DataFrame:
    """An analysis table (``ori_dir_tuning``, ``receptive_fields``, ``performance``) of every scan as one
    DataFrame with ``session`` / ``scan_idx`` columns (``filter``: a ``pyarrow.dataset`` expression on them)."""
    import pyarrow.dataset as ds

    fs, root = storage.filesystem(storage.join(output_url, data_dir), storage_options)
    return ds.dataset(root, filesystem=fs, format="parquet").to_table(filter=filter).to_pandas()
