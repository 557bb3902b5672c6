"""What the families must keep beyond their math (tests/test_families_glm.py has that): a finite null model for
all-zero targets, picklable and comparable family objects, and the unweighted metric sums of linear and
logistic bit for bit those of the release before weights existed."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from pipeline.families import AUC_BINS, FAMILIES, Gamma, Poisson, Tweedie, get_family

LOG_FAMILIES = [Poisson(), Gamma(), Tweedie(1.2), Tweedie(1.5), Tweedie(1.8)]


# ---------------------------------------------------------------------------- pointwise math


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


def linear_logistic_data(seed: int = 6, n: int = 700):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y_lin = z + rng.normal(0.0, 1.0, n)
    y_log = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-z))).astype(float)
    return z, y_lin, y_log, rng.uniform(0.1, 4.0, n)


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
