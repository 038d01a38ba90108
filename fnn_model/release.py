"""The release format (spec 6) on any fsspec URL: a directory or a `.zip` holding `params_core.pt`,
`params_{session}_{scan_idx}.pt`, `scans.csv` and `units.csv` (plus our optional `fnn_config.json`).

Weights are read with `torch.load(..., weights_only=True)` only, and every key, shape and dtype is checked
against the network config before anything is loaded into a module. A `.zip` release is read in place by ranged
reads (its directory and the members in use), so `s3://.../v1.zip` works without downloading the archive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import posixpath
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import fsspec
import pandas as pd
import torch
from fsspec.implementations.zip import ZipFileSystem

from fnn_model.config import FeedforwardConfig, ModulationConfig, NetworkConfig, PerspectiveConfig, RecurrentConfig
from fnn_model.network import Core, Network, ScanHead

__all__ = [
    "MICRONS_MD5",
    "Release",
    "ReleaseError",
    "ScanInfo",
    "check_state",
    "config_from_json",
    "config_to_json",
    "head_file",
    "load_tensors",
    "release_root",
    "write_release",
]

#: MD5 of the public MICrONS release, `foundational_model_weights_and_metadata_v1.zip`.
MICRONS_MD5 = "58fcac4b31ad2902c81e339432cec787"

CORE_FILE = "params_core.pt"
SCANS_FILE = "scans.csv"
UNITS_FILE = "units.csv"
CONFIG_FILE = "fnn_config.json"
CORE_PREFIX = "core."

#: Read-ahead of a `.zip` release's handle: a member's header and a small member come in one request, and only
#: the members in use are fetched (the s3fs default, 50 MB, would pull most of the public 222 MB archive).
ZIP_READ_AHEAD = 1 << 18
#: `Release.check` fetches this much from the end of each `.pt` file at once: the zip end record and, for any
#: release file, its whole central directory.
TAIL_BYTES = 1 << 16
#: What a `.pt` file must be (`torch.save`'s default since torch 1.6).
TORCH_ZIP = "expected torch.save's zip format"


class ReleaseError(ValueError):
    """A release that cannot be used as it is: the message names the file, key and what was expected."""


@dataclass(frozen=True)
class ScanInfo:
    """One row of `scans.csv`."""

    session: int
    scan_idx: int
    units: int
    data_id: str

    @property
    def key(self) -> tuple[int, int]:
        return self.session, self.scan_idx


def head_file(session: int, scan_idx: int) -> str:
    return f"params_{session}_{scan_idx}.pt"


def config_to_json(config: NetworkConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=1)


def config_from_json(text: str) -> NetworkConfig:
    raw = json.loads(text)
    parts = {
        "feedforward": FeedforwardConfig,
        "recurrent": RecurrentConfig,
        "perspective": PerspectiveConfig,
        "modulation": ModulationConfig,
    }
    kwargs = {}
    for name, value in raw.items():
        if name in parts:
            value = parts[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        kwargs[name] = value
    return NetworkConfig(**kwargs)


def _expected(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {prefix + k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def check_state(state: object, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], where: str) -> None:
    """Raise `ReleaseError` unless `state` maps exactly the expected keys to tensors of the expected shape/dtype."""
    if not isinstance(state, Mapping):
        raise ReleaseError(f"{where}: expected a mapping of key -> tensor, got {type(state).__name__}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ReleaseError(f"{where}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ReleaseError(f"{where}: unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, (shape, dtype) in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise ReleaseError(f"{where}: key {key!r} holds {type(value).__name__}, expected a tensor")
        if tuple(value.shape) != shape:
            raise ReleaseError(f"{where}: key {key!r} has shape {list(value.shape)}, expected {list(shape)}")
        if value.dtype != dtype:
            raise ReleaseError(f"{where}: key {key!r} has dtype {value.dtype}, expected {dtype}")


def load_tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Deserialize a `torch.save`d mapping with `weights_only=True`; anything but plain tensors is refused."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ReleaseError(f"{where}: refused to load: it holds objects other than tensors ({first})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ReleaseError(f"{where}: not a readable torch archive ({error})") from None


class Release:
    """An opened release. Scans and units are read at open; the core and scan heads are loaded on request."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        url: str,
        config: NetworkConfig,
        archive: tuple[fsspec.AbstractFileSystem, str] | None = None,
    ) -> None:
        """`fs` and `root` hold the release files; `archive`, for a `.zip` release, is the archive's own
        filesystem and path (for ranged reads of its stored members)."""
        self.fs, self.root, self.url, self.config, self._archive = fs, root, url, config, archive
        self.scans = self._read_scans()
        self._units = self._read_units()
        self._core: Core | None = None
        self._records: dict[str, list[tuple[str, int, int]]] = {}  # .pt file -> its records (name, CRC-32, size)

    @classmethod
    def open(
        cls,
        url: str,
        storage_options: Mapping[str, object] | None = None,
        config: NetworkConfig | None = None,
        md5: str | None = None,
    ) -> Release:
        """Open a release directory or `.zip` at `url` (`/path`, `file://`, `s3://bucket/prefix`, `memory://`).

        `config` defaults to the release's `fnn_config.json` when present, else the MICrONS network. `md5`, for
        a `.zip`, is checked against the archive's bytes before anything else is read.
        """
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        try:
            is_file = fs.isfile(path)
            exists = is_file or fs.isdir(path)
        except Exception as error:  # OSError, or a store client's own (botocore's EndpointConnectionError ...)
            raise ReleaseError(f"release {url}: cannot be reached ({type(error).__name__}: {error})") from None
        if not exists:
            raise ReleaseError(f"release {url}: no such directory or .zip file")
        if md5 is not None and not is_file:
            raise ReleaseError(f"release {url}: an MD5 can only be checked for a .zip release, this is a directory")
        root, archive = path, None
        if is_file:
            if md5 is not None:
                got = _md5(fs, path)
                if got != md5.lower():
                    raise ReleaseError(f"release {url}: MD5 mismatch: expected {md5.lower()}, got {got}")
            archive = (fs, path)
            fs, root = _open_zip(fs, path, url)
        if config is None:
            config_path = posixpath.join(root, CONFIG_FILE) if root else CONFIG_FILE
            config = config_from_json(fs.cat_file(config_path).decode()) if fs.exists(config_path) else NetworkConfig()
        return cls(fs, root, url, config, archive)

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name) if self.root else name

    def read_file(self, name: str) -> bytes:
        """The bytes of the release's file `name` (e.g. `params_core.pt`); ReleaseError when it is missing."""
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            raise ReleaseError(f"release {self.url}: missing file {name}") from None

    def _read_csv(self, name: str, columns: list[str]) -> pd.DataFrame:
        table = pd.read_csv(io.BytesIO(self.read_file(name)))
        absent = [c for c in columns if c not in table.columns]
        if absent:
            raise ReleaseError(f"{name} in {self.url}: missing column(s) {absent}; expected columns {columns}")
        return table

    def _read_scans(self) -> list[ScanInfo]:
        table = self._read_csv(SCANS_FILE, ["session", "scan_idx", "units", "data_id"])
        return [
            ScanInfo(int(r.session), int(r.scan_idx), int(r.units), str(r.data_id)) for r in table.itertuples()
        ]

    def _read_units(self) -> pd.DataFrame:
        table = self._read_csv(UNITS_FILE, ["session", "scan_idx", "unit_id", "readout_id"])
        return table.astype({"session": "int64", "scan_idx": "int64", "unit_id": "int64", "readout_id": "int64"})

    def scan(self, session: int, scan_idx: int) -> ScanInfo:
        """The `scans.csv` row of a scan; `ReleaseError` listing the available scans when absent."""
        for info in self.scans:
            if info.key == (session, scan_idx):
                return info
        available = ", ".join(f"{s.session}-{s.scan_idx}" for s in self.scans)
        raise ReleaseError(f"release {self.url}: unknown scan {session}-{scan_idx}; available: {available}")

    def units(self, session: int, scan_idx: int) -> pd.DataFrame:
        """Unit table of a scan (columns session, scan_idx, unit_id, readout_id), indexed by readout_id 0..U-1."""
        info = self.scan(session, scan_idx)
        rows = self._units[(self._units.session == session) & (self._units.scan_idx == scan_idx)]
        rows = rows.sort_values("readout_id").set_index("readout_id", drop=False)
        rows.index.name = None
        if rows.readout_id.tolist() != list(range(info.units)):
            raise ReleaseError(
                f"{UNITS_FILE} in {self.url}: scan {session}-{scan_idx} must list readout_id 0..{info.units - 1} "
                f"once each (scans.csv says {info.units} units), got {len(rows)} rows"
            )
        return rows

    def check(self, scans: Sequence[tuple[int, int]] | None = None) -> None:
        """A cheap setup check: `params_core.pt` and the head of each of `scans` (default: every scan) exist and
        are torch zip archives with their `data.pkl` record and tensor data records (`data/*`).

        Only each file's zip directory is read (ranged reads: its last `TAIL_BYTES`, and the rest of its directory
        if larger); nothing is loaded or unpickled, so key, shape and dtype errors still surface at load time. In a
        `.zip` release a compressed (not stored) member is read whole. Raises `ReleaseError` naming the file.
        """
        keys = [info.key for info in self.scans] if scans is None else [self.scan(*key).key for key in scans]
        for name in [CORE_FILE, *(head_file(*key) for key in keys)]:
            self._check_torch_zip(name)

    def _check_torch_zip(self, name: str) -> None:
        where = f"{name} in {self.url}"
        with self._member(name) as f:
            try:
                records = zipfile.ZipFile(f).infolist()
            except zipfile.BadZipFile as error:
                f.seek(0)
                start = f.read(4)
                if start[:1] == b"\x80":  # pickle protocol >= 2: a plain pickle or a legacy torch.save
                    reason = "is not a torch zip archive (a pickle?)"
                elif start == b"PK\x03\x04":
                    reason = f"is not a readable zip archive (truncated or corrupt: {error})"
                else:
                    reason = f"is not a torch zip archive (it starts with {start!r})"
                raise ReleaseError(f"{where} {reason}; {TORCH_ZIP}") from None
        names = [r.filename for r in records]
        prefix = names[0].split("/")[0] + "/" if names else ""
        if prefix + "data.pkl" not in names:
            raise ReleaseError(f"{where} lacks the record {prefix}data.pkl (the tensors' index); {TORCH_ZIP}")
        if not any(n.startswith(prefix + "data/") for n in names):
            raise ReleaseError(f"{where} lacks tensor data records ({prefix}data/*); {TORCH_ZIP}")
        # the records below the archive's top folder (torch.save names it after the file it writes)
        self._records[name] = sorted((r.filename.split("/", 1)[-1], r.CRC, r.file_size) for r in records)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the release's content: the network config, every scan's `scans.csv` and `units.csv` rows,
        and every record of `params_core.pt` and of the head files by name, CRC-32 and size (from their zip
        directories, as `check` reads them; the weights are not downloaded). The same weights and tables give the
        same digest wherever the release is stored. `ReleaseError` as `check`."""
        keys = sorted(info.key for info in self.scans)
        names = [CORE_FILE, *(head_file(*key) for key in keys)]
        for name in names:
            if name not in self._records:
                self._check_torch_zip(name)
        units = {f"{s}-{i}": self.units(s, i)[["unit_id", "readout_id"]].to_numpy().tolist() for s, i in keys}
        content = {"config": json.loads(config_to_json(self.config)),
                   "scans": sorted(dataclasses.astuple(info) for info in self.scans), "units": units,
                   "files": {name: self._records[name] for name in names}}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def _member(self, name: str) -> io.IOBase:
        """A release file as a seekable binary file, read by ranged reads (a compressed zip member: whole)."""
        path = self._path(name)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            raise ReleaseError(f"release {self.url}: missing file {name}") from None
        if self._archive is None:
            return _Range(self.fs, path, 0, int(info["size"]))
        if info["compress_type"] != zipfile.ZIP_STORED:
            return io.BytesIO(self.fs.cat_file(path))
        fs, archive = self._archive
        offset = int(info["header_offset"])
        name_length, extra_length = struct.unpack("<26xHH", fs.cat_file(archive, start=offset, end=offset + 30))
        return _Range(fs, archive, offset + 30 + name_length + extra_length, int(info["file_size"]))

    def load_core(self) -> Core:
        """The shared core (loaded once per `Release`, eval mode, CPU)."""
        if self._core is None:
            core = Core(self.config)
            state = load_tensors(self.read_file(CORE_FILE), f"{CORE_FILE} in {self.url}")
            check_state(state, _expected(core, CORE_PREFIX), f"{CORE_FILE} in {self.url}")
            core.load_state_dict({k[len(CORE_PREFIX):]: v for k, v in state.items()}, strict=True)
            self._core = core.eval()
        return self._core

    def load_head(self, session: int, scan_idx: int) -> ScanHead:
        """A scan's perspective, modulation and readout (eval mode, CPU)."""
        info = self.scan(session, scan_idx)
        head = ScanHead(self.config, info.units)
        name = head_file(session, scan_idx)
        state = load_tensors(self.read_file(name), f"{name} in {self.url}")
        check_state(state, _expected(head), f"{name} in {self.url}")
        head.load_state_dict(state, strict=True)
        return head.eval()

    def load_network(self, session: int, scan_idx: int) -> Network:
        """A complete single-scan network (a fresh module; the core weights are shared with `load_core`)."""
        head = self.load_head(session, scan_idx)
        return Network(self.config, head.units, core=self.load_core(), head=head).eval()


def _md5(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.md5()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Range(io.RawIOBase):
    """Bytes `[start, start + size)` of a file as a read-only seekable file, fetched by ranged reads; the last
    `TAIL_BYTES` (where a zip archive keeps its directory) are fetched once, up front."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, start: int, size: int) -> None:
        super().__init__()
        self.fs, self.path, self.start, self.size, self.pos = fs, path, start, size, 0
        self.tail_start = max(0, size - TAIL_BYTES)
        self.tail = self._fetch(self.tail_start, size)

    def _fetch(self, begin: int, end: int) -> bytes:
        return self.fs.cat_file(self.path, start=self.start + begin, end=self.start + end) if end > begin else b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = offset + {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if position < 0:
            raise OSError(f"{self.path}: seek to {position}, before the start")
        self.pos = position
        return position

    def read(self, n: int | None = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        if self.pos >= self.tail_start:
            data = self.tail[self.pos - self.tail_start : end - self.tail_start]
        else:
            data = self._fetch(self.pos, end)
        self.pos = end
        return data


def _open_zip(fs: fsspec.AbstractFileSystem, path: str, url: str) -> tuple[ZipFileSystem, str]:
    """Open a zip archive for ranged reads; the release root is the folder of its shallowest `scans.csv`."""
    try:
        archive = ZipFileSystem(fo=fs.open(path, "rb", block_size=ZIP_READ_AHEAD, cache_type="readahead"))
    except zipfile.BadZipFile:
        raise ReleaseError(f"release {url}: not a valid zip archive (corrupt or truncated)") from None
    root = release_root(archive.find(""))
    if root is None:
        raise ReleaseError(f"release {url}: the zip archive holds no {SCANS_FILE}")
    return archive, root


def release_root(names: Iterable[str]) -> str | None:
    """The release folder among an archive's member `names`: that of the shallowest `scans.csv` ("" at the top);
    None when there is none."""
    found = sorted((n for n in names if posixpath.basename(n) == SCANS_FILE), key=lambda n: n.count("/"))
    return posixpath.dirname(found[0]) if found else None


def write_release(
    url: str,
    core: Core,
    heads: Mapping[tuple[int, int], ScanHead],
    units: pd.DataFrame | None = None,
    data_ids: Mapping[tuple[int, int], str] | None = None,
    storage_options: Mapping[str, object] | None = None,
) -> None:
    """Write a release in the public format to a directory URL, or to a `.zip` when `url` ends in `.zip`.

    `units`: columns session, scan_idx, unit_id, readout_id (default: unit_id = readout_id). `data_ids` default
    to an MD5 of the scan key. The network config is recorded in `fnn_config.json`.
    """
    files: dict[str, bytes] = {}
    core_state = OrderedDict((CORE_PREFIX + k, v.detach().cpu().contiguous()) for k, v in core.state_dict().items())
    files[CORE_FILE] = _save(core_state)
    scan_rows, unit_rows = [], []
    for (session, scan_idx), head in heads.items():
        files[head_file(session, scan_idx)] = _save(
            OrderedDict((k, v.detach().cpu().contiguous()) for k, v in head.state_dict().items())
        )
        data_id = (data_ids or {}).get((session, scan_idx)) or hashlib.md5(f"{session}-{scan_idx}".encode()).hexdigest()
        scan_rows.append({"session": session, "scan_idx": scan_idx, "units": head.units, "data_id": data_id})
        if units is None:
            unit_rows.append(pd.DataFrame({"session": session, "scan_idx": scan_idx,
                                           "unit_id": range(head.units), "readout_id": range(head.units)}))
    unit_table = units if units is not None else pd.concat(unit_rows, ignore_index=True)
    files[SCANS_FILE] = pd.DataFrame(scan_rows).to_csv(index=False).encode()
    files[UNITS_FILE] = unit_table[["session", "scan_idx", "unit_id", "readout_id"]].to_csv(index=False).encode()
    files[CONFIG_FILE] = config_to_json(core.config).encode()

    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    if path.endswith(".zip"):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        fs.pipe_file(path, buffer.getvalue())
        return
    fs.makedirs(path, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(posixpath.join(path, name), data)


def _save(state: Mapping[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
