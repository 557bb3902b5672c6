"""Parsing and validating one piece of a source file. Runs inside Dask tasks on the workers.

The fast path hands the bytes to pyarrow; only when pyarrow rejects a piece (or the piece holds
invalid values) do we re-read it row by row to name the exact line, column and value.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import GradpipeError
from pipeline.ingest.sources import Piece
from pipeline.stats import FeatureStats


@dataclass(frozen=True)
class Schema:
    """What to extract from every source (by name: files may order their columns differently)."""

    features: list[str]
    target: str
    dtype: str
    on_invalid: str  # "error" | "drop"


@dataclass
class Parsed:
    X: np.ndarray
    y: np.ndarray
    meta: PieceMeta


@dataclass(frozen=True)
class PieceMeta:
    n_rows: int
    n_dropped: int
    stats: FeatureStats


def piece_meta(parsed: Parsed) -> PieceMeta:
    """The small part of a parse result that travels to the driver."""
    return parsed.meta


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * 2**20):
            h.update(block)
    return h.hexdigest()


def parse_piece(piece: Piece, schema: Schema) -> Parsed:
    if piece.fmt == "csv":
        table = _read_csv(piece, schema)
    elif piece.fmt == "parquet":
        table = _read_parquet(piece, schema)
    else:
        table = _read_npy(piece, schema)
    X, y, valid, first_row = table
    n_dropped = 0
    if not valid.all():
        if schema.on_invalid == "error":
            _raise_invalid(piece, schema, X, y, valid, first_row)
        n_dropped = int((~valid).sum())
        X, y = X[valid], y[valid]
    X = np.ascontiguousarray(X, dtype=schema.dtype)
    y = np.ascontiguousarray(y, dtype=schema.dtype)
    return Parsed(X, y, PieceMeta(len(y), n_dropped, FeatureStats.of(X)))


Table = tuple[np.ndarray, np.ndarray, np.ndarray, int]  # X, y, valid-row mask, first row number


def _finite_mask(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.isfinite(X).all(axis=1) & np.isfinite(y)


def _read_csv(piece: Piece, schema: Schema) -> Table:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with open(piece.path, "rb") as fh:
        fh.seek(piece.start)
        data = fh.read(piece.stop - piece.start)
    used = [*schema.features, schema.target]
    try:
        table = pacsv.read_csv(
            pa.py_buffer(data),
            # Parallelism comes from Dask, so pyarrow runs single-threaded; 4 MiB blocks parse ~1.5x
            # faster than one block per piece (measured: 1.49 vs 0.97 M rows/s).
            read_options=pacsv.ReadOptions(column_names=list(piece.columns), use_threads=False,
                                           block_size=4 << 20),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.float64() for c in used},
                                                 include_columns=used),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        return _slow_csv(piece, schema, data, str(exc))
    X = np.column_stack([table.column(c).to_numpy() for c in schema.features]) if schema.features else \
        np.empty((table.num_rows, 0))
    y = table.column(schema.target).to_numpy()
    return X, y, _finite_mask(X, y), 0


def _first_line_number(piece: Piece) -> int:
    """1-based line number of the piece's first line (counts newlines before it; error path only)."""
    count = 0
    with open(piece.path, "rb") as fh:
        remaining = piece.start
        while remaining > 0:
            block = fh.read(min(remaining, 8 * 2**20))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count + 1


def _slow_csv(piece: Piece, schema: Schema, data: bytes, arrow_message: str) -> Table:
    """Row-by-row parse: names the exact bad line, or drops bad rows under ``--on-invalid drop``."""
    line0 = _first_line_number(piece)
    index = {c: i for i, c in enumerate(piece.columns)}
    used = [*schema.features, schema.target]
    rows: list[list[float]] = []
    valid: list[bool] = []
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace")))
    for record in reader:
        line = line0 + reader.line_num - 1
        if not record:
            continue
        if len(record) != len(piece.columns):
            raise GradpipeError(f"{piece.path}: line {line} has {len(record)} fields, the header has "
                                f"{len(piece.columns)}.")
        values, ok = [], True
        for c in used:
            cell = record[index[c]].strip()
            try:
                v = float(cell)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                ok = False
                if schema.on_invalid == "error":
                    raise GradpipeError(_cell_message(piece.path, f"line {line}", c, cell))
            values.append(v)
        rows.append(values)
        valid.append(ok)
    if not rows and arrow_message:
        raise GradpipeError(f"{piece.path}: could not parse lines from {line0} on ({arrow_message}).")
    arr = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(used))
    return arr[:, :-1], arr[:, -1], np.asarray(valid, dtype=bool), 0


def _cell_message(path: str, where: str, column: str, value: str) -> str:
    if value == "":
        what = "is empty"
    else:
        try:
            float(value)
            what = f"is {value!r}, which is not a finite number"
        except ValueError:
            what = f"is {value!r}, which is not a number"
    return (f"{path}: {where}, column {column!r} {what}. Fix the file, or pass --on-invalid drop to "
            f"skip such rows.")


def _raise_invalid(piece: Piece, schema: Schema, X, y, valid, first_row: int) -> None:
    if piece.fmt == "csv":
        with open(piece.path, "rb") as fh:
            fh.seek(piece.start)
            data = fh.read(piece.stop - piece.start)
        _slow_csv(piece, schema, data, "")  # raises, naming the exact line
    bad = int(np.flatnonzero(~valid)[0])
    row = np.append(X[bad], y[bad])
    j = int(np.flatnonzero(~np.isfinite(row))[0])
    column = [*schema.features, schema.target][j]
    raise GradpipeError(_cell_message(piece.path, f"row {first_row + bad} (0-based)", column, str(row[j])))


def _read_parquet(piece: Piece, schema: Schema) -> Table:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    first_row = sum(pf.metadata.row_group(i).num_rows for i in range(piece.start))
    try:
        table = pf.read_row_group(piece.start, columns=[*schema.features, schema.target])
        cols = [table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                for c in [*schema.features, schema.target]]
    except Exception as exc:  # noqa: BLE001 - corrupt pages and non-numeric columns alike
        raise GradpipeError(f"{piece.path}: row group {piece.start} cannot be read as numbers "
                            f"({exc}).") from None
    X = np.column_stack(cols[:-1]) if schema.features else np.empty((len(cols[-1]), 0))
    return X, cols[-1], _finite_mask(X, cols[-1]), first_row


def _read_npy(piece: Piece, schema: Schema) -> Table:
    arr = np.load(piece.path, mmap_mode="r", allow_pickle=False)
    index = {c: i for i, c in enumerate(piece.columns)}
    block = np.asarray(arr[piece.start:piece.stop], dtype=np.float64)
    X = block[:, [index[c] for c in schema.features]]
    y = block[:, index[schema.target]]
    return X, y, _finite_mask(X, y), piece.start
