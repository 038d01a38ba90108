"""Predictions inside a Ray Data pipeline: :class:`FNNPredictor`, a callable class for ``Dataset.map_batches``.

    import ray
    from fnn_ray.raydata import FNNPredictor

    clips = ray.data.read_parquet("s3://bucket/stimuli")       # the stimulus dataset of fnn_ray.stimuli
    responses = clips.map_batches(
        FNNPredictor,
        fn_constructor_kwargs={"release_url": "s3://bucket/microns", "scans": [(8, 5), (9, 6)]},
        batch_size=4,                                     # clips per model batch
        compute=ray.data.ActorPoolStrategy(size=2),       # actors; each loads the core and the heads once
        num_gpus=1,                                       # per actor; leave out on CPUs
    )
    responses.write_parquet("s3://bucket/run1/raydata")

Input: batches of stimulus rows, as :mod:`fnn_ray.stimuli` defines them (``clip_id``, ``frames`` bytes of a
uint8 ``[T, H, W]`` array, ``num_frames``, ``height``, ``width``, optional ``perspectives`` / ``modulations``
(``[T, 2]`` row-major) and ``context_frames``), in any batch format (``numpy``, ``pandas``, ``pyarrow``).

Output: one row per (scan, clip, unit), a ``pyarrow.Table`` with :data:`OUTPUT_SCHEMA`: ``session``,
``scan_idx`` (int32), ``clip_id``, ``unit_id`` (int64), ``readout_id`` (int32) and ``response``
(list<float32>: the unit's response at every frame after the clip's context frames). These are the rows of the
sweep's response dataset (:mod:`fnn_ray.responses`) with their partition columns, so the same code reads both.
Long rows rather than one ``[T, U]`` tensor per clip and scan: clips differ in length and scans in units, which
Arrow holds as plain list columns, while ragged tensors need Ray's extension types. A batch of ``N`` clips gives
``N x`` (units of all scans) rows of ``T`` floats each: size ``batch_size`` for memory (10 scans of 10,000
units, 300 frames: 120 MB per clip).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from fnn_ray import responses
from fnn_ray.reducers import Units
from fnn_ray.stimuli import Clip
from fnn_ray.worker import predict_clips, torch_dtype

__all__ = ["OUTPUT_SCHEMA", "FNNPredictor", "batch_to_clips"]

#: The columns of every table :class:`FNNPredictor` returns.
OUTPUT_SCHEMA = pa.schema([pa.field("session", pa.int32()), pa.field("scan_idx", pa.int32()), *responses.SCHEMA])

_REQUIRED = ("clip_id", "frames", "num_frames", "height", "width")


def _column_values(batch: Any) -> dict[str, Sequence[Any]]:
    """The batch's columns as per-row values: a dict of numpy arrays (or lists), a DataFrame or a pyarrow Table."""
    if isinstance(batch, pa.Table):
        return {name: batch.column(name).to_numpy() for name in batch.column_names}
    if isinstance(batch, Mapping):
        return dict(batch)
    if hasattr(batch, "columns") and hasattr(batch, "to_dict"):  # pandas.DataFrame
        return {name: batch[name].to_numpy() for name in batch.columns}
    raise TypeError(f"FNNPredictor: a batch must be a dict of arrays, a pandas DataFrame or a pyarrow Table, "
                    f"got {type(batch).__name__}")


def _is_null(value: Any) -> bool:
    """None, NaN (pandas' null in a float column) or pandas.NA."""
    if value is None or type(value).__name__ == "NAType":
        return True
    return isinstance(value, (float, np.floating)) and bool(np.isnan(value))


def batch_to_clips(batch: Any) -> list[Clip]:
    """Stimulus rows (a Ray Data batch in any format) -> validated :class:`fnn_ray.stimuli.Clip` s, in row order.

    Raises ValueError naming the row and clip for a missing column or a row that breaks the stimulus contract
    (``len(frames) != num_frames * height * width``, a vector column without ``2 * num_frames`` values, ...).
    """
    columns = _column_values(batch)
    missing = [name for name in _REQUIRED if name not in columns]
    if missing:
        raise ValueError(f"stimulus batch: missing column(s) {missing}; expected the stimulus columns "
                         f"{list(_REQUIRED)} (+ optional perspectives, modulations, context_frames)")
    clips = []
    for row in range(len(columns["clip_id"])):
        clip_id = columns["clip_id"][row]
        where = f"stimulus batch row {row} (clip_id {clip_id!r})"
        t, h, w = (int(columns[name][row]) for name in ("num_frames", "height", "width"))
        raw = columns["frames"][row]
        if _is_null(raw):
            raise ValueError(f"{where}: frames is null")
        frames = np.frombuffer(raw, np.uint8) if not isinstance(raw, np.ndarray) else raw.astype(np.uint8).ravel()
        if frames.size != t * h * w:
            raise ValueError(f"{where}: frames has {frames.size} bytes, expected num_frames*height*width = "
                             f"{t}*{h}*{w} = {t * h * w}")
        vectors = {}
        for name in ("perspectives", "modulations"):
            value = columns[name][row] if name in columns else None
            if _is_null(value):
                vectors[name] = None
                continue
            value = np.asarray(value, np.float32).ravel()
            if value.size != 2 * t:
                raise ValueError(f"{where}: {name} has {value.size} values, expected 2*num_frames = {2 * t}")
            vectors[name] = value.reshape(t, 2)
        context = columns["context_frames"][row] if "context_frames" in columns else None
        clip = Clip(str(clip_id), frames.reshape(t, h, w), context_frames=0 if _is_null(context) else int(context),
                    **vectors)
        clip.validate()
        clips.append(clip)
    return clips


class FNNPredictor:
    """Responses of a release's scans to stimulus rows; one instance per Ray Data actor (see the module doc).

    ``__init__`` opens the release once and holds its core and the heads of ``scans`` (default: every scan of the
    release) on ``device``: ``None`` takes the GPU when torch sees one, which in a Ray actor means it was given
    ``num_gpus`` (Ray hides the GPUs from actors without them), else the CPU. ``dtype``: ``"float32"``, or
    ``"bfloat16"`` (faster, approximate: see README). ``storage_options`` reach the release's store.
    """

    def __init__(self, release_url: str, scans: Sequence[tuple[int, int]] | None = None,
                 storage_options: Mapping[str, Any] | None = None, dtype: str = "float32",
                 device: str | None = None) -> None:
        import torch

        from fnn_model.engine import Engine
        from fnn_model.release import Release

        release = Release.open(release_url, storage_options=storage_options)
        self.scans = [(int(s), int(i)) for s, i in scans] if scans is not None else [info.key for info in release.scans]
        if not self.scans:
            raise ValueError(f"release {release_url}: no scans to predict")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = Engine(release.load_core(), device=device, dtype=torch_dtype(dtype))
        self.units: dict[tuple[int, int], Units] = {}
        for scan in self.scans:
            self.engine.add_head(scan, release.load_head(*scan))
            table = release.units(*scan)
            self.units[scan] = Units(table.unit_id.to_numpy(np.int64), table.readout_id.to_numpy(np.int32))

    def __call__(self, batch: Any) -> pa.Table:
        """Stimulus rows -> response rows (:data:`OUTPUT_SCHEMA`), by scan, then clip, then ``readout_id``.

        The batch's clips go through the model together (padded to the longest; ``batch_size`` is the model
        batch), once per scan.
        """
        clips = batch_to_clips(batch)
        if not clips:
            return OUTPUT_SCHEMA.empty_table()
        ids = [clip.clip_id for clip in clips]
        tables = []
        for scan in self.scans:
            units = self.units[scan]
            table = responses.response_table(ids, predict_clips(self.engine, scan, clips, len(clips)),
                                             units.unit_ids, units.readout_ids)
            labels = [pa.array(np.full(table.num_rows, value, np.int32)) for value in scan]
            tables.append(pa.Table.from_arrays(labels + table.columns, schema=OUTPUT_SCHEMA))
        return pa.concat_tables(tables)
