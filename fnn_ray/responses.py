"""The response dataset: predicted responses written as hive-partitioned Parquet under the output URL.

Layout (``<output>`` is the run's output URL; ``manifest.json`` sits next to ``responses/``, which is why the
Parquet dataset has its own directory)::

    <output>/responses/session=<s>/scan_idx=<i>/<part_id>.parquet      # part_id: e.g. part-00000.000000-000008
    <output>/responses/session=<s>/scan_idx=<i>/_staging/...   # in-flight writes (ignored by pyarrow.dataset)
    <output>/_ledger/...                                       # the commits (fnn_ray.ledger)

One row per (clip, unit), ordered by clip (in the item's order) then ``readout_id``:

=============== ================= ===========================================================
``clip_id``     string            the stimulus clip
``unit_id``     int64             the unit (from the release's ``units.csv``)
``readout_id``  int32             the unit's readout index within its scan
``response``    list<float32>     predicted response for every frame of the clip, length T_clip
=============== ================= ===========================================================

``session`` / ``scan_idx`` are not stored in the files: they are hive partition columns (int32 when read with
:func:`read_responses`). Read the dataset with ``pyarrow.dataset.dataset(responses_url(out),
partitioning="hive")``, or better :func:`read_responses`, which reads only committed parts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from fnn_ray import storage
from fnn_ray.ledger import Ledger

__all__ = [
    "RESPONSES_DIR",
    "SCHEMA",
    "PARTITION_SCHEMA",
    "read_responses",
    "response_table",
    "responses_url",
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



def responses_url(output_url: str) -> str:
    """URL of the response dataset (hive-partitioned Parquet) under ``output_url``."""
    return storage.join(output_url, RESPONSES_DIR)


def response_table(
    clip_ids: Sequence[str],
    responses: Sequence[np.ndarray],
    unit_ids: np.ndarray,
    readout_ids: np.ndarray,
) -> pa.Table:
    """The rows of one item: ``responses[c]`` is the float ``[T_c, U]`` prediction for ``clip_ids[c]``;
    ``unit_ids`` (int64 ``[U]``) and ``readout_ids`` (int32 ``[U]``) label its columns. Rows in clip order,
    then by ``readout_id``."""
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


def read_responses(
    output_url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
    filter: ds.Expression | None = None,
) -> pa.Table:
    """Read the committed part files (or ``columns`` / rows matching ``filter``) into one Table.

    Only files that the ledger records as committed and intact are read: a stray copy or a truncated part in
    the directory is never returned. Columns: ``clip_id, unit_id, readout_id, response`` plus the partition
    columns ``session, scan_idx`` (int32). An output without responses yields an empty table with that schema.
    For large outputs filter on ``session`` / ``scan_idx`` / ``clip_id`` instead of reading everything.
    """
    full = pa.schema(list(SCHEMA) + list(PARTITION_SCHEMA))
    ledger = Ledger(output_url, storage_options)
    files = [ledger.path(c.file) for c in ledger.committed_files(RESPONSES_DIR)]
    if not files:
        table = full.empty_table()
        return table.select(list(columns)) if columns is not None else table
    dataset = ds.dataset(
        files,
        filesystem=ledger.fs,
        format="parquet",
        schema=full,
        partitioning=ds.partitioning(PARTITION_SCHEMA, flavor="hive"),
        partition_base_dir=ledger.path(RESPONSES_DIR),
    )
    return dataset.to_table(columns=list(columns) if columns is not None else None, filter=filter)


def read_snippet(output_url: str) -> str:
    """How to read the responses under ``output_url`` without loading everything (printed after a sweep)."""
    out = storage.redact_url(output_url)
    return (
        "read it with:\n"
        "    from fnn_ray.responses import read_responses\n"
        "    import pyarrow.dataset as ds, numpy as np\n"
        f"    t = read_responses({out!r}, filter=(ds.field('session') == 8) & (ds.field('scan_idx') == 5))\n"
        "    df = t.to_pandas()   # clip_id, unit_id, readout_id, response (float32 per frame), session, scan_idx\n"
        "    one = df[df.clip_id == df.clip_id.iloc[0]].sort_values('readout_id')\n"
        "    rates = np.stack(one.response)   # [units, frames] of one clip and scan"
    )
