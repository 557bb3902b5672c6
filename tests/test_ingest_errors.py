"""Bad input: one clear message naming file/line/column or setting, exit code 2, nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.ingest import ingest
from tests.conftest import dataset_state, make_xy, write_csv

GOOD = "x0,x1,y\n1,2,3\n4,5,6\n7,8,9\n"


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["ingest", *args])
    err = capsys.readouterr().err
    return code, err


CASES = {
    # name: (files {name: text}, extra args, expected message fragment)
    "empty file": ({"a.csv": ""}, [], r"a\.csv is empty"),
    "header only": ({"a.csv": "x0,x1,y\n"}, [], r"a\.csv has a header but no data rows"),
    "target missing": ({"a.csv": GOOD}, ["--target", "nope"], r"--target 'nope' is not a column of .*a\.csv"),
    "not a number": ({"a.csv": "x0,x1,y\n1,2,3\n4,five,6\n"}, [],
                     r"a\.csv: line 3, column 'x1' is 'five', which is not a number"),
    "empty cell": ({"a.csv": "x0,x1,y\n1,2,3\n4,,6\n"}, [], r"a\.csv: line 3, column 'x1' is empty"),
    "nan": ({"a.csv": "x0,x1,y\n1,2,3\n4,5,NaN\n"}, [],
            r"a\.csv: line 3, column 'y' is 'NaN', which is not a finite number"),
    "inf": ({"a.csv": "x0,x1,y\n1,2,3\n-inf,5,6\n"}, [],
            r"a\.csv: line 3, column 'x0' is '-inf', which is not a finite number"),
    "ragged": ({"a.csv": "x0,x1,y\n1,2,3\n4,5\n"}, [], r"a\.csv: line 3 has 2 fields, the header has 3"),
    "columns differ": ({"a.csv": GOOD, "b.csv": "x0,z,y\n1,2,3\n"}, [],
                       r"b\.csv: columns differ from .*a\.csv \(extra: \['z'\], missing: \['x1'\]\)"),
    "duplicate columns": ({"a.csv": "x0,x0,y\n1,2,3\n"}, [], r"a\.csv: duplicate column name\(s\) \['x0'\]"),
    "all dropped": ({"a.csv": "x0,x1,y\n1,,3\n"}, ["--on-invalid", "drop"], r"no data rows"),
    "unreadable parquet": ({"a.parquet": "this is not parquet"}, [], r"a\.parquet: unreadable Parquet file"),
    "unsupported type": ({"a.txt": GOOD}, [], r"unsupported file type '\.txt'"),
    "digit underscores": ({"a.csv": "x0,x1,y\n1,2,3\n1_000,5,6\n"}, [],
                          r"a\.csv: line 3, column 'x0' is '1_000', which is not a number"),
    "float32 overflow": ({"a.csv": "x0,x1,y\n1,2,3\n4,1e39,6\n"}, ["--dtype", "float32"],
                         r"a\.csv: line 3, column 'x1' is '1e39', which does not fit float32"),
    "features twice": ({"a.csv": GOOD}, ["--features", "x0,x0"], r"--features lists \['x0'\] more than once"),
    "features empty": ({"a.csv": GOOD}, ["--features", ","], r"--features names no column"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_clear_message(name, tmp_path, scheduler, capsys):
    files, extra, pattern = CASES[name]
    for fname, text in files.items():
        (tmp_path / fname).write_text(text)
    sources = [str(tmp_path / f) for f in files]
    args = [*sources, "--dataset", str(tmp_path / "ds.zarr"), "--scheduler", scheduler]
    if "--target" not in extra:
        args += ["--target", "y"]
    code, err = run_cli(capsys, *args, *extra)
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    assert re.search(pattern, errors[0]), err
    assert not (tmp_path / "ds.zarr").exists()


def test_missing_path_and_empty_glob(tmp_path, capsys):
    code, err = run_cli(capsys, str(tmp_path / "nope.csv"), "--target", "y", "--dataset", str(tmp_path / "d"))
    assert code == 2 and "nope.csv does not exist" in err
    code, err = run_cli(capsys, str(tmp_path / "*.csv"), "--target", "y", "--dataset", str(tmp_path / "d"))
    assert code == 2 and "no files match" in err


def test_existing_non_dataset_is_refused_and_kept(tmp_path, scheduler, capsys):
    target = tmp_path / "ds.zarr"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    (tmp_path / "a.csv").write_text(GOOD)
    code, err = run_cli(capsys, str(tmp_path / "a.csv"), "--target", "y", "--dataset", str(target),
                        "--scheduler", scheduler)
    assert code == 2 and "is not a gradpipe dataset" in err
    assert (target / "precious.txt").read_text() == "keep me"


def parquet_file(path: Path, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


@pytest.mark.parametrize("column, message", [
    (["1.5", "2", "x9"], r"a\.parquet: row 2 \(0-based\), column 'x1' is 'x9', which is not a number"),
    ([1.0, None, 3.0], r"a\.parquet: row 1 \(0-based\), column 'x1' is empty"),
    ([1.0, float("nan"), 3.0], r"a\.parquet: row 1 \(0-based\), column 'x1' is 'nan', which is not a finite"),
])
def test_parquet_bad_cells_are_named(column, message, tmp_path, client):
    from pipeline.errors import GradpipeError

    path = parquet_file(tmp_path / "a.parquet", x0=[1.0, 2.0, 3.0], x1=column, y=[0.0, 1.0, 2.0])
    with pytest.raises(GradpipeError, match=message):
        ingest([str(path)], tmp_path / "ds.zarr", "y", client)
    assert not (tmp_path / "ds.zarr").exists()


def test_input_errors_need_no_cluster(tmp_path, capsys):
    """Without --scheduler, a bad --target fails before a LocalCluster is started (no `dask:` line)."""
    (tmp_path / "a.csv").write_text(GOOD)
    code, err = run_cli(capsys, str(tmp_path / "a.csv"), "--target", "nope", "--dataset", str(tmp_path / "d"))
    assert code == 2 and "is not a column" in err and "dask:" not in err


def test_append_with_other_columns_is_refused(tmp_path, client):
    a = write_csv(tmp_path / "a.csv", *make_xy(20, 2))
    ingest([str(a)], tmp_path / "ds.zarr", "y", client)
    before = dataset_state(tmp_path / "ds.zarr")
    b = write_csv(tmp_path / "b.csv", *make_xy(20, 3))
    from pipeline.errors import GradpipeError

    with pytest.raises(GradpipeError, match=r"b\.csv: columns .* differ from the dataset's"):
        ingest([str(b)], tmp_path / "ds.zarr", "y", client)
    assert dataset_state(tmp_path / "ds.zarr") == before


def test_npy_with_objects_is_refused_without_unpickling(tmp_path, scheduler, capsys):
    np.save(tmp_path / "a.npy", np.array([[1, "x"]], dtype=object), allow_pickle=True)
    code, err = run_cli(capsys, str(tmp_path / "a.npy"), "--target", "0", "--dataset", str(tmp_path / "d"),
                        "--scheduler", scheduler)
    assert code == 2 and "must be numeric" in err


def test_debug_shows_traceback(tmp_path, capsys):
    assert main(["ingest", str(Path(tmp_path) / "x.csv"), "--target", "y", "--dataset", "d", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ingest", "train", "run", "evaluate"])
@pytest.mark.parametrize("workers", ["-1", "0", "two"])
def test_workers_below_one_is_refused_by_argparse(capsys, tmp_path, command, workers):
    """`--workers -1` hung ingest and `0` silently meant the default: argparse refuses both, exit 2, before
    any cluster starts or any file is touched (the dataset path is never created)."""
    ds = tmp_path / "ds.zarr"
    args = {"ingest": [str(tmp_path), "--target", "y", "--dataset", str(ds)],
            "train": ["--dataset", str(ds)],
            "run": [],
            "evaluate": ["--run", "r", "--dataset", str(ds)]}[command]
    with pytest.raises(SystemExit) as exc:
        main([command, *args, "--workers", workers])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"argument --workers: .*(>= 1|whole number).*" + re.escape(workers), err), err
    assert "Traceback" not in err and not ds.exists()


def test_every_option_of_these_commands_has_help_text():
    """`--dtype`, `--seed`, `--checkpoint-every` and others printed no help: each option now says what it does."""
    from pipeline.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    missing = [(name, act.option_strings[-1]) for name in ("ingest", "train", "run", "serve", "evaluate",
                                                           "make-data")
               for act in sub[name]._actions if act.option_strings and not act.help]
    assert not missing, missing


def test_compressed_csv_in_a_directory_is_named_not_skipped(capsys, tmp_path):
    """A `.csv.gz` beside plain CSVs was skipped silently (rows missing without a word): now exit 2 naming
    it, and no dataset is written."""
    import gzip

    src = tmp_path / "raw"
    src.mkdir()
    (src / "a.csv").write_text(GOOD)
    (src / "b.csv.gz").write_bytes(gzip.compress(GOOD.encode()))
    ds = tmp_path / "ds.zarr"
    code, err = run_cli(capsys, str(src), "--target", "y", "--dataset", str(ds))
    assert code == 2, err
    assert "b.csv.gz" in err and "decompress" in err and "Traceback" not in err
    assert not ds.exists()


def test_csv_field_over_the_csv_module_limit_names_file_and_line(capsys, tmp_path):
    """A 200 KiB field raised `_csv.Error: field larger than field limit` as a traceback (exit 1)."""
    src = tmp_path / "a.csv"
    src.write_text("x0,x1,y\n1,2,3\n4," + "a" * 200_000 + ",6\n")
    ds = tmp_path / "ds.zarr"
    code, err = run_cli(capsys, str(src), "--target", "y", "--dataset", str(ds))
    assert code == 2, err
    assert re.search(r"a\.csv: line 3 cannot be read as CSV \(field larger than field limit", err), err
    assert "Traceback" not in err and not ds.exists()
