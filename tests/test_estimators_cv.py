"""The cross-validated estimators (pipeline.estimators_cv) against scikit-learn's ElasticNetCV and glum's
GeneralizedLinearRegressorCV, given the same folds as ``cv=`` splits and the estimator's own α grid."""

from __future__ import annotations

import numpy as np
import pytest
from glum import GeneralizedLinearRegressorCV
from sklearn.base import clone
from sklearn.linear_model import ElasticNetCV

import pipeline
from pipeline.estimators import LogisticRegression
from pipeline.estimators_cv import (
    GammaRegressorCV,
    LinearRegressionCV,
    LogisticRegressionCV,
    PoissonRegressorCV,
    TweedieRegressorCV,
)
from pipeline.folds import fold_ids

K = 5


def splits(n: int, k: int = K, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    f = fold_ids(0, n, k, seed)
    return [(np.flatnonzero(f != j), np.flatnonzero(f == j)) for j in range(k)]


def linear_data(n: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, 6)) @ np.linalg.cholesky(0.5 * np.eye(6) + 0.5).T
    X = Z * rng.uniform(0.5, 10, size=6) + rng.uniform(-3, 3, size=6)  # unequal scales and offsets
    y = X @ (np.array([2, -1, 0, 0, 0.5, 0]) / X.std(axis=0)) + 1 + rng.normal(size=n)
    return X, y


def glm_data(family: str, n: int = 4000, seed: int = 1):
    """tests/test_tune.py's data: glum's IRLS at gradient_tol 1e-12 converges quickly on it (other draws can
    leave glum in failed line searches for tens of seconds)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)) * [1, 2, 0.5, 1, 3, 1] + 1
    eta = X @ np.array([0.8, -0.25, 0, 0, 0.1, 0]) - 0.5
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))) if family == "binomial" else rng.poisson(np.exp(0.5 * eta))
    return X, y.astype(float)


@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
def test_linear_cv_matches_scikit_learn_elasticnetcv(l1_ratio):
    X, y = linear_data()
    est = LinearRegressionCV(l1_ratio=l1_ratio, n_alphas=40, client="inprocess").fit(X, y)
    sk = ElasticNetCV(l1_ratio=l1_ratio, alphas=est.alphas_, cv=splits(len(y)), tol=1e-12,
                      max_iter=100_000).fit(X, y)
    assert est.alphas_.shape == (40,) and est.mse_path_.shape == (40, K)
    # both solve every fold's problem to ~1e-12 (scikit-learn's CD at tol 1e-12, ours CD refined from the fold's
    # exact R factor; coefficients agree to ~4e-13): the held-out MSEs measured agree to ~8e-13, so 1e-9 is ample
    # headroom for BLAS/platform rounding and still far below the CV-mean MSE step between neighbouring α (≥ 2e-7
    # here), which decides alpha_
    assert np.max(np.abs(est.mse_path_ - sk.mse_path_)) < 1e-9
    assert est.alpha_ == sk.alpha_ and est.l1_ratio_ == l1_ratio
    # the refit (exact solver on all rows) vs scikit-learn's refit: both to ~1e-12 of the same optimum
    np.testing.assert_allclose(est.coef_, sk.coef_, atol=1e-6)
    assert abs(est.intercept_ - sk.intercept_) < 1e-6
    np.testing.assert_allclose(est.predict(X[:50]), sk.predict(X[:50]), atol=1e-5)
    assert est.passes_ == 2  # the whole CV in one pass of per-fold R factors, the refit in one more
    assert est.score(X, y) == pytest.approx(sk.score(X, y), abs=1e-8)


def test_linear_cv_two_l1_ratios_and_cv_results():
    X, y = linear_data(1500, seed=3)
    grid = np.geomspace(1.0, 1e-3, 20)
    est = LinearRegressionCV(l1_ratio=[0.2, 0.9], alphas=grid, client="inprocess").fit(X, y)
    sk = ElasticNetCV(l1_ratio=[0.2, 0.9], alphas=grid, cv=splits(len(y)), tol=1e-12, max_iter=100_000).fit(X, y)
    assert (est.l1_ratio_, est.alpha_) == (sk.l1_ratio_, sk.alpha_)
    assert est.alphas_.shape == (2, 20) and est.mse_path_.shape == (2, 20, K)
    assert np.max(np.abs(est.mse_path_ - sk.mse_path_)) < 1e-9  # as in the test above
    res = est.cv_results_
    assert len(res["param_alpha"]) == 40
    np.testing.assert_array_equal(res["param_l1_ratio"], np.repeat([0.2, 0.9], 20))
    np.testing.assert_array_equal(res["param_alpha"], est.alphas_.ravel())
    folds = np.stack([res[f"split{k}_test_deviance"] for k in range(K)], axis=1)
    np.testing.assert_array_equal(folds, est.deviance_path_.reshape(40, K))
    np.testing.assert_allclose(res["mean_test_deviance"], folds.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(res["std_error_test_deviance"], folds.std(axis=1, ddof=1) / np.sqrt(K), rtol=1e-12)
    best = int(np.flatnonzero(res["rank_test_deviance"] == 1)[0])
    assert (res["param_l1_ratio"][best], res["param_alpha"][best]) == (est.l1_ratio_, est.alpha_)
    assert sorted(res["rank_test_deviance"]) == list(range(1, 41))  # distinct means: a permutation of 1…40


@pytest.mark.parametrize("cls, family", [(LogisticRegressionCV, "binomial"), (PoissonRegressorCV, "poisson")])
def test_glm_cv_matches_glum(cls, family):
    X, y = glm_data(family)
    est = cls(n_alphas=20, client="inprocess").fit(X, y)
    g = GeneralizedLinearRegressorCV(family=family, alphas=est.alphas_, l1_ratio=1.0, cv=splits(len(y)),
                                     gradient_tol=1e-12, max_iter=1000).fit(X, y)
    assert est.alpha_ == g.alpha_
    # both stop within ~1e-8 of every fold's optimum (Newton's √tol step rule; glum's gradient_tol 1e-12) and the
    # deviance is flat at an optimum, so held-out deviances agree far below 1e-6; glum's path is (folds, α)
    glum_dev = np.asarray(g.deviance_path_).reshape(K, -1).T
    assert est.deviance_path_.shape == (20, K)
    assert np.max(np.abs(est.deviance_path_ - glum_dev)) < 1e-6
    np.testing.assert_allclose(est.coef_, g.coef_, atol=1e-6)  # the refits: the same optimum to ~1e-8
    assert abs(est.intercept_ - g.intercept_) < 1e-6
    mean = est.predict_proba(X[:50])[:, 1] if family == "binomial" else est.predict(X[:50])  # glum's is the mean
    np.testing.assert_allclose(mean, g.predict(X[:50]), rtol=1e-5)
    assert est.passes_ > 1 and est.n_iter_ >= 1 and est.n_features_in_ == 6
    assert est.tune_id_.startswith(cls.__name__.lower()) and est.run_id_ == f"{est.tune_id_}-refit"
    assert est.tune_uri_ is None and est.run_uri_ is None  # temporary stores, removed after fit


def test_logistic_cv_labels_like_logistic_regression():
    X, y01 = glm_data("binomial", n=1500)
    labels = np.where(y01 == 1, "yes", "no")
    est = LogisticRegressionCV(n_alphas=8, client="inprocess").fit(X, labels)
    base = LogisticRegression(alpha=est.alpha_, l1_ratio=1.0, client="inprocess").fit(X, labels)
    np.testing.assert_array_equal(est.classes_, base.classes_)
    np.testing.assert_array_equal(est.classes_, ["no", "yes"])
    np.testing.assert_allclose(est.coef_, base.coef_, atol=1e-6)  # the refit is that fit
    np.testing.assert_array_equal(est.predict(X), base.predict(X))
    np.testing.assert_allclose(est.predict_proba(X), base.predict_proba(X), atol=1e-6)
    assert est.score(X, labels) == base.score(X, labels)
    with pytest.raises(ValueError, match="exactly 2 classes"):
        LogisticRegressionCV(n_alphas=4, client="inprocess").fit(X, np.arange(len(X)) % 3)


def test_params_clone_and_bad_params():
    est = TweedieRegressorCV(power=1.3, cv=3, l1_ratio=[0.5, 1.0], client="inprocess")
    params = est.get_params()
    assert params["power"] == 1.3 and params["cv"] == 3 and params["l1_ratio"] == [0.5, 1.0]
    assert {"n_alphas", "alphas", "eps", "select", "seed", "max_iter", "tol", "standardize", "chunk_rows",
            "client", "runs_dir"} <= set(params)
    twin = clone(est)
    assert type(twin) is TweedieRegressorCV and twin.get_params() == params
    assert clone(LinearRegressionCV(n_alphas=7)).get_params()["n_alphas"] == 7
    assert "power" not in GammaRegressorCV().get_params()
    X, y = linear_data(300)
    with pytest.raises(ValueError, match=r"LinearRegressionCV: cv: needs at least 2 folds"):
        LinearRegressionCV(cv=1, client="inprocess").fit(X, y)
    with pytest.raises(ValueError, match=r"select: choose one of min, 1se, not 'best'"):
        LinearRegressionCV(select="best", client="inprocess").fit(X, y)
    with pytest.raises(ValueError, match="number of folds"):
        LinearRegressionCV(cv=splits(300), client="inprocess").fit(X, y)
    with pytest.raises(ValueError, match="l1_ratio: values must be in"):
        LinearRegressionCV(l1_ratio=1.5, client="inprocess").fit(X, y)
    assert not hasattr(LinearRegressionCV(cv=1), "alpha_")
    assert pipeline.PoissonRegressorCV is PoissonRegressorCV


def test_one_se_rule_picks_a_larger_alpha():
    X, y = glm_data("binomial", n=2000)
    best = LogisticRegressionCV(n_alphas=20, client="inprocess").fit(X, y)
    one = LogisticRegressionCV(n_alphas=20, select="1se", client="inprocess").fit(X, y)
    assert one.alpha_ >= best.alpha_
    np.testing.assert_array_equal(one.deviance_path_, best.deviance_path_)  # the rule chooses; the fits agree
    res = one.cv_results_
    i = int(np.argmin(res["mean_test_deviance"]))
    assert best.alpha_ == res["param_alpha"][i]
    within = res["mean_test_deviance"] <= res["mean_test_deviance"][i] + res["std_error_test_deviance"][i]
    assert one.alpha_ == res["param_alpha"][within].max()


def test_gamma_and_tweedie_cv_fit_and_keep_stores(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(1500, 3))
    mu = np.exp(0.3 * X[:, 0] - 0.2 * X[:, 1] + 0.5)
    y_gamma = rng.gamma(2.0, mu / 2.0)
    gam = GammaRegressorCV(n_alphas=6, cv=3, client="inprocess", runs_dir=tmp_path).fit(X, y_gamma)
    assert gam.alphas_.shape == (6,) and gam.deviance_path_.shape == (6, 3)
    assert gam.score(X, y_gamma) > 0.1 and np.all(gam.predict(X) > 0)
    assert gam.run_uri_ is not None and (tmp_path / f"{gam.run_id_}.zarr").exists()
    assert (tmp_path / "tunes" / f"{gam.tune_id_}.zarr").exists()
    assert (tmp_path / "datasets" / f"{gam.tune_id_}.zarr").exists()
    y_tw = np.where(rng.random(1500) < 0.3, 0.0, y_gamma)
    tw = TweedieRegressorCV(power=1.5, n_alphas=6, cv=3, client="inprocess").fit(X, y_tw)
    assert np.isfinite(tw.alpha_) and tw.coef_.shape == (3,) and tw.score(X, y_tw) > 0
