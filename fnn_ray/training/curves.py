"""A twin's learning curves: ``metrics.csv`` (one row per epoch) and ``curves.png``, rewritten after every epoch.

The rows come from the training history kept in every checkpoint, so a resumed run rewrites exactly the epochs
that happened (no duplicate rows, none lost). Columns: epoch (1-based), lr, train and val (the Poisson objective
per unit-frame after burn-in), samples_per_s (training sample-frames per second over all ranks), seconds (the
epoch's wall time), ranks. The figure: training and validation objective per epoch, the learning rate on a
second axis, the best epoch marked (matplotlib's object API with the Agg renderer).
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fnn_ray import storage

__all__ = ["COLUMNS", "curves_png", "metrics_csv", "write_curves"]

COLUMNS = ["epoch", "lr", "train", "val", "samples_per_s", "seconds", "ranks"]


def metrics_csv(history: Sequence[Mapping[str, Any]]) -> bytes:
    """The CSV of ``history`` (one mapping per epoch with :data:`COLUMNS`)."""
    return pd.DataFrame(list(history), columns=COLUMNS).to_csv(index=False, float_format="%.6g").encode()


def curves_png(history: Sequence[Mapping[str, Any]], title: str) -> bytes:
    """The learning-curve figure of ``history`` as PNG bytes."""
    table = pd.DataFrame(list(history), columns=COLUMNS)
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.plot(table.epoch, table.train, "o-", label="training", color="tab:blue", ms=3)
    ax.plot(table.epoch, table.val, "s-", label="validation", color="tab:orange", ms=3)
    if len(table):
        best = table.loc[table.val.idxmin()]
        ax.axvline(best.epoch, color="0.6", ls=":", lw=1)
        ax.annotate(f"best {best.val:.4g} (epoch {int(best.epoch)})", (best.epoch, best.val),
                    textcoords="offset points", xytext=(4, 8), fontsize=8)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Poisson objective per unit-frame")
    ax.set_title(title, fontsize=10)
    lr = ax.twinx()
    lr.plot(table.epoch, table.lr, "--", color="0.5", lw=1, label="learning rate")
    lr.set_ylabel("learning rate", color="0.4")
    handles = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_curves(url: str, history: Sequence[Mapping[str, Any]], title: str,
                 storage_options: Mapping[str, Any] | None = None) -> None:
    """Commit ``metrics.csv`` and ``curves.png`` of ``history`` under ``url``."""
    fs, root = storage.filesystem(url, storage_options)
    for name, data in (("metrics.csv", metrics_csv(history)), ("curves.png", curves_png(history, title))):
        storage.retry(storage.commit_bytes, fs, posixpath.join(root, name), data, budget_s=60,
                      what=f"writing {name}")
