"""Batch predictions from a run's final model: CSV/Parquet in, the same rows plus predictions out.

Streams record batches (pyarrow), so memory is one batch whatever the file size, and needs no cluster:
a prediction is one mat-vec per batch. Input and output may be local paths or object-store URIs
(``s3://…``), read and written through fsspec in blocks, never staged whole. A local output is written under
a temporary name beside the target and renamed into place; an object is uploaded as one PUT or multipart
upload, which the store makes visible only when it completes (a failed prediction aborts it). Either way a
crash never leaves a half-written file where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import GradpipeError
from pipeline.evaluate import load_model
from pipeline.families import get_family
from pipeline.store import location
from pipeline.store.runs import RunStore

BATCH_ROWS = 65_536
CSV_BLOCK_BYTES = 4 << 20
OUTPUT_COLUMNS = ("prediction", "label")


def file_kind(path: str | Path) -> str:
    """'csv' or 'parquet' from the extension (``.csv``, ``.csv.gz``, ``.parquet``, ``.pq``)."""
    name = location.name(path).lower()
    if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zst")):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise GradpipeError(f"{path}: unknown file type; use a .csv or .parquet file.")


def _arrow_fs(path: str | Path):
    """``(pyarrow filesystem, path in it)`` for a URI: fsspec's filesystem seen by pyarrow, which then reads it
    in ranges and blocks like a local file."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, where = location.filesystem(path)
    return PyFileSystem(FSSpecHandler(fs)), where


def _csv_source(path: str | Path):
    """What pyarrow's CSV reader opens: a local path (compression from its extension) or a stream of the
    object, decompressed the same way."""
    if not location.is_remote(path):
        return str(path)
    afs, where = _arrow_fs(path)
    return afs.open_input_stream(where, compression="detect")


def _csv_rows(path: str | Path) -> Iterator[list[str]]:
    """Python's csv module over the (possibly compressed) file: the header, and the slow exact scan."""
    source = _csv_source(path)
    with (pa.input_stream(source, compression="detect") if isinstance(source, str) else source) as raw, \
            io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
        yield from csv.reader(fh)


def _csv_bad_cell(path: Path, features: list[str]) -> tuple[int, str, str] | None:
    """The first feature cell that is not a finite number; run only after pyarrow refused the file."""
    rows = _csv_rows(path)
    header = next(rows, [])
    cols = [(header.index(f), f) for f in features if f in header]
    for i, row in enumerate(rows, start=1):
        for j, name in cols:
            cell = row[j] if j < len(row) else ""
            try:
                ok = math.isfinite(float(cell))
            except ValueError:
                ok = False
            if not ok:
                return i, name, cell
    return None


def _batches(path: str | Path, kind: str, features: list[str]) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    if kind == "parquet":
        try:
            if location.is_remote(path):
                afs, where = _arrow_fs(path)
                pf = pq.ParquetFile(afs.open_input_file(where))  # random access: footer, then row groups
            else:
                pf = pq.ParquetFile(str(path))
        except (OSError, pa.ArrowException) as exc:
            raise GradpipeError(f"{path}: cannot read as Parquet ({exc}).") from None
        return pf.schema_arrow, pf.iter_batches(batch_size=BATCH_ROWS)

    def refused(exc: Exception) -> GradpipeError:
        bad = _csv_bad_cell(path, features) if isinstance(exc, pa.ArrowInvalid) else None
        if bad is not None:
            row, col, cell = bad
            return GradpipeError(f"{path}: row {row}, column {col!r}: {cell!r} is not a number.")
        return GradpipeError(f"{path}: cannot read as CSV ({exc}).")

    try:
        header = next(_csv_rows(path), [])
        # Features are parsed as float64 by pyarrow (fast path); other columns keep their inferred types.
        types = {f: pa.float64() for f in features if f in header}
        reader = pacsv.open_csv(_csv_source(path), read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                convert_options=pacsv.ConvertOptions(column_types=types))
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException) as exc:
        raise refused(exc) from None

    def gen() -> Iterator[pa.RecordBatch]:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowException as exc:
                raise refused(exc) from None
            yield batch

    return reader.schema, gen()


def _as_float(col: pa.Array, name: str, path: str | Path, row0: int) -> np.ndarray:
    """One feature column as float64, or a GradpipeError naming the first bad row (1-based) and column."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            col = pc.cast(col, pa.float64())
        except pa.ArrowInvalid as exc:
            for i, v in enumerate(col.to_pylist()):
                try:
                    float(v)
                except (TypeError, ValueError):
                    raise GradpipeError(f"{path}: row {row0 + i + 1}, column {name!r}: {v!r} is not a number.") \
                        from None
            raise GradpipeError(f"{path}: column {name!r} (rows from {row0 + 1}) is not numeric ({exc}).") from None
    elif not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
              or pa.types.is_boolean(t) or pa.types.is_null(t)):
        raise GradpipeError(f"{path}: column {name!r} has type {t}, not a number.")
    values = col.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls → NaN
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        what = "is missing or NaN" if np.isnan(values[i]) else f"is {values[i]}"
        raise GradpipeError(f"{path}: row {row0 + i + 1}, column {name!r} {what}; predictions need finite numbers.")
    return values


def predict_file(run: str | Path, input: str | Path, out: str | Path) -> dict[str, Any]:
    """Write ``input``'s columns plus ``prediction`` (the family's mean on the response scale: P(y=1) for
    logistic, exp(z) for the log-link families; a classifier also gets ``label`` 0/1) to ``out``. A model
    trained with an offset column needs that column in the input (z = x·coef + intercept + offset).

    Any ``prediction``/``label`` columns already in the input are replaced. Label 1 iff z > 0 (p > 0.5),
    the rule training's accuracy uses.
    """
    RunStore.open(run).require_model()  # a missing or non-finite coefficient would predict NaN
    model = load_model(run)
    src, dst = _location(input), _location(out)
    kind_in, kind_out = file_kind(src), file_kind(dst)
    if not _exists(src):
        raise GradpipeError(f"input {src} does not exist.")
    features = model["feature_names"]
    coef, intercept = model["coef"], model["intercept"]
    family = get_family(model["model"], power=model["power"])
    offset = model["offset"]  # the run's offset column: each row's z gets it added
    needed = features + ([offset] if offset else [])
    schema, batches = _batches(src, kind_in, needed)
    missing = [f for f in needed if f not in schema.names]
    if missing:
        raise GradpipeError(f"{src} lacks column(s) {', '.join(map(repr, missing))} that run {model['run_id']} "
                            f"needs (it has {', '.join(schema.names)}).")
    keep = [f for f in schema if f.name not in OUTPUT_COLUMNS]
    added = [pa.field("prediction", pa.float64())] + ([pa.field("label", pa.int64())] if family.classifier else [])
    out_schema = pa.schema(keep + added)  # no input metadata: it would describe other columns
    rows = 0
    with _completed(dst) as sink:
        try:  # an unwritable --out is the user's to fix: named, no traceback, no temporary file left
            if kind_out == "csv":
                # Arrow quotes every header name by default; write it plain like the input, quoting only a
                # name that needs it (a comma, quote or newline in it).
                plain = not any(set(n) & set(',"\r\n') for n in out_schema.names)
                opts = pacsv.WriteOptions(quoting_header="none" if plain else "needed")
                writer: Any = pacsv.CSVWriter(sink, out_schema, write_options=opts)
            else:
                writer = pq.ParquetWriter(sink, out_schema)
        except (OSError, pa.ArrowException) as exc:
            raise GradpipeError(f"cannot write {dst}: {getattr(exc, 'strerror', None) or exc}.") from None
        with writer:
            for batch in batches:
                X = np.column_stack([_as_float(batch.column(f), f, src, rows) for f in features]) if features \
                    else np.zeros((batch.num_rows, 0))
                z = X @ coef + intercept
                if offset:
                    z += _as_float(batch.column(offset), offset, src, rows)
                cols = [batch.column(f.name) for f in keep] + [pa.array(family.inverse_link(z))]
                if family.classifier:
                    cols.append(pa.array((z > 0).astype(np.int64)))
                writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=out_schema))
                rows += batch.num_rows
    return {"run_id": model["run_id"], "model": model["model"], "input": str(src), "out": str(dst), "rows": rows}


def _location(path: str | Path) -> str | Path:
    """A local path as a ``Path`` (as the summary has always printed it), a URI as it is."""
    return str(path) if location.is_remote(path) else Path(path)


def _exists(path: str | Path) -> bool:
    fs, where = location.filesystem(path)
    return bool(fs.exists(where))


@contextlib.contextmanager
def _completed(dst: str | Path) -> Iterator[Any]:
    """A sink (a path or a file) that becomes ``dst`` only when the block ends without an error.

    Locally: a temporary file beside ``dst``, renamed over it. On an object store: fsspec's upload of ``dst``
    (one PUT, or a multipart upload for a large file), completed by closing it; a failure aborts it instead
    (closing, even by the garbage collector, would publish the rows written so far).
    """
    if location.is_remote(dst):
        fs, where = location.filesystem(dst)
        fobj = fs.open(where, "wb")
        try:
            yield pa.PythonFile(fobj, mode="w")
        except BaseException:
            _abandon(fobj)
            raise
        try:
            fobj.close()
        except OSError as exc:
            raise GradpipeError(f"cannot write {dst}: {exc}.") from None
        return
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GradpipeError(f"cannot write {dst}: {exc.strerror or exc}.") from None
        yield str(tmp)
        try:
            os.replace(tmp, dst)
        except OSError as exc:  # --out names a directory
            raise GradpipeError(f"cannot write {dst}: {exc.strerror or exc}.") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _abandon(fobj: Any) -> None:
    """Throw an unfinished upload away: abort it (s3fs: the multipart upload) and mark the file closed, so
    that nothing closes (and so completes) it later."""
    with contextlib.suppress(Exception):
        fobj.discard()
    fobj.closed = True
