"""``gradpipe make-data``: determinism, layout per format, recoverable truth, scales, errors, atomicity.

The truth-recovery tests compare estimates with the generating coefficients in units of their own
standard errors (from the estimator's asymptotic covariance), so a tolerance of 5 SE fails for any real
bias yet passes by chance with probability > 1 - 1e-5 for ~10 coefficients.
"""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression

from pipeline import synth
from pipeline.cli import main
from pipeline.errors import GradpipeError
from pipeline.ingest.sources import read_columns
from pipeline.synth import SynthSpec, make_data
from tests.conftest import tree_hashes


def load(out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read every part back with readers independent of the writer (csv module, np.load, Parquet)."""
    truth = json.loads((out / "truth.json").read_text())
    blocks = []
    for p in sorted(out.glob("part-*")):
        if p.suffix == ".npy":
            blocks.append(np.load(p))
        elif p.suffix == ".csv":
            with open(p) as fh:
                rows = list(csv.reader(fh))
            assert rows[0] == [*truth["feature_names"], "y"]
            blocks.append(np.array(rows[1:], dtype=np.float64).reshape(len(rows) - 1, -1))
        else:
            t = pq.read_table(p)
            assert t.column_names == [*truth["feature_names"], "y"]
            blocks.append(np.column_stack([c.to_numpy().astype(np.float64) for c in t.columns]))
    data = np.concatenate(blocks)
    return data[:, :-1], data[:, -1], truth


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_make_data_is_a_registered_command(tmp_path, capsys):
    assert main(["make-data", "--kind", "linear", "--rows", "5", "--features", "2",
                 "--out", str(tmp_path / "d")]) == 0
    assert "5 rows × 2 features" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npy"])
def test_same_arguments_give_identical_bytes_whatever_the_threads(tmp_path, fmt):
    # 2 files of 150k rows: each spans two generation blocks, so block boundaries are exercised too.
    spec = SynthSpec("logistic" if fmt == "npy" else "linear", 300_000, 3, 2, fmt, seed=7)
    make_data(spec, tmp_path / "a", threads=1)
    make_data(spec, tmp_path / "b", threads=2)
    a, b = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "b")
    assert a == b and len(a) == 3
    make_data(SynthSpec(spec.kind, 300_000, 3, 2, fmt, seed=8), tmp_path / "c")
    c = tree_hashes(tmp_path / "c")
    assert all(c[k] != a[k] for k in a), "another seed must give other data"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npy"])
def test_layout_rows_and_columns_per_format(tmp_path, fmt, capsys):
    out = tmp_path / "d"
    assert main(["make-data", "--kind", "linear", "--rows", "10", "--features", "3", "--files", "3",
                 "--format", fmt, "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    parts = sorted(out.glob("part-*"))
    assert [p.name for p in parts] == [f"part-0000{i}.{fmt}" for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == [*(p.name for p in parts), "truth.json"]
    assert result == {**result, "out": str(out.absolute()), "files": 3, "rows": 10, "features": 3,
                      "bytes": sum(p.stat().st_size for p in parts)}
    rows = []
    for p in parts:
        if fmt == "npy":
            arr = np.load(p)
            assert arr.dtype == np.float64 and arr.shape[1] == 4
            rows.append(len(arr))
        elif fmt == "csv":
            assert p.read_text().splitlines()[0] == "x0,x1,x2,y"
            rows.append(len(p.read_text().splitlines()) - 1)
        else:
            rows.append(pq.ParquetFile(p).metadata.num_rows)
        # what `gradpipe ingest` will see: the npy target is the last column, col3
        names = ["col0", "col1", "col2", "col3"] if fmt == "npy" else ["x0", "x1", "x2", "y"]
        assert read_columns(p) == names
    assert rows == [4, 3, 3]
    X, y, truth = load(out)
    assert X.shape == (10, 3) and y.shape == (10,)
    assert {k: truth[k] for k in ("kind", "seed", "noise", "target", "rows", "features", "files", "format")} \
        == {"kind": "linear", "seed": 0, "noise": 0.1, "target": "y", "rows": 10, "features": 3, "files": 3,
            "format": fmt}
    assert truth["feature_names"] == ["x0", "x1", "x2"] and len(truth["coef"]) == 3


def test_formats_hold_the_same_float32_values(tmp_path):
    """The format never changes the data, and CSV cells read back as exactly the stored float32 values."""
    got = {}
    for fmt in ("csv", "parquet", "npy"):
        make_data(SynthSpec("linear", 2000, 4, 2, fmt, seed=3), tmp_path / fmt)
        X, y, _ = load(tmp_path / fmt)
        got[fmt] = np.column_stack([X, y])
    ref = got["npy"]
    assert np.array_equal(ref.astype(np.float32).astype(np.float64), ref)  # npy values are float32 values
    assert np.array_equal(got["parquet"], ref)
    assert np.array_equal(got["csv"].astype(np.float32), ref.astype(np.float32))
    assert np.abs(got["csv"] - ref).max() <= 6e-8 * np.abs(ref).max()


def test_parquet_row_groups_are_block_sized(tmp_path):
    make_data(SynthSpec("linear", 300_000, 2, 1, "parquet"), tmp_path / "d")
    meta = pq.ParquetFile(tmp_path / "d" / "part-00000.parquet").metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [synth.BLOCK_ROWS, synth.BLOCK_ROWS, 300_000 - 2 * synth.BLOCK_ROWS]


def test_linear_truth_is_recovered_by_least_squares(tmp_path):
    make_data(SynthSpec("linear", 20_000, 8, 3, "npy", seed=11, noise=0.1), tmp_path / "d")
    X, y, truth = load(tmp_path / "d")
    A = np.column_stack([np.ones(len(X)), X])
    beta, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ beta
    sigma = resid.std(ddof=A.shape[1])
    # OLS: cov(beta) = sigma² (AᵀA)⁻¹. The y float32 rounding (~|y|·6e-8) is negligible next to 0.1.
    se = sigma * np.sqrt(np.diag(np.linalg.inv(A.T @ A)))
    z = (beta - np.array([truth["intercept"], *truth["coef"]])) / se
    assert np.abs(z).max() < 5, z
    assert abs(sigma / 0.1 - 1) < 0.05  # sd of this estimate is ~0.5 %


def test_linear_without_noise_is_exact_up_to_float32_rounding_of_y(tmp_path):
    make_data(SynthSpec("linear", 500, 4, 1, "npy", seed=2, noise=0.0), tmp_path / "d")
    X, y, truth = load(tmp_path / "d")
    exact = X @ np.array(truth["coef"]) + truth["intercept"]
    assert np.all(np.abs(y - exact) <= 2 ** -23 * np.abs(exact))  # float32 rounding is ≤ 2^-24 relative
    assert np.abs(y - exact).max() > 0  # …and it did happen: y was stored as float32


def test_logistic_truth_is_recovered_and_the_task_is_not_separable(tmp_path):
    make_data(SynthSpec("logistic", 20_000, 6, 2, "parquet", seed=5), tmp_path / "d")
    X, y, truth = load(tmp_path / "d")
    assert set(np.unique(y)) == {0.0, 1.0}
    coef, b = np.array(truth["coef"]), truth["intercept"]
    eta = X @ coef + b
    assert 2.0 < eta.std() < 3.0  # the documented logit spread (2.5)
    assert 0.3 < y.mean() < 0.7
    bayes_error = np.mean((eta > 0) != (y == 1))
    assert 0.05 < bayes_error < 0.3  # learnable, yet far from separable
    # Fit on standardized features (well conditioned for lbfgs); compare in that parameterisation.
    mu, sd = X.mean(axis=0), X.std(axis=0)
    Xs = (X - mu) / sd
    model = LogisticRegression(C=1e8, tol=1e-10, max_iter=10_000).fit(Xs, y)  # C huge: plain MLE
    est = np.array([model.intercept_[0], *model.coef_[0]])
    true = np.array([b + coef @ mu, *(coef * sd)])
    # MLE: cov = (Aᵀ W A)⁻¹, W = p(1-p), the inverse Fisher information at the true parameters.
    A = np.column_stack([np.ones(len(Xs)), Xs])
    p = 1 / (1 + np.exp(-(A @ true)))
    se = np.sqrt(np.diag(np.linalg.inv(A.T @ (A * (p * (1 - p))[:, None]))))
    z = (est - true) / se
    assert np.abs(z).max() < 5, z


def test_feature_scales_and_means_differ_as_documented(tmp_path):
    make_data(SynthSpec("linear", 5000, 20, 1, "npy", seed=1, scale_spread=10), tmp_path / "d")
    X, _, truth = load(tmp_path / "d")
    sd, mean = X.std(axis=0), X.mean(axis=0)
    scales, means = np.array(truth["feature_scales"]), np.array(truth["feature_means"])
    assert np.all((scales >= 0.1) & (scales <= 10)) and np.all(np.abs(means) <= 50)
    assert np.allclose(sd, scales, rtol=0.06)  # sd of a sample sd over 5000 rows: ~1 %
    assert np.all(np.abs(mean - means) < 0.06 * scales)
    assert sd.max() / sd.min() >= 10  # with 20 features u spans ≥ 1 of [-1, 1]: ratio ≥ F
    assert np.ptp(mean) > 20
    make_data(SynthSpec("linear", 5000, 20, 1, "npy", seed=1, scale_spread=1), tmp_path / "flat")
    X1, _, _ = load(tmp_path / "flat")
    assert X1.std(axis=0).max() / X1.std(axis=0).min() < 1.2


BASE = ["make-data", "--kind", "linear", "--rows", "5", "--features", "2"]


@pytest.mark.parametrize(("args", "message"), [
    (["--rows", "0"], "--rows must be at least 1, not 0"),
    (["--features", "0"], "--features must be at least 1, not 0"),
    (["--files", "0"], "--files must be between 1 and --rows (5), not 0"),
    (["--files", "6"], "--files must be between 1 and --rows (5), not 6"),
    (["--noise", "-0.5"], "--noise must be a finite number ≥ 0, not -0.5"),
    (["--noise", "nan"], "--noise must be a finite number ≥ 0"),
    (["--scale-spread", "0.5"], "--scale-spread must be a finite number ≥ 1, not 0.5"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_bad_arguments_exit_2_with_a_clear_message_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "d"
    assert main([*BASE, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradpipe make-data: error: ") and message in err and "Traceback" not in err
    assert not out.exists() and siblings(out) == []


def test_refuses_a_directory_with_unknown_files_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "part-00000.csv").write_text("a\n1\n")
    assert main([*BASE, "--out", str(out)]) == 2
    assert "not a previous make-data output (it holds notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "part-00000.csv"]
    assert (out / "notes.txt").read_text() == "mine" and siblings(out) == []
    (out / "notes.txt").unlink()  # part files alone, without truth.json, are not make-data's either
    assert main([*BASE, "--out", str(out)]) == 2
    assert "it has no truth.json" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main([*BASE, "--out", str(tmp_path / "f")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_replaces_a_previous_output_and_an_empty_directory(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    assert main([*BASE, "--files", "3", "--out", str(out)]) == 0
    assert main([*BASE, "--files", "2", "--format", "parquet", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet", "truth.json"]
    assert json.loads((out / "truth.json").read_text())["format"] == "parquet"
    assert siblings(out) == []


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("boom")])
def test_a_failure_leaves_no_directory_and_keeps_a_previous_output(tmp_path, monkeypatch, capsys, exc):
    real = synth.write_part

    def failing(spec, truth, index, path):
        if index == 1:
            Path(path).write_bytes(b"half")
            raise exc
        return real(spec, truth, index, path)

    monkeypatch.setattr(synth, "write_part", failing)
    out = tmp_path / "d"
    args = [*BASE, "--files", "3", "--threads", "1", "--out", str(out)]
    if isinstance(exc, OSError):
        assert main(args) == 2
        assert "could not write" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError):
            main(args)
    assert not out.exists() and siblings(out) == []

    monkeypatch.setattr(synth, "write_part", real)
    make_data(SynthSpec("linear", 5, 2, 1, "csv"), out)
    before = tree_hashes(out)
    monkeypatch.setattr(synth, "write_part", failing)
    with pytest.raises((GradpipeError, RuntimeError)):
        make_data(SynthSpec("linear", 9, 2, 3, "csv"), out, threads=2)
    assert tree_hashes(out) == before and siblings(out) == []
