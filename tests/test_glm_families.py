"""Poisson, Gamma and Tweedie families, and the weighted metrics of every family, against scikit-learn,
closed forms and finite differences."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    d2_tweedie_score,
    log_loss,
    mean_gamma_deviance,
    mean_poisson_deviance,
    mean_squared_error,
    mean_tweedie_deviance,
    r2_score,
    roc_auc_score,
)

from pipeline.families import AUC_BINS, FAMILIES, Z_MAX, Gamma, Poisson, Tweedie, get_family
from pipeline.stats import TargetStats

LOG_FAMILIES = [Poisson(), Gamma(), Tweedie(1.2), Tweedie(1.5), Tweedie(1.8)]
IDS = [repr(f) for f in LOG_FAMILIES]


def draw(fam, n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(z, y) with y in the family's domain: zeros for Poisson/Tweedie, strictly positive for Gamma."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.3, 0.8, n)
    mu = np.exp(z)
    if fam.name == "poisson":
        y = rng.poisson(mu).astype(float)
    elif fam.name == "gamma":
        y = rng.gamma(2.0, mu / 2.0)
    else:  # compound Poisson–Gamma: a Poisson number of Gamma claims, exact zeros included
        y = np.array([rng.gamma(2.0, 0.5, k).sum() for k in rng.poisson(mu)])
    return z, y


def sklearn_mean_deviance(fam, y, mu, w=None):
    if fam.name == "poisson":
        return mean_poisson_deviance(y, mu, sample_weight=w)
    if fam.name == "gamma":
        return mean_gamma_deviance(y, mu, sample_weight=w)
    return mean_tweedie_deviance(y, mu, sample_weight=w, power=fam.power)


# ---------------------------------------------------------------------------- pointwise math


@pytest.mark.parametrize("fam", LOG_FAMILIES, ids=IDS)
def test_loss_is_half_the_unit_deviance_of_sklearn(fam):
    z, y = draw(fam)
    assert fam.name != "tweedie" or (y == 0).any()  # the y = 0 branch of c(y) is exercised
    # Sum of 400 O(1) non-negative terms: relative rounding ~ n·eps ≈ 1e-13; 1e-10 leaves room for sklearn's
    # different but equivalent algebra (xlogy(y, y/μ) vs y log y − y z).
    assert fam.loss(z, y).sum() == pytest.approx(0.5 * len(y) * sklearn_mean_deviance(fam, y, np.exp(z)), rel=1e-10)
    # ℓ = 0 at μ = y (the y-only terms are included); y > 0 so that z = log y exists. Absolute 1e-12: terms
    # of size |y log y| ≤ ~50 cancel to 0 up to a few eps each.
    yp = y[y > 0]
    np.testing.assert_allclose(fam.loss(np.log(yp), yp), 0.0, atol=1e-12)
    assert np.all(fam.loss(z, y) >= -1e-12)


@pytest.mark.parametrize("fam", LOG_FAMILIES, ids=IDS)
def test_derivatives_match_finite_differences(fam):
    z, y = draw(fam, n=60, seed=1)
    h = 1e-5
    # Central differences: truncation ~h²·ℓ'''/6 ≈ 1e-10·e^{2|z|}, rounding ~eps·ℓ/h ≈ 1e-11·ℓ; with |z| < 3
    # and ℓ, ℓ' = O(1..100), a relative 1e-6 (plus 1e-8 absolute near zeros of ℓ') bounds both.
    np.testing.assert_allclose(fam.d1(z, y), (fam.loss(z + h, y) - fam.loss(z - h, y)) / (2 * h), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fam.d2(z, y), (fam.d1(z + h, y) - fam.d1(z - h, y)) / (2 * h), rtol=1e-6, atol=1e-8)
    loss, d1, d2 = fam.derivatives(z, y)
    # The fused version is the same arithmetic (one exp for all three): equal up to the last bit or two.
    np.testing.assert_allclose(loss, fam.loss(z, y), rtol=1e-15, atol=0)
    np.testing.assert_allclose(d1, fam.d1(z, y), rtol=1e-15, atol=0)
    np.testing.assert_allclose(d2, fam.d2(z, y), rtol=1e-15, atol=0)
    assert np.all(d2 > 0)  # convex in z for y ≥ 0


@pytest.mark.parametrize("fam", LOG_FAMILIES, ids=IDS)
def test_closed_forms_of_the_named_families(fam):
    z, y = draw(fam, n=50, seed=2)
    mu = np.exp(z)
    p = fam.power
    if fam.name == "poisson":  # the brief's formulas, written independently of the general Tweedie form
        loss = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)), 0.0) - y - y * z + mu
        d1, d2 = mu - y, mu
    elif fam.name == "gamma":
        loss, d1, d2 = z - np.log(y) + y / mu - 1.0, 1.0 - y / mu, y / mu
    else:
        loss = y ** (2 - p) / ((1 - p) * (2 - p)) - y * mu ** (1 - p) / (1 - p) + mu ** (2 - p) / (2 - p)
        d1 = mu ** (2 - p) - y * mu ** (1 - p)
        d2 = (2 - p) * mu ** (2 - p) + (p - 1) * y * mu ** (1 - p)
    # Same quantities by another route (pow vs exp of a product): relative differences of a few eps, but ℓ
    # cancels terms of size ~|y log y|, so the loss gets an absolute 1e-12 as well.
    np.testing.assert_allclose(fam.loss(z, y), loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fam.d1(z, y), d1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fam.d2(z, y), d2, rtol=1e-12)
    np.testing.assert_allclose(fam.inverse_link(z), mu, rtol=1e-15)
    # Pearson χ² terms (y − μ)²/V(μ) with V(μ) = μᵖ; the expected information μ²⁻ᵖ is ℓ'' at y = μ.
    np.testing.assert_allclose(fam.pearson(z, y), (y - mu) ** 2 / mu**p, rtol=1e-12)
    np.testing.assert_allclose(fam.fisher(z, y), fam.d2(z, mu), rtol=1e-12)


@pytest.mark.parametrize("fam", LOG_FAMILIES, ids=IDS)
def test_residual_fast_path_matches_loss_and_gradient(fam):
    z, y = draw(fam, n=300, seed=3)
    b = 0.25
    acc = np.zeros(2)
    buffers = [np.empty(len(z), dtype=t) for t in fam.buffers]
    zw = z - b
    r = fam.residual(zw, y, b, acc, *buffers)
    # Same per-row arithmetic, summed in the same order: agreement to rounding of a 300-term sum (~1e-13).
    np.testing.assert_allclose(r, fam.d1(z, y), rtol=1e-13, atol=1e-14)
    assert acc[0] == pytest.approx(fam.d1(z, y).sum(), rel=1e-12, abs=1e-12)
    assert acc[1] == pytest.approx(fam.loss(z, y).sum(), rel=1e-12)


@pytest.mark.filterwarnings("error")  # any overflow/underflow/invalid RuntimeWarning fails the test
@pytest.mark.parametrize("fam", LOG_FAMILIES, ids=IDS)
def test_extreme_linear_predictors_are_finite_and_silent(fam):
    z = np.array([-1e4, -800.0, -Z_MAX, 0.0, Z_MAX, 800.0, 1e4])
    y = np.full_like(z, 3.0)
    for v in (*fam.derivatives(z, y), fam.loss(z, y), fam.d1(z, y), fam.d2(z, y), fam.inverse_link(z),
              fam.fisher(z, y), fam.metric_sums(z, y, 3.0), fam.metric_sums(z, y, 3.0, np.ones(7))):
        assert np.all(np.isfinite(v))
    # Pearson terms are silent too, +inf only where the true (y − μ)²/μᵖ exceeds the float range (~1.8e308).
    chi2 = fam.pearson(z, y)
    assert not np.any(np.isnan(chi2)) and np.all(chi2 >= 0)
    zm = np.array([-300.0, 300.0])
    true_log = np.log(np.abs(3.0 - np.exp(zm))) * 2 - fam.power * zm  # log of the exact term
    np.testing.assert_allclose(np.log(fam.pearson(zm, y[:2])), true_log, rtol=1e-12)
    acc = np.zeros(2)
    fam.residual(z.copy(), y, 0.0, acc)
    assert np.all(np.isfinite(acc))
    # The loss grows in both directions up to the clamp (Gamma's only like z: ~700), so a line search
    # rejects such a step.
    loss = fam.loss(z, y)
    assert loss[0] > 100 * loss[3] and loss[-1] > 100 * loss[3]
    # Inside the clamp nothing is approximated: z = ±600 matches the closed form (e^600 is a finite double).
    zz = np.array([-600.0, 600.0])
    np.testing.assert_allclose(fam.d1(zz, y[:2]), np.exp((2 - fam.power) * zz) - 3.0 * np.exp((1 - fam.power) * zz),
                               rtol=1e-12)


def test_all_zero_targets_have_a_finite_null_model_of_zero_loss():
    for fam in (Poisson(), Tweedie(1.5)):
        z0 = fam.null_predictor(0.0)
        assert math.isfinite(z0)
        y = np.zeros(5)
        # ℓ(z0, 0) = e^{(2−p)z0}/(2−p) with z0 = −700: below 1e-150, i.e. 0 for any sum it joins.
        assert np.all(fam.loss(np.full(5, z0), y) < 1e-150)
    for fam in LOG_FAMILIES:  # the intercept-only model predicts the mean
        assert fam.inverse_link(np.array([fam.null_predictor(2.5)]))[0] == pytest.approx(2.5, rel=1e-15)


# ---------------------------------------------------------------------------- target domain & construction


def test_target_domains():
    y = np.array([0.0, 1.0, 2.5, -0.1, np.nan, np.inf])
    np.testing.assert_array_equal(Poisson().invalid_y(y), [False, False, False, True, True, True])
    np.testing.assert_array_equal(Tweedie(1.3).invalid_y(y), [False, False, False, True, True, True])
    np.testing.assert_array_equal(Gamma().invalid_y(y), [True, False, False, True, True, True])
    assert "y ≥ 0" in Poisson().y_domain() and "y > 0" in Gamma().y_domain()
    assert "tweedie" in Gamma().y_advice()
    for fam in LOG_FAMILIES:
        assert fam.checks_y
        assert fam.y_in_domain(None) is None
        assert fam.y_outside_count(TargetStats.of(y[:3])) is None  # a min-decided bound cannot count
    with_zero, positive, negative = (TargetStats.of(np.array(v)) for v in ([0.0, 2.0], [0.5, 2.0], [-1.0, 2.0]))
    assert Poisson().y_in_domain(with_zero) and Tweedie().y_in_domain(with_zero)
    assert not Gamma().y_in_domain(with_zero) and Gamma().y_in_domain(positive)
    assert not any(f.y_in_domain(negative) for f in LOG_FAMILIES)


def test_family_objects():
    assert {"linear", "logistic", "poisson", "gamma", "tweedie"} <= set(FAMILIES)
    assert get_family("tweedie") == Tweedie(1.5) and get_family("tweedie", power=1.3).power == 1.3
    assert get_family("tweedie", power=1.3) == Tweedie(1.3) != Tweedie(1.4)
    assert get_family("poisson", power=1.3) is FAMILIES["poisson"]  # a power means nothing to Poisson
    assert Poisson() == FAMILIES["poisson"] and Poisson() != Gamma() and Tweedie(1.5) != Gamma()
    assert len({Tweedie(1.5), Tweedie(1.5), Tweedie(1.6)}) == 2
    for fam in LOG_FAMILIES:
        again = pickle.loads(pickle.dumps(fam))
        assert again == fam and again.power == fam.power and hash(again) == hash(fam)
        assert fam.curvature_bound is None and fam.gate_metric == "mean_deviance"
        assert fam.auto_solver(10) == "newton" and fam.stat_name == "z"
    assert Poisson().uses_pearson is False and Gamma().uses_pearson and Tweedie().uses_pearson
    for bad in (1.0, 2.0, 0.5, 3.0):
        with pytest.raises(ValueError, match="between 1 and 2"):
            get_family("tweedie", power=bad)
    with pytest.raises(ValueError, match="unknown model"):
        get_family("weibull")


# ---------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("fam", LOG_FAMILIES, ids=IDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_log_link_metrics_match_sklearn(fam, weighted):
    z, y = draw(fam, n=500, seed=4)
    rng = np.random.default_rng(5)
    w = rng.uniform(0.2, 3.0, len(y)) if weighted else None
    center = float(np.average(y, weights=w))
    cuts = [0, 130, 131, 400, 500]  # uneven chunks, one of one row: sums are additive
    sums = sum(fam.metric_sums(z[a:b], y[a:b], center, None if w is None else w[a:b])
               for a, b in zip(cuts[:-1], cuts[1:], strict=True))
    n = len(y) if w is None else float(w.sum())
    got = fam.metrics(sums, n)
    mu = np.exp(z)
    # Sums of 500 O(1) terms, ours in chunks: relative rounding ≲ 1e-13; 1e-10 covers sklearn's different
    # algebra of the same deviance.
    assert got["mean_deviance"] == pytest.approx(sklearn_mean_deviance(fam, y, mu, w), rel=1e-10)
    assert got["deviance"] == pytest.approx(got["mean_deviance"] * n, rel=1e-14)
    # D²: sklearn's null model predicts the weighted mean of y, as ours (center) does.
    assert got["d2"] == pytest.approx(d2_tweedie_score(y, mu, sample_weight=w, power=fam.power), rel=1e-9)
    assert got["null_deviance"] == pytest.approx(sklearn_mean_deviance(fam, y, np.full_like(y, center), w) * n,
                                                 rel=1e-10)


def linear_logistic_data(seed: int = 6, n: int = 700):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y_lin = z + rng.normal(0.0, 1.0, n)
    y_log = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-z))).astype(float)
    return z, y_lin, y_log, rng.uniform(0.1, 4.0, n)


def test_weighted_linear_metrics_match_sklearn():
    z, y, _, w = linear_logistic_data()
    center = float(np.average(y, weights=w))
    got = FAMILIES["linear"].metrics(FAMILIES["linear"].metric_sums(z, y, center, w), float(w.sum()))
    # Weighted sums of 700 O(1..10) squares: relative rounding ~1e-13.
    assert got["mse"] == pytest.approx(mean_squared_error(y, z, sample_weight=w), rel=1e-10)
    assert got["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, z, sample_weight=w)), rel=1e-10)
    assert got["r2"] == pytest.approx(r2_score(y, z, sample_weight=w), rel=1e-10)


def test_weighted_logistic_metrics_match_sklearn():
    z, _, y, w = linear_logistic_data()
    fam = FAMILIES["logistic"]
    center = float(np.average(y, weights=w))
    got = fam.metrics(sum(fam.metric_sums(z[a:a + 100], y[a:a + 100], center, w[a:a + 100])
                          for a in range(0, 700, 100)), float(w.sum()))
    p = 1.0 / (1.0 + np.exp(-z))
    # |z| < ~8: sklearn's log(1 − p) loses ~eps·e^|z| ≈ 1e-12 relative; 1e-9 covers it.
    assert got["log_loss"] == pytest.approx(log_loss(y, p, sample_weight=w), rel=1e-9)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, p > 0.5, sample_weight=w), rel=1e-12)
    exact = roc_auc_score(y, z, sample_weight=w)
    # The histogram AUC is exact up to ties within a bin, which its own bound covers (plus float rounding).
    assert abs(got["roc_auc"] - exact) <= got["roc_auc_max_error"] + 1e-12
    assert got["roc_auc_max_error"] < 1e-2


def test_unweighted_linear_and_logistic_metric_sums_are_unchanged_bit_for_bit():
    """w=None keeps the arithmetic of the unweighted code (the formulas below are the previous release's)."""
    z, y_lin, y_log, _ = linear_logistic_data(seed=9)
    r, c = z - y_lin, y_lin - y_lin.mean()
    np.testing.assert_array_equal(FAMILIES["linear"].metric_sums(z, y_lin, y_lin.mean()),
                                  np.array([0.5 * (r @ r), 0.5 * (c @ c)]))
    fam = FAMILIES["logistic"]
    center = y_log.mean()
    z0 = np.full_like(z, math.log(center / (1 - center)))
    zc = np.clip(z, -32.0, 32.0)
    idx = np.minimum(((zc + 32.0) * (AUC_BINS / 64.0)).astype(np.int64), AUC_BINS - 1)
    old = np.concatenate([[(np.logaddexp(0.0, z) - y_log * z).sum(), (np.logaddexp(0.0, z0) - y_log * z0).sum(),
                           np.count_nonzero((z > 0) == (y_log > 0.5))],
                          np.bincount(idx[y_log == 1], minlength=AUC_BINS),
                          np.bincount(idx[y_log == 0], minlength=AUC_BINS)]).astype(float)
    np.testing.assert_array_equal(fam.metric_sums(z, y_log, center), old)
    # Unit weights are the unweighted metrics (up to rounding of w @ v vs v.sum(): ~n·eps relative).
    np.testing.assert_allclose(fam.metric_sums(z, y_log, center, np.ones_like(z)), old, rtol=1e-12)
