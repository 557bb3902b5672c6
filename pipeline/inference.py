"""Inference for unpenalized GLMs: standard errors, t/z statistics, p-values, confidence intervals, fit statistics.

With sample weights the weights are precision weights (statsmodels ``var_weights``); φ is Pearson's χ²/df
for Gamma and Tweedie (statsmodels' default scale) and 1 for Poisson.

The covariance of the estimates is φ·(AᵀWA)⁻¹ with A = [X_std, 1] and W = ℓ'' at the optimum: from the
TSQR factor for linear models ((AᵀA)⁻¹ = R⁻¹R⁻ᵀ, never forming AᵀA) and from the Newton pass's weighted
Gram otherwise. φ is the residual variance RSS/(n − p) for linear models (t statistics, n − p degrees of
freedom) and 1 for logistic (z statistics). It is mapped to the reported coefficients (original feature
space) through the Jacobian of the standardization, so the numbers are those of statsmodels OLS / GLM on the
raw features. A penalized fit reports none: the penalty biases the estimates, so (AᵀWA)⁻¹ does not describe
their sampling distribution.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import linalg, stats

from pipeline.problem import Problem, original_jacobian

LEVEL = 0.95
NOT_PENALIZED = ("no p-values for a penalized fit: the penalty biases the estimates, so (XᵀWX)⁻¹ does not "
                 "describe their sampling distribution; refit with --l2 0 for inference")


def _beta_to_theta(M: np.ndarray) -> np.ndarray:
    """Reorder a matrix over β = [intercept, w] (TSQR's column order) to θ = [w, intercept]."""
    order = np.concatenate([np.arange(1, len(M)), [0]])
    return M[np.ix_(order, order)]


def unscaled_covariance(info: dict[str, Any]) -> np.ndarray:
    """(AᵀWA)⁻¹ over θ, from ``info["R"]`` (linear) or ``info["gram_sum"]`` (Newton)."""
    if "R" in info:
        R11 = info["R"][:-1, :-1]
        Rinv = linalg.solve_triangular(R11, np.eye(len(R11)))
        return _beta_to_theta(Rinv @ Rinv.T)
    c = linalg.cho_factor(info["gram_sum"])
    return linalg.cho_solve(c, np.eye(len(info["gram_sum"])))


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def summarize(problem: Problem, info: dict[str, Any], theta: np.ndarray, loss: float,
              feature_names: list[str]) -> dict[str, Any]:
    """The inference record (JSON-ready) at the fitted θ, whose mean loss is ``loss``.

    ``info`` holds the pass's sums: ``n`` = Σw, ``rows`` = rows with w > 0 (the residual degrees of freedom
    are rows − p: weights are precision weights, statsmodels' ``var_weights``), ``weighted``, and the
    family's ``R`` or ``gram_sum``/``sum_y``/``pearson``/``y_terms`` (see ``losses.newton_layout``)."""
    fam = problem.family
    if problem.penalty.active:
        return unavailable(NOT_PENALIZED)
    p = problem.n_params
    n, rows = float(info["n"]), float(info.get("rows", info["n"]))
    df_resid = rows - p
    if df_resid <= 0:
        return unavailable(f"no p-values: {int(rows)} rows leave no residual degrees of freedom for {p} "
                           f"parameters")
    try:
        cov_std = unscaled_covariance(info)
    except (np.linalg.LinAlgError, linalg.LinAlgError, ValueError):
        return unavailable("no p-values: XᵀWX is singular (linearly dependent features)")
    if not np.all(np.isfinite(cov_std)):
        return unavailable("no p-values: XᵀWX is singular (linearly dependent features)")
    deviance = 2.0 * n * loss  # unpenalized: the (weighted) mean loss is half the mean unit deviance
    phi = fam.dispersion(deviance, info.get("pearson", math.nan), df_resid)
    T = original_jacobian(problem.mean, problem.scale)
    cov = phi * (T @ cov_std @ T.T)
    coef, intercept = problem.to_original(theta)
    est = np.append(coef, intercept)
    se = np.sqrt(np.diag(cov))
    stat = est / se
    if fam.stat_name == "t":
        pvalues, crit = 2 * stats.t.sf(np.abs(stat), df_resid), float(stats.t.ppf(0.5 + LEVEL / 2, df_resid))
    else:
        pvalues, crit = 2 * stats.norm.sf(np.abs(stat)), float(stats.norm.ppf(0.5 + LEVEL / 2))
    null = fam.null_deviance(info)
    out: dict[str, Any] = {
        "available": True, "names": [*feature_names, "intercept"], "estimate": est.tolist(), "std_error": se.tolist(),
        "statistic_name": fam.stat_name, "statistic": stat.tolist(), "p_value": pvalues.tolist(),
        "ci_level": LEVEL, "ci_low": (est - crit * se).tolist(), "ci_high": (est + crit * se).tolist(),
        "n": int(rows), "df_resid": float(df_resid), "dispersion": phi, "deviance": deviance, "null_deviance": null,
        "aic": fam.aic(info, deviance, p, phi),
    }
    if fam.stat_name == "t":  # an estimated dispersion: the linear model's residual scale and R²
        r2 = 1.0 - deviance / null if null > 0 else math.nan
        out.update(residual_std_error=math.sqrt(phi), r2=r2, adj_r2=1.0 - (1.0 - r2) * (rows - 1) / df_resid)
    return out


def table(record: dict[str, Any]) -> list[str]:
    """Text lines: one per coefficient (estimate, SE, statistic, p, CI), then the fit statistics."""
    if not record.get("available"):
        return [f"  inference: {record.get('reason', 'not computed')}"]
    s = record["statistic_name"]
    lines = [f"  {'':>20} {'estimate':>13} {'std err':>11} {s:>9} {'P>|' + s + '|':>10} "
             f"{'[' + format(record['ci_level'], '.0%') + ' CI':>12} {']':>12}"]
    for i, name in enumerate(record["names"]):
        lines.append(f"  {name:>20} {record['estimate'][i]: 13.6g} {record['std_error'][i]:11.4g} "
                     f"{record['statistic'][i]: 9.3f} {record['p_value'][i]:10.3g} {record['ci_low'][i]: 12.6g} "
                     f"{record['ci_high'][i]: 12.6g}")
    extra = [f"n {record['n']}", f"deviance {record['deviance']:.6g}", f"null deviance {record['null_deviance']:.6g}",
             f"AIC {record['aic']:.6g}"]
    if "r2" in record:
        extra += [f"residual std error {record['residual_std_error']:.6g} on {record['df_resid']:g} df",
                  f"R² {record['r2']:.6g}", f"adjusted R² {record['adj_r2']:.6g}"]
    return lines + ["  " + ", ".join(extra)]
