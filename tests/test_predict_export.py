"""``predict``, ``export`` and ``runs``: predictions equal NumPy on the exported JSON; errors exit 2.

The reference prediction is ``X @ coef + intercept`` (logistic: ``1 / (1 + exp(-z))``) with X parsed by
the test's own writer and coef/intercept taken from the exported JSON, so predict, export and the run
store are checked against each other through independent code. Tolerance 1e-12 relative (+1e-12·scale
absolute for z near 0): both sides compute the same float64 mat-vec, differing only in summation order.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

import pipeline.predict as predict_mod
from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.ingest import ingest
from pipeline.training import train
from tests.conftest import make_xy, write_csv


@pytest.fixture(scope="module")
def runs(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("predict")
    X, y = make_xy(1500, 3, seed=11)
    ingest([str(write_csv(root / "lin.csv", X, y))], root / "lin.zarr", "y", client, chunk_mb=0.01)
    train(root / "lin.zarr", TrainConfig(max_iter=40), client=client, runs_dir=root / "runs", run_id="a-lin")
    yb = (X[:, 0] - X[:, 0].mean() + np.random.default_rng(2).normal(size=1500) * X[:, 0].std() > 0).astype(float)
    ingest([str(write_csv(root / "log.csv", X, yb))], root / "log.zarr", "y", client, chunk_mb=0.01)
    train(root / "log.zarr", TrainConfig(model="logistic", max_iter=25, solver="nesterov"), client=client,
          runs_dir=root / "runs", run_id="b-log")
    return root, X


def export(root: Path, run: str, capsys) -> dict:
    out = root / f"{run}.json"
    assert main(["export", run, "--runs-dir", str(root / "runs"), "--out", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def reference(doc: dict, X: np.ndarray) -> np.ndarray:
    z = X @ np.asarray(doc["coef"]) + doc["intercept"]
    return z if doc["model"] == "linear" else 1 / (1 + np.exp(-z))


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def write_input(path: Path, X: np.ndarray) -> None:
    """Features in shuffled column order plus a string id column (must pass through unchanged)."""
    ids = [f"r{i}" for i in range(len(X))]
    table = pa.table({"id": ids, "x2": X[:, 2], "x0": X[:, 0], "x1": X[:, 1]})
    if path.suffix == ".csv":
        with open(path, "w") as fh:
            fh.write("id,x2,x0,x1\n")
            fh.writelines(f"{i},{a!r},{b!r},{c!r}\n" for i, (a, b, c) in zip(ids, X[:, [2, 0, 1]].tolist(),
                                                                            strict=True))
    else:
        pq.write_table(table, path, row_group_size=400)


@pytest.mark.parametrize("run", ["a-lin", "b-log"])
@pytest.mark.parametrize(("fin", "fout"), [("csv", "parquet"), ("parquet", "csv")])
def test_predictions_equal_numpy_on_the_exported_model(runs, run, fin, fout, tmp_path, capsys, monkeypatch):
    root, X = runs
    monkeypatch.setattr(predict_mod, "BATCH_ROWS", 256)  # several batches per file
    monkeypatch.setattr(predict_mod, "CSV_BLOCK_BYTES", 8192)
    doc = export(root, run, capsys)
    src, dst = tmp_path / f"in.{fin}", tmp_path / "sub" / f"out.{fout}"
    write_input(src, X)
    assert main(["predict", "--run", run, "--runs-dir", str(root / "runs"), "--input", str(src),
                 "--out", str(dst)]) == 0
    assert "wrote 1500 predictions" in capsys.readouterr().out
    if fout == "csv":
        # The header is written unquoted, like the input (Arrow's default quoted every name).
        assert dst.read_text().splitlines()[0] == "id,x2,x0,x1,prediction" + (",label" if run == "b-log" else "")
        header, rows = read_csv(dst)
        cols = {h: [r[j] for r in rows] for j, h in enumerate(header)}
    else:
        cols = {k: [str(v) for v in vals] for k, vals in pq.read_table(dst).to_pydict().items()}
    logistic = doc["model"] == "logistic"
    assert list(cols) == ["id", "x2", "x0", "x1", "prediction"] + (["label"] if logistic else [])
    assert cols["id"] == [f"r{i}" for i in range(1500)]
    assert np.array_equal(np.array(cols["x0"], dtype=float), X[:, 0])  # passed through exactly
    pred, ref = np.array(cols["prediction"], dtype=float), reference(doc, X)
    np.testing.assert_allclose(pred, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    if logistic:
        assert np.array_equal(np.array(cols["label"], dtype=int), (ref > 0.5).astype(int))
        assert 0 < (ref > 0.5).mean() < 1
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]  # no temp file left behind


def test_export_json_matches_the_run_store(runs, capsys):
    root, _ = runs
    doc = export(root, "b-log", capsys)
    g = zarr.open_group(str(root / "runs" / "b-log.zarr"), mode="r")
    attrs, t = g.attrs.asdict(), g.attrs["committed"]
    assert doc["format"] == "gradpipe.model/1" and doc["model"] == "logistic" and doc["run_id"] == "b-log"
    assert doc["feature_names"] == ["x0", "x1", "x2"] and doc["target"] == "y"
    assert doc["coef"] == g["coef"][t].tolist() and doc["intercept"] == float(g["intercept"][t])  # exact
    assert doc["n_iter"] == t and doc["loss"] == float(g["loss"][t]) and doc["status"] == attrs["status"]
    assert doc["dataset"] == {"uri": attrs["dataset"]["uri"], "fingerprint": attrs["dataset"]["fingerprint"]}
    assert doc["config"] == attrs["config"] and doc["config"]["solver"] == "nesterov"
    by_path = export(root, str(root / "runs" / "b-log.zarr"), capsys)  # a store path works like an id
    assert by_path == doc


def test_missing_column_and_bad_cells_exit_2_and_keep_the_old_output(runs, tmp_path, capsys, monkeypatch):
    root, X = runs
    monkeypatch.setattr(predict_mod, "CSV_BLOCK_BYTES", 4096)
    out = tmp_path / "out.csv"
    out.write_text("old\n")
    args = ["predict", "--run", "a-lin", "--runs-dir", str(root / "runs"), "--out", str(out), "--input"]
    write_csv(tmp_path / "miss.csv", X[:, :2], X[:, 2], names=["x0", "x2"], target="other")
    assert main([*args, str(tmp_path / "miss.csv")]) == 2
    assert "lacks column(s) 'x1'" in capsys.readouterr().err
    lines = ["x0,x1,x2"] + [f"{a!r},{b!r},{c!r}" for a, b, c in X[:300].tolist()]
    for bad, message in [("oops", "row 250, column 'x1': 'oops' is not a number"),
                         ("nan", "row 250, column 'x1' is missing or NaN"),
                         ("", "row 250, column 'x1' is missing or NaN")]:
        cells = lines[250].split(",")
        (tmp_path / "bad.csv").write_text("\n".join([*lines[:250], f"{cells[0]},{bad},{cells[2]}",
                                                     *lines[251:]]) + "\n")
        assert main([*args, str(tmp_path / "bad.csv")]) == 2
        assert message in capsys.readouterr().err
    pq.write_table(pa.table({"x0": [1.0, 2.0], "x1": ["3", "x"], "x2": [1.0, None]}), tmp_path / "bad.parquet")
    assert main([*args, str(tmp_path / "bad.parquet")]) == 2
    assert "row 2, column 'x1': 'x' is not a number" in capsys.readouterr().err
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))\
        == []


def test_runs_list_and_show(runs, capsys):
    root, _ = runs
    rd = ["--runs-dir", str(root / "runs")]
    assert main(["runs", "list", *rd]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["RUN", "STATUS", "ITER", "LOSS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["a-lin", "b-log"]  # trained in this order
    assert "linear/exact" in lines[1] and "logistic/nesterov" in lines[2] and "lin.zarr" in lines[1]
    assert main(["runs", "list", *rd, "--json"]) == 0
    listed = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)}
    g = zarr.open_group(str(root / "runs" / "a-lin.zarr"), mode="r")
    t = g.attrs["committed"]
    assert listed["a-lin"]["n_iter"] == t and listed["a-lin"]["loss"] == float(g["loss"][t])
    assert listed["b-log"]["model"] == "logistic" and listed["b-log"]["dataset"] == "log.zarr"

    assert main(["runs", "show", "a-lin", *rd, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [h["t"] for h in shown["history"]] == list(range(t + 1))
    assert [h["loss"] for h in shown["history"]] == g["loss"][:].tolist()
    assert [h["grad_norm"] for h in shown["history"]] == g["grad_norm"][:].tolist()
    assert main(["runs", "show", "a-lin", *rd, "--every", "7", "--json"]) == 0
    sampled = [h["t"] for h in json.loads(capsys.readouterr().out)["history"]]
    assert sampled == sorted({*range(0, t + 1, 7), t})
    assert main(["runs", "show", "a-lin", *rd, "--every", "7"]) == 0
    text = capsys.readouterr().out
    table = text.split("elapsed")[1].strip().splitlines()
    assert [int(r.split()[0]) for r in table] == sampled and "model      linear" in text
    assert main(["runs", "show", "zzz", *rd]) == 2
    assert "no run 'zzz'" in capsys.readouterr().err
