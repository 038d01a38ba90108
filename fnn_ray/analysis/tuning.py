"""Orientation and direction tuning of model units (``shared/IN_SILICO.md`` §3), vectorised over units.

Input everywhere: tuning curves ``curves [U, D]`` (the mean predicted response of each unit to each of ``D``
directions of motion) and ``directions_deg [D]`` (0 = moving right, counter-clockwise). Every angle that goes
in or comes out is in DEGREES; radians are used only inside.

* :func:`global_indices` -- gOSI and gDSI (no baseline subtraction).
* :func:`von_mises` -- the bimodal von Mises curve ``f(theta)``.
* :func:`fit_von_mises` -- bounded least-squares fit of ``f`` to every curve: by default the published
  pipeline's fit (``scipy.optimize.least_squares`` on the 5 parameters, one unit at a time: about 5-15 ms per
  tuned unit, up to ~0.2 s per weakly tuned one that runs out of evaluations; ``FitConfig(processes=None)``
  spreads units over one process per core); ``FitConfig(method="projection")`` fits all units of a chunk at once
  (numpy, 100,000 units x 16 directions in seconds) but, from the same start, may end in another local optimum on
  weakly tuned curves.
* :func:`tuning_table` -- one row per unit: OSI, DSI (from the fitted curve), gOSI, gDSI, preferred
  orientation and direction, the fit's parameters, mse, success and status.

How the default fit works: ``scipy.optimize.least_squares`` (trust-region reflective, analytic Jacobian) on
``(mu, phi, kappa, A, b)`` from the published start ``mu`` = direction of the largest response, ``phi = 0.5``,
``kappa = 1``, ``b = max(r_min, r_max / 100)``, ``A = 2 (r_max - b)`` (clipped into the bounds), within the
bounds below; converged = scipy's ``success``.

How the projection fit works. ``f = A*phi*e1 + A*(1 - phi)*e2 + b`` with ``e1 = exp(kappa*(cos(theta - mu) - 1))`` and
``e2 = exp(kappa*(cos(theta - mu - pi) - 1))`` is linear in ``c = (A*phi, A*(1 - phi), b)``, and the bounds
``phi in [0, 1], A >= 0, b >= 0`` are exactly ``c >= 0``. So the fit is a separable problem (variable
projection, Golub & Pereyra): for given ``(mu, kappa)`` the best ``c`` is a 3-variable non-negative least
squares, solved exactly; ``(mu, kappa >= 0)`` are found by a projected Levenberg-Marquardt on the reduced
residual with Kaufman's Jacobian. The same minimisation as the 5-parameter problem, but without its long curved
valleys (``kappa`` against ``A`` and ``b`` at small ``kappa``), so it converges in tens of iterations.

Choices where ``IN_SILICO.md`` leaves room (documented here and in the function docstrings):

* Start: ``mu`` = direction of the largest response and ``kappa = 1``, the published pipeline's single start
  (``IN_SILICO.md`` §6); in the projection fit ``A, phi, b`` are not iterated but solved exactly at every
  ``(mu, kappa)``, so their start values play no part. :attr:`FitConfig.kappa_starts` may add starts (e.g.
  ``(1, 20)``: a second start at a narrow peak finds lower-cost "spike" fits on weakly tuned curves and raises their
  OSI/DSI, which the published tables did not do); a unit then keeps the lowest cost, and the table's metadata
  records the starts.
* ``A = 0`` (a flat fit) leaves ``phi`` undefined; it is reported as 0.5.
* ``kappa`` is bounded above by :attr:`FitConfig.kappa_max` (default 40: a peak whose full width at half
  maximum, ``2 arccos(1 - ln 2 / kappa)``, is 21.3 degrees, narrower than the 22.5-degree spacing of 16
  directions, so the sampled curve cannot tell it from a spike). Without the bound a curve best fitted by a
  spike at one direction drives ``kappa`` (and ``A``) towards infinity and its OSI/DSI towards 1.
* ``fit_success`` is True when the iteration converged (least squares: scipy's ``success``; projection:
  relative cost decrease or relative step below :attr:`FitConfig.tol`, a near-exact fit, zero projected gradient, or
  a damping so large that no step lowers the cost: a numerical stationary point) within :attr:`FitConfig.max_iter`
  iterations with finite parameters. ``fit_status`` says what the fit is worth: ``"ok"``; ``"kappa_bound"``
  (converged with ``kappa`` at its upper bound (within 0.1%): a spike narrower than the direction sampling);
  ``"failed"`` (not converged; the parameters are the best point found); ``"nonfinite"`` (the curve has a non-finite
  value: NaN parameters). OSI and DSI are NaN unless the status is ``"ok"`` (gOSI/gDSI do not depend on the fit and
  stay).
* After the fit ``mu`` is wrapped to ``[0, 360)`` degrees (after the ``phi < 0.5`` flip), so ``fit_mu`` equals
  ``pref_dir``.
* A ratio whose denominator is not positive (gOSI/gDSI with ``sum_k r_k <= 0``, OSI with
  ``R_pref + R_orth <= 0``, DSI with ``f(mu) <= 0``) is NaN.
"""

from __future__ import annotations

import multiprocessing.pool
import os
import signal
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["FIT_METHODS", "FIT_STATUSES", "INDEX_DEFINITIONS", "FitConfig", "global_indices", "von_mises",
           "fit_von_mises", "tuning_table"]

#: The two-column supports of the 3-variable NNLS over the basis columns (e1, e2, 1).
_PAIRS = ((0, 1), (0, 2), (1, 2))
#: Lower bounds of the iterated parameters (mu in radians, kappa).
_LOWER = np.array([-np.inf, 0.0])
#: The columns of :func:`tuning_table`, defined in words (for metadata).
INDEX_DEFINITIONS = {
    "gOSI, gDSI": "|sum_k r_k exp(2i theta_k)| / sum_k r_k and |sum_k r_k exp(i theta_k)| / sum_k r_k over the "
                  "mean response r_k per direction, no baseline (IN_SILICO.md section 3)",
    "OSI, DSI": "from the fitted bimodal von Mises f: (R_pref - R_orth) / (R_pref + R_orth) and "
                "1 - f(mu + 180) / f(mu); NaN unless fit_status is ok (IN_SILICO.md sections 3 and 6)",
    "pref_dir, pref_ori": "fitted mu mod 360 and mod 180, degrees, 0 = rightward motion, counter-clockwise",
}
#: Least squares: units per process at least (a process costs ~1-3 s to start; a unit ~5-200 ms to fit).
UNITS_PER_PROCESS = 64
#: Least squares: units per task at most, so that a stopped job's processes are never busy for long.
UNITS_PER_TASK = 256
#: Fit statuses (``fit_status``), see the module docstring.
FIT_STATUSES = ("ok", "kappa_bound", "failed", "nonfinite")


#: The fit methods of :class:`FitConfig`.
FIT_METHODS = ("least_squares", "projection")
#: ``kappa`` within this fraction of ``kappa_max`` counts as on the bound.
_ON_BOUND = 1e-3


@dataclass(frozen=True)
class FitConfig:
    """Settings of :func:`fit_von_mises`."""

    method: str = "least_squares"
    """``"least_squares"`` (the published fit, one unit at a time) or ``"projection"`` (vectorised; the module
    docstring)."""

    max_iter: int = 100
    """Projection: iterations (accepted or rejected steps) before a unit's fit is given up (``success``
    False); least squares: scipy's default (100 x parameters function evaluations)."""
    tol: float = 1e-8
    """Least squares: scipy's ``ftol``, ``xtol`` and ``gtol``. Projection: converged when an accepted step lowers the
    cost by less than ``tol`` relatively, moves ``(mu, kappa)`` by less than ``tol`` relatively, or leaves a residual
    norm below ``tol`` times the curve's norm."""
    damping_start: float = 1e-3
    """Initial Marquardt damping (relative to the diagonal of ``J^T J``)."""
    damping_max: float = 1e12
    """A unit whose damping grows past this is at a numerical stationary point (converged)."""
    kappa_starts: tuple[float, ...] = (1.0,)
    """One fit per value, started from ``mu`` = direction of the largest response and this ``kappa``; a unit
    keeps the fit with the lowest cost (the earlier start on ties). ``(1.0,)`` is the published single start;
    more starts can only lower the cost (and raise OSI/DSI of weakly tuned curves)."""
    kappa_max: float = 40.0
    """Upper bound of ``kappa`` (see the module docstring); a fit that ends on it has ``fit_status``
    ``"kappa_bound"`` and NaN OSI/DSI."""
    chunk: int = 16384
    """Units fitted together (memory: about 100 float64 per unit and direction)."""
    processes: int | None = 1
    """Least squares: processes fitting units side by side (``None``: one per CPU core this process may use, what
    the jobs use), at most one per :data:`UNITS_PER_PROCESS` units; every unit's fit is the same whatever the
    count, so it is not recorded in metadata. The processes are spawned: a script that asks for more than one
    needs the usual ``if __name__ == "__main__":`` guard."""

    def __post_init__(self) -> None:
        if self.method not in FIT_METHODS:
            raise ValueError(f"fit: method {self.method!r}, expected one of {', '.join(FIT_METHODS)}")
        starts = tuple(float(k) for k in self.kappa_starts)
        if self.processes is not None and self.processes < 1:
            raise ValueError(f"fit: processes {self.processes} must be at least 1")
        if not starts or not all(0 <= k <= self.kappa_max for k in starts):
            raise ValueError(f"fit: kappa starts {list(starts)} must be a non-empty list in [0, kappa_max = "
                             f"{self.kappa_max:g}]")
        object.__setattr__(self, "kappa_starts", starts)

    def to_json(self) -> dict:
        """The settings that change the numbers, for metadata: starts, bound, iterations, tolerance."""
        return {"model": "bimodal von Mises, least squares (IN_SILICO.md sections 3 and 6)", "method": self.method,
                "kappa_starts": list(self.kappa_starts), "kappa_max": self.kappa_max, "max_iter": self.max_iter,
                "tol": self.tol}


def _check_curves(curves: np.ndarray, directions_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes; return float64 ``curves [U, D]`` and ``theta [D]`` in radians."""
    curves = np.asarray(curves, dtype=np.float64)
    directions = np.asarray(directions_deg, dtype=np.float64)
    if curves.ndim != 2 or directions.ndim != 1 or curves.shape[1] != directions.shape[0]:
        raise ValueError(
            f"tuning: expected curves [U, D] and directions_deg [D], got {curves.shape} and {directions.shape}"
        )
    if not np.all(np.isfinite(directions)):
        raise ValueError("tuning: directions_deg must be finite")
    return curves, np.deg2rad(directions)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` where the denominator is positive and finite, NaN elsewhere (no warnings)."""
    ok = np.isfinite(denominator) & (denominator > 0)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=ok)
    return out


def global_indices(curves: np.ndarray, directions_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global orientation and direction selectivity indices.

    ``gOSI = |sum_k r_k exp(2i theta_k)| / sum_k r_k``, ``gDSI = |sum_k r_k exp(i theta_k)| / sum_k r_k``.

    Args:
        curves: ``[U, D]`` tuning curves (no baseline subtraction; meant for non-negative responses).
        directions_deg: ``[D]`` directions of motion in degrees.

    Returns:
        ``(gosi [U], gdsi [U])``; NaN for a curve with a non-finite value or ``sum_k r_k <= 0``.
    """
    curves, theta = _check_curves(curves, directions_deg)
    finite = np.all(np.isfinite(curves), axis=1)
    curves = np.where(finite[:, None], curves, 0.0)
    total = np.where(finite, curves.sum(axis=1), np.nan)
    return _ratio(np.abs(curves @ np.exp(2j * theta)), total), _ratio(np.abs(curves @ np.exp(1j * theta)), total)


def von_mises(theta_deg, mu_deg, phi, kappa, scale, bias) -> np.ndarray:
    """The bimodal von Mises curve of ``IN_SILICO.md`` §3 (all arguments broadcast together).

    ``f = phi*A*exp(kappa*(cos(theta - mu) - 1)) + (1 - phi)*A*exp(kappa*(cos(theta - mu - pi) - 1)) + b``
    with ``A = scale`` and ``b = bias``; ``theta_deg`` and ``mu_deg`` in degrees.
    """
    cos = np.cos(np.deg2rad(np.asarray(theta_deg, dtype=np.float64) - mu_deg))
    return scale * (phi * np.exp(kappa * (cos - 1.0)) + (1.0 - phi) * np.exp(-kappa * (cos + 1.0))) + bias


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of symmetric positive (semi)definite ``[..., k, k]`` matrices, k = 2 or 3, in closed form.

    A ridge of ``1e-12 * trace`` keeps singular matrices invertible (at ``kappa = 0`` the three basis columns
    coincide); it moves well-posed solutions far less than the fit's tolerances. An all-zero matrix gives 0.
    """
    k = matrix.shape[-1]
    m = matrix + np.eye(k) * (1e-12 * np.trace(matrix, axis1=-2, axis2=-1)[..., None, None])
    if k == 2:
        adj = np.stack([m[..., 1, 1], -m[..., 0, 1], -m[..., 1, 0], m[..., 0, 0]], axis=-1).reshape(m.shape)
        det = m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    else:
        rows = [(1, 2), (0, 2), (0, 1)]
        adj = np.empty_like(m)  # adjugate = transposed cofactors = cofactors (m is symmetric)
        for i, (a, b) in enumerate(rows):
            for j, (c, d) in enumerate(rows):
                adj[..., j, i] = (-1) ** (i + j) * (m[..., a, c] * m[..., b, d] - m[..., a, d] * m[..., b, c])
        det = np.sum(m[..., 0, :] * adj[..., :, 0], axis=-1)
    return adj / np.where(det == 0, np.inf, det)[..., None, None]


def _basis(theta: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Basis ``[n, 3, D]`` = (e1, e2, 1) at ``q [n, 2]`` = (mu in radians, kappa), and ``cos, sin`` of
    ``theta - mu`` ``[n, D]``."""
    cos_mu, sin_mu = np.cos(q[:, :1]), np.sin(q[:, :1])
    cos = np.cos(theta) * cos_mu + np.sin(theta) * sin_mu
    sin = np.sin(theta) * cos_mu - np.cos(theta) * sin_mu
    kappa = q[:, 1:]
    scaled = kappa * cos
    basis = np.empty((q.shape[0], 3, theta.size))
    np.exp(scaled - kappa, out=basis[:, 0])
    np.exp(-scaled - kappa, out=basis[:, 1])
    basis[:, 2] = 1.0
    return basis, cos, sin


def _matvec(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Batched ``[n, k, l] @ [n, l] -> [n, k]``."""
    return (matrix @ vector[:, :, None])[..., 0]


def _nnls(basis: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``argmin ||c @ basis - y||, c >= 0`` per unit: ``[n, 3, D]``, ``[n, D]`` -> ``c [n, 3]``.

    Exact: the optimum is the unconstrained least-squares solution on its own support. So it is the
    unconstrained solution when that is feasible, else the feasible solution on a smaller support (pairs, then
    single columns, in closed form) that explains the most, ``c . rhs`` (= ``||y||^2 - cost``), or ``c = 0``.
    """
    gram = basis @ basis.transpose(0, 2, 1)
    rhs = _matvec(basis, y)
    best = _matvec(_inverse(gram), rhs)
    rest = np.flatnonzero(~np.all(best >= 0.0, axis=1))
    g, r = gram[rest], rhs[rest]
    coef = np.zeros((rest.size, 3))
    gain = np.zeros(rest.size)
    for a, b in _PAIRS:
        det = g[:, a, a] * g[:, b, b] - g[:, a, b] ** 2
        ok = det > 1e-12 * g[:, a, a] * g[:, b, b]  # collinear columns: a single column does as well
        det = np.where(ok, det, 1.0)
        ca = (g[:, b, b] * r[:, a] - g[:, a, b] * r[:, b]) / det
        cb = (g[:, a, a] * r[:, b] - g[:, a, b] * r[:, a]) / det
        pair_gain = ca * r[:, a] + cb * r[:, b]
        take = ok & (ca >= 0.0) & (cb >= 0.0) & (pair_gain > gain)
        coef[take] = 0.0
        coef[take, a], coef[take, b], gain[take] = ca[take], cb[take], pair_gain[take]
    for a in range(3):
        ok = g[:, a, a] > 0.0  # e2 underflows to 0 at very large kappa
        ca = r[:, a] / np.where(ok, g[:, a, a], 1.0)
        take = ok & (ca >= 0.0) & (ca * r[:, a] > gain)
        coef[take] = 0.0
        coef[take, a], gain[take] = ca[take], ca[take] * r[take, a]
    best[rest] = coef
    return best


def _evaluate(theta: np.ndarray, q: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At ``q [n, 2]``: the best linear parameters ``[n, 3]``, the residual ``[n, D]`` and the cost ``[n]``."""
    basis, _, _ = _basis(theta, q)
    coef = _nnls(basis, y)
    resid = (coef[:, None, :] @ basis)[:, 0, :] - y
    return coef, resid, np.sum(resid**2, axis=1)


def _normal_equations(
    theta: np.ndarray, q: np.ndarray, coef: np.ndarray, resid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Newton matrix ``[n, 2, 2]`` and gradient ``[n, 2]`` of the reduced problem in (mu, kappa).

    Kaufman's variable-projection Jacobian ``J = P d``: ``d`` the derivative of the model at fixed linear
    parameters, ``P`` the projection off the basis columns in use ``B``; ``J^T J = d^T d - (d^T B) (B^T B)^-1
    (B^T d)``. The residual is orthogonal to ``B``, so ``J^T r = d^T r``.
    """
    basis, cos, sin = _basis(theta, q)
    peak, anti = coef[:, 0:1] * basis[:, 0], coef[:, 1:2] * basis[:, 1]
    diff = peak - anti
    deriv = np.stack([q[:, 1:] * sin * diff, cos * diff - (peak + anti)], axis=1)
    used = coef > 0
    inner = (deriv @ basis.transpose(0, 2, 1)) * used[:, None, :]  # [n, 2, 3]
    gram = np.where(used[:, :, None] & used[:, None, :], basis @ basis.transpose(0, 2, 1), np.eye(3))
    hess = deriv @ deriv.transpose(0, 2, 1) - inner @ _inverse(gram) @ inner.transpose(0, 2, 1)
    return hess, _matvec(deriv, resid)


def _fit_chunk(
    curves: np.ndarray, theta: np.ndarray, kappa: float, config: FitConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit finite curves ``[n, D]`` from ``mu`` = direction of the largest response and ``kappa``.

    Returns ``q [n, 2]`` (mu in radians, kappa), the linear parameters ``[n, 3]`` (A*phi, A*(1 - phi), b), the
    cost (sum of squares) ``[n]`` and success ``[n]``.
    """
    n = curves.shape[0]
    upper = np.array([np.inf, config.kappa_max])
    q = np.stack([theta[np.argmax(curves, axis=1)], np.full(n, kappa)], axis=1)
    coef, resid, cost = _evaluate(theta, q, curves)
    damping = np.full(n, config.damping_start)
    done = np.zeros(n, dtype=bool)
    for _ in range(config.max_iter):
        idx = np.flatnonzero(~done)
        if idx.size == 0:
            break
        qi, yi, ci, lam = q[idx], curves[idx], cost[idx], damping[idx]
        hess, grad = _normal_equations(theta, qi, coef[idx], resid[idx])
        # kappa on a bound with descent pointing past it: held
        fixed = ((qi <= _LOWER) & (grad > 0)) | ((qi >= upper) & (grad < 0))
        grad = np.where(fixed, 0.0, grad)
        hess = np.where(fixed[:, :, None] | fixed[:, None, :], 0.0, hess) + np.eye(2) * fixed[:, :, None]
        diag = np.diagonal(hess, axis1=1, axis2=2)
        diag = np.maximum(diag, 1e-12 * diag.max(axis=1, keepdims=True))
        step = -_matvec(_inverse(hess + np.eye(2) * (lam[:, None] * diag)[:, :, None]), grad)
        trial = np.clip(qi + step, _LOWER, upper)
        trial_coef, trial_resid, trial_cost = _evaluate(theta, trial, yi)
        accept = trial_cost < ci
        small_cost = (ci - trial_cost) <= config.tol * ci
        small_step = np.linalg.norm(trial - qi, axis=1) <= config.tol * (np.linalg.norm(qi, axis=1) + config.tol)
        exact = trial_cost <= config.tol**2 * np.sum(yi**2, axis=1)
        converged = (accept & (small_cost | small_step | exact)) | ~np.any(grad != 0, axis=1)
        stalled = ~accept & (lam * 10.0 > config.damping_max)
        q[idx] = np.where(accept[:, None], trial, qi)
        coef[idx] = np.where(accept[:, None], trial_coef, coef[idx])
        resid[idx] = np.where(accept[:, None], trial_resid, resid[idx])
        cost[idx] = np.where(accept, trial_cost, ci)
        damping[idx] = np.where(accept, np.maximum(lam * 0.2, 1e-12), lam * 10.0)
        done[idx] = converged | stalled
    return q, coef, cost, done & np.all(np.isfinite(q), axis=1)


def _model_jacobian(p: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The curve ``[D]`` at ``p = (mu rad, phi, kappa, A, b)`` and its Jacobian ``[D, 5]``."""
    mu, phi, kappa, scale, _ = p
    cos, sin = np.cos(theta - mu), np.sin(theta - mu)
    e1, e2 = np.exp(kappa * (cos - 1.0)), np.exp(-kappa * (cos + 1.0))
    peak, anti = phi * e1, (1.0 - phi) * e2
    jac = np.stack([scale * kappa * sin * (peak - anti), scale * (e1 - e2),
                    scale * (peak * (cos - 1.0) - anti * (cos + 1.0)), peak + anti, np.ones_like(theta)], axis=1)
    return scale * (peak + anti) + p[4], jac


def _fit_least_squares(curves: np.ndarray, theta: np.ndarray, kappa: float, config: FitConfig
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The published fit of finite curves ``[n, D]``, one at a time, from the published start with ``kappa``;
    returns what :func:`_fit_chunk` returns."""
    from scipy.optimize import least_squares

    lower, upper = np.array([-np.inf, 0.0, 0.0, 0.0, 0.0]), np.array([np.inf, 1.0, config.kappa_max, np.inf, np.inf])
    n = curves.shape[0]
    q, coef, cost, success = np.zeros((n, 2)), np.zeros((n, 3)), np.zeros(n), np.zeros(n, dtype=bool)
    for u, y in enumerate(curves):
        if y.min() == y.max():  # flat: the exact optimum A = 0, b = the value (scipy would stop near it)
            q[u], coef[u], success[u] = (theta[0], kappa), (0.0, 0.0, max(y[0], 0.0)), True
            cost[u] = np.sum((y - coef[u, 2]) ** 2)
            continue
        bias = max(y.min(), y.max() / 100.0)
        start = np.clip([theta[np.argmax(y)], 0.5, kappa, 2.0 * (y.max() - bias), bias], lower, upper)
        fit = least_squares(lambda p: _model_jacobian(p, theta)[0] - y, start,
                            jac=lambda p: _model_jacobian(p, theta)[1], bounds=(lower, upper),
                            ftol=config.tol, xtol=config.tol, gtol=config.tol)
        mu, phi, kap, scale, b = fit.x
        q[u], coef[u] = (mu, kap), (scale * phi, scale * (1.0 - phi), b)
        cost[u], success[u] = np.sum(fit.fun**2), fit.success
    return q, coef, cost, success & np.all(np.isfinite(q), axis=1)


def _processes(config: FitConfig, units: int) -> int:
    """Processes for a least-squares fit of ``units`` curves (1: in this process)."""
    if config.method != "least_squares":
        return 1
    cores = config.processes or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else os.cpu_count() or 1)
    return max(1, min(cores, units // UNITS_PER_PROCESS))


def _ignore_sigint() -> None:
    """A fitting process leaves Ctrl-C to its parent, which stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _fit_in(pool: multiprocessing.pool.Pool, processes: int, curves: np.ndarray, theta: np.ndarray, kappa: float,
            config: FitConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_fit_least_squares` of ``curves [n, D]`` in tasks of ``pool``, the results in input order."""
    n = curves.shape[0]
    tasks = min(n, max(4 * processes, -(-n // UNITS_PER_TASK)))
    parts = pool.starmap(_fit_least_squares, [(part, theta, kappa, config)
                                              for part in np.array_split(curves, tasks)], chunksize=1)
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def fit_von_mises(
    curves: np.ndarray, directions_deg: np.ndarray, config: FitConfig = FitConfig()
) -> dict[str, np.ndarray]:
    """Bounded least-squares fit of the bimodal von Mises curve (:func:`von_mises`) to every tuning curve.

    Bounds ``phi in [0, 1]``, ``0 <= kappa <= config.kappa_max``, ``scale, bias >= 0``. Start ``mu`` =
    direction of the largest response, ``kappa`` = each of :attr:`FitConfig.kappa_starts` (the lowest cost
    kept), see the module docstring for the rest. After the fit, ``phi < 0.5`` is flipped to
    ``mu + 180, 1 - phi`` (``mu`` is the dominant peak) and ``mu`` is wrapped to ``[0, 360)``.

    Args:
        curves: ``[U, D]`` tuning curves.
        directions_deg: ``[D]`` directions of motion in degrees.
        config: iteration settings.

    Returns:
        ``[U]`` arrays: ``mu`` (degrees), ``phi``, ``kappa``, ``scale`` (A), ``bias`` (b), ``mse`` (mean squared
        residual over the D points), ``success`` (bool), ``status`` (str, :data:`FIT_STATUSES`). A curve with a
        non-finite value: NaN, success False, status ``"nonfinite"``.
    """
    curves, theta = _check_curves(curves, directions_deg)
    n_units = curves.shape[0]
    q = np.full((n_units, 2), np.nan)
    coef = np.full((n_units, 3), np.nan)
    cost = np.full(n_units, np.nan)
    success = np.zeros(n_units, dtype=bool)
    finite = np.flatnonzero(np.all(np.isfinite(curves), axis=1))
    processes = _processes(config, finite.size)
    pool = (multiprocessing.get_context("spawn").Pool(processes, initializer=_ignore_sigint) if processes > 1
            else None)
    try:
        for lo in range(0, finite.size, config.chunk):
            rows = finite[lo : lo + config.chunk]
            for kappa in config.kappa_starts:
                if pool is not None:
                    fit = _fit_in(pool, processes, curves[rows], theta, kappa, config)
                else:
                    fit = (_fit_least_squares if config.method == "least_squares" else _fit_chunk)(
                        curves[rows], theta, kappa, config)
                fit_q, fit_coef, fit_cost, fit_success = fit
                better = np.isnan(cost[rows]) | (fit_cost < cost[rows])
                take = rows[better]
                q[take], coef[take], cost[take], success[take] = (
                    fit_q[better], fit_coef[better], fit_cost[better], fit_success[better]
                )
    finally:
        if pool is not None:
            pool.terminate()  # also when stopped mid-fit: no process left busy
            pool.join()
    scale = coef[:, 0] + coef[:, 1]
    phi = np.where(scale > 0, coef[:, 0] / np.where(scale > 0, scale, 1.0), 0.5)
    phi[np.isnan(scale)] = np.nan
    flip = phi < 0.5
    mu = np.where(flip, q[:, 0] + np.pi, q[:, 0])
    status = np.full(n_units, "nonfinite", dtype=object)
    status[finite] = np.where(~success[finite], "failed",
                              np.where(q[finite, 1] >= config.kappa_max * (1 - _ON_BOUND), "kappa_bound", "ok"))
    return {
        "mu": np.rad2deg(np.mod(mu, 2 * np.pi)) % 360.0,
        "phi": np.where(flip, 1.0 - phi, phi),
        "kappa": q[:, 1],
        "scale": scale,
        "bias": coef[:, 2],
        "mse": cost / curves.shape[1],
        "success": success,
        "status": status,
    }


def tuning_table(curves: np.ndarray, directions_deg: np.ndarray, config: FitConfig = FitConfig()) -> pd.DataFrame:
    """Tuning properties of every unit, one row per curve in the input order.

    Columns: ``OSI, DSI, gOSI, gDSI, pref_ori, pref_dir`` (degrees), ``fit_mu`` (degrees, = ``pref_dir``),
    ``fit_phi, fit_kappa, fit_scale, fit_bias, fit_mse, fit_success`` (bool), ``fit_status`` (str). From the fitted
    curve ``f``: ``pref_dir = mu mod 360``, ``pref_ori = mu mod 180``, ``R_pref = (f(pref_ori) + f(pref_ori + 180))
    / 2``, ``R_orth = (f(pref_ori + 90) + f(pref_ori + 270)) / 2``, ``OSI = (R_pref - R_orth) / (R_pref + R_orth)``,
    ``DSI = 1 - f(mu + 180) / f(mu)``; OSI and DSI are NaN unless ``fit_status`` is ``"ok"`` (a fit on the
    ``kappa`` bound, unconverged, or of a non-finite curve). A curve with a non-finite value also gets NaN
    gOSI/gDSI; never raises for curve values.

    Args:
        curves: ``[U, D]`` tuning curves (mean response per direction).
        directions_deg: ``[D]`` directions of motion in degrees.
        config: fit settings (:class:`FitConfig`).
    """
    gosi, gdsi = global_indices(curves, directions_deg)
    fit = fit_von_mises(curves, directions_deg, config)
    mu = fit["mu"]
    pref_ori = np.mod(mu, 180.0)

    def curve_at(angle: np.ndarray) -> np.ndarray:
        return von_mises(angle, mu, fit["phi"], fit["kappa"], fit["scale"], fit["bias"])

    with np.errstate(over="ignore", invalid="ignore"):  # a spike fit's huge scale may overflow: NaN below
        r_pref = (curve_at(pref_ori) + curve_at(pref_ori + 180.0)) / 2.0
        r_orth = (curve_at(pref_ori + 90.0) + curve_at(pref_ori + 270.0)) / 2.0
        osi = _ratio(r_pref - r_orth, r_pref + r_orth)
        dsi = 1.0 - _ratio(curve_at(mu + 180.0), curve_at(mu))
    flagged = fit["status"] != "ok"
    osi[flagged], dsi[flagged] = np.nan, np.nan
    fit_columns = ("mu", "phi", "kappa", "scale", "bias", "mse", "success", "status")
    return pd.DataFrame(
        {
            "OSI": osi,
            "DSI": dsi,
            "gOSI": gosi,
            "gDSI": gdsi,
            "pref_ori": pref_ori,
            "pref_dir": mu,
            **{f"fit_{name}": fit[name] for name in fit_columns},
        }
    )
