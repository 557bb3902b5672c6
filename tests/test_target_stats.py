"""The target summary ingest records (min, max, values not 0/1, the first one) and the check ``gradpipe train``
makes from it before a cluster starts. References are numpy on the source y, never the code under test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.families import FAMILIES, Family, Gaussian
from pipeline.ingest import ingest, sources
from pipeline.stats import TargetStats
from pipeline.store.dataset import read_info
from tests.conftest import dataset_group, make_xy, write_csv

REPO = Path(__file__).resolve().parents[1]


def _mixed_target(n: int, seed: int, n_bad: int) -> np.ndarray:
    """Mostly 0/1, with ``n_bad`` other values (negative and > 1) at random rows after the first few."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n).astype(float)
    rows = rng.choice(np.arange(5, n), size=n_bad, replace=False)
    y[rows] = rng.normal(size=n_bad) * 7 + 0.5
    y[rows[np.isin(y[rows], (0.0, 1.0))]] = 3.25
    return y


def _expected(y: np.ndarray) -> dict:
    """The summary as numpy sees the source target, in the stored JSON's form."""
    bad = np.flatnonzero((y != 0) & (y != 1))
    out = {"count": len(y), "min": float(y.min()), "max": float(y.max()), "n_not_binary": int(bad.size),
           "example": float(y[bad[0]]) if bad.size else None, "example_row": int(bad[0]) if bad.size else None}
    for key, rows in (("first_negative", np.flatnonzero(y < 0)), ("first_nonpositive", np.flatnonzero(y <= 0))):
        if rows.size:  # the first row below a bound of 0: absent from the JSON when there is none
            out[key] = [float(y[rows[0]]), int(rows[0])]
    return out


def _stored(dataset: Path) -> dict | None:
    """The summary straight from the store's attrs (what a reader without gradpipe would see)."""
    return dataset_group(dataset).attrs.asdict().get("target_stats")


def _strip_summary(dataset: Path) -> None:
    """Make ``dataset`` look ingested before the summary existed: drop that one attr, keep everything else."""
    import icechunk
    import zarr

    from pipeline.store import location

    repo = icechunk.Repository.open(location.icechunk_storage(str(dataset)))
    session = repo.writable_session("main")
    group = zarr.open_group(session.store, mode="r+")
    attrs = group.attrs.asdict()
    del attrs["target_stats"]
    group.attrs.put(attrs)
    session.commit("drop target_stats (as a dataset from before the summary)")


def test_summary_equals_numpy_across_pieces_and_files(tmp_path, client, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 4096)  # many pieces per file: the driver merges them in order
    ys = []
    for i, n in enumerate((700, 450, 900)):
        X, _ = make_xy(n, 3, seed=i)
        ys.append(_mixed_target(n, seed=10 + i, n_bad=4 + i))
        write_csv(tmp_path / f"p{i}.csv", X, ys[-1])
    files = [str(tmp_path / f"p{i}.csv") for i in range(3)]
    ingest(files, tmp_path / "ds.zarr", "y", client, chunk_mb=0.01)
    want = _expected(np.concatenate(ys))
    assert _stored(tmp_path / "ds.zarr") == want
    assert read_info(tmp_path / "ds.zarr").target_stats == TargetStats.from_json(want)


def test_summary_after_append_equals_numpy_on_all_rows(tmp_path, client):
    X1, _ = make_xy(300, 2, seed=1)
    X2, _ = make_xy(250, 2, seed=2)
    y1 = np.random.default_rng(0).integers(0, 2, size=300).astype(float)  # binary: no example yet
    y2 = _mixed_target(250, seed=3, n_bad=6)
    write_csv(tmp_path / "a.csv", X1, y1)
    ingest([str(tmp_path / "a.csv")], tmp_path / "ds.zarr", "y", client, chunk_mb=0.003)
    assert _stored(tmp_path / "ds.zarr") == _expected(y1)
    write_csv(tmp_path / "b.csv", X2, y2)
    ingest([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")], tmp_path / "ds.zarr", "y", client, chunk_mb=0.003)
    want = _expected(np.concatenate([y1, y2]))
    assert want["example_row"] >= 300  # the example's row is global, not b.csv's own
    assert _stored(tmp_path / "ds.zarr") == want


def test_dropped_rows_are_left_out_of_the_summary(tmp_path, client):
    n = 400
    X, _ = make_xy(n, 3, seed=5)
    y = _mixed_target(n, seed=6, n_bad=5)
    bad_x, bad_y = [3, 50, 51, 200], [7, 120, 399]
    y[bad_x] = 42.0  # out-of-domain values on rows that are dropped must not count
    y[0] = -100.0  # nor the minimum of a dropped row
    bad_x.append(0)
    X[bad_x, 1] = np.nan
    y[bad_y] = np.nan
    write_csv(tmp_path / "a.csv", X, y)
    res = ingest([str(tmp_path / "a.csv")], tmp_path / "ds.zarr", "y", client, on_invalid="drop", chunk_mb=0.003)
    keep = np.isfinite(X).all(axis=1) & np.isfinite(y)
    assert res.dropped_rows == n - keep.sum() == 8
    assert _stored(tmp_path / "ds.zarr") == _expected(y[keep])  # rows numbered as stored, after the drop


def test_append_to_a_dataset_without_summary_keeps_it_absent(tmp_path, client):
    """The old rows were never summarised: a summary of the new rows alone would wrongly pass the check."""
    X, y = make_xy(200, 2, seed=7)
    write_csv(tmp_path / "a.csv", X, y)
    ingest([str(tmp_path / "a.csv")], tmp_path / "ds.zarr", "y", client)
    _strip_summary(tmp_path / "ds.zarr")
    write_csv(tmp_path / "b.csv", X, np.zeros(200))
    ingest([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")], tmp_path / "ds.zarr", "y", client)
    info = read_info(tmp_path / "ds.zarr")
    assert info.n_rows == 400 and info.target_stats is None and _stored(tmp_path / "ds.zarr") is None


def test_family_domain_decisions():
    linear, logistic = FAMILIES["linear"], FAMILIES["logistic"]
    binary, mixed = TargetStats.of(np.array([0.0, 1, 1, 0])), TargetStats.of(np.array([0.0, 2, -1, 1]))
    assert (linear.y_in_domain(mixed), logistic.y_in_domain(binary), logistic.y_in_domain(mixed)) == (True, True, False)
    assert linear.y_in_domain(None) is None and logistic.y_in_domain(None) is None  # old dataset: undecided
    assert (logistic.y_outside_count(mixed), mixed.example, mixed.example_row) == (2, 2.0, 1)

    class Poisson(Gaussian):  # a family with an interval domain decides from min alone
        y_lower = 0.0

    class Gamma(Gaussian):
        y_lower, y_lower_strict = 0.0, True

    counts = TargetStats.of(np.array([0.0, 3, 7]))
    assert (Poisson().y_in_domain(counts), Gamma().y_in_domain(counts)) == (True, False)
    assert Poisson().y_in_domain(mixed) is False and Gamma().y_in_domain(TargetStats.of(np.array([0.5, 2]))) is True
    assert isinstance(Poisson(), Family) and Poisson().y_outside_count(mixed) is None


@pytest.fixture
def non_binary(tmp_path, client) -> tuple[Path, np.ndarray]:
    X, y = make_xy(500, 3, seed=8)  # a continuous target: every row is outside {0, 1}
    write_csv(tmp_path / "a.csv", X, y)
    ingest([str(tmp_path / "a.csv")], tmp_path / "ds.zarr", "y", client, chunk_mb=0.01)
    return tmp_path / "ds.zarr", y


def _message(y: np.ndarray) -> str:
    return (f"--model logistic needs 0/1 values in the target; column 'y' holds {len(y)} other values "
            f"(e.g. {y[0]:g} in row 0). Use --model linear or recode the target.")


def test_cli_refuses_a_non_binary_target_before_any_cluster_starts(non_binary, tmp_path):
    dataset, y = non_binary
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}  # else it would connect there
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--dataset", str(dataset), "--model",
                           "logistic", "--workers", "1", "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert _message(y) in proc.stderr
    assert "dask: " not in proc.stderr and "dashboard" not in proc.stderr  # dask_client never announced one
    assert seconds < 60, seconds  # a generous bound for the imports alone; the point is no cluster
    assert not (tmp_path / "runs").exists()


def test_old_dataset_without_summary_gets_the_cluster_side_check(non_binary, tmp_path, scheduler, capsys):
    dataset, y = non_binary
    _strip_summary(dataset)
    assert read_info(dataset).target_stats is None
    runs = tmp_path / "runs"
    assert main(["train", "--dataset", str(dataset), "--model", "logistic", "--runs-dir", str(runs),
                 "--scheduler", scheduler]) == 2
    assert _message(y) in capsys.readouterr().err  # the same message, from training's pass on the cluster
    assert not runs.exists() or not list(runs.iterdir())
    assert main(["train", "--dataset", str(dataset), "--runs-dir", str(runs), "--scheduler", scheduler,
                 "--json", "--max-iter", "1"]) == 0  # and it still opens and trains
