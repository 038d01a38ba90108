"""Committed results: the one reader of a job's item files (it checks that every item is committed) and the
writers of a job's final outputs (committed atomically; a rerun rewrites them identically).

* :func:`committed_tables`: ``(key, table)`` of every item of a job, ValueError naming the first item that is
  not committed; commits of other items in the output are left out;
* :func:`write_file`, :func:`write_table`, :func:`csv_bytes`: a job's final files;
* :func:`read_results`: an analysis table of every scan (``ori_dir_tuning``, ``receptive_fields``, ``performance``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fnn_ray import storage
from fnn_ray.ledger import Ledger, parquet_bytes
from fnn_ray.plan import Key, Scan, build_items

if TYPE_CHECKING:
    from fnn_ray.job import Job

__all__ = ["committed_tables", "csv_bytes", "read_results", "write_file", "write_table"]


def committed_tables(job: Job, storage_options: Mapping[str, Any] | None = None) -> Iterator[tuple[Key, pa.Table]]:
    """``(key, table)`` of every committed item of ``job`` in commit order; ValueError (before any table is read)
    naming the first item of the job that is not committed."""
    planned = {item.key for item in build_items(job.scans, job.parts)}
    ledger = Ledger(job.output_url, storage_options)
    commits = [c for c in ledger.committed_files(job.reducer.data_dir) if c.key in planned]
    missing = planned - {c.key for c in commits}
    if missing:
        key = min(missing)
        raise ValueError(f"item {key[0]}-{key[1]}/{key[2]} is not committed under "
                         f"{storage.redact_url(job.output_url)}: run the job to the end first")
    for commit in commits:
        with ledger.fs.open(ledger.path(commit.file), "rb") as f:
            yield commit.key, pq.read_table(f)


def write_file(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> str:
    """Commit ``data`` at ``url`` atomically; return ``url``."""
    fs, path = storage.filesystem(url, storage_options)
    storage.commit_bytes(fs, path, data)
    return url


def write_table(output_url: str, data_dir: str, scan: Scan, frame: pd.DataFrame,
                storage_options: Mapping[str, Any] | None = None) -> str:
    """Commit one scan's table as ``OUTPUT/<data_dir>/session=<s>/scan_idx=<i>/units.parquet``."""
    url = storage.join(output_url, data_dir, f"session={scan[0]}", f"scan_idx={scan[1]}", "units.parquet")
    return write_file(url, parquet_bytes(pa.Table.from_pandas(frame, preserve_index=False)), storage_options)


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
    dataset = ds.dataset([p for p in fs.find(root) if p.endswith("/units.parquet")], filesystem=fs,
                         format="parquet", partitioning=ds.partitioning(flavor="hive"), partition_base_dir=root)
    return dataset.to_table(filter=filter).to_pandas()
