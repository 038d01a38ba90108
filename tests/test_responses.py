"""fnn_ray.responses (hive-partitioned response dataset) and fnn_ray.manifest (run manifest)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from fnn_ray import manifest, responses, storage
from fnn_ray.ledger import Ledger
from fnn_ray.manifest import Manifest
from faults import committed


def make_item(U=5, lengths=(4, 6, 3), seed=0, shuffle=True):
    """Responses [T_c, U] for clips c, units with ids 100+k and (shuffled) readout ids."""
    rng = np.random.default_rng(seed)
    clip_ids = [f"clip-{seed}-{c}" for c in range(len(lengths))]
    resp = [rng.standard_normal((T, U)).astype(np.float32) for T in lengths]
    readout_ids = rng.permutation(U).astype(np.int32) if shuffle else np.arange(U, dtype=np.int32)
    unit_ids = (1000 + 7 * readout_ids).astype(np.int64)  # unit id is a function of the readout id
    return clip_ids, resp, unit_ids, readout_ids


def write_item(output_url, session, scan_idx, part_id, clip_ids, resp, unit_ids, readout_ids, storage_options=None):
    """Commit one item's responses as a sweep's worker does (its reducer's table, then the ledger); its URL."""
    file = f"{responses.RESPONSES_DIR}/session={session}/scan_idx={scan_idx}/{part_id}.parquet"
    table = responses.response_table(clip_ids, resp, unit_ids, readout_ids)
    Ledger(output_url, storage_options).commit_table((session, scan_idx, part_id), file, table)
    return storage.join(output_url, file)


def expected_rows(session, scan_idx, clip_ids, resp, unit_ids, readout_ids):
    """The rows write_item must produce, in order: by clip, then readout_id."""
    rows = []
    order = np.argsort(readout_ids)
    for cid, r in zip(clip_ids, resp):
        for k in order:
            rows.append((cid, int(unit_ids[k]), int(readout_ids[k]), r[:, k].tolist(), session, scan_idx))
    return rows


def table_rows(table):
    d = table.to_pydict()
    return list(zip(d["clip_id"], d["unit_id"], d["readout_id"], d["response"], d["session"], d["scan_idx"]))


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_round_trip(kind, tmp_url):
    out = tmp_url(kind, "out")
    item = make_item()
    url = write_item(out, 4, 7, "part-00000.000000-000003", *item)
    assert url == storage.join(out, "responses", "session=4", "scan_idx=7", "part-00000.000000-000003.parquet")

    table = responses.read_responses(out)
    assert table.schema == pa.schema(list(responses.SCHEMA) + list(responses.PARTITION_SCHEMA))
    assert table_rows(table) == expected_rows(4, 7, *item)
    assert committed(out) == {(4, 7, "part-00000.000000-000003")}

    # the part file itself holds exactly the 4 data columns with the contract types, in order
    fs, _ = storage.filesystem(url)
    with storage.open_parquet(fs, storage.filesystem(url)[1]) as pf:
        assert pf.schema_arrow == responses.SCHEMA
        d = pf.read().to_pydict()
    assert d["clip_id"] == [r[0] for r in expected_rows(4, 7, *item)]
    assert d["readout_id"] == [r[2] for r in expected_rows(4, 7, *item)]


def test_several_items_and_scans_via_pyarrow_dataset_and_pandas(tmp_url):
    out = tmp_url("local", "out")
    items = {
        (4, 7, "a.000000-000003"): make_item(U=5, seed=1),
        (4, 7, "b.000000-000002"): make_item(U=5, lengths=(2, 2), seed=2),
        (8, 5, "a.000000-000003"): make_item(U=3, seed=3),
    }
    for (s, i, part_id), item in items.items():
        write_item(out, s, i, part_id, *item)
    assert committed(out) == set(items)
    expected = sorted(r for (s, i, _), item in items.items() for r in expected_rows(s, i, *item))
    n_rows = len(expected)

    table = responses.read_responses(out)
    assert sorted(table_rows(table)) == expected

    # plain pyarrow.dataset with hive partitioning, on the fsspec filesystem
    fs, root = storage.filesystem(responses.responses_url(out))
    dset = ds.dataset(root, filesystem=fs, partitioning="hive")
    t2 = dset.to_table(filter=(ds.field("session") == 8))
    assert t2.num_rows == 3 * 3 and set(t2.column("scan_idx").to_pylist()) == {5}
    assert ds.dataset(root, filesystem=fs, partitioning="hive").count_rows() == n_rows

    # pandas straight from the directory
    df = pd.read_parquet(responses.responses_url(out))
    assert len(df) == n_rows
    assert sorted(df["session"].astype(int).unique()) == [4, 8]
    row = df[(df["clip_id"] == "clip-3-1") & (df["readout_id"] == 2)].iloc[0]
    _, resp, unit_ids, readout_ids = items[(8, 5, "a.000000-000003")]
    k = int(np.flatnonzero(readout_ids == 2)[0])
    np.testing.assert_array_equal(np.asarray(row["response"], np.float32), resp[1][:, k])
    assert row["unit_id"] == unit_ids[k]

    # filtered / projected read
    sub = responses.read_responses(out, columns=["clip_id", "session"], filter=ds.field("scan_idx") == 7)
    assert sub.column_names == ["clip_id", "session"] and sub.num_rows == n_rows - 9


def test_s3_readable_by_pandas_with_storage_options(s3, s3_url):
    item = make_item(seed=4)
    write_item(s3_url, 9, 6, "x.000000-000003", *item, storage_options=s3.storage_options)
    df = pd.read_parquet(responses.responses_url(s3_url), storage_options=s3.storage_options)
    assert len(df) == 3 * 5
    assert committed(s3_url, s3.storage_options) == {(9, 6, "x.000000-000003")}


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_rewrite_same_item_replaces_rows(kind, tmp_url):
    out = tmp_url(kind, "out")
    first = make_item(seed=5)
    second = make_item(seed=6)
    second = (first[0], second[1], first[2], first[3])  # same clips and units, new values
    write_item(out, 4, 7, "s.000000-000003", *first)
    write_item(out, 4, 7, "s.000000-000003", *second)
    table = responses.read_responses(out)
    assert table.num_rows == 3 * 5
    assert table_rows(table) == expected_rows(4, 7, *second)
    assert committed(out) == {(4, 7, "s.000000-000003")}


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_staged_file_is_invisible(kind, tmp_url):
    out = tmp_url(kind, "out")
    write_item(out, 4, 7, "done.000000-000003", *make_item())
    # simulate a writer that died after staging but before committing
    fs, root = storage.filesystem(responses.responses_url(out))
    sink = pa.BufferOutputStream()
    pq.write_table(responses.response_table(*make_item(seed=8)), sink)
    storage_path = f"{root}/{storage.STAGING_DIR}/0123abcd.part-dead.000000-000003.parquet"
    if storage.is_local(fs):
        fs.makedirs(f"{root}/{storage.STAGING_DIR}", exist_ok=True)
    fs.pipe_file(storage_path, sink.getvalue().to_pybytes())
    # also a staged copy whose name mimics the partition layout
    if storage.is_local(fs):
        fs.makedirs(f"{root}/{storage.STAGING_DIR}/session=4/scan_idx=7", exist_ok=True)
    fs.pipe_file(f"{root}/{storage.STAGING_DIR}/session=4/scan_idx=7/part-dead2.parquet", sink.getvalue().to_pybytes())
    assert fs.exists(storage_path)

    assert committed(out) == {(4, 7, "done.000000-000003")}
    table = responses.read_responses(out)
    assert table.num_rows == 15 and set(table.column("clip_id").to_pylist()) == set(make_item()[0])
    assert ds.dataset(root, filesystem=fs, partitioning="hive").count_rows() == 15


def test_empty_output(tmp_url):
    out = tmp_url("local", "out")
    assert committed(out) == set()
    table = responses.read_responses(out)
    assert table.num_rows == 0 and table.column_names == ["clip_id", "unit_id", "readout_id", "response",
                                                          "session", "scan_idx"]


def test_large_item_layout(tmp_url):
    """A realistic-width item (many units): values land in the right rows (vectorised path)."""
    out = tmp_url("local", "out")
    U, lengths = 2000, (30, 25)
    clip_ids, resp, unit_ids, readout_ids = make_item(U=U, lengths=lengths, seed=9)
    write_item(out, 1, 2, "big", clip_ids, resp, unit_ids, readout_ids)
    table = responses.read_responses(out)
    assert table.num_rows == U * 2
    np.testing.assert_array_equal(table.column("readout_id").to_numpy()[:U], np.arange(U))
    lists = table.column("response").combine_chunks()
    values = lists.flatten().to_numpy().reshape(-1)
    order = np.argsort(readout_ids)
    np.testing.assert_array_equal(values[: U * 30].reshape(U, 30), resp[0][:, order].T)
    np.testing.assert_array_equal(values[U * 30 :].reshape(U, 25), resp[1][:, order].T)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c, r, u, o: (c[:2], r, u, o), "3 response arrays"),
        (lambda c, r, u, o: (c, [r[0][:, :4]] + r[1:], u, o), r"\[T, U=5\]"),
        (lambda c, r, u, o: (c, [r[0][0]] + r[1:], u, o), r"\[T, U=5\]"),
        (lambda c, r, u, o: (c, r, u[:4], o), "must both be"),
        (lambda c, r, u, o: (c, r, u, np.zeros(5, np.int32)), "unique"),
        (lambda c, r, u, o: ([], [], u, o), "no clips"),
    ],
)
def test_response_table_validates(change, match, tmp_url):
    out = tmp_url("memory", "out")
    with pytest.raises(ValueError, match=match):
        write_item(out, 4, 7, "x", *change(*make_item()))
    assert committed(out) == set()


# ------------------------------------------------------------------------------------------- manifest
def sample_manifest(**kw):
    args = dict(
        job="sweep",
        release_url="s3://releases/fnn",
        inputs={"stimuli": "s3://user:pa55word@stimuli/clips"},
        scans=[(4, 7), (8, 5)],
        units=[23, 64],
        clips=10,
        frames=3000,
        items_total=6,
        config={
            "clips_per_shard": 8,
            "dtype": "float16",
            "storage_options": {"key": "AKIA-LEAK", "secret": "LEAK-SECRET"},
            "s3": {"endpoint_url": "http://x", "aws_secret_access_key": "LEAK-2", "token": "LEAK-3"},
        },
    )
    args.update(kw)
    return Manifest(**args)


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_manifest_round_trip(kind, tmp_url):
    out = tmp_url(kind, "out")
    assert Manifest.load(out) is None
    m = sample_manifest()
    m.mark_done([(4, 7, "b"), (4, 7, "a")])
    url = m.save(out)
    assert url == storage.join(out, "manifest.json")
    loaded = Manifest.load(out)
    assert loaded == m
    assert loaded.scans == [(4, 7), (8, 5)] and loaded.units_per_scan == {(4, 7): 23, (8, 5): 64}
    assert loaded.items_done == [(4, 7, "a"), (4, 7, "b")] and not loaded.complete
    assert loaded.version == manifest.version() and loaded.started <= loaded.updated
    # saving again replaces the file atomically; staging leftovers are not visible as a manifest
    loaded.mark_done([(8, 5, f"i{k}") for k in range(4)])
    loaded.save(out)
    again = Manifest.load(out)
    assert again.complete and len(again.items_done) == 6


def test_manifest_lives_next_to_a_readable_response_dataset(tmp_url):
    out = tmp_url("local", "out")
    sample_manifest().save(out)
    write_item(out, 4, 7, "x", *make_item())
    assert len(pd.read_parquet(responses.responses_url(out))) == 15
    assert responses.read_responses(out).num_rows == 15


def test_manifest_never_stores_credentials(s3, s3_url):
    m = sample_manifest(config={"storage_options": s3.storage_options, "batch": 2,
                                "nested": [{"secret_key": "LEAK-4", "ok": 1}]})
    m.save(s3_url, s3.storage_options)
    fs, root = storage.filesystem(s3_url, s3.storage_options)
    text = fs.cat_file(f"{root}/manifest.json").decode()
    for secret in [s3.storage_options["secret"], s3.storage_options["key"], "pa55word", "LEAK"]:
        assert secret not in text
    data = json.loads(text)
    assert data["config"] == {"batch": 2, "nested": [{"ok": 1}]}
    assert data["inputs"] == {"stimuli": "s3://***@stimuli/clips"}
    assert set(data) == {"job", "release_url", "inputs", "scans", "units", "clips", "frames", "items_total",
                         "items_done", "started", "updated", "version", "config", "fingerprint"}
    text2 = sample_manifest().to_json()
    assert "LEAK" not in text2 and "AKIA" not in text2


def test_manifest_invalid_json(tmp_url):
    out = tmp_url("memory", "out")
    fs, root = storage.filesystem(out)
    fs.pipe_file(f"{root}/manifest.json", b"{not json")
    with pytest.raises(ValueError, match="manifest.json: invalid manifest"):
        Manifest.load(out)


def test_manifest_units_must_match_scans():
    with pytest.raises(ValueError, match="2 scans but 1 unit counts"):
        sample_manifest(units=[3])
