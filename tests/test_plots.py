"""Figures (fnn_ray.plots): each function writes valid, non-trivial PNGs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from fnn_ray.analysis.receptive_fields import rf_table
from fnn_ray.plots import performance_plots, rf_plots, tuning_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIRECTIONS = np.arange(16) * 22.5
SCANS = {"session": np.repeat([4, 8], 30), "scan_idx": np.repeat([7, 5], 30), "unit_id": np.arange(60)}


def assert_pngs(paths, names):
    assert sorted(p.name for p in paths) == sorted(names)
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, path
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 300 and height >= 300, (path, width, height)
        assert len(data) > 10_000, path


def test_tuning_plots(tmp_path):
    rng = np.random.default_rng(0)
    mu, kappa = rng.uniform(0, 360, 60), rng.uniform(0.5, 3, 60)
    responses = [1 + np.exp(k * (np.cos(np.deg2rad(DIRECTIONS - m)) - 1)) for m, k in zip(mu, kappa)]
    table = pd.DataFrame({
        **SCANS, "gOSI": rng.uniform(0, 0.6, 60), "gDSI": rng.uniform(0, 0.6, 60), "pref_ori": mu % 180,
        "direction_responses": responses, "fit_mu": mu, "fit_phi": 1.0, "fit_kappa": kappa, "fit_scale": 1.0,
        "fit_bias": 1.0, "OSI": rng.uniform(0, 1, 60), "DSI": rng.uniform(0, 1, 60), "fit_status": "ok",
    })
    table.loc[3, "gOSI"] = np.nan  # a failed unit is skipped, not plotted
    table.loc[4, ["fit_kappa", "fit_scale", "fit_status", "gOSI"]] = [40.0, 1e6, "kappa_bound", 0.9]  # drawn flagged
    paths = tuning_plots(table, DIRECTIONS, tmp_path / "tuning", "stimulus test", n_curves=6)
    assert_pngs(paths, ["tuning_4-7.png", "tuning_8-5.png", "tuning_curves.png"])


def test_rf_plots(tmp_path):
    rng = np.random.default_rng(1)
    on, off = rng.normal(0.5, 0.05, (60, 9, 16)), rng.normal(0.5, 0.05, (60, 9, 16))
    on[:, 2:4, 3:6] += 1.0
    table = pd.concat([pd.DataFrame({**SCANS, "sta_on": list(on), "sta_off": list(off),
                                     "sta_on_off": list((on + off) / 2)}), rf_table(on, off, 144, 256)], axis=1)
    paths = rf_plots(table, 144, 256, tmp_path, n_examples=3)
    assert_pngs(paths, ["rf_examples.png", "rf_centres_4-7.png", "rf_centres_8-5.png"])


def test_performance_plots(tmp_path):
    rng = np.random.default_rng(2)
    cc_max = rng.uniform(0.3, 0.95, 60)
    cc_abs = cc_max * rng.uniform(0.4, 0.9, 60)
    table = pd.DataFrame({**SCANS, "cc_abs": cc_abs, "cc_max": cc_max, "cc_norm": cc_abs / cc_max})
    table.loc[:4, ["cc_max", "cc_norm"]] = np.nan
    assert_pngs(performance_plots(table, tmp_path), ["performance.png"])


def test_missing_column_is_named(tmp_path):
    with pytest.raises(ValueError, match="cc_norm"):
        performance_plots(pd.DataFrame({"session": [1], "scan_idx": [1], "cc_abs": [0.1], "cc_max": [0.2]}),
                          tmp_path)
