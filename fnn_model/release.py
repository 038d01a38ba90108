"""The release format (spec 6) on any fsspec URL: a directory or a `.zip` holding `params_core.pt`,
`params_{session}_{scan_idx}.pt`, `scans.csv` and `units.csv` (plus our optional `fnn_config.json`).

Weights are read with `torch.load(..., weights_only=True)` only, and every key, shape and dtype is checked
against the network config before anything is loaded into a module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import posixpath
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import fsspec
import pandas as pd
import torch
from fsspec.implementations.zip import ZipFileSystem

from fnn_model.config import FeedforwardConfig, ModulationConfig, NetworkConfig, PerspectiveConfig, RecurrentConfig
from fnn_model.network import Core, Network, ScanHead

#: MD5 of the public MICrONS release, `foundational_model_weights_and_metadata_v1.zip`.
MICRONS_MD5 = "58fcac4b31ad2902c81e339432cec787"

CORE_FILE = "params_core.pt"
SCANS_FILE = "scans.csv"
UNITS_FILE = "units.csv"
CONFIG_FILE = "fnn_config.json"
CORE_PREFIX = "core."


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

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, config: NetworkConfig) -> None:
        self.fs, self.root, self.url, self.config = fs, root, url, config
        self.scans = self._read_scans()
        self._units = self._read_units()
        self._core: Core | None = None

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
        root = path
        if is_file:
            if md5 is not None:
                got = _md5(fs, path)
                if got != md5.lower():
                    raise ReleaseError(f"release {url}: MD5 mismatch: expected {md5.lower()}, got {got}")
            fs, root = _open_zip(fs, path, url)
        if config is None:
            config_path = posixpath.join(root, CONFIG_FILE) if root else CONFIG_FILE
            config = config_from_json(fs.cat_file(config_path).decode()) if fs.exists(config_path) else NetworkConfig()
        return cls(fs, root, url, config)

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name) if self.root else name

    def _read(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            raise ReleaseError(f"release {self.url}: missing file {name}") from None

    def _read_csv(self, name: str, columns: list[str]) -> pd.DataFrame:
        table = pd.read_csv(io.BytesIO(self._read(name)))
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

    def load_core(self) -> Core:
        """The shared core (loaded once per `Release`, eval mode, CPU)."""
        if self._core is None:
            core = Core(self.config)
            state = load_tensors(self._read(CORE_FILE), f"{CORE_FILE} in {self.url}")
            check_state(state, _expected(core, CORE_PREFIX), f"{CORE_FILE} in {self.url}")
            core.load_state_dict({k[len(CORE_PREFIX):]: v for k, v in state.items()}, strict=True)
            self._core = core.eval()
        return self._core

    def load_head(self, session: int, scan_idx: int) -> ScanHead:
        """A scan's perspective, modulation and readout (eval mode, CPU)."""
        info = self.scan(session, scan_idx)
        head = ScanHead(self.config, info.units)
        name = head_file(session, scan_idx)
        state = load_tensors(self._read(name), f"{name} in {self.url}")
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


def _open_zip(fs: fsspec.AbstractFileSystem, path: str, url: str) -> tuple[ZipFileSystem, str]:
    """Open a zip archive; the release root is the folder of its shallowest `scans.csv`."""
    try:
        archive = ZipFileSystem(fo=fs.open(path, "rb"))
    except zipfile.BadZipFile:
        raise ReleaseError(f"release {url}: not a valid zip archive (corrupt or truncated)") from None
    found = sorted(
        (p for p in archive.find("") if posixpath.basename(p) == SCANS_FILE), key=lambda p: p.count("/")
    )
    if not found:
        raise ReleaseError(f"release {url}: the zip archive holds no {SCANS_FILE}")
    return archive, posixpath.dirname(found[0])


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
