"""The ingest driver: classify sources, stream parse → chunk-aligned writes on Dask, commit atomically.

Memory stays bounded whatever the input size: at most ``window`` parsed pieces are alive at a time, and a
piece is released as soon as the chunk writes that need it are done. Every Zarr chunk is written by exactly
one task, so chunks never race. All writes go into forks of one Icechunk session that the driver merges
and commits once (:class:`pipeline.store.dataset.Transaction`): a failure or kill before the commit leaves
the dataset as it was, and readers never see a half-written append.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from distributed import Client, as_completed, wait

from pipeline.cluster import dask_client
from pipeline.errors import GradpipeError
from pipeline.ingest.parse import Parsed, Schema, file_sha256, parse_piece, piece_meta
from pipeline.ingest.sources import (
    Piece,
    discover,
    file_format,
    file_identity,
    map_files,
    npy_column_names,
    plan_pieces,
    read_columns,
)
from pipeline.stats import FeatureStats, TargetStats
from pipeline.store import atomic, location
from pipeline.store.dataset import (
    COMPRESSORS,
    DatasetInfo,
    Transaction,
    chunk_rows_for,
    commit_info,
    create_arrays,
    read_info,
    read_rows,
    resize_rows,
    write_chunk,
)

OnPiece = Callable[[int, int, int, int], None]
"""``on_piece(done, total, bytes_done, bytes_total)``: called once per parsed piece, in completion order."""

WRITE_DRAIN_SECONDS = 120.0  # a failed ingest waits this long for its running chunk writes to end


@dataclass
class IngestResult:
    dataset: str
    n_rows: int
    snapshot: str | None = None  # the commit this ingest made (or the unchanged tip for a no-op)
    n_features: int = 0
    feature_names: list[str] = field(default_factory=list)
    appended_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    dropped_rows: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def ingest(sources: list[str], dataset: str | Path, target: str, client: Client | None = None, *,
           features: list[str] | None = None, chunk_mb: float = 64.0, dtype: str = "float64",
           on_invalid: str = "error", replace: bool = False, compressor: str = "lz4",
           scheduler: str | None = None, workers: int | None = None, announce: bool = False,
           on_piece: OnPiece | None = None, weight: str | None = None,
           offset: str | None = None) -> IngestResult:
    """Ingest ``sources`` into ``dataset``: create it, append new files, or do nothing if all are known.

    ``weight`` and ``offset`` name the sample-weight and offset columns (not features; stored as arrays
    ``w`` and ``offset``); appending to a dataset must name the same ones.

    Without ``client``, a cluster (``scheduler``, else a LocalCluster of ``workers``) is connected only once
    the inputs are checked and there is something to parse: bad input fails at once, a no-op stays cheap.
    ``on_piece`` hears of every parsed piece (a progress display); a no-op never calls it.
    """
    t0 = time.perf_counter()
    if on_invalid not in ("error", "drop"):
        raise GradpipeError(f"--on-invalid must be 'error' or 'drop', not {on_invalid!r}.")
    if dtype not in ("float64", "float32"):
        raise GradpipeError(f"--dtype must be float64 or float32, not {dtype!r}.")
    if compressor not in COMPRESSORS:
        raise GradpipeError(f"--compressor must be one of {', '.join(COMPRESSORS)}, not {compressor!r}.")
    if chunk_mb <= 0:
        raise GradpipeError(f"--chunk-mb must be positive, not {chunk_mb}.")
    if features is not None:
        _check_feature_list(features)
    path = location.absolute(dataset)
    files = discover(sources)
    target = _target_name(target, files[0])
    weight = None if weight is None else _target_name(weight, files[0])
    offset = None if offset is None else _target_name(offset, files[0])
    with _writer_lock(path):
        tx = Transaction(path)
        try:
            old = None if tx.created else read_info(f"{path}@{tx.parent}")  # raises if it is not a dataset
            result = _ingest_into(tx, old, files, target, features, dtype, on_invalid, replace, compressor,
                                  chunk_mb, client, scheduler, workers, announce, on_piece, weight, offset)
        finally:
            tx.abandon()  # a no-op once committed; a first ingest that failed leaves no repository behind
    result.seconds = time.perf_counter() - t0
    return result


@contextmanager
def _writer_lock(path: str) -> Iterator[None]:
    """Local datasets: one writer at a time (Icechunk's local storage cannot detect a racing commit). Object
    stores need no lock: there Icechunk's conditional writes make the second of two racing commits fail."""
    if location.is_remote(path):
        yield
        return
    with atomic.locked(Path(path)):
        yield


def _ingest_into(tx: Transaction, old: DatasetInfo | None, files: list[str], target: str,
                 features: list[str] | None, dtype: str, on_invalid: str, replace: bool, compressor: str,
                 chunk_mb: float, client: Client | None, scheduler: str | None, workers: int | None, announce: bool,
                 on_piece: OnPiece | None, weight: str | None, offset: str | None) -> IngestResult:
    path = tx.uri
    if old is not None:
        _check_same_schema(old, target, features, weight, offset)
    new_files, skipped = _classify(files, old, replace)
    known = [m["path"] for m in old.manifest] if old else []
    if replace and set(known) & set(new_files):
        # A replaced file's rows sit in the middle of the dataset: rebuild from every source.
        gone = [f for f in known if not _exists(f)]
        if gone:
            raise GradpipeError(f"--replace rebuilds {path} from all its sources, but {gone[0]} (in its "
                                f"manifest) no longer exists. Restore it, or ingest into a new dataset.")
        new_files = list(dict.fromkeys([*known, *new_files]))
        skipped, base = [], None
        features = features or old.feature_names
    else:
        base = old
    if not new_files:
        return IngestResult(path, old.n_rows if old else 0, tx.parent, old.n_features if old else 0,
                            old.feature_names if old else [], skipped_files=[str(f) for f in skipped])
    columns = dict(zip(new_files, map_files(read_columns, new_files), strict=True))
    schema = _resolve_schema(new_files, columns, base, target, features, dtype, on_invalid, weight, offset)
    with _connected(client, scheduler, workers, announce) as c:
        info, dropped = _build(tx, base, new_files, columns, schema, c, chunk_mb, compressor, on_piece)
    n_new = info.n_rows - (base.n_rows if base else 0)
    what = "rebuilt from" if replace and base is None and old is not None else "added"
    names = ", ".join(location.name(f) for f in new_files[:5]) + (f" and {len(new_files) - 5} more"
                                                                   if len(new_files) > 5 else "")
    snapshot = tx.commit(f"ingest: {what} {names} ({n_new:,} rows; {info.n_rows:,} in all)",
                         {"gradpipe": "ingest", "added": [str(f) for f in new_files], "rows_added": n_new,
                          "n_rows": info.n_rows, "dropped_rows": dropped, "replace": bool(replace)})
    return IngestResult(path, info.n_rows, snapshot, info.n_features, info.feature_names,
                        appended_files=[str(f) for f in new_files], skipped_files=[str(f) for f in skipped],
                        dropped_rows=dropped)


def _exists(source: str) -> bool:
    fs, p = location.filesystem(source)
    return fs.isfile(p)


@contextmanager
def _connected(client: Client | None, scheduler: str | None, workers: int | None,
               announce: bool) -> Iterator[Client]:
    if client is not None:
        yield client
        return
    with dask_client(scheduler, workers, announce=announce) as c:
        yield c


def _check_feature_list(features: list[str]) -> None:
    if not features:
        raise GradpipeError("--features names no column; give at least one, or leave it out to use every "
                            "column but the target.")
    seen: set[str] = set()
    dupes = sorted({c for c in features if c in seen or seen.add(c)})
    if dupes:
        raise GradpipeError(f"--features lists {dupes} more than once.")


def _check_same_schema(old: DatasetInfo, target: str, features: list[str] | None, weight: str | None = None,
                       offset: str | None = None) -> None:
    """Appending (or re-ingesting) must not silently ignore a --target or --features the dataset lacks, nor
    leave the new rows without the weights or offsets the old ones have (or the reverse)."""
    if target != old.target:
        raise GradpipeError(f"--target {target!r} differs from the dataset's target {old.target!r}.")
    if features is not None and features != old.feature_names:
        raise GradpipeError(f"--features {features} differ from the dataset's features {old.feature_names}.")
    for flag, given, had in (("--weight", weight, old.weight), ("--offset", offset, old.offset)):
        if given != had:
            theirs = f"takes {flag[2:]}s from column {had!r}" if had else f"has no {flag[2:]} column"
            ours = f"{flag} {given!r}" if given else f"no {flag}"
            fix = f"pass {flag} {had}" if had else f"leave out {flag}"
            raise GradpipeError(f"{old.path} {theirs}, but this ingest has {ours}: every row of a dataset "
                                f"must have the same columns ({fix}, or ingest into a new dataset).")


def _target_name(target: str, first: str) -> str:
    """``--target`` as a column name: for .npy sources an index (``2``, ``-1``) names column ``col2``…"""
    if file_format(first) == "npy" and target.lstrip("-").isdigit():
        columns = read_columns(first)
        if -len(columns) <= int(target) < len(columns):
            return npy_column_names(len(columns))[int(target)]
    return target


def _classify(files: list[str], old: DatasetInfo | None, replace: bool) -> tuple[list[str], list[str]]:
    """Split files into new ones and already-ingested ones; a changed file is an error unless replacing."""
    known = {m["path"]: m for m in old.manifest} if old else {}
    new, skipped = [], []
    for f in files:
        entry = known.get(str(f))
        if entry is None:
            new.append(f)
            continue
        ident = file_identity(f)
        if all(entry.get(k) == v for k, v in ident.items() if k != "mtime"):
            skipped.append(f)
        elif ident["size"] == entry["size"] and file_sha256(str(f)) == entry["sha256"]:
            skipped.append(f)  # touched, copied or moved back: same bytes
        elif replace:
            new.append(f)
        else:
            raise GradpipeError(f"{f} changed since it was ingested (new sha256). Pass --replace to rebuild "
                                f"the dataset with its new content.")
    return new, skipped


def _resolve_schema(files: list[str], columns_of: dict[str, list[str]], base: DatasetInfo | None, target: str,
                    features: list[str] | None, dtype: str, on_invalid: str, weight: str | None = None,
                    offset: str | None = None) -> Schema:
    columns = columns_of[files[0]]
    explicit = features is not None
    if base is not None:  # target, features, weight and offset were checked against it (_check_same_schema)
        features = features or base.feature_names
        dtype = base.dtype
    if target not in columns:
        raise GradpipeError(f"--target {target!r} is not a column of {files[0]} "
                            f"(columns: {', '.join(columns)}).")
    extras = [(flag, c) for flag, c in (("--weight", weight), ("--offset", offset)) if c is not None]
    for flag, c in extras:
        if c not in columns:
            raise GradpipeError(f"{files[0]}: the {flag} column {c!r} is not a column of it "
                                f"(columns: {', '.join(columns)}).")
        if c == target:
            raise GradpipeError(f"{flag} {c!r} is also the --target.")
    if weight is not None and weight == offset:
        raise GradpipeError(f"--weight and --offset both name column {weight!r}.")
    special = {target, *(c for _, c in extras)}
    features = features if features is not None else [c for c in columns if c not in special]
    if target in features:
        raise GradpipeError(f"--target {target!r} is also listed in --features.")
    for flag, c in extras:
        if c in features:
            raise GradpipeError(f"{flag} {c!r} is also listed in --features (weights and offsets are not "
                                "features).")
    missing = [c for c in features if c not in columns]
    if missing:
        raise GradpipeError(f"{files[0]}: column(s) {missing} not found (columns: {', '.join(columns)}).")
    if base is not None and not explicit and set(columns) != {*features, *special}:
        raise GradpipeError(f"{files[0]}: columns {columns} differ from the dataset's "
                            f"{[*base.feature_names, base.target, *(c for _, c in extras)]}.")
    for f in files[1:]:
        # Columns are matched by name, so their order may differ; with --features, extra columns are fine.
        cols = set(columns_of[f])
        if cols != set(columns) and not (explicit and {*features, *special} <= cols):
            extra, lacking = sorted(cols - set(columns)), sorted(set(columns) - cols)
            raise GradpipeError(f"{f}: columns differ from {files[0]} (extra: {extra or 'none'}, "
                                f"missing: {lacking or 'none'}).")
    return Schema(features=features, target=target, dtype=dtype, on_invalid=on_invalid, weight=weight,
                  offset=offset)


def _build(tx: Transaction, base: DatasetInfo | None, files: list[str], columns_of: dict[str, list[str]],
           schema: Schema, client: Client, chunk_mb: float, compressor: str,
           on_piece: OnPiece | None = None) -> tuple[DatasetInfo, int]:
    """Write all new rows and the final attrs into the transaction; returns the new info and rows dropped."""
    plans = map_files(lambda f: plan_pieces(f, columns_of[f]), files)
    pieces = [p for ps, _ in plans for p in ps]
    bound = sum(b for _, b in plans)
    d = len(schema.features)
    if base is None:
        chunk_rows = chunk_rows_for(chunk_mb, d, np.dtype(schema.dtype).itemsize)
        n_old = 0
        create_arrays(tx.store, bound, d, chunk_rows, schema.dtype, compressor,
                      weights=schema.weight is not None, offset=schema.offset is not None)
    else:
        chunk_rows, n_old = base.chunk_rows, base.n_rows
        resize_rows(tx.store, n_old + bound)  # the partial last chunk is rewritten, filled up with new rows
    fork = tx.fork()
    # Hashing re-reads each file; at low priority it runs after the parsing, from the page cache. The
    # identity is taken first: a file modified during ingest then looks changed and is re-hashed next time.
    identities = dict(zip(map(str, files), map_files(file_identity, files), strict=True))
    # Task keys name the work on the dashboard (gradpipe-ingest-<dataset>…); the per-call token keeps them
    # unique on a shared cluster, where a key another ingest still holds would hand back that one's data.
    tag = f"{location.name(tx.uri).removesuffix('.zarr')}-{uuid.uuid4().hex[:12]}"
    hashes = {str(f): client.submit(file_sha256, str(f), pure=False, priority=-(10**9),
                                    key=f"gradpipe-ingest-hash-{tag}-{i}") for i, f in enumerate(files)}
    sizes = [_piece_bytes(ps, identities[str(f)]["size"]) for f, (ps, _) in zip(files, plans, strict=True)]
    metas, forks = _stream(client, pieces, schema, fork, n_old, chunk_rows, tag,
                           [b for bs in sizes for b in bs], on_piece)
    n_total = n_old + sum(m.n_rows for m in metas)
    if n_total == 0:
        raise GradpipeError("no data rows: every source is empty or every row was dropped as invalid.")
    tx.merge(forks)
    resize_rows(tx.store, n_total)
    stats = base.stats if base else FeatureStats.empty(d, weighted=schema.weight is not None)
    # The target summary merges in row order, each piece shifted to its first dataset row. Appending to a
    # dataset ingested before the summary existed leaves it absent: the old rows were never summarised, so
    # training falls back to its cluster-side check rather than trusting a summary of the new rows only.
    target: TargetStats | None = TargetStats.empty() if base is None else base.target_stats
    row = n_old
    for m in metas:
        stats = stats.merge(m.stats)
        if target is not None:
            target = target.merge(m.target.shifted(row))
        row += m.n_rows
    if schema.weight is not None and not stats.n_weighted:
        names = ", ".join(str(f) for f in files[:3]) + (" …" if len(files) > 3 else "")
        raise GradpipeError(f"{names}: every kept row has weight 0 in column {schema.weight!r}; at least one "
                            "sample weight must be positive.")
    manifest = list(base.manifest) if base else []
    row, i = n_old, 0
    for f, (ps, _) in zip(files, plans, strict=True):
        fm = metas[i:i + len(ps)]
        i += len(ps)
        rows = sum(m.n_rows for m in fm)
        manifest.append({"path": str(f), **identities[str(f)], "sha256": hashes[str(f)].result(), "rows": rows,
                         "row_start": row, "row_stop": row + rows, "dropped": sum(m.n_dropped for m in fm)})
        row += rows
    info = DatasetInfo(tx.uri, schema.features, schema.target, n_total, chunk_rows, schema.dtype, stats,
                       manifest, target, weight=schema.weight, offset=schema.offset)
    commit_info(tx.store, info)
    return info, sum(m.n_dropped for m in metas)


def _piece_bytes(pieces: list[Piece], size: int) -> list[int]:
    """Each piece's share of its file's ``size`` bytes, for progress: its CSV byte range (the first piece's
    share holds the header), else its rows or row groups pro rata. The shares add up to the file's size."""
    weights = [p.stop - (0 if p.fmt == "csv" and i == 0 else p.start) for i, p in enumerate(pieces)]
    whole, cum, out = max(1, sum(weights)), 0, []
    for w in weights:
        out.append(size * (cum + w) // whole - size * cum // whole)
        cum += w
    return out


def _stream(client: Client, pieces: list[Piece], schema: Schema, store, n_old: int, chunk_rows: int,
            tag: str, piece_bytes: list[int], on_piece: OnPiece | None = None) -> tuple[list, list]:
    """Parse pieces with a bounded window and write each complete chunk as soon as its rows are known, into
    the fork ``store``; returns the pieces' metadata and the written forks, for the driver to merge."""
    window = 2 * max(1, sum(client.nthreads().values())) + 2
    parsed: dict[int, object] = {}
    metas: dict[int, object] = {}
    ac = as_completed()
    meta_index: dict[str, int] = {}
    writes = []
    # Rows waiting for a chunk: (source, lo, hi); source is a parse future, or None for rows already stored.
    pending: list[tuple[object, int, int]] = []
    chunk = n_old // chunk_rows
    if n_old % chunk_rows:
        pending.append((None, chunk * chunk_rows, n_old))  # the partial last chunk is rewritten, filled up
    pending_rows = n_old % chunk_rows
    submitted = consumed = done = bytes_done = 0
    bytes_total = sum(piece_bytes)

    def submit_more() -> None:
        nonlocal submitted
        while submitted < len(pieces) and submitted < consumed + window:
            fut = client.submit(parse_piece, pieces[submitted], schema, pure=False, priority=-submitted,
                                key=f"gradpipe-ingest-{tag}-{submitted}")
            parsed[submitted] = fut
            mf = client.submit(piece_meta, fut, pure=False, key=f"gradpipe-ingest-meta-{tag}-{submitted}")
            meta_index[mf.key] = submitted
            ac.add(mf)
            submitted += 1

    def emit(n: int) -> None:
        nonlocal chunk, pending_rows
        take, left = [], n
        while left:
            src, lo, hi = pending[0]
            k = min(left, hi - lo)
            take.append((src, lo, lo + k))
            left -= k
            if lo + k == hi:
                pending.pop(0)
            else:
                pending[0] = (src, lo + k, hi)
        writes.append(client.submit(_write_segments, store, chunk, chunk_rows, take, pure=False,
                                    key=f"gradpipe-ingest-write-{tag}-{chunk}"))
        chunk += 1
        pending_rows -= n

    try:
        submit_more()
        for mf in ac:
            index = meta_index.pop(mf.key)
            metas[index] = mf.result()  # raises the worker's GradpipeError, if any
            if on_piece is not None:
                done, bytes_done = done + 1, bytes_done + piece_bytes[index]
                on_piece(done, len(pieces), bytes_done, bytes_total)
            while consumed in metas and consumed < len(pieces):
                pending.append((parsed.pop(consumed), 0, metas[consumed].n_rows))
                pending_rows += metas[consumed].n_rows
                consumed += 1
                while pending_rows >= chunk_rows:
                    emit(chunk_rows)
            submit_more()
        if pending_rows:
            emit(pending_rows)
        # Not client.gather: a Ctrl-C during it leaves an internal task whose AllExit asyncio prints as a
        # traceback ("Task exception was never retrieved") under the one-line message.
        wait(writes)
        forks = [f.result() for f in writes]
    except BaseException as exc:
        for f in parsed.values():
            f.cancel()
        if isinstance(exc, Exception):
            # A cancel does not stop a write already running on a worker: let the writes end (those waiting on a
            # cancelled parse fail at once) before the caller abandons the transaction, so no late write lands in
            # a repository the caller is removing (seen on a full disk).
            with contextlib.suppress(Exception):
                wait(writes, timeout=WRITE_DRAIN_SECONDS)
        for f in writes:
            f.cancel()
        raise
    return [metas[i] for i in range(len(pieces))], forks


def _write_segments(store, chunk: int, chunk_rows: int, segments: list) -> int:
    """Assemble one chunk's rows from parsed pieces (and stored rows) and write that single chunk into the
    fork ``store``, which it returns with its change.

    Parsed pieces are feature-major; the transpose into the row-major chunk is the only copy. Weights and
    offsets travel with their rows, from the pieces or from the stored partial chunk.
    """
    parts = []
    for src, lo, hi in segments:
        if src is None:
            parts.append(read_rows(store, lo, hi))
        else:
            assert isinstance(src, Parsed)
            parts.append((src.XT[:, lo:hi].T, src.y[lo:hi], None if src.w is None else src.w[lo:hi],
                          None if src.offset is None else src.offset[lo:hi]))
    n = sum(len(p[1]) for p in parts)
    X = np.empty((n, parts[0][0].shape[1]), dtype=parts[0][1].dtype)
    y = np.empty(n, dtype=X.dtype)
    extras = [None if parts[0][k] is None else np.empty(n) for k in (2, 3)]
    row = 0
    for part in parts:
        k = len(part[1])
        X[row:row + k] = part[0]
        y[row:row + k] = part[1]
        for out, values in zip(extras, part[2:], strict=True):
            if out is not None:
                out[row:row + k] = values
        row += k
    return write_chunk(store, chunk, chunk_rows, X, y, *extras)
