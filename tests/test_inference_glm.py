"""Inference for Poisson, Gamma and Tweedie fits (and weighted linear/logistic ones) against statsmodels GLM.

The information is built with the real kernel (``losses.chunk_newton`` / ``chunk_qr``) at statsmodels'
optimum, so only the inference arithmetic is under test, not a solver's tolerance."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import statsmodels.api as sm

from pipeline import inference
from pipeline import losses as L
from pipeline.families import get_family
from pipeline.problem import Problem, from_original

N, D = 3000, 3


def data(kind: str, power: float = 1.5, weighted: bool = True, with_offset: bool = True, seed: int = 0):
    """Raw features with non-trivial means and scales, a log-link truth, precision weights and an offset."""
    rng = np.random.default_rng(seed)
    X = rng.normal([1.0, -2.0, 5.0], [0.5, 2.0, 3.0], size=(N, D))
    beta = np.array([0.3, -0.1, 0.05])
    offset = rng.normal(0.0, 0.3, N) if with_offset else None
    eta = 0.2 + X @ beta + (0.0 if offset is None else offset)
    w = rng.uniform(0.5, 2.0, N) if weighted else None
    if kind == "linear":
        y = eta + rng.normal(0.0, 1.0, N) / np.sqrt(1.0 if w is None else w)
    elif kind == "logistic":
        y = (rng.uniform(size=N) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    else:
        mu = np.exp(eta)
        if kind == "poisson":
            y = rng.poisson(mu).astype(float)
        elif kind == "gamma":
            y = rng.gamma(3.0, mu / 3.0)
        else:  # compound Poisson–Gamma with exact zeros
            y = np.array([rng.gamma(2.0, 0.6, k).sum() for k in rng.poisson(0.8 * mu)])
    return X, y, w, offset


def sm_family(kind: str, power: float):
    log = sm.families.links.Log()
    return {"poisson": lambda: sm.families.Poisson(), "gamma": lambda: sm.families.Gamma(link=log),
            "tweedie": lambda: sm.families.Tweedie(var_power=power, link=log),
            "logistic": lambda: sm.families.Binomial(), "linear": lambda: sm.families.Gaussian()}[kind]()


def fit_both(kind: str, power: float = 1.5, weighted: bool = True, with_offset: bool = True, seed: int = 0):
    X, y, w, offset = data(kind, power, weighted, with_offset, seed)
    model = sm.GLM(y, sm.add_constant(X), family=sm_family(kind, power), offset=offset, var_weights=w)
    res = model.fit(tol=1e-13, maxiter=200)  # IRLS to a deviance change of 1e-13: far below the checks below
    mean, scale = X.mean(axis=0), X.std(axis=0)
    problem = Problem.of(kind, D, power=power if kind == "tweedie" else None, mean=mean, scale=scale)
    theta = from_original(res.params[1:], res.params[0], mean, scale)
    fam = problem.family
    if fam.information == "qr":
        cuts = [0, 1000, 2500, N]  # chunked like the cluster: R factors of chunks, combined
        R = L.qr_combine([L.chunk_qr(X[a:b], y[a:b], mean, scale, w=None if w is None else w[a:b],
                                     offset=None if offset is None else offset[a:b])
                          for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
        n_w = float(N if w is None else w.sum())
        info = {"R": R, "n": n_w, "rows": float(N if w is None else np.count_nonzero(w))}
        # Mean loss at θ from the value kernel: ½ RSS/Σw.
        sums = L.chunk_sums(kind, X, y, theta, mean, scale, w=w, offset=offset)
        loss = float(sums[-2]) / n_w
    else:
        flat = L.chunk_newton(fam, X, y, theta, mean, scale, w=w, offset=offset, fisher=not fam.canonical)
        at = L.newton_layout(problem.n_params, fam.n_y_terms)
        n_w = float(flat[at["n"]][0])
        info = {"gram_sum": flat[at["gram"]].reshape(problem.n_params, problem.n_params), "n": n_w,
                "sum_y": float(flat[at["sum_y"]][0]), "rows": float(flat[at["rows"]][0]),
                "pearson": float(flat[at["pearson"]][0]), "y_terms": flat[at["y_terms"]].copy()}
        loss = float(flat[at["loss"]][0]) / n_w
    info["weighted"], info["offset"] = w is not None, offset is not None
    rec = inference.summarize(problem, info, theta, loss, [f"x{i}" for i in range(D)])
    if "y_terms" in info:  # the same sums straight from the family, the offset included (see offset_wired)
        info = {**info, "y_terms": fam.y_terms(y, offset) @ (np.ones(N) if w is None else w)}
    return rec, res, fam, info


def reorder(v) -> np.ndarray:
    """statsmodels' [const, x...] to our [x..., intercept]."""
    v = np.asarray(v)
    return np.append(v[1:], v[0])


CASES = [("poisson", 1.5), ("gamma", 1.5), ("tweedie", 1.3), ("tweedie", 1.7)]


@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "unweighted"])
@pytest.mark.parametrize(("kind", "power"), CASES, ids=[f"{k}-{p}" for k, p in CASES])
def test_log_link_inference_equals_statsmodels_glm(kind, power, weighted):
    rec, res, fam, info = fit_both(kind, power, weighted)
    assert rec["available"] and rec["statistic_name"] == "z"
    # Same θ, same sums: what differs is statsmodels' IRLS covariance (its last WLS at the converged μ) and
    # summation order over 3000 rows: ~1e-12 relative; the Gram's condition number (~1e3 in original space)
    # amplifies that in the inverse, so 1e-8 relative is a safe bound for errors of a real mistake (≥ 1e-3).
    np.testing.assert_allclose(rec["std_error"], reorder(res.bse), rtol=1e-8)
    np.testing.assert_allclose(rec["statistic"], reorder(res.tvalues), rtol=1e-8)
    # p-values down to ~1e-300 come from the same normal tail; relative 1e-6 absorbs the statistic's 1e-8
    # times |z|² (the log-derivative of the tail) for |z| < 30.
    np.testing.assert_allclose(rec["p_value"], reorder(res.pvalues), rtol=1e-6, atol=1e-300)
    ci = np.asarray(res.conf_int())
    np.testing.assert_allclose(rec["ci_low"], reorder(ci[:, 0]), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(rec["ci_high"], reorder(ci[:, 1]), rtol=1e-8, atol=1e-10)
    # Deviance and Pearson's χ² are sums of 3000 positive O(1) terms evaluated at the same μ: 1e-10 relative.
    assert rec["deviance"] == pytest.approx(res.deviance, rel=1e-10)
    assert rec["dispersion"] == pytest.approx(res.scale, rel=1e-10)
    assert rec["df_resid"] == res.df_resid == N - D - 1
    # statsmodels' null model is fitted with the offset (to its IRLS tolerance, 1e-13 in the deviance):
    # ours is its closed form from the offset's weighted sums; 1e-9 relative.
    assert fam.null_deviance(info) == pytest.approx(res.null_deviance, rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels warns about Tweedie's approximate likelihood / aic
        sm_aic = res.aic
    if math.isnan(rec["aic"]):  # only where statsmodels' likelihood needs per-row terms no pass collects
        assert kind == "tweedie" or (kind == "gamma" and weighted), (kind, weighted, sm_aic)
    else:
        # llf is the deviance plus sums of y-only terms (~1e4 in size): 1e-10 relative.
        assert rec["aic"] == pytest.approx(sm_aic, rel=1e-10)


@pytest.mark.parametrize("kind", ["poisson", "gamma", "tweedie"])
def test_log_link_null_deviance_without_offset(kind):
    """Without an offset statsmodels' null model is the weighted mean of y, which the y-only sums give."""
    rec, res, _, _ = fit_both(kind, 1.5, weighted=True, with_offset=False, seed=3)
    assert rec["null_deviance"] == pytest.approx(res.null_deviance, rel=1e-10)
    assert rec["deviance"] == pytest.approx(res.deviance, rel=1e-10)


@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "unweighted"])
@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_linear_and_logistic_inference_with_weights_and_offset(kind, weighted):
    rec, res, fam, info = fit_both(kind, weighted=weighted, seed=5)
    assert rec["statistic_name"] == ("t" if kind == "linear" else "z")
    # As above: same θ, different but exact algebra (R⁻¹ from TSQR vs statsmodels' pinv of the normal
    # equations for linear); 1e-8 relative.
    np.testing.assert_allclose(rec["std_error"], reorder(res.bse), rtol=1e-8)
    np.testing.assert_allclose(rec["statistic"], reorder(res.tvalues), rtol=1e-8)
    if kind == "linear":
        # statsmodels GLM Gaussian reports normal p-values; ours are OLS' t (n − p df): compare with t's.
        from scipy import stats
        np.testing.assert_allclose(rec["p_value"], 2 * stats.t.sf(np.abs(reorder(res.tvalues)), res.df_resid),
                                   rtol=1e-6, atol=1e-300)
    else:
        np.testing.assert_allclose(rec["p_value"], reorder(res.pvalues), rtol=1e-6, atol=1e-300)
    assert rec["deviance"] == pytest.approx(res.deviance, rel=1e-10)
    assert rec["dispersion"] == pytest.approx(res.scale, rel=1e-10)
    if kind == "linear":  # TSQR's R of [1 | X | y − offset] holds the null model with the offset: exact
        assert rec["null_deviance"] == pytest.approx(res.null_deviance, rel=1e-9)
    else:  # with an offset the logistic null model needs a fit over the rows, which no pass sum gives
        assert math.isnan(fam.null_deviance(info))


def test_precision_weights_scale_the_information():
    """Doubling every weight is twice the data: the same estimates, standard errors divided by √2 (Poisson,
    φ = 1), and the residual df stay rows − p (precision weights, not frequencies)."""
    X, y, w, offset = data("poisson")
    fam = get_family("poisson")
    mean, scale = X.mean(axis=0), X.std(axis=0)
    problem = Problem.of("poisson", D, mean=mean, scale=scale)
    res = sm.GLM(y, sm.add_constant(X), family=sm.families.Poisson(), offset=offset, var_weights=w).fit(tol=1e-13)
    theta = from_original(res.params[1:], res.params[0], mean, scale)
    at = L.newton_layout(problem.n_params, fam.n_y_terms)
    recs = []
    for ww in (w, 2 * w):
        flat = L.chunk_newton(fam, X, y, theta, mean, scale, w=ww, offset=offset)
        n_w = float(flat[at["n"]][0])
        info = {"gram_sum": flat[at["gram"]].reshape(D + 1, D + 1), "n": n_w, "sum_y": float(flat[at["sum_y"]][0]),
                "rows": float(flat[at["rows"]][0]), "pearson": 0.0, "y_terms": flat[at["y_terms"]], "weighted": True}
        recs.append(inference.summarize(problem, info, theta, float(flat[at["loss"]][0]) / n_w, ["a", "b", "c"]))
    # Doubling weights is exact in floating point, and √2 is correctly rounded: 1e-13 relative.
    np.testing.assert_allclose(np.array(recs[1]["std_error"]) * math.sqrt(2), recs[0]["std_error"], rtol=1e-13)
    assert recs[0]["df_resid"] == recs[1]["df_resid"] == N - D - 1


@pytest.mark.parametrize("kind", ["poisson", "gamma", "tweedie"])
def test_the_newton_pass_gives_the_null_deviance_with_an_offset(kind):
    """The inference record itself (sums from the real kernel) has statsmodels' null deviance."""
    rec, res, _, _ = fit_both(kind, 1.5, weighted=True, with_offset=True, seed=7)
    assert rec["null_deviance"] == pytest.approx(res.null_deviance, rel=1e-9)  # as above
