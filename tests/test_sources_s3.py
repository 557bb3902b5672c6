"""Raw sources on a real S3 API (moto's server): discovery, headers, piece plans and parsed pieces of an s3 copy
equal those of the local file (the local parser is the reference), errors name the URI, identities change with
the object."""

from __future__ import annotations

import os
from dataclasses import replace

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.errors import GradpipeError
from pipeline.ingest import sources
from pipeline.ingest.parse import Schema, file_sha256, parse_piece
from tests.conftest import make_xy, write_csv


def put(local, uri: str) -> str:
    """Upload with boto3, not through the code under test's filesystem (its caches stay unaware)."""
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    boto3.client("s3").upload_file(str(local), bucket, key)
    return uri


@pytest.fixture
def raw(tmp_path, s3_bucket, monkeypatch):
    """The same kind of rows as CSV (many pieces), Parquet (several row groups) and npy, locally and on s3."""
    monkeypatch.setattr(sources, "PIECE_BYTES", 4096)
    X, y = make_xy(400, 4, seed=7)
    w = np.random.default_rng(8).uniform(0.1, 3, size=400)
    o = np.random.default_rng(9).normal(size=400)
    names = [f"x{i}" for i in range(4)]
    write_csv(tmp_path / "a.csv", np.column_stack([X, w, o]), y, names=[*names, "w", "o"])
    pq.write_table(pa.table({**{n: X[:, i] for i, n in enumerate(names)}, "w": w, "o": o, "y": y}),
                   tmp_path / "b.parquet", row_group_size=90)
    np.save(tmp_path / "c.npy", np.column_stack([X, w, o, y]))
    local = {n: str(tmp_path / n) for n in ("a.csv", "b.parquet", "c.npy")}
    remote = {n: put(p, f"{s3_bucket}/raw/{n}") for n, p in local.items()}
    return {"local": local, "remote": remote, "bucket": s3_bucket}


def parsed_pieces(path: str, schema_for):
    columns = sources.read_columns(path)
    pieces, bound = sources.plan_pieces(path, columns)
    schema = schema_for(columns)
    return columns, pieces, bound, [parse_piece(p, schema) for p in pieces]


def test_discover_globs_prefixes_and_errors(raw):
    b = raw["bucket"]
    names = ["a.csv", "b.parquet", "c.npy"]
    assert sources.discover([f"{b}/raw/*.csv"]) == [f"{b}/raw/a.csv"]
    assert sources.discover([f"{b}/raw"]) == [f"{b}/raw/{n}" for n in names]
    assert sources.discover([f"{b}/raw/", f"{b}/raw/a.csv"]) == [f"{b}/raw/{n}" for n in names]  # de-duplicated
    assert sources.discover([f"{b}/r*"]) == [f"{b}/raw/{n}" for n in names]  # a glob matching a prefix
    with pytest.raises(GradpipeError, match=f"^{b}/raw/none.csv does not exist.$"):
        sources.discover([f"{b}/raw/none.csv"])
    with pytest.raises(GradpipeError, match=rf"^no files match '{b}/raw/\*.tsv'.$"):
        sources.discover([f"{b}/raw/*.tsv"])
    put(raw["local"]["a.csv"], f"{b}/other/notes.txt")
    with pytest.raises(GradpipeError, match=rf"^{b}/other/notes.txt: unsupported file type '.txt'"):
        sources.discover([f"{b}/other/notes.txt"])
    with pytest.raises(GradpipeError, match=rf"^directory {b}/other holds no .csv, .parquet or .npy files.$"):
        sources.discover([f"{b}/other"])
    put(raw["local"]["a.csv"], f"{b}/other/d.csv.gz")
    with pytest.raises(GradpipeError, match=rf"^directory {b}/other holds compressed files .*{b}/other/d.csv.gz"):
        sources.discover([f"{b}/other/"])
    put(raw["local"]["a.csv"], f"{b}/raw/later.csv")  # added after a listing this process made
    assert f"{b}/raw/later.csv" in sources.discover([f"{b}/raw/*.csv"])


@pytest.mark.parametrize("name", ["a.csv", "b.parquet", "c.npy"])
def test_s3_copy_reads_and_parses_exactly_like_the_local_file(raw, name):
    def schema_for(columns):
        *features, w, o, target = columns  # every file: x0..x3 (col0..), weight, offset, target
        return Schema(features=features, target=target, dtype="float64", on_invalid="error", weight=w, offset=o)

    lcols, lpieces, lbound, local = parsed_pieces(raw["local"][name], schema_for)
    rcols, rpieces, rbound, remote = parsed_pieces(raw["remote"][name], schema_for)
    assert len(lpieces) > 3 and rcols == lcols and rbound == lbound
    assert rpieces == [replace(p, path=raw["remote"][name]) for p in lpieces]
    assert all(p.path == raw["remote"][name] for p in rpieces)
    for a, b in zip(local, remote, strict=True):
        for field in ("XT", "y", "w", "offset"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
        assert a.meta.n_rows == b.meta.n_rows and a.meta.n_dropped == b.meta.n_dropped == 0
    assert sum(p.meta.n_rows for p in remote) == 400
    assert file_sha256(raw["remote"][name]) == file_sha256(raw["local"][name])


def test_malformed_rows_name_the_uri_line_and_column(tmp_path, raw):
    X, y = make_xy(200, 3, seed=3)
    bad = write_csv(tmp_path / "bad.csv", X, y)
    lines = bad.read_text().splitlines()
    lines[150] = lines[150].replace(lines[150].split(",")[1], "oops", 1)  # line 151, column x1
    lines[170] = "1,2"
    bad.write_text("\n".join(lines) + "\n")
    uri = put(bad, f"{raw['bucket']}/raw/bad.csv")
    schema = Schema(features=["x0", "x1", "x2"], target="y", dtype="float64", on_invalid="error")
    for path in (str(bad), uri):  # the same message for both, but for the name
        pieces, _ = sources.plan_pieces(path, sources.read_columns(path))
        assert len(pieces) > 2
        with pytest.raises(GradpipeError) as err:
            for p in pieces:
                parse_piece(p, schema)
        assert str(err.value).startswith(f"{path}: line 151, column 'x1' is 'oops', which is not a number.")
        with pytest.raises(GradpipeError, match=f"^{path}: line 171 has 2 fields, the header has 4.$"):
            for p in pieces:
                parse_piece(p, replace(schema, on_invalid="drop"))
    X[120, 2] = np.nan
    np.save(tmp_path / "nan.npy", np.column_stack([X, y]))
    uri = put(tmp_path / "nan.npy", f"{raw['bucket']}/raw/nan.npy")
    schema = Schema(features=["col0", "col1", "col2"], target="col3", dtype="float64", on_invalid="error")
    pieces, _ = sources.plan_pieces(uri, sources.read_columns(uri))
    with pytest.raises(GradpipeError, match=rf"^{uri}: row 120 \(0-based\), column 'col2' is 'nan'"):
        for p in pieces:
            parse_piece(p, schema)


def test_file_identity_follows_the_object(tmp_path, raw):
    uri = raw["remote"]["a.csv"]
    first = sources.file_identity(uri)
    assert set(first) == {"size", "mtime", "etag"} and first["size"] == os.path.getsize(raw["local"]["a.csv"])
    assert first["etag"] and first["mtime"] > 0 and sources.file_identity(uri) == first
    sources.discover([f"{raw['bucket']}/raw"])  # a listing cached in this process must not answer below
    X, y = make_xy(400, 5, seed=99)
    put(write_csv(tmp_path / "new.csv", X, y), uri)
    second = sources.file_identity(uri)
    assert second["etag"] != first["etag"]
    assert file_sha256(uri) == file_sha256(str(tmp_path / "new.csv"))
    local = sources.file_identity(raw["local"]["a.csv"])
    assert set(local) == {"size", "mtime", "mtime_ns", "ctime_ns", "inode"}


def test_remote_files_are_mapped_in_order_and_the_first_failure_raised(raw):
    b = raw["bucket"]
    files = [f"{b}/raw/{n}" for n in ("a.csv", "b.parquet", "c.npy")]
    assert sources.map_files(sources.read_columns, files) == [sources.read_columns(f) for f in files]
    with pytest.raises(GradpipeError, match="raw/missing.csv does not exist"):
        sources.map_files(sources.read_columns, [files[0], f"{b}/raw/missing.csv", f"{b}/raw/gone.csv"])


def test_the_driver_reads_headers_not_files(tmp_path, s3_bucket, monkeypatch):
    """Counts the bytes the real s3fs file objects fetch (a spy that calls through): reading the header of and
    planning a 5.7 MB CSV (6 pieces), a Parquet file and an npy file fetches a small fraction of each."""
    monkeypatch.setattr(sources, "PIECE_BYTES", 2**20)
    fetched = []
    real = s3fs.core.S3File._fetch_range

    def counting(self, start, end):
        data = real(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    X, y = make_xy(60_000, 4, seed=5)
    write_csv(tmp_path / "a.csv", X, y)
    pq.write_table(pa.table({"x": X[:, 0], "y": y}), tmp_path / "b.parquet", row_group_size=5000)
    np.save(tmp_path / "c.npy", np.column_stack([X, y]))
    for name in ("a.csv", "b.parquet", "c.npy"):
        uri = put(tmp_path / name, f"{s3_bucket}/raw/{name}")
        fetched.clear()
        pieces, _ = sources.plan_pieces(uri, sources.read_columns(uri))
        assert len(pieces) > 1
        if name == "a.csv":  # one GET for the header, one for the header and first rows, one per line end
            assert len(fetched) == len(pieces) + 1, fetched
        assert 0 < sum(fetched) < os.path.getsize(tmp_path / name) / 4, (name, sum(fetched))
