"""Ingest: exact round trips, aligned chunks, merged statistics, idempotence and atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import GradpipeError
from pipeline.ingest import ingest
from pipeline.store.dataset import open_dataset, read_info
from tests.conftest import chunk_objects, dataset_group, dataset_state, make_xy, write_csv


def reference_csv(paths: list[Path]) -> np.ndarray:
    """Independent parse: Python's float() on every cell."""
    rows = []
    for p in paths:
        lines = p.read_text().splitlines()[1:]
        rows += [[float(v) for v in line.split(",")] for line in lines if line]
    return np.asarray(rows)


def test_csv_round_trip_is_exact_and_chunks_are_aligned(tmp_path, client):
    parts = [write_csv(tmp_path / f"p{i}.csv", *make_xy(n, 4, seed=i)) for i, n in enumerate([700, 1300, 5])]
    res = ingest([str(tmp_path / "*.csv")], tmp_path / "ds.zarr", "y", client, chunk_mb=0.004)
    ref = reference_csv(parts)
    ds = open_dataset(tmp_path / "ds.zarr")
    assert (ds.n_rows, ds.n_features, res.n_rows) == (2005, 4, 2005)
    assert ds.chunk_rows == int(0.004 * 2**20) // 32  # 131 rows of 4 float64
    X, y = ds.X.compute(), ds.y.compute()
    assert np.array_equal(X, ref[:, :4]) and np.array_equal(y, ref[:, 4])  # float64 round trip: exact
    group = dataset_group(tmp_path / "ds.zarr")
    assert group["X"].chunks == (ds.chunk_rows, 4) and group["y"].chunks == (ds.chunk_rows,)
    assert ds.X.chunks[0] == ds.y.chunks[0] and set(ds.X.chunks[0][:-1]) == {ds.chunk_rows}
    # Stats merged with the parallel formula equal numpy's two-pass figures to 1e-12 relative
    # (both are float64; the merge adds O(log pieces) roundings of ~1e-16 each).
    np.testing.assert_allclose(ds.stats.mean, ref[:, :4].mean(0), rtol=1e-12)
    np.testing.assert_allclose(ds.stats.variance, ref[:, :4].var(0), rtol=1e-12)
    assert np.array_equal(ds.stats.min, ref[:, :4].min(0)) and np.array_equal(ds.stats.max, ref[:, :4].max(0))
    assert ds.stats.count == 2005
    assert [m["rows"] for m in ds.manifest] == [700, 1300, 5]
    assert [(m["row_start"], m["row_stop"]) for m in ds.manifest] == [(0, 700), (700, 2000), (2000, 2005)]


def test_pieces_split_inside_a_file_keep_row_order(tmp_path, client, monkeypatch):
    import pipeline.ingest.sources as sources

    monkeypatch.setattr(sources, "PIECE_BYTES", 4096)  # the driver plans many byte ranges per file
    path = write_csv(tmp_path / "a.csv", *make_xy(3000, 3))
    ingest([str(path)], tmp_path / "ds.zarr", "y", client, chunk_mb=0.01)
    ref = reference_csv([path])
    ds = open_dataset(tmp_path / "ds.zarr")
    assert np.array_equal(ds.X.compute(), ref[:, :3]) and np.array_equal(ds.y.compute(), ref[:, 3])


def test_float32_parquet_and_npy_sources(tmp_path, client):
    X, y = make_xy(1000, 3)
    pq.write_table(pa.table({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "t": y}), tmp_path / "d.parquet",
                   row_group_size=300)
    ingest([str(tmp_path / "d.parquet")], tmp_path / "pq.zarr", "t", client, chunk_mb=0.002)
    ds = open_dataset(tmp_path / "pq.zarr")
    assert ds.feature_names == ["a", "b", "c"]
    assert np.array_equal(ds.X.compute(), X) and np.array_equal(ds.y.compute(), y)

    np.save(tmp_path / "d.npy", np.column_stack([X, y]))
    ingest([str(tmp_path / "d.npy")], tmp_path / "np.zarr", "-1", client, dtype="float32")
    ds = open_dataset(tmp_path / "np.zarr")
    assert ds.target == "col3" and ds.feature_names == ["col0", "col1", "col2"]
    assert ds.X.dtype == np.float32
    assert np.array_equal(ds.X.compute(), X.astype(np.float32))
    # stats describe the stored float32 values
    np.testing.assert_allclose(ds.stats.mean, X.astype(np.float32).astype(np.float64).mean(0), rtol=1e-12)


def test_reingest_is_a_noop_and_new_files_append(tmp_path, client):
    a = write_csv(tmp_path / "a.csv", *make_xy(500, 2, seed=1))
    ingest([str(a)], tmp_path / "ds.zarr", "y", client, chunk_mb=0.003)
    before = dataset_state(tmp_path / "ds.zarr")
    again = ingest([str(a)], tmp_path / "ds.zarr", "y", client)
    assert again.appended_files == [] and again.skipped_files == [str(a.resolve())]
    assert dataset_state(tmp_path / "ds.zarr") == before

    b = write_csv(tmp_path / "b.csv", *make_xy(333, 2, seed=2))
    res = ingest([str(a), str(b)], tmp_path / "ds.zarr", "y", client)
    assert res.appended_files == [str(b.resolve())] and res.n_rows == 833
    ref = reference_csv([a, b])
    ds = open_dataset(tmp_path / "ds.zarr")
    assert np.array_equal(ds.X.compute(), ref[:, :2]) and np.array_equal(ds.y.compute(), ref[:, 2])
    np.testing.assert_allclose(ds.stats.variance, ref[:, :2].var(0), rtol=1e-12)


def test_changed_file_is_refused_unless_replace(tmp_path, client):
    a = write_csv(tmp_path / "a.csv", *make_xy(50, 2, seed=1))
    b = write_csv(tmp_path / "b.csv", *make_xy(60, 2, seed=2))
    ingest([str(a), str(b)], tmp_path / "ds.zarr", "y", client)
    write_csv(a, *make_xy(40, 2, seed=3))
    before = dataset_state(tmp_path / "ds.zarr")
    with pytest.raises(GradpipeError, match="changed since it was ingested.*--replace"):
        ingest([str(a)], tmp_path / "ds.zarr", "y", client)
    assert dataset_state(tmp_path / "ds.zarr") == before
    res = ingest([str(a)], tmp_path / "ds.zarr", "y", client, replace=True)
    assert res.n_rows == 100
    ref = reference_csv([a, b])
    assert np.array_equal(open_dataset(tmp_path / "ds.zarr").y.compute(), ref[:, 2])


def test_change_with_restored_mtime_is_still_detected(tmp_path, client):
    """Same size and mtime (``cp -p``, ``touch -r``) does not hide new content: the file is re-hashed."""
    a = write_csv(tmp_path / "a.csv", *make_xy(50, 2, seed=1))
    ingest([str(a)], tmp_path / "ds.zarr", "y", client)
    st = a.stat()
    text = a.read_text()
    a.write_text(text.replace("1", "2", 1))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert a.stat().st_size == st.st_size and a.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(GradpipeError, match="changed since it was ingested"):
        ingest([str(a)], tmp_path / "ds.zarr", "y", client)
    a.write_text(text)  # the same bytes again, new ctime: re-hashed, recognised, skipped
    assert ingest([str(a)], tmp_path / "ds.zarr", "y", client).appended_files == []


def test_replace_needs_every_source_of_the_dataset(tmp_path, client):
    a = write_csv(tmp_path / "a.csv", *make_xy(50, 2, seed=1))
    b = write_csv(tmp_path / "b.csv", *make_xy(60, 2, seed=2))
    ingest([str(a), str(b)], tmp_path / "ds.zarr", "y", client)
    before = dataset_state(tmp_path / "ds.zarr")
    b.unlink()
    write_csv(a, *make_xy(40, 2, seed=3))
    with pytest.raises(GradpipeError, match=r"--replace rebuilds .* but .*b\.csv \(in its manifest\) no longer"):
        ingest([str(a)], tmp_path / "ds.zarr", "y", client, replace=True)
    assert dataset_state(tmp_path / "ds.zarr") == before


def test_reingest_with_another_target_is_refused(tmp_path, client):
    a = write_csv(tmp_path / "a.csv", *make_xy(50, 2, seed=1))
    ingest([str(a)], tmp_path / "ds.zarr", "y", client)
    with pytest.raises(GradpipeError, match="--target 'x0' differs from the dataset's target 'y'"):
        ingest([str(a)], tmp_path / "ds.zarr", "x0", client)
    with pytest.raises(GradpipeError, match="--features \\['x1'\\] differ"):
        ingest([str(a)], tmp_path / "ds.zarr", "y", client, features=["x1"])


def test_rows_of_empty_unused_cells_are_all_kept(tmp_path, client):
    """Rows shorter than two bytes per column (empty cells in unused columns) must not overflow the row
    estimate the arrays are sized by: Zarr would silently drop what lies past the end."""
    n = 1000
    path = tmp_path / "a.csv"
    path.write_text("\ufeffx0," + ",".join(f"e{i}" for i in range(8)) + ",y\n" +
                    "".join(f"{i % 10},,,,,,,,,{i % 7}\n" for i in range(n)))
    res = ingest([str(path)], tmp_path / "ds.zarr", "y", client, features=["x0"], chunk_mb=0.001)
    ds = open_dataset(tmp_path / "ds.zarr")
    assert res.n_rows == n and ds.feature_names == ["x0"]  # the byte-order mark is not part of the name
    assert np.array_equal(ds.X.compute()[:, 0], np.arange(n) % 10)
    assert np.array_equal(ds.y.compute(), np.arange(n) % 7)


def test_failed_append_leaves_the_store_byte_for_byte(tmp_path, client):
    a = write_csv(tmp_path / "a.csv", *make_xy(501, 2))
    ingest([str(a)], tmp_path / "ds.zarr", "y", client, chunk_mb=0.003)
    before = dataset_state(tmp_path / "ds.zarr")
    bad = write_csv(tmp_path / "b.csv", *make_xy(400, 2, seed=5))
    lines = bad.read_text().splitlines()
    lines[399] = lines[399].replace(",", ",oops,", 1).replace(",oops,", ",oops", 1)
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(GradpipeError, match=r"b\.csv: line 400, column 'x1'"):
        ingest([str(bad)], tmp_path / "ds.zarr", "y", client)
    assert dataset_state(tmp_path / "ds.zarr") == before


def test_sigkill_during_append_leaves_store_intact_then_ingest_succeeds(tmp_path, client, scheduler):
    a = write_csv(tmp_path / "a.csv", *make_xy(1001, 8))
    ingest([str(a)], tmp_path / "ds.zarr", "y", client, chunk_mb=0.01)
    before = dataset_state(tmp_path / "ds.zarr")
    big = write_csv(tmp_path / "big.csv", *make_xy(60_000, 8, seed=9))  # ~370 chunks: time to be killed
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", str(big), "--target", "y",
                             "--dataset", str(tmp_path / "ds.zarr"), "--scheduler", scheduler],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    n_before = len(chunk_objects(tmp_path / "ds.zarr"))
    while len(chunk_objects(tmp_path / "ds.zarr")) <= n_before + 2:  # the append's chunks are being written
        assert proc.poll() is None, "ingest finished before it could be killed"
        assert time.monotonic() < deadline, "no new chunks appeared within 120 s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert dataset_state(tmp_path / "ds.zarr")[:2] == before[:2]  # same tip and history (its branch may remain)
    res = ingest([str(big)], tmp_path / "ds.zarr", "y", client, chunk_mb=0.01)
    assert res.n_rows == 61_001
    ref = reference_csv([a, big])
    assert np.array_equal(open_dataset(tmp_path / "ds.zarr").X.compute(), ref[:, :8])


def test_drop_invalid_rows_are_counted(tmp_path, client):
    X, y = make_xy(20, 2)
    path = write_csv(tmp_path / "a.csv", X, y)
    lines = path.read_text().splitlines()
    lines[3] = "1.0,,2.0"
    lines[5] = "nan,1.0,2.0"
    lines[7] = "1.0,inf,2.0"
    lines[9] = "1.0,abc,2.0"
    path.write_text("\n".join(lines) + "\n")
    res = ingest([str(path)], tmp_path / "ds.zarr", "y", client, on_invalid="drop")
    assert (res.n_rows, res.dropped_rows) == (16, 4)
    keep = [i for i in range(20) if i + 1 not in (3, 5, 7, 9)]
    assert np.array_equal(open_dataset(tmp_path / "ds.zarr").y.compute(), y[keep])
    assert read_info(tmp_path / "ds.zarr").manifest[0]["dropped"] == 4


def test_cli_json_output(tmp_path, scheduler, capsys):
    path = write_csv(tmp_path / "a.csv", *make_xy(10, 2))
    assert main(["ingest", str(path), "--target", "y", "--dataset", str(tmp_path / "ds.zarr"),
                 "--scheduler", scheduler, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"dataset", "n_rows", "n_features", "feature_names", "appended_files", "skipped_files",
                        "seconds"}
    assert (out["n_rows"], out["feature_names"]) == (10, ["x0", "x1"])


def test_columns_are_matched_by_name_not_position(tmp_path, client):
    X, y = make_xy(30, 2)
    write_csv(tmp_path / "a.csv", X[:10], y[:10])
    with open(tmp_path / "b.csv", "w") as fh:  # same columns, another order, plus an unused one
        fh.write("y,extra,x1,x0\n")
        for row, t in zip(X[10:].tolist(), y[10:].tolist(), strict=True):
            fh.write(f"{t!r},7,{row[1]!r},{row[0]!r}\n")
    ingest([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")], tmp_path / "ds.zarr", "y", client,
           features=["x0", "x1"])
    ds = open_dataset(tmp_path / "ds.zarr")
    assert np.array_equal(ds.X.compute(), X) and np.array_equal(ds.y.compute(), y)


def test_a_chunk_of_zero_targets_is_stored_not_skipped(tmp_path, client):
    """Zarr leaves out a chunk equal to its fill value (0); an all-zero y chunk (a logistic chunk of negatives,
    zero counts) must still be written, or the store reads as damaged."""
    X, _ = make_xy(600, 3)
    y = np.zeros(600)
    y[500:] = 1.0
    write_csv(tmp_path / "z.csv", X, y)
    ingest([str(tmp_path / "z.csv")], tmp_path / "ds.zarr", "y", client, chunk_mb=0.004)
    ds = open_dataset(tmp_path / "ds.zarr")
    assert ds.chunk_rows < 500  # the first chunks hold only zeros
    np.testing.assert_array_equal(ds.y.compute(), y)
