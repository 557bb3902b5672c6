"""Bad input: one clear message naming file/line/column or setting, exit code 2, nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.ingest import ingest
from tests.conftest import make_xy, tree_hashes, write_csv

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
    assert not list(tmp_path.glob(".ds.zarr.staging-*"))


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


def test_append_with_other_columns_is_refused(tmp_path, client):
    a = write_csv(tmp_path / "a.csv", *make_xy(20, 2))
    ingest([str(a)], tmp_path / "ds.zarr", "y", client)
    before = tree_hashes(tmp_path / "ds.zarr")
    b = write_csv(tmp_path / "b.csv", *make_xy(20, 3))
    from pipeline.errors import GradpipeError

    with pytest.raises(GradpipeError, match=r"b\.csv: columns .* differ from the dataset's"):
        ingest([str(b)], tmp_path / "ds.zarr", "y", client)
    assert tree_hashes(tmp_path / "ds.zarr") == before


def test_npy_with_objects_is_refused_without_unpickling(tmp_path, scheduler, capsys):
    np.save(tmp_path / "a.npy", np.array([[1, "x"]], dtype=object), allow_pickle=True)
    code, err = run_cli(capsys, str(tmp_path / "a.npy"), "--target", "0", "--dataset", str(tmp_path / "d"),
                        "--scheduler", scheduler)
    assert code == 2 and "must be numeric" in err


def test_debug_shows_traceback(tmp_path, capsys):
    assert main(["ingest", str(Path(tmp_path) / "x.csv"), "--target", "y", "--dataset", "d", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
