"""The pipeline against a real S3 API (moto's server on 127.0.0.1): raw files and datasets on s3, through the
same code as against AWS; the local-path pipeline is the reference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import TrainConfig
from pipeline.errors import GradpipeError
from pipeline.evaluate import evaluate
from pipeline.ingest import ingest, sources
from pipeline.store import location
from pipeline.store.dataset import open_dataset, read_info
from pipeline.training import resume, train
from tests.conftest import dataset_state, make_xy, write_csv
from tests.test_resume import assert_same, history, sigkill_training


def put(local, uri: str) -> str:
    fs, path = location.filesystem(uri)
    fs.put_file(str(local), path)
    return uri


@pytest.fixture
def raw(tmp_path, s3_bucket, monkeypatch):
    """The same rows as CSV (several pieces), Parquet (several row groups) and npy, locally and on s3."""
    monkeypatch.setattr(sources, "PIECE_BYTES", 8192)  # many byte-range pieces per CSV file
    X, y = make_xy(900, 4, seed=31)
    write_csv(tmp_path / "a.csv", X[:300], y[:300])
    names = [f"x{i}" for i in range(4)]
    table = pa.table({**{n: X[300:600, i] for i, n in enumerate(names)}, "y": y[300:600]})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=70)
    np.save(tmp_path / "c.npy", np.column_stack([X[600:], y[600:]]))
    local = [str(tmp_path / n) for n in ("a.csv", "b.parquet", "c.npy")]
    remote = [put(p, f"{s3_bucket}/raw/{os.path.basename(p)}") for p in local]
    return {"X": X, "y": y, "local": local, "remote": remote, "bucket": s3_bucket}


def test_ingest_from_s3_into_s3_equals_local(tmp_path, client, raw):
    # Each format its own dataset (npy columns are col0…, a different schema): exact equality, the
    # parser is the same code reading byte ranges instead of a local file.
    for i, target in enumerate(["y", "y", "4"]):
        local = ingest([raw["local"][i]], tmp_path / f"l{i}.zarr", target, client, chunk_mb=0.004)
        remote = ingest([raw["remote"][i]], f"{raw['bucket']}/datasets/r{i}", target, client, chunk_mb=0.004)
        a, b = open_dataset(local.dataset), open_dataset(remote.dataset)
        assert np.array_equal(a.X.compute(), b.X.compute()) and np.array_equal(a.y.compute(), b.y.compute())
        assert b.n_rows == 300 and b.manifest[0]["path"] == raw["remote"][i]
    # A glob over the bucket and a re-run that finds nothing new.
    ds = f"{raw['bucket']}/datasets/glob"
    first = ingest([f"{raw['bucket']}/raw/*.csv"], ds, "y", client)
    again = ingest([f"{raw['bucket']}/raw/*.csv"], ds, "y", client)
    assert again.appended_files == [] and again.snapshot == first.snapshot


def test_requests_per_object_reads_the_same_rows(tmp_path, client, raw, monkeypatch):
    """The storage option capping Icechunk's concurrent ranged GETs per chunk object changes how a dataset is
    read, not what (the local dataset is the reference); s3fs, which would reject it, never receives it (the
    driver lists, plans and reads raw objects with it set); a bad value is refused, naming the option."""
    local = ingest([raw["local"][0]], tmp_path / "l.zarr", "y", client, chunk_mb=0.004)
    monkeypatch.setenv(location.OPTIONS_ENV, '{"requests_per_object": 1}')
    assert location.icechunk_config(raw["bucket"]) is not None and location.icechunk_config(tmp_path) is None
    remote = ingest([f"{raw['bucket']}/raw/a.*"], f"{raw['bucket']}/datasets/rpo", "y", client, chunk_mb=0.004)
    a, b = open_dataset(local.dataset), open_dataset(remote.dataset)
    assert b.n_chunks > 1
    assert np.array_equal(a.X.compute(scheduler="sync"), b.X.compute(scheduler="sync"))  # read in this process
    monkeypatch.setenv(location.OPTIONS_ENV, '{"requests_per_object": 0}')
    with pytest.raises(GradpipeError, match="requests_per_object must be a whole number ≥ 1, not 0"):
        open_dataset(f"{raw['bucket']}/datasets/other")


def test_changed_object_is_detected_by_its_etag(tmp_path, client, raw):
    ds = f"{raw['bucket']}/datasets/etag"
    ingest([raw["remote"][0]], ds, "y", client)
    write_csv(tmp_path / "a.csv", *make_xy(300, 4, seed=99))
    put(tmp_path / "a.csv", raw["remote"][0])
    with pytest.raises(GradpipeError, match="changed since it was ingested"):
        ingest([raw["remote"][0]], ds, "y", client)


def test_bad_remote_input_is_named(tmp_path, client, raw):
    with pytest.raises(GradpipeError, match=rf"{raw['bucket']}/raw/none.csv does not exist"):
        ingest([f"{raw['bucket']}/raw/none.csv"], f"{raw['bucket']}/datasets/x", "y", client)
    bad = write_csv(tmp_path / "bad.csv", *make_xy(40, 4))
    lines = bad.read_text().splitlines()
    lines[1] = "1,2,x,4,5"
    bad.write_text("\n".join(lines) + "\n")
    uri = put(bad, f"{raw['bucket']}/raw/bad.csv")
    with pytest.raises(GradpipeError, match=rf"{uri}: line 2, column 'x2'"):
        ingest([uri], f"{raw['bucket']}/datasets/x", "y", client)
    with pytest.raises(GradpipeError, match="does not exist"):
        read_info(f"{raw['bucket']}/datasets/x")


def test_train_evaluate_and_sigkill_resume_on_an_s3_dataset(tmp_path, client, scheduler, s3_bucket):
    X, y = make_xy(6000, 5, seed=32)
    src = put(write_csv(tmp_path / "a.csv", X, y), f"{s3_bucket}/raw/a.csv")
    ds = f"{s3_bucket}/datasets/train"
    ingest([src], ds, "y", client, chunk_mb=0.05)  # 5 chunks: several tasks per pass, few requests
    exact = train(ds, TrainConfig(solver="exact", standardize=False), client=client, runs_dir=tmp_path, run_id="ex")
    ref = np.linalg.lstsq(np.column_stack([X, np.ones(len(X))]), y, rcond=None)[0]
    assert np.allclose([*exact.coef, exact.intercept], ref, rtol=1e-8, atol=1e-8)  # TSQR vs LAPACK rounding
    metrics = evaluate(tmp_path / "ex.zarr", ds, client=client)
    resid = y - np.column_stack([X, np.ones(len(X))]) @ ref
    assert metrics["mse"] == pytest.approx(float(resid @ resid / len(y)), rel=1e-9)
    cfg = ["--solver", "adam", "--max-iter", "25", "--tol", "0", "--gtol", "0", "--seed", "5", "--persist", "no"]
    train(ds, TrainConfig(solver="adam", max_iter=25, tol=0, gtol=0, seed=5, persist="no"), client=client,
          runs_dir=tmp_path, run_id="whole")
    sigkill_training(ds, tmp_path, scheduler, cfg, at=10)
    assert resume("cut", runs_dir=tmp_path, client=client).status == "max_iter"
    assert_same(history(tmp_path, "whole"), history(tmp_path, "cut"))  # bitwise, streamed from s3 both times


def test_sigkill_during_an_s3_ingest_commits_nothing(tmp_path, client, scheduler, s3_bucket):
    ds = f"{s3_bucket}/datasets/kill"
    ingest([put(write_csv(tmp_path / "a.csv", *make_xy(500, 6)), f"{s3_bucket}/raw/a.csv")], ds, "y", client,
           chunk_mb=0.01)  # ~200 rows a chunk: the append writes ~75 chunk objects
    before, rows = dataset_state(ds), open_dataset(ds).X.compute()
    big = put(write_csv(tmp_path / "big.csv", *make_xy(15_000, 6, seed=2)), f"{s3_bucket}/raw/big.csv")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", big, "--target", "y", "--dataset", ds,
                             "--scheduler", scheduler],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs, root = location.filesystem(f"{ds}/chunks")
    n_before = len(fs.ls(root, refresh=True))
    deadline = time.monotonic() + 120
    while len(fs.ls(root, refresh=True)) <= n_before:  # the append's chunk objects are being written
        assert proc.poll() is None, "ingest ended before it could be killed"
        assert time.monotonic() < deadline, "the ingest wrote no chunks within 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert dataset_state(ds)[:2] == before[:2]
    assert np.array_equal(open_dataset(ds).X.compute(), rows)
    assert ingest([big], ds, "y", client).n_rows == 15_500  # and the next ingest succeeds
