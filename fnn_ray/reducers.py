"""Reducers: what a worker makes of one item's responses before anything leaves it.

The worker predicts the clips of an item, hands ``(clip, response [T, U])`` pairs to the job's reducer and commits
the table it returns at ``reducer.file(item)`` (relative to the output URL), then records the commit in the ledger
(:mod:`fnn_ray.ledger`). Per-frame responses never leave the worker unless the reducer keeps them:

* :class:`FramesReducer` (sweeps): every frame of every unit, the response dataset of :mod:`fnn_ray.responses`;
* :class:`WindowReducer` (in-silico experiments): per unit and condition, the sum over the clip windows of the
  unit's mean response in each window, and how many windows went in; the job merges the items' sums at the end.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from fnn_ray import responses
from fnn_ray.plan import WorkItem
from fnn_ray.stimuli import Clip

if TYPE_CHECKING:
    from fnn_ray.generators import Family

__all__ = ["FramesReducer", "Reducer", "Units", "WindowReducer", "window_sums"]


@dataclass(frozen=True)
class Units:
    """The units of one scan: ``unit_ids`` int64 ``[U]`` and ``readout_ids`` int32 ``[U]`` (the model's columns)."""

    unit_ids: np.ndarray
    readout_ids: np.ndarray


class Reducer(ABC):
    """Turns the responses of one item into the table that is committed for it."""

    #: Directory (relative to the output URL) holding every file this reducer commits.
    data_dir: str

    def file(self, item: WorkItem) -> str:
        """Where ``item``'s table is committed, relative to the output URL."""
        return f"{self.data_dir}/session={item.session}/scan_idx={item.scan_idx}/{item.part_id}.parquet"

    @abstractmethod
    def reduce(self, item: WorkItem, units: Units, results: Iterable[tuple[Clip, np.ndarray]]) -> pa.Table:
        """``results``: each clip of the item with its response, float32 ``[T, U]`` (context frames dropped)."""


@dataclass(frozen=True)
class FramesReducer(Reducer):
    """Per-frame responses: one row per (clip, unit) with the response at every frame (the sweep's output)."""

    data_dir: str = responses.RESPONSES_DIR

    def reduce(self, item: WorkItem, units: Units, results: Iterable[tuple[Clip, np.ndarray]]) -> pa.Table:
        pairs = list(results)
        return responses.response_table([c.clip_id for c, _ in pairs], [r for _, r in pairs], units.unit_ids,
                                        units.readout_ids)


def window_sums(response: np.ndarray, windows: Iterable, conditions: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of window means per condition: ``response`` ``[T, U]``, windows with ``condition``, ``start``,
    ``stop`` -> (float64 ``[U, K]`` sums of the unit's mean over each window's frames, int64 ``[K]`` counts)."""
    sums = np.zeros((response.shape[1], conditions), np.float64)
    counts = np.zeros(conditions, np.int64)
    for w in windows:
        sums[:, w.condition] += response[w.start:w.stop].mean(axis=0, dtype=np.float64)
        counts[w.condition] += 1
    return sums, counts


@dataclass(frozen=True)
class WindowReducer(Reducer):
    """Window means summed per condition of a generated stimulus ``family`` (its clips' windows).

    The committed table has one row per unit: ``unit_id``, ``readout_id``, ``sums`` list<float64>[K]; the
    window counts per condition (the same for every unit) are in the file's schema metadata ``counts``.
    """

    family: Family
    data_dir: str = "_partials/windows"

    def reduce(self, item: WorkItem, units: Units, results: Iterable[tuple[Clip, np.ndarray]]) -> pa.Table:
        index = {self.family.clip_id(i): i for i in range(item.part.start, item.part.stop)}
        k = len(self.family.conditions)
        sums = np.zeros((len(units.unit_ids), k), np.float64)
        counts = np.zeros(k, np.int64)
        for clip, response in results:
            s, c = window_sums(response, self.family.windows(index[clip.clip_id]), k)
            sums += s
            counts += c
        table = pa.table({
            "unit_id": pa.array(units.unit_ids.astype(np.int64)),
            "readout_id": pa.array(units.readout_ids.astype(np.int32)),
            "sums": pa.FixedSizeListArray.from_arrays(pa.array(sums.ravel()), k),
        })
        return table.replace_schema_metadata({"counts": json.dumps(counts.tolist())})
