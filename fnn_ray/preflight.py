"""Setup checks that run before Ray starts: each failure is one line naming what is wrong and where.

:func:`prepare` is every job's one setup step: locate the release (:func:`release_location`), open and check it
(:func:`open_release`: present, core and requested heads are torch archives, scans known) and check that the output
can be written (:func:`check_output`; nothing is left behind by the check). Jobs call it first, so a bad setup
fails in seconds with exit status 2 and nothing written.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fnn_ray import storage
from fnn_ray.plan import Scan

if TYPE_CHECKING:
    from fnn_model.release import Release

__all__ = ["Setup", "UnknownScans", "absolute", "check_output", "open_release", "parse_scans", "prepare",
           "release_location"]


class UnknownScans(ValueError):
    """Requested scans the release does not hold; ``known``: the release's scans."""

    def __init__(self, message: str, known: Sequence[Scan]) -> None:
        super().__init__(message)
        self.known = list(known)


@dataclass(frozen=True)
class Setup:
    """A checked setup: the opened ``release``, where it is (``release_url``, absolute) and its storage options, the
    requested scans with their unit counts, and the (absolute, writable) output URL."""

    release: Release = field(repr=False)
    release_url: str
    release_options: Mapping[str, Any] | None = field(repr=False)
    scans: list[tuple[Scan, int]]
    output_url: str


def absolute(url: str) -> str:
    """Local paths made absolute (so a manifest compares equal whatever the cwd); URLs unchanged."""
    url = os.fspath(url)
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def prepare(release: str, output: str, scans: Sequence[Scan] | None,
            storage_options: Mapping[str, Any] | None = None) -> Setup:
    """Every job's setup step: locate, open and check the release and the requested ``scans`` (None: all), check
    that ``output`` can be written. ValueError / FileNotFoundError naming the problem (:class:`UnknownScans` for
    scans the release lacks); nothing is written and Ray is not started."""
    release_url, release_options = release_location(release, storage_options)
    opened, chosen = open_release(release_url, scans, release_options)
    output_url = absolute(output)
    check_output(output_url, storage_options)
    return Setup(opened, release_url, release_options, chosen, output_url)



def parse_scans(text: str | None) -> list[Scan] | None:
    """``"8-5,9-6"`` -> ``[(8, 5), (9, 6)]``; empty or None -> None (all scans)."""
    if not text:
        return None
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            session, scan_idx = part.split("-")
            out.append((int(session), int(scan_idx)))
        except ValueError:
            raise ValueError(f"bad scan {part!r}: expected SESSION-SCAN_IDX, e.g. 8-5") from None
    return out or None


def release_location(url: str, storage_options: Mapping[str, Any] | None = None
                     ) -> tuple[str, Mapping[str, Any] | None]:
    """Where the release is and how to reach it: ``"microns"`` is the public release read in place from its
    bucket with anonymous access (the other stores' options never reach it); a local path is made absolute."""
    from fnn_model.microns import resolve_release

    url, options = resolve_release(url, storage_options)
    return (url if "://" in url else os.path.abspath(os.path.expanduser(url))), options


def open_release(url: str, wanted: Sequence[Scan] | None,
                 storage_options: Mapping[str, Any] | None = None) -> tuple[Release, list[tuple[Scan, int]]]:
    """Open and check the release at ``url``; return it with the requested scans and their unit counts (all scans
    when ``wanted`` is None). ValueError / FileNotFoundError (ReleaseError is a ValueError) naming the problem."""
    from fnn_model.release import Release

    release = Release.open(url, storage_options=storage_options)
    available = {info.key: info.units for info in release.scans}
    if wanted is not None:
        unknown = [s for s in wanted if s not in available]
        if unknown:
            names = ", ".join(f"{s}-{i}" for s, i in unknown)
            listing = ", ".join(f"{s}-{i}" for s, i in available)
            raise UnknownScans(f"unknown scan(s) {names} in release {storage.redact_url(release.url)}; "
                               f"available: {listing}", list(available))
        twice = [f"{s}-{i}" for (s, i), n in Counter(wanted).items() if n > 1]
        if twice:
            raise ValueError(f"scan(s) listed twice: {', '.join(twice)}")
    scans = list(available) if wanted is None else list(wanted)
    release.check(scans)
    return release, [(s, available[s]) for s in scans]


def check_output(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise ValueError unless ``url`` can be written (a probe object is written and removed)."""
    shown = storage.redact_url(url)
    try:
        fs, root = storage.filesystem(url, storage_options)
        if storage.is_local(fs):
            parent = root
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                raise ValueError(f"output {shown}: {parent} is not a directory")
            try:  # a real write (root passes os.access everywhere, even on read-only file systems)
                os.rmdir(tempfile.mkdtemp(prefix=".fnn-probe-", dir=parent))
            except OSError as e:
                raise ValueError(f"output {shown}: cannot write in {parent} ({e.strerror})") from None
            return
        probe = posixpath.join(root, storage.STAGING_DIR, f"probe-{uuid.uuid4().hex}")
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except ValueError:
        raise
    except Exception as e:  # permission denied, missing bucket, unreachable endpoint (no credentials in messages)
        raise ValueError(f"output {shown} is not writable: {type(e).__name__}: {e}") from None
