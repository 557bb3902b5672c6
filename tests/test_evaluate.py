"""``evaluate``: cluster metrics of a run's final θ equal sklearn.metrics on the same data and θ.

References are independent of gradpipe's metric code: the data comes from the CSV written by the test,
θ is read from the run store with plain Zarr, and every metric is computed by sklearn.metrics on
NumPy predictions. Tolerances: the sums differ from sklearn's only in summation order and in how z is
rounded, ~n·eps ≈ 1e-12 relative for n ≤ 3000, so 1e-9 relative cannot hide a wrong formula (e.g. a
missing row or a wrong denominator moves them by ≥ 1e-4). AUC is checked against the proven bound
``roc_auc_max_error`` (pairs in different bins are ranked exactly; same-bin pairs count ½).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from sklearn import metrics

from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.errors import GradpipeError
from pipeline.evaluate import evaluate, load_model
from pipeline.families import auc_from_histograms
from pipeline.ingest import ingest
from pipeline.training import train
from tests.conftest import make_xy, write_csv


def final_model(run) -> tuple[np.ndarray, float]:
    """Last committed row, read with plain Zarr (the store is trimmed to its committed rows)."""
    g = zarr.open_group(str(run), mode="r")
    t = g.attrs["committed"]
    return np.asarray(g["coef"][t]), float(g["intercept"][t])


@pytest.fixture(scope="module")
def linear(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("eval_linear")
    X, y = make_xy(2000, 4, seed=3)
    Xh, yh = make_xy(700, 4, seed=4)  # held out: other data, same columns
    ingest([str(write_csv(root / "train.csv", X, y))], root / "train.zarr", "y", client, chunk_mb=0.01)
    ingest([str(write_csv(root / "test.csv", Xh, yh))], root / "test.zarr", "y", client, chunk_mb=0.01)
    res = train(root / "train.zarr", TrainConfig(max_iter=15), client=client, runs_dir=root / "runs", run_id="lin")
    return root, res, (X, y), (Xh, yh)


@pytest.fixture(scope="module")
def logistic(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("eval_logistic")
    rng = np.random.default_rng(7)
    X = rng.normal(size=(3000, 3)) * [1.0, 5.0, 0.2] + [0.0, 10.0, -1.0]
    z = ((X - [0.0, 10.0, -1.0]) / [1.0, 5.0, 0.2]) @ [1.5, -1.0, 0.5] + 0.3
    y = (rng.uniform(size=3000) < 1 / (1 + np.exp(-z))).astype(float)
    ingest([str(write_csv(root / "d.csv", X, y))], root / "d.zarr", "y", client, chunk_mb=0.01)
    res = train(root / "d.zarr", TrainConfig(model="logistic", max_iter=20), client=client,
                runs_dir=root / "runs", run_id="log")
    return root, res, (X, y)


def test_linear_metrics_equal_sklearn_on_train_and_held_out(linear, client):
    root, res, train_xy, test_xy = linear
    coef, b = final_model(root / "runs" / "lin.zarr")
    for name, (X, y) in (("train", train_xy), ("test", test_xy)):
        got = evaluate(root / "runs" / "lin.zarr", root / f"{name}.zarr", client)
        pred = X @ coef + b
        mse = metrics.mean_squared_error(y, pred)
        assert got["n"] == len(y) and got["model"] == "linear" and got["iteration"] == res.n_iter
        np.testing.assert_allclose(got["mse"], mse, rtol=1e-9)
        np.testing.assert_allclose(got["rmse"], np.sqrt(mse), rtol=1e-9)
        np.testing.assert_allclose(got["r2"], metrics.r2_score(y, pred), rtol=1e-9)


def test_r2_survives_a_large_target_offset(tmp_path, client, linear):
    """|ȳ| ≫ std(y): the textbook Σy² − (Σy)²/n loses every digit; the centred second pass does not."""
    root, *_ = linear
    X, y = make_xy(500, 4, seed=3)
    y = y + 1e9
    ingest([str(write_csv(tmp_path / "big.csv", X, y))], tmp_path / "big.zarr", "y", client, chunk_mb=0.01)
    coef, b = final_model(root / "runs" / "lin.zarr")
    got = evaluate(root / "runs" / "lin.zarr", tmp_path / "big.zarr", client)
    pred = X @ coef + b
    np.testing.assert_allclose(got["r2"], metrics.r2_score(y, pred), rtol=1e-6)


def test_logistic_metrics_and_auc_equal_sklearn(logistic, client):
    root, res, (X, y) = logistic
    coef, b = final_model(root / "runs" / "log.zarr")
    got = evaluate(root / "runs" / "log.zarr", root / "d.zarr", client)
    z = X @ coef + b
    p = 1 / (1 + np.exp(-z))
    assert got["n"] == 3000 and got["model"] == "logistic"
    np.testing.assert_allclose(got["log_loss"], metrics.log_loss(y, p), rtol=1e-9)
    assert got["accuracy"] == metrics.accuracy_score(y, p > 0.5)  # a count: exact
    exact = metrics.roc_auc_score(y, p)
    # The bound is proven (module docstring); with 1/128-logit bins it is ~1e-3 here, and the true error
    # is far smaller (within-bin concordance is ½ to first order), so also require < bound / 10.
    assert 0 < got["roc_auc_max_error"] < 2e-3
    assert abs(got["roc_auc"] - exact) <= got["roc_auc_max_error"] / 10


def test_auc_from_histograms_is_exact_when_each_score_has_its_own_bin():
    """Integer scores, one bin per value: ties are the only same-bin pairs, and sklearn counts them ½ too."""
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 50, size=5000)
    y = (rng.uniform(size=5000) < scores / 60).astype(int)
    pos = np.bincount(scores[y == 1], minlength=50).astype(float)
    neg = np.bincount(scores[y == 0], minlength=50).astype(float)
    auc, bound = auc_from_histograms(pos, neg)
    assert abs(auc - metrics.roc_auc_score(y, scores)) < 1e-12
    assert bound > 0  # (ties exist; the bound is loose here by design)
    assert np.isnan(auc_from_histograms(pos, np.zeros(50))[0])  # one class: undefined


def test_dataset_with_other_features_is_refused(tmp_path, linear, client):
    root, *_ = linear
    X, y = make_xy(300, 4, seed=5)
    write_csv(tmp_path / "o.csv", X, y, names=["x0", "x1", "x3", "x2"])  # same names, other order
    ingest([str(tmp_path / "o.csv")], tmp_path / "o.zarr", "y", client)
    with pytest.raises(GradpipeError, match=r"features \['x0', 'x1', 'x3', 'x2'\].*trained on"):
        evaluate(root / "runs" / "lin.zarr", tmp_path / "o.zarr", client)


def test_logistic_run_on_a_non_binary_target_is_refused(linear, logistic, client):
    root_lin, *_ = linear
    root, *_ = logistic
    X, y = make_xy(200, 3, seed=1)
    write_csv(root / "nb.csv", X, y)
    ingest([str(root / "nb.csv")], root / "nb.zarr", "y", client)
    with pytest.raises(GradpipeError, match="outside 0/1 values"):
        evaluate(root / "runs" / "log.zarr", root / "nb.zarr", client)


def test_load_model_is_the_final_row(logistic):
    root, res, _ = logistic
    m = load_model(root / "runs" / "log.zarr")
    coef, b = final_model(root / "runs" / "log.zarr")
    assert np.array_equal(m["coef"], coef) and m["intercept"] == b
    assert (m["model"], m["run_id"], m["n_iter"], m["status"], m["target"]) == \
        ("logistic", "log", res.n_iter, res.status, "y")
    assert m["feature_names"] == ["x0", "x1", "x2"] and m["loss"] == res.loss


def test_cli_evaluate_json_and_errors(linear, scheduler, capsys, client):
    root, *_ = linear
    args = ["evaluate", "--run", "lin", "--runs-dir", str(root / "runs"), "--dataset", str(root / "test.zarr"),
            "--scheduler", scheduler]
    assert main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == evaluate(root / "runs" / "lin.zarr", root / "test.zarr", client)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mse" in out and "r2" in out
    assert main(["evaluate", "--run", "nope", "--runs-dir", str(root / "runs"), "--dataset",
                 str(root / "test.zarr")]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_cli_json_stays_valid_when_a_metric_is_undefined(linear, tmp_path, scheduler, capsys, client):
    """R² of a constant target is undefined (0/0): the JSON says null, never the non-standard NaN."""
    root, *_ = linear
    X, _ = make_xy(50, 4, seed=9)
    ingest([str(write_csv(tmp_path / "c.csv", X, np.full(50, 3.0)))], tmp_path / "c.zarr", "y", client)
    assert main(["evaluate", "--run", "lin", "--runs-dir", str(root / "runs"), "--dataset", str(tmp_path / "c.zarr"),
                 "--scheduler", scheduler, "--json"]) == 0

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    got = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert got["r2"] is None and got["mse"] > 0
