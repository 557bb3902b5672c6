"""Cross-validated tuning (issue 9): folds, the α path, shared passes, selection, the refit, durability.

References are independent: scikit-learn's ElasticNetCV / ElasticNet and glum's GeneralizedLinearRegressorCV /
alpha-search fits, given the same folds as ``cv=`` splits and the same α grid, and plain NumPy for gradient
descent. Our folds are rebuilt with :func:`pipeline.folds.fold_ids`, the documented definition.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from glum import GeneralizedLinearRegressor, GeneralizedLinearRegressorCV
from sklearn.linear_model import ElasticNet, ElasticNetCV

from pipeline.config import TrainConfig
from pipeline.errors import GradpipeError
from pipeline.estimators import write_dataset
from pipeline.folds import fold_ids
from pipeline.path import screened_solve, select
from pipeline.solvers.cd import l1_quadratic
from pipeline.store.dataset import open_dataset
from pipeline.store.runs import RunStore
from pipeline.training import train
from pipeline.tune import TuneConfig, resume_tune, tune
from tests.conftest import wait_until

K = 5


def splits(n: int, k: int = K, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    f = fold_ids(0, n, k, seed)
    return [(np.flatnonzero(f != j), np.flatnonzero(f == j)) for j in range(k)]


def correlated(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d)) @ np.linalg.cholesky(0.5 * np.eye(d) + 0.5).T
    return Z * rng.uniform(0.5, 20, size=d) + rng.uniform(-5, 5, size=d)  # unequal scales and offsets


@pytest.fixture(scope="module")
def linear_data(tmp_path_factory):
    X = correlated(3000, 8, 0)
    coef = np.array([2, -1, 0, 0, 0.5, 0, 0, 0.1]) / X.std(axis=0)
    y = X @ coef + 1 + np.random.default_rng(1).normal(size=len(X))
    path = tmp_path_factory.mktemp("lin") / "d.zarr"
    write_dataset(path, X, y, "inprocess", chunk_rows=700)
    return X, y, path


def glm_data(tmp: Path, family: str, n: int = 4000, seed: int = 1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)) * [1, 2, 0.5, 1, 3, 1] + 1
    eta = X @ np.array([0.8, -0.25, 0, 0, 0.1, 0]) - 0.5
    y = ((rng.random(n) < 1 / (1 + np.exp(-eta))) if family == "logistic" else rng.poisson(np.exp(0.5 * eta)))
    path = tmp / f"{family}.zarr"
    write_dataset(path, X, y.astype(float), "inprocess", chunk_rows=900)
    return X, y.astype(float), path


def run_tune(path: Path, tmp: Path, **cfg):
    return tune(path, TuneConfig(**cfg), client="inprocess", runs_dir=tmp / "runs", tunes_dir=tmp / "tunes")


# ---- folds ---------------------------------------------------------------------------------------------
def test_folds_are_a_function_of_the_row_index_and_balanced():
    f = fold_ids(0, 100_000, 5, seed=3)
    # the same rows asked for piecewise (as leaves do) get the same folds
    assert np.array_equal(np.concatenate([fold_ids(a, 10_000, 5, seed=3) for a in range(0, 100_000, 10_000)]), f)
    counts = np.bincount(f, minlength=5)
    # multinomial: sd = √(n·p(1−p)) ≈ 126; 5 sd bounds a fair hash with overwhelming probability
    assert np.all(np.abs(counts - 20_000) < 5 * 126), counts
    assert not np.array_equal(f, fold_ids(0, 100_000, 5, seed=4))  # the seed changes them
    # no structure in the row order: consecutive rows are as often in the same fold as chance says (1/5)
    assert abs(np.mean(f[1:] == f[:-1]) - 0.2) < 0.01


def test_folds_and_results_are_the_same_on_1_and_4_workers(clients_1_and_4, tmp_path):
    X, y, path = glm_data(tmp_path, "logistic", n=6000)
    out = {n: tune(path, TuneConfig(model="logistic", n_alphas=8, refit=False), client=c,
                   runs_dir=tmp_path / f"r{n}", tunes_dir=tmp_path / f"t{n}")
           for n, c in clients_1_and_4.items()}
    assert np.array_equal(out[1].deviance, out[4].deviance)  # bit for bit: the fixed tree, the row-index folds
    assert np.array_equal(out[1].coef_path, out[4].coef_path)
    assert out[1].best == out[4].best


# ---- linear: one pass of per-fold R factors ---------------------------------------------------------
@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
def test_linear_path_matches_scikit_learn_elasticnetcv(linear_data, tmp_path, l1_ratio):
    X, y, path = linear_data
    res = run_tune(path, tmp_path, model="linear", l1_ratios=[l1_ratio])
    assert res.passes == 1 and res.refit.passes == 1  # the whole CV in one pass, the refit (exact) in one more
    sk = ElasticNetCV(l1_ratio=l1_ratio, alphas=res.alphas[0], cv=splits(len(y)), tol=1e-12, max_iter=100_000).fit(X, y)
    # both solve every fold's problem to ~1e-12 (CD with tol 1e-12 vs our CD refined from R): MSEs agree to far
    # below 1e-9, and the selection is the same α
    assert np.max(np.abs(sk.mse_path_ - res.deviance[0])) < 1e-9
    assert sk.alpha_ == res.alpha
    # the α grid from α_max = max|Xᵀ(y − ȳ)|/(n·r), scikit-learn's definition, down 1e-3 on a log scale
    Xc = X - X.mean(axis=0)
    top = np.max(np.abs(Xc.T @ (y - y.mean()))) / (len(y) * l1_ratio)
    np.testing.assert_allclose(res.alphas[0][[0, -1]], [top, top * 1e-3], rtol=1e-12)
    for k in (0, 3):
        tr = splits(len(y))[k][0]
        for j in (0, 1, 30, 99):  # path coefficients of one fold to 1e-6, as the issue asks
            m = ElasticNet(alpha=res.alphas[0, j], l1_ratio=l1_ratio, tol=1e-14, max_iter=100_000).fit(X[tr], y[tr])
            np.testing.assert_allclose(res.coef_path[0, j, k], m.coef_, atol=1e-6)
            assert abs(res.intercept_path[0, j, k] - m.intercept_) < 1e-6
    # the refit is a normal run at the chosen α (scikit-learn's refit on all rows)
    np.testing.assert_allclose(res.refit.coef, sk.coef_, atol=1e-6)
    store = RunStore.open(res.refit.run_uri)
    assert store.tuning["alpha"] == res.alpha and store.tuning["tune_id"] == res.tune_id


def test_two_l1_ratios_are_tuned_together(linear_data, tmp_path):
    X, y, path = linear_data
    grid = np.geomspace(1.0, 1e-3, 30)  # scikit-learn takes one grid for all l1 ratios
    res = run_tune(path, tmp_path, model="linear", l1_ratios=[0.2, 0.9], alpha_grid=list(grid))
    sk = ElasticNetCV(l1_ratio=[0.2, 0.9], alphas=grid, cv=splits(len(y)), tol=1e-12, max_iter=100_000)
    sk.fit(X, y)
    assert (sk.l1_ratio_, sk.alpha_) == (res.l1_ratio, res.alpha)
    assert np.max(np.abs(sk.mse_path_ - res.deviance)) < 1e-9


# ---- IRLS families: all folds and α in the same passes ---------------------------------------------------
@pytest.mark.parametrize("family, glum_family", [("logistic", "binomial"), ("poisson", "poisson")])
def test_glm_path_matches_glum_cv_with_few_passes(tmp_path, family, glum_family):
    X, y, path = glm_data(tmp_path, family)
    res = run_tune(path, tmp_path, model=family, n_alphas=30)
    cv = splits(len(y))
    g = GeneralizedLinearRegressorCV(family=glum_family, alphas=res.alphas[0], l1_ratio=1.0, cv=cv,
                                     gradient_tol=1e-12, max_iter=1000).fit(X, y)
    assert g.alpha_ == res.alpha
    # both stop within ~1e-8 of every fold's optimum (Newton's √tol step rule; glum's gradient_tol 1e-12), and the
    # deviance is flat at an optimum: deviances agree to 1e-6 and better
    glum_dev = np.asarray(g.deviance_path_).reshape(K, -1).T
    assert np.max(np.abs(glum_dev - res.deviance[0])) < 1e-6
    for k in (0, 4):
        m = GeneralizedLinearRegressor(family=glum_family, alpha_search=True, alphas=res.alphas[0], l1_ratio=1.0,
                                       gradient_tol=1e-12, max_iter=1000).fit(X[cv[k][0]], y[cv[k][0]])
        np.testing.assert_allclose(res.coef_path[0, :, k], m.coef_path_, atol=1e-6)
        np.testing.assert_allclose(res.intercept_path[0, :, k], m.intercept_path_, atol=1e-6)
    np.testing.assert_allclose(res.refit.coef, g.coef_, atol=1e-6)
    # the pass budget: a single Newton fit at the chosen α from zero, against the whole CV + refit
    single = train(path, TrainConfig(model=family, alpha=res.alpha, l1_ratio=1.0), client="inprocess",
                   runs_dir=tmp_path / "single")
    assert res.total_passes <= 3 * single.passes, (res.passes, res.refit.passes, single.passes)


def test_the_1se_rule_takes_the_largest_alpha_within_one_standard_error(tmp_path):
    X, y, path = glm_data(tmp_path, "logistic")
    best = run_tune(path, tmp_path, model="logistic", n_alphas=30, refit=False)
    one = run_tune(path, tmp_path, model="logistic", n_alphas=30, refit=False, select="1se")
    dev = best.deviance[0]
    mean, se = dev.mean(axis=1), dev.std(axis=1, ddof=1) / np.sqrt(K)  # glmnet's cvm and cvsd
    i = int(np.argmin(mean))
    assert best.alpha == best.alphas[0, i]
    within = np.flatnonzero(mean <= mean[i] + se[i])
    assert one.alpha == best.alphas[0, within].max() and one.alpha >= best.alpha
    assert np.array_equal(one.deviance, best.deviance)  # the rule chooses; the fits are the same


# ---- learning rates: candidates as columns of one θ matrix --------------------------------------------------
def test_lr_grid_matches_numpy_gradient_descent_per_fold(linear_data, tmp_path):
    X, y, path = linear_data
    lrs, steps = [0.05, 0.2, 0.4, 50.0], 25  # stable below 2/λ_max(H) ≈ 2/4.5 (ρ = 0.5, 8 features)
    res = run_tune(path, tmp_path, model="linear", lr_grid=lrs, max_iter=steps, l2=0.01)
    assert res.passes == steps + 1  # one pass for θ₀ and one per step, for every fold and candidate at once
    stats = open_dataset(path).stats  # the problem's standardization (the ingest statistics) is part of it:
    mean, s = stats.mean, stats.scale()  # gradient descent's iterates depend on the coordinates
    for k, (tr, ho) in enumerate(splits(len(y))):
        A = np.column_stack([(X[tr] - mean) / s, np.ones(len(tr))])
        B = np.column_stack([(X[ho] - mean) / s, np.ones(len(ho))])
        for g, lr in enumerate(lrs[:3]):
            theta = np.zeros(A.shape[1])
            for _ in range(steps):  # gradient of ½ mean (Aθ − y)² + (λ₂/2)‖θ_w/s‖²
                grad = A.T @ (A @ theta - y[tr]) / len(tr)
                grad[:-1] += 0.01 * theta[:-1] / s**2
                theta = theta - lr * grad
            dev = np.mean((B @ theta - y[ho]) ** 2)
            # 25 steps of the same arithmetic in another order: agreement to rounding, far below 1e-8
            assert abs(res.deviance[g, k] - dev) < 1e-8 * max(1.0, dev)
    assert np.all(np.isinf(res.deviance[3]))  # lr 50 diverges: out, with an infinite deviance
    assert res.lr == lrs[int(np.argmin(res.deviance.mean(axis=1)))]
    assert res.refit.solver == "gd" and res.refit.n_iter == steps


# ---- the path's pieces ---------------------------------------------------------------------------------
def test_strong_rule_screening_gives_the_unscreened_solution():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(200, 12))
    H = A.T @ A / 200
    g = rng.normal(size=12)
    theta0 = np.zeros(12)
    a = np.full(12, 0.6 * np.max(np.abs(g)))
    exact = l1_quadratic(H, g, theta0, a).theta
    # discard every coordinate, the worst screening possible: the KKT check must bring the right ones back
    screened = screened_solve(H, g, theta0, a, theta0, np.ones(12, bool))
    np.testing.assert_allclose(screened, exact, atol=1e-12)
    assert np.count_nonzero(exact) not in (0, 12)


def test_select_rules_on_a_known_table():
    alphas = np.array([[8.0, 4.0, 2.0, 1.0]])
    mean = np.array([[3.0, 1.5, 1.0, 1.2]])
    se = np.array([[0.1, 0.1, 0.6, 0.1]])
    assert select(mean, se, alphas, "min") == (0, 2)
    assert select(mean, se, alphas, "1se") == (0, 1)  # 1.5 ≤ 1.0 + 0.6, and α = 4 is the largest such


# ---- durability -----------------------------------------------------------------------------------------
def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "tune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_is_bitwise_an_uninterrupted_tune(tmp_path):
    X, y, path = glm_data(tmp_path, "logistic", n=60_000)
    common = ["--dataset", str(path), "--model", "logistic", "--alphas", "60", "--workers", "2",
              "--tunes-dir", str(tmp_path / "tunes"), "--runs-dir", str(tmp_path / "runs"), "--json"]
    whole = _cli(*common, "--tune-id", "whole")
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    reference = json.loads(out)
    victim = _cli(*common, "--tune-id", "victim")
    meta = tmp_path / "tunes" / "victim.zarr" / "zarr.json"

    def committed() -> int:
        try:
            return json.loads(meta.read_text())["attributes"]["committed"]
        except (OSError, ValueError, KeyError):
            return -1

    wait_until(lambda: committed() >= 2 or victim.poll() is not None, 240, "two committed outer iterations",
               poll_s=0.02)
    assert victim.poll() is None, "the tune finished before it could be killed: make it longer"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    killed_at = committed()
    assert 2 <= killed_at < reference["passes"] - 1
    resumed = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--resume", "victim", "--workers", "2",
                              "--tunes-dir", str(tmp_path / "tunes"), "--runs-dir", str(tmp_path / "runs"),
                              "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads(resumed.stdout)
    for key in ("deviance", "mean", "se", "alphas", "best", "alpha", "passes"):
        assert again[key] == reference[key], key  # JSON floats round-trip float64 exactly: bit for bit
    a = zarr.open_group(str(tmp_path / "tunes" / "whole.zarr"), mode="r")["state/theta"][-1]
    b = zarr.open_group(str(tmp_path / "tunes" / "victim.zarr"), mode="r")["state/theta"][-1]
    assert np.array_equal(a, b)
    assert again["refit"]["coef"] == reference["refit"]["coef"]


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_settings_are_named(linear_data, tmp_path):
    _, _, path = linear_data
    for cfg, flag in [({"cv": 1}, "--cv"), ({"select": "best"}, "--select"), ({"l1_ratios": [1.5]}, "--l1-ratio"),
                      ({"lr_grid": [0.1], "select": "1se"}, "--select"), ({"lr_grid": [-1.0]}, "--lr-grid"),
                      ({"alpha_grid": [0.0]}, "--alpha-grid")]:
        with pytest.raises(GradpipeError, match=flag):
            run_tune(path, tmp_path, **cfg)
    assert not (tmp_path / "tunes").exists() or not any((tmp_path / "tunes").iterdir())


def test_a_dataset_with_an_offset_is_refused_before_any_pass(tmp_path):
    X, y, _ = glm_data(tmp_path, "poisson", n=500)
    path = tmp_path / "off.zarr"
    write_dataset(path, X, y, "inprocess", offset=np.zeros(len(y)))
    with pytest.raises(GradpipeError, match="offset"):
        run_tune(path, tmp_path, model="poisson")
    assert not (tmp_path / "tunes").exists()


def test_cli_tune_prints_the_choice_and_refit(linear_data, tmp_path):
    _, _, path = linear_data
    done = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--dataset", str(path), "--alphas", "10",
                           "--workers", "1", "--tunes-dir", str(tmp_path / "t"), "--runs-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "passes: 1 (tune) + 1 (refit) = 2" in done.stdout and "→" in done.stdout
    refit = next((tmp_path / "r").glob("*-refit.zarr"))
    shown = subprocess.run([sys.executable, "-m", "pipeline", "runs", "show", str(refit)], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "tuned      by tune" in shown.stdout and "(5 folds, min rule)" in shown.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--resume", "nope", "--tunes-dir",
                          str(tmp_path / "t")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "does not exist" in bad.stderr


def test_resume_of_a_finished_tune_repeats_its_result(linear_data, tmp_path):
    _, _, path = linear_data
    first = run_tune(path, tmp_path, model="linear", n_alphas=10)
    again = resume_tune(first.tune_id, tunes_dir=tmp_path / "tunes", runs_dir=tmp_path / "runs", client="inprocess")
    assert np.array_equal(first.deviance, again.deviance) and again.alpha == first.alpha
    assert again.refit.run_id == first.refit.run_id and np.array_equal(again.refit.coef, first.refit.coef)


def test_sample_weights_match_scikit_learn_weighted_cv(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 5))
    y = X @ [1, -1, 0, 0.3, 0] + rng.normal(size=2000)
    w = rng.uniform(0.2, 3, 2000)
    path = tmp_path / "w.zarr"
    write_dataset(path, X, y, "inprocess", chunk_rows=500, w=w)
    res = run_tune(path, tmp_path, n_alphas=20)
    sk = ElasticNetCV(l1_ratio=1.0, alphas=res.alphas[0], cv=splits(2000), tol=1e-12, max_iter=100_000)
    sk.fit(X, y, sample_weight=w)
    # scikit-learn weighs both the training loss and the held-out MSE by w, as we do; same tolerance argument
    # as the unweighted test
    assert sk.alpha_ == res.alpha
    assert np.max(np.abs(sk.mse_path_ - res.deviance[0])) < 1e-9
    np.testing.assert_allclose(res.refit.coef, sk.coef_, atol=1e-6)


def test_a_newton_tune_too_wide_for_memory_is_refused_before_anything_is_written(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "wide.zarr"
    write_dataset(path, rng.normal(size=(40, 800)), (rng.random(40) < 0.5).astype(float), "inprocess")
    with pytest.raises(GradpipeError, match="GiB of Grams per pass; use fewer --alphas"):
        run_tune(path, tmp_path, model="logistic")  # 500 models × 801² floats = 2.6 GB per pass
    assert not (tmp_path / "tunes").exists()


@pytest.mark.parametrize("weighted", [False, True])
def test_fold_kernels_against_dense_numpy(weighted):
    from pipeline.families import get_family
    from pipeline.folds import chunk_fold_newton, chunk_fold_qr, fold_layout

    rng = np.random.default_rng(5)
    n, d, start = 5000, 4, 12_345  # the leaf starts inside the dataset: folds are of the global row index
    X, y = rng.normal(size=(n, d)) * 3 + 1, (rng.random(n) < 0.4).astype(float)
    w = rng.uniform(0.1, 2, n) if weighted else None
    mean, scale = X.mean(axis=0), X.std(axis=0)
    thetas = rng.normal(size=(7, d + 1)) * 0.3
    model_fold = np.array([0, 1, 2, 0, 1, 2, 2])
    out = chunk_fold_newton(X, y, w, None, start, "logistic", 3, 7, thetas, model_fold, mean, scale, True, True)
    at = fold_layout(d + 1, gram=True)
    f = fold_ids(start, n, 3, 7)
    A = np.column_stack([(X - mean) / scale, np.ones(n)])
    fam = get_family("logistic")
    ww = np.ones(n) if w is None else w
    for m, (theta, k) in enumerate(zip(thetas, model_fold, strict=True)):
        z = A @ theta
        p = 1 / (1 + np.exp(-z))
        tr, ho = f != k, f == k
        # sums over a few thousand rows in another order: agreement to ~1e-12 relative
        np.testing.assert_allclose(out[m, at["loss"]][0], ww[tr] @ fam.loss(z[tr], y[tr]), rtol=1e-12)
        np.testing.assert_allclose(out[m, at["grad"]], A[tr].T @ (ww[tr] * (p[tr] - y[tr])), rtol=1e-10, atol=1e-9)
        H = (A[tr] * (ww[tr] * p[tr] * (1 - p[tr]))[:, None]).T @ A[tr]
        np.testing.assert_allclose(out[m, at["gram"]].reshape(d + 1, d + 1), H, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(out[m, at["ho_loss"]][0], ww[ho] @ fam.loss(z[ho], y[ho]), rtol=1e-12)
        np.testing.assert_allclose(out[m, at["ho_grad"]], A[ho].T @ (ww[ho] * (p[ho] - y[ho])), rtol=1e-10, atol=1e-9)
        assert out[m, at["n"]][0] == pytest.approx(ww[tr].sum(), rel=1e-13)
        assert out[m, at["ho_n"]][0] == pytest.approx(ww[ho].sum(), rel=1e-13)
    R = chunk_fold_qr(X, y, w, None, start, 3, 7, mean, scale)
    for k in range(3):
        B = np.column_stack([np.ones(n), (X - mean) / scale, y])[f == k] * np.sqrt(ww[f == k])[:, None]
        # R is unique up to the signs of its rows: compare RᵀR with BᵀB
        np.testing.assert_allclose(R[k].T @ R[k], B.T @ B, rtol=1e-10, atol=1e-8)


def test_a_target_outside_the_domain_leaves_no_tune_store_and_the_id_can_start_again(tmp_path):
    X, y, _ = glm_data(tmp_path, "poisson", n=500)
    path = tmp_path / "neg.zarr"
    write_dataset(path, X, y - 5.0, "inprocess")
    with pytest.raises(GradpipeError, match="y"):
        tune(path, TuneConfig(model="poisson"), client="inprocess", runs_dir=tmp_path / "r",
             tunes_dir=tmp_path / "t", tune_id="again")
    assert not (tmp_path / "t" / "again.zarr").exists()
    (tmp_path / "t" / "again.zarr").mkdir(parents=True)  # as a kill while creating the store leaves it
    ok = tune(tmp_path / "poisson.zarr", TuneConfig(model="poisson", n_alphas=5, refit=False), client="inprocess",
              runs_dir=tmp_path / "r", tunes_dir=tmp_path / "t", tune_id="again")
    assert ok.tune_id == "again" and ok.status == "done"
