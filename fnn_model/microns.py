"""The original package's convenience API: `download_data()` fetches and unpacks the public MICrONS release,
`model, ids = microns.scan(session=8, scan_idx=5)` loads one scan's network from it.

The public release can also be read in place, without downloading: `Release.open(*resolve_release("microns"))`
reads the zip's directory and only the members in use from the anonymous S3 bucket. The S3 endpoint is the
client's default, or `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` when set (botocore reads them itself).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping

import fsspec
import pandas as pd
import torch
from tqdm import tqdm

from fnn_model.network import Network
from fnn_model.release import MICRONS_MD5, Release, ReleaseError, release_root

__all__ = ["DEFAULT_DIRECTORY", "PUBLIC_RELEASE", "PUBLIC_RELEASE_URL", "download_data", "resolve_release", "scan"]

#: Where `scan` looks and `download_data` unpacks when no directory is given.
DEFAULT_DIRECTORY = "~/.cache/fnn/microns"
#: The public release (222 MB, MD5 `MICRONS_MD5`), readable without credentials.
PUBLIC_RELEASE_URL = (
    "s3://bossdb-open-data/iarpa_microns/minnie/functional_data/foundation_model/"
    "foundational_model_weights_and_metadata_v1.zip"
)
#: The short name `resolve_release` maps to `PUBLIC_RELEASE_URL` (the jobs' `--release microns`).
PUBLIC_RELEASE = "microns"
#: Bytes per read while downloading.
CHUNK = 1 << 23


def _public_options() -> dict[str, object]:
    return {"anon": True}


def resolve_release(
    url: str, storage_options: Mapping[str, object] | None = None
) -> tuple[str, Mapping[str, object] | None]:
    """`"microns"` -> (`PUBLIC_RELEASE_URL`, anonymous access); any other URL -> (`url`, `storage_options`).

    The `storage_options` of another store (credentials, endpoint) are never applied to the public bucket.
    """
    if url == PUBLIC_RELEASE:
        return PUBLIC_RELEASE_URL, _public_options()
    return url, storage_options


def download_data(
    directory: str = DEFAULT_DIRECTORY,
    url: str = PUBLIC_RELEASE_URL,
    storage_options: Mapping[str, object] | None = None,
    progress: bool = True,
    md5: str | None = MICRONS_MD5,
) -> str:
    """Download the release zip at `url` and unpack its release folder into the local `directory`; return
    `directory` (absolute). `storage_options` default to anonymous access.

    A `directory` already holding a release that passes `Release.check` is returned as is, without a download.
    The zip is streamed in `CHUNK`s (a tqdm bar unless `progress=False`) into a temporary folder next to
    `directory`, its MD5 checked on the way (`md5=None` skips it), unpacked there, checked, and renamed onto
    `directory`; on any failure the temporary folder is removed, so nothing is left behind.
    Raises `ReleaseError` (MD5 mismatch, no release in the zip, a bad `.pt` file, a non-empty `directory` that is
    not a release) or `FileNotFoundError` (no file at `url`).
    """
    if "://" in directory:
        raise ValueError(f"download_data unpacks to a local directory, got the URL {directory}")
    target = os.path.abspath(os.path.expanduser(directory))
    if os.path.isdir(target) and os.listdir(target):
        try:
            Release.open(target).check()
        except ReleaseError as error:
            raise ReleaseError(f"{target} is not empty and not a usable release ({error}); "
                               f"move it away to download again") from None
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".download", dir=parent)
    try:
        archive = os.path.join(staging, "release.zip")
        got = _copy(url, _public_options() if storage_options is None else dict(storage_options), archive, progress)
        if md5 is not None and got != md5.lower():
            raise ReleaseError(f"MD5 mismatch for {url}: expected {md5.lower()}, got {got}")
        unpacked = os.path.join(staging, "unpacked")
        try:
            with zipfile.ZipFile(archive) as zipped:
                root = release_root(zipped.namelist())
                if root is None:
                    raise ReleaseError(f"{url}: the zip archive holds no scans.csv")
                zipped.extractall(unpacked)
        except zipfile.BadZipFile as error:
            raise ReleaseError(f"{url}: not a valid zip archive ({error})") from None
        root = os.path.join(unpacked, root)
        Release.open(root).check()
        os.replace(root, target)  # `target` is absent or an empty directory
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _copy(url: str, storage_options: Mapping[str, object], destination: str, progress: bool) -> str:
    """Stream the file at `url` into the local file `destination`; return the MD5 of its bytes."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file") from None
    digest = hashlib.md5()
    with (
        fs.open(path, "rb", block_size=CHUNK) as source,
        open(destination, "wb") as sink,
        tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(path),
             disable=not progress) as bar,
    ):
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            sink.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def scan(
    session: int,
    scan_idx: int,
    directory: str = DEFAULT_DIRECTORY,
    device: str | torch.device | None = None,
    storage_options: Mapping[str, object] | None = None,
) -> tuple[Network, pd.DataFrame]:
    """Load one scan's network from a release (directory or `.zip`, any fsspec URL).

    `device` defaults to "cuda" when available, else "cpu". Returns the network (eval mode, on `device`) and the
    scan's unit table indexed by `readout_id`: column `u` of `model.predict(...)` is the unit with
    `readout_id == u`.
    """
    if "://" not in directory:
        directory = os.path.expanduser(directory)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    release = Release.open(directory, storage_options=storage_options)
    model = release.load_network(session, scan_idx).to(device)
    return model, release.units(session, scan_idx)
