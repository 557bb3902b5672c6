"""The dataset store: an Icechunk repository whose root is a Zarr v3 group with ``X`` (n, d), ``y`` (n,) in
aligned row chunks, plus attrs.

Every ingest is one Icechunk commit on branch ``main`` (id, message naming the files it added): readers see
one snapshot or the next, never half an append; a failed or killed ingest commits nothing; two ingests into
one dataset cannot both commit (the second's commit conflicts). A reader names a version as ``D@SNAPSHOT``;
``D`` alone is the tip of ``main``. The same code runs on a local directory and on ``s3://`` (Icechunk's
storage; ``pipeline.store.location``).

Layout of the Zarr group (docs/design.md §4), readable with plain zarr or xarray through Icechunk's store:
``zarr.open_group(icechunk.Repository.open(icechunk.local_filesystem_storage(D)).readonly_session("main").store)``.

- ``X``: float64|float32, chunks ``(chunk_rows, d)``, dimension names ``(row, feature)``.
- ``y``: same dtype, chunks ``(chunk_rows,)``.
- ``w`` (sample weights) and ``offset`` (added to the linear predictor): only in a dataset ingested with
  ``--weight``/``--offset``; float64 whatever X's dtype (a weight or log-exposure rounded to float32 would
  change the objective), chunks ``(chunk_rows,)``, the same codecs as ``y``.
- root attrs: ``gradpipe`` = ``{"kind": "dataset", "format_version": 1}``, ``feature_names``, ``target``,
  ``n_rows``, ``n_features``, ``chunk_rows``, ``stats`` (per-feature ``count/mean/m2/min/max``),
  ``manifest`` (one entry per ingested source file), ``target_stats`` (min, max, count of values not 0/1 and
  the first such one; absent in datasets ingested before it existed, see :class:`pipeline.stats.TargetStats`),
  and ``weight``/``offset`` (the source column names) only when those arrays exist; then ``stats`` are
  w-weighted and also hold ``weight_sum``/``n_weighted``. A dataset without them has exactly the attrs it
  had before weights existed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import GradpipeError
from pipeline.stats import FeatureStats, TargetStats
from pipeline.store import location

if TYPE_CHECKING:
    import dask.array as da

FORMAT_VERSION = 1  # of the Zarr group's layout; the container became an Icechunk repository with format 2
CONTAINER_VERSION = 2
BRANCH = "main"
WRITER_BRANCH = "gradpipe-write-"  # a writer's private branch, deleted when it publishes or fails
PREPARE = "prepare"  # marks a writer's intermediate snapshot (see Transaction)
COMPRESSORS = ("lz4", "zstd", "none")


@dataclass
class DatasetInfo:
    """Everything about a dataset except its arrays: what the driver needs to plan work."""

    path: str  # the dataset's location (a directory or URI), without a snapshot
    feature_names: list[str]
    target: str
    n_rows: int
    chunk_rows: int
    dtype: str
    stats: FeatureStats
    manifest: list[dict[str, Any]] = field(default_factory=list)
    # None for a dataset ingested before the summary existed (or written by fit_arrays): then training
    # checks the target's domain on the cluster instead of before it starts.
    target_stats: TargetStats | None = None
    # The sample-weight and offset source columns (arrays ``w`` and ``offset``); None when absent.
    weight: str | None = None
    offset: str | None = None
    snapshot: str | None = None  # the Icechunk snapshot these facts are from

    @property
    def ref(self) -> str:
        """``path@snapshot``: what workers open, so every task of a run reads the same version."""
        return f"{self.path}@{self.snapshot}" if self.snapshot else self.path

    @property
    def has_weights(self) -> bool:
        return self.weight is not None

    @property
    def has_offset(self) -> bool:
        return self.offset is not None

    @property
    def weight_sum(self) -> float:
        """Σw, what the mean loss divides by: the row count for a dataset without weights."""
        return float(self.stats.weight_sum) if self.stats.weight_sum is not None else float(self.n_rows)

    @property
    def n_weighted_rows(self) -> int:
        """Rows with w > 0 (the rows that inform the fit): the row count for a dataset without weights."""
        return int(self.stats.n_weighted) if self.stats.n_weighted is not None else self.n_rows

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def fingerprint(self) -> str:
        """Changes whenever the rows change: the sources' hashes, their row ranges and the schema (the
        weight/offset columns only when present, so a dataset without them keeps its fingerprint)."""
        parts: list[Any] = [self.feature_names, self.target, self.n_rows, self.dtype,
                            [(m["sha256"], m["row_start"], m["row_stop"]) for m in self.manifest]]
        if self.weight is not None or self.offset is not None:
            parts.append({"weight": self.weight, "offset": self.offset})
        payload = json.dumps(parts)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def to_attrs(self) -> dict[str, Any]:
        return {
            "gradpipe": {"kind": "dataset", "format_version": FORMAT_VERSION},
            "feature_names": self.feature_names,
            "target": self.target,
            "n_rows": self.n_rows,
            "n_features": self.n_features,
            "chunk_rows": self.chunk_rows,
            "dtype": self.dtype,
            "stats": self.stats.to_json(),
            "manifest": self.manifest,
            **({} if self.target_stats is None else {"target_stats": self.target_stats.to_json()}),
            **({} if self.weight is None else {"weight": self.weight}),
            **({} if self.offset is None else {"offset": self.offset}),
        }


@dataclass
class Dataset(DatasetInfo):
    """An opened dataset: lazy dask arrays over the committed rows, chunked as stored.

    ``w`` and ``offset_values`` are the weight and offset arrays (None when absent); the offset array is
    not called ``offset`` because that attribute is the column name (:class:`DatasetInfo`).
    """

    X: da.Array | None = None
    y: da.Array | None = None
    w: da.Array | None = None
    offset_values: da.Array | None = None


EXTRA_ARRAYS = ("w", "offset")  # optional per-row float64 arrays, in read_rows' order


def chunk_rows_for(chunk_mb: float, n_features: int, itemsize: int) -> int:
    return max(1, int(chunk_mb * 2**20) // max(1, n_features * itemsize))


def _codecs(compressor: str, itemsize: int) -> list:
    """The compressor, then a crc32c checksum of the stored bytes: a flipped bit or garbage chunk is an
    error at read, never silent numbers (Zarr would otherwise decode what it can)."""
    blosc = [] if compressor == "none" else [
        BloscCodec(cname=compressor, clevel=5 if compressor == "lz4" else 3, shuffle="shuffle", typesize=itemsize)]
    return [*blosc, Crc32cCodec()]


def create_arrays(store, n_rows: int, n_features: int, chunk_rows: int, dtype: str,
                  compressor: str, *, weights: bool = False, offset: bool = False) -> None:
    """Create an empty dataset group in ``store`` (a transaction's; arrays sized ``n_rows``, attrs written at
    commit), replacing what it held; ``weights`` and ``offset`` add the float64 arrays ``w`` and ``offset``."""
    group = zarr.open_group(store, mode="w", zarr_format=3)
    codecs = _codecs(compressor, np.dtype(dtype).itemsize)
    group.create_array("X", shape=(n_rows, n_features), chunks=(chunk_rows, n_features), dtype=dtype,
                       compressors=codecs, fill_value=0.0, dimension_names=("row", "feature"))
    group.create_array("y", shape=(n_rows,), chunks=(chunk_rows,), dtype=dtype, compressors=codecs,
                       fill_value=0.0, dimension_names=("row",))
    for name, wanted in zip(EXTRA_ARRAYS, (weights, offset), strict=True):
        if wanted:
            group.create_array(name, shape=(n_rows,), chunks=(chunk_rows,), dtype="float64",
                               compressors=_codecs(compressor, 8), fill_value=0.0, dimension_names=("row",))


def _row_arrays(group) -> list[str]:
    return ["X", "y", *(name for name in EXTRA_ARRAYS if name in group)]


def resize_rows(store, n_rows: int) -> None:
    group = zarr.open_group(store, mode="r+")
    for name in _row_arrays(group):
        arr = group[name]
        arr.resize((n_rows, *arr.shape[1:]))


def write_chunk(session, index: int, chunk_rows: int, X: np.ndarray, y: np.ndarray,
                w: np.ndarray | None = None, offset: np.ndarray | None = None):
    """Write rows ``[index*chunk_rows, index*chunk_rows + len(X))`` into a transaction's (forked) session:
    exactly one Zarr chunk per call. Returns the session, whose changes the driver merges before the commit.

    ``w``/``offset`` must be given exactly when the dataset has those arrays: a chunk written without them
    would read back as zero weights or offsets.
    """
    # Zarr skips a chunk equal to the fill value (0): an all-zero y chunk (a logistic chunk of negatives, a
    # Poisson chunk of zero counts, a zero offset) would be missing, and read back as zeros by luck only.
    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(session.store, mode="r+")
        _write_rows(group, index, chunk_rows, X, y, w, offset)
    return session


def _write_rows(group, index: int, chunk_rows: int, X: np.ndarray, y: np.ndarray, w: np.ndarray | None,
                offset: np.ndarray | None) -> int:
    start = index * chunk_rows
    if len(X) > chunk_rows or start + len(X) > group["X"].shape[0]:
        # Zarr would silently drop rows past the end of the array; never let a bad size estimate lose data.
        raise RuntimeError(f"chunk {index} with {len(X)} rows does not fit the array of "
                           f"{group['X'].shape[0]} rows (chunk_rows {chunk_rows})")
    extras = dict(zip(EXTRA_ARRAYS, (w, offset), strict=True))
    for name, values in extras.items():
        if (values is None) == (name in group):
            raise RuntimeError(f"chunk {index}: array {name!r} is {'missing' if values is None else 'extra'} "
                               f"for this dataset")
        if values is not None and len(values) != len(X):
            raise RuntimeError(f"chunk {index}: {name} has {len(values)} rows, X has {len(X)}")
    group["X"][start:start + len(X)] = X
    group["y"][start:start + len(y)] = y
    for name, values in extras.items():
        if values is not None:
            group[name][start:start + len(values)] = values
    return len(X)


Leaf = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]


def read_rows(source, start: int, stop: int) -> Leaf:
    """Rows ``[start, stop)`` of X, y, the sample weights w and the offsets (None for a dataset without
    them). ``source`` is a ``D@SNAPSHOT`` reference (workers: the version a run trains on) or a transaction's
    session (an append re-reading its partial last chunk); a chunk that fails to decode names itself."""
    if isinstance(source, str):
        uri, snapshot = _resolve(source)  # no snapshot named: main's tip now (never a cached, older tip)
        group = _snapshot_group(uri, snapshot)
    else:
        uri, group = "(being written)", zarr.open_group(source.store, mode="r")
    out = []
    for name in ("X", "y", "w", "offset"):
        if name not in ("X", "y") and name not in group:
            out.append(None)
            continue
        arr = group[name]
        try:
            out.append(arr[start:stop])
        except Exception as exc:  # noqa: BLE001 - checksum mismatch, blosc error, a lost chunk object
            first, last = start // arr.chunks[0], max(start, stop - 1) // arr.chunks[0]
            chunks = f"chunk {first}" if first == last else f"chunks {first}-{last}"
            raise GradpipeError(f"dataset {uri}: array {name} {chunks} (rows {start}-{stop - 1}) is corrupted "
                                f"or missing ({type(exc).__name__}: {_why(exc)}); "
                                f"re-ingest it with --replace, or roll back to an intact snapshot "
                                f"(`gradpipe datasets log`).") from None
    return out[0], out[1], out[2], out[3]


# ---- the Icechunk repository ------------------------------------------------------------------------------
def _why(exc: BaseException) -> str:
    """An exception's message on one line, cut short (object-store errors can run to pages)."""
    return " ".join(str(exc).split())[:300]


def _open_repo(uri: str):
    """The repository at ``uri``, or a GradpipeError saying why there is none."""
    import icechunk

    if not location.is_remote(uri) and not Path(uri).exists():  # asking Icechunk would create the directory
        raise GradpipeError(f"dataset {uri} does not exist (create it with `gradpipe ingest`).")
    storage, config = location.icechunk_storage(uri), location.icechunk_config(uri)
    try:
        exists = icechunk.Repository.exists(storage)
    except Exception as exc:  # noqa: BLE001 - unreachable endpoint, denied credentials, no bucket
        raise GradpipeError(f"cannot reach dataset {uri} ({_why(exc)}); check the "
                            f"URI, AWS_ENDPOINT_URL and the credentials.") from None
    if not exists:
        if not location.is_remote(uri) and (Path(uri) / "zarr.json").is_file():
            raise GradpipeError(f"{uri} is a dataset in the old plain-Zarr format (before snapshots); ingest its "
                                f"sources into a new dataset (`gradpipe ingest … --dataset NEW`).")
        if not location.is_remote(uri) and Path(uri).exists() and not Path(uri).is_dir():
            raise GradpipeError(f"{uri} is not a gradpipe dataset (a file, not a dataset directory).")
        raise GradpipeError(f"dataset {uri} does not exist (create it with `gradpipe ingest`).")
    try:
        return icechunk.Repository.open(storage, config=config)
    except Exception as exc:  # noqa: BLE001 - a damaged repository
        raise GradpipeError(f"{uri} is not a readable gradpipe dataset ({_why(exc)}).") from None


def _tip(repo) -> str:
    return repo.lookup_branch(BRANCH)


@functools.lru_cache(maxsize=16)
def _snapshot_group(uri: str, snapshot: str | None) -> zarr.Group:
    """The dataset's group at ``snapshot`` (None: the tip of main), cached per process: every task of a
    run reads the same immutable version, so a worker opens it once."""
    repo = _open_repo(uri)
    try:
        session = repo.readonly_session(snapshot_id=snapshot) if snapshot else repo.readonly_session(BRANCH)
    except Exception as exc:  # noqa: BLE001 - an unknown or expired snapshot id
        raise GradpipeError(f"dataset {uri} has no readable snapshot {snapshot} "
                            f"({_why(exc)}); `gradpipe datasets log {uri}` lists them.") from None
    try:
        return zarr.open_group(session.store, mode="r")
    except Exception as exc:  # noqa: BLE001 - a repository with no dataset committed yet
        raise GradpipeError(f"{uri} holds no committed dataset ({exc}).") from None


def _resolve(spec: str | Path) -> tuple[str, str]:
    """``D`` or ``D@SNAPSHOT`` → (absolute location, snapshot id); ``D`` alone resolves to main's tip now."""
    uri, snapshot = location.split_snapshot(str(spec))
    uri = location.absolute(uri)
    if snapshot is None:
        snapshot = _tip(_open_repo(uri))
    return uri, snapshot


class Transaction:
    """One writer's change to a dataset, made on a private branch and published to main in one step.

    Icechunk forks (the picklable sessions workers write into) need a session without uncommitted changes, so
    the driver's metadata changes (new or resized arrays) are committed first, as a ``prepare`` snapshot on
    the private branch; workers write into forks of the next session, which the driver merges and commits.
    Publishing moves main to that commit only if main is still where the transaction started
    (``reset_branch(from_snapshot_id=…)``, a conditional write on object stores): two racing ingests cannot
    both land. Local directories add the writer's lock file (Icechunk's local storage cannot detect the race).
    Nothing is visible on main before the publish; a transaction that created the repository removes it again
    if it never publishes.
    """

    def __init__(self, uri: str | Path):
        import icechunk

        self.uri = location.absolute(str(uri))
        storage = location.icechunk_storage(self.uri)
        try:
            self.created = (not location.is_remote(self.uri) and not Path(self.uri).exists()) or \
                not icechunk.Repository.exists(storage)
        except Exception as exc:  # noqa: BLE001
            raise GradpipeError(f"cannot reach dataset {self.uri} ({_why(exc)}); check the "
                                f"URI, AWS_ENDPOINT_URL and the credentials.") from None
        if self.created:
            self._check_free()
            try:
                self.repo = icechunk.Repository.create(storage)
            except Exception as exc:  # noqa: BLE001 - a concurrent creator won, or the location is not writable
                raise GradpipeError(f"cannot create dataset {self.uri} ({_why(exc)}).") from None
        else:
            self.repo = _open_repo(self.uri)
        if not location.is_remote(self.uri):
            self._drop_stale_branches()  # the caller holds the dataset's lock: no other writer is live
        self.parent = _tip(self.repo)
        self.branch = f"{WRITER_BRANCH}{uuid.uuid4().hex[:12]}"
        self.repo.create_branch(self.branch, self.parent)
        self.session = self.repo.writable_session(self.branch)
        self.committed: str | None = None

    def _drop_stale_branches(self) -> None:
        """Private branches of killed writers (their chunks are left for ``garbage_collect``)."""
        for branch in self.repo.list_branches():
            if branch.startswith(WRITER_BRANCH):
                self.repo.delete_branch(branch)

    def _check_free(self) -> None:
        if location.is_remote(self.uri):
            return
        p = Path(self.uri)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            if (p / "zarr.json").is_file():
                _open_repo(self.uri)  # raises: an old plain-Zarr dataset
            raise GradpipeError(f"{self.uri} exists and is not a gradpipe dataset; choose another --dataset.")

    @property
    def store(self):
        return self.session.store

    def fork(self):
        """A session for the workers: the driver's changes so far are committed on the private branch first,
        marked so that no reader takes that snapshot for a dataset version."""
        group = zarr.open_group(self.store, mode="r+")
        group.attrs.put({"gradpipe": {"kind": PREPARE}})
        self.session.commit("ingest: prepare arrays (not a dataset version)", metadata={"gradpipe": PREPARE})
        self.session = self.repo.writable_session(self.branch)
        return self.session.fork()

    def merge(self, forks: list) -> None:
        if forks:
            self.session.merge(*forks)

    def commit(self, message: str, metadata: dict[str, Any]) -> str:
        """Commit on the private branch and publish it as main's new tip; returns the snapshot id."""
        snapshot = self.session.commit(message, metadata=metadata)
        try:
            self.repo.reset_branch(BRANCH, snapshot, from_snapshot_id=self.parent)
        except Exception:  # noqa: BLE001 - main moved: another writer published first
            tip = _tip(self.repo)
            raise GradpipeError(f"dataset {self.uri} changed while this write ran (another ingest committed "
                                f"snapshot {tip}); nothing was committed. Run it again: it appends to the new "
                                f"version.") from None
        self.committed = snapshot
        _snapshot_group.cache_clear()
        return snapshot

    def abandon(self) -> None:
        """Drop the private branch (its uncommitted chunks are garbage for ``garbage_collect``); remove the
        repository if this transaction created it and never published."""
        if self.created and self.committed is None:
            fs, root = location.filesystem(self.uri)
            try:
                fs.rm(root, recursive=True)
            except FileNotFoundError:
                pass
            return
        try:
            self.repo.delete_branch(self.branch)
        except Exception:  # noqa: BLE001 - already gone; a left-over branch is harmless
            pass


def log(uri: str | Path) -> list[dict[str, Any]]:
    """The commits reachable from main, newest first: id, time, message and what the ingest recorded."""
    repo = _open_repo(location.absolute(str(uri)))
    return [{"snapshot": s.id, "written_at": s.written_at.isoformat(), "message": s.message,
             "metadata": dict(s.metadata or {})} for s in repo.ancestry(branch=BRANCH)
            if (s.metadata or {}).get("gradpipe") != PREPARE]


def rollback(uri: str | Path, snapshot: str) -> str:
    """Make ``snapshot`` the tip of main again; returns the previous tip (a rollback is undone by rolling
    back to it, while its snapshot exists). Refused if another writer moves main meanwhile."""
    uri = location.absolute(str(uri))
    repo = _open_repo(uri)
    tip = _tip(repo)
    try:
        repo.lookup_snapshot(snapshot)
    except Exception:  # noqa: BLE001 - unknown id
        raise GradpipeError(f"dataset {uri} has no snapshot {snapshot!r}; `gradpipe datasets log {uri}` lists "
                            f"them.") from None
    _snapshot_group.cache_clear()
    try:
        kind = zarr.open_group(repo.readonly_session(snapshot_id=snapshot).store, mode="r").attrs["gradpipe"]["kind"]
    except Exception:  # noqa: BLE001 - the repository's first, empty snapshot
        kind = None
    if kind != "dataset":
        raise GradpipeError(f"snapshot {snapshot} of {uri} is not a dataset version (the repository's initial "
                            f"commit, or an ingest's intermediate state); `gradpipe datasets log` lists them.")
    try:
        repo.reset_branch(BRANCH, snapshot, from_snapshot_id=tip)
    except Exception as exc:  # noqa: BLE001 - main moved since we read it
        raise GradpipeError(f"dataset {uri} changed during the rollback ({exc}); nothing was changed.") from None
    _snapshot_group.cache_clear()
    return tip


def zarr_group(spec: str | Path) -> zarr.Group:
    """The dataset's Zarr group at ``D@SNAPSHOT`` (``D``: main's tip), read-only: for tools that read the
    arrays directly (benchmarks, notebooks)."""
    return _snapshot_group(*_resolve(spec))


def commit_info(store, info: DatasetInfo) -> None:
    """Write the attrs; the caller commits right after."""
    group = zarr.open_group(store, mode="r+")
    group.attrs.put(info.to_attrs())


def is_dataset(path: str | Path) -> bool:
    try:
        return read_info(path) is not None
    except GradpipeError:
        return False


def read_info(spec: str | Path) -> DatasetInfo:
    """A dataset's metadata at ``D@SNAPSHOT`` (``D``: the tip of main), or a GradpipeError saying why
    ``spec`` is not one."""
    uri, snapshot = _resolve(spec)
    group = _snapshot_group(uri, snapshot)
    attrs = group.attrs.asdict()
    meta = attrs.get("gradpipe", {})
    if meta.get("kind") == PREPARE:
        raise GradpipeError(f"snapshot {snapshot} of {uri} is an ingest's intermediate state, not a dataset "
                            f"version; `gradpipe datasets log {uri}` lists the versions.")
    if meta.get("kind") != "dataset":
        raise GradpipeError(f"{uri} is a Zarr group but not a gradpipe dataset (no gradpipe dataset attrs).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise GradpipeError(f"{uri} has dataset format {meta.get('format_version')}; "
                            f"this gradpipe reads format {FORMAT_VERSION}.")
    info = DatasetInfo(
        path=uri,
        feature_names=list(attrs["feature_names"]),
        target=attrs["target"],
        n_rows=int(attrs["n_rows"]),
        chunk_rows=int(attrs["chunk_rows"]),
        dtype=attrs["dtype"],
        stats=FeatureStats.from_json(attrs["stats"]),
        manifest=list(attrs["manifest"]),
        target_stats=TargetStats.from_json(attrs["target_stats"]) if "target_stats" in attrs else None,
        weight=attrs.get("weight"),
        offset=attrs.get("offset"),
        snapshot=snapshot,
    )
    for name, column in (("w", info.weight), ("offset", info.offset)):
        if (column is not None) != (name in group):
            # read_rows returns whichever arrays exist: attrs and arrays must agree, or a fit would silently
            # use (or ignore) weights the dataset does not declare.
            raise GradpipeError(f"dataset {uri} is inconsistent: its attrs {'name' if column else 'lack'} a "
                                f"{'weight' if name == 'w' else 'offset'} column but array {name!r} is "
                                f"{'absent' if column else 'present'}; re-ingest it with --replace.")
    return info


def open_dataset(spec: str | Path) -> Dataset:
    """Open a dataset at ``D@SNAPSHOT`` (``D``: main's tip, pinned now): metadata plus dask arrays ``X``
    (n, d), ``y`` (n,) and, when present, ``w`` and ``offset_values`` (n,), in the stored row chunks."""
    import dask.array as da

    info = read_info(spec)
    group = _snapshot_group(info.path, info.snapshot)
    X = da.from_zarr(group["X"])[: info.n_rows]
    y = da.from_zarr(group["y"])[: info.n_rows]
    w = da.from_zarr(group["w"])[: info.n_rows] if info.has_weights else None
    offset = da.from_zarr(group["offset"])[: info.n_rows] if info.has_offset else None
    return Dataset(**vars(info), X=X, y=y, w=w, offset_values=offset)
