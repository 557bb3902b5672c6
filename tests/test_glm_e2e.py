"""Poisson/Gamma/Tweedie, sample weights, offsets and the elastic net end to end on the cluster: `gradpipe
ingest --weight/--offset` → train → evaluate/predict/export, against statsmodels, glum and scikit-learn."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.ingest import ingest
from pipeline.store.runs import RunStore
from pipeline.training import resume, train
from tests.conftest import write_csv
from tests.test_resume import assert_same, history, sigkill_training

N, D = 6000, 6


def _data(seed: int = 5):
    """Counts with an exposure, log E[y] = x·β + b + log(exposure); half the features carry nothing; weights
    in [0.5, 2] (precision weights); features with spread scales and means."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 10, size=D)
    X = rng.normal(size=(N, D)) * scale + rng.uniform(-3, 3, size=D)
    beta = rng.normal(scale=0.3, size=D) / scale
    beta[: D // 2] = 0.0
    log_exposure = np.log(rng.uniform(0.5, 2.0, size=N))
    y = rng.poisson(np.exp((X - X.mean(0)) @ beta + 0.5 + log_exposure)).astype(float)
    return X, y, rng.uniform(0.5, 2.0, size=N), log_exposure


@pytest.fixture(scope="module")
def poisson_ds(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("glm")
    X, y, w, off = _data()
    names = [f"x{j}" for j in range(D)]
    write_csv(root / "a.csv", np.column_stack([X, w, off]), y, names=[*names, "w", "log_exposure"])
    assert main(["ingest", str(root / "a.csv"), "--target", "y", "--dataset", str(root / "ds.zarr"),
                 "--weight", "w", "--offset", "log_exposure", "--chunk-mb", "0.02", "--quiet",
                 "--scheduler", client.scheduler.address]) == 0
    return root, X, y, w, off


def _statsmodels(family, X, y, w=None, off=None):
    import statsmodels.api as sm

    return sm.GLM(y, sm.add_constant(X, prepend=False), family=family, offset=off,
                  var_weights=w).fit(tol=1e-13, maxiter=200)


def test_poisson_with_weights_and_an_offset_equals_statsmodels(poisson_ds, client, tmp_path):
    """The issue's bar: a Poisson model with --offset log_exposure equals statsmodels GLM(offset=) to 1e-8."""
    import statsmodels.api as sm

    root, X, y, w, off = poisson_ds
    res = train(root / "ds.zarr", TrainConfig(model="poisson"), client=client, runs_dir=tmp_path)
    assert res.solver == "newton" and res.status == "converged" and res.passes <= 10
    ref = _statsmodels(sm.families.Poisson(), X, y, w, off)
    est = np.append(res.coef, res.intercept)
    # Both solve the same score equations to ~1e-12: IRLS to tol 1e-13, our Newton until a full step of
    # relative size ≤ √tol = 1e-6, which quadratic convergence leaves ~1e-12 from the optimum
    np.testing.assert_allclose(est, ref.params, rtol=0, atol=1e-8 * np.abs(ref.params).max())
    inf = res.inference
    assert inf["available"] and inf["statistic_name"] == "z" and inf["n"] == N
    # the same Hessian at the same optimum: rounding only (1e-8)
    np.testing.assert_allclose(inf["std_error"], ref.bse, rtol=1e-8)
    np.testing.assert_allclose(inf["p_value"], ref.pvalues, rtol=1e-6, atol=1e-300)
    np.testing.assert_allclose([inf["deviance"], inf["aic"], inf["null_deviance"]],
                               [ref.deviance, ref.aic, ref.null_deviance], rtol=1e-9)  # the null model has the offset

    # evaluate: weighted metrics with the offset, against scikit-learn on the same predictions
    from sklearn.metrics import d2_tweedie_score, mean_poisson_deviance

    ev = json.loads(_cli_json(["evaluate", "--run", res.run_uri, "--dataset", str(root / "ds.zarr"), "--scheduler",
                               client.scheduler.address, "--json"]))
    mu = np.exp(X @ res.coef + res.intercept + off)
    # sums over chunks in another order than sklearn's: 1e-10
    assert ev["mean_deviance"] == pytest.approx(mean_poisson_deviance(y, mu, sample_weight=w), rel=1e-10)
    assert ev["d2"] == pytest.approx(d2_tweedie_score(y, mu, sample_weight=w, power=1), rel=1e-10)


def _cli_json(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue().strip().splitlines()[-1]


@pytest.mark.parametrize("solver", ["newton", "lbfgs", "gd"])
def test_elastic_net_poisson_equals_glum_with_exact_zeros(solver, poisson_ds, client, tmp_path):
    """Elastic net with weights and an offset against glum; the zero pattern is exact (0.0, not 1e-17)."""
    from glum import GeneralizedLinearRegressor

    root, X, y, w, off = poisson_ds
    alpha, ratio = 0.2, 0.7  # two of the six coefficients are zero (glum)
    res = train(root / "ds.zarr", TrainConfig(model="poisson", solver=solver, alpha=alpha, l1_ratio=ratio,
                                              max_iter=3000), client=client, runs_dir=tmp_path)
    assert res.status == "converged", res.message
    ref = GeneralizedLinearRegressor(family="poisson", alpha=alpha, l1_ratio=ratio, gradient_tol=1e-12,
                                     max_iter=1000).fit(X, y, sample_weight=w, offset=off)
    zeros = ref.coef_ == 0
    assert 0 < zeros.sum() < D
    assert np.array_equal(res.coef == 0.0, zeros)
    # glum's IRLS-CD stops at gradient_tol 1e-12; ours at gtol 1e-8 on the min-norm subgradient (first-order:
    # the loss-change rule, 1e-12): 1e-6 of the largest coefficient covers both
    np.testing.assert_allclose(np.append(res.coef, res.intercept), np.append(ref.coef_, ref.intercept_),
                               rtol=0, atol=1e-6 * max(np.abs(ref.coef_).max(), abs(ref.intercept_)))
    store = RunStore.open(res.run_uri)
    assert np.array_equal(store.row("coef", store.committed) == 0.0, zeros)  # stored as exact zeros


def test_export_lists_the_selected_features_and_predict_adds_the_offset(poisson_ds, client, tmp_path):
    root, X, y, w, off = poisson_ds
    res = train(root / "ds.zarr", TrainConfig(model="poisson", l1=0.14), client=client, runs_dir=tmp_path)
    assert main(["export", res.run_uri, "--out", str(tmp_path / "m.json")]) == 0
    doc = json.loads((tmp_path / "m.json").read_text())
    chosen = [f"x{j}" for j in range(D) if res.coef[j] != 0.0]
    assert doc["selected_features"] == chosen and 0 < len(chosen) < D and doc["offset"] == "log_exposure"
    names = [f"x{j}" for j in range(D)]
    write_csv(tmp_path / "in.csv", np.column_stack([X[:50], off[:50]]), y[:50], names=[*names, "log_exposure"])
    assert main(["predict", "--run", res.run_uri, "--input", str(tmp_path / "in.csv"), "--out",
                 str(tmp_path / "out.csv")]) == 0
    pred = np.loadtxt(tmp_path / "out.csv", delimiter=",", skiprows=1)[:, -1]
    # z from the exported coefficients, independently: exp of a dot product, 1e-12
    np.testing.assert_allclose(pred, np.exp(X[:50] @ np.array(doc["coef"]) + doc["intercept"] + off[:50]),
                               rtol=1e-12)
    write_csv(tmp_path / "bad.csv", X[:5], y[:5], names=names)  # no offset column
    assert main(["predict", "--run", res.run_uri, "--input", str(tmp_path / "bad.csv"), "--out",
                 str(tmp_path / "o2.csv")]) == 2
    assert not (tmp_path / "o2.csv").exists()


@pytest.mark.parametrize("solver, extra", [("newton", {"l1": 0.01}), ("lbfgs", {"l1": 0.01, "l2": 0.01}),
                                           ("gd", {"l1": 0.01})])
def test_weighted_offset_l1_histories_are_bitwise_identical_on_1_2_and_4_workers(solver, extra, poisson_ds, client,
                                                                                clients_1_and_4, tmp_path):
    root = poisson_ds[0]
    cfg = TrainConfig(model="poisson", solver=solver, max_iter=12, tol=0, gtol=0, fan_in=3, **extra)
    train(root / "ds.zarr", cfg, client=client, runs_dir=tmp_path, run_id="two")
    ref = history(tmp_path, "two")
    assert len(ref["loss"]) >= 5
    for n, c in clients_1_and_4.items():
        train(root / "ds.zarr", cfg, client=c, runs_dir=tmp_path, run_id=f"w{n}")
        assert_same(ref, history(tmp_path, f"w{n}"))


@pytest.mark.parametrize("solver", ["lbfgs", "gd"])
def test_sigkill_then_resume_is_bitwise_for_owlqn_and_fista(solver, poisson_ds, client, scheduler, tmp_path):
    root = poisson_ds[0]
    args = ["--model", "poisson", "--solver", solver, "--l1", "0.01", "--max-iter", "40", "--tol", "0",
            "--gtol", "0"]
    train(root / "ds.zarr", TrainConfig(model="poisson", solver=solver, l1=0.01, max_iter=40, tol=0, gtol=0),
          client=client, runs_dir=tmp_path, run_id="whole")
    sigkill_training(root / "ds.zarr", tmp_path, scheduler, args, at=random.Random().randint(2, 20))
    assert RunStore.open(tmp_path / "cut.zarr").committed < 40
    resume("cut", runs_dir=tmp_path, client=client)
    assert_same(history(tmp_path, "whole"), history(tmp_path, "cut"))


@pytest.mark.parametrize("model, power", [("gamma", None), ("tweedie", 1.3)])
def test_gamma_and_tweedie_with_weights_equal_statsmodels(model, power, client, tmp_path):
    import statsmodels.api as sm

    rng = np.random.default_rng(11)
    X = rng.normal(size=(3000, 3)) * [1.0, 5.0, 0.2] + [0.0, 2.0, -1.0]
    mu = np.exp((X - X.mean(0)) @ np.array([0.3, -0.05, 1.0]) + 1.0)
    y = rng.gamma(2.0, mu / 2.0) if model == "gamma" else rng.poisson(mu / 2) * rng.gamma(2.0, 1.0, size=3000)
    w = rng.uniform(0.2, 3.0, size=3000)
    write_csv(tmp_path / "g.csv", np.column_stack([X, w]), y, names=["a", "b", "c", "w"])
    ingest([str(tmp_path / "g.csv")], tmp_path / "g.zarr", "y", client, chunk_mb=0.02, weight="w")
    res = train(tmp_path / "g.zarr", TrainConfig(model=model, **({"power": power} if power else {})),
                client=client, runs_dir=tmp_path)
    fam = (sm.families.Gamma(sm.families.links.Log()) if model == "gamma"
           else sm.families.Tweedie(var_power=power, link=sm.families.links.Log()))
    ref = _statsmodels(fam, X, y, w)
    # same estimating equations solved to ~1e-12 (see the Poisson test); SEs from the expected information
    # with Pearson's dispersion, as statsmodels: rounding only
    np.testing.assert_allclose(np.append(res.coef, res.intercept), ref.params, rtol=1e-8)
    np.testing.assert_allclose(res.inference["std_error"], ref.bse, rtol=1e-8)
    assert res.inference["dispersion"] == pytest.approx(ref.scale, rel=1e-8)


def test_a_target_outside_the_domain_is_refused_before_a_cluster(tmp_path, client, capsys):
    X = np.random.default_rng(0).normal(size=(200, 2))
    y = np.abs(X[:, 0])
    y[17] = -1.5
    write_csv(tmp_path / "n.csv", X, y)
    ingest([str(tmp_path / "n.csv")], tmp_path / "n.zarr", "y", client)
    assert main(["train", "--dataset", str(tmp_path / "n.zarr"), "--model", "poisson", "--runs-dir",
                 str(tmp_path / "runs"), "--scheduler", "tcp://127.0.0.1:1"]) == 2  # no cluster is reached
    err = capsys.readouterr().err
    assert "poisson" in err and "≥ 0" in err and "-1.5 in row 17" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_prefect_pipeline_trains_a_poisson_model_from_the_environment(tmp_path, scheduler, prefect_server):
    """GRADPIPE_MODEL=poisson and GRADPIPE_OFFSET=… through the settings' environment level: the flow ingests
    the offset, trains IRLS, gates on the mean deviance and publishes."""
    from flows.pipeline import pipeline_flow
    from pipeline.settings import load

    X, y, w, off = _data(seed=8)
    (tmp_path / "raw").mkdir()
    write_csv(tmp_path / "raw" / "a.csv", np.column_stack([X, off]), y, names=[*(f"x{j}" for j in range(D)),
                                                                                "log_exposure"])
    s = load(overrides={"name": "p", "raw": [str(tmp_path / "raw")], "target": "y", "data_dir": str(tmp_path / "d"),
                        "scheduler": scheduler, "chunk_mb": 0.02},
             environ={"GRADPIPE_MODEL": "poisson", "GRADPIPE_OFFSET": "log_exposure"})
    result = pipeline_flow(s.to_dict())
    assert result["train"]["solver"] == "newton" and result["train"]["status"] == "converged"
    latest = json.loads((tmp_path / "d" / "models" / "p" / "latest.json").read_text())
    assert latest["model"] == "poisson" and "mean_deviance" in latest["metrics"] and result["publish"]["publish"]
