"""Coordinate descent for an L1-penalized quadratic model on the driver (glmnet's "covariance updates").

The second-order solvers reduce an elastic-net problem to

    minimize over θ:  q(θ) = gᵀ(θ − θ₀) + ½(θ − θ₀)ᵀH(θ − θ₀) + Σⱼ aⱼ|θⱼ|

with H the (d+1)×(d+1) Hessian of the smooth part (λ₂ diagonal included) and g its gradient at θ₀ (Newton:
the pass's Hessian and gradient; exact: the Gram from R). Only H and g are needed, never the data: a pass
costs O(n d²) on the cluster, this costs O(d) per coordinate update on the driver. The residual gradient
r = g + H(θ − θ₀) is kept up to date by one axpy per changed coordinate; each coordinate's minimizer is a
soft threshold, so coordinates the optimum zeroes are exactly 0.0.

Sweeps go over the active set (coordinates ever non-zero, and the unpenalized ones) until its largest change
is at the tolerance; then r is recomputed from scratch (no drift from the incremental updates) and every
inactive coordinate is checked against the KKT condition |rⱼ| ≤ aⱼ. The solve ends when a sweep from the
fresh r changes nothing beyond the tolerance and no coordinate violates KKT, or earlier, when the exact
minimizer on the current support and signs (one Cholesky, :func:`_polish`) passes the full KKT test: CD
finds the support in a few sweeps but then converges only linearly, thousands of sweeps on correlated
features (measured at d = 1000, equicorrelated, nearly all active: 9,000 sweeps and 23 s without; 340 and
1.6 s with). Both ends are the optimum; the second is at the linear solve's accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from pipeline.errors import GradpipeError

EPS = np.finfo(np.float64).eps
TOL = 1e-13  # largest coordinate change per sweep, relative to max|θ|: the fixed point to a few hundred ulps
POLISH_WAIT = 3  # sweeps with unchanged signs before the support's exact minimizer is first tried
MAX_SWEEPS = 10_000


@dataclass(frozen=True)
class CDResult:
    theta: np.ndarray
    sweeps: int  # sweeps over the active set (each O(|active|·d))
    checks: int  # full KKT checks (each one O(d²) matrix-vector product)
    polished: bool  # ended by the exact solve on the final support (else by CD's own stopping rule)


def _sweep(H: np.ndarray, diag: list[float], a: list[float], theta: np.ndarray, r: np.ndarray,
           active: list[int]) -> float:
    """One cyclic pass over ``active``, updating ``theta`` and ``r`` in place; returns the largest |change|."""
    biggest = 0.0
    for j in active:
        hjj = diag[j]
        old = float(theta[j])
        u = hjj * old - float(r[j])  # the coordinate's unpenalized minimizer times H_jj
        aj = a[j]
        if u > aj:
            new = (u - aj) / hjj
        elif u < -aj:
            new = (u + aj) / hjj
        else:
            new = 0.0
        delta = new - old
        if delta != 0.0:
            theta[j] = new
            r += delta * H[j]  # H is symmetric: row j is column j, and contiguous
            biggest = max(biggest, abs(delta))
    return biggest


def _rounding(g: np.ndarray, diag: np.ndarray, step: np.ndarray, active: np.ndarray) -> float:
    """The largest coordinate change the rounding of a fresh r = g + H·step can cause on ``active``.

    fl(r_j) errs by at most (d+2)·eps·(|g_j| + Σ_k |H_jk||step_k|), and |H_jk| ≤ √(H_jj H_kk) for a PSD H
    (O(d), no |H| formed); a change below this bound is noise, not progress, so no tolerance may ask for less
    (else the solve could cycle between fresh and updated residuals)."""
    if not active.any():
        return 0.0
    root = np.sqrt(np.maximum(diag, 0.0))
    spread = float(root @ np.abs(step))
    h = diag[active]
    return float(np.max((len(g) + 2) * EPS * (np.abs(g[active]) + np.sqrt(h) * spread) / h))


def _polish(H: np.ndarray, g: np.ndarray, theta0: np.ndarray, a: np.ndarray, theta: np.ndarray,
            usable: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The exact minimizer on the support and signs of ``theta`` and whether it is the optimum.

    With the support S (non-zero or unpenalized coordinates) and signs σ fixed, q is a convex quadratic on
    S whose minimizer x solves H_SS x_S = (Hθ₀)_S − g_S − a_S σ_S (one Cholesky). If the signs hold and every
    other coordinate meets KKT (|r_j| ≤ a_j), x is q's minimizer at the linear solve's accuracy, where CD
    alone converges only linearly (thousands of sweeps for correlated features). If a sign would flip, the
    point returned is the last one on the segment θ → x before the first flip (that coordinate exactly 0):
    q decreases along it, as on the segment it is a convex quadratic falling towards x. None: H_SS singular."""
    support = usable & ((theta != 0) | (a == 0))
    idx = np.flatnonzero(support)
    sigma = np.sign(theta[idx])
    penalized = a[idx] > 0
    out = np.where(usable & (a > 0), 0.0, theta)
    if len(idx):
        rhs = (H[idx] @ theta0) - g[idx] - a[idx] * sigma
        try:
            x = scipy.linalg.cho_solve(scipy.linalg.cho_factor(H[np.ix_(idx, idx)]), rhs)
        except (np.linalg.LinAlgError, ValueError):
            return None
        if not np.all(np.isfinite(x)):
            return None
        flips = penalized & (np.sign(x) != sigma)
        if flips.any():
            old = theta[idx]
            t = old[flips] / (old[flips] - x[flips])  # where each flipping coordinate reaches 0, in (0, 1]
            first = float(np.min(t))
            moved = old + first * (x - old)
            moved[np.flatnonzero(flips)[t == first]] = 0.0
            out[idx] = moved
            return out, False
        out[idx] = x
    r = g + H @ (out - theta0)
    rest = usable & ~support
    return out, bool(np.all(np.abs(r[rest]) <= a[rest]))


def l1_quadratic(H: np.ndarray, g: np.ndarray, theta0: np.ndarray, a: np.ndarray, *, tol: float = TOL,
                 max_sweeps: int = MAX_SWEEPS, start: np.ndarray | None = None) -> CDResult:
    """argmin_θ gᵀ(θ − θ₀) + ½(θ − θ₀)ᵀH(θ − θ₀) + Σ aⱼ|θⱼ|, warm-started at θ₀ or at ``start`` (the
    solution for the previous λ of a path) (H symmetric PSD).

    CD finds the support and signs fast but converges only linearly (thousands of sweeps for correlated
    features); so once the signs have held for a few sweeps, the exact minimizer on that support is tried
    (:func:`_polish`), with the wait doubled after each miss. Plain CD's stopping rule is the fallback.

    A coordinate with H_jj ≤ 0 (a constant feature without ridge) has no curvature: its column of a PSD H is
    zero, so it is set to 0 when penalized (the penalty alone decides) and left at θ₀ otherwise. Raises
    GradpipeError when ``max_sweeps`` sweeps do not converge."""
    H = np.ascontiguousarray(H, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    theta0 = np.asarray(theta0, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    d = len(g)
    if not (np.all(np.isfinite(H)) and np.all(np.isfinite(g))):
        raise GradpipeError("the Hessian or gradient is not finite; the data may hold NaN or extreme values.")
    diag_arr = np.diag(H).copy()
    usable = diag_arr > 0
    theta = (theta0 if start is None else np.asarray(start, dtype=np.float64)).copy()
    theta[~usable & (a > 0)] = 0.0
    diag, a_list = diag_arr.tolist(), a.tolist()
    active = usable & ((theta != 0) | (a == 0))
    sweeps = checks = stable = 0
    wait = POLISH_WAIT
    signs = np.sign(theta)
    while True:
        r = g + H @ (theta - theta0)  # fresh: no drift from the incremental updates
        checks += 1
        violators = usable & ~active & (np.abs(r) > a)
        active |= violators
        order = np.flatnonzero(active).tolist()
        noise = _rounding(g, diag_arr, theta - theta0, active)
        first = True
        while True:
            if sweeps >= max_sweeps:
                raise GradpipeError(
                    f"coordinate descent for the L1 penalty did not converge in {max_sweeps} sweeps over "
                    f"{len(order)} of {d} coordinates; the features may be nearly collinear: add some l2 "
                    f"(--l1-ratio below 1) or drop duplicated features.")
            change = _sweep(H, diag, a_list, theta, r, order)
            sweeps += 1
            if change <= max(tol * float(np.max(np.abs(theta), initial=0.0)), noise):
                break
            first = False
            now = np.sign(theta)
            stable = stable + 1 if np.array_equal(now, signs) else 0
            signs = now
            if stable >= wait:
                polished = _polish(H, g, theta0, a, theta, usable)
                stable = 0
                if polished is None:
                    wait *= 2
                elif polished[1]:
                    return CDResult(polished[0], sweeps, checks, polished=True)
                else:  # a better point, one coordinate fewer (or a KKT violator to take in): on from there
                    wait *= 2 if np.array_equal(np.sign(polished[0]), signs) else 1
                    theta[:] = polished[0]
                    signs = np.sign(theta)
                    break
        if first and not violators.any():
            return CDResult(theta, sweeps, checks, polished=False)
