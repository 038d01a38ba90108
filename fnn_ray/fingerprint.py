"""What determines the numbers of a job's output: its fingerprint, recorded in ``manifest.json``, checked on reruns.

A job's fingerprint is a flat mapping ``field -> JSON value``, built when the job is planned (nothing written, Ray
not started) and saved in the output's manifest before the first item is committed:

==================  ==============================================================================================
``code``            ``"numbers N, fnn-ray V"``: :data:`NUMBERS_VERSION`, bumped by hand with every change that
                    changes committed numbers (the model, the engine, a reducer's arithmetic, a generator), and the
                    installed package version (a new release may change numbers; an ordinary commit does not)
``release``         :meth:`fnn_model.release.Release.fingerprint`: the network config, ``scans.csv``,
                    ``units.csv`` and every weight record's CRC-32 and size (no weights downloaded; the same
                    release copied elsewhere has the same digest)
``scans``           the job's scans, ``"S-I"`` sorted
``dtype``           ``float32`` or ``bfloat16``
``stimuli``         sweep: the stimulus dataset's identity (:func:`identity`: every file's path in the dataset, size
                    and the store's checksum when it keeps one, e.g. an S3 ETag; every clip's id and frames)
``context_frames``  sweep: the context frames of all clips together
``generator.*``     tuning, receptive fields: the stimulus family and each of its parameters
``recordings``      evaluate: the recordings' identity (as ``stimuli``); ``burnin``: the frames never scored
==================  ==============================================================================================

What only spreads the work is left out and free to change between runs: actors, batch sizes, timeouts, retries
(clips per shard / part change the items themselves: the ledger check refuses those); items computed in other
batches agree to float rounding, not bit for bit. The frames themselves are
not read: a local dataset rewritten in place with other pixels but the same files, sizes and clips keeps its
identity (write new stimuli to a new URL).

:func:`check` refuses (:class:`OtherComputation`, a ValueError: exit status 2) to add items to an output whose
committed items were computed with another fingerprint, naming the fields that differ; :func:`clear` empties an
output for ``--overwrite``. An output with no committed item takes any fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fnn_ray import storage
from fnn_ray.ledger import LEDGER_DIR
from fnn_ray.manifest import MANIFEST_NAME, Manifest, version

if TYPE_CHECKING:
    from fnn_model.release import Release
    from fnn_ray.job import Job

__all__ = ["NUMBERS_VERSION", "OtherComputation", "check", "clear", "fingerprint", "identity"]

#: Bump with every change that changes the numbers a job commits (model, engine, reducers, generators).
NUMBERS_VERSION = 1

Scan = tuple[int, int]


class OtherComputation(ValueError):
    """The output holds committed items of another computation (the message names the fields that differ)."""


def fingerprint(release: Release, scans: Sequence[tuple[Scan, int]], dtype: str, **inputs: Any) -> dict[str, Any]:
    """The fingerprint of a job of ``scans`` (``((session, scan_idx), units)`` pairs) of ``release`` in ``dtype``
    plus the job's own ``inputs`` (a mapping value becomes one field per key: ``generator={"seed": 1}`` ->
    ``generator.seed``)."""
    keys = [scan for scan, _ in scans]
    fields: dict[str, Any] = {"code": f"numbers {NUMBERS_VERSION}, fnn-ray {version()}",
                              "release": release.fingerprint(),
                              "scans": [f"{s}-{i}" for s, i in sorted(keys)], "dtype": dtype}
    for name, value in inputs.items():
        if isinstance(value, Mapping):
            fields.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            fields[name] = value
    return json.loads(json.dumps(fields, sort_keys=True))  # as it reads back from the manifest


def identity(url: str, storage_options: Mapping[str, Any] | None, keep: Callable[[str], bool],
             listing: Iterable[Any] = ()) -> str:
    """SHA-256 (hex) of the files under ``url`` whose path relative to ``url`` passes ``keep`` (each one's relative
    path, size and the store's checksum when its listing has one: S3 ETag, GCS md5Hash) and of ``listing``
    (JSON-able: what the job read from them, e.g. clip ids and frames). One recursive listing; no file is read."""
    fs, root = storage.filesystem(url, storage_options)
    fs.invalidate_cache(root)
    info = fs.info(root)
    if info.get("type") == "file":
        entries = {posixpath.basename(root): info}
    else:
        base = root.rstrip("/")
        entries = {path[len(base):].lstrip("/"): entry for path, entry in fs.find(root, detail=True).items()}
    files = []
    for rel, entry in entries.items():
        if keep(rel):
            check = next((str(entry[k]) for k in ("ETag", "md5Hash", "crc32c") if entry.get(k)), "")
            files.append((rel, int(entry.get("size") or 0), check.strip('"')))
    content = {"files": sorted(files), "listing": list(listing)}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=list).encode()).hexdigest()


def _has_commits(output_url: str, storage_options: Mapping[str, Any] | None) -> bool:
    """Whether any commit marker exists under the output (one listing, no marker read)."""
    fs, root = storage.filesystem(output_url, storage_options)
    base = posixpath.join(root.rstrip("/"), LEDGER_DIR)
    fs.invalidate_cache(base)
    try:
        return any(p.endswith(".json") and f"/{storage.STAGING_DIR}/" not in p for p in fs.find(base))
    except FileNotFoundError:
        return False


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else ""


def differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The fields that differ between ``recorded`` and ``wanted``, sorted by name, each as ``name OLD recorded,
    NEW now`` (short values) or ``name differs`` (digests, long values)."""
    out = []
    for name in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(name), wanted.get(name)
        if old != new:
            a, b = _shown(old), _shown(new)
            out.append(f"{name} {a} recorded, {b} now" if a and b else f"{name} differs")
    return out


def check(job: Job, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`OtherComputation` when the output at ``job.output_url`` holds committed items and its manifest
    records another fingerprint than ``job.fingerprint`` (or none). Reads only; an output without commits passes."""
    if not _has_commits(job.output_url, storage_options):
        return
    manifest = Manifest.load(job.output_url, storage_options)
    shown = storage.redact_url(job.output_url)
    advice = "rerun with the settings it was made with, use another --output, or add --overwrite to start it anew"
    if manifest is None or not manifest.fingerprint:
        raise OtherComputation(f"output {shown} holds committed items but no record of what computed them "
                               f"(no fingerprint in its {MANIFEST_NAME}): {advice}")
    changed = differences(manifest.fingerprint, job.fingerprint)
    if changed:
        raise OtherComputation(f"output {shown} holds items computed with other settings ({'; '.join(changed)}; "
                               f"see the fingerprint in its {MANIFEST_NAME}): {advice}")


def clear(job: Job, storage_options: Mapping[str, Any] | None = None, budget_s: float = 30.0) -> list[str]:
    """``--overwrite``: remove what runs of this job wrote at its output, commit markers first (so a crash midway
    leaves no commit whose file is gone): ``_ledger/``, the items' data, the job's products, staging objects, the
    manifest; return the names removed. Other files under the output stay. Only the lease holder calls this."""
    fs, root = storage.filesystem(job.output_url, storage_options)
    removed = []
    for name in (LEDGER_DIR, job.reducer.data_dir, *job.products, storage.STAGING_DIR, MANIFEST_NAME):
        path = posixpath.join(root.rstrip("/"), name)
        fs.invalidate_cache(path)
        try:
            if fs.exists(path):
                storage.retry(fs.rm, path, recursive=True, budget_s=budget_s,
                              what=f"removing {storage.redact_url(storage.join(job.output_url, name))}")
                removed.append(name)
        except FileNotFoundError:
            pass
    return removed
