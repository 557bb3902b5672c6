"""The scikit-learn style GLM estimators (pipeline/estimators.py) against independent fits: statsmodels GLM
(coefficients, standard errors and p-values with weights and an offset), glum (elastic net), scikit-learn
(PoissonRegressor, Lasso, ElasticNet, LinearRegression, LogisticRegression, d2_tweedie_score), plus the
sklearn protocol (clone, get/set_params, cross_val_score) and the errors for bad input.

All fits run in-process (NumPy input), so no cluster is started."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from sklearn.base import clone
from sklearn.metrics import d2_tweedie_score, r2_score
from sklearn.model_selection import cross_val_score

from pipeline.errors import GradpipeError
from pipeline.estimators import (
    GammaRegressor,
    LinearRegression,
    LogisticRegression,
    PoissonRegressor,
    TweedieRegressor,
)

N, D = 600, 5
BETA = np.array([0.25, -0.12, 0.0, 0.3, 0.0])  # two true zeros, for the elastic-net zero pattern


def glm_data(kind: str, seed: int = 0, power: float = 1.5):
    """(X, y, w, offset) with features on different scales and means (the standardization must undo them)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D)) * [1.0, 2.0, 0.5, 1.5, 3.0] + [0.0, 1.0, -1.0, 0.5, 2.0]
    offset = rng.normal(0.0, 0.3, N)
    w = rng.uniform(0.5, 2.0, N)
    mu = np.exp(0.2 + X @ BETA + offset)
    if kind == "poisson":
        y = rng.poisson(mu).astype(float)
    elif kind == "gamma":
        y = rng.gamma(2.0, mu / 2.0)
    else:  # compound Poisson–Gamma of power p, φ = 1 (zeros where the Poisson count is 0)
        lam, k, theta = mu ** (2 - power) / (2 - power), (2 - power) / (power - 1), (power - 1) * mu ** (power - 1)
        c = rng.poisson(lam)
        y = np.where(c > 0, rng.gamma(np.maximum(c, 1) * k, theta), 0.0)
    return X, y, w, offset


def statsmodels_family(kind: str, power: float = 1.5):
    log = sm.families.links.Log()
    if kind == "poisson":
        return sm.families.Poisson(log)
    if kind == "gamma":
        return sm.families.Gamma(log)
    return sm.families.Tweedie(var_power=power, link=log)


def estimator(kind: str, power: float = 1.5, **params):
    if kind == "poisson":
        return PoissonRegressor(**params)
    if kind == "gamma":
        return GammaRegressor(**params)
    return TweedieRegressor(power=power, **params)


def params_of(est) -> np.ndarray:
    return np.append(est.coef_, est.intercept_)  # statsmodels' order: the constant last


KINDS = ["poisson", "gamma", "tweedie"]


@pytest.fixture(scope="module")
def unpenalized():
    """One weighted, offset fit per family (ours and statsmodels'), shared by the tests below."""
    fits = {}
    for kind in KINDS:
        X, y, w, off = glm_data(kind, seed=KINDS.index(kind))
        ours = estimator(kind).fit(X, y, sample_weight=w, offset=off)
        ref = sm.GLM(y, sm.add_constant(X, prepend=False), family=statsmodels_family(kind), offset=off,
                     var_weights=w).fit(tol=1e-13)
        fits[kind] = (ours, ref, (X, y, w, off))
    return fits


@pytest.mark.parametrize("kind", KINDS)
def test_unpenalized_fit_matches_statsmodels(unpenalized, kind):
    ours, ref, _ = unpenalized[kind]
    assert ours.status_ != "max_iter"
    # Both are Newton/IRLS fits stopped near machine precision of the loss (ours: relative change 1e-12, so
    # θ is within ~sqrt(1e-12)·cond ≈ 1e-9 of the optimum; measured 4e-10): 1e-8 relative is the bar.
    np.testing.assert_allclose(params_of(ours), ref.params, rtol=1e-8)
    # standard errors from the expected information φ·(XᵀWX)⁻¹ with φ = Pearson χ²/df (1 for Poisson), as
    # statsmodels does: they inherit the coefficients' 1e-9 error through W (measured 5e-10)
    np.testing.assert_allclose(ours.inference_["dispersion"], ref.scale, rtol=1e-8)
    np.testing.assert_allclose(ours.bse_, ref.bse, rtol=1e-8)
    # p = 2Φ(−|t|): d log p/dt ≈ −t, so a 1e-9 relative error of t = β/se becomes ~|t|·1e-9·|t| in p for
    # |t| up to ~30 here (measured 2e-8): 1e-6 relative
    np.testing.assert_allclose(ours.pvalues_, ref.pvalues, rtol=1e-6, atol=1e-300)
    np.testing.assert_allclose(ours.tvalues_, ref.tvalues, rtol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_predict_with_offset_and_d2_score(unpenalized, kind):
    ours, _, (X, y, w, off) = unpenalized[kind]
    p = ours.power if kind == "tweedie" else {"poisson": 1.0, "gamma": 2.0}[kind]
    mu = np.exp(X @ ours.coef_ + ours.intercept_ + off)
    np.testing.assert_allclose(ours.predict(X, offset=off), mu, rtol=1e-14)  # one exp, the same dot product
    np.testing.assert_allclose(ours.predict(X), np.exp(X @ ours.coef_ + ours.intercept_), rtol=1e-14)
    # D² from our family losses vs sklearn's deviances: sums of 600 O(1) terms, 1e-10 relative
    np.testing.assert_allclose(ours.score(X, y, offset=off), d2_tweedie_score(y, mu, power=p), rtol=1e-10)
    np.testing.assert_allclose(ours.score(X, y, sample_weight=w, offset=off),
                               d2_tweedie_score(y, mu, sample_weight=w, power=p), rtol=1e-10)


def glum_params(kind: str, X, y, w, off, alpha: float, l1_ratio: float, power: float = 1.5) -> np.ndarray:
    from glum import GeneralizedLinearRegressor, TweedieDistribution

    family = TweedieDistribution(power) if kind == "tweedie" else kind
    m = GeneralizedLinearRegressor(family=family, link="log", alpha=alpha, l1_ratio=l1_ratio, gradient_tol=1e-13,
                                   max_iter=1000, solver="irls-cd").fit(X, y, sample_weight=w, offset=off)
    return np.append(m.coef_, m.intercept_)


@pytest.mark.parametrize("kind", KINDS)
def test_elastic_net_matches_glum(kind):
    """glum minimizes Σw·dev/(2Σw) + α·ρ‖β‖₁ + α(1−ρ)/2‖β‖² on the raw features (scale_predictors=False):
    the same objective as alpha/l1_ratio here."""
    X, y, w, off = glm_data(kind, seed=10 + KINDS.index(kind))
    alpha, l1_ratio = {"poisson": 0.02, "gamma": 0.02, "tweedie": 0.08}[kind], 0.5  # each zeroes some β_j
    ref = glum_params(kind, X, y, w, off, alpha, l1_ratio)
    ours = estimator(kind, alpha=alpha, l1_ratio=l1_ratio).fit(X, y, sample_weight=w, offset=off)
    got = params_of(ours)
    assert 0 < np.sum(ref[:-1] == 0.0) < D  # the penalty zeroes some coefficients, not all
    np.testing.assert_array_equal(got[:-1] == 0.0, ref[:-1] == 0.0)  # exact zeros in the same places
    # glum stops on its gradient_tol 1e-13, we on a min-norm subgradient: measured 2e-14 (Poisson, Gamma) and
    # 3e-10 (Tweedie, where glum's gradient scaling stops it earlier) relative to max|β|; 1e-8 is the bar
    assert np.max(np.abs(got - ref)) < 1e-8 * np.max(np.abs(ref))
    assert ours.bse_ is None and not ours.inference_["available"]  # no p-values for a penalized fit


def test_ridge_poisson_matches_sklearn_poisson_regressor():
    from sklearn.linear_model import PoissonRegressor as SkPoisson

    X, y, w, _ = glm_data("poisson", seed=20)
    a = 0.05
    ref = SkPoisson(alpha=a, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(X, y, sample_weight=w)
    ours = PoissonRegressor(l2=a).fit(X, y, sample_weight=w)
    # both Newton to a 1e-12 tolerance on a strongly convex objective (measured 2e-16 apart): 1e-10
    np.testing.assert_allclose(params_of(ours), np.append(ref.coef_, ref.intercept_), rtol=1e-10, atol=1e-12)
    alt = PoissonRegressor(alpha=a, l1_ratio=0.0).fit(X, y, sample_weight=w)  # alpha·(1 − 0) is the same l2
    np.testing.assert_allclose(params_of(alt), params_of(ours), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_fit_statistics_and_zero_weight_rows_match_statsmodels(kind):
    """A row of weight 0 counts for nothing, so the fit equals statsmodels' on the other rows (its residual
    degrees of freedom too); deviance and the weighted Poisson AIC as statsmodels reports them."""
    X, y, w, off = glm_data(kind, seed=60 + KINDS.index(kind))
    w[::13] = 0.0
    ours = estimator(kind).fit(X, y, sample_weight=w, offset=off)
    keep = w > 0
    ref = sm.GLM(y[keep], sm.add_constant(X[keep], prepend=False), family=statsmodels_family(kind), offset=off[keep],
                 var_weights=w[keep]).fit(tol=1e-13)
    inf = ours.inference_
    assert (inf["n"], inf["df_resid"]) == (ref.nobs, ref.df_resid)
    np.testing.assert_allclose(params_of(ours), ref.params, rtol=1e-8)  # as in the full-weight comparison
    np.testing.assert_allclose(ours.bse_, ref.bse, rtol=1e-8)
    # deviances: sums of ~550 O(1) terms at optima 1e-10 apart (first order in the error vanishes there)
    np.testing.assert_allclose(inf["deviance"], ref.deviance, rtol=1e-10)
    if kind == "poisson":  # weighted AIC: statsmodels' Σw(y log μ − μ − log y!) from the y-only sums
        np.testing.assert_allclose(inf["aic"], ref.aic, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_null_deviance_without_offset_matches_statsmodels(kind):
    X, y, w, _ = glm_data(kind, seed=70 + KINDS.index(kind))
    ours = estimator(kind).fit(X, y, sample_weight=w)
    ref = sm.GLM(y, sm.add_constant(X, prepend=False), family=statsmodels_family(kind), var_weights=w).fit(tol=1e-13)
    # a closed form (weighted mean of y) vs statsmodels' intercept-only IRLS fit: 1e-10 relative
    np.testing.assert_allclose(ours.inference_["null_deviance"], ref.null_deviance, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_null_deviance_with_offset_matches_statsmodels(unpenalized, kind):
    """statsmodels' (and R's) null model is the intercept alone fitted *with* the offset."""
    ours, ref, _ = unpenalized[kind]
    np.testing.assert_allclose(ours.inference_["null_deviance"], ref.null_deviance, rtol=1e-10)  # as above


def test_gamma_unweighted_aic_matches_statsmodels():
    X, y, _, off = glm_data("gamma", seed=63)
    ours = GammaRegressor().fit(X, y, offset=off)
    ref = sm.GLM(y, sm.add_constant(X, prepend=False), family=statsmodels_family("gamma"), offset=off).fit(tol=1e-13)
    # the log-likelihood at φ = Pearson χ²/df: ~1e3 in size, from sums of 600 terms; 1e-10 relative
    np.testing.assert_allclose(ours.inference_["aic"], ref.aic, rtol=1e-10)


# ---- linear and logistic ------------------------------------------------------------------------------------
def linear_data(seed: int = 30, n: int = 400):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)) * [1.0, 3.0, 0.2, 1.0, 2.0, 1.0] + [1.0, 0.0, 2.0, -1.0, 0.0, 4.0]
    y = X @ np.array([1.5, 0.0, 2.0, -0.7, 0.0, 0.1]) + 0.5 + rng.normal(0, 1.0, n)
    return X, y, rng.uniform(0.2, 3.0, n)


def test_linear_lasso_and_elastic_net_match_sklearn():
    from sklearn.linear_model import ElasticNet, Lasso

    X, y, _ = linear_data()
    ref = Lasso(alpha=0.1, tol=1e-14, max_iter=100_000).fit(X, y)
    ours = LinearRegression(l1=0.1).fit(X, y)
    np.testing.assert_array_equal(ours.coef_ == 0.0, ref.coef_ == 0.0)
    assert 0 < np.sum(ref.coef_ == 0.0) < 6
    # sklearn's coordinate descent to a duality gap of 1e-14 vs our exact support solve (measured 4e-15 apart);
    # the bar 1e-10 leaves room for a different BLAS
    np.testing.assert_allclose(params_of(ours), np.append(ref.coef_, ref.intercept_), rtol=1e-10, atol=1e-10)

    ref = ElasticNet(alpha=0.2, l1_ratio=0.6, tol=1e-14, max_iter=100_000).fit(X, y)
    ours = LinearRegression(alpha=0.2, l1_ratio=0.6).fit(X, y)
    np.testing.assert_array_equal(ours.coef_ == 0.0, ref.coef_ == 0.0)
    np.testing.assert_allclose(params_of(ours), np.append(ref.coef_, ref.intercept_), rtol=1e-10, atol=1e-10)


def test_weighted_lasso_matches_sklearn():
    """sklearn's Lasso rescales sample_weight to sum n, so it minimizes Σw r²/(2Σw) + α‖β‖₁: ours with l1=α."""
    from sklearn.linear_model import Lasso

    X, y, w = linear_data(seed=35)
    ref = Lasso(alpha=0.08, tol=1e-14, max_iter=100_000).fit(X, y, sample_weight=w)
    ours = LinearRegression(l1=0.08).fit(X, y, sample_weight=w)
    assert 0 < np.sum(ref.coef_ == 0.0) < 6
    np.testing.assert_array_equal(ours.coef_ == 0.0, ref.coef_ == 0.0)
    # as for the unweighted Lasso: coordinate descent to a 1e-14 duality gap vs our exact support solve
    np.testing.assert_allclose(params_of(ours), np.append(ref.coef_, ref.intercept_), rtol=1e-10, atol=1e-10)


def test_weighted_linear_and_logistic_match_sklearn():
    from sklearn.linear_model import LinearRegression as SkLinear
    from sklearn.linear_model import LogisticRegression as SkLogistic

    X, y, w = linear_data(seed=31)
    ref = SkLinear().fit(X, y, sample_weight=w)
    ours = LinearRegression().fit(X, y, sample_weight=w)
    # weighted least squares: our TSQR vs sklearn's lstsq, both backward stable on a well-conditioned X
    # (measured 7e-15 apart): 1e-10
    np.testing.assert_allclose(params_of(ours), np.append(ref.coef_, ref.intercept_), rtol=1e-10, atol=1e-10)

    rng = np.random.default_rng(32)
    yb = np.where(rng.random(len(y)) < 1 / (1 + np.exp(-(X[:, 0] - X[:, 2] + 0.3))), "yes", "no")
    lam = 0.01
    # sklearn: C·Σwℓ + ½‖β‖²; ours: Σwℓ/Σw + (λ/2)‖β‖², the same minimizer for C = 1/(λΣw)
    ref = SkLogistic(C=1.0 / (lam * w.sum()), solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(
        X, yb, sample_weight=w)
    ours = LogisticRegression(l2=lam).fit(X, yb, sample_weight=w)
    assert list(ours.classes_) == list(ref.classes_)
    # two Newton fits to 1e-12 of a strongly convex objective (measured 3e-15 apart): 1e-10
    np.testing.assert_allclose(params_of(ours), np.append(ref.coef_[0], ref.intercept_[0]), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))


def test_linear_and_logistic_predict_take_the_offset():
    X, y, w = linear_data(seed=33)
    off = np.random.default_rng(34).normal(0, 2.0, len(y))
    lin = LinearRegression().fit(X, y + off, offset=off)
    ref = LinearRegression().fit(X, y)  # an offset in y and z cancels: the same coefficients
    np.testing.assert_allclose(params_of(lin), params_of(ref), rtol=1e-10, atol=1e-10)  # two exact LS solves
    np.testing.assert_allclose(lin.predict(X, offset=off), X @ lin.coef_ + lin.intercept_ + off, rtol=1e-14)
    np.testing.assert_allclose(lin.score(X, y + off, offset=off), r2_score(y + off, lin.predict(X, offset=off)),
                               rtol=1e-12)  # the same sums in another order

    yb = (y > np.median(y)).astype(int)
    log = LogisticRegression(l2=0.01).fit(X, yb, offset=off)
    z = X @ log.coef_ + log.intercept_ + off
    np.testing.assert_allclose(log.predict_proba(X, offset=off)[:, 1], 1 / (1 + np.exp(-z)), rtol=1e-13)
    np.testing.assert_array_equal(log.predict(X, offset=off), (z > 0).astype(int))
    assert log.score(X, yb, offset=off) == np.mean((z > 0) == yb)


# ---- the scikit-learn protocol --------------------------------------------------------------------------------
def test_clone_and_params_keep_power_and_penalty():
    est = TweedieRegressor(power=1.3, alpha=0.05, l1_ratio=0.25)
    params = est.get_params()
    assert (params["power"], params["alpha"], params["l1_ratio"], params["l1"]) == (1.3, 0.05, 0.25, 0.0)
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    twin.set_params(power=1.7, l1=0.01, alpha=None, l1_ratio=None)
    assert (twin.power, twin.l1, twin.alpha) == (1.7, 0.01, None) and est.power == 1.3
    assert clone(twin).get_params()["power"] == 1.7
    assert clone(PoissonRegressor(l1=0.02)).get_params()["l1"] == 0.02


def test_cross_val_score_runs_on_d2():
    X, y, _, _ = glm_data("tweedie", seed=40, power=1.3)
    scores = cross_val_score(TweedieRegressor(power=1.3, alpha=0.01, l1_ratio=0.5), X, y, cv=3)
    assert scores.shape == (3,) and np.all(np.isfinite(scores)) and np.all(scores < 1.0)


def test_tweedie_power_is_used_by_the_fit():
    """A different power is a different objective: the fit must follow statsmodels at p = 1.3 too."""
    X, y, w, off = glm_data("tweedie", seed=41, power=1.3)
    ours = TweedieRegressor(power=1.3).fit(X, y, sample_weight=w, offset=off)
    ref = sm.GLM(y, sm.add_constant(X, prepend=False), family=statsmodels_family("tweedie", 1.3), offset=off,
                 var_weights=w).fit(tol=1e-13)
    np.testing.assert_allclose(params_of(ours), ref.params, rtol=1e-8)  # as in the p = 1.5 comparison


# ---- bad input ------------------------------------------------------------------------------------------------
def test_negative_target_for_poisson_names_the_domain():
    X, y, _, _ = glm_data("poisson", seed=50)
    y[7] = -1.0
    with pytest.raises((ValueError, GradpipeError), match=r"non-negative values \(y ≥ 0\)"):
        PoissonRegressor().fit(X, y)


def test_zero_target_for_gamma_names_the_domain():
    X, y, _, _ = glm_data("gamma", seed=51)
    y[3] = 0.0
    with pytest.raises((ValueError, GradpipeError), match=r"positive values \(y > 0\)"):
        GammaRegressor().fit(X, y)


def test_negative_sample_weight_is_refused():
    X, y, w, _ = glm_data("poisson", seed=52)
    w[5] = -0.5
    with pytest.raises(ValueError, match=r"weights ≥ 0"):
        PoissonRegressor().fit(X, y, sample_weight=w)


def test_alpha_together_with_l1_is_refused():
    X, y, _, _ = glm_data("poisson", seed=54)
    with pytest.raises(ValueError, match=r"--alpha.*either"):
        PoissonRegressor(alpha=0.1, l1_ratio=0.5, l1=0.01).fit(X, y)


def test_bad_power_is_a_value_error_at_fit():
    X, y, _, _ = glm_data("tweedie", seed=53)
    with pytest.raises(ValueError, match=r"--power.*between 1 and 2"):
        TweedieRegressor(power=2.5).fit(X, y)
