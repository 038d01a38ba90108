"""Per-epoch checkpoints of one twin on the output store, verified by hash.

    store = CheckpointStore("s3://b/run/twins/4-7")
    store.save(epoch=3, state={...tensors, ints, floats...}, metrics={"val": 0.93, ...})
    found = store.latest()       # the newest intact checkpoint (epoch, state, meta), or None

Layout under the twin's folder::

    checkpoints/epoch-0003/state.pt    torch.save of the state (tensors and plain values only)
    checkpoints/epoch-0003/meta.json   epoch, bytes and sha256 of state.pt, metrics: written last, the commit
    checkpoints/best.json              the epoch with the lowest validation objective so far

Both files are committed atomically (:func:`fnn_ray.storage.commit_bytes`). :meth:`CheckpointStore.latest` reads
the newest checkpoint whose ``meta.json`` exists and checks size and SHA-256 of ``state.pt``: a checkpoint that
is missing, truncated or altered is reported (one warning line) and the one before it is used. Retention: the
last ``keep_last`` checkpoints (2: the newest and its fallback) and the best one stay, older ones are removed.
States are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fnn_ray import storage

__all__ = ["Checkpoint", "CheckpointStore"]

_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")
STATE, META, BEST = "state.pt", "meta.json", "best.json"


@dataclass
class Checkpoint:
    """An intact checkpoint: its ``epoch`` (epochs completed), ``state`` and ``meta`` (incl. ``metrics``)."""

    epoch: int
    state: dict[str, Any]
    meta: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one twin under ``url/checkpoints`` (see the module docstring)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, keep_last: int = 2,
                 budget_s: float = 120.0) -> None:
        self.url = storage.join(url, "checkpoints")
        self.fs, self.root = storage.filesystem(self.url, storage_options)
        self.keep_last, self.budget_s = keep_last, budget_s

    def _dir(self, epoch: int) -> str:
        return posixpath.join(self.root, f"epoch-{epoch:04d}")

    def _retry(self, fn, *args, what: str):
        return storage.retry(fn, *args, budget_s=self.budget_s, what=f"{what} ({storage.redact_url(self.url)})")

    def epochs(self) -> list[int]:
        """Epochs with a committed ``meta.json``, oldest first."""
        self.fs.invalidate_cache(self.root)
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self._retry(self.fs.ls, self.root, False,
                                                                             what="listing checkpoints")]
        except FileNotFoundError:
            return []
        epochs = sorted(int(m.group(1)) for m in map(_EPOCH_DIR.match, names) if m)
        return [e for e in epochs if self.fs.exists(posixpath.join(self._dir(e), META))]

    def save(self, epoch: int, state: Mapping[str, Any], metrics: Mapping[str, float],
             validation: float | None = None) -> None:
        """Commit the checkpoint of ``epoch`` (``validation``: its objective, for the best-epoch record), then
        drop the checkpoints that are neither among the last ``keep_last`` nor the best."""
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        data = buffer.getvalue()
        folder = self._dir(epoch)
        self._retry(storage.commit_bytes, self.fs, posixpath.join(folder, STATE), data, what="saving a checkpoint")
        meta = {"epoch": epoch, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "metrics": dict(metrics), "validation": validation}
        self._retry(storage.commit_bytes, self.fs, posixpath.join(folder, META), json.dumps(meta).encode(),
                    what="saving a checkpoint")
        best = self.best()
        if validation is not None and (best is None or validation < best["validation"]):
            best = {"epoch": epoch, "validation": validation}
            self._retry(storage.commit_bytes, self.fs, posixpath.join(self.root, BEST), json.dumps(best).encode(),
                        what="saving the best epoch")
        keep = set(self.epochs()[-self.keep_last:]) | ({best["epoch"]} if best else set())
        for old in self.epochs():
            if old not in keep:
                self._retry(self.fs.rm, self._dir(old), True, what="removing an old checkpoint")

    def best(self) -> dict[str, Any] | None:
        """``{"epoch", "validation"}`` of the best epoch so far, or None."""
        try:
            return json.loads(self._retry(self.fs.cat_file, posixpath.join(self.root, BEST), what="reading best"))
        except FileNotFoundError:
            return None

    def load(self, epoch: int) -> Checkpoint:
        """The checkpoint of ``epoch``; ValueError when it is missing, truncated or altered (hash)."""
        folder = self._dir(epoch)
        where = storage.join(storage.redact_url(self.url), f"epoch-{epoch:04d}")
        try:
            meta = json.loads(self._retry(self.fs.cat_file, posixpath.join(folder, META), what="reading a checkpoint"))
            data = self._retry(self.fs.cat_file, posixpath.join(folder, STATE), what="reading a checkpoint")
        except FileNotFoundError as e:
            raise ValueError(f"{where}: incomplete ({e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}/{META}: not valid JSON ({e.msg})") from None
        if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise ValueError(f"{where}/{STATE}: corrupt ({len(data)} bytes, sha256 differs from its {META})")
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable although the hash matched: written by something else
            raise ValueError(f"{where}/{STATE}: unreadable ({type(e).__name__}: {e})") from None
        return Checkpoint(epoch, state, meta)

    def latest(self) -> Checkpoint | None:
        """The newest intact checkpoint (a broken one is reported on stderr and skipped), or None."""
        for epoch in reversed(self.epochs()):
            try:
                return self.load(epoch)
            except ValueError as e:
                print(f"WARNING: {e}; using the checkpoint before it", file=sys.stderr, flush=True)
        return None
