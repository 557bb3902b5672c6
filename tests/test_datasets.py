"""Versioned, transactional datasets (Icechunk) on a local directory and on a real S3 API server (moto):
commits and their log, D@SNAPSHOT, rollback, failed and concurrent ingests, runs pinned to their snapshot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.errors import GradpipeError
from pipeline.ingest.run import ingest
from pipeline.store import dataset as dsmod
from pipeline.store.dataset import open_dataset, read_info
from pipeline.training import resume, train
from tests.conftest import dataset_state, make_xy, write_csv


def _upload(local, uri: str) -> str:
    from pipeline.store import location

    fs, path = location.filesystem(uri)
    fs.put_file(str(local), path)
    return uri


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """Where the raw files and the dataset live: a directory, or a fresh bucket on the moto server."""
    if request.param == "local":
        return {"raw": lambda p: str(p), "dataset": str(tmp_path / "ds.zarr"), "runs": str(tmp_path / "runs")}
    bucket = request.getfixturevalue("s3_bucket")
    return {"raw": lambda p: _upload(p, f"{bucket}/raw/{p.name}"), "dataset": f"{bucket}/datasets/demo",
            "runs": str(tmp_path / "runs")}


def test_each_ingest_is_a_commit_and_old_versions_stay_readable(tmp_path, client, where):
    Xa, ya = make_xy(300, 3, seed=1)
    Xb, yb = make_xy(200, 3, seed=2)
    a = where["raw"](write_csv(tmp_path / "a.csv", Xa, ya))
    b = where["raw"](write_csv(tmp_path / "b.csv", Xb, yb))
    ds = where["dataset"]
    first = ingest([a], ds, "y", client, chunk_mb=0.002)
    second = ingest([b], ds, "y", client, chunk_mb=0.002)
    assert first.snapshot != second.snapshot and second.n_rows == 500
    log = dsmod.log(ds)
    assert [e["snapshot"] for e in log[:2]] == [second.snapshot, first.snapshot]
    assert "b.csv" in log[0]["message"] and log[0]["metadata"]["added"] == [b]
    assert log[0]["metadata"]["n_rows"] == 500 and log[1]["metadata"]["n_rows"] == 300
    # The tip holds both files' rows; the first snapshot still holds exactly the first file's (float64 CSV
    # round-trips exactly, so equality is exact).
    assert np.array_equal(open_dataset(ds).X.compute(), np.vstack([Xa, Xb]))
    old = open_dataset(f"{ds}@{first.snapshot}")
    assert old.n_rows == 300 and np.array_equal(old.X.compute(), Xa) and np.array_equal(old.y.compute(), ya)


def test_train_on_an_older_snapshot_records_it(tmp_path, client, where):
    Xa, ya = make_xy(400, 3, seed=3)
    a = where["raw"](write_csv(tmp_path / "a.csv", Xa, ya))
    b = where["raw"](write_csv(tmp_path / "b.csv", *make_xy(300, 3, seed=4)))
    ds = where["dataset"]
    first = ingest([a], ds, "y", client, chunk_mb=0.002)
    ingest([b], ds, "y", client, chunk_mb=0.002)
    fit = train(f"{ds}@{first.snapshot}", TrainConfig(solver="exact", standardize=False), client=client,
                runs_dir=where["runs"], run_id="old")
    # Exact least squares on the first file's rows only: the independent reference is numpy's lstsq.
    ref = np.linalg.lstsq(np.column_stack([Xa, np.ones(len(Xa))]), ya, rcond=None)[0]
    assert np.allclose([*fit.coef, fit.intercept], ref, rtol=1e-8, atol=1e-8)  # TSQR vs LAPACK: rounding only
    from pipeline.store.runs import RunStore

    meta = RunStore.open(fit.run_uri).dataset
    assert (meta.uri, meta.snapshot, meta.n_rows) == (read_info(ds).path, first.snapshot, 400)


def test_rollback_makes_an_older_version_current_and_can_be_undone(tmp_path, client, where, capsys):
    a = where["raw"](write_csv(tmp_path / "a.csv", *make_xy(100, 2, seed=5)))
    b = where["raw"](write_csv(tmp_path / "b.csv", *make_xy(50, 2, seed=6)))
    ds = where["dataset"]
    first = ingest([a], ds, "y", client)
    second = ingest([b], ds, "y", client)
    assert main(["datasets", "rollback", ds, first.snapshot]) == 0
    assert f"it was at {second.snapshot}" in capsys.readouterr().out
    assert (read_info(ds).snapshot, read_info(ds).n_rows) == (first.snapshot, 100)
    assert main(["datasets", "log", ds, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["snapshot"] == first.snapshot
    assert main(["datasets", "rollback", ds, second.snapshot]) == 0  # undo: the later snapshot still exists
    assert read_info(ds).n_rows == 150
    assert main(["datasets", "rollback", ds, "NOSUCHSNAPSHOT000000"]) == 2
    assert "has no snapshot 'NOSUCHSNAPSHOT000000'" in capsys.readouterr().err
    assert read_info(ds).n_rows == 150


def test_failed_ingest_commits_nothing(tmp_path, client, where):
    a = where["raw"](write_csv(tmp_path / "a.csv", *make_xy(500, 2, seed=7)))
    ds = where["dataset"]
    ingest([a], ds, "y", client, chunk_mb=0.002)
    before = dataset_state(ds)
    X0 = open_dataset(ds).X.compute()
    bad = write_csv(tmp_path / "b.csv", *make_xy(400, 2, seed=8))
    lines = bad.read_text().splitlines()
    lines[399] = lines[399].replace(",", ",oops", 1)
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(GradpipeError, match=r"b\.csv: line 400"):
        ingest([where["raw"](bad)], ds, "y", client, chunk_mb=0.002)
    assert dataset_state(ds) == before  # same tip, same history, no writer branch left
    assert np.array_equal(open_dataset(ds).X.compute(), X0)


def test_failed_first_ingest_leaves_no_dataset(tmp_path, client, where):
    bad = write_csv(tmp_path / "a.csv", *make_xy(50, 2))
    bad.write_text(bad.read_text().replace("\n", "\nnot,a,row\n", 1))
    with pytest.raises(GradpipeError, match="line 2"):
        ingest([where["raw"](bad)], where["dataset"], "y", client)
    with pytest.raises(GradpipeError, match="does not exist"):
        read_info(where["dataset"])


def test_two_concurrent_ingests_cannot_both_commit(tmp_path, client, s3_bucket):
    """On an object store there is no lock: B commits while A is writing; A's commit must fail, not
    overwrite B's rows. (A local dataset refuses the second writer at once: its lock.)"""
    ds = f"{s3_bucket}/datasets/race"
    base = _upload(write_csv(tmp_path / "base.csv", *make_xy(100, 2, seed=9)), f"{s3_bucket}/raw/base.csv")
    ingest([base], ds, "y", client)
    a = _upload(write_csv(tmp_path / "a.csv", *make_xy(300, 2, seed=10)), f"{s3_bucket}/raw/a.csv")
    b = _upload(write_csv(tmp_path / "b.csv", *make_xy(70, 2, seed=11)), f"{s3_bucket}/raw/b.csv")
    done = {}

    def race(*_):  # runs inside A, after A's first piece is parsed: A has begun its transaction
        if not done:
            done["b"] = ingest([b], ds, "y", client)

    with pytest.raises(GradpipeError, match="changed while this write ran .* nothing was committed"):
        ingest([a], ds, "y", client, chunk_mb=0.002, on_piece=race)
    info = read_info(ds)
    assert (info.snapshot, info.n_rows) == (done["b"].snapshot, 170)
    assert [m["path"] for m in info.manifest] == [base, b]
    again = ingest([a], ds, "y", client)  # the rerun appends to the new version
    assert again.n_rows == 470


def test_resume_reads_its_snapshot_and_refuses_when_it_is_gone(tmp_path, client):
    a = write_csv(tmp_path / "a.csv", *make_xy(600, 3, seed=12))
    ds = str(tmp_path / "ds.zarr")
    ingest([str(a)], ds, "y", client, chunk_mb=0.002)
    cfg = TrainConfig(solver="gd", max_iter=6, lr=0.1)
    whole = train(ds, cfg, client=client, runs_dir=tmp_path / "runs", run_id="whole")
    part = train(ds, TrainConfig(solver="gd", max_iter=3, lr=0.1), client=client, runs_dir=tmp_path / "runs",
                 run_id="part")
    ingest([str(write_csv(tmp_path / "b.csv", *make_xy(100, 3, seed=13)))], ds, "y", client)  # main moves on
    from pipeline.store.runs import RunStore

    store = RunStore.open(part.run_uri, mode="r+")
    store.annotate(config={**store.config, "max_iter": 6})
    res = resume("part", runs_dir=tmp_path / "runs", client=client)
    # The resumed run continued on its own snapshot (600 rows), not the new tip: bitwise the same as whole.
    assert np.array_equal(RunStore.open(res.run_uri).column("theta"), RunStore.open(whole.run_uri).column("theta"))
    snap = RunStore.open(res.run_uri).dataset.snapshot
    (tmp_path / "ds.zarr" / "snapshots" / snap).unlink()  # the snapshot is gone (expired, deleted by hand)
    dsmod._snapshot_group.cache_clear()  # as in a new process: nothing of the snapshot is cached
    with pytest.raises(GradpipeError, match=f"trained on snapshot {snap} .* not readable"):
        resume("part", runs_dir=tmp_path / "runs", client=client)


def test_dataset_reads_with_plain_zarr_and_xarray(tmp_path, client):
    import subprocess
    import sys

    a = write_csv(tmp_path / "a.csv", *make_xy(300, 3))
    ingest([str(a)], tmp_path / "ds.zarr", "y", client, chunk_mb=0.002)
    code = f"""
import sys, numpy as np, zarr, xarray as xr, icechunk
repo = icechunk.Repository.open(icechunk.local_filesystem_storage({str(tmp_path / 'ds.zarr')!r}))
store = repo.readonly_session("main").store
g = zarr.open_group(store, mode='r')
assert g.attrs['n_rows'] == 300 and g['X'].shape[1] == 3, g.attrs['n_rows']
ds = xr.open_zarr(store, consolidated=False)
assert ds['X'].dims == ('row', 'feature')
assert np.array_equal(ds['X'].values[:300], g['X'][:300])
assert not any(m.startswith('pipeline') for m in sys.modules)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
