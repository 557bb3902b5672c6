"""Finding source files, reading their column names, and splitting them into pieces to parse.

Runs on the driver and touches only headers and metadata, never the bulk of a file. A source is a local path
or an fsspec URI (``s3://bucket/raw/a.csv``): remote files are read by byte ranges, never downloaded whole.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path, PurePosixPath
from typing import IO, TypeVar

import numpy as np

from pipeline.errors import GradpipeError
from pipeline.store import location

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npy": "npy"}
COMPRESSED = {".gz", ".bz2", ".xz", ".zst", ".zip"}
PIECE_BYTES = 32 * 2**20  # bytes of raw input per parse task: bounds a task's memory whatever the file size
HEADER_BLOCK = 2**16  # bytes per remote read while reading a header or looking for a line end
REMOTE_THREADS = 16  # concurrent header and metadata requests while planning remote files
T = TypeVar("T")


@dataclass(frozen=True)
class Piece:
    """One parse task's share of a file: a byte range (CSV), a row group (Parquet) or a row range (npy)."""

    path: str
    fmt: str
    index: int  # position of the piece within its file
    start: int
    stop: int
    columns: tuple[str, ...]  # this file's own columns, in its own order


def discover(sources: list[str]) -> list[str]:
    """Expand files, directories and globs into a sorted, de-duplicated list of supported files (local paths
    resolved, URIs with their scheme)."""
    found: list[str] = []
    for src in sources:
        if location.is_remote(src):
            found.extend(_discover_remote(src))
            continue
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
                found.extend(str(p.resolve()) for p in inside)
            elif m.is_file():
                _check_suffix(str(m))
                found.append(str(m.resolve()))
            else:
                raise GradpipeError(f"{m} does not exist.")
    return list(dict.fromkeys(found))


def _check_suffix(path: str) -> None:
    suffix = PurePosixPath(path).suffix
    if suffix.lower() not in FORMATS:
        raise GradpipeError(f"{path}: unsupported file type {suffix!r} (use .csv, .parquet or .npy).")


def _discover_remote(src: str) -> list[str]:
    """A URI, a glob or a "directory" prefix on an object store, as full URIs, with the local errors."""
    fs, path = location.filesystem(src)
    scheme = location.protocol(src)
    fs.invalidate_cache()  # listings cached earlier in this process would hide objects added since
    found: list[str] = []
    try:
        if glob.has_magic(path):  # the listing tells files from prefixes: no request per match
            infos = fs.glob(path, detail=True)
            matches = [(m, f"{scheme}://{m}", infos[m].get("type")) for m in sorted(infos)]
            if not matches:
                raise GradpipeError(f"no files match {src!r}.")
        else:
            matches = [(path, src, None)]
        for m, shown, kind in matches:
            if kind == "file" or (kind is None and fs.isfile(m)):
                _check_suffix(shown)
                found.append(f"{scheme}://{m}")
            elif kind == "directory" or (kind is None and fs.isdir(m)):
                found.extend(f"{scheme}://{p}" for p in _remote_directory(fs, m, shown.rstrip("/")))
            else:
                raise GradpipeError(f"{shown} does not exist.")
    except OSError as exc:
        raise GradpipeError(f"cannot list {src} ({exc}); check the URI, AWS_ENDPOINT_URL and the "
                            f"credentials.") from None
    return found


def _remote_directory(fs, path: str, shown: str) -> list[str]:
    """The supported objects under a prefix; compressed sources refused as for a local directory."""
    keys = sorted(fs.find(path))
    packed = [f"{shown}/{k[len(path):].lstrip('/')}" for k in keys if PurePosixPath(k).suffix.lower() in COMPRESSED
              and PurePosixPath(PurePosixPath(k).stem).suffix.lower() in FORMATS]
    if packed:
        raise GradpipeError(f"directory {shown} holds compressed files ingest cannot split into "
                            f"pieces: {', '.join(packed[:3])}{' …' if len(packed) > 3 else ''} (decompress "
                            "them, e.g. `gunzip -k`, or name the other files explicitly).")
    inside = [k for k in keys if PurePosixPath(k).suffix.lower() in FORMATS]
    if not inside:
        raise GradpipeError(f"directory {shown} holds no .csv, .parquet or .npy files.")
    return inside


def map_files(fn: Callable[[str], T], files: list[str]) -> list[T]:
    """``[fn(f) for f in files]``, concurrently when files are on an object store: each call mostly waits
    on requests (a header, a line end), so threads overlap the round trips and planning a thousand objects
    takes seconds rather than minutes. Results keep the files' order; the first failing file's error is
    raised, as the loop would."""
    if len(files) < 2 or not any(location.is_remote(f) for f in files):
        return [fn(f) for f in files]
    with ThreadPoolExecutor(min(REMOTE_THREADS, len(files))) as pool:
        return list(pool.map(fn, files))


def remote_file(path: str):
    """``(fs, path)`` for a URI, with anything this process cached about the object dropped: s3fs answers
    ``info``/``size`` from listings it cached earlier, which would hide a rewritten object."""
    fs, p = location.filesystem(path)
    fs.invalidate_cache(p)
    return fs, p


def open_source(path: str, *, ranged: bool = False) -> IO[bytes]:
    """A source file opened for reading: a local file, or an fsspec file that fetches byte ranges.

    Remote reads never use s3fs's default 50 MiB read-ahead block (a ``readline`` would fetch a whole small
    file): ``ranged`` files fetch exactly what each read asks for (Parquet column chunks, hashing), the others
    small read-ahead blocks (headers, finding line ends).
    """
    if location.is_remote(path):
        fs, p = remote_file(path)
        if ranged:
            return fs.open(p, "rb", cache_type="none")
        return fs.open(p, "rb", block_size=HEADER_BLOCK, cache_type="readahead")
    return open(path, "rb")


def source_size(path: str) -> int:
    if location.is_remote(path):
        fs, p = remote_file(path)
        return int(fs.size(p))
    return Path(path).stat().st_size


def _is_file(path: str) -> bool:
    if location.is_remote(path):
        fs, p = remote_file(path)
        return fs.isfile(p)
    return Path(path).is_file()


def file_format(path: str) -> str:
    return FORMATS[PurePosixPath(str(path)).suffix.lower()]


def npy_column_names(n_columns: int) -> list[str]:
    return [f"col{i}" for i in range(n_columns)]


def read_columns(path: str) -> list[str]:
    """The file's column names (CSV header, Parquet schema, or ``col0..`` for a 2-D .npy)."""
    fmt = file_format(path)
    if not _is_file(path):
        raise GradpipeError(f"{path} does not exist (it may have been moved or deleted).")
    if source_size(path) == 0:
        raise GradpipeError(f"{path} is empty.")
    if not location.is_remote(path) and not os.access(path, os.R_OK):
        raise GradpipeError(f"{path} is not readable (permission denied).")
    if fmt == "csv":
        with open_source(path) as fh:
            first = fh.readline()
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
        header = next(csv.reader(io.StringIO(first.decode("utf-8-sig", errors="replace"))), [])
        columns = [c.strip() for c in header]
        if not columns or not any(columns):
            raise GradpipeError(f"{path}: line 1 is not a header row.")
    elif fmt == "parquet":
        columns = parquet_file(path).schema_arrow.names
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


def parquet_file(path: str):
    """A ``ParquetFile``: a local path as pyarrow opens it natively; a URI through an fsspec file of exact
    byte ranges, so only the footer (and later the row groups asked for) are fetched."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(open_source(path, ranged=True) if location.is_remote(path) else path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise GradpipeError(f"{path}: unreadable Parquet file ({exc}).") from None


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with open_source(path) as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)  # the header only: no data read, nothing unpickled
            offset = fh.tell()
    except Exception as exc:  # noqa: BLE001
        raise GradpipeError(f"{path}: not a valid .npy file ({exc}).") from None
    if fortran and location.is_remote(path):  # a row range of a Fortran-ordered array is not one byte range
        raise GradpipeError(f"{path}: a Fortran-ordered .npy cannot be read by row ranges from an object "
                            f"store; save it with np.save(path, np.ascontiguousarray(a)).")
    _check_npy_size(path, shape, dtype, offset)
    return shape, dtype


def _check_npy_size(path: str, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
    """A truncated .npy (an interrupted copy or download) fails here on the driver, naming what is missing,
    instead of as an mmap error inside a worker."""
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = source_size(path)
    if size < expected:
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        complete = max(0, size - offset) // row_bytes if row_bytes else 0
        raise GradpipeError(f"{path}: truncated .npy file: its header says shape {shape} of {dtype} "
                            f"({expected:,} bytes), the file holds {size:,} bytes (only {complete:,} complete "
                            f"rows). Copy or save the file again.")


def plan_pieces(path: str, columns: list[str]) -> tuple[list[Piece], int]:
    """Split a file into pieces; also return an upper bound on its number of data rows."""
    fmt = file_format(path)
    size = source_size(path)
    if fmt == "csv":
        pieces, bound = _plan_csv(path, size, tuple(columns))
    elif fmt == "parquet":
        meta = parquet_file(path).metadata
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


def _plan_csv(path: str, size: int, columns: tuple[str, ...]) -> tuple[list[Piece], int]:
    with open_source(path) as fh:  # one file: the header, the first data block and the line ends it holds
        fh.readline()
        start = fh.tell()
        if not _has_data(fh, min(size, start + PIECE_BYTES)):
            return [], 0
        bounds = [start]
        while bounds[-1] < size:
            target = bounds[-1] + PIECE_BYTES
            if target >= size:
                bounds.append(size)
                break
            fh.seek(target)
            fh.readline()  # move to the start of the next line so no row is split
            bounds.append(min(fh.tell(), size))
    pieces = [Piece(str(path), "csv", i, a, b, columns) for i, (a, b) in enumerate(pairwise(bounds)) if b > a]
    # A row holds n_columns-1 separators and a newline, so at least n_columns bytes even with empty cells
    # (the last line may lack its newline: +1). Blank lines hold no row.
    return pieces, (size - start) // len(columns) + 1


def _has_data(fh: IO[bytes], stop: int) -> bool:
    """Whether the bytes from ``fh``'s position to ``stop`` hold anything but whitespace, read in small blocks
    that stop at the first non-blank one (almost always the first, already fetched with the header)."""
    start = fh.tell()
    while start < stop:
        block = fh.read(min(HEADER_BLOCK, stop - start))
        if not block:
            return False
        if block.strip():
            return True
        start += len(block)
    return False


def file_identity(path: str) -> dict[str, int | float | str]:
    """What tells, without reading it, that a file is the one ingested.

    Local: size, mtime, ctime and inode (ctime cannot be set by users: ``touch -r`` and ``cp -p`` restore
    mtime, not ctime, so a file whose content may have changed is always re-hashed). Object stores: size,
    modification time and ETag (a rewritten object gets a new ETag).
    """
    if location.is_remote(path):
        fs, p = remote_file(path)
        info = fs.info(p)
        modified = info.get("LastModified") or info.get("mtime")
        mtime = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0.0)
        return {"size": int(info["size"]), "mtime": mtime, "etag": str(info.get("ETag") or info.get("etag") or "")}
    st = Path(path).stat()
    return {"size": st.st_size, "mtime": st.st_mtime, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino}
