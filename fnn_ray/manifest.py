"""The run manifest: ``<output>/manifest.json``, a JSON summary of a run, committed atomically.

It records what the run computes and how far it got (for resuming and for people), and the fingerprint of what
determines the output's numbers (:mod:`fnn_ray.fingerprint`: digests and settings, checked on every rerun); never
storage options or credentials: URLs are stored with any ``user:password@`` removed and config entries whose
names look secret (key, secret, token, password, credential, storage_options, ...) are dropped.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from fnn_ray import storage

__all__ = ["MANIFEST_NAME", "Manifest", "manifest_url", "version"]

MANIFEST_NAME = "manifest.json"

_SECRET = re.compile(
    r"secret|passw|token|credential|storage_options|auth(oriz|_|$)|(^|_|-)key(s|_|$)|api_?key|access_?key", re.I
)


def version() -> str:
    """The installed fnn-ray version ("unknown" when not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, version as _v

        return _v("fnn-ray")
    except (ImportError, PackageNotFoundError):
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def manifest_url(output_url: str) -> str:
    """URL of the manifest of the run at ``output_url``."""
    return storage.join(output_url, MANIFEST_NAME)


def _scrub(value: Any) -> Any:
    """JSON-able copy of ``value`` without secret-looking keys; URLs redacted."""
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items() if not _SECRET.search(str(k))}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        return storage.redact_url(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _scrub(value.item())
    return str(value)


@dataclass
class Manifest:
    """Summary of one run.

    ``job``: what ran (``sweep``, ``tuning``, ...); ``inputs``: what it ran on (stimulus URL or generator
    parameters; a rerun of other inputs into the same output is refused); ``scans`` are ``(session, scan_idx)``
    pairs with ``units[k]`` units each; ``clips`` / ``frames`` are the stimulus totals; ``items_done`` holds the
    committed ``(session, scan_idx, part_id)`` triples (reconciled with the ledger at the start and end of every
    run); ``started`` / ``updated`` are ISO-8601 UTC timestamps; ``config`` is a short, secret-free summary of
    the run's settings; ``fingerprint`` is what determines the numbers (:mod:`fnn_ray.fingerprint`; digests and
    setting values, no URLs or credentials).
    """

    job: str
    release_url: str
    inputs: dict[str, Any]
    scans: list[tuple[int, int]]
    units: list[int]
    clips: int
    frames: int
    items_total: int
    items_done: list[tuple[int, int, str]] = field(default_factory=list)
    started: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    version: str = field(default_factory=version)
    config: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.release_url = storage.redact_url(self.release_url)
        self.inputs = _scrub(dict(self.inputs))
        self.scans = [(int(s), int(i)) for s, i in self.scans]
        self.units = [int(u) for u in self.units]
        if len(self.units) != len(self.scans):
            raise ValueError(f"{len(self.scans)} scans but {len(self.units)} unit counts")
        self.items_done = sorted({(int(s), int(i), str(it)) for s, i, it in self.items_done})
        self.config = _scrub(dict(self.config))

    @property
    def units_per_scan(self) -> dict[tuple[int, int], int]:
        return dict(zip(self.scans, self.units))

    @property
    def complete(self) -> bool:
        return len(self.items_done) >= self.items_total

    def mark_done(self, items: Iterable[tuple[int, int, str]]) -> None:
        """Add committed items and bump ``updated``."""
        done = set(self.items_done) | {(int(s), int(i), str(it)) for s, i, it in items}
        self.items_done = sorted(done)
        self.updated = _now()

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["scans"] = [list(x) for x in self.scans]
        d["items_done"] = [list(x) for x in self.items_done]
        d["config"] = _scrub(self.config)
        return json.dumps(d, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["scans"] = [tuple(x) for x in d.get("scans", [])]
        d["items_done"] = [tuple(x) for x in d.get("items_done", [])]
        return cls(**d)

    def save(self, output_url: str, storage_options: Mapping[str, Any] | None = None, touch: bool = True) -> str:
        """Write ``manifest.json`` at ``output_url`` atomically (``touch`` sets ``updated`` to now); return its URL."""
        if touch:
            self.updated = _now()
        fs, root = storage.filesystem(output_url, storage_options)
        storage.commit_bytes(
            fs,
            posixpath.join(root, MANIFEST_NAME),
            self.to_json().encode(),
            posixpath.join(root, storage.STAGING_DIR),
        )
        return manifest_url(output_url)

    @classmethod
    def load(cls, output_url: str, storage_options: Mapping[str, Any] | None = None) -> "Manifest | None":
        """Read ``manifest.json`` at ``output_url``; None when there is none."""
        fs, root = storage.filesystem(output_url, storage_options)
        path = posixpath.join(root, MANIFEST_NAME)
        fs.invalidate_cache(root)
        try:
            text = fs.cat_file(path).decode()
        except FileNotFoundError:
            return None
        try:
            return cls.from_json(text)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{storage.redact_url(manifest_url(output_url))}: invalid manifest ({e})") from None
