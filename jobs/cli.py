"""What every job's command line shares: the options, their checks, signals and exit statuses.

Exit statuses: 0 every item committed; 1 some item failed (the summary names file / row / clip, or the store);
2 bad setup (one ``error:`` line, nothing written, found before Ray starts where possible); 130 interrupted by
SIGINT (Ctrl-C), 143 by SIGTERM (what ``ray job stop`` sends): what was committed stays, a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from fnn_ray.job import JobSummary
from fnn_ray.lease import LeaseHeld
from fnn_ray.preflight import parse_scans

__all__ = ["Interrupted", "Parser", "add_job_options", "count", "job_options", "parse_size", "parse_storage_options",
           "positive", "run_cli"]

#: Exit status per interrupting signal (128 + the signal number, as shells report it).
EXIT = {"SIGINT": 130, "SIGTERM": 143}
#: The interrupting signal this process got: Ray's blocking calls (``ray.wait``, ``ray.get``) turn the exception
#: the handler raises into a plain KeyboardInterrupt, so its name is kept here too.
_received: list[str] = []


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``signal_name``); raised in the main thread so every ``finally`` runs."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: argument --trials: must be >= 1, got 0``, exit status 2), as for
    every other bad setup."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum`` (counts of clips, trials, frames, workers ...)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def positive(text: str) -> float:
    """An argparse type: a number ``> 0`` (seconds, CPUs, frame rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """The options every job takes (release, output, scans, workers, stores)."""
    parser.add_argument("--release", help="release directory or .zip URL (params_*.pt, scans.csv, units.csv), or "
                                          "'microns': the public release read in place from its bucket (anonymous)")
    parser.add_argument("--output", help="output URL (a local path, s3://bucket/prefix, ...)")
    parser.add_argument("--scans", default=None, help="SESSION-SCAN_IDX,... (default: every scan of the release)")
    parser.add_argument("--actors", type=count(), default=None,
                        help="number of workers (default: one per GPU; CPU-only: CPUs/4)")
    parser.add_argument("--clips-per-batch", type=count(), default=8, help="clips per model batch (default 8)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--storage-options", default=None, metavar="@FILE.json|JSON",
                        help="fsspec options for every store: @FILE.json, a file holding a JSON object (keeps "
                             "credentials off the command line, which every user can read), or the JSON itself, "
                             "e.g. '{\"endpoint_url\": ...}'; never echoed. S3 keys may instead come from the "
                             "AWS_* variables or a profile ('{\"profile\": NAME}' or AWS_PROFILE)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, set by `ray job submit`; else a private "
                             "local Ray on 127.0.0.1)")
    parser.add_argument("--store-timeout", type=positive, default=300.0,
                        help="seconds to ride out store outages and throttling before an item fails (default 300)")
    parser.add_argument("--wait-for-lock", action="store_true",
                        help="wait while another run writes the same output (default: exit 2 at once)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a clean output: remove what earlier runs committed at --output (a rerun with "
                             "settings that change the numbers is refused without it)")
    parser.add_argument("--max-retries", type=count(0), default=2, help="retries of an item after a non-store error")
    parser.add_argument("--max-heads", type=count(), default=4, help="scan heads cached per worker (default 4)")
    parser.add_argument("--cpus-per-actor", type=positive, default=None, help="Ray CPUs per worker")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def parse_size(text: str) -> tuple[int, int]:
    """``"144x256"`` -> ``(144, 256)`` (ValueError otherwise)."""
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad size {text!r}: expected ROWSxCOLS, e.g. 144x256") from None
    if a < 1 or b < 1:
        raise ValueError(f"bad size {text!r}: both numbers must be >= 1")
    return a, b


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options``: a JSON object, or ``@FILE`` naming a local file that holds one (so credentials need
    not appear on the command line, which every user of the machine can read in ``/proc/<pid>/cmdline``), or
    nothing. ValueError naming the flag or file otherwise; the contents are never echoed. A file other users may
    read gets a warning on stderr."""
    if not text:
        return None
    where = "--storage-options"
    if text.startswith("@"):
        path = os.path.abspath(os.path.expanduser(text[1:]))
        where = f"--storage-options file {path}"
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read().decode("utf-8")
        except OSError as e:
            raise ValueError(f"{where}: cannot be read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{where} is not UTF-8 text (expected a JSON object)") from None
        if mode & 0o077:
            print(f"warning: {where} is readable by group or others (chmod 600 it)", file=sys.stderr)
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{where} must hold a JSON object, got a JSON {type(options).__name__}")
    return options


def job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`fnn_ray.job.JobConfig` fields of ``args``, plus ``scans`` (ValueError naming a bad option)."""
    options = parse_storage_options(args.storage_options)
    return dict(scans=parse_scans(args.scans), actors=args.actors, clips_per_batch=args.clips_per_batch, dtype=args.dtype, storage_options=options,
                address=args.address, store_timeout_s=args.store_timeout, wait_for_lock=args.wait_for_lock,
                overwrite=args.overwrite,
                max_retries=args.max_retries, max_heads=args.max_heads, cpus_per_actor=args.cpus_per_actor,
                progress=not args.no_progress)


def _raise(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    _received.append(name)
    for sig in (signal.SIGINT, signal.SIGTERM):  # one interrupt is enough: let the cleanup finish
        signal.signal(sig, signal.SIG_IGN)
    print(f"\n{name}: stopping (committed items stay; rerun the same command to resume) ...", file=sys.stderr,
          flush=True)
    raise Interrupted(name)


class _Notices(logging.Handler):
    """fnn_ray's notices (waiting for another run's lease on the output, store retries, a lease taken over) as
    lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr, flush=True)


def _show_notices() -> None:
    logger = logging.getLogger("fnn_ray")
    if not any(isinstance(h, _Notices) for h in logger.handlers):
        logger.addHandler(_Notices())
        logger.setLevel(logging.INFO)


def run_cli(body: Callable[[], JobSummary | int]) -> int:
    """Run a job's ``body`` with the shared signal handling and exit statuses; ``body`` returns the job's summary
    (printed here) or an exit status."""
    _received.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise)
    _show_notices()
    try:
        result = body()
    except KeyboardInterrupt:  # while planning and starting, or while merging after the items were computed
        name = _received[0] if _received else "SIGINT"
        print(f"stopped by {name} before the job finished: what was committed stays; rerun the same command to "
              f"resume", flush=True)
        return EXIT[name]
    except (ValueError, FileNotFoundError, LeaseHeld) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # workers could not start, the cluster lacks resources, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, int):
        return result
    if result.interrupted and _received:
        result.interrupted = _received[0]
    print(result, flush=True)
    if result.interrupted:
        return EXIT.get(result.interrupted, 130)
    return 0 if result.ok else 1
