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
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import sklearn.linear_model as sk
from sklearn.base import clone
from sklearn.datasets import load_diabetes
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score

import pipeline.engine
import pipeline.estimators as est
from pipeline.estimators import LinearRegression, LogisticRegression

INIT = {"solver": "auto", "lr": "auto", "l2": 0.0, "l1": 0.0, "alpha": None,
        "l1_ratio": None, "max_iter": 500, "tol": None, "gtol": 1e-8, "standardize": True,
        "beta": 0.9, "history": 10, "batch_chunks": 1, "schedule": "adaptive", "power_t": 0.25, "early_stopping": False,
        "validation_fraction": 0.1, "n_iter_no_change": 5, "seed": 0, "fan_in": 8, "persist": "auto",
        "chunk_rows": None, "client": None, "runs_dir": None}


def test_estimator_defaults_are_the_trainers_and_bad_values_are_value_errors():
    from pipeline.config import TrainConfig

    defaults = TrainConfig().to_json()
    shared = {k: v for k, v in INIT.items() if k in defaults}
    assert len(shared) == 21 and shared == {k: defaults[k] for k in shared}
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
        m.set_params(C=1.0)
    assert "l2=0.25" in repr(m)
    with pytest.raises(mod.NotFittedError) as info:  # sklearn's contract without sklearn: both bases
        m.predict(np.ones((2, 3)))
    assert isinstance(info.value, ValueError) and isinstance(info.value, AttributeError)


# ---- where a fit runs: in-process for small NumPy data, the same bits as a cluster --------------------
ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, body: str, **kw) -> subprocess.Popen:
    """``python script.py`` as a user runs it: a top-level script, no ``__main__`` guard."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    env["TMPDIR"] = str(tmp_path / "tmp")  # where fit's temporary stores go: checked empty afterwards
    (tmp_path / "tmp").mkdir()
    return subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cross_val_score_in_process_matches_sklearn(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    X, y = load_diabetes(return_X_y=True)
    t0 = time.perf_counter()
    ours = cross_val_score(LinearRegression(), X, y, cv=5)
    seconds = time.perf_counter() - t0
    ref = cross_val_score(sk.LinearRegression(), X, y, cv=5)
    print(f"cross_val_score cv=5 in-process: {seconds:.2f} s")
    # both are exact least squares (ours: TSQR, sklearn: lstsq); the diabetes design has cond ~ 1e2 after
    # standardization, so R² agrees to ~1e-13; 1e-9 leaves room, while any wrong fit moves R² by ≫ 1e-4
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)
    assert not est._shared  # no cluster was created for it


def test_unfitted_estimators_raise_sklearns_not_fitted_error():
    X = np.ones((3, 2))
    for call in (LinearRegression().predict, LinearRegression().score, LogisticRegression().predict,
                 LogisticRegression().predict_proba, LogisticRegression().score):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            call(X) if call.__name__.startswith("pred") else call(X, np.ones(3))


@pytest.mark.parametrize("model, solver", [("linear", "lbfgs"), ("linear", "exact"), ("logistic", "newton")])
def test_in_process_is_bitwise_the_cluster(client, monkeypatch, model, solver):
    """Same leaves, kernels and tree: the same bits, whether both workers or none take part."""
    monkeypatch.setattr(pipeline.engine, "MIN_BYTES_PER_WORKER", 1)  # spread even tiny data over both workers
    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
    X = design(1200, 3)
    if model == "linear":
        y, cls = X @ [2.0, -1.0, 0.05] + 7.0 + np.random.default_rng(4).normal(size=1200), LinearRegression
    else:
        y, cls = binary(X, 4), LogisticRegression
    # 12 leaves, fan-in 3: worker 0 combines complete sub-trees, the driver the rest — a different split of
    # the same tree than the in-process engine's, which must not change a bit
    kw = {"solver": solver, "chunk_rows": 100, "fan_in": 3, "l2": 1e-3, "max_iter": 50}
    a = cls(client=client, **kw).fit(X, y)
    b = cls(client="inprocess", **kw).fit(X, y)
    assert a.solver_ == b.solver_ == solver and a.n_iter_ == b.n_iter_ >= 1
    assert a.loss_history_.tobytes() == b.loss_history_.tobytes()
    assert a.coef_.tobytes() == b.coef_.tobytes() and a.intercept_ == b.intercept_


def test_script_without_main_guard_fits_in_process_and_ctrl_c_stops_a_long_fit(tmp_path):
    """One interpreter for two behaviours (start-up is most of the cost): a top-level script with no
    ``__main__`` guard fits and predicts in-process, then a long fit gets a terminal's Ctrl-C."""
    from pipeline.store.runs import RunStore

    proc = run_script(tmp_path, """
        import json, pathlib, sys, psutil, numpy as np
        import pipeline, pipeline.estimators as est
        rng = np.random.default_rng(0)
        X = rng.normal(size=(442, 10)); y = X @ np.arange(10.0) + 3.0
        small = pipeline.LinearRegression().fit(X, y)
        pred = small.predict(X[:5])
        pathlib.Path(sys.argv[1], "small.json").write_text(json.dumps({
            "children": len(psutil.Process().children(recursive=True)), "shared": bool(est._shared),
            "err": float(np.abs(pred - y[:5]).max()), "status": small.status_,
            "tmp": sorted(p.name for p in pathlib.Path(sys.argv[1], "tmp").iterdir())}))
        X = rng.normal(size=(400, 3)); y = X @ [1.0, 2.0, 3.0]
        m = pipeline.LinearRegression(solver="gd", lr=1e-6, tol=0.0, gtol=0.0, max_iter=10**9,
                                      runs_dir=sys.argv[1] + "/runs")
        try:
            m.fit(X, y)
        except KeyboardInterrupt as exc:
            print("interrupted:", exc, "fitted:", hasattr(m, "coef_"))
            sys.exit(130)
    """, start_new_session=True)
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 60
    while True:  # wait until the loop runs: a committed iteration past the first
        stores = list(runs.glob("*.zarr")) if runs.exists() else []
        try:
            if stores and RunStore.open(stores[0]).committed >= 2:
                break
        except Exception:  # the store is being created
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)  # a poll with a deadline, not a fixed wait
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = proc.communicate(timeout=20)
    print(f"stopped {time.monotonic() - t0:.2f} s after SIGINT")
    assert proc.returncode == 130, err
    small = json.loads((tmp_path / "small.json").read_text())
    # no worker process was ever spawned (a LocalCluster's nannies would be children), the module started no
    # client, the per-fit temporary stores are gone; noise-free y: exact least squares recovers it to
    # rounding (1e-9 ≫ cond·eps for this well-conditioned design)
    assert small == {"children": 0, "shared": False, "err": small["err"], "status": "converged", "tmp": []}
    assert small["err"] < 1e-9 and "bootstrapping" not in err
    assert "stopped by signal SIGINT" in out and "fitted: False" in out
    store = RunStore.open(stores[0])
    assert store.status == "stopped" and store.committed >= 2
    # the stopped run resumes in-process (no cluster) for three more iterations
    from pipeline.training import resume

    stopped_at = store.committed
    done = resume(stores[0].name.removesuffix(".zarr"), runs_dir=runs, client="inprocess",
                  max_iter=stopped_at + 3)
    assert done.status == "max_iter" and done.n_iter == stopped_at + 3
    assert not est._shared


def test_fits_that_need_a_cluster_share_one_client(scheduler, monkeypatch):
    """A scheduler address (here via $DASK_SCHEDULER_ADDRESS) means a cluster: one client for every fit."""
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", scheduler)
    X = design(300, 5)
    y = X @ [1.0, 2.0, 3.0] + 1.0
    try:
        a = LinearRegression(solver="exact").fit(X, y)
        first = est._shared["client"]
        b = LinearRegression(solver="exact").fit(X, y)
        assert est._shared["client"] is first and first.scheduler.address == scheduler
        assert a.coef_.tobytes() == b.coef_.tobytes()
    finally:
        est.close_shared_client()
    assert not est._shared and first.status == "closed"
