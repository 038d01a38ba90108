"""The trained twins as a release in the public format, which every job opens unchanged.

    write_twin_release("s3://b/run/release", foundation, twins=[TwinResult(...)], animal="27203")

Files (each committed atomically; ``scans.csv`` last, so a release with a ``scans.csv`` is whole)::

    params_core.pt               a byte copy of the foundation release's core (its SHA-256 in foundation.json)
    params_<session>_<scan_idx>.pt   each twin's head at its best validation epoch: exactly the public head's keys,
                                 shapes and dtypes (checked against the network before writing)
    fnn_config.json              the foundation release's network config
    units.csv                    session, scan_idx, unit_id, readout_id
    scans.csv                    session, scan_idx, units, data_id, animal_id
    foundation.json              the foundation release's URL, core SHA-256, the scan whose modulation.lstm each
                                 twin copied, and per twin its best epoch and frozen-tensor hash

Identity: a release holds the twins of ONE animal, ``animal_id`` is recorded per scan and ``data_id`` is a hash of
(animal, session, scan_idx). The foundation's own heads are never copied, so a lab scan with the same
(session, scan_idx) as a MICrONS scan cannot be confused with it: its file lives in a release of its own animal.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from fnn_ray import storage

__all__ = ["TwinResult", "data_id", "write_twin_release"]


@dataclass(frozen=True)
class TwinResult:
    """One trained twin: ``scan``, its ``unit_ids`` (readout order), the ``head`` state at its ``best_epoch``,
    the ``frozen_sha256`` it was trained on, the ``foundation_scan`` whose LSTM it copied."""

    scan: tuple[int, int]
    unit_ids: Sequence[int]
    head: Mapping[str, torch.Tensor]
    best_epoch: int
    validation: float
    frozen_sha256: str
    foundation_scan: tuple[int, int]


def data_id(animal: str, scan: tuple[int, int]) -> str:
    """The ``data_id`` of a twin: MD5 of ``"<animal>/<session>-<scan_idx>"``."""
    return hashlib.md5(f"{animal}/{scan[0]}-{scan[1]}".encode()).hexdigest()


def _save(state: Mapping[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def write_twin_release(url: str, foundation_url: str, twins: Sequence[TwinResult], animal: str,
                       storage_options: Mapping[str, Any] | None = None,
                       release_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the release of ``twins`` (see the module docstring) to ``url``; returns ``foundation.json``'s content.
    ReleaseError (a ValueError) when a head does not match the public head's keys and shapes."""
    from fnn_model.network import ScanHead
    from fnn_model.release import CONFIG_FILE, CORE_FILE, Release, check_state, config_to_json, head_file

    foundation = Release.open(foundation_url, storage_options=release_options)
    core = foundation.read_file(CORE_FILE)
    files: dict[str, bytes] = {CORE_FILE: core, CONFIG_FILE: config_to_json(foundation.config).encode()}
    scans, units = [], []
    for twin in twins:
        expected = {k: (tuple(v.shape), v.dtype) for k, v in ScanHead(foundation.config, len(twin.unit_ids))
                    .state_dict().items()}
        check_state(twin.head, expected, f"twin {twin.scan[0]}-{twin.scan[1]}")
        files[head_file(*twin.scan)] = _save(twin.head)
        scans.append({"session": twin.scan[0], "scan_idx": twin.scan[1], "units": len(twin.unit_ids),
                      "data_id": data_id(animal, twin.scan), "animal_id": animal})
        units.append(pd.DataFrame({"session": twin.scan[0], "scan_idx": twin.scan[1], "unit_id": list(twin.unit_ids),
                                   "readout_id": range(len(twin.unit_ids))}))
    record = {"foundation": storage.redact_url(foundation_url), "core_sha256": hashlib.sha256(core).hexdigest(),
              "animal_id": animal,
              "twins": {f"{t.scan[0]}-{t.scan[1]}": {"best_epoch": t.best_epoch, "validation": t.validation,
                                                     "frozen_sha256": t.frozen_sha256,
                                                     "foundation_scan": list(t.foundation_scan)} for t in twins}}
    files["units.csv"] = pd.concat(units, ignore_index=True).to_csv(index=False).encode()
    files["foundation.json"] = json.dumps(record, indent=1).encode()
    files["scans.csv"] = pd.DataFrame(scans).to_csv(index=False).encode()
    fs, root = storage.filesystem(url, storage_options)
    for name, data in files.items():  # scans.csv last: dicts keep insertion order
        storage.retry(storage.commit_bytes, fs, posixpath.join(root, name), data, budget_s=120,
                      what=f"writing release file {name}")
    return record
