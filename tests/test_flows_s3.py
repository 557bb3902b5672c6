"""The Prefect flows with every location on object storage (``GRADPIPE_DATA_DIR=s3://…``), as the compose
stack runs them: the settings come from docker-compose.yml's own ``flows`` environment, pointed at a bucket
of the test S3 server (moto on 127.0.0.1) instead of the MinIO service."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from flows.pipeline import pipeline_flow
from pipeline.cli import main
from pipeline.settings import load
from pipeline.store import location
from pipeline.store.runs import RunStore
from pipeline.store.tunes import TuneStore
from tests.conftest import write_csv
from tests.test_compose import ROOT, compose_config
from tests.test_tune_flow import PNG_MAGIC, X, Y, lasso_cv_alpha


@pytest.fixture(scope="module")
def compose_env() -> dict[str, str]:
    r = compose_config(ROOT / "docker-compose.yml")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["services"]["flows"]["environment"]


def settings(compose_env: dict[str, str], bucket: str, scheduler: str, **extra: str) -> dict:
    """The compose flows service's GRADPIPE_* settings with its bucket replaced by the test's."""
    compose_bucket = "s3://" + compose_env["GRADPIPE_DATA_DIR"].removeprefix("s3://").split("/")[0]
    env = {k: v.replace(compose_bucket, bucket) for k, v in compose_env.items() if k.startswith("GRADPIPE_")}
    return load(environ={**env, **extra}, overrides={"scheduler": scheduler, "chunk_mb": 0.02}).to_dict()


def read(uri: str) -> bytes:
    fs, path = location.filesystem(uri)
    fs.invalidate_cache()
    return fs.cat_file(path)


def test_compose_settings_put_everything_in_the_bucket(compose_env, s3_bucket, scheduler):
    s = load(environ={k: v for k, v in compose_env.items() if k.startswith("GRADPIPE_")})
    assert location.is_remote(s.data_dir) and all(location.is_remote(r) for r in s.raw)
    for where in (s.dataset, s.runs_dir, s.tunes_dir, s.models_dir):
        assert where.startswith(s.data_dir + "/"), where
    cfg = settings(compose_env, s3_bucket, scheduler)
    assert cfg["data_dir"].startswith(s3_bucket) and cfg["raw"][0].startswith(s3_bucket)


def test_pipeline_flow_on_s3_makes_data_trains_and_publishes_in_the_bucket(compose_env, s3_bucket, scheduler,
                                                                           prefect_server, tmp_path):
    cfg = settings(compose_env, s3_bucket, scheduler)
    raw = cfg["raw"][0]
    # the README's compose step: make-data straight into the bucket
    assert main(["make-data", "--kind", "linear", "--rows", "3000", "--features", "5", "--files", "2",
                 "--out", raw]) == 0
    result = pipeline_flow(cfg)
    assert result["ingest"]["n_rows"] == 3000 and result["train"]["status"] == "converged"
    run_uri = result["train"]["run_uri"]
    assert run_uri.startswith(f"{cfg['data_dir']}/runs/")
    assert result["publish"]["publish"] and result["metrics"]["r2"] > 0.9
    latest = json.loads(read(f"{cfg['data_dir']}/models/{cfg['name']}/latest.json"))
    assert latest["run_id"] == result["train"]["run_id"]
    assert read(result["loss_curve"])[:8] == PNG_MAGIC and result["loss_curve"].startswith(run_uri)
    # the model is least squares on the bucket's files, read back independently of gradpipe's parser
    rows = np.vstack([np.loadtxt(io.BytesIO(read(f"{raw}/part-{i:05d}.csv")), delimiter=",", skiprows=1)
                      for i in range(2)])
    A = np.column_stack([rows[:, :5], np.ones(len(rows))])
    ref = np.linalg.lstsq(A, rows[:, 5], rcond=None)[0]
    run = RunStore.open(run_uri)
    coef = np.append(run.row("coef", run.committed), run.row("intercept", run.committed))
    # the solver stops at a relative tolerance; 1e-6 of the coefficients' size is far inside what it reaches
    assert np.allclose(coef, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max()), (coef, ref)
    again = pipeline_flow(cfg)  # nothing new: the snapshot is unchanged, a fresh run is gated again
    assert again["ingest"]["appended_files"] == [] and again["ingest"]["snapshot"] == result["ingest"]["snapshot"]


def test_tuned_pipeline_flow_keeps_its_tune_store_in_the_bucket(compose_env, s3_bucket, scheduler, prefect_server,
                                                                tmp_path):
    cfg = settings(compose_env, s3_bucket, scheduler, GRADPIPE_TUNE="1", GRADPIPE_TUNE_CV="5",
                   GRADPIPE_TARGET="y")
    write_csv(tmp_path / "a.csv", X, Y)
    fs, path = location.filesystem(cfg["raw"][0])
    fs.put_file(str(tmp_path / "a.csv"), f"{path}/a.csv")
    result = pipeline_flow(cfg)
    tuned = result["tune"]
    assert tuned["tune_uri"].startswith(f"{cfg['data_dir']}/tunes/") and tuned["png"].startswith(tuned["tune_uri"])
    assert read(tuned["png"])[:8] == PNG_MAGIC
    store = TuneStore.open(tuned["tune_uri"])
    assert store.status == "done" and store.refit == tuned["run_id"]
    assert tuned["alpha"] == lasso_cv_alpha(np.asarray(store.grid)[0])  # scikit-learn's LassoCV on the same folds
    assert result["train"]["run_uri"].startswith(f"{cfg['data_dir']}/runs/") and result["publish"]["publish"]


def test_make_data_into_a_bucket_replaces_only_its_own_output(s3_bucket, tmp_path, capsys):
    out = f"{s3_bucket}/raw/demo"
    args = ["make-data", "--kind", "logistic", "--rows", "400", "--features", "3", "--format", "parquet"]
    assert main([*args, "--files", "3", "--out", out]) == 0
    assert main([*args, "--files", "2", "--out", out]) == 0  # a smaller output: the third part goes
    assert main([*args, "--files", "2", "--out", str(tmp_path / "local")]) == 0
    fs, path = location.filesystem(out)
    fs.invalidate_cache()
    assert sorted(location.name(p) for p in fs.ls(path, detail=False)) == [
        "part-00000.parquet", "part-00001.parquet", "truth.json"]
    for name in ("part-00000.parquet", "part-00001.parquet", "truth.json"):  # byte-identical to a local run
        assert read(f"{out}/{name}") == (tmp_path / "local" / name).read_bytes(), name
    fs.pipe_file(f"{path}/notes.txt", b"mine")
    capsys.readouterr()
    assert main([*args, "--files", "2", "--out", out]) != 0
    assert "not a previous make-data output (it holds notes.txt)" in capsys.readouterr().err
    assert read(f"{out}/notes.txt") == b"mine"
