"""The response dataset: predicted responses written as hive-partitioned Parquet under the output URL.

Layout (``<output>`` is the run's output URL; ``manifest.json`` sits next to ``responses/``, which is why the
Parquet dataset has its own directory)::

    <output>/responses/session=<s>/scan_idx=<i>/part-<item_id>.parquet
    <output>/responses/_staging/...          # in-flight writes; ignored by pyarrow.dataset and by this module

One row per (clip, unit), ordered by clip (in the item's order) then ``readout_id``:

=============== ================= ===========================================================
``clip_id``     string            the stimulus clip
``unit_id``     int64             the unit (from the release's ``units.csv``)
``readout_id``  int32             the unit's readout index within its scan
``response``    list<float32>     predicted response for every frame of the clip, length T_clip
=============== ================= ===========================================================

``session`` / ``scan_idx`` are not stored in the files: they are hive partition columns (int32 when read with
:func:`read_responses`). Read the dataset with ``pyarrow.dataset.dataset(responses_url(out),
partitioning="hive")`` or ``pandas.read_parquet(responses_url(out))``.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from fnn_ray import storage

__all__ = [
    "RESPONSES_DIR",
    "SCHEMA",
    "PARTITION_SCHEMA",
    "committed_items",
    "read_responses",
    "response_path",
    "responses_url",
    "write_responses",
]

#: Subdirectory of the output URL that holds the response dataset.
RESPONSES_DIR = "responses"

#: Columns stored in each part file.
SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("unit_id", pa.int64()),
        ("readout_id", pa.int32()),
        ("response", pa.list_(pa.float32())),
    ]
)
#: Hive partition columns (directory names).
PARTITION_SCHEMA = pa.schema([("session", pa.int32()), ("scan_idx", pa.int32())])

_ITEM_ID = re.compile(r"^[A-Za-z0-9._=-]+$")
_PART = re.compile(r"^session=(-?\d+)/scan_idx=(-?\d+)/part-([A-Za-z0-9._=-]+)\.parquet$")


def responses_url(output_url: str) -> str:
    """URL of the response dataset (hive-partitioned Parquet) under ``output_url``."""
    return storage.join(output_url, RESPONSES_DIR)


def response_path(output_url: str, session: int, scan_idx: int, item_id: str) -> str:
    """URL of the part file of one work item."""
    return storage.join(
        responses_url(output_url), f"session={int(session)}", f"scan_idx={int(scan_idx)}", f"part-{item_id}.parquet"
    )


def _response_table(
    clip_ids: Sequence[str],
    responses: Sequence[np.ndarray],
    unit_ids: np.ndarray,
    readout_ids: np.ndarray,
) -> pa.Table:
    if len(clip_ids) != len(responses):
        raise ValueError(f"{len(clip_ids)} clip ids but {len(responses)} response arrays")
    if not clip_ids:
        raise ValueError("no clips given")
    unit_ids = np.asarray(unit_ids)
    readout_ids = np.asarray(readout_ids)
    if unit_ids.ndim != 1 or readout_ids.shape != unit_ids.shape:
        raise ValueError(f"unit_ids {unit_ids.shape} and readout_ids {readout_ids.shape} must both be [U]")
    U = unit_ids.shape[0]
    if U == 0:
        raise ValueError("no units given")
    if len(np.unique(readout_ids)) != U:
        raise ValueError("readout_ids must be unique")
    order = np.argsort(readout_ids, kind="stable")
    identity = bool(np.all(order == np.arange(U)))
    lengths = []
    for cid, r in zip(clip_ids, responses):
        r = np.asarray(r)
        if r.ndim != 2 or r.shape[1] != U or r.shape[0] == 0:
            raise ValueError(f"clip {cid!r}: response must be [T, U={U}] with T > 0, got {r.shape}")
        lengths.append(r.shape[0])
    C = len(clip_ids)
    total = U * sum(lengths)
    if total > np.iinfo(np.int32).max:
        raise ValueError(f"item too large for one part file: {total} response values (limit 2**31 - 1)")

    # One flat float32 buffer [sum_c U*T_c]; rows (clip, unit) in order, each row the T_c frames of a unit.
    flat = np.empty(total, dtype=np.float32)
    pos = 0
    for r, T in zip(responses, lengths):
        r = np.asarray(r)
        dst = flat[pos : pos + U * T].reshape(U, T)
        dst[...] = r.T if identity else r.T[order]
        pos += U * T
    offsets = np.zeros(C * U + 1, dtype=np.int32)
    np.cumsum(np.repeat(np.asarray(lengths, dtype=np.int32), U), out=offsets[1:])
    response = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))

    clip_index = np.repeat(np.arange(C, dtype=np.int32), U)
    clip_col = pc.take(pa.array(list(clip_ids), pa.string()), pa.array(clip_index))
    unit_col = pa.array(np.tile(unit_ids[order].astype(np.int64, copy=False), C))
    readout_col = pa.array(np.tile(readout_ids[order].astype(np.int32, copy=False), C))
    return pa.Table.from_arrays([clip_col, unit_col, readout_col, response], schema=SCHEMA)


def write_responses(
    output_url: str,
    session: int,
    scan_idx: int,
    item_id: str,
    clip_ids: Sequence[str],
    responses: Sequence[np.ndarray],
    unit_ids: np.ndarray,
    readout_ids: np.ndarray,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write one work item's responses and commit the part file atomically; return its URL.

    ``responses[c]`` is the float ``[T_c, U]`` prediction for ``clip_ids[c]`` (every frame of the clip);
    ``unit_ids`` (int64 ``[U]``) and ``readout_ids`` (int32 ``[U]``) label its columns. Rows are written in
    clip order, then by ``readout_id``. Writing the same ``(session, scan_idx, item_id)`` again replaces the
    file (no duplicate rows).
    """
    if not isinstance(item_id, str) or not _ITEM_ID.match(item_id):
        raise ValueError(f"item_id must match {_ITEM_ID.pattern}, got {item_id!r}")
    table = _response_table(clip_ids, responses, unit_ids, readout_ids)
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=max(1, min(table.num_rows, 1 << 20)),
        use_dictionary=["clip_id"],
        compression="snappy",
    )
    fs, root = storage.filesystem(responses_url(output_url), storage_options)
    rel = f"session={int(session)}/scan_idx={int(scan_idx)}/part-{item_id}.parquet"
    storage.commit_bytes(fs, posixpath.join(root, rel), sink.getvalue(), posixpath.join(root, storage.STAGING_DIR))
    return response_path(output_url, session, scan_idx, item_id)


def committed_items(
    output_url: str, storage_options: Mapping[str, Any] | None = None
) -> set[tuple[int, int, str]]:
    """The ``(session, scan_idx, item_id)`` of every committed part file (staging files are ignored)."""
    fs, root = storage.filesystem(responses_url(output_url), storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    try:
        paths = fs.find(root)
    except FileNotFoundError:
        return set()
    out = set()
    for p in paths:
        rel = p.rstrip("/")[len(root) :].lstrip("/") if p.startswith(root) else ""
        m = _PART.match(rel)
        if m:
            out.add((int(m.group(1)), int(m.group(2)), m.group(3)))
    return out


def read_responses(
    output_url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
    filter: ds.Expression | None = None,
) -> pa.Table:
    """Read the whole response dataset (or ``columns`` / rows matching ``filter``) into one Table.

    Columns: ``clip_id, unit_id, readout_id, response`` plus the partition columns ``session, scan_idx``
    (int32). An output without responses yields an empty table with that schema.
    """
    fs, root = storage.filesystem(responses_url(output_url), storage_options)
    fs.invalidate_cache(root)
    full = pa.schema(list(SCHEMA) + list(PARTITION_SCHEMA))
    if not committed_items(output_url, storage_options):
        table = full.empty_table()
        return table.select(list(columns)) if columns is not None else table
    dataset = ds.dataset(
        root,
        filesystem=fs,
        format="parquet",
        schema=full,
        partitioning=ds.partitioning(PARTITION_SCHEMA, flavor="hive"),
    )
    return dataset.to_table(columns=list(columns) if columns is not None else None, filter=filter)
