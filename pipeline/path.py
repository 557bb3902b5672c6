"""Regularization paths (pure NumPy): the α grid, strong-rule screening and the CV selection rules.

Penalties follow glum and scikit-learn: ``α·(r‖w‖₁ + (1−r)/2‖w‖²)`` on the original-scale weights, so
λ₁ = α·r and λ₂ = α·(1−r) (``pipeline.penalty``).

- **α_max** is the smallest α at which every weight is 0: at the intercept-only model θ* the optimality
  condition of weight j is |∂L/∂θⱼ| ≤ α·r/sⱼ, so α_max = maxⱼ |gⱼ·sⱼ| / r (r floored at 1e-3 as glmnet and
  glum do, so a ridge path has a finite top). The grid runs from α_max down to α_max·ε on a log scale.
- **Strong rules** (Tibshirani et al. 2012, the sequential rule): moving from α_{l−1} to α_l, a weight that is 0
  at α_{l−1} with |∇q_j| < r·(2α_l − α_{l−1})/sⱼ is very likely 0 at α_l too; the solve leaves it out, then checks
  every left-out weight's KKT condition and solves again with the violators in, so a screened solve is exactly
  the unscreened one.
- **Selection**: the mean of the per-fold held-out deviances and its standard error (std over folds / √K);
  ``min`` takes the smallest mean, ``1se`` the largest α whose mean is within one standard error of it (at the
  l1 ratio of the minimum), the sparser model the data cannot tell from the best (glmnet's ``lambda.1se``).
"""

from __future__ import annotations

import numpy as np

from pipeline.solvers.cd import l1_quadratic

L1_RATIO_FLOOR = 1e-3
SELECT = ("min", "1se")


def alpha_max(grad: np.ndarray, scale: np.ndarray, l1_ratio: float) -> float:
    """The smallest α that zeroes every weight, from the gradient (standardized θ) at the intercept-only
    model."""
    top = float(np.max(np.abs(np.asarray(grad[:-1]) * scale), initial=0.0))
    return top / max(l1_ratio, L1_RATIO_FLOOR)


def alpha_grid(top: float, n_alphas: int, eps: float) -> np.ndarray:
    """``n_alphas`` values from ``top`` down to ``top·eps``, evenly spaced in log α (scikit-learn's
    ``np.geomspace``)."""
    if not top > 0:
        return np.full(n_alphas, np.finfo(float).tiny)  # y is constant: every α gives the intercept-only model
    return np.geomspace(top, top * eps, num=n_alphas)


def screened_solve(H: np.ndarray, g: np.ndarray, theta0: np.ndarray, a: np.ndarray, start: np.ndarray,
                   discard: np.ndarray) -> np.ndarray:
    """argmin of the quadratic model ``gᵀ(θ−θ₀) + ½(θ−θ₀)ᵀH(θ−θ₀) + Σ aⱼ|θⱼ|`` from ``start``, with the
    coordinates in ``discard`` held at 0 until the KKT check on them says otherwise (then re-solved)."""
    discard = discard.copy()
    theta = np.asarray(start, dtype=np.float64).copy()
    while True:
        keep = np.flatnonzero(~discard)
        out = np.zeros_like(theta)
        if len(keep):
            drop = np.flatnonzero(discard)
            # with θ_D = 0 the model in θ_K has the gradient g_K + H_KD (0 − θ₀_D) at θ₀_K
            gk = g[keep] - H[np.ix_(keep, drop)] @ theta0[drop] if len(drop) else g[keep]
            out[keep] = l1_quadratic(H[np.ix_(keep, keep)], gk, theta0[keep], a[keep], start=theta[keep]).theta
        r = g + H @ (out - theta0)
        violators = discard & (np.abs(r) > a)
        if not violators.any():
            return out
        discard &= ~violators
        theta = out


def strong_discard(r: np.ndarray, theta: np.ndarray, a_now: np.ndarray, a_prev: np.ndarray) -> np.ndarray:
    """The sequential strong rule: penalized coordinates that are 0 with |∇q_j| < 2a_j(α_l) − a_j(α_{l−1})."""
    return (a_now > 0) & (theta == 0) & (np.abs(r) < 2.0 * a_now - a_prev)


def select(mean: np.ndarray, se: np.ndarray, alphas: np.ndarray, rule: str) -> tuple[int, int]:
    """(l1-ratio index, α index) chosen by ``rule`` from (R, L) arrays of CV means, standard errors, α."""
    if rule not in SELECT:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {', '.join(SELECT)}")
    finite = np.where(np.isfinite(mean), mean, np.inf)
    i, j = np.unravel_index(int(np.argmin(finite)), finite.shape)
    if rule == "min":
        return int(i), int(j)
    bar = finite[i, j] + (se[i, j] if np.isfinite(se[i, j]) else 0.0)
    within = np.flatnonzero(finite[i] <= bar)
    return int(i), int(within[np.argmax(alphas[i, within])])


def fold_summary(deviance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over the last axis (the folds)."""
    k = deviance.shape[-1]
    with np.errstate(invalid="ignore"):  # a diverged candidate (∞ in a fold): mean ∞, standard error NaN
        return deviance.mean(axis=-1), deviance.std(axis=-1, ddof=1) / np.sqrt(k)
