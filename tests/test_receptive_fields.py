"""RF centres and SSI (fnn_ray.analysis.receptive_fields) against a per-unit loop over the cells."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fnn_ray.analysis.receptive_fields import rf_table

H, W, R, C = 144, 256, 9, 16


def reference(on: np.ndarray, off: np.ndarray, threshold: float = 0.2):
    """One unit, written out cell by cell: the median-subtracted, clipped map, cells below threshold x peak
    dropped, as weights over cell centres."""
    m = np.zeros((R, C))
    for sta in (on, off):
        med = np.median(sta)
        for r in range(R):
            for c in range(C):
                m[r, c] += max(sta[r, c] - med, 0.0)
    m[m < threshold * m.max()] = 0.0
    total = m.sum()
    points, weights = [], []
    for r in range(R):
        for c in range(C):
            x_px = (c + 0.5) * W / C  # from the left edge
            y_px = H - (r + 0.5) * H / R  # from the bottom edge (row 0 at the top)
            points.append((x_px, y_px))
            weights.append(m[r, c] / total)
    points, weights = np.array(points), np.array(weights)
    x_px, y_px = weights @ points
    cov = np.cov(points.T / max(H, W), aweights=weights, bias=True)
    det = np.linalg.det(cov)  # zero up to rounding when the mass lies on one cell or one line of cells
    return 2 * x_px / W - 1, 2 * y_px / H - 1, -np.log(det) if det > 1e-15 else np.nan


def gaussian_maps(n: int, seed: int):
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:R, 0:C]
    row, col, width = rng.uniform(1, R - 2, n), rng.uniform(1, C - 2, n), rng.uniform(0.7, 2.5, n)
    blob = np.exp(-((ys - row[:, None, None]) ** 2 + (xs - col[:, None, None]) ** 2) / (2 * width[:, None, None] ** 2))
    on = 0.3 + rng.uniform(0, 1, (n, 1, 1)) * blob + rng.normal(0, 0.02, (n, R, C))
    off = 0.3 + rng.uniform(0, 1, (n, 1, 1)) * blob + rng.normal(0, 0.02, (n, R, C))
    return on, off


@pytest.mark.parametrize("threshold", [0.2, 0.0, 0.6])
def test_matches_cell_loop(threshold):
    on, off = gaussian_maps(30, seed=0)
    table = rf_table(on, off, H, W, threshold=threshold)
    assert list(table.columns) == ["ssi", "rf_x", "rf_y", "ssi_rf_map"] and len(table) == 30
    for u in range(30):
        x, y, ssi = reference(on[u], off[u], threshold)
        assert table.rf_x[u] == pytest.approx(x, abs=1e-10)
        assert table.rf_y[u] == pytest.approx(y, abs=1e-10)
        assert table.ssi_rf_map[u] == pytest.approx(ssi, rel=1e-8, nan_ok=True)


def test_threshold_removes_noise_bias():
    """A 2 x 3 block of cells in noise: the cut map finds the block's centre; the plain clipped one is pulled
    towards the middle of the screen."""
    rng = np.random.default_rng(3)
    on = 0.5 + rng.normal(0, 0.02, (20, R, C))
    on[:, 1:3, 1:4] += 1.0  # rows 1-2 (near the top), columns 1-3 (left)
    want = (2 * 2.5 / C - 1, 1 - 2 * 2 / R)
    cut = rf_table(on, np.full_like(on, 0.5), H, W)
    plain = rf_table(on, np.full_like(on, 0.5), H, W, threshold=0.0)
    np.testing.assert_allclose(cut[["rf_x", "rf_y"]].to_numpy(), np.tile(want, (20, 1)), atol=0.02)
    assert (plain.rf_x > want[0] + 0.05).all() and (plain.ssi_rf_map < cut.ssi_rf_map).all()


def test_screen_orientation():
    """Row 0 is the top of the screen: a dot response in the top-left cell lies at (-1 + 1/C, 1 - 1/R)."""
    on, off = np.zeros((2, R, C)), np.zeros((2, R, C))
    on[0, 0, 0] = 1.0  # top-left cell, ON
    off[1, R - 1, C - 1] = 1.0  # bottom-right cell, OFF
    table = rf_table(on, off, H, W)
    np.testing.assert_allclose(table[["rf_x", "rf_y"]].to_numpy(),
                               [[-1 + 1 / C, 1 - 1 / R], [1 - 1 / C, -1 + 1 / R]], atol=1e-12)


def test_smaller_field_has_larger_ssi():
    ys, xs = np.mgrid[0:R, 0:C]
    maps = np.stack([np.exp(-((ys - 4) ** 2 + (xs - 8) ** 2) / (2 * s**2)) for s in (0.8, 1.5, 3.0)])
    table = rf_table(maps, np.zeros_like(maps), H, W)
    for name in ("ssi", "ssi_rf_map"):
        ssi = table[name].to_numpy()
        assert ssi[0] > ssi[1] > ssi[2], name


def test_degenerate_maps_give_nan_without_warnings():
    on = np.zeros((5, R, C))
    on[1] = 2.0  # constant: no mass after the median
    on[2, 3, 4] = 1.0  # one cell: centre defined, covariance singular
    on[3, 2, 5:9] = 1.0  # one row: singular
    on[4, 0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = rf_table(on, np.zeros_like(on), H, W)
    assert table.loc[[0, 1, 4], ["rf_x", "rf_y", "ssi_rf_map"]].isna().all().all()
    assert table.loc[[2, 3], ["rf_x", "rf_y"]].notna().all().all()
    assert table.loc[[2, 3], "ssi_rf_map"].isna().all()
    # the published index: NaN without mass (all zero) or with a NaN; finite on a constant map
    assert table.loc[[0, 4], "ssi"].isna().all() and np.isfinite(table.loc[1, "ssi"])


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="sta_on and sta_off"):
        rf_table(np.zeros((2, R, C)), np.zeros((2, R, C + 1)), H, W)


def published_reference(sta: np.ndarray) -> float:
    """IN_SILICO.md §6 for one unit, with numpy's weighted covariance: sta / sta.sum() over (row, col) /
    max(R, C)."""
    rows, cols = sta.shape
    points = np.array([(r / max(rows, cols), c / max(rows, cols)) for r in range(rows) for c in range(cols)])
    weights = sta.ravel() / sta.sum()
    return -np.log(np.linalg.det(np.cov(points.T, aweights=weights, bias=True)))


def test_published_ssi_is_the_raw_sta_density():
    """ssi: the raw on_off STA (no baseline), against numpy's weighted covariance; 6.198 on a flat 5 x 9 map."""
    on, off = gaussian_maps(20, seed=4)
    table = rf_table(on, off, H, W)
    for u in range(20):
        assert table.ssi[u] == pytest.approx(published_reference((on[u] + off[u]) / 2), rel=1e-10)
    flat = rf_table(np.ones((1, 5, 9)), np.ones((1, 5, 9)), H, W)
    want = -np.log(np.var(np.arange(5)) / 81 * np.var(np.arange(9)) / 81)
    assert flat.ssi[0] == pytest.approx(want, rel=1e-12) and flat.ssi[0] == pytest.approx(6.198, abs=1e-3)
    # a baseline lowers the published index (it spreads the density) but not the baseline-removed one
    shifted = rf_table(on + 1.0, off + 1.0, H, W)
    assert (shifted.ssi < table.ssi).all()
    np.testing.assert_allclose(shifted.ssi_rf_map, table.ssi_rf_map, rtol=1e-9)
