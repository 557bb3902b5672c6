"""sklearn-style estimators: same optimum as exact solvers, the sklearn parameter protocol, label mapping.

References: ``numpy.linalg.lstsq`` (least squares, exact to ~cond·eps) and sklearn's LogisticRegression
solved with newton-cg to tol 1e-14. Objective mapping: ours is mean log-loss + (λ/2)‖w‖², i.e.
(1/n)·Σℓ_i + (λ/2)‖w‖²; dividing by λ gives (1/(nλ))·Σℓ_i + ½‖w‖², sklearn's C·Σℓ_i + ½‖w‖² with
C = 1/(nλ) — the same minimiser (both leave the intercept unpenalized).
Tolerances: GD stops at ‖∇L‖ ≤ gtol in the standardized space; the objective is μ-strongly convex there
(μ ≳ 0.1 for these well-conditioned designs), so ‖θ − θ*‖ ≤ gtol/μ: gtol 1e-9 → 1e-8 for linear, 1e-8 → 1e-7
for logistic — 100× inside the required 1e-6 / 1e-5 relative, yet any wrong objective (λ off by 2×, a
penalized intercept, a wrong class mapping) moves the coefficients by ≫ 1e-3.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import sklearn.linear_model as sk
from sklearn.base import clone

import pipeline.estimators as est
from pipeline.estimators import LinearRegression, LogisticRegression

INIT = {"solver": "auto", "lr": "auto", "l2": 0.0, "max_iter": 500, "tol": None, "gtol": 1e-8, "standardize": True,
        "beta": 0.9, "history": 10, "batch_chunks": 1, "schedule": "adaptive", "power_t": 0.25, "early_stopping": False,
        "validation_fraction": 0.1, "n_iter_no_change": 5, "seed": 0, "fan_in": 8, "persist": "auto",
        "chunk_rows": None, "client": None, "runs_dir": None}


def test_estimator_defaults_are_the_trainers_and_bad_values_are_value_errors():
    from pipeline.config import TrainConfig

    defaults = TrainConfig().to_json()
    shared = {k: v for k, v in INIT.items() if k in defaults}
    assert len(shared) == 18 and shared == {k: defaults[k] for k in shared}
    with pytest.raises(ValueError, match="unknown solver 'bfgs'"):  # sklearn's convention, before any work
        LinearRegression(solver="bfgs").fit(np.ones((4, 1)), np.ones(4))


def design(n: int, seed: int) -> np.ndarray:
    """Raw features on very different scales and offsets (standardization has work to do)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)) * [0.5, 3.0, 20.0] + [1.0, -4.0, 30.0]


def lstsq(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    sol = np.linalg.lstsq(np.column_stack([X, np.ones(len(X))]), y, rcond=None)[0]
    return sol[:-1], float(sol[-1])


def binary(X: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = ((X - [1.0, -4.0, 30.0]) / [0.5, 3.0, 20.0]) @ [0.8, -0.5, 0.3] + 0.2
    return (rng.uniform(size=len(X)) < 1 / (1 + np.exp(-z))).astype(int)


@pytest.fixture(scope="module")
def linear_data():
    X = design(1200, 0)
    y = X @ [2.0, -1.0, 0.05] + 7.0 + np.random.default_rng(1).normal(size=1200)
    return X, y, lstsq(X, y)


def test_linear_on_numpy_equals_lstsq(linear_data, client, tmp_path, monkeypatch):
    X, y, (coef, b) = linear_data
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the temp stores must be gone afterwards
    m = LinearRegression(client=client, gtol=1e-9).fit(X, y)
    assert m.status_ == "converged" and m.run_uri_ is None and list(tmp_path.iterdir()) == []
    np.testing.assert_allclose(m.coef_, coef, rtol=1e-6)
    np.testing.assert_allclose(m.intercept_, b, rtol=1e-6)
    assert m.loss_history_.shape == (m.n_iter_ + 1,) and m.loss_history_[-1] <= m.loss_history_[0]
    np.testing.assert_allclose(m.predict(X), X @ coef + b, rtol=1e-6)
    r = y - X @ coef - b
    np.testing.assert_allclose(m.score(X, y), 1 - r @ r / ((y - y.mean()) @ (y - y.mean())), rtol=1e-9)


def test_linear_on_dask_arrays_with_misaligned_chunks_equals_lstsq(linear_data, client, tmp_path):
    X, y, (coef, b) = linear_data
    Xd, yd = da.from_array(X, chunks=(250, 2)), da.from_array(y, chunks=333)  # X and y chunks disagree
    m = LinearRegression(client=client, gtol=1e-9, chunk_rows=200, runs_dir=tmp_path).fit(Xd, yd)
    np.testing.assert_allclose(m.coef_, coef, rtol=1e-6)
    np.testing.assert_allclose(m.intercept_, b, rtol=1e-6)
    # With runs_dir the run and its dataset are kept where `gradpipe runs` / `evaluate` can find them.
    assert Path(m.run_uri_) == (tmp_path / f"{m.run_id_}.zarr").absolute()
    data = tmp_path / "datasets" / f"{m.run_id_}.zarr"
    from pipeline.store.dataset import open_dataset

    ds = open_dataset(data)
    assert ds.chunk_rows == 200 and np.array_equal(ds.X.compute(), X) and np.array_equal(ds.y.compute(), y)
    np.testing.assert_allclose(ds.stats.mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ds.stats.variance, X.var(0), rtol=1e-12)


@pytest.mark.parametrize("l2", [1e-2, 1e-3])
def test_logistic_with_l2_equals_sklearn(client, l2):
    X = design(1000, 2)
    y = binary(X, 3)
    ref = sk.LogisticRegression(C=1 / (len(X) * l2), tol=1e-14, max_iter=10_000, solver="newton-cg").fit(X, y)
    m = LogisticRegression(client=client, l2=l2, tol=0.0).fit(X, y)
    assert m.status_ == "converged"
    np.testing.assert_allclose(m.coef_, ref.coef_[0], rtol=1e-5)
    np.testing.assert_allclose(m.intercept_, ref.intercept_[0], rtol=1e-5)
    np.testing.assert_allclose(m.predict_proba(X), ref.predict_proba(X), rtol=1e-5, atol=1e-7)
    assert np.array_equal(m.predict(X), ref.predict(X))


def test_string_labels_round_trip(client):
    X = design(800, 4)
    y01 = binary(X, 5)
    labels = np.where(y01 == 1, "spam", "ham")
    m = LogisticRegression(client=client, l2=1e-2, tol=0.0).fit(X, labels)
    base = LogisticRegression(client=client, l2=1e-2, tol=0.0).fit(X, y01)
    assert list(m.classes_) == ["ham", "spam"] and list(base.classes_) == [0, 1]
    np.testing.assert_allclose(m.coef_, base.coef_, rtol=1e-12)  # "spam" ↔ 1: the same problem
    pred = m.predict(X)
    assert pred.dtype.kind == "U" and set(pred) == {"ham", "spam"}
    assert np.array_equal(pred == "spam", base.predict(X) == 1)
    ref = sk.LogisticRegression(C=1 / (len(X) * 1e-2), tol=1e-14, solver="newton-cg").fit(X, labels)
    assert np.array_equal(pred, ref.predict(X))  # same labels, same classes_ order as sklearn
    assert m.score(X, labels) == np.mean(pred == labels)
    assert np.array_equal(m.decision_function(X) > 0, m.predict_proba(X)[:, 1] > 0.5)
    with pytest.raises(ValueError, match="exactly 2 classes"):
        LogisticRegression(client=client).fit(X, np.arange(len(X)) % 3)


def test_get_params_and_clone(client):
    m = LogisticRegression(l2=0.5, max_iter=7, client=client)
    assert m.get_params() == {**INIT, "l2": 0.5, "max_iter": 7, "client": client}
    c = clone(m)
    assert type(c) is LogisticRegression and c is not m and c.get_params() == m.get_params()
    assert c.client is client and not hasattr(c, "coef_")
    assert LinearRegression().set_params(l2=2.0).l2 == 2.0
    assert LinearRegression().get_params() == INIT


def test_without_sklearn_the_parameter_protocol_still_works(monkeypatch):
    for name in [k for k in sys.modules if k == "sklearn" or k.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn → ImportError
    spec = importlib.util.spec_from_file_location("estimators_nosk", est.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.LinearRegression(l2=0.25)
    assert "sklearn" not in type(m).__mro__[-2].__module__
    assert m.get_params() == {**INIT, "l2": 0.25}
    assert m.set_params(max_iter=3) is m and m.max_iter == 3
    with pytest.raises(ValueError, match="invalid parameter"):
        m.set_params(alpha=1.0)
    assert "l2=0.25" in repr(m)
