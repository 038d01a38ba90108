"""Work planning: what one unit of work is, what it costs, and how the stimulus set is cut into units.

A *work item* is one (scan, part) pair: run the per-scan FNN model over every clip of one *part* of a stimulus
source (a shard of a Parquet dataset, a block of generated clips, the repeats of some recorded videos) and commit
what the job's reducer makes of the responses. Items are independent (the network state is reset at the start
of every clip), so they can run in any order on any actor.

Cost model
----------
Costs are expressed in **core-frames**: the time one actor needs to push one frame through the shared core
(feedforward + recurrent). The numbers come from ``shared/FNN_ARCHITECTURE.md`` §7.2 (FLOPs per steady-state
frame, batch 1, measured with ``torch.utils.flop_counter``):

* core + perspective + modulation: 8,425,195,026 FLOP per frame (≈ 8.43 GFLOP)  →  ``CORE_COST = 1.0``;
* readout: 1,024 FLOP per unit-frame for the feature dot products (4 streams x 128 channels x 2), plus a
  bilinear ``grid_sample`` of 4 x 128 channels at every unit position, which the FLOP counter does not see:
  4 taps x 512 channels x 2 ≈ 4,096 FLOP, but a memory-bound gather, so we charge it at about 3x its
  arithmetic. Total ≈ 16,000 FLOP-equivalents per unit-frame ≈ 16e3 / 8.43e9 ≈ 2e-6 core-frames
  →  ``UNIT_COST = 2e-6``. For the largest scan (U ≈ 10,000) the readout is ≈ 2 % of the core.
* head load: making the per-scan part of the model (perspective, modulation, readout: 522·U + ~9,600
  parameters, ≈ 21 MB in fp32 for U = 10,000) ready on an actor that already has the shared core. If the
  actor keeps every scan's state dict deserialised in host memory (≈ 270 MB for all 13 scans), that is
  building the modules plus a host-to-device copy, ≈ 5-10 ms; a core-frame (8.43 GFLOP) takes ≈ 0.05-0.1 ms
  at an effective 80-170 TFLOP/s  →  ``HEAD_LOAD_COST = 100.0`` core-frames. Reading the ``.pt`` file again
  for every switch would cost 2-3x more. This is an estimate: the scheduler uses it to decide whether a
  steal that needs a new head pays off, and ``python -m jobs.simulate --head-load-cost`` shows how the makespan
  depends on it.

An item's cost is therefore ``frames * (CORE_COST + units * UNIT_COST)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import AbstractSet, Protocol, Sequence

__all__ = [
    "CORE_COST",
    "UNIT_COST",
    "HEAD_LOAD_COST",
    "CostModel",
    "Key",
    "Scan",
    "DEFAULT_COST_MODEL",
    "Part",
    "WorkItem",
    "build_items",
    "choose_clips_per_shard",
]

#: A scan: (session, scan_idx).
Scan = tuple[int, int]
#: A work item's key: (session, scan_idx, part id).
Key = tuple[int, int, str]

#: Cost of one frame through the core (the unit of all costs), see the module docstring.
CORE_COST: float = 1.0
#: Cost of the readout of one unit for one frame, in core-frames (≈ 16e3 FLOP-equivalents / 8.43e9 FLOP).
UNIT_COST: float = 2e-6
#: Cost of loading one scan's head (perspective, modulation, readout) onto an actor, in core-frames.
HEAD_LOAD_COST: float = 100.0


@dataclass(frozen=True)
class CostModel:
    """Relative costs in core-frames (see the module docstring for where the defaults come from)."""

    core_cost: float = CORE_COST
    """Cost of one frame through the shared core."""
    unit_cost: float = UNIT_COST
    """Readout cost per unit per frame."""
    head_load_cost: float = HEAD_LOAD_COST
    """One-off cost when an actor first needs the head of a scan."""

    def item_cost(self, frames: int, units: int) -> float:
        """Cost of running ``frames`` frames through a model with ``units`` readout units."""
        return frames * (self.core_cost + units * self.unit_cost)


DEFAULT_COST_MODEL = CostModel()


class Part(Protocol):
    """A block of stimulus clips, as a source lists it (picklable, small: no frames).

    ``part_id``: filename-safe and unique within the source; ``frames``: total frames of its clips; ``where``:
    where its clips come from, for messages (a file URL, a generator's name).
    """

    @property
    def part_id(self) -> str: ...

    @property
    def frames(self) -> int: ...

    @property
    def where(self) -> str: ...


@dataclass(frozen=True, eq=False)
class WorkItem:
    """One unit of work: all clips of ``part`` through the model of scan ``(session, scan_idx)``.

    Equality and hashing use :attr:`key` only, so items can live in sets and dicts even when the part
    object itself is not hashable.
    """

    session: int
    scan_idx: int
    units: int
    part: Part

    @property
    def scan(self) -> tuple[int, int]:
        """``(session, scan_idx)``."""
        return (self.session, self.scan_idx)

    @property
    def part_id(self) -> str:
        """The part's id (unique within a source; names the item's files and ledger entry)."""
        return self.part.part_id

    @property
    def frames(self) -> int:
        """Number of frames in the part."""
        return int(self.part.frames)

    @property
    def cost(self) -> float:
        """Estimated cost in core-frames: ``frames * (CORE_COST + units * UNIT_COST)``."""
        return DEFAULT_COST_MODEL.item_cost(self.frames, self.units)

    @property
    def key(self) -> tuple[int, int, str]:
        """``(session, scan_idx, part_id)``: unique over a run; the form used by ``skip`` sets."""
        return (self.session, self.scan_idx, self.part_id)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WorkItem):
            return NotImplemented
        return self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"WorkItem({self.session}-{self.scan_idx}, {self.part_id!r}, units={self.units}, frames={self.frames})"


def build_items(
    scans: Sequence[tuple[tuple[int, int], int]],
    parts: Sequence[Part] | Mapping[tuple[int, int], Sequence[Part]],
    skip: AbstractSet[tuple[int, int, str]] = frozenset(),
) -> list[WorkItem]:
    """Cross every scan with its parts (the same ``parts`` for every scan, or a mapping scan -> parts), leaving
    out the keys in ``skip`` (work already done).

    ``scans`` holds ``((session, scan_idx), units)`` pairs. The result is scan-major (scans in the given
    order, parts in the given order within a scan), which keeps it deterministic.

    Raises ``ValueError`` on a repeated scan, a repeated part id, or a scan with fewer than one unit.
    """
    seen_scans: set[tuple[int, int]] = set()
    for (session, scan_idx), units in scans:
        if (session, scan_idx) in seen_scans:
            raise ValueError(f"scan {session}-{scan_idx} is listed twice")
        if units < 1:
            raise ValueError(f"scan {session}-{scan_idx} has {units} units")
        seen_scans.add((session, scan_idx))
    items: list[WorkItem] = []
    for (session, scan_idx), units in scans:
        own = parts[(session, scan_idx)] if isinstance(parts, Mapping) else parts
        ids = [p.part_id for p in own]
        if len(set(ids)) != len(ids):
            raise ValueError(f"part ids of scan {session}-{scan_idx} are not unique")
        items.extend(WorkItem(int(session), int(scan_idx), int(units), part) for part in own
                     if (session, scan_idx, part.part_id) not in skip)
    return items


def choose_clips_per_shard(
    total_clips: int,
    scans: int,
    actors: int,
    *,
    items_per_actor: int = 32,
    max_clips: int = 8,
) -> int:
    """Pick a shard size (clips per shard) that gives the scheduler enough items to balance ``actors``.

    Aims for at least ``items_per_actor`` items per actor (``scans * shards >= items_per_actor * actors``)
    while keeping shards as large as possible (fewer, bigger reads; more clips per GPU batch), capped at
    ``max_clips``. Items cannot be smaller than one clip (the network is stateful within a clip), so for very
    many actors the answer is 1 and the item count is whatever one clip per shard gives.

    With equal-sized items the makespan is at least ``ceil(items / actors)`` items, so a few dozen items per
    actor keep that rounding loss to a few percent; ``python -m jobs.simulate`` measures it.
    """
    if total_clips < 1 or scans < 1 or actors < 1:
        raise ValueError("total_clips, scans and actors must be positive")
    if items_per_actor < 1 or max_clips < 1:
        raise ValueError("items_per_actor and max_clips must be positive")
    # shards needed so that scans * shards >= items_per_actor * actors
    shards_needed = math.ceil(items_per_actor * actors / scans)
    clips = total_clips // max(shards_needed, 1)
    return max(1, min(max_clips, clips))
