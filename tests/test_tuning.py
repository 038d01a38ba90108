"""Tuning indices and the bimodal von Mises fit (fnn_ray.analysis.tuning) against plain implementations of
IN_SILICO.md §3 and against scipy.optimize.least_squares."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fnn_ray.analysis.tuning import (UNITS_PER_PROCESS, FitConfig, _processes, fit_von_mises, global_indices,
                                    tuning_table)

DIRECTIONS = np.arange(16) * 22.5


def curve(theta_deg, mu_deg, phi, kappa, scale, bias):
    """IN_SILICO.md's f(theta), written out for one unit (scalars, theta an array)."""
    t, mu = np.deg2rad(theta_deg), np.deg2rad(mu_deg)
    return (phi * scale * np.exp(kappa * (np.cos(t - mu) - 1))
            + (1 - phi) * scale * np.exp(kappa * (np.cos(t - mu - np.pi) - 1)) + bias)


def synthetic(n: int, seed: int, noise: float = 0.0):
    """Curves of random parameters (phi away from 0.5 so the dominant peak is well defined)."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0, 360, n)
    phi = np.where(rng.random(n) < 0.5, rng.uniform(0.0, 0.4, n), rng.uniform(0.6, 1.0, n))
    kappa, scale, bias = rng.uniform(0.3, 5, n), rng.uniform(0.5, 3, n), rng.uniform(0.05, 1, n)
    curves = np.stack([curve(DIRECTIONS, *p) for p in zip(mu, phi, kappa, scale, bias)])
    return curves + rng.normal(0, noise, curves.shape), (mu, phi, kappa, scale, bias)


def test_global_indices_match_sums():
    rng = np.random.default_rng(0)
    curves = rng.gamma(2.0, 1.0, (50, 16))
    gosi, gdsi = global_indices(curves, DIRECTIONS)
    for u in range(50):
        ori = dire = 0j
        for r, d in zip(curves[u], np.deg2rad(DIRECTIONS)):
            ori += r * complex(np.cos(2 * d), np.sin(2 * d))
            dire += r * complex(np.cos(d), np.sin(d))
        assert gosi[u] == pytest.approx(abs(ori) / curves[u].sum(), rel=1e-12)
        assert gdsi[u] == pytest.approx(abs(dire) / curves[u].sum(), rel=1e-12)
    # a pure orientation curve (equal at theta and theta + 180) has gDSI 0; a single spike has gOSI = gDSI = 1
    both, spike = np.ones(16) + np.cos(2 * np.deg2rad(DIRECTIONS)), np.eye(16)[3]
    gosi, gdsi = global_indices(np.stack([both, spike]), DIRECTIONS)
    assert gdsi[0] == pytest.approx(0.0, abs=1e-12) and gosi[0] == pytest.approx(0.5)
    assert gosi[1] == pytest.approx(1.0) and gdsi[1] == pytest.approx(1.0)


def test_fit_recovers_noiseless_parameters_and_flips():
    curves, (mu, phi, kappa, scale, bias) = synthetic(200, seed=1)
    fit = fit_von_mises(curves, DIRECTIONS)
    assert fit["success"].all()
    flip = phi < 0.5  # the dominant peak is then at mu + 180 with weight 1 - phi
    want_mu, want_phi = np.where(flip, mu + 180, mu) % 360, np.where(flip, 1 - phi, phi)
    assert np.abs((fit["mu"] - want_mu + 180) % 360 - 180).max() < 1e-3
    np.testing.assert_allclose(fit["phi"], want_phi, atol=1e-4)
    np.testing.assert_allclose(fit["kappa"], kappa, rtol=1e-3)
    np.testing.assert_allclose(fit["scale"], scale, rtol=1e-3)
    np.testing.assert_allclose(fit["bias"], bias, atol=1e-3)
    assert fit["mse"].max() < 1e-10
    assert ((fit["mu"] >= 0) & (fit["mu"] < 360) & (fit["phi"] >= 0.5)).all()


def independent_fit(y: np.ndarray, kappa_max: float = FitConfig().kappa_max, kappa_start: float = 1.0):
    """IN_SILICO.md §6's fit written out with scipy (numerical Jacobian): the published start, bounds with
    ``kappa <= kappa_max``, the phi flip; returns (OSI, DSI, mse, kappa) with OSI/DSI NaN on the kappa bound or
    when scipy reports no convergence."""
    optimize = pytest.importorskip("scipy.optimize")
    theta = np.deg2rad(DIRECTIONS)

    def f(p, t):
        return (p[1] * p[3] * np.exp(p[2] * (np.cos(t - p[0]) - 1))
                + (1 - p[1]) * p[3] * np.exp(p[2] * (np.cos(t - p[0] - np.pi) - 1)) + p[4])

    b = max(y.min(), y.max() / 100)
    start = [theta[np.argmax(y)], 0.5, kappa_start, 2 * (y.max() - b), b]
    ref = optimize.least_squares(lambda p: f(p, theta) - y, start,
                                 bounds=([-np.inf, 0, 0, 0, 0], [np.inf, 1, kappa_max, np.inf, np.inf]))
    mu, phi, kappa, scale, bias = ref.x
    if phi < 0.5:
        mu, phi = mu + np.pi, 1 - phi
    p = (mu, phi, kappa, scale, bias)
    ori = mu % np.pi
    r_pref = (f(p, ori) + f(p, ori + np.pi)) / 2
    r_orth = (f(p, ori + np.pi / 2) + f(p, ori + 3 * np.pi / 2)) / 2
    osi, dsi = (r_pref - r_orth) / (r_pref + r_orth), 1 - f(p, mu + np.pi) / f(p, mu)
    if kappa >= kappa_max * (1 - 1e-3) or not ref.success:
        osi = dsi = np.nan
    return osi, dsi, np.mean(ref.fun**2), kappa


def weakly_tuned(n: int, seed: int) -> np.ndarray:
    """Curves around 1 with a small von Mises bump (amplitude 0-0.3) and noise of SD 0.1."""
    rng = np.random.default_rng(seed)
    params = zip(rng.uniform(0, 360, n), rng.uniform(0.5, 1, n), rng.uniform(0.5, 3, n), rng.uniform(0, 0.3, n))
    curves = np.stack([curve(DIRECTIONS, mu, phi, kappa, amp, 1.0) for mu, phi, kappa, amp in params])
    return curves + rng.normal(0, 0.1, curves.shape)


def test_fit_matches_an_independent_single_start_fit_unit_by_unit():
    """Tuned (noisy synthetic) and untuned (gamma noise) curves: every unit's OSI, DSI and mse equal those of a
    plain scipy fit of the same model from the same start (the Jacobians differ, analytic vs numerical, so at
    most 2 of 120 units may stop elsewhere, never at a notably higher cost)."""
    rng = np.random.default_rng(2)
    noisy, _ = synthetic(60, seed=3, noise=0.2)
    curves = np.concatenate([rng.gamma(2.0, 1.0, (60, 16)), np.abs(noisy)])
    table = tuning_table(curves, DIRECTIONS)
    ref = np.array([independent_fit(y) for y in curves])
    same = np.isclose(table["fit_mse"], ref[:, 2], rtol=1e-4, atol=1e-12)
    assert (~same).sum() <= 2 and (table["fit_mse"] <= ref[:, 2] * (1 + 1e-4)).all()
    # NaN where both are on the kappa bound
    np.testing.assert_allclose(table.loc[same, "OSI"], ref[same, 0], atol=1e-4)
    np.testing.assert_allclose(table.loc[same, "DSI"], ref[same, 1], atol=1e-4)
    assert (table.loc[60:, "fit_status"] == "ok").mean() > 0.9 and (table["fit_status"] == "kappa_bound").any()


@pytest.mark.slow
def test_weakly_tuned_medians_match_the_single_start_fit():
    """300 weakly tuned curves: median OSI/DSI within 0.005 of the independent single-start fit."""
    curves = weakly_tuned(300, seed=0)
    table = tuning_table(curves, DIRECTIONS)
    ref = np.array([independent_fit(y) for y in curves])
    assert abs(np.nanmedian(table["OSI"]) - np.nanmedian(ref[:, 0])) < 0.005
    assert abs(np.nanmedian(table["DSI"]) - np.nanmedian(ref[:, 1])) < 0.005


def test_projection_fit_reaches_the_same_optimum_on_tuned_curves():
    """The vectorised method gives the default's OSI/DSI on tuned curves (weakly tuned ones may differ)."""
    curves, _ = synthetic(60, seed=7, noise=0.05)
    fast = tuning_table(curves, DIRECTIONS, FitConfig(method="projection"))
    slow = tuning_table(curves, DIRECTIONS)
    np.testing.assert_allclose(fast[["OSI", "DSI", "fit_mse"]], slow[["OSI", "DSI", "fit_mse"]], atol=1e-5)


def test_kappa_bound_flags_spikes_and_leaves_their_indices_nan():
    """A single-direction spike on a noise floor: kappa stops at the bound, the fit is flagged and OSI/DSI are
    NaN (not about 1), gOSI/gDSI stay; a broad curve is ok."""
    spike = np.r_[np.full(5, 1.0), 3.0, np.full(10, 1.0)] + np.random.default_rng(0).normal(0, 0.01, 16)
    broad = curve(DIRECTIONS, 45.0, 0.8, 2.0, 1.0, 0.2)
    for method in ("least_squares", "projection"):
        table = tuning_table(np.stack([spike, broad]), DIRECTIONS, FitConfig(method=method))
        assert list(table["fit_status"]) == ["kappa_bound", "ok"], method
        assert table.loc[0, "fit_kappa"] <= FitConfig().kappa_max
        assert np.isnan(table.loc[0, ["OSI", "DSI"]].astype(float)).all() and table.loc[0, "gOSI"] > 0
        assert np.isfinite(table.loc[1, ["OSI", "DSI"]].astype(float)).all()
    with pytest.raises(ValueError, match="kappa starts"):
        FitConfig(kappa_starts=(50.0,))
    with pytest.raises(ValueError, match="method"):
        FitConfig(method="lm")


def test_single_start_is_the_prescribed_start():
    """``kappa_starts=(1,)`` is IN_SILICO.md's single start; extra starts only ever lower the cost."""
    rng = np.random.default_rng(4)
    curves = rng.gamma(2.0, 1.0, (200, 16))
    one = fit_von_mises(curves, DIRECTIONS, FitConfig(method="projection"))
    two = fit_von_mises(curves, DIRECTIONS, FitConfig(method="projection", kappa_starts=(1.0, 20.0)))
    assert (two["mse"] <= one["mse"] * (1 + 1e-12)).all()
    assert (two["mse"] < one["mse"] * (1 - 1e-3)).any()
    assert FitConfig().to_json()["kappa_starts"] == [1.0]
    assert FitConfig(kappa_starts=(1.0, 20.0)).to_json()["kappa_starts"] == [1.0, 20.0]


def test_table_indices_from_fitted_curve():
    curves, _ = synthetic(40, seed=5, noise=0.05)
    table = tuning_table(curves, DIRECTIONS)
    fit = fit_von_mises(curves, DIRECTIONS)
    assert list(table.columns) == ["OSI", "DSI", "gOSI", "gDSI", "pref_ori", "pref_dir", "fit_mu", "fit_phi",
                                   "fit_kappa", "fit_scale", "fit_bias", "fit_mse", "fit_success", "fit_status"]
    assert table["fit_success"].dtype == bool
    for u, row in table[table.fit_status == "ok"].iterrows():
        params = (row.fit_mu, row.fit_phi, row.fit_kappa, row.fit_scale, row.fit_bias)
        assert row.fit_mu == pytest.approx(fit["mu"][u])

        def f(angle, params=params):
            return curve(np.array([angle]), *params)[0]

        pref_ori = row.fit_mu % 180
        r_pref = (f(pref_ori) + f(pref_ori + 180)) / 2
        r_orth = (f(pref_ori + 90) + f(pref_ori + 270)) / 2
        assert row.pref_dir == pytest.approx(row.fit_mu % 360) and row.pref_ori == pytest.approx(pref_ori)
        assert row.OSI == pytest.approx((r_pref - r_orth) / (r_pref + r_orth), rel=1e-9)
        assert row.DSI == pytest.approx(1 - f(row.fit_mu + 180) / f(row.fit_mu), rel=1e-9)


def test_preferences_in_degrees_and_row_order():
    """Peaks at 100 and 250 degrees (moving up-left, down-left): pref_dir in degrees, pref_ori = dir mod 180."""
    peaks = [100.0, 250.0, 10.0]
    curves = np.stack([curve(DIRECTIONS, m, 0.9, 2.0, 1.0, 0.1) for m in peaks])
    table = tuning_table(curves, DIRECTIONS)
    np.testing.assert_allclose(table["pref_dir"], peaks, atol=1e-4)
    np.testing.assert_allclose(table["pref_ori"], [100.0, 70.0, 10.0], atol=1e-4)
    assert (table["DSI"] > 0.5).all() and (table["OSI"] > 0.3).all()


def test_bad_curves_give_nan_without_warnings():
    curves = np.stack([
        np.r_[np.nan, np.ones(15)],  # not finite
        np.r_[np.inf, np.ones(15)],
        np.zeros(16),  # no response: ratios undefined
        np.full(16, 2.0),  # flat: untuned
        curve(DIRECTIONS, 45.0, 1.0, 3.0, 2.0, 0.5),
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = tuning_table(curves, DIRECTIONS)
    assert not table.loc[:1, "fit_success"].any() and (table.loc[:1, "fit_status"] == "nonfinite").all()
    assert table.loc[:1, ["OSI", "DSI", "gOSI", "gDSI", "pref_ori", "pref_dir", "fit_mse"]].isna().all().all()
    assert table.loc[2, ["OSI", "DSI", "gOSI", "gDSI"]].isna().all()
    assert table.loc[3, "gOSI"] == pytest.approx(0, abs=1e-12) and table.loc[3, "OSI"] == pytest.approx(0, abs=1e-9)
    assert table.loc[2:, "fit_success"].all()
    assert table.loc[4, "pref_dir"] == pytest.approx(45.0, abs=1e-4)


def test_fit_in_processes_equals_the_fit_in_this_process():
    """Two fitting processes (spawned) give every unit exactly the fit of one, in input order, with a second
    start and a non-finite curve among them."""
    noisy, _ = synthetic(2 * UNITS_PER_PROCESS + 3, seed=5, noise=0.1)
    curves = np.abs(noisy)
    curves[7, 3] = np.nan
    config = dict(kappa_starts=(1.0, 20.0))
    assert _processes(FitConfig(processes=2), len(curves)) == 2 and _processes(FitConfig(processes=2), 100) == 1
    alone = tuning_table(curves, DIRECTIONS, FitConfig(processes=1, **config))
    side_by_side = tuning_table(curves, DIRECTIONS, FitConfig(processes=2, **config))
    assert alone.equals(side_by_side)
    assert alone["fit_status"].iloc[7] == "nonfinite" and (alone["fit_status"] == "ok").mean() > 0.9
    with pytest.raises(ValueError, match="processes 0"):
        FitConfig(processes=0)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"curves \[U, D\]"):
        tuning_table(np.ones((3, 8)), DIRECTIONS)
