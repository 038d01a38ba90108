"""The public release path against a real S3 server (moto): `download_data`, reading the zip in place by ranged
reads, and the cheap setup check `Release.check`.

The bucket `bossdb-open-data` holds, under the public key, a synthetic release zip padded with a 30 MB stored
junk member, so that "reads far less than the whole zip" is a real measurement: a counting TCP proxy in front
of the S3 server counts every byte the server sends.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import posixpath
import shutil
import socket
import socketserver
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fnn_model import NetworkConfig, microns
from fnn_model.release import Release, ReleaseError
from fnn_model.synthetic import make_release, random_clips

CONFIG = NetworkConfig.tiny()
SCANS = ((4, 7, 5), (8, 5, 9))
BUCKET, KEY = microns.PUBLIC_RELEASE_URL.removeprefix("s3://").split("/", 1)
TOP = "foundational_model_weights_and_metadata_v1"
JUNK_BYTES = 30 << 20


def frames(seed: int = 5) -> list[np.ndarray]:
    """A few random uint8 frames `[H, W]`."""
    return list(random_clips(1, 3, 36, 64, seed=seed)[0])


def predict(directory: str | Path, session: int = 8, scan_idx: int = 5, **options) -> np.ndarray:
    model, _ = microns.scan(session, scan_idx, directory=str(directory), **options)
    return model.predict(frames())


@dataclass
class PublicZip:
    local: Path  # the same release as a local directory
    md5: str
    size: int


@pytest.fixture(scope="module")
def public_zip(s3, tmp_path_factory) -> PublicZip:
    """The synthetic release zipped (in a top folder; a junk member outside it, in the middle) and uploaded,
    public-read, under the public release's real key."""
    import boto3

    local = tmp_path_factory.mktemp("public") / "release"
    make_release(str(local), SCANS, CONFIG, seed=2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(local.iterdir()):
            archive.write(file, f"{TOP}/{file.name}")
            if file.name == "params_4_7.pt":
                archive.writestr("junk.bin", np.random.default_rng(0).bytes(JUNK_BYTES))
    data = buffer.getvalue()
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    client.create_bucket(Bucket=BUCKET, ACL="public-read")
    client.put_object(Bucket=BUCKET, Key=KEY, Body=data, ACL="public-read")
    return PublicZip(local, hashlib.md5(data).hexdigest(), len(data))


def test_download_data_unpacks_the_release_and_predicts_identically(public_zip, tmp_path) -> None:
    target = tmp_path / "microns"
    assert microns.download_data(str(target), md5=public_zip.md5, progress=False) == str(target)
    assert os.listdir(tmp_path) == ["microns"]  # the temporary download folder is gone
    assert sorted(os.listdir(target)) == sorted(os.listdir(public_zip.local))  # the top folder only
    np.testing.assert_array_equal(predict(target), predict(public_zip.local))
    model, _ = microns.scan(8, 5, directory=str(target))
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    # present and valid: returned without a download (the URL does not exist)
    missing = f"s3://{BUCKET}/nothing-here.zip"
    assert microns.download_data(str(target), url=missing, progress=False) == str(target)
    with pytest.raises(FileNotFoundError, match="nothing-here.zip: no such file"):
        microns.download_data(str(tmp_path / "other"), url=missing, progress=False)
    assert os.listdir(tmp_path) == ["microns"]


def test_download_data_leaves_nothing_behind_on_a_bad_md5_or_a_foreign_directory(public_zip, tmp_path) -> None:
    parent = tmp_path / "parent"
    with pytest.raises(ReleaseError, match=f"MD5 mismatch for s3://{BUCKET}/.*_v1.zip: expected {'0' * 32}, "
                                           f"got {public_zip.md5}"):
        microns.download_data(str(parent / "microns"), md5="0" * 32, progress=False)
    assert os.listdir(parent) == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ReleaseError, match=r"foreign is not empty and not a usable release .*missing file scans.csv"):
        microns.download_data(str(foreign), md5=public_zip.md5, progress=False)
    assert os.listdir(foreign) == ["notes.txt"]


class _Relay(socketserver.BaseRequestHandler):
    """Relays one client connection to the S3 server, counting the bytes the server sends."""

    def handle(self) -> None:
        upstream = socket.create_connection(self.server.upstream)
        sending = threading.Thread(target=self.pump, args=(self.request, upstream, False), daemon=True)
        sending.start()
        self.pump(upstream, self.request, True)
        sending.join()

    def pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if count:
                    with self.server.lock:
                        self.server.received += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def counting_endpoint(s3, monkeypatch):
    """Point AWS_ENDPOINT_URL at a byte-counting proxy of the S3 server; yields the proxy server (`.received`)."""
    import s3fs

    host, port = s3.endpoint_url.removeprefix("http://").split(":")
    proxy = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Relay)
    proxy.daemon_threads = True
    proxy.upstream, proxy.received, proxy.lock = (host, int(port)), 0, threading.Lock()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
    s3fs.S3FileSystem.clear_instance_cache()  # filesystems made earlier keep the old endpoint
    yield proxy
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.shutdown()
    proxy.server_close()


def test_public_zip_is_read_in_place_by_ranged_reads(public_zip, counting_endpoint) -> None:
    url, options = microns.resolve_release("microns", {"key": "private", "secret": "private"})
    assert (url, options) == (microns.PUBLIC_RELEASE_URL, {"anon": True})
    assert microns.resolve_release("s3://mine/release", {"anon": False}) == ("s3://mine/release", {"anon": False})
    release = Release.open(url, storage_options=options)
    release.check([(8, 5)])
    got = predict(url, storage_options=options)
    np.testing.assert_array_equal(got, predict(public_zip.local))
    needed = sum(os.path.getsize(public_zip.local / n) for n in ("params_core.pt", "params_8_5.pt"))
    assert public_zip.size > JUNK_BYTES
    # at least the two weight files (so the proxy did count), far less than the archive
    assert needed < counting_endpoint.received < public_zip.size / 10, (counting_endpoint.received, public_zip.size)


# ------------------------------------------------------------------------------------------ Release.check
class Payload:
    """Unpickling this would create a file: the check must never unpickle."""

    def __reduce__(self):
        return (open, (os.environ["FNN_PICKLE_MARKER"], "w"))


def _pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"weights": np.zeros((3, 4), np.float32), "bias": np.ones(4), "x": Payload()}))


def _legacy_torch(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.save(state, path, _use_new_zipfile_serialization=False)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop(records):
    """An edit that rewrites a torch zip archive without the members whose name `records(name)` selects."""

    def edit(path: Path) -> None:
        with zipfile.ZipFile(path) as source:
            kept = [(info, source.read(info)) for info in source.infolist() if not records(info.filename)]
        with zipfile.ZipFile(path, "w") as target:
            for info, data in kept:
                target.writestr(info, data)

    return edit


@pytest.fixture(scope="module")
def base_release(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("check") / "release"
    make_release(str(path), SCANS, CONFIG, seed=4)
    return path


def layout(release: Path, kind: str, tmp_path: Path) -> str:
    """The release directory as is ("dir") or zipped with stored / deflated members under a top folder."""
    if kind == "dir":
        return str(release)
    archive = tmp_path / "release.zip"
    compression = zipfile.ZIP_STORED if kind == "zip-stored" else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(archive, "w", compression) as zipped:
        for file in sorted(release.iterdir()):
            zipped.write(file, posixpath.join("top", file.name))
    return str(archive)


KINDS = ["dir", "zip-stored", "zip-deflated"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("file", "edit", "match"),
    [
        ("params_8_5.pt", _pickle,
         r"params_8_5.pt in \S+ is not a torch zip archive \(a pickle\?\); expected torch.save's zip format"),
        ("params_8_5.pt", _legacy_torch, r"params_8_5.pt in \S+ is not a torch zip archive \(a pickle\?\)"),
        ("params_core.pt", _truncate,
         r"params_core.pt in \S+ is not a readable zip archive \(truncated or corrupt: .*\); expected torch.save's"),
        ("params_8_5.pt", lambda p: p.write_bytes(b"<html>Access denied</html>"),
         r"params_8_5.pt in \S+ is not a torch zip archive \(it starts with b'<htm'\)"),
        ("params_8_5.pt", _drop(lambda n: n.endswith("/data.pkl")),
         r"params_8_5.pt in \S+ lacks the record archive/data.pkl"),
        ("params_core.pt", _drop(lambda n: "/data/" in n),
         r"params_core.pt in \S+ lacks tensor data records \(archive/data/\*\)"),
        ("params_core.pt", _drop(lambda n: n.endswith("/data/0")), None),  # one storage missing: not seen without the tensors
        ("params_8_5.pt", Path.unlink, r"release \S+: missing file params_8_5.pt"),
        ("params_core.pt", Path.unlink, r"release \S+: missing file params_core.pt"),
    ],
    ids=["pickle", "legacy-torch", "truncated", "html", "no-data-pkl", "no-storages", "one-storage-missing", "no-head", "no-core"],
)
def test_check_names_the_bad_file_without_loading_it(base_release, tmp_path, monkeypatch, kind, file, edit, match):
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("FNN_PICKLE_MARKER", str(marker))
    release_dir = tmp_path / "release"
    shutil.copytree(base_release, release_dir)
    edit(release_dir / file)
    release = Release.open(layout(release_dir, kind, tmp_path))
    if file == "params_8_5.pt":
        release.check([(4, 7)])  # the other files are fine
    if match is None:  # the directory is intact: the check passes, loading refuses the file
        release.check()
        with pytest.raises(ReleaseError, match=rf"{file} in \S+: not a readable torch archive"):
            release.load_core()
    else:
        with pytest.raises(ReleaseError, match=match):
            release.check()
        with pytest.raises(ReleaseError, match=match):
            release.check([(8, 5)])
    assert not marker.exists()


def test_check_passes_good_releases_and_refuses_unknown_scans_and_missing_roots(base_release, tmp_path) -> None:
    for kind in KINDS:
        Release.open(layout(base_release, kind, tmp_path)).check()
    release = Release.open(str(base_release))
    with pytest.raises(ReleaseError, match="unknown scan 1-2; available: 4-7, 8-5"):
        release.check([(8, 5), (1, 2)])
    with pytest.raises(ReleaseError, match="no such directory or .zip file"):
        Release.open(str(tmp_path / "nowhere")).check()


def test_check_passes_the_golden_release(golden_dir) -> None:
    Release.open(str(golden_dir / "release")).check()


def test_jobs_read_release_microns_in_place(public_zip, ray_cluster, tmp_path) -> None:
    """`--release microns` runs a job on the public zip, read anonymously by the driver and the workers."""
    from fnn_ray.outputs import read_results
    from jobs import tuning

    out = str(tmp_path / "out")
    args = ["--release", "microns", "--output", out, "--size", "36x64", "--directions", "4", "--trials", "1",
            "--block-frames", "4", "--actors", "1", "--cpus-per-actor", "1", "--no-progress"]
    assert tuning.main(args) == 0
    table = read_results(out, "ori_dir_tuning")
    assert sorted(table.groupby(["session", "scan_idx"]).size().items()) == [((s, i), u) for s, i, u in SCANS]
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert microns.PUBLIC_RELEASE_URL in manifest
