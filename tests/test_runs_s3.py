"""Run stores, models, predictions and exports on a real S3 API (moto's server on 127.0.0.1): every result is
compared with the same operation on local paths, which the rest of the suite checks against references.

The datasets stay local (datasets on s3 are tests/test_s3_pipeline.py's); only what this layer writes — run
stores, leases, PNGs, model JSON, prediction files — lives in the bucket.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import pipeline.store.runs as runs_mod
from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.errors import GradpipeError
from pipeline.estimators import write_dataset
from pipeline.evaluate import evaluate, load_model
from pipeline.publish import exclusive, latest_completed_run, publish, read_published
from pipeline.report import loss_curve_data_uri, loss_curve_path, write_loss_curve
from pipeline.store import location, locks
from pipeline.store.runs import RunStore
from pipeline.training import INPROCESS, resume, train
from tests.conftest import make_xy, write_csv
from tests.test_resume import assert_same

GD = {"solver": "gd", "tol": 0, "gtol": 0, "standardize": False}  # a long, never-converging trajectory


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs-s3")
    X, y = make_xy(1200, 3, seed=41)
    write_dataset(root / "ds.zarr", X, y, INPROCESS, chunk_rows=300)
    write_csv(root / "in.csv", X[:200], y[:200])
    return root


def fs_of(uri: str):
    return location.filesystem(uri)


def put(local: Path, uri: str) -> str:
    fs, path = fs_of(uri)
    fs.put_file(str(local), path)
    return uri


def cat(uri: str | Path) -> bytes:
    fs, path = fs_of(str(uri))
    fs.invalidate_cache()
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    fs, path = fs_of(uri)
    fs.invalidate_cache()
    return fs.exists(path)


def fit(data: Path, runs_dir, run_id: str, max_iter: int, client=INPROCESS, **cfg):
    return train(data / "ds.zarr", TrainConfig(max_iter=max_iter, **{**GD, **cfg}), client=client,
                 runs_dir=runs_dir, run_id=run_id)


def test_training_on_s3_equals_local_bitwise_and_the_cli_reads_it(data, client, s3_bucket, tmp_path, capsys):
    runs = f"{s3_bucket}/runs"
    assert main(["train", "--dataset", str(data / "ds.zarr"), "--runs-dir", runs, "--run-id", "r", "--solver", "gd",
                 "--tol", "0", "--gtol", "0", "--no-standardize", "--max-iter", "12",
                 "--scheduler", client.scheduler.address, "--json"]) == 0
    remote = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    local = fit(data, tmp_path, "r", 12, client=client)
    assert remote["run_uri"] == f"{runs}/r.zarr" and local.run_uri == str((tmp_path / "r.zarr").absolute())
    assert remote["loss_curve"] == f"{runs}/r.zarr/report/loss_curve.png"
    a, b = RunStore.open(remote["run_uri"]).history(), RunStore.open(tmp_path / "r.zarr").history()
    assert sorted(a) == sorted(b) and len(a["loss"]) == 13
    assert_same(b, a)  # theta, grad, loss … bit for bit
    assert exists(f"{runs}/r.zarr/zarr.json") and not exists(f"{runs}/.r.zarr.lock")  # released

    # runs list / show: the same facts as for the local directory (less where it is and when it started)
    def cli_json(*args: str):
        assert main(list(args)) == 0
        return json.loads(capsys.readouterr().out)

    drop = ("path", "started")
    listed = cli_json("runs", "list", "--runs-dir", runs, "--json")
    ref = cli_json("runs", "list", "--runs-dir", str(tmp_path), "--json")
    assert [{k: v for k, v in r.items() if k not in drop} for r in listed] == \
        [{k: v for k, v in r.items() if k not in drop} for r in ref] and listed[0]["path"] == f"{runs}/r.zarr"
    def history(shown: dict) -> list[dict]:  # all but the wall-clock seconds repeat exactly
        return [{k: v for k, v in h.items() if k != "elapsed"} for h in shown["history"]]

    shown, ref = (cli_json("runs", "show", "r", "--runs-dir", d, "--json") for d in (runs, str(tmp_path)))
    assert history(shown) == history(ref) and shown["coef"] == ref["coef"] and shown["damage"] is None
    assert history(cli_json("runs", "show", f"{runs}/r.zarr", "--json")) == history(ref)  # by its URI
    assert main(["runs", "show", "nope", "--runs-dir", runs]) == 2
    assert f"no run 'nope': neither a run store path nor a run id in {runs}" in capsys.readouterr().err

    # evaluate reads the model from s3: the same metrics
    assert main(["evaluate", "--run", "r", "--runs-dir", runs, "--dataset", str(data / "ds.zarr"),
                 "--scheduler", client.scheduler.address, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == evaluate(tmp_path / "r.zarr", data / "ds.zarr", client)

    # the loss curve lives in the store's report group, as locally
    png = write_loss_curve(remote["run_uri"])  # rewritten (after a resume): replaced
    assert png == loss_curve_path(remote["run_uri"]) == remote["loss_curve"]
    assert cat(png)[:8] == b"\x89PNG\r\n\x1a\n" and loss_curve_data_uri(png).startswith("data:image/png;base64,")
    assert sorted(RunStore.open(remote["run_uri"]).array_names()) == sorted(a)  # the report group is no array


def test_predict_and_export_from_and_to_s3_equal_local(data, s3_bucket, tmp_path, capsys):
    runs = f"{s3_bucket}/runs"
    fit(data, runs, "p", 15)
    fit(data, tmp_path / "runs", "p", 15)
    src = put(data / "in.csv", f"{s3_bucket}/in/in.csv")
    pq.write_table(pacsv.read_csv(data / "in.csv"), tmp_path / "in.parquet", row_group_size=64)
    src_pq = put(tmp_path / "in.parquet", f"{s3_bucket}/in/in.parquet")
    for fin, fout in ((src, "csv"), (src_pq, "parquet"), (src, "parquet")):
        local_in = data / "in.csv" if fin.endswith(".csv") else tmp_path / "in.parquet"
        out, ref = f"{s3_bucket}/out/pred.{fout}", tmp_path / f"pred.{fout}"
        assert main(["predict", "--run", "p", "--runs-dir", runs, "--input", fin, "--out", out]) == 0
        assert main(["predict", "--run", "p", "--runs-dir", str(tmp_path / "runs"), "--input", str(local_in),
                     "--out", str(ref)]) == 0
        capsys.readouterr()
        if fout == "csv":
            assert cat(out) == ref.read_bytes()
        else:
            assert pq.read_table(pa.BufferReader(cat(out))).equals(pq.read_table(ref))
    fs, _ = fs_of(s3_bucket)
    assert sorted(location.name(p) for p in fs.ls(f"{s3_bucket}/out".removeprefix("s3://"), refresh=True)) == \
        ["pred.csv", "pred.parquet"]

    # a prediction that fails half-way leaves the old object as it was, and no other
    bad = (data / "in.csv").read_text().splitlines()
    bad[150] = ",".join(["x", *bad[150].split(",")[1:]])
    (tmp_path / "bad.csv").write_text("\n".join(bad) + "\n")
    put(tmp_path / "bad.csv", f"{s3_bucket}/in/bad.csv")
    before = cat(f"{s3_bucket}/out/pred.csv")
    assert main(["predict", "--run", "p", "--runs-dir", runs, "--input", f"{s3_bucket}/in/bad.csv",
                 "--out", f"{s3_bucket}/out/pred.csv"]) == 2
    assert "row 150, column 'x0': 'x' is not a number" in capsys.readouterr().err
    assert cat(f"{s3_bucket}/out/pred.csv") == before

    # export: the same document as the local run's, whichever side it is written to
    assert main(["export", "p", "--runs-dir", runs, "--out", f"{s3_bucket}/models/p.json"]) == 0
    assert main(["export", "p", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    assert cat(f"{s3_bucket}/models/p.json") == (tmp_path / "p.json").read_bytes()


def test_publish_to_an_s3_models_dir(data, s3_bucket, tmp_path):
    runs, models = f"{s3_bucket}/runs", f"{s3_bucket}/models/m"
    fit(data, runs, "old", 5)
    time.sleep(0.01)  # "newest" is by start time
    fit(data, runs, "new", 8)
    dataset = RunStore.open(f"{runs}/new.zarr").dataset.uri
    assert latest_completed_run(runs, dataset, "linear").run_id == "new"
    assert latest_completed_run(f"{s3_bucket}/nothing", dataset, "linear") is None
    assert read_published(models) is None
    with exclusive(models):
        assert exists(f"{s3_bucket}/models/m/.latest.json.lock")
        target = publish(models, load_model(f"{runs}/new.zarr"), {"mse": 1.5})
    assert target == f"{models}/latest.json" and not exists(f"{s3_bucket}/models/m/.latest.json.lock")
    doc = read_published(models)
    assert doc["run_id"] == "new" and doc["metrics"] == {"mse": 1.5}
    assert json.loads(cat(f"{models}/new.json")) == doc
    local = tmp_path / "models"
    publish(local, load_model(f"{runs}/new.zarr"), {"mse": 1.5})
    assert cat(f"{models}/latest.json") == (local / "latest.json").read_bytes()


def test_a_deleted_chunk_object_rewinds_the_resume(data, s3_bucket, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runs_mod, "CHUNK_BYTES", 8 * 4 * 8)  # 8 rows per chunk of theta (4 values), coef (3)
    runs = f"{s3_bucket}/runs"
    fit(data, tmp_path, "ref", 40)
    fit(data, runs, "cut", 27)  # rows 0..27: coef's chunk 3 holds rows 24..27
    store = RunStore.open(f"{runs}/cut.zarr")
    arr = store._array("coef")
    key = f"{runs}/cut.zarr/coef/{arr.metadata.encode_chunk_key((3, 0))}"
    assert store.damage(27) is None
    fs, path = fs_of(key)
    fs.rm_file(path)
    assert store.damage(27) == ("coef chunk 3: its file coef/c/3/0 is missing", 23)
    assert main(["runs", "show", "cut", "--runs-dir", runs]) == 0  # DAMAGED is flagged, not shown as numbers
    with pytest.raises(GradpipeError, match="the model at row 27 is damaged"):
        store.require_model()
    with caplog.at_level(logging.WARNING, logger="gradpipe.train"):
        resume("cut", runs_dir=runs, client=INPROCESS, max_iter=40)
    assert any("rows" in r.getMessage() and "..27 are damaged (coef chunk 3" in r.getMessage()
               for r in caplog.records)
    assert_same(RunStore.open(tmp_path / "ref.zarr").history(), RunStore.open(f"{runs}/cut.zarr").history())
    RunStore.open(f"{runs}/cut.zarr").require_model()


def test_a_second_trainer_is_refused_while_the_first_holds_the_lease(data, s3_bucket, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.2)  # the heartbeat runs while the first trainer waits
    runs = f"{s3_bucket}/runs"
    fit(data, runs, "x", 3)
    at_row, go, errors = threading.Event(), threading.Event(), []

    def first() -> None:
        def hold(t, _rec) -> None:
            if t == 4:
                at_row.set()
                go.wait(30)
        try:
            resume("x", runs_dir=runs, client=INPROCESS, max_iter=8, on_iteration=hold)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert at_row.wait(30)
        held = json.loads(cat(f"{runs}/.x.zarr.lock"))
        time.sleep(0.5)  # the holder refreshes its heartbeat
        assert json.loads(cat(f"{runs}/.x.zarr.lock"))["heartbeat"] > held["heartbeat"]
        msg = "run x is being trained or resumed by another gradpipe process; wait for it to finish."
        with pytest.raises(GradpipeError, match=msg):
            resume("x", runs_dir=runs, client=INPROCESS, max_iter=10)
        with pytest.raises(GradpipeError, match=msg):  # a new run with the same id neither
            with runs_mod.run_lock(f"{runs}/x.zarr"):
                pass
    finally:
        go.set()
        thread.join(60)
    assert not errors and RunStore.open(f"{runs}/x.zarr").committed == 8
    assert not exists(f"{runs}/.x.zarr.lock")


def test_a_stale_lease_is_taken_over_and_a_fresh_foreign_one_is_not(data, s3_bucket, caplog):
    runs = f"{s3_bucket}/runs"
    fit(data, runs, "y", 3)
    fs, path = fs_of(f"{runs}/.y.zarr.lock")
    fs.pipe_file(path, json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "heartbeat": time.time()}).encode())
    with pytest.raises(GradpipeError, match="run y is being trained or resumed by another gradpipe process"):
        resume("y", runs_dir=runs, client=INPROCESS, max_iter=5)
    assert json.loads(cat(f"{runs}/.y.zarr.lock"))["host"] == "elsewhere"  # refused, not removed
    stale = time.time() - locks.STALE_S - 5  # its holder was SIGKILLed a minute ago
    fs.pipe_file(path, json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "heartbeat": stale}).encode())
    with caplog.at_level(logging.WARNING, logger="gradpipe.locks"):
        assert resume("y", runs_dir=runs, client=INPROCESS, max_iter=5).n_iter == 5
    assert any("taking over the stale lock" in r.getMessage() for r in caplog.records)
    assert not exists(f"{runs}/.y.zarr.lock")


def test_two_takers_of_one_stale_lease_cannot_both_win(s3_bucket):
    target = f"{s3_bucket}/runs/z.zarr"
    a, b = locks.Lease(target), locks.Lease(target)
    fs, path = fs_of(a.uri)
    fs.pipe_file(path, json.dumps({"heartbeat": time.time() - 3600}).encode())
    etag, content = a.current()
    assert locks.stale(content) and b.current()[0] == etag
    assert a.take_over(etag) is True
    assert b.take_over(etag) is False  # its delete names the stale version, which is gone
    assert json.loads(cat(a.uri))["token"] == a.owner["token"]
    assert b.refresh() is False and a.refresh() is True
    a.release()
    assert not exists(a.uri)
