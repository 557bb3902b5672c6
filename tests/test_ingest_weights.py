"""Sample weights and offsets in the data layer: weighted statistics, ingest --weight/--offset for every
format, validation messages, appends, and the unweighted path left exactly as it was.

References are independent of the code under test: NumPy's ``np.average`` and a direct weighted variance,
Python's ``float()`` on the CSV cells, and (for the unweighted path) figures recorded from the ingest that
existed before weights did.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import GradpipeError
from pipeline.ingest import ingest
from pipeline.stats import FeatureStats
from pipeline.store.dataset import open_dataset, read_info, read_rows
from tests.conftest import chunk_objects, dataset_group, dataset_state, write_csv

NAMES = ["x0", "x1", "x2", "w", "off"]


def weighted_reference(X: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.average(X, axis=0, weights=w)
    return mean, np.average((X - mean) ** 2, axis=0, weights=w)


def make_weighted(n: int, seed: int = 0, zeros: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(table with columns x0 x1 x2 w off, y): features of very different scales, some weights exactly 0."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3)) * [0.01, 1.0, 300.0] + [5.0, -2.0, 1e3]
    w = rng.uniform(0.1, 3.0, n) * (rng.random(n) > zeros)
    off = np.log(rng.uniform(0.5, 2.0, n))
    y = rng.poisson(np.exp(0.3 + off)).astype(np.float64)
    return np.column_stack([X, w, off]), y


# ---- FeatureStats ---------------------------------------------------------------------------------------
def test_weighted_stats_merged_in_any_order_equal_numpy():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(5000, 4)) * [1e-3, 1.0, 10.0, 1e4] + [1.0, -3.0, 50.0, 1e5]
    w = rng.uniform(0, 5, 5000) * (rng.random(5000) > 0.3)
    cuts = np.sort(rng.choice(np.arange(1, 5000), 30, replace=False))
    blocks = list(zip(np.split(X, cuts), np.split(w, cuts), strict=True))
    blocks[3] = (blocks[3][0], np.zeros(len(blocks[3][1])))  # a block whose weights are all 0
    w = np.concatenate([b[1] for b in blocks])
    blocks.append((X[:0], w[:0]))  # and an empty one
    order = rng.permutation(len(blocks))
    stats = FeatureStats.empty(4, weighted=True)
    for i in order:
        stats = stats.merge(FeatureStats.of(*blocks[i]))
    mean, var = weighted_reference(X, w)
    # Both float64; the merge adds O(log blocks) roundings of ~1e-16 relative to the spread of each feature
    # (|mean| up to 1e5 with sd 1e4: 1e-12 relative leaves room for ~1e4 ulps of cancellation).
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats.variance, var, rtol=1e-10)
    assert stats.weight_sum == pytest.approx(w.sum(), rel=1e-13)  # Σ of 5000 floats in another order
    assert stats.n_weighted == np.count_nonzero(w) and stats.count == 5000
    assert np.array_equal(stats.min, X.min(0)) and np.array_equal(stats.max, X.max(0))
    back = FeatureStats.from_json(json.loads(json.dumps(stats.to_json())))  # as the attrs store it
    assert (back.count, back.weight_sum, back.n_weighted) == (stats.count, stats.weight_sum, stats.n_weighted)
    assert all(np.array_equal(getattr(back, k), getattr(stats, k)) for k in ("mean", "m2", "min", "max"))


def test_zero_weight_rows_do_not_move_mean_or_variance_but_count_in_min_max():
    rng = np.random.default_rng(2)
    X, w = rng.normal(size=(300, 2)), rng.uniform(0.5, 2, 300)
    outliers = np.array([[1e6, -1e6], [-5e5, 7e5]])
    a = FeatureStats.of(X, w)
    b = FeatureStats.of(np.vstack([X, outliers]), np.append(w, [0.0, 0.0]))
    np.testing.assert_allclose(b.mean, a.mean, rtol=1e-14)  # the same sums, in the same order, plus zeros
    np.testing.assert_allclose(b.variance, a.variance, rtol=1e-14)
    assert (b.count, b.n_weighted) == (302, 300)
    assert np.array_equal(b.max, [1e6, 7e5]) and np.array_equal(b.min, [-5e5, -1e6])


def test_unit_weights_give_the_unweighted_figures_and_the_unweighted_json_is_unchanged():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(1000, 3)) * 7 + 2
    plain, unit = FeatureStats.of(X), FeatureStats.of(X, np.ones(1000))
    np.testing.assert_allclose(unit.mean, plain.mean, rtol=1e-13)  # different summation order only
    np.testing.assert_allclose(unit.variance, X.var(0), rtol=1e-12)
    assert set(plain.to_json()) == {"count", "mean", "m2", "min", "max"}  # no new keys without weights
    assert plain.weight_sum is None and plain.n_weighted is None
    with pytest.raises(ValueError, match="weighted with unweighted"):
        plain.merge(unit)


# ---- the unweighted dataset is bit for bit what it was --------------------------------------------------
def test_unweighted_ingest_is_unchanged(tmp_path, client):
    """Figures recorded from the ingest as it was before weights existed (same input, same code path):
    the fingerprint, the exact stats JSON, the attrs keys, and only X and y in the group."""
    rng = np.random.default_rng(123)
    X = rng.normal(size=(500, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -2.0]
    y = rng.normal(size=500)
    src = write_csv(tmp_path / "a.csv", X, y)
    ingest([str(src)], tmp_path / "ds.zarr", "y", client, chunk_mb=0.002)
    info = read_info(tmp_path / "ds.zarr")
    attrs = dataset_group(tmp_path / "ds.zarr").attrs.asdict()
    assert info.fingerprint() == "95f286924378f0b542f23a842d9e4368"
    assert hashlib.sha256(json.dumps(attrs["stats"]).encode()).hexdigest() == \
        "432b1d21f5edbcb0ab1228051492225251f0833c49e041a0618876090c563d92"
    assert sorted(attrs) == ["chunk_rows", "dtype", "feature_names", "gradpipe", "manifest", "n_features",
                             "n_rows", "stats", "target", "target_stats"]
    assert sorted(dataset_group(tmp_path / "ds.zarr").array_keys()) == ["X", "y"]
    assert (info.weight, info.offset, info.has_weights, info.has_offset) == (None, None, False, False)
    assert (info.weight_sum, info.n_weighted_rows) == (500.0, 500)
    leaf = read_rows(str(tmp_path / "ds.zarr"), 0, 10)
    assert leaf[2] is None and leaf[3] is None
    ds = open_dataset(tmp_path / "ds.zarr")
    assert ds.w is None and ds.offset_values is None


# ---- ingest with --weight/--offset ----------------------------------------------------------------------
def write_source(fmt: str, path: Path, table: np.ndarray, y: np.ndarray) -> Path:
    if fmt == "csv":
        return write_csv(path.with_suffix(".csv"), table, y, names=NAMES)
    if fmt == "parquet":
        out = path.with_suffix(".parquet")
        pq.write_table(pa.table({**{c: table[:, j] for j, c in enumerate(NAMES)}, "y": y}), out,
                       row_group_size=97)
        return out
    out = path.with_suffix(".npy")
    np.save(out, np.column_stack([table, y]))
    return out


def columns_for(fmt: str) -> tuple[str, str, str]:
    """target, weight, offset as named on the command line (.npy: column indices)."""
    return ("5", "3", "4") if fmt == "npy" else ("y", "w", "off")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npy"])
def test_weights_and_offsets_are_stored_as_given_and_stats_are_weighted(tmp_path, client, fmt):
    table, y = make_weighted(1234, seed=4)
    src = write_source(fmt, tmp_path / "a", table, y)
    target, weight, offset = columns_for(fmt)
    ingest([str(src)], tmp_path / "ds.zarr", target, client, chunk_mb=0.001, dtype="float32",
           weight=weight, offset=offset)
    ds = open_dataset(tmp_path / "ds.zarr")
    names = {"npy": ["col0", "col1", "col2"]}.get(fmt, ["x0", "x1", "x2"])
    assert ds.feature_names == names and ds.n_features == 3
    assert (ds.weight, ds.offset) == ({"npy": ("col3", "col4")}.get(fmt, ("w", "off")))
    assert ds.has_weights and ds.has_offset
    # Weights and offsets are float64 even for a float32 dataset: exact round trip (repr / binary).
    assert ds.w.dtype == np.float64 and ds.offset_values.dtype == np.float64 and ds.X.dtype == np.float32
    assert np.array_equal(ds.w.compute(), table[:, 3]) and np.array_equal(ds.offset_values.compute(), table[:, 4])
    assert np.array_equal(ds.X.compute(), table[:, :3].astype(np.float32))
    group = dataset_group(tmp_path / "ds.zarr")
    for name in ("w", "offset"):
        assert group[name].chunks == (ds.chunk_rows,) and group[name].metadata.dimension_names == ("row",)
        assert [type(c).__name__ for c in group[name].compressors] == \
            [type(c).__name__ for c in group["y"].compressors]
    X32 = table[:, :3].astype(np.float32).astype(np.float64)
    mean, var = weighted_reference(X32, table[:, 3])
    # float64 accumulation of float32 values over many merged pieces: 1e-10 relative (see the unit test).
    np.testing.assert_allclose(ds.stats.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(ds.stats.variance, var, rtol=1e-9)
    assert ds.weight_sum == pytest.approx(table[:, 3].sum(), rel=1e-13)
    assert ds.n_weighted_rows == np.count_nonzero(table[:, 3]) and ds.n_rows == 1234
    assert ds.target_stats.count == 1234  # the target summary stays unweighted: every row counts
    leaf = read_rows(str(tmp_path / "ds.zarr"), 100, 300)
    assert np.array_equal(leaf[2], table[100:300, 3]) and np.array_equal(leaf[3], table[100:300, 4])


def test_fingerprint_and_attrs_name_the_columns(tmp_path, client):
    table, y = make_weighted(200, seed=5, zeros=0)
    src = write_csv(tmp_path / "a.csv", table, y, names=NAMES)
    ingest([str(src)], tmp_path / "both.zarr", "y", client, weight="w", offset="off")
    ingest([str(src)], tmp_path / "plain.zarr", "y", client, features=["x0", "x1", "x2"])
    ingest([str(src)], tmp_path / "w.zarr", "y", client, weight="w", features=["x0", "x1", "x2"])
    prints = {p: read_info(tmp_path / f"{p}.zarr").fingerprint() for p in ("both", "plain", "w")}
    assert len(set(prints.values())) == 3
    attrs = dataset_group(tmp_path / "both.zarr").attrs.asdict()
    assert (attrs["weight"], attrs["offset"]) == ("w", "off")
    assert "offset" not in dataset_group(tmp_path / "w.zarr").attrs.asdict()
    assert sorted(dataset_group(tmp_path / "w.zarr").array_keys()) == ["X", "w", "y"]


def test_appends_keep_weights_and_offsets_aligned_with_x(tmp_path, client):
    parts = [make_weighted(n, seed=10 + i) for i, n in enumerate([301, 250, 77])]
    srcs = [write_csv(tmp_path / f"p{i}.csv", t, y, names=NAMES) for i, (t, y) in enumerate(parts)]
    ds_path = tmp_path / "ds.zarr"
    ingest([str(srcs[0])], ds_path, "y", client, chunk_mb=0.0007, weight="w", offset="off")  # 22-row chunks
    assert read_info(ds_path).n_rows % read_info(ds_path).chunk_rows  # the last chunk is partial: rewritten
    for s in srcs[1:]:
        ingest([str(s)], ds_path, "y", client, weight="w", offset="off")
    table = np.vstack([t for t, _ in parts])
    ds = open_dataset(ds_path)
    got = np.column_stack([ds.X.compute(), ds.w.compute(), ds.offset_values.compute()])
    assert np.array_equal(got, table)  # every row's weight and offset sit next to its own features
    assert np.array_equal(ds.y.compute(), np.concatenate([y for _, y in parts]))
    mean, var = weighted_reference(table[:, :3], table[:, 3])
    np.testing.assert_allclose(ds.stats.mean, mean, rtol=1e-10)  # as in the format test
    np.testing.assert_allclose(ds.stats.variance, var, rtol=1e-9)


def test_appending_with_other_weight_or_offset_columns_is_refused(tmp_path, client):
    table, y = make_weighted(100, seed=6)
    a = write_csv(tmp_path / "a.csv", table, y, names=NAMES)
    b = write_csv(tmp_path / "b.csv", *make_weighted(50, seed=7), names=NAMES)
    ingest([str(a)], tmp_path / "ds.zarr", "y", client, weight="w", offset="off")
    before = dataset_state(tmp_path / "ds.zarr")
    with pytest.raises(GradpipeError, match=r"takes weights from column 'w', but this ingest has no --weight"):
        ingest([str(b)], tmp_path / "ds.zarr", "y", client, offset="off")
    with pytest.raises(GradpipeError, match=r"has no offset column|takes offsets from column 'off'"):
        ingest([str(b)], tmp_path / "ds.zarr", "y", client, weight="w", offset="x2")
    assert dataset_state(tmp_path / "ds.zarr") == before
    ingest([str(a)], tmp_path / "plain.zarr", "y", client, features=["x0", "x1", "x2"])
    with pytest.raises(GradpipeError, match=r"has no weight column, but this ingest has --weight 'w'"):
        ingest([str(b)], tmp_path / "plain.zarr", "y", client, weight="w", features=["x0", "x1", "x2"])


def test_drop_removes_rows_with_bad_weights_or_offsets(tmp_path, client):
    table, y = make_weighted(40, seed=8)
    table[[3, 11, 20], 3] = [-1.0, np.nan, np.inf]
    table[30, 4] = np.nan
    src = write_csv(tmp_path / "a.csv", table, y, names=NAMES)
    res = ingest([str(src)], tmp_path / "ds.zarr", "y", client, weight="w", offset="off", on_invalid="drop")
    keep = [i for i in range(40) if i not in (3, 11, 20, 30)]
    assert (res.n_rows, res.dropped_rows) == (36, 4)
    ds = open_dataset(tmp_path / "ds.zarr")
    assert np.array_equal(ds.w.compute(), table[keep, 3]) and np.array_equal(ds.y.compute(), y[keep])
    pq.write_table(pa.table({**{c: table[:, j] for j, c in enumerate(NAMES)}, "y": y}), tmp_path / "a.parquet")
    res = ingest([str(tmp_path / "a.parquet")], tmp_path / "pq.zarr", "y", client, weight="w", offset="off",
                 on_invalid="drop")
    assert res.n_rows == 36
    assert np.array_equal(open_dataset(tmp_path / "pq.zarr").offset_values.compute(), table[keep, 4])


def bad_csv(tmp_path: Path, row: int, col: int, value: str) -> Path:
    table, y = make_weighted(30, seed=9)
    path = write_csv(tmp_path / "bad.csv", table, y, names=NAMES)
    lines = path.read_text().splitlines()
    cells = lines[row + 1].split(",")
    cells[col] = value
    lines[row + 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


ERRORS = {
    "negative weight": (7, 3, "-1.5", r"bad\.csv: line 9, column 'w' is '-1\.5', a negative sample weight"),
    "nan weight": (4, 3, "nan", r"bad\.csv: line 6, column 'w' is 'nan', which is not a finite number"),
    "empty weight": (2, 3, "", r"bad\.csv: line 4, column 'w' is empty"),
    "nan offset": (12, 4, "NaN", r"bad\.csv: line 14, column 'off' is 'NaN', which is not a finite number"),
    "text offset": (0, 4, "one", r"bad\.csv: line 2, column 'off' is 'one', which is not a number"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_invalid_csv_weight_or_offset_names_file_line_column_and_value(tmp_path, client, name):
    row, col, value, pattern = ERRORS[name]
    path = bad_csv(tmp_path, row, col, value)
    with pytest.raises(GradpipeError, match=pattern):
        ingest([str(path)], tmp_path / "ds.zarr", "y", client, weight="w", offset="off")
    assert not (tmp_path / "ds.zarr").exists()
    # …and an append of that file leaves an existing dataset byte for byte as it was.
    good = write_csv(tmp_path / "good.csv", *make_weighted(60, seed=1), names=NAMES)
    ingest([str(good)], tmp_path / "ds.zarr", "y", client, weight="w", offset="off")
    before = dataset_state(tmp_path / "ds.zarr")
    with pytest.raises(GradpipeError, match=pattern):
        ingest([str(path)], tmp_path / "ds.zarr", "y", client, weight="w", offset="off")
    assert dataset_state(tmp_path / "ds.zarr") == before


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_invalid_binary_weight_names_the_row(tmp_path, client, fmt):
    table, y = make_weighted(300, seed=12)
    table[211, 3] = -0.25
    src = write_source(fmt, tmp_path / "a", table, y)
    target, weight, offset = columns_for(fmt)
    column = "col3" if fmt == "npy" else "w"
    with pytest.raises(GradpipeError, match=rf"a\.{fmt}: row 211 \(0-based\), column '{column}' is '-0\.25', "
                                            r"a negative sample weight"):
        ingest([str(src)], tmp_path / "ds.zarr", target, client, weight=weight, offset=offset)
    table[211, 3], table[17, 4] = 1.0, np.inf
    src = write_source(fmt, tmp_path / "a", table, y)
    column = "col4" if fmt == "npy" else "off"
    with pytest.raises(GradpipeError, match=rf"row 17 \(0-based\), column '{column}' is 'inf', which is not"):
        ingest([str(src)], tmp_path / "ds.zarr", target, client, weight=weight, offset=offset)
    assert not (tmp_path / "ds.zarr").exists()


def test_all_zero_weights_are_refused(tmp_path, client):
    table, y = make_weighted(50, seed=13)
    table[:, 3] = 0.0
    path = write_csv(tmp_path / "z.csv", table, y, names=NAMES)
    with pytest.raises(GradpipeError, match=r"z\.csv: every kept row has weight 0 in column 'w'"):
        ingest([str(path)], tmp_path / "ds.zarr", "y", client, weight="w")
    assert not (tmp_path / "ds.zarr").exists()


def test_missing_or_misused_weight_column(tmp_path, client):
    table, y = make_weighted(20, seed=14)
    path = write_csv(tmp_path / "a.csv", table, y, names=NAMES)
    with pytest.raises(GradpipeError, match=r"a\.csv: the --weight column 'wt' is not a column of it"):
        ingest([str(path)], tmp_path / "ds.zarr", "y", client, weight="wt")
    with pytest.raises(GradpipeError, match=r"--offset 'x1' is also listed in --features"):
        ingest([str(path)], tmp_path / "ds.zarr", "y", client, offset="x1", features=["x0", "x1"])
    with pytest.raises(GradpipeError, match=r"--weight and --offset both name column 'w'"):
        ingest([str(path)], tmp_path / "ds.zarr", "y", client, weight="w", offset="w")
    with pytest.raises(GradpipeError, match=r"--weight 'y' is also the --target"):
        ingest([str(path)], tmp_path / "ds.zarr", "y", client, weight="y")
    assert not (tmp_path / "ds.zarr").exists()


def test_lost_chunk_object_is_reported_at_read(tmp_path, client):
    src = write_csv(tmp_path / "a.csv", *make_weighted(100, seed=15), names=NAMES)
    ingest([str(src)], tmp_path / "ds.zarr", "y", client, chunk_mb=0.001, weight="w", offset="off")
    for obj in chunk_objects(tmp_path / "ds.zarr"):
        obj.unlink()  # lost objects (a bucket lifecycle rule, a hand deletion): never read as zeros
    with pytest.raises(GradpipeError, match=r"array X chunk 0 \(rows 0-\d+\) is corrupted or missing"):
        read_rows(read_info(tmp_path / "ds.zarr").ref, 0, 10)


def test_cli_weight_and_offset(tmp_path, scheduler, capsys):
    src = write_csv(tmp_path / "a.csv", *make_weighted(30, seed=16), names=NAMES)
    assert main(["ingest", str(src), "--target", "y", "--dataset", str(tmp_path / "ds.zarr"), "--weight", "w",
                 "--offset", "off", "--scheduler", scheduler, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feature_names"] == ["x0", "x1", "x2"]
    info = read_info(tmp_path / "ds.zarr")
    assert (info.weight, info.offset) == ("w", "off")
    bad = bad_csv(tmp_path, 3, 3, "-2")
    assert main(["ingest", str(bad), "--target", "y", "--dataset", str(tmp_path / "b.zarr"), "--weight", "w",
                 "--scheduler", scheduler]) == 2
    err = capsys.readouterr().err
    assert "bad.csv: line 5, column 'w' is '-2', a negative sample weight" in err and "Traceback" not in err
