"""Receptive-field centres and spatial selectivity from flashing-dot STAs (``shared/IN_SILICO.md`` §3),
vectorised over units.

Input: per unit, polarity and grid cell, the STA (mean window response over the dot events at that cell),
``sta_on [U, R, C]`` (white dots) and ``sta_off [U, R, C]`` (black dots), on a grid of ``R`` rows x ``C``
columns of equal cells covering a ``height x width`` screen, row 0 at the TOP of the screen. The ``on_off`` STA
is the mean response over the events of both polarities at a cell, ``(sta_on + sta_off) / 2`` (every cell shows
each polarity equally often).

The published spatial selectivity index (``IN_SILICO.md`` §6), column ``ssi``: ``-log det(Cov)`` of the RAW
``on_off`` STA taken as a density over the cells, ``w = sta / sum(sta)`` (no baseline removal, no threshold),
with cell coordinates ``(row, col) / max(R, C)``. A flat map gives a finite value (6.198 on a 5 x 9 grid); a
smaller field gives a larger value. NaN when ``sum(sta) <= 0``, a value is not finite or ``det(Cov) <= 0``.

A second, better-behaved estimate of the field's position and size, from the baseline-removed map below:
``rf_x, rf_y`` and ``ssi_rf_map``.

The map (our choice, the definitions leave it open): each polarity's STA minus its median over the cells
(the typical response to a dot that misses the receptive field), clipped at 0, on and off added, and then
kept only in the cells where it reaches ``threshold`` (default 0.2) of its own peak, 0 elsewhere: ``m [R, C]``,
non-negative. The cut keeps the positive half of the noise of the cells far from the field out of the
centroid (a plain clipped map of a noisy STA has mass in about half of all cells, which pulls the centre
towards the middle of the screen and lowers the SSI by an amount that depends on the grid size and the noise
level); being relative to the peak it does not depend on the unit's response amplitude, and it keeps broad
fields (unlike a cut at a multiple of the spread of the map, which a field covering much of the screen
inflates). ``threshold=0`` gives the plain clipped map. Taken as a density ``w = m / sum(m)`` over the cell
centres:

* ``rf_x, rf_y``: the ``w``-weighted mean of the cell centres in normalised screen coordinates, ``(-1, -1)``
  the bottom-left corner, ``(1, 1)`` the top-right; the centre of column ``c`` is
  ``x = 2*(c + 0.5)/C - 1``, of row ``r`` is ``y = 1 - 2*(r + 0.5)/R``.
* ``ssi_rf_map = -log det(Cov)``: ``Cov`` the ``w``-weighted (population) covariance of the cell centres in
  pixels divided by ``max(height, width)`` (so both axes share one scale; x spans ``width/max(H, W)``).

Degenerate maps give NaN, never an error: a map with a non-finite value or without mass (``sum(m) = 0``, e.g.
a constant STA) gives NaN centre and ``ssi_rf_map``; a map whose mass lies on one cell or along one line of
cells (``det(Cov)`` zero up to rounding) keeps its centre but gets ``ssi_rf_map`` NaN.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["RF_THRESHOLD", "INDEX_DEFINITIONS", "published_ssi", "rf_map", "cell_centres", "rf_table"]

#: Default cut of :func:`rf_map`: a cell counts when its map value reaches this fraction of the unit's peak.
RF_THRESHOLD = 0.2

#: The columns of :func:`rf_table`, defined in words (for metadata).
INDEX_DEFINITIONS = {
    "ssi": "published SSI (IN_SILICO.md section 6): -log det Cov of the raw on_off STA as a density over the "
           "cells, coordinates (row, col) / max(rows, cols), no baseline, no threshold",
    "rf_x, rf_y": "centroid of the baseline-removed RF map (each polarity minus its median, clipped at 0, "
                  "summed, cells below threshold x peak dropped), normalised screen coordinates, (-1, -1) "
                  "bottom-left",
    "ssi_rf_map": "-log det Cov of the same baseline-removed RF map, pixel coordinates / max(height, width)",
}

#: Relative threshold below which a variance or ``det(Cov)`` counts as zero (rounding of the moments).
_DEGENERATE = 1e-9
#: Units handled together (bounds the float64 temporaries to a few times chunk x R x C).
_CHUNK = 8192


def _check(sta_on: np.ndarray, sta_off: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    sta_on, sta_off = np.asarray(sta_on), np.asarray(sta_off)
    if sta_on.ndim != 3 or sta_on.shape != sta_off.shape:
        raise ValueError(
            f"rf_table: expected sta_on and sta_off of one shape [U, R, C], got {sta_on.shape} and {sta_off.shape}"
        )
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"rf_table: height and width must be positive, got {height} x {width}")
    return sta_on, sta_off


def rf_map(sta_on: np.ndarray, sta_off: np.ndarray, threshold: float = RF_THRESHOLD) -> np.ndarray:
    """The non-negative receptive-field map ``[U, R, C]`` (float64) from ``sta_on, sta_off [U, R, C]``.

    ``m = max(on - median(on), 0) + max(off - median(off), 0)`` (medians over each unit's cells), set to 0
    where ``m < threshold * max(m)``. NaN propagates.
    """
    total = 0.0
    for sta in (sta_on, sta_off):
        sta = np.asarray(sta, dtype=np.float64)
        total = total + np.maximum(sta - np.median(sta, axis=(1, 2), keepdims=True), 0.0)
    peak = np.max(total, axis=(1, 2), keepdims=True)
    return np.where(np.isnan(total) | (total >= threshold * peak), total, 0.0)


def published_ssi(sta: np.ndarray) -> np.ndarray:
    """The published SSI of raw STA maps ``[U, R, C]`` -> ``[U]`` (see the module docstring)."""
    sta = np.asarray(sta, dtype=np.float64)
    n_units, rows, cols = sta.shape
    r, c = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    flat = sta.reshape(n_units, -1)
    features = np.stack([np.ones(rows * cols), r.ravel(), c.ravel(), r.ravel() ** 2, c.ravel() ** 2,
                         (r * c).ravel()], axis=1)
    mass, sr, sc, srr, scc, src = (np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0) @ features).T
    ok = np.all(np.isfinite(flat), axis=1) & (mass > 0)
    mass = np.where(ok, mass, 1.0)
    mr, mc = sr / mass, sc / mass
    det = (srr / mass - mr**2) * (scc / mass - mc**2) - (src / mass - mr * mc) ** 2
    out = np.full(n_units, np.nan)
    good = ok & (det > 0)
    out[good] = -np.log(det[good])
    return out


def cell_centres(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised screen coordinates ``(x [C], y [R])`` of the cell centres of a ``rows x cols`` grid:
    ``x`` grows to the right, ``y`` upwards, row 0 at the top (``y[0] = 1 - 1/rows``)."""
    return 2.0 * (np.arange(cols) + 0.5) / cols - 1.0, 1.0 - 2.0 * (np.arange(rows) + 0.5) / rows


def rf_table(
    sta_on: np.ndarray, sta_off: np.ndarray, height: int, width: int, threshold: float = RF_THRESHOLD
) -> pd.DataFrame:
    """RF centre and spatial selectivity index of every unit, one row per unit in the input order.

    Args:
        sta_on: ``[U, R, C]`` STA to white dots per grid cell (row 0 at the top of the screen).
        sta_off: ``[U, R, C]`` STA to black dots.
        height: screen height in pixels (the grid covers the whole screen).
        width: screen width in pixels.
        threshold: cut of the map, a fraction of its peak (:func:`rf_map`).

    Returns:
        Columns ``ssi`` (the published index), ``rf_x, rf_y`` (normalised screen coordinates) and
        ``ssi_rf_map`` (see the module docstring for the maps, the coordinates and the NaN cases).
    """
    sta_on, sta_off = _check(sta_on, sta_off, height, width)
    n_units, rows, cols = sta_on.shape
    x_norm, y_norm = cell_centres(rows, cols)
    scale = max(height, width)
    # pixel coordinates / max(H, W), measured from the screen centre (det(Cov) does not depend on the origin)
    x_px, y_px = x_norm * width / (2.0 * scale), y_norm * height / (2.0 * scale)
    grid_x, grid_y = np.broadcast_to(x_px[None, :], (rows, cols)).ravel(), np.repeat(y_px, cols)
    features = np.stack([np.ones_like(grid_x), grid_x, grid_y, grid_x**2, grid_y**2, grid_x * grid_y], axis=1)
    cell_x, cell_y = width / cols / scale, height / rows / scale
    out = np.full((n_units, 3), np.nan)
    for lo in range(0, n_units, _CHUNK):
        maps = rf_map(sta_on[lo : lo + _CHUNK], sta_off[lo : lo + _CHUNK], threshold).reshape(-1, rows * cols)
        mass, sx, sy, sxx, syy, sxy = (np.nan_to_num(maps, nan=0.0) @ features).T
        ok = np.all(np.isfinite(maps), axis=1) & (mass > 0)
        mass = np.where(ok, mass, 1.0)
        mx, my = sx / mass, sy / mass
        vx, vy, cxy = sxx / mass - mx**2, syy / mass - my**2, sxy / mass - mx * my
        det = vx * vy - cxy**2
        spread = (
            ok
            & (vx > _DEGENERATE * cell_x**2)
            & (vy > _DEGENERATE * cell_y**2)
            & (det > _DEGENERATE * np.maximum(vx * vy, 0.0))
        )
        chunk = out[lo : lo + _CHUNK]
        chunk[ok, 0] = mx[ok] * 2.0 * scale / width
        chunk[ok, 1] = my[ok] * 2.0 * scale / height
        chunk[spread, 2] = -np.log(det[spread])
    ssi = published_ssi((sta_on.astype(np.float64) + sta_off) / 2.0)
    return pd.DataFrame({"ssi": ssi, "rf_x": out[:, 0], "rf_y": out[:, 1], "ssi_rf_map": out[:, 2]})
