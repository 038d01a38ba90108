"""fnn_ray.storage: URL -> filesystem resolution, joining, atomic commits, parquet opening."""

from __future__ import annotations

import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fnn_ray import storage


# ------------------------------------------------------------------------------------------- filesystem
def test_filesystem_plain_and_file_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.filesystem("rel/dir")
    assert storage.is_local(fs)
    assert path == str(tmp_path / "rel" / "dir")
    fs, path = storage.filesystem(f"file://{tmp_path}/x")
    assert storage.is_local(fs) and path == f"{tmp_path}/x"
    fs, path = storage.filesystem(tmp_path / "y")  # os.PathLike
    assert path == str(tmp_path / "y")


def test_filesystem_memory():
    fs, path = storage.filesystem("memory://bucket/a/b/")
    assert "memory" in fs.protocol and path == "/bucket/a/b"


def test_filesystem_s3_endpoint_and_region_from_env(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    fs, path = storage.filesystem("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix"
    assert fs.endpoint_url == "http://127.0.0.1:1"
    assert fs.client_kwargs["region_name"] == "eu-west-3"
    # the S3-specific variable wins over the generic one
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    fs, _ = storage.filesystem("s3://bucket/x")
    assert fs.endpoint_url == "http://127.0.0.1:2"
    # explicit storage options win over the environment
    fs, _ = storage.filesystem("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:3"})
    assert fs.endpoint_url == "http://127.0.0.1:3"
    fs, _ = storage.filesystem("s3://bucket/x", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:4"}})
    assert fs.endpoint_url is None and fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:4"
    # listings are not cached (other processes write to the same prefixes)
    assert fs.dircache.use_listings_cache is False
    # botocore tries a call a few times only (fnn_ray's Retry keeps --store-timeout), unless the options say otherwise
    assert fs.config_kwargs["retries"] == storage.BOTOCORE_RETRIES
    mine = {"retries": {"total_max_attempts": 1}, "connect_timeout": 1}
    fs, _ = storage.filesystem("s3://bucket/x", {"config_kwargs": mine})
    assert fs.config_kwargs == mine


def test_filesystem_does_not_mutate_storage_options():
    opts = {"client_kwargs": {"region_name": "us-east-1"}, "key": "k", "secret": "s"}
    before = {"client_kwargs": {"region_name": "us-east-1"}, "key": "k", "secret": "s"}
    storage.filesystem("s3://bucket/x", opts)
    assert opts == before


@pytest.mark.parametrize(
    "url, parts, expected",
    [
        ("s3://b/out", ("x", "y.parquet"), "s3://b/out/x/y.parquet"),
        ("s3://b/out/", ("/x/", "y"), "s3://b/out/x/y"),
        ("memory://", ("a", "b"), "memory://a/b"),
        ("/tmp/out/", ("a/b", "c"), "/tmp/out/a/b/c"),
        ("rel", ("a",), "rel/a"),
        ("file:///tmp/o", ("session=4", "scan_idx=7"), "file:///tmp/o/session=4/scan_idx=7"),
        ("s3://b/out", (), "s3://b/out"),
    ],
)
def test_join(url, parts, expected):
    assert storage.join(url, *parts) == expected


def test_redact_url():
    assert storage.redact_url("s3://AKIA:verysecret@bucket/x") == "s3://***@bucket/x"
    assert storage.redact_url("s3://bucket/x@y") == "s3://bucket/x@y"
    assert storage.redact_url("/local/path") == "/local/path"


# ---------------------------------------------------------------------------------------- commit_bytes
def _staged(fs, directory):
    return [p for p in fs.find(directory)] if fs.exists(directory) else []


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_commit_bytes_writes_replaces_and_cleans_staging(kind, tmp_url):
    url = tmp_url(kind)
    fs, root = storage.filesystem(url)
    target = f"{root}/sub/dir/file.bin"
    storage.commit_bytes(fs, target, b"first version")
    assert fs.cat_file(target) == b"first version"
    storage.commit_bytes(fs, target, pa.py_buffer(b"second"))  # pyarrow buffers are accepted
    assert fs.cat_file(target) == b"second"
    # staging objects are gone; the final directory holds only the file (+ the '_' staging dir)
    assert _staged(fs, f"{root}/sub/dir/{storage.STAGING_DIR}") == []
    names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(f"{root}/sub/dir", detail=False))
    assert [n for n in names if not n.startswith("_")] == ["file.bin"]


def test_commit_bytes_custom_staging_dir(tmp_url):
    url = tmp_url("memory")
    fs, root = storage.filesystem(url)
    storage.commit_bytes(fs, f"{root}/a/b.bin", b"x", staging_dir=f"{root}/_stage_here")
    assert fs.cat_file(f"{root}/a/b.bin") == b"x"
    assert _staged(fs, f"{root}/_stage_here") == []


def test_commit_bytes_failure_leaves_old_file_intact_local(tmp_path, monkeypatch):
    fs, root = storage.filesystem(str(tmp_path))
    target = f"{root}/f.bin"
    storage.commit_bytes(fs, target, b"good")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        storage.commit_bytes(fs, target, b"partial?")
    assert open(target, "rb").read() == b"good"
    assert os.listdir(tmp_path / storage.STAGING_DIR) == []


def test_commit_bytes_failure_leaves_old_file_intact_remote(tmp_url, monkeypatch):
    fs, root = storage.filesystem(tmp_url("memory"))
    target = f"{root}/f.bin"
    storage.commit_bytes(fs, target, b"good")

    def boom(*args, **kwargs):
        raise OSError("network gone")

    monkeypatch.setattr(fs, "mv", boom)
    with pytest.raises(OSError, match="network gone"):
        storage.commit_bytes(fs, target, b"new")
    assert fs.cat_file(target) == b"good"
    assert _staged(fs, f"{root}/{storage.STAGING_DIR}") == []


def test_commit_bytes_reader_never_sees_partial_file(tmp_path, monkeypatch):
    """While the bytes are being written, the final path does not exist yet."""
    fs, root = storage.filesystem(str(tmp_path))
    target = f"{root}/f.bin"
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.exists(dst), open(src, "rb").read()))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", spy)
    storage.commit_bytes(fs, target, b"x" * 1000)
    assert seen == [(False, b"x" * 1000)]
    assert os.path.getsize(target) == 1000


# ---------------------------------------------------------------------------------------- open_parquet
@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_open_parquet(kind, tmp_url):
    url = tmp_url(kind)
    fs, root = storage.filesystem(url)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"a": [1, 2, 3]}), sink)
    storage.commit_bytes(fs, f"{root}/t.parquet", sink.getvalue())
    with storage.open_parquet(fs, f"{root}/t.parquet") as pf:
        assert pf.read().column("a").to_pylist() == [1, 2, 3]

    storage.commit_bytes(fs, f"{root}/bad.parquet", b"this is not parquet at all")
    with pytest.raises(ValueError, match=r"bad\.parquet.*not a valid parquet file"):
        with storage.open_parquet(fs, f"{root}/bad.parquet", url=storage.join(url, "bad.parquet")):
            pass
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet"):
        with storage.open_parquet(fs, f"{root}/missing.parquet"):
            pass


def test_s3_fixture_reachable_from_env_and_options(s3, s3_url):
    """Code without storage options (e.g. Ray workers) reaches moto through the env vars; explicit
    storage options work too."""
    fs, path = storage.filesystem(s3_url)
    storage.commit_bytes(fs, f"{path}/hello.txt", b"hi")
    fs2, path2 = storage.filesystem(s3_url, s3.storage_options)
    assert fs2.cat_file(f"{path2}/hello.txt") == b"hi"
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint_url
    assert s3.storage_options["secret"] == os.environ["AWS_SECRET_ACCESS_KEY"]
    # a fresh instance (no fsspec instance cache) sees the object as well
    fs3 = fsspec.filesystem("s3", endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    assert fs3.cat_file(f"{path}/hello.txt") == b"hi"
