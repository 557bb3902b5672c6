"""The dataset store: a Zarr v3 group with ``X`` (n, d), ``y`` (n,) in aligned row chunks, plus attrs.

Layout (docs/design.md §4), readable with plain ``zarr.open_group`` / ``xarray.open_zarr``:

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

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import GradpipeError
from pipeline.stats import FeatureStats, TargetStats

if TYPE_CHECKING:
    import dask.array as da

FORMAT_VERSION = 1
COMPRESSORS = ("lz4", "zstd", "none")


@dataclass
class DatasetInfo:
    """Everything about a dataset except its arrays: what the driver needs to plan work."""

    path: str
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


def create_arrays(path: Path, n_rows: int, n_features: int, chunk_rows: int, dtype: str,
                  compressor: str, *, weights: bool = False, offset: bool = False) -> None:
    """Create an empty dataset group (arrays sized ``n_rows``; the attrs are written at commit); ``weights``
    and ``offset`` add the float64 arrays ``w`` and ``offset``."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
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


def resize_rows(path: Path, n_rows: int) -> None:
    group = zarr.open_group(str(path), mode="r+")
    for name in _row_arrays(group):
        arr = group[name]
        arr.resize((n_rows, *arr.shape[1:]))


def write_chunk(path: str, index: int, chunk_rows: int, X: np.ndarray, y: np.ndarray,
                w: np.ndarray | None = None, offset: np.ndarray | None = None) -> int:
    """Write rows ``[index*chunk_rows, index*chunk_rows + len(X))``: exactly one Zarr chunk per call.

    ``w``/``offset`` must be given exactly when the dataset has those arrays: a chunk written without them
    would read back as zero weights or offsets.
    """
    # Zarr skips a chunk equal to the fill value (0): an all-zero y chunk (a logistic chunk of negatives, a
    # Poisson chunk of zero counts, a zero offset) would be missing, and the store refused as damaged.
    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(path, mode="r+")
        return _write_rows(group, index, chunk_rows, X, y, w, offset)


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


def chunk_files(path: Path, index: int) -> list[Path]:
    """The files that hold row chunk ``index`` of X, y and (when present) w and offset; they may not exist
    yet."""
    group = zarr.open_group(str(path), mode="r")
    return [path / name / group[name].metadata.encode_chunk_key((index,) + (0,) * (group[name].ndim - 1))
            for name in _row_arrays(group)]


Leaf = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]


def read_rows(path: str, start: int, stop: int) -> Leaf:
    """Rows ``[start, stop)`` of X, y, the sample weights w and the offsets (None for a dataset without
    them); a chunk that fails to decode (checksum, blosc) names itself."""
    group = zarr.open_group(path, mode="r")
    out = []
    for name in ("X", "y", "w", "offset"):
        if name not in ("X", "y") and name not in group:
            out.append(None)
            continue
        arr = group[name]
        try:
            out.append(arr[start:stop])
        except Exception as exc:  # noqa: BLE001 - checksum mismatch, blosc error, truncated file
            first, last = start // arr.chunks[0], max(start, stop - 1) // arr.chunks[0]
            chunks = f"chunk {first}" if first == last else f"chunks {first}-{last}"
            raise GradpipeError(f"dataset {path}: array {name} {chunks} (rows {start}-{stop - 1}) is corrupted "
                                f"({type(exc).__name__}: {exc}); re-ingest it with --replace.") from None
    return out[0], out[1], out[2], out[3]


def missing_chunks(path: str, info: DatasetInfo) -> list[str]:
    """Chunk keys the row count implies but the store lacks (Zarr would read them as zeros).

    One listing of each array's chunk directory: cheap next to reading the data. Only local stores are
    listed; remote stores rely on the checksums at read time.
    """
    if "://" in path:
        return []
    group = zarr.open_group(path, mode="r")
    missing = []
    for name in _row_arrays(group):
        arr = group[name]
        root = Path(path) / name
        present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
        extra = (0,) * (arr.ndim - 1)
        for i in range(-(-info.n_rows // arr.chunks[0])):
            key = arr.metadata.encode_chunk_key((i, *extra))
            if key not in present:
                missing.append(f"{name}/{key}")
    return missing


def commit_info(path: Path, info: DatasetInfo) -> None:
    """Write the attrs; the caller makes this the last write before the atomic swap."""
    group = zarr.open_group(str(path), mode="r+")
    group.attrs.put(info.to_attrs())


def is_dataset(path: Path) -> bool:
    try:
        return read_info(path) is not None
    except GradpipeError:
        return False


def read_info(path: str | Path) -> DatasetInfo:
    """Read a dataset's metadata, or raise a GradpipeError saying why ``path`` is not one."""
    path = str(path) if "://" in str(path) else str(Path(path).absolute())
    if "://" not in path and not Path(path).exists():
        raise GradpipeError(f"dataset {path} does not exist (create it with `gradpipe ingest`).")
    try:
        group = zarr.open_group(path, mode="r")
        attrs = group.attrs.asdict()
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a Zarr group"
        raise GradpipeError(f"{path} is not a gradpipe dataset (not a Zarr v3 group: {exc}).") from None
    meta = attrs.get("gradpipe", {})
    if meta.get("kind") != "dataset":
        raise GradpipeError(f"{path} is a Zarr group but not a gradpipe dataset (no gradpipe dataset attrs).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise GradpipeError(f"{path} has dataset format {meta.get('format_version')}; "
                            f"this gradpipe reads format {FORMAT_VERSION}.")
    info = DatasetInfo(
        path=path,
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
    )
    for name, column in (("w", info.weight), ("offset", info.offset)):
        if (column is not None) != (name in group):
            # read_rows returns whichever arrays exist: attrs and arrays must agree, or a fit would silently
            # use (or ignore) weights the dataset does not declare.
            raise GradpipeError(f"dataset {path} is inconsistent: its attrs {'name' if column else 'lack'} a "
                                f"{'weight' if name == 'w' else 'offset'} column but array {name!r} is "
                                f"{'absent' if column else 'present'}; re-ingest it with --replace.")
    return info


def open_dataset(uri: str | Path) -> Dataset:
    """Open a dataset: metadata plus dask arrays ``X`` (n, d), ``y`` (n,) and, when present, ``w`` and
    ``offset_values`` (n,), in the stored row chunks."""
    import dask.array as da

    info = read_info(uri)
    missing = missing_chunks(info.path, info)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise GradpipeError(f"dataset {info.path} is missing chunk {', '.join(missing[:3])}{more} "
                            f"(deleted or never written); re-ingest it with --replace.")
    group = zarr.open_group(info.path, mode="r")
    X = da.from_zarr(group["X"])[: info.n_rows]
    y = da.from_zarr(group["y"])[: info.n_rows]
    w = da.from_zarr(group["w"])[: info.n_rows] if info.has_weights else None
    offset = da.from_zarr(group["offset"])[: info.n_rows] if info.has_offset else None
    return Dataset(**vars(info), X=X, y=y, w=w, offset_values=offset)
