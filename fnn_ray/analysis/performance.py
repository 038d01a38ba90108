"""Model performance against recorded responses with repeats: CC_abs, CC_max, CC_norm (``shared/IN_SILICO.md``
§4), vectorised over units and accumulated over work items.

Per unit, the definitions see one long series per repeat: the videos' frames after burn-in, concatenated in
time, repeat ``r`` of every video lined up, missing repeats padded with NaN: ``x[repeat, t]`` (recorded) and
``p[repeat, t]`` (predicted). Computing that directly needs every frame of every video in one place; instead

1. :func:`cc_stats` reduces ONE video (``[R, T, U]`` recorded and predicted) to additive sufficient statistics,
   ``3 R + 8`` numbers per unit (on any worker, e.g. one per work item);
2. :func:`merge_stats` adds the statistics of any number of videos (in any order, any grouping);
3. :func:`cc_from_stats` turns the total into ``cc_abs, cc_max, cc_norm`` ``[U]``.

Conventions (our choices where the definition leaves room):

* Masking: an entry counts only where BOTH the recorded and the predicted value are finite (NaN in
  ``recorded`` = the unit was not recorded in that repeat/frame; the prediction there is dropped too, and vice
  versa). A repeat a video does not have counts as all-NaN.
* A sample (video frame after burn-in) counts for a unit when at least one repeat is valid there
  (``t_j >= 1``); samples with none are left out of ``T``, of the repeat means and of ``n``.
* ``ybar`` (and the predicted repeat mean used by CC_abs) is the mean over the valid repeats of the sample.
* ``TP`` is the mean, over the repeats with at least 2 valid samples, of the repeat's variance over its own
  valid samples (``ddof=1``).
* NaN instead of a number, never an error or a warning: fewer than 2 samples; a (numerically) constant
  ``ybar`` or predicted mean (variance below ``1e-12`` of its mean square); no sample with 2 or more repeats
  (``n`` undefined) or ``n = 1``; ``SP <= 0`` (no repeatable signal): CC_max NaN; CC_norm NaN where CC_abs or
  CC_max is.
* The statistics are float64 raw sums: variances lose about ``1e-16 * (mean/std)^2`` relatively, far less
  than float32 recordings carry.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["cc_stats", "merge_stats", "cc_from_stats"]

#: Per-unit statistics, each ``[U]``: valid samples, sum of t_j, sum of (t_j - 1)/t_j^2, and sums over samples
#: of the recorded and predicted repeat means, their squares and product.
_UNIT_KEYS = ("samples", "repeat_sum", "repeat_harmonic", "mean_x", "mean_p", "mean_xx", "mean_pp", "mean_xp")
#: Per-repeat statistics, each ``[R, U]``: valid samples, sum and sum of squares of the recorded values.
_REPEAT_KEYS = ("repeat_samples", "repeat_x", "repeat_xx")
#: Elements (repeats x frames x units) converted to float64 at a time.
_CHUNK_ELEMENTS = 1 << 22
#: A variance below this fraction of the mean square counts as zero (a constant series up to rounding).
_CONSTANT = 1e-12


def cc_stats(recorded: np.ndarray, predicted: np.ndarray, burnin: int) -> dict[str, np.ndarray]:
    """Additive sufficient statistics of one video for :func:`cc_from_stats`.

    Args:
        recorded: ``[R, T, U]`` recorded responses, repeat x frame x unit; NaN = not recorded.
        predicted: ``[R, T, U]`` predicted responses of the same repeats (each with its own inputs).
        burnin: frames dropped at the start of every repeat (``0 <= burnin < T``).

    Returns:
        float64 arrays: ``samples, repeat_sum, repeat_harmonic, mean_x, mean_p, mean_xx, mean_pp, mean_xp``
        ``[U]`` and ``repeat_samples, repeat_x, repeat_xx`` ``[R, U]`` (see the module docstring).
    """
    recorded, predicted = np.asarray(recorded), np.asarray(predicted)
    if recorded.ndim != 3 or recorded.shape != predicted.shape:
        raise ValueError(
            f"cc_stats: expected recorded and predicted of one shape [R, T, U], got {recorded.shape} and "
            f"{predicted.shape}"
        )
    repeats, frames, units = recorded.shape
    if not 0 <= burnin < frames:
        raise ValueError(f"cc_stats: burnin must be in [0, {frames}) for {frames} frames, got {burnin}")
    stats = {key: np.zeros(units) for key in _UNIT_KEYS}
    stats.update({key: np.zeros((repeats, units)) for key in _REPEAT_KEYS})
    step = max(1, _CHUNK_ELEMENTS // (repeats * (frames - burnin)))
    for lo in range(0, units, step):
        cols = slice(lo, lo + step)
        x = np.asarray(recorded[:, burnin:, cols], dtype=np.float64)
        p = np.asarray(predicted[:, burnin:, cols], dtype=np.float64)
        valid = np.isfinite(x) & np.isfinite(p)
        x, p = np.where(valid, x, 0.0), np.where(valid, p, 0.0)
        count = valid.sum(axis=0)  # t_j [T, u]
        seen = count > 0
        per = 1.0 / np.maximum(count, 1)
        xbar, pbar = x.sum(axis=0) * per, p.sum(axis=0) * per
        for key, value in (
            ("samples", seen),
            ("repeat_sum", count),
            ("repeat_harmonic", np.where(seen, (count - 1) * per**2, 0.0)),
            ("mean_x", xbar),
            ("mean_p", pbar),
            ("mean_xx", xbar**2),
            ("mean_pp", pbar**2),
            ("mean_xp", xbar * pbar),
        ):
            stats[key][cols] = value.sum(axis=0)
        stats["repeat_samples"][:, cols] = valid.sum(axis=1)
        stats["repeat_x"][:, cols] = x.sum(axis=1)
        stats["repeat_xx"][:, cols] = (x**2).sum(axis=1)
    return stats


def merge_stats(stats: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Add the statistics of several videos (of one set of units); repeat ``r`` of every video lines up, and a
    video with fewer repeats counts as NaN (zero statistics) in the others.

    Raises:
        ValueError: no statistics, a missing key, or a different number of units.
    """
    stats = list(stats)
    if not stats:
        raise ValueError("merge_stats: no statistics to merge")
    units = stats[0]["samples"].shape[0]
    repeats = 0
    for i, item in enumerate(stats):
        missing = [key for key in (*_UNIT_KEYS, *_REPEAT_KEYS) if key not in item]
        if missing:
            raise ValueError(f"merge_stats: item {i} lacks {missing}")
        if item["samples"].shape != (units,) or item["repeat_x"].shape[1:] != (units,):
            raise ValueError(
                f"merge_stats: item {i} has {item['samples'].shape[0]} units, expected {units} like item 0"
            )
        repeats = max(repeats, item["repeat_x"].shape[0])
    total = {key: np.sum([item[key] for item in stats], axis=0) for key in _UNIT_KEYS}
    for key in _REPEAT_KEYS:
        total[key] = np.zeros((repeats, units))
        for item in stats:
            total[key][: item[key].shape[0]] += item[key]
    return total


def _divide(numerator: np.ndarray, denominator: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` where ``ok``, NaN elsewhere, without warnings."""
    out = np.full(np.shape(numerator), np.nan)
    np.divide(numerator, denominator, out=out, where=ok)
    return out


def cc_from_stats(stats: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cc_abs, cc_max, cc_norm)``, each ``[U]``, from :func:`cc_stats` / :func:`merge_stats` statistics.

    ``CC_abs`` = Pearson correlation over samples of the predicted and recorded repeat means; ``CC_max``
    (Schoppe et al. 2016): ``n = sqrt((sum_j t_j - T) / sum_j (t_j - 1)/t_j^2)``, ``P = var(ybar, ddof=1)``,
    ``TP`` = mean over repeats of ``var(x_repeat, ddof=1)``, ``SP = (n P - TP) / (n - 1)``,
    ``CC_max = sqrt(SP / var(ybar, ddof=0))``; ``CC_norm = CC_abs / CC_max``. NaN cases in the module docstring.
    """
    samples = stats["samples"]
    enough = samples >= 2
    mean_x = _divide(stats["mean_x"], samples, enough)
    mean_p = _divide(stats["mean_p"], samples, enough)
    square_x = _divide(stats["mean_xx"], samples, enough)
    square_p = _divide(stats["mean_pp"], samples, enough)
    var_x, var_p = square_x - mean_x**2, square_p - mean_p**2  # ddof = 0
    cov = _divide(stats["mean_xp"], samples, enough) - mean_x * mean_p
    varies_x = enough & (var_x > _CONSTANT * square_x)
    varies_p = enough & (var_p > _CONSTANT * square_p)
    ok_abs = varies_x & varies_p
    cc_abs = _divide(cov, np.sqrt(np.where(ok_abs, var_x * var_p, 1.0)), ok_abs)

    harmonic = stats["repeat_harmonic"]
    n = np.sqrt(_divide(stats["repeat_sum"] - samples, harmonic, harmonic > 0))
    signal = np.where(varies_x, var_x * samples, np.nan) / np.where(enough, samples - 1, 1.0)  # P, ddof = 1
    counts = stats["repeat_samples"]
    usable = counts >= 2
    repeat_var = _divide(
        stats["repeat_xx"] - _divide(stats["repeat_x"] ** 2, counts, usable), counts - 1, usable
    )  # [R, U]
    used = usable.sum(axis=0)
    total = _divide(np.where(usable, repeat_var, 0.0).sum(axis=0), used, used > 0)  # TP
    ok_n = np.isfinite(n) & (n > 1)
    power = _divide(n * signal - total, n - 1, ok_n)  # SP
    ok_max = np.isfinite(power) & (power > 0) & varies_x
    cc_max = np.sqrt(_divide(power, np.where(ok_max, var_x, 1.0), ok_max))
    ok_norm = np.isfinite(cc_abs) & np.isfinite(cc_max) & (cc_max > 0)
    return cc_abs, cc_max, _divide(cc_abs, cc_max, ok_norm)
