"""Stimulus sources: where the clips of a work item come from, on the worker.

A source is small and picklable: the driver sends it with every item, the worker calls :meth:`Source.read`.
Listing the parts happens on the driver, by the job that builds the source (a Parquet dataset is listed from its
footers; a generator knows its clips without generating them).

* :class:`ParquetSource`: the stimulus dataset of :mod:`fnn_ray.stimuli` (parts are its shards);
* :class:`GeneratedSource`: clips made on the worker by a seeded generator of :mod:`fnn_ray.generators`
  (parts are blocks of clip indices; no stimulus I/O at all).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fnn_ray import stimuli
from fnn_ray.plan import WorkItem
from fnn_ray.stimuli import Clip, Shard

if TYPE_CHECKING:
    from fnn_ray.generators import Family

__all__ = ["ClipBlock", "GeneratedSource", "ParquetSource", "Source", "blocks"]


class Source(ABC):
    """Gives the clips of one work item's part (worker side)."""

    @abstractmethod
    def read(self, item: WorkItem, stats: dict[str, float] | None = None) -> list[Clip]:
        """The clips of ``item.part`` in order; ``stats`` (if given) gains ``bytes_read`` / ``frame_bytes``.

        Raises ValueError / FileNotFoundError naming the file, row and clip for bad or missing data.
        """


@dataclass(frozen=True)
class ParquetSource(Source):
    """Clips of a Parquet stimulus dataset (parts: :class:`fnn_ray.stimuli.Shard`)."""

    url: str
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)

    def read(self, item: WorkItem, stats: dict[str, float] | None = None) -> list[Clip]:
        shard: Shard = item.part  # type: ignore[assignment]
        clips = stimuli.read_shard(shard, self.storage_options, stats=stats)
        if [c.clip_id for c in clips] != list(shard.clip_ids):
            raise ValueError(f"{shard.file_url} rows [{shard.row_start}, {shard.row_stop}) do not hold the "
                             f"listed clips")
        return clips


@dataclass(frozen=True)
class ClipBlock:
    """Clips ``[start, stop)`` of a generator (a :class:`fnn_ray.plan.Part`); ``frames``: their total."""

    family: str
    start: int
    stop: int
    frames: int

    @property
    def part_id(self) -> str:
        return f"clips-{self.start:06d}-{self.stop:06d}"

    @property
    def where(self) -> str:
        return f"{self.family} clips [{self.start}, {self.stop})"


def blocks(family: Family, clips_per_part: int) -> list[ClipBlock]:
    """The generator's clips cut into parts of at most ``clips_per_part`` consecutive clips."""
    if clips_per_part < 1:
        raise ValueError(f"clips per part must be >= 1, got {clips_per_part}")
    out = []
    for start in range(0, family.num_clips, clips_per_part):
        stop = min(start + clips_per_part, family.num_clips)
        out.append(ClipBlock(family.name, start, stop, sum(family.num_frames(i) for i in range(start, stop))))
    return out


@dataclass(frozen=True)
class GeneratedSource(Source):
    """Clips made on the worker by ``family`` (deterministic in its parameters and seed)."""

    family: Family

    def read(self, item: WorkItem, stats: dict[str, float] | None = None) -> list[Clip]:
        block: ClipBlock = item.part  # type: ignore[assignment]
        return [Clip(self.family.clip_id(i), self.family.frames(i)) for i in range(block.start, block.stop)]
