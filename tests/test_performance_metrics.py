"""CC_abs, CC_max, CC_norm from accumulated statistics (fnn_ray.analysis.performance) against IN_SILICO.md §4
applied literally to the videos concatenated in time with missing repeats padded with NaN."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fnn_ray.analysis.performance import cc_from_stats, cc_stats, merge_stats

BURNIN = 3


def literal(videos, burnin: int):
    """Per unit: drop burn-in, pad repeats with NaN, concatenate in time, mask, apply the formulas as written."""
    repeats = max(x.shape[0] for x, _ in videos)
    units = videos[0][0].shape[2]

    def padded(a):
        out = np.full((repeats, a.shape[1] - burnin, units), np.nan)
        out[: a.shape[0]] = a[:, burnin:]
        return out

    x_all = np.concatenate([padded(x) for x, _ in videos], axis=1)
    p_all = np.concatenate([padded(p) for _, p in videos], axis=1)
    result = np.full((3, units), np.nan)
    for u in range(units):
        x, p = x_all[:, :, u].copy(), p_all[:, :, u].copy()
        bad = np.isnan(x) | np.isnan(p)
        x[bad], p[bad] = np.nan, np.nan
        t_j = (~np.isnan(x)).sum(axis=0)
        keep = t_j > 0  # samples without any valid repeat are left out
        x, p, t_j = x[:, keep], p[:, keep], t_j[keep]
        if t_j.size < 2:
            continue
        ybar = np.array([np.mean(col[~np.isnan(col)]) for col in x.T])
        pbar = np.array([np.mean(col[~np.isnan(col)]) for col in p.T])
        cc_abs = np.nan
        if np.std(ybar) > 0 and np.std(pbar) > 0:
            cc_abs = np.corrcoef(pbar, ybar)[0, 1]
        big_t = t_j.size
        harmonic = np.sum((t_j - 1) / t_j**2)
        cc_max = np.nan
        if harmonic > 0:
            n = np.sqrt((t_j.sum() - big_t) / harmonic)
            big_p = np.var(ybar, ddof=1)
            repeat_vars = [np.var(row[~np.isnan(row)], ddof=1) for row in x if (~np.isnan(row)).sum() >= 2]
            tp = np.mean(repeat_vars)
            sp = (n * big_p - tp) / (n - 1) if n > 1 else np.nan
            if sp > 0 and np.var(ybar) > 0:
                cc_max = np.sqrt(sp / np.var(ybar, ddof=0))
        result[:, u] = cc_abs, cc_max, cc_abs / cc_max
    return result


def make_videos(seed: int):
    """Three videos, 5 / 3 / 5 repeats, 12 units: signal + repeat noise, predictions correlated with the
    signal; some NaN frames, a unit missing from whole repeats, a unit never recorded, a constant unit, a
    unit with constant predictions and a unit with a single repeat."""
    rng = np.random.default_rng(seed)
    videos = []
    for repeats, frames in ((5, 40), (3, 30), (5, 25)):
        signal = rng.normal(0, 1, (1, frames, 12))
        x = 2.0 + signal + rng.normal(0, 0.8, (repeats, frames, 12))
        p = 2.0 + 0.7 * signal + rng.normal(0, 0.5, (repeats, frames, 12))
        x[rng.random(x.shape) < 0.05] = np.nan  # scattered missing frames
        x[1:3, :, 1] = np.nan  # unit 1 not recorded in repeats 1 and 2
        x[:, :, 2] = np.nan  # unit 2 never recorded
        x[:, :, 3] = 4.0  # unit 3 constant
        p[:, :, 4] = 1.5  # unit 4 constant prediction
        x[1:, :, 5] = np.nan  # unit 5 recorded in one repeat only: n undefined
        p[rng.random(p.shape) < 0.02] = np.nan  # a few failed predictions
        videos.append((x.astype(np.float32), p.astype(np.float32)))
    return videos


def test_matches_literal_formulas():
    videos = make_videos(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = merge_stats(cc_stats(x, p, BURNIN) for x, p in videos)
        got = np.stack(cc_from_stats(stats))
    want = literal(videos, BURNIN)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert np.isfinite(got[:, [0, 1, 6, 7]]).all()  # ordinary units and the one missing two repeats
    assert np.isnan(got[:, [2, 3]]).all()  # never recorded, constant
    assert np.isnan(got[0, 4]) and np.isfinite(got[1, 4])  # constant prediction: CC_abs undefined
    assert np.isnan(got[1:, 5]).all()  # one repeat: CC_max undefined


def test_grouping_and_order_do_not_matter():
    videos = make_videos(1)
    each = [cc_stats(x, p, BURNIN) for x, p in videos]
    one = merge_stats(each)
    nested = merge_stats([merge_stats(each[2:]), merge_stats(each[:2][::-1])])
    assert set(one) == set(nested)
    for key in one:
        np.testing.assert_allclose(one[key], nested[key], rtol=1e-12)
    for key, value in each[0].items():  # O(R) per unit, not O(T)
        assert value.shape in ((12,), (5, 12)), key


def test_good_prediction_has_cc_norm_near_one():
    rng = np.random.default_rng(2)
    repeats, frames, units = 10, 2000, 20
    signal = rng.normal(0, 1, (1, frames, units))
    recorded = signal + rng.normal(0, 1.0, (repeats, frames, units))
    predicted = signal + rng.normal(0, 0.05, (repeats, frames, units))
    cc_abs, cc_max, cc_norm = cc_from_stats(cc_stats(recorded, predicted, burnin=10))
    np.testing.assert_allclose(cc_norm, 1.0, atol=0.05)
    assert (cc_abs < cc_max + 0.05).all() and (cc_max < 1).all()
    # a prediction that ignores the signal scores near 0
    _, _, noise_norm = cc_from_stats(cc_stats(recorded, rng.normal(0, 1, recorded.shape), burnin=10))
    assert np.abs(noise_norm).max() < 0.2


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        cc_stats(np.zeros((2, 20, 3)), np.zeros((2, 20, 4)), 5)
    with pytest.raises(ValueError, match="burnin"):
        cc_stats(np.zeros((2, 20, 3)), np.zeros((2, 20, 3)), 20)
    with pytest.raises(ValueError, match="units"):
        merge_stats([cc_stats(np.ones((2, 20, 3)), np.ones((2, 20, 3)), 5),
                     cc_stats(np.ones((2, 20, 4)), np.ones((2, 20, 4)), 5)])
