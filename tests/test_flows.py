"""The Prefect flows, run for real against a temporary Prefect server and the session's Dask cluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows import tasks
from flows.pipeline import pipeline_flow
from pipeline.settings import load
from pipeline.store.runs import RunStore
from tests.conftest import make_xy, write_csv


def settings_for(root: Path, scheduler: str, **train) -> dict:
    return load(overrides={"name": "t", "raw": [str(root / "raw")], "target": "y", "data_dir": str(root / "data"),
                           "scheduler": scheduler, "chunk_mb": 0.02, **train}).to_dict()


def lstsq(paths: list[Path]):
    rows = np.concatenate([np.loadtxt(p, delimiter=",", skiprows=1, ndmin=2) for p in paths])
    A = np.column_stack([rows[:, :-1], np.ones(len(rows))])
    return np.linalg.lstsq(A, rows[:, -1], rcond=None)[0]


X, Y = make_xy(4000, 4, seed=1)  # a.csv holds the first 3000 rows, b.csv (when the data grows) the rest


@pytest.fixture
def raw(tmp_path):
    (tmp_path / "raw").mkdir()
    write_csv(tmp_path / "raw" / "a.csv", X[:3000], Y[:3000])
    return tmp_path


def test_pipeline_flow_ingests_trains_evaluates_publishes(raw, scheduler, prefect_server):
    result = pipeline_flow(settings_for(raw, scheduler))
    train = result["train"]
    assert result["ingest"]["n_rows"] == 3000 and train["status"] == "converged"
    latest = json.loads((raw / "data" / "models" / "t" / "latest.json").read_text())
    ref = lstsq([raw / "raw" / "a.csv"])
    # the default solver (auto → exact TSQR) is at lstsq accuracy; 1e-6 leaves room for any solver
    np.testing.assert_allclose(latest["coef"], ref[:-1], rtol=1e-6)
    assert train["solver"] == "exact" and latest["inference"]["available"]
    assert latest["run_id"] == train["run_id"] and result["publish"]["publish"]
    assert latest["metrics"]["r2"] > 0.9
    store = RunStore.open(train["run_uri"])
    assert store.attrs["publish"]["publish"] is True and store.attrs["metrics"]["rmse"] > 0
    png = Path(result["loss_curve"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(train["run_uri"]) in png.parents

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    texts = [a.data for a in artifacts if a.key == "gradpipe-t"]
    assert texts and "| iteration | loss |" in texts[-1] and "rmse" in texts[-1]
    assert "![loss curve](data:image/png;base64," in texts[-1]  # inlined: the browser shows the picture
    assert "P>|t|" in texts[-1] and "adjusted R²" in texts[-1]  # the inference table


def test_quality_gate_keeps_the_better_published_model(raw, scheduler, prefect_server):
    first = pipeline_flow(settings_for(raw, scheduler))
    worse = pipeline_flow(settings_for(raw, scheduler, solver="gd", max_iter=1))  # one gd step: clearly worse
    assert worse["publish"]["publish"] is False
    assert worse["publish"]["new"] > worse["publish"]["published"]
    latest = json.loads((raw / "data" / "models" / "t" / "latest.json").read_text())
    assert latest["run_id"] == first["train"]["run_id"]
    assert RunStore.open(worse["train"]["run_uri"]).attrs["publish"]["publish"] is False


def test_grown_dataset_warm_starts_from_the_latest_completed_run(raw, scheduler, prefect_server):
    first = pipeline_flow(settings_for(raw, scheduler))
    write_csv(raw / "raw" / "b.csv", X[3000:], Y[3000:])  # same model, more rows
    second = pipeline_flow(settings_for(raw, scheduler))
    assert second["ingest"]["appended_files"] and second["warm_start"] == first["train"]["run_id"]
    store = RunStore.open(second["train"]["run_uri"])
    assert store.attrs["warm_start"] == first["train"]["run_id"]
    # starting from the previous optimum, the first loss is already near the new optimum
    assert store.column("loss")[0] < 1.5 * store.column("loss")[-1]
    ref = lstsq([raw / "raw" / "a.csv", raw / "raw" / "b.csv"])
    np.testing.assert_allclose(second["train"]["coef"], ref[:-1], rtol=1e-6)
    unchanged = pipeline_flow(settings_for(raw, scheduler))  # nothing new: a fresh run
    assert unchanged["warm_start"] is None


def test_failed_train_attempt_is_retried_and_resumes(raw, scheduler, prefect_server):
    seen: list[tuple[int, int]] = []

    def fault(attempt: int, t: int, rec: dict) -> None:
        seen.append((attempt, t))
        if attempt == 1 and t == 7:
            raise RuntimeError("injected fault at iteration 7")

    cfg = {"solver": "momentum", "max_iter": 30, "tol": 0.0, "gtol": 0.0}
    tasks.ITERATION_HOOKS.append(fault)
    try:
        result = pipeline_flow(settings_for(raw, scheduler, **cfg))
    finally:
        tasks.ITERATION_HOOKS.remove(fault)
    assert (1, 7) in seen and (2, 0) not in seen  # attempt 2 did not start over
    assert min(t for a, t in seen if a == 2) == 8  # it resumed after the committed iteration 7
    assert result["train"]["status"] == "max_iter" and result["train"]["n_iter"] == 30
    ref = pipeline_flow(settings_for(raw, scheduler, **cfg))  # uninterrupted
    a, b = RunStore.open(result["train"]["run_uri"]), RunStore.open(ref["train"]["run_uri"])
    for name in ("theta", "loss", "grad_norm", "lr"):
        assert np.array_equal(a.column(name), b.column(name)), name


def test_the_standalone_flows_chain_ingest_train_evaluate(raw, scheduler, prefect_server):
    from flows.pipeline import evaluate_flow, ingest_flow, train_flow

    cfg = settings_for(raw, scheduler)
    ingested = ingest_flow(cfg)
    assert (ingested["n_rows"], ingested["n_features"]) == (3000, 4)
    trained = train_flow(cfg, run_id="standalone")
    assert trained["run_id"] == "standalone" and trained["status"] == "converged"
    np.testing.assert_allclose(trained["coef"], lstsq([raw / "raw" / "a.csv"])[:-1], rtol=1e-6)  # as above
    metrics = evaluate_flow(trained["run_uri"], cfg)
    # R² from the lstsq residuals (an independent reference). SSR is quadratic around the optimum, so the
    # ~1e-9 relative coefficient error of a gtol-1e-8 run moves R² by far less than 1e-9.
    rows = np.loadtxt(raw / "raw" / "a.csv", delimiter=",", skiprows=1)
    resid = rows[:, -1] - np.column_stack([rows[:, :-1], np.ones(len(rows))]) @ lstsq([raw / "raw" / "a.csv"])
    r2 = 1 - resid @ resid / ((rows[:, -1] - rows[:, -1].mean()) ** 2).sum()
    assert metrics["r2"] == pytest.approx(r2, rel=1e-9)
    assert not (raw / "data" / "models").exists()  # only pipeline_flow publishes


def test_warm_start_is_recorded_when_the_retry_resumes(raw, scheduler, prefect_server):
    first = pipeline_flow(settings_for(raw, scheduler))
    write_csv(raw / "raw" / "b.csv", X[3000:], Y[3000:])

    def fault(attempt: int, t: int, rec: dict) -> None:
        if attempt == 1 and t == 2:
            raise RuntimeError("injected fault at iteration 2")

    tasks.ITERATION_HOOKS.append(fault)
    try:
        second = pipeline_flow(settings_for(raw, scheduler, solver="momentum", max_iter=10, tol=0.0, gtol=0.0))
    finally:
        tasks.ITERATION_HOOKS.remove(fault)
    assert second["warm_start"] == first["train"]["run_id"]
    assert RunStore.open(second["train"]["run_uri"]).attrs["warm_start"] == first["train"]["run_id"]
