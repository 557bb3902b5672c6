"""Independent checks of the GLM families (pipeline/families.py) against scikit-learn, closed forms and
finite differences: losses, derivatives, the fused kernel step, expected information, numerical stability,
target domains, weighted metrics and the errors for a bad Tweedie power."""

from __future__ import annotations

import types
import warnings

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

from pipeline.config import TrainConfig
from pipeline.data_checks import check_target_domain
from pipeline.errors import GradpipeError
from pipeline.families import Binomial, Gamma, Gaussian, Poisson, Tweedie, expit, get_family
from pipeline.stats import TargetStats

LOG_LINK = [Poisson(), Gamma(), Tweedie(1.2), Tweedie(1.5), Tweedie(1.8)]
ALL = [Gaussian(), Binomial(), *LOG_LINK]


def ids(fam) -> str:
    return f"{fam.name}-{fam.power:g}" if hasattr(fam, "power") else fam.name


def sample(fam, n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(z, y) with y drawn from the family at mean e^z: Poisson counts, Gamma, compound Poisson–Gamma."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.3, 0.7, n)
    mu = np.exp(z)
    if isinstance(fam, Gaussian):
        return z, z + rng.normal(size=n)
    if isinstance(fam, Binomial):
        return z, (rng.random(n) < expit(z)).astype(float)
    if isinstance(fam, Poisson):
        return z, rng.poisson(mu).astype(float)
    if isinstance(fam, Gamma):
        return z, rng.gamma(2.0, mu / 2.0)
    # Tweedie(p), φ = 1: N ~ Poisson(λ), each of N Gamma(k, θ) with λ = μ^{2−p}/(2−p), k = (2−p)/(p−1),
    # θ = (p−1)μ^{p−1}; the sum has zeros where N = 0
    p = fam.power
    lam, k, theta = mu ** (2 - p) / (2 - p), (2 - p) / (p - 1), (p - 1) * mu ** (p - 1)
    counts = rng.poisson(lam)
    y = np.where(counts > 0, rng.gamma(np.maximum(counts, 1) * k, theta), 0.0)
    return z, y


def sklearn_mean_deviance(fam, y, mu, w=None) -> float:
    if isinstance(fam, Poisson):
        return mean_poisson_deviance(y, mu, sample_weight=w)
    if isinstance(fam, Gamma):
        return mean_gamma_deviance(y, mu, sample_weight=w)
    return mean_tweedie_deviance(y, mu, sample_weight=w, power=fam.power)


# ---- pointwise math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", LOG_LINK, ids=ids)
def test_loss_is_half_of_sklearn_unit_deviance(fam):
    z, y = sample(fam)
    assert isinstance(fam, Gamma) or np.any(y == 0)  # the y = 0 branch of c(y) is exercised
    # rtol: both sum ~500 O(1) terms in float64; the only difference is the order of additions (~1e-13)
    np.testing.assert_allclose(fam.loss(z, y).sum(), 0.5 * len(y) * sklearn_mean_deviance(fam, y, np.exp(z)),
                               rtol=1e-11)
    # ℓ = 0 at μ = y (the unit deviance's zero) for y > 0
    ypos = y[y > 0]
    np.testing.assert_allclose(fam.loss(np.log(ypos), ypos), 0.0, atol=1e-12)


@pytest.mark.parametrize("fam", ALL, ids=ids)
def test_derivatives_match_central_differences(fam):
    z, y = sample(fam, n=200, seed=1)
    h = 1e-5
    # central differences: truncation h²·ℓ'''/6 ~ 1e-10·μ and rounding eps·ℓ/h ~ 1e-11: 1e-6 relative is ample
    fd1 = (fam.loss(z + h, y) - fam.loss(z - h, y)) / (2 * h)
    fd2 = (fam.d1(z + h, y) - fam.d1(z - h, y)) / (2 * h)
    np.testing.assert_allclose(fam.d1(z, y), fd1, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fam.d2(z, y), fd2, rtol=1e-6, atol=1e-8)
    loss, d1, d2 = fam.derivatives(z, y)
    # the same arithmetic fused: agreement to rounding (a shared exp may round differently, 1 ulp)
    np.testing.assert_allclose(loss, fam.loss(z, y), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(d1, fam.d1(z, y), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(d2, fam.d2(z, y), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("fam", LOG_LINK, ids=ids)
def test_log_link_derivatives_closed_forms(fam):
    """ℓ' = μ^{1−p}(μ − y), ℓ'' = μ^{1−p}((2−p)μ − (1−p)y), written from the Tweedie deviance directly."""
    z, y = sample(fam, n=300, seed=2)
    mu, p = np.exp(z), fam.power
    np.testing.assert_allclose(fam.d1(z, y), mu ** (1 - p) * (mu - y), rtol=1e-12, atol=1e-14)  # 2 exps vs pow
    np.testing.assert_allclose(fam.d2(z, y), mu ** (1 - p) * ((2 - p) * mu - (1 - p) * y), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fam.inverse_link(z), mu, rtol=1e-15)


@pytest.mark.parametrize("fam", ALL, ids=ids)
def test_residual_fused_step_matches_loss_and_gradient(fam):
    z, y = sample(fam, n=300, seed=3)
    b = 0.125
    zb = z.copy()
    acc = np.zeros(2)
    buffers = [np.empty(len(z), dtype=dt) for dt in fam.buffers]
    r = fam.residual(zb, y, b, acc, *buffers)
    # same math in another order of operations (in-place, buffers): a few ulps per row
    np.testing.assert_allclose(r, fam.d1(z + b, y), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(acc[0], fam.d1(z + b, y).sum(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc[1], fam.loss(z + b, y).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fam", LOG_LINK, ids=ids)
def test_fisher_is_expected_hessian(fam):
    z, y = sample(fam, n=200, seed=4)
    mu = np.exp(z)
    # closed form: E[ℓ''] = μ^{2−p}
    np.testing.assert_allclose(fam.fisher(z, y), mu ** (2 - fam.power), rtol=1e-13)
    # ℓ'' is affine in y, so E[ℓ''] = ℓ''(z, E y) = ℓ''(z, μ)
    np.testing.assert_allclose(fam.fisher(z, y), fam.d2(z, mu), rtol=1e-13)
    assert fam.canonical == isinstance(fam, Poisson)


def test_fisher_by_monte_carlo_for_gamma_and_tweedie():
    for fam in (Gamma(), Tweedie(1.5)):
        n = 200_000
        z = np.full(n, 0.4)
        rng = np.random.default_rng(5)
        mu = np.exp(0.4)
        if isinstance(fam, Gamma):
            y = rng.gamma(2.0, mu / 2.0, n)
        else:
            p = fam.power
            lam, k, theta = mu ** (2 - p) / (2 - p), (2 - p) / (p - 1), (p - 1) * mu ** (p - 1)
            c = rng.poisson(lam, n)
            y = np.where(c > 0, rng.gamma(np.maximum(c, 1) * k, theta), 0.0)
        d2 = fam.d2(z, y)
        se = d2.std() / np.sqrt(n)
        # the Monte Carlo mean is within 5 standard errors of E[ℓ''] (a 6e-7 chance for a fresh seed; this one is fixed)
        assert abs(d2.mean() - fam.fisher(z[:1], y[:1])[0]) < 5 * se


def test_fisher_of_canonical_families_is_the_hessian():
    for fam in (Gaussian(), Binomial(), Poisson()):
        z, y = sample(fam, n=100, seed=6)
        np.testing.assert_array_equal(fam.fisher(z, y), fam.d2(z, y))


# ---- stability ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", ALL, ids=ids)
def test_extreme_linear_predictors_are_finite_and_silent(fam):
    z = np.array([-1e4, -700.0, -50.0, 0.0, 50.0, 700.0, 1e4])
    if isinstance(fam, Binomial):
        ys = [0.0, 1.0]
    elif isinstance(fam, Gamma):
        ys = [1e-3, 1.0, 7.5]
    elif isinstance(fam, Gaussian):
        ys = [-3.0, 0.0, 3.0]
    else:
        ys = [0.0, 1.0, 7.5]  # y = 0: the Poisson/Tweedie branch without log y
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for yv in ys:
            y = np.full_like(z, yv)
            outs = [fam.loss(z, y), fam.d1(z, y), fam.d2(z, y), fam.fisher(z, y), *fam.derivatives(z, y),
                    fam.inverse_link(z)]
            zb = z.copy()
            acc = np.zeros(2)
            outs.append(fam.residual(zb, y, 0.0, acc, *[np.empty(len(z), dtype=dt) for dt in fam.buffers]))
            outs.append(acc)
            outs.append(fam.metric_sums(z, y, center=max(yv, 1e-3) if fam.y_lower is not None else 0.5))
            if fam.y_lower is not None:  # log link: its Pearson terms (the dispersion) may be +inf, silently
                fam.pearson(z, y)
            for out in outs:
                assert np.all(np.isfinite(out)), (fam, yv, out)


# ---- target domains --------------------------------------------------------------------------------------
def test_invalid_y_masks():
    y = np.array([-1.0, 0.0, 0.5, 2.0, np.nan, np.inf])
    np.testing.assert_array_equal(Poisson().invalid_y(y), [True, False, False, False, True, True])
    np.testing.assert_array_equal(Tweedie(1.4).invalid_y(y), [True, False, False, False, True, True])
    np.testing.assert_array_equal(Gamma().invalid_y(y), [True, True, False, False, True, True])
    np.testing.assert_array_equal(Binomial().invalid_y(y), [True, False, True, True, True, True])
    assert Poisson().checks_y and Gamma().checks_y and not Gaussian().checks_y


def _summary_info(y: np.ndarray | None, target: str = "claims"):
    return types.SimpleNamespace(target_stats=None if y is None else TargetStats.of(y), target=target)


def test_check_target_domain_refuses_out_of_domain_targets():
    ok = np.array([0.0, 1.0, 3.0])
    assert check_target_domain(_summary_info(ok), Poisson()) is True
    assert check_target_domain(_summary_info(ok), Tweedie(1.5)) is True
    assert check_target_domain(_summary_info(None), Poisson()) is False  # no summary: a pass must decide
    with pytest.raises(GradpipeError, match=r"poisson needs non-negative values \(y ≥ 0\).*'claims'.*min -2"):
        check_target_domain(_summary_info(np.array([1.0, -2.0, 3.0])), Poisson())
    with pytest.raises(GradpipeError, match=r"gamma needs positive values \(y > 0\).*min 0"):
        check_target_domain(_summary_info(ok), Gamma())
    assert check_target_domain(_summary_info(ok + 0.5), Gamma()) is True
    with pytest.raises(GradpipeError, match=r"tweedie needs non-negative values"):
        check_target_domain(_summary_info(np.array([-0.1, 2.0])), Tweedie(1.5))


# ---- metrics -----------------------------------------------------------------------------------------
def _weights(n: int, seed: int = 7) -> np.ndarray:
    w = np.random.default_rng(seed).uniform(0.2, 3.0, n)
    w[::17] = 0.0  # zero weights must count for nothing
    return w


@pytest.mark.parametrize("fam", LOG_LINK, ids=ids)
def test_log_link_weighted_metrics_match_sklearn(fam):
    z, y = sample(fam, n=600, seed=8)
    w = _weights(len(y))
    m = fam.metrics(fam.metric_sums(z, y, np.average(y, weights=w), w), w.sum())
    mu = np.exp(z)
    # weighted sums of ~600 O(1) terms, summed in another order: 1e-10 relative
    np.testing.assert_allclose(m["mean_deviance"], sklearn_mean_deviance(fam, y, mu, w), rtol=1e-10)
    np.testing.assert_allclose(m["d2"], d2_tweedie_score(y, mu, sample_weight=w, power=fam.power), rtol=1e-10)
    mu_plain = fam.metrics(fam.metric_sums(z, y, y.mean()), len(y))
    np.testing.assert_allclose(mu_plain["d2"], d2_tweedie_score(y, mu, power=fam.power), rtol=1e-10)


def test_linear_weighted_metrics_match_sklearn():
    fam = Gaussian()
    z, y = sample(fam, n=600, seed=9)
    w = _weights(len(y))
    m = fam.metrics(fam.metric_sums(z, y, np.average(y, weights=w), w), w.sum())
    np.testing.assert_allclose(m["mse"], mean_squared_error(y, z, sample_weight=w), rtol=1e-12)  # summation order
    np.testing.assert_allclose(m["r2"], r2_score(y, z, sample_weight=w), rtol=1e-12)


def test_logistic_weighted_metrics_match_sklearn():
    fam = Binomial()
    z, y = sample(fam, n=800, seed=10)
    w = _weights(len(y))
    m = fam.metrics(fam.metric_sums(z, y, np.average(y, weights=w), w), w.sum())
    np.testing.assert_allclose(m["log_loss"], log_loss(y, expit(z), sample_weight=w), rtol=1e-10)
    np.testing.assert_allclose(m["accuracy"], accuracy_score(y, z > 0, sample_weight=w), rtol=1e-12)
    # the histogram AUC is exact up to ties inside a bin, which the reported bound covers
    assert abs(m["roc_auc"] - roc_auc_score(y, z, sample_weight=w)) <= m["roc_auc_max_error"] + 1e-12
    assert m["roc_auc_max_error"] < 1e-2


def test_unweighted_linear_and_logistic_sums_follow_the_formulas():
    lin = Gaussian()
    z, y = sample(lin, n=500, seed=11)
    c = y.mean()
    s = lin.metric_sums(z, y, c)
    # two dot products vs the textbook sums: summation order only
    np.testing.assert_allclose(s, [0.5 * np.sum((z - y) ** 2), 0.5 * np.sum((y - c) ** 2)], rtol=1e-13)
    np.testing.assert_allclose(lin.metric_sums(z, y, c, np.ones_like(y)), s, rtol=1e-13)

    log = Binomial()
    z, y = sample(log, n=500, seed=12)
    c = y.mean()
    s = log.metric_sums(z, y, c)
    z0 = np.log(c / (1 - c))
    expect = [np.sum(np.log1p(np.exp(z)) - y * z), np.sum(np.log1p(np.exp(z0)) - y * z0), np.sum((z > 0) == (y == 1))]
    np.testing.assert_allclose(s[:3], expect, rtol=1e-12)  # log1p(exp) vs logaddexp: a few ulps per row
    assert s[3:].sum() == len(y)  # every row lands in one class histogram
    np.testing.assert_allclose(log.metric_sums(z, y, c, np.ones_like(y)), s, rtol=1e-12)
    m = log.metrics(s, len(y))
    assert abs(m["roc_auc"] - roc_auc_score(y, z)) <= m["roc_auc_max_error"] + 1e-12
    np.testing.assert_allclose(m["accuracy"], accuracy_score(y, z > 0), rtol=1e-15)


# ---- family lookup errors -----------------------------------------------------------------------------------
def test_get_family_and_power_errors():
    assert get_family("tweedie", power=1.3) == Tweedie(1.3)
    assert get_family("tweedie", power=1.3).power == 1.3
    assert get_family("poisson", power=1.7) == Poisson()  # families without a power ignore it
    for bad in (1.0, 2.0, 2.5, 0.0, -1.0):
        with pytest.raises(ValueError, match=r"between 1 and 2"):
            get_family("tweedie", power=bad)
    with pytest.raises(ValueError, match="unknown model"):
        get_family("negbin")
    with pytest.raises(GradpipeError, match=r"--power:.*between 1 and 2"):
        TrainConfig(model="tweedie", power=2.5).validate()
    assert TrainConfig(model="tweedie", power=1.25).validate().family == Tweedie(1.25)
    TrainConfig(model="gamma", power=2.5).validate()  # ignored outside tweedie
