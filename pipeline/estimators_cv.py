"""Cross-validated estimators (scikit-learn's ``ElasticNetCV``, glum's ``GeneralizedLinearRegressorCV``) over
:func:`pipeline.tune.tune`: ``fit`` → dataset store → ``tune`` (every fold and α in shared passes) → the refit.

Each class is its base estimator of :mod:`pipeline.estimators` with a tuned penalty: ``predict``, ``score``
(and ``predict_proba``, ``classes_`` for :class:`LogisticRegressionCV`) are inherited, and the stores, the
client choice (in-process or Dask) and the temporary directory are the base's. With ``runs_dir`` the dataset
(``runs_dir/datasets/<tune_id>.zarr``), the tune store (``runs_dir/tunes/<tune_id>.zarr``) and the refit run
(``runs_dir/<tune_id>-refit.zarr``) are kept, so ``gradpipe tune --resume``/``runs``/``evaluate`` can use them.

The folds are gradpipe's: a seeded hash of the row index (:func:`pipeline.folds.fold_ids`), so ``cv`` is the
number of folds, not a splitter; ``[(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in range(cv)]`` with
``f = fold_ids(0, n, cv, seed)`` are the same folds as scikit-learn/glum ``cv=`` splits.

Fitted attributes (R l1 ratios, L alphas, K folds):

- ``alpha_``, ``l1_ratio_``: the choice (``select``: ``"min"`` CV deviance, or ``"1se"``: the largest α within
  one standard error of the minimum).
- ``alphas_``: the α grid, (L,) for one l1 ratio, else (R, L) (scikit-learn's ``alphas_``).
- ``deviance_path_``: the held-out mean deviance (twice the mean loss; weighted with ``sample_weight``) per
  (α, fold): (L, K) for one l1 ratio, else (R, L, K) — scikit-learn's ``mse_path_`` layout (α first, folds
  last), NOT glum's ``deviance_path_`` (folds first). ``LinearRegressionCV.mse_path_`` is the same array:
  the least-squares deviance is the mean squared error.
- ``cv_results_``: one entry per candidate (l1 ratio major, α in grid order): ``param_alpha``,
  ``param_l1_ratio``, ``mean_test_deviance``, ``std_error_test_deviance`` (sd over folds / √K, the 1se rule's),
  ``split{k}_test_deviance``, ``rank_test_deviance`` (1 = lowest mean deviance; ties share the lower rank).
- ``coef_``, ``intercept_``, ``n_iter_``, ``status_``, ``solver_``: the refit on all rows at the choice.
- ``passes_``: passes over the data, tune and refit together; ``tune_id_``, ``run_id_`` (the refit run),
  ``tune_uri_``/``run_uri_`` (None when the stores were temporary), ``n_features_in_``.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.estimators import (
    ConvergenceWarning,
    GammaRegressor,
    LinearRegression,
    LogisticRegression,
    PoissonRegressor,
    TweedieRegressor,
)

# TuneConfig's errors name CLI flags (``--cv: …``); the estimator's name its parameters
_FLAG_PARAM = {"cv": "cv", "alphas": "n_alphas", "alpha-grid": "alphas", "eps": "eps", "l1-ratio": "l1_ratio",
               "select": "select", "max-iter": "max_iter", "model": "model", "power": "power"}


class _CVModel:
    """The tuned penalty: parameters, ``fit`` → :func:`pipeline.tune.tune`, the fitted attributes. Mixed in
    before a base estimator, which supplies ``_model``, ``_targets``, ``_client``, ``_stored`` and prediction."""

    _extra_params: tuple[str, ...] = ()

    def __init__(self, *, cv: int = 5, n_alphas: int = 100, alphas=None, eps: float | None = None,
                 l1_ratio: float | list[float] = 1.0, select: str = "min", seed: int = 0, max_iter: int = 100,
                 tol: float = 1e-12, standardize: bool = True, chunk_rows: int | None = None, client=None,
                 runs_dir: str | Path | None = None):
        self.cv, self.n_alphas, self.alphas, self.eps, self.l1_ratio = cv, n_alphas, alphas, eps, l1_ratio
        self.select, self.seed, self.max_iter, self.tol, self.standardize = select, seed, max_iter, tol, standardize
        self.chunk_rows, self.client, self.runs_dir = chunk_rows, client, runs_dir

    @classmethod
    def _get_param_names(cls) -> list[str]:
        names = [p for p in inspect.signature(_CVModel.__init__).parameters if p != "self"]
        return sorted({*names, *cls._extra_params})

    def _one_ratio(self) -> bool:
        return np.ndim(self.l1_ratio) == 0 or len(self.l1_ratio) == 1

    def _tune_config(self):
        """The TuneConfig of these parameters; a bad one is a ValueError naming the parameter."""
        from pipeline.errors import GradpipeError
        from pipeline.tune import TuneConfig

        name = type(self).__name__
        if isinstance(self.cv, bool) or not isinstance(self.cv, (int, np.integer)):
            raise ValueError(f"{name}: cv must be the number of folds (an int ≥ 2), not {self.cv!r}; the folds are "
                             "gradpipe's hashed row folds (pipeline.folds.fold_ids), not a splitter.")
        ratios = [self.l1_ratio] if np.ndim(self.l1_ratio) == 0 else list(self.l1_ratio)
        try:
            return TuneConfig(model=self._model, power=getattr(self, "power", 1.5), cv=int(self.cv),
                              n_alphas=self.n_alphas, alpha_grid=None if self.alphas is None else list(self.alphas),
                              eps=self.eps, l1_ratios=ratios, select=self.select, seed=self.seed,
                              max_iter=self.max_iter, tol=self.tol, standardize=self.standardize).validate()
        except GradpipeError as exc:
            msg = re.sub(r"^--([\w-]+):", lambda m: f"{_FLAG_PARAM.get(m[1], m[1])}:", str(exc))
            raise ValueError(f"{name}: {msg}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: bad parameter: {exc}") from None

    def fit(self, X, y, sample_weight=None):
        """Cross-validate the α path (and l1 ratios) on X (n, d), y (n,) and optional ``sample_weight`` (n,),
        then refit on all rows at the chosen setting."""
        from pipeline.tune import tune

        config = self._tune_config()
        client = self._client(X, y)
        tune_id = self._new_id()
        with self._stored(X, y, client, tune_id, sample_weight) as (data, runs_dir, kept):
            result = tune(data, config, client=client, runs_dir=runs_dir, tunes_dir=runs_dir / "tunes",
                          tune_id=tune_id)
        refit = result.refit
        if refit.status == "stopped":  # Ctrl-C during the refit: no half-fitted estimator
            raise KeyboardInterrupt(f"{type(self).__name__}.fit {refit.message}")
        self._set_path(result)
        self.coef_, self.intercept_ = np.asarray(refit.coef), float(refit.intercept)
        self.n_iter_, self.status_, self.solver_ = refit.n_iter, refit.status, refit.solver
        self.passes_, self.tune_id_, self.run_id_ = float(result.total_passes), result.tune_id, refit.run_id
        self.tune_uri_ = result.tune_uri if kept else None  # temporary stores are gone
        self.run_uri_ = refit.run_uri if kept else None
        self.n_features_in_ = len(self.coef_)
        for text in result.warnings:
            warnings.warn(f"{type(self).__name__}: {text}", ConvergenceWarning, stacklevel=2)
        if refit.status == "max_iter":
            warnings.warn(f"{type(self).__name__}: the refit at alpha={self.alpha_:g} stopped at its max_iter "
                          f"before converging ({refit.message}).", ConvergenceWarning, stacklevel=2)
        return self

    def _set_path(self, result) -> None:
        """``alpha_``, ``l1_ratio_``, ``alphas_``, ``deviance_path_``, ``cv_results_`` from a TuneResult."""
        self.alpha_, self.l1_ratio_ = float(result.alpha), float(result.l1_ratio)
        one = self._one_ratio()
        self.alphas_ = np.array(result.alphas[0] if one else result.alphas)
        self.deviance_path_ = np.array(result.deviance[0] if one else result.deviance)
        self.cv_results_ = cv_results(result)


def cv_results(result) -> dict[str, np.ndarray]:
    """scikit-learn style ``cv_results_`` of a penalty-path TuneResult: one entry per (l1 ratio, α)."""
    R, L, K = result.deviance.shape
    mean = result.mean.ravel()
    finite = np.where(np.isfinite(mean), mean, np.inf)
    out: dict[str, Any] = {
        "param_alpha": np.asarray(result.alphas, dtype=np.float64).ravel(),
        "param_l1_ratio": np.repeat(np.asarray(result.l1_ratios, dtype=np.float64), L),
        "mean_test_deviance": mean.copy(),
        "std_error_test_deviance": result.se.ravel().copy(),
    }
    for k in range(K):
        out[f"split{k}_test_deviance"] = result.deviance[..., k].ravel().copy()
    out["rank_test_deviance"] = np.searchsorted(np.sort(finite), finite, side="left").astype(np.int64) + 1
    return out


class LinearRegressionCV(_CVModel, LinearRegression):
    """Elastic-net least squares with α (and l1 ratio) chosen by K-fold CV: scikit-learn's ``ElasticNetCV``
    (same objective ½·mean r² + α(r‖w‖₁ + (1−r)/2‖w‖²), same α_max and grid). The whole CV costs one pass (the
    per-fold R factors); the refit one more."""

    @property
    def mse_path_(self) -> np.ndarray:
        """scikit-learn's name: the held-out mean squared error per (α, fold), ``deviance_path_``."""
        return self.deviance_path_


class LogisticRegressionCV(_CVModel, LogisticRegression):
    """Binary logistic regression with an elastic-net α chosen by K-fold CV (glum's
    ``GeneralizedLinearRegressorCV(family="binomial")``); any two labels, mapped by ``classes_``."""


class PoissonRegressorCV(_CVModel, PoissonRegressor):
    """Poisson regression (log link) with an elastic-net α chosen by K-fold CV (glum's ``family="poisson"``)."""


class GammaRegressorCV(_CVModel, GammaRegressor):
    """Gamma regression (log link; y > 0) with an elastic-net α chosen by K-fold CV."""


class TweedieRegressorCV(_CVModel, TweedieRegressor):
    """Tweedie regression with power 1 < ``power`` < 2 (log link; y ≥ 0), elastic-net α chosen by K-fold CV."""

    _extra_params = ("power",)

    def __init__(self, *, power: float = 1.5, **kwargs: Any):
        super().__init__(**kwargs)
        self.power = power
