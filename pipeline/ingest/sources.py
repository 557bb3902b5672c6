"""Finding source files, reading their column names, and splitting them into pieces to parse.

Runs on the driver and touches only headers and metadata, never the bulk of a file.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from pipeline.errors import GradpipeError

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npy": "npy"}
COMPRESSED = {".gz", ".bz2", ".xz", ".zst", ".zip"}
PIECE_BYTES = 32 * 2**20  # bytes of raw input per parse task: bounds a task's memory whatever the file size


@dataclass(frozen=True)
class Piece:
    """One parse task's share of a file: a byte range (CSV), a row group (Parquet) or a row range (npy)."""

    path: str
    fmt: str
    index: int  # position of the piece within its file
    start: int
    stop: int
    columns: tuple[str, ...]  # this file's own columns, in its own order


def discover(sources: list[str]) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of supported files."""
    found: list[Path] = []
    for src in sources:
        matches = [Path(p) for p in sorted(glob.glob(src))] if glob.has_magic(src) else [Path(src)]
        if not matches:
            raise GradpipeError(f"no files match {src!r}.")
        for m in matches:
            if m.is_dir():
                inside = sorted(p for p in m.rglob("*") if p.suffix.lower() in FORMATS and p.is_file())
                # Compressed files were skipped silently, so a dataset could miss rows without a word.
                packed = sorted(p for p in m.rglob("*") if p.suffix.lower() in COMPRESSED
                                and Path(p.stem).suffix.lower() in FORMATS and p.is_file())
                if packed:
                    raise GradpipeError(f"directory {m} holds compressed files ingest cannot split into "
                                        f"pieces: {', '.join(str(p) for p in packed[:3])}"
                                        f"{' …' if len(packed) > 3 else ''} (decompress them, e.g. "
                                        "`gunzip -k`, or name the other files explicitly).")
                if not inside:
                    raise GradpipeError(f"directory {m} holds no .csv, .parquet or .npy files.")
                found.extend(inside)
            elif m.is_file():
                if m.suffix.lower() not in FORMATS:
                    raise GradpipeError(f"{m}: unsupported file type {m.suffix!r} "
                                        "(use .csv, .parquet or .npy).")
                found.append(m)
            else:
                raise GradpipeError(f"{m} does not exist.")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def file_format(path: Path) -> str:
    return FORMATS[path.suffix.lower()]


def npy_column_names(n_columns: int) -> list[str]:
    return [f"col{i}" for i in range(n_columns)]


def read_columns(path: Path) -> list[str]:
    """The file's column names (CSV header, Parquet schema, or ``col0..`` for a 2-D .npy)."""
    fmt = file_format(path)
    if not path.is_file():
        raise GradpipeError(f"{path} does not exist (it may have been moved or deleted).")
    if path.stat().st_size == 0:
        raise GradpipeError(f"{path} is empty.")
    if not os.access(path, os.R_OK):
        raise GradpipeError(f"{path} is not readable (permission denied).")
    if fmt == "csv":
        with open(path, "rb") as fh:
            first = fh.readline()
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
        header = next(csv.reader(io.StringIO(first.decode("utf-8-sig", errors="replace"))), [])
        columns = [c.strip() for c in header]
        if not columns or not any(columns):
            raise GradpipeError(f"{path}: line 1 is not a header row.")
    elif fmt == "parquet":
        columns = _parquet_file(path).schema_arrow.names
    else:
        shape, dtype = _npy_header(path)
        if len(shape) != 2:
            raise GradpipeError(f"{path}: a .npy source must be 2-D (rows, columns); it has shape {shape}.")
        if dtype.kind not in "biuf":
            raise GradpipeError(f"{path}: a .npy source must be numeric; its dtype is {dtype}.")
        columns = npy_column_names(shape[1])
    seen: set[str] = set()
    dupes = [c for c in columns if c in seen or seen.add(c)]
    if dupes:
        raise GradpipeError(f"{path}: duplicate column name(s) {sorted(set(dupes))}.")
    return columns


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise GradpipeError(f"{path}: unreadable Parquet file ({exc}).") from None


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)  # the header only: no data read, nothing unpickled
            offset = fh.tell()
    except Exception as exc:  # noqa: BLE001
        raise GradpipeError(f"{path}: not a valid .npy file ({exc}).") from None
    _check_npy_size(path, shape, dtype, offset)
    return shape, dtype


def _check_npy_size(path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
    """A truncated .npy (an interrupted copy or download) fails here on the driver, naming what is missing,
    instead of as an mmap error inside a worker."""
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        complete = max(0, size - offset) // row_bytes if row_bytes else 0
        raise GradpipeError(f"{path}: truncated .npy file: its header says shape {shape} of {dtype} "
                            f"({expected:,} bytes), the file holds {size:,} bytes (only {complete:,} complete "
                            f"rows). Copy or save the file again.")


def plan_pieces(path: Path, columns: list[str]) -> tuple[list[Piece], int]:
    """Split a file into pieces; also return an upper bound on its number of data rows."""
    fmt = file_format(path)
    size = path.stat().st_size
    if fmt == "csv":
        pieces, bound = _plan_csv(path, size, tuple(columns))
    elif fmt == "parquet":
        meta = _parquet_file(path).metadata
        pieces = [Piece(str(path), fmt, i, i, i + 1, tuple(columns)) for i in range(meta.num_row_groups)]
        bound = meta.num_rows
    else:
        shape, dtype = _npy_header(path)
        rows_per_piece = max(1, PIECE_BYTES // max(1, shape[1] * dtype.itemsize))
        pieces = [Piece(str(path), fmt, i, s, min(s + rows_per_piece, shape[0]), tuple(columns))
                  for i, s in enumerate(range(0, shape[0], rows_per_piece))]
        bound = shape[0]
    if not pieces or bound == 0:
        raise GradpipeError(f"{path} has a header but no data rows." if fmt == "csv" else
                            f"{path} has no data rows.")
    return pieces, bound


def _plan_csv(path: Path, size: int, columns: tuple[str, ...]) -> tuple[list[Piece], int]:
    with open(path, "rb") as fh:
        fh.readline()
        start = fh.tell()
        bounds = [start]
        while bounds[-1] < size:
            target = bounds[-1] + PIECE_BYTES
            if target >= size:
                bounds.append(size)
                break
            fh.seek(target)
            fh.readline()  # move to the start of the next line so no row is split
            bounds.append(min(fh.tell(), size))
    with open(path, "rb") as fh:
        fh.seek(start)
        if not fh.read(PIECE_BYTES).strip():
            return [], 0
    pieces = [Piece(str(path), "csv", i, a, b, columns) for i, (a, b) in enumerate(pairwise(bounds)) if b > a]
    # A row holds n_columns-1 separators and a newline, so at least n_columns bytes even with empty cells
    # (the last line may lack its newline: +1). Blank lines hold no row.
    return pieces, (size - start) // len(columns) + 1
