"""scikit-learn style estimators over the distributed trainer: ``fit`` → dataset store → ``train``.

``fit`` writes X, y (NumPy, or Dask arrays written block by block on the workers) into a dataset store,
then runs :func:`pipeline.training.train` on it, so the estimator is exactly the CLI's model: same objective
(mean loss + (λ/2)‖w‖² on original-scale weights, intercept unpenalized), same solvers, a run store per fit.
Without ``runs_dir`` both stores live in a temporary directory removed after ``fit``; with it, the run and
its dataset (``runs_dir/datasets/<run_id>.zarr``) are kept, so ``gradpipe runs``/``evaluate`` can use them.
The stores must be on a filesystem the workers share (always true for a local cluster).

Where ``fit`` runs (:meth:`_GradpipeModel._client`): NumPy input whose X takes at most
:func:`inprocess_limit` bytes (1 GiB, or a quarter of the available memory if that is less) runs
in-process — no cluster, no subprocess, so a script needs no ``if __name__ == "__main__"`` guard, and the
bits equal a cluster's (same leaves, kernels and tree). A cluster is used only when asked for (``client=`` a
Client or a scheduler address, or ``$DASK_SCHEDULER_ADDRESS``) or when the data call for one (Dask arrays,
or X above the limit); a cluster the module starts is ONE LocalCluster shared by every later fit, closed at
interpreter exit. ``client="inprocess"`` forces in-process.

scikit-learn is only a dev dependency: with it the classes are real ``BaseEstimator``s (``clone``, grid
search, pipelines); without it they keep the same ``get_params``/``set_params`` contract.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import inspect
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stats import FeatureStats

try:  # pragma: no branch - which one depends on the environment
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning, NotFittedError
except ImportError:  # sklearn missing: same parameter protocol, no mixins
    class NotFittedError(ValueError, AttributeError):  # type: ignore[no-redef]
        """sklearn's: predict/score before fit."""

    class BaseEstimator:  # type: ignore[no-redef]
        """get_params/set_params by introspecting ``__init__``, as sklearn does."""

        @classmethod
        def _get_param_names(cls) -> list[str]:
            params = inspect.signature(cls.__init__).parameters.values()
            return sorted(p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL,
                                                                                          p.VAR_KEYWORD))

        def get_params(self, deep: bool = True) -> dict[str, Any]:
            return {name: getattr(self, name) for name in self._get_param_names()}

        def set_params(self, **params: Any):
            valid = self._get_param_names()
            for key, value in params.items():
                if key not in valid:
                    raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}; valid: {valid}")
                setattr(self, key, value)
            return self

        def __repr__(self) -> str:
            return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    class RegressorMixin:  # type: ignore[no-redef]
        _estimator_type = "regressor"

    class ClassifierMixin:  # type: ignore[no-redef]
        _estimator_type = "classifier"

    class ConvergenceWarning(UserWarning):  # type: ignore[no-redef]
        pass


# ---- writing a dataset store from arrays (block writer runs on the workers for Dask input) ----------
def _is_dask(*arrays) -> bool:
    """Any Dask array among ``arrays``, without importing dask.array (~1 s) for NumPy input."""
    da = sys.modules.get("dask.array")
    return da is not None and any(isinstance(a, da.Array) for a in arrays)


def _write_block(fork, index: int, chunk_rows: int, X, y, w=None, offset=None) -> tuple[FeatureStats, int, object]:
    """Write one row chunk into a dataset transaction's fork; returns its stats, its invalid-value count and
    the fork (for the driver to merge)."""
    from pipeline.store.dataset import write_chunk

    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = None if w is None else np.asarray(w, dtype=np.float64)
    offset = None if offset is None else np.asarray(offset, dtype=np.float64)
    fork = write_chunk(fork, index, chunk_rows, X, y, w, offset)
    bad = np.count_nonzero(~np.isfinite(y))
    if w is not None:
        bad += np.count_nonzero(~np.isfinite(w) | (w < 0))
    if offset is not None:
        bad += np.count_nonzero(~np.isfinite(offset))
    return FeatureStats.of(X, w), int(bad), fork


def _default_chunk_rows(n: int, d: int) -> int:
    """At most 64 MiB per chunk, and at least 8 chunks so every worker of a small cluster gets some."""
    from pipeline.store.dataset import chunk_rows_for

    return max(1, min(chunk_rows_for(64.0, d, 8), -(-n // 8)))


def _vector(v, n: int, name: str, chunks=None):
    """A per-row vector (sample_weight, offset) as float64, NumPy or Dask like X; shape checked."""
    if v is None:
        return None
    if chunks is not None:
        import dask.array as da

        v = da.asarray(v).astype(np.float64)
        if v.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
        return v.rechunk({0: chunks})
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
    return v


def write_dataset(path: Path, X, y, client, chunk_rows: int | None = None,
                  feature_names: list[str] | None = None, target: str = "y", w=None, offset=None) -> None:
    """Store X (n, d), y (n,) and optionally sample weights ``w`` and an ``offset`` (n,) as a gradpipe dataset;
    Dask inputs are rechunked and written blockwise."""
    from pipeline.store.dataset import Transaction

    is_dask = _is_dask(X, y, w, offset)
    if is_dask:
        import dask.array as da

        X, y = da.asarray(X), da.asarray(y)
        if any(np.isnan(c) for c in X.chunks[0]) or any(np.isnan(c) for c in y.chunks[0]):
            X, y = X.compute_chunk_sizes(), y.compute_chunk_sizes()
    else:
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X must be 2-D and y 1-D with as many rows; got {X.shape} and {y.shape}")
    n, d = int(X.shape[0]), int(X.shape[1])
    if n == 0 or d == 0:
        raise ValueError(f"need at least one row and one feature, got X of shape {X.shape}")
    rows = chunk_rows or _default_chunk_rows(n, d)
    w = _vector(w, n, "sample_weight", rows if is_dask else None)
    offset = _vector(offset, n, "offset", rows if is_dask else None)
    tx = Transaction(path)
    try:
        _write_arrays(tx, X, y, w, offset, rows, is_dask, client, feature_names, target)
    finally:
        tx.abandon()


def _write_arrays(tx, X, y, w, offset, rows: int, is_dask: bool, client, feature_names: list[str] | None,
                  target: str) -> None:
    from pipeline.store.dataset import DatasetInfo, commit_info, create_arrays

    n, d = int(X.shape[0]), int(X.shape[1])
    create_arrays(tx.store, n, d, rows, "float64", "none", weights=w is not None, offset=offset is not None)
    fork = tx.fork()
    n_chunks = -(-n // rows)
    if is_dask:
        import dask

        X = X.astype(np.float64).rechunk({0: rows, 1: -1})
        y = y.astype(np.float64).rechunk({0: rows})
        xs, ys = X.to_delayed().ravel(), y.to_delayed().ravel()
        ws = [None] * len(xs) if w is None else w.to_delayed().ravel()
        offs = [None] * len(xs) if offset is None else offset.to_delayed().ravel()
        parts = [dask.delayed(_write_block)(fork, i, rows, xb, yb, wb, ob)
                 for i, (xb, yb, wb, ob) in enumerate(zip(xs, ys, ws, offs, strict=True))]
        results = client.gather(client.compute(parts))
    else:
        def part(v, i):
            return None if v is None else v[i * rows:(i + 1) * rows]
        results = [_write_block(fork, i, rows, part(X, i), part(y, i), part(w, i), part(offset, i))
                   for i in range(n_chunks)]
        results = results[:1] + [(s, b, None) for s, b, _ in results[1:]]  # one in-process fork, merged once
    stats = FeatureStats.empty(d, weighted=w is not None)
    for s, _, _ in results:
        stats = stats.merge(s)
    if not (np.all(np.isfinite(stats.min)) and np.all(np.isfinite(stats.max))) or sum(b for _, b, _ in results):
        raise ValueError("X, y, sample_weight and offset must be finite (no NaN or infinity), weights ≥ 0")
    if w is not None and not stats.weight_sum > 0:
        raise ValueError("sample_weight: at least one weight must be > 0")
    tx.merge([f for _, _, f in results if f is not None])
    token = uuid.uuid4().hex  # in-memory input has no file hash: a fresh token per store
    info = DatasetInfo(path=tx.uri, feature_names=feature_names or [f"x{i}" for i in range(d)], target=target,
                       n_rows=n, chunk_rows=rows, dtype="float64", stats=stats,
                       manifest=[{"path": "<array>", "sha256": token, "rows": n, "row_start": 0, "row_stop": n}],
                       weight=None if w is None else "sample_weight", offset=None if offset is None else "offset")
    commit_info(tx.store, info)
    tx.commit(f"arrays: {n:,} rows × {d} features", {"gradpipe": "arrays", "n_rows": n})


INPROCESS_MAX_BYTES = 2**30  # X up to 1 GiB runs in-process (the leaves are held in memory once more)


def inprocess_limit() -> int:
    """The most bytes of X a fit runs in-process: 1 GiB, or a quarter of the available memory if less
    (the dataset store's copy is read back once, so a fit holds ~2× X besides the caller's array)."""
    try:
        import psutil

        return min(INPROCESS_MAX_BYTES, psutil.virtual_memory().available // 4)
    except ImportError:
        return INPROCESS_MAX_BYTES


_shared: dict[str, Any] = {}  # the one client this module started: {"client", "stack", "address"}


def shared_client(address: str | None = None):
    """One Dask client reused by every fit that needs a cluster (for ``address``, or a new LocalCluster),
    closed at interpreter exit: a LocalCluster per fit cost ~10 s each."""
    if _shared and _shared["address"] != address:
        close_shared_client()
    if not _shared:
        from pipeline.cluster import dask_client

        stack = contextlib.ExitStack()
        _shared.update(client=stack.enter_context(dask_client(address, announce=False)), stack=stack,
                       address=address)
    return _shared["client"]


def close_shared_client() -> None:
    stack = _shared.pop("stack", None)
    _shared.clear()
    if stack is not None:
        stack.close()


atexit.register(close_shared_client)


class _GradpipeModel(BaseEstimator):
    _model = "linear"

    def __init__(self, *, solver: str = "auto", lr: float | str = "auto", l2: float = 0.0, l1: float = 0.0,
                 alpha: float | None = None, l1_ratio: float | None = None, max_iter: int = 500,
                 tol: float | None = None, gtol: float = 1e-8, standardize: bool = True, beta: float = 0.9,
                 history: int = 10,
                 batch_chunks: int = 1, schedule: str = "adaptive", power_t: float = 0.25,
                 early_stopping: bool = False, validation_fraction: float = 0.1, n_iter_no_change: int = 5,
                 seed: int = 0, fan_in: int = 8, persist: str = "auto", chunk_rows: int | None = None, client=None,
                 runs_dir: str | Path | None = None):
        self.solver, self.lr, self.l2, self.max_iter, self.tol, self.gtol = solver, lr, l2, max_iter, tol, gtol
        self.l1, self.alpha, self.l1_ratio = l1, alpha, l1_ratio
        self.standardize, self.beta, self.batch_chunks, self.schedule = standardize, beta, batch_chunks, schedule
        self.history = history
        self.power_t, self.early_stopping, self.validation_fraction = power_t, early_stopping, validation_fraction
        self.n_iter_no_change, self.seed, self.fan_in, self.persist = n_iter_no_change, seed, fan_in, persist
        self.chunk_rows, self.client, self.runs_dir = chunk_rows, client, runs_dir

    def __sklearn_clone__(self):
        """Clone with the *same* client: a Dask client is a connection, not a parameter value to deep-copy."""
        params = {k: v if k == "client" else copy.deepcopy(v) for k, v in self.get_params(deep=False).items()}
        return type(self)(**params)

    def _config(self):
        """The TrainConfig of these parameters; a bad one is a ValueError, as sklearn estimators raise."""
        from pipeline.config import TrainConfig
        from pipeline.errors import GradpipeError

        names = set(TrainConfig.__dataclass_fields__) & set(self.get_params(deep=False))
        try:
            return TrainConfig(model=self._model, **{k: getattr(self, k) for k in names}).validate()
        except GradpipeError as exc:
            raise ValueError(str(exc)) from None

    def _targets(self, y, client):
        """Hook: the 0/1 (logistic) or float (linear) target to store."""
        return y

    def fit(self, X, y, sample_weight=None, offset=None):
        """Fit on X (n, d) and y (n,); ``sample_weight`` (n,) and ``offset`` (n,, added to the linear predictor)
        are optional, as in scikit-learn and glum."""
        config = self._config()
        return self._fit(X, y, config, self._client(X, y), sample_weight, offset)

    def _client(self, X, y):
        """Where the fit runs: ``"inprocess"``, or a Dask client (see the module docstring)."""
        from pipeline.training import INPROCESS

        if self.client is not None and not isinstance(self.client, str):
            return self.client
        if self.client == INPROCESS:
            if _is_dask(X, y):
                raise ValueError("client='inprocess' needs NumPy X and y; Dask arrays need a cluster")
            return INPROCESS
        if isinstance(self.client, str):
            return shared_client(self.client)
        if os.environ.get("DASK_SCHEDULER_ADDRESS"):
            return shared_client(os.environ["DASK_SCHEDULER_ADDRESS"])
        if _is_dask(X, y) or np.asarray(X).nbytes > inprocess_limit():
            return shared_client()
        return INPROCESS

    def _new_id(self) -> str:
        """A fresh run (or tune) id: the class name, the time, a random suffix."""
        return f"{type(self).__name__.lower()}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    @contextlib.contextmanager
    def _stored(self, X, y, client, store_id: str, sample_weight=None, offset=None):
        """Write X, y into a dataset store and yield ``(dataset, runs_dir, kept)``: in a temporary directory
        removed on exit (``kept`` False) without ``runs_dir``, else ``runs_dir/datasets/<store_id>.zarr``."""
        tmp = Path(tempfile.mkdtemp(prefix="gradpipe-fit-")) if self.runs_dir is None else None
        runs_dir = tmp / "runs" if tmp is not None else Path(self.runs_dir)
        data = tmp / "data.zarr" if tmp is not None else runs_dir / "datasets" / f"{store_id}.zarr"
        try:
            data.parent.mkdir(parents=True, exist_ok=True)
            write_dataset(data, X, self._targets(y, client), client, self.chunk_rows, w=sample_weight, offset=offset)
            yield data, runs_dir, tmp is None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _fit(self, X, y, config, client, sample_weight=None, offset=None):
        from pipeline.training import train

        run_id = self._new_id()
        with self._stored(X, y, client, run_id, sample_weight, offset) as (data, runs_dir, kept):
            result = train(data, config, client=client, runs_dir=runs_dir, run_id=run_id)
        if result.status == "stopped":  # Ctrl-C: the loop finished its iteration; no half-fitted estimator
            raise KeyboardInterrupt(f"{type(self).__name__}.fit {result.message}")
        self.coef_, self.intercept_ = np.asarray(result.coef), float(result.intercept)
        self.n_iter_, self.loss_history_, self.status_ = result.n_iter, np.asarray(result.loss_history), result.status
        self.solver_, self.passes_, self.run_id_ = result.solver, result.passes, result.run_id
        self._set_inference(result.inference or {})
        self.run_uri_ = result.run_uri if kept else None  # a temporary run store is gone
        self.n_features_in_ = len(self.coef_)
        if result.status == "max_iter":
            warnings.warn(f"{type(self).__name__} stopped at max_iter={self.max_iter} before converging "
                          f"({result.message}); raise max_iter or loosen tol/gtol.", ConvergenceWarning, stacklevel=3)
        return self

    def _set_inference(self, record: dict[str, Any]) -> None:
        """``bse_``, ``tvalues_`` (t or z), ``pvalues_``, ``conf_int_`` over ``[*coef_, intercept_]``, as
        statsmodels orders ``params`` with the constant last; None for a penalized or unconverged fit (the
        reason is in ``inference_["reason"]``)."""
        self.inference_ = record
        if record.get("available"):
            self.bse_, self.tvalues_ = np.asarray(record["std_error"]), np.asarray(record["statistic"])
            self.pvalues_ = np.asarray(record["p_value"])
            self.conf_int_ = np.column_stack([record["ci_low"], record["ci_high"]])
        else:
            self.bse_ = self.tvalues_ = self.pvalues_ = self.conf_int_ = None

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                                 "appropriate arguments before using this estimator.")

    def decision_function(self, X, offset=None):
        """X @ coef_ + intercept_ (+ offset): lazy for a Dask array, NumPy otherwise."""
        self._check_fitted()
        X = X if _is_dask(X) else np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have shape (n, {self.n_features_in_}), got {X.shape}")
        z = X @ self.coef_ + self.intercept_
        return z if offset is None else z + (offset if _is_dask(offset) else np.asarray(offset, dtype=np.float64))


class LinearRegression(RegressorMixin, _GradpipeModel):
    """Least squares (optionally ridge: ``l2`` = λ in mean ½(r²) + (λ/2)‖w‖²) by distributed GD."""

    _model = "linear"

    def predict(self, X, offset=None):
        """X @ coef_ + intercept_ (+ the ``offset`` a fit with one needs at prediction too)."""
        return self.decision_function(X, offset)

    def score(self, X, y, sample_weight=None, offset=None) -> float:
        """R² = 1 − SS_res / SS_tot, like sklearn's regressors."""
        y = np.asarray(y, dtype=np.float64)
        r = y - np.asarray(self.predict(X, offset))
        w = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        ss_tot = float(w @ (y - np.average(y, weights=w)) ** 2)
        return 1.0 - float(w @ r**2) / ss_tot if ss_tot > 0 else float("nan")


class LogisticRegression(ClassifierMixin, _GradpipeModel):
    """Binary logistic regression: mean log-loss + (λ/2)‖w‖² (sklearn's C = 1 / (n·λ)) by distributed GD.

    y may hold any two labels; ``classes_`` (sorted, as sklearn) maps them to 0/1 and back.
    """

    _model = "logistic"

    def _targets(self, y, client):
        if _is_dask(y):
            import dask.array as da

            classes = np.unique(client.compute(da.unique(y)).result())
        else:
            y = np.asarray(y)
            classes = np.unique(y)
        if len(classes) != 2:
            raise ValueError(f"LogisticRegression needs exactly 2 classes in y, got {len(classes)}: {classes[:10]}")
        self.classes_ = classes
        return (y == classes[1]).astype(np.float64)

    def predict_proba(self, X, offset=None):
        """Columns P(classes_[0]), P(classes_[1])."""
        from pipeline.families import expit

        p = expit(np.asarray(self.decision_function(X, offset)))
        return np.column_stack([1.0 - p, p])

    def predict(self, X, offset=None):
        """classes_[1] iff z > 0 (p > 0.5), the rule gradpipe's accuracy metric uses."""
        z = np.asarray(self.decision_function(X, offset))  # first: unfitted is NotFittedError, not a missing classes_
        return self.classes_[(z > 0).astype(np.int64)]

    def score(self, X, y, sample_weight=None, offset=None) -> float:
        """Mean accuracy, like sklearn's classifiers."""
        hit = (self.predict(X, offset) == np.asarray(y)).astype(np.float64)
        return float(np.average(hit, weights=sample_weight))


class _LogLinkRegressor(RegressorMixin, _GradpipeModel):
    """A GLM with a log link: ``predict`` is the mean exp(X·coef_ + intercept_ + offset), ``score`` D²."""

    def _targets(self, y, client):
        return y  # the family's domain (y ≥ 0, y > 0) is checked by training, naming the first bad row

    def predict(self, X, offset=None):
        from pipeline.families import get_family

        return get_family(self._model, power=getattr(self, "power", None)).inverse_link(
            np.asarray(self.decision_function(X, offset)))

    def score(self, X, y, sample_weight=None, offset=None) -> float:
        """D² = 1 − deviance/null deviance, the fraction of deviance explained (scikit-learn's ``score`` for
        its Poisson/Gamma/Tweedie regressors)."""
        from pipeline.families import get_family

        fam = get_family(self._model, power=getattr(self, "power", None))
        y = np.asarray(y, dtype=np.float64)
        w = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        z = np.asarray(self.decision_function(X, offset))
        z0 = np.full_like(z, fam.null_predictor(float(np.average(y, weights=w))))
        return 1.0 - float(w @ fam.loss(z, y)) / float(w @ fam.loss(z0, y))


class PoissonRegressor(_LogLinkRegressor):
    """Poisson regression (log link): mean of w·(unit deviance/2) + elastic net, for counts or rates (give
    ``offset=log(exposure)`` to ``fit`` and ``predict``). scikit-learn's ``PoissonRegressor(alpha=a)`` is
    ``l2=a``; glum's ``alpha``/``l1_ratio`` are the same parameters here."""

    _model = "poisson"


class GammaRegressor(_LogLinkRegressor):
    """Gamma regression (log link; y > 0), e.g. claim severities."""

    _model = "gamma"


class TweedieRegressor(_LogLinkRegressor):
    """Tweedie regression with power 1 < ``power`` < 2 (log link; y ≥ 0): compound Poisson–Gamma, e.g. pure
    premiums with exact zeros."""

    _model = "tweedie"

    def __init__(self, *, power: float = 1.5, **kwargs: Any):
        super().__init__(**kwargs)
        self.power = power

    @classmethod
    def _get_param_names(cls) -> list[str]:
        return sorted({"power", *_GradpipeModel._get_param_names()})
