"""The run store: every iteration's θ, loss and optimizer state, appended, never rewritten.

Layout (a Zarr v3 group ``<runs_dir>/<run_id>.zarr``; README "Run store" says what row t means):

- ``theta`` (T, d+1): θ_t in the standardized space, row t after t updates (row 0 = the start point),
  ``grad`` (T, d+1): ∇L(θ_t) (what the next step needs, so a resume repeats it exactly);
  ``coef`` (T, d) and ``intercept`` (T,) are the same model in the user's original feature space.
- ``loss`` (T,): the objective L(θ_t) (mini-batch estimate for ``sgd``), ``grad_norm`` (T,): ‖∇L(θ_t)‖,
  ``lr`` (T,): the step size that produced θ_t, ``elapsed`` (T,): seconds since the run started,
  ``passes`` (T,): cumulative passes over the data.
- ``state/<name>`` (T, …): optimizer state after iteration t (momentum, Adam moments).
- attrs: ``gradpipe`` (kind, format), ``config``, ``solver`` (the one that ran: ``auto`` resolved),
  ``dataset`` (uri, fingerprint, feature names, mean, scale), ``started`` (epoch seconds), ``committed``
  (last complete row, written AFTER that row's data), ``resume`` (small solver state for row ``committed``:
  step size, counters), ``resume_log`` (``[row, changes]`` about once a chunk: where a rewind lands),
  ``status``, ``message``, ``warnings``, ``inference``, ``version``, and what the pipeline adds
  (``metrics``, ``publish``, ``warm_start``). Read them through the typed properties below: no other module
  knows these names.

Many rows per chunk (:func:`rows_per_chunk`); an iteration's write rewrites the last chunk, then one atomic
rewrite of the group's attrs commits it. A crash between the two leaves a row that ``committed`` does not
count yet. Every chunk carries a crc32c checksum (stores from before it have none and still open): a flipped
bit, a truncated or deleted chunk, a garbage ``zarr.json`` is a :class:`GradpipeError` naming the array and
chunk, never silent numbers (Zarr reads a missing chunk as the NaN fill). ``--resume`` verifies the rows it
restores (:meth:`RunStore.last_intact_row`) and rewinds past damaged ones (:meth:`RunStore.rewind`).

A run store lives on a local disk or an object store (``s3://bucket/runs/<run>.zarr``); the same guarantees
hold on both. Locally, Zarr's LocalStore writes every file to a temporary name and renames it into place, so
a kill never tears a chunk or ``zarr.json``. On an object store a PUT is atomic (the object appears whole or
not at all) and reads after it are strongly consistent (S3, GCS, Azure), so "the data chunks first, then the
``zarr.json`` attrs with ``committed``" means the same thing: a reader that trusts ``committed`` only reads
rows whose chunks are durable. Existence checks, listings and deletions go through the location's fsspec
filesystem (the local one behaves like the ``Path`` calls they replace).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.errors import GradpipeError
from pipeline.store import location

FORMAT_VERSION = 1
SCALARS = ("loss", "grad_norm", "lr", "elapsed", "passes")
REPORT_GROUP = "report"  # the subgroup for files about the run (RunStore.report_dir)


@dataclass(frozen=True)
class DatasetRef:
    """What a run records about the data it trained on."""

    uri: str  # the dataset's location
    fingerprint: str
    feature_names: list[str]
    target: str
    n_rows: int
    mean: list[float] | None  # the standardization, None without it
    scale: list[float] | None
    weight: str | None = None  # the sample-weight and offset columns it had (None: none)
    offset: str | None = None
    snapshot: str | None = None  # the dataset's Icechunk snapshot (None: a run from before snapshots)

    def arrays(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        return tuple(None if v is None else np.asarray(v, dtype=np.float64) for v in (self.mean, self.scale))


@contextmanager
def run_lock(path: str | Path) -> Iterator[None]:
    """Held for the life of a training or resume on the run store ``path``: a second writer is refused.

    A sibling ``.<run>.zarr.lock`` (:mod:`pipeline.store.locks`): an flock on a local disk, which the OS
    drops when its process dies, or a heartbeat lease on an object store, which a later writer takes over
    once its heartbeat is a minute old, so a killed run never blocks the next resume for long.
    """
    from pipeline.store import locks

    try:
        with locks.locked(path):
            try:
                yield
            finally:
                if not store_exists(path):  # a run that failed to start leaves nothing behind, not even its lock
                    locks.remove_lock(path)
    except GradpipeError as exc:
        if "another gradpipe process" not in str(exc):
            raise
        raise GradpipeError(f"run {location.name(path).removesuffix('.zarr')} is being trained or resumed by "
                            f"another gradpipe process; wait for it to finish.") from None


def run_path(runs_dir: str | Path, run_id: str) -> str:
    """Where run ``run_id`` of ``runs_dir`` lives (a path or a URI: ``Path`` would fold ``s3://``)."""
    return location.join(runs_dir, f"{run_id}.zarr")


def store_exists(path: str | Path) -> bool:
    """Whether anything (even a half-created store) is at ``path``."""
    fs, where = location.filesystem(path)
    fs.invalidate_cache()
    return bool(fs.exists(where))


def remove_store(path: str | Path) -> None:
    """Delete a run store and everything in it (missing: nothing to do)."""
    fs, where = location.filesystem(path)
    fs.invalidate_cache()
    if fs.exists(where):
        fs.rm(where, recursive=True)


def list_runs(runs_dir: str | Path) -> list[str] | None:
    """The ``*.zarr`` stores in ``runs_dir``, sorted (None: no such directory; an empty bucket prefix is a
    directory with no runs, as object stores have no directories)."""
    fs, where = location.filesystem(runs_dir)
    fs.invalidate_cache()
    if not location.is_remote(runs_dir) and not fs.isdir(where):
        return None
    if location.is_remote(runs_dir) and fs.isfile(where):
        return None
    try:
        entries = fs.ls(where, detail=False)
    except FileNotFoundError:
        return [] if location.is_remote(runs_dir) else None
    names = sorted(location.name(e) for e in entries if str(e).rstrip("/").endswith(".zarr"))
    return [location.join(runs_dir, n) for n in names]


def resolve_run(run: str | Path, runs_dir: str | Path) -> str | Path:
    """A run id (looked up in ``runs_dir``) or a path/URI of a ``.zarr`` run store → the store's location
    (a ``Path`` for a local one, as callers compare and print it). An existing location wins, so
    ``data/runs/x.zarr`` and ``x`` name the same run; a miss says where it looked."""
    text = str(run).rstrip("/")
    local = not location.is_remote(text)
    if (text.endswith(".zarr") or "/" in text) and store_exists(text):
        return Path(text) if local else text
    by_id = run_path(runs_dir, text.removesuffix(".zarr"))
    if store_exists(by_id):
        return Path(by_id) if not location.is_remote(by_id) else by_id
    if RunStore.has_metadata(text):
        return Path(text) if local else text
    raise GradpipeError(f"no run {text!r}: neither a run store path nor a run id in {runs_dir} "
                        f"(see `gradpipe runs list --runs-dir {runs_dir}`).")


def zarr_store(path: str, read_only: bool = False):
    """What Zarr opens: the local path itself (its LocalStore, temp+rename writes) or an FsspecStore."""
    if not location.is_remote(path):
        return path
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(path, storage_options=location.fsspec_options(path), read_only=read_only)


CHUNK_BYTES = 256 * 2**10  # per-iteration arrays: many rows per chunk (a 10,000-iteration run is ~100 files)
MAX_ROWS_PER_CHUNK = 4096


def rows_per_chunk(shape: tuple[int, ...]) -> int:
    """Rows of one iteration array per chunk: a power of two up to ``CHUNK_BYTES``.

    One row per chunk made a 12,000-iteration run 110,000 files. With many, a checkpoint rewrites the last,
    partial chunk; Zarr writes a chunk to a temporary file and renames it over the old one, so the rows it
    already held are never lost, and ``committed`` is still written after the data. Small enough that the
    rewrite stays a small part of an iteration even for wide models (one row per chunk above 256 KiB)."""
    row_bytes = 8 * int(np.prod(shape, dtype=np.int64)) if shape else 8
    rows = max(1, min(MAX_ROWS_PER_CHUNK, CHUNK_BYTES // max(row_bytes, 1)))
    return 1 << (rows.bit_length() - 1)


class RunStore:
    def __init__(self, group: zarr.Group, path: str | Path):
        self.group, self.uri = group, location.absolute(path) if location.is_remote(path) else str(path)
        self._fs, self._root = location.filesystem(self.uri)
        self._attrs = group.attrs.asdict()
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def path(self) -> str | Path:
        """The store's location: a ``Path`` on a local disk (as callers have always had it), else its URI."""
        return self.uri if location.is_remote(self.uri) else Path(self.uri)

    def _file(self, *parts: str) -> str:
        """A file (object) of the store, as a path inside its filesystem."""
        return "/".join([self._root.rstrip("/"), *parts])

    def _isfile(self, *parts: str) -> bool:
        path = self._file(*parts)
        self._fs.invalidate_cache(path)  # fsspec caches listings; another writer (or Zarr) may have changed it
        return bool(self._fs.isfile(path))

    def _array(self, name: str) -> zarr.Array:
        """Array handles are cached: re-opening one re-reads its metadata, every iteration."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except Exception as exc:  # noqa: BLE001 - garbage JSON, an unknown codec, a missing zarr.json
                raise self._unreadable(exc) from None
        return self._arrays[name]

    def _unreadable(self, exc: BaseException) -> GradpipeError:
        """A metadata failure as one line naming the ``zarr.json`` at fault (Zarr's own error names none)."""
        self._fs.invalidate_cache()
        root = self._root.rstrip("/")
        for found in sorted(self._fs.find(root)):
            if not str(found).endswith("/zarr.json"):
                continue
            rel = str(found)[len(root):].strip("/")
            meta = location.join(self.uri, *rel.split("/"))
            try:
                node = json.loads(self._fs.cat_file(found))
                if node.get("node_type") == "array":
                    zarr.open_array(zarr_store(location.parent(meta), read_only=True), mode="r")
            except Exception as bad:  # noqa: BLE001 - the first file that does not parse is the culprit
                return GradpipeError(f"run {self.run_id}: {meta} is unreadable ({_why(bad)}); the run store is "
                                     f"damaged: restore it from a backup or train the run again.")
        return GradpipeError(f"run {self.run_id}: the metadata of {self.path} is unreadable ({_why(exc)}).")

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of one array; a chunk that fails its checksum or decode names itself."""
        arr = self._array(name)
        try:
            return np.asarray(arr[start:stop])
        except Exception as exc:  # noqa: BLE001 - checksum mismatch, truncated file, bad bytes
            c = arr.chunks[0]
            first, last = start // c, max(start, stop - 1) // c
            chunks = f"chunk {first}" if first == last else f"chunks {first}-{last}"
            raise GradpipeError(f"run {self.run_id}: array {name} {chunks} (rows {start}-{stop - 1}) is "
                                f"corrupted ({_why(exc)}).") from None

    @property
    def run_id(self) -> str:
        return location.name(self.uri).removesuffix(".zarr")

    # ---- create / open -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, config: dict, solver: str, dataset: DatasetRef, n_params: int,
               state_shapes: dict[str, tuple[int, ...]], version: str) -> RunStore:
        if store_exists(path):
            raise GradpipeError(f"run store {path} already exists; choose another --run-id or --resume it.")
        group = zarr.open_group(zarr_store(str(path)), mode="w-", zarr_format=3)
        d = n_params - 1
        arrays = {"theta": (n_params,), "grad": (n_params,), "coef": (d,), "intercept": (),
                  **{s: () for s in SCALARS}}
        arrays.update({f"state/{k}": v for k, v in state_shapes.items()})
        for name, shape in arrays.items():
            group.create_array(name, shape=(0, *shape), chunks=(rows_per_chunk(shape), *shape),
                               dtype="float64", fill_value=np.nan, compressors=[Crc32cCodec()])
        group.attrs.put({"gradpipe": {"kind": "run", "format_version": FORMAT_VERSION}, "config": config,
                         "solver": solver, "dataset": asdict(dataset), "committed": -1, "resume": {},
                         "status": "running", "message": "", "warnings": [], "version": version,
                         "started": time.time()})
        return cls(group, path)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> RunStore:
        if not store_exists(path):
            raise GradpipeError(f"run {path} does not exist (see `gradpipe runs list`).")
        try:
            group = zarr.open_group(zarr_store(str(path), read_only=mode == "r"), mode=mode)
        except Exception as exc:  # noqa: BLE001
            raise GradpipeError(f"{path} is not a gradpipe run store ({exc}).") from None
        if group.attrs.get("gradpipe", {}).get("kind") != "run":
            raise GradpipeError(f"{path} is not a gradpipe run store.")
        store = cls(group, path)
        names = store.array_names()  # every array's metadata parses: a garbage one is named here
        lost = [n for n in ("theta", "grad", "coef", "intercept", *SCALARS) if n not in names]
        if lost:
            meta = location.join(path, lost[0], "zarr.json")
            raise GradpipeError(f"run {store.run_id}: {meta} is missing; the run store is damaged: restore it from "
                                f"a backup or train the run again.")
        return store

    # ---- attributes ------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return self._attrs

    @property
    def committed(self) -> int:
        return int(self._attrs["committed"])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._attrs.get("config", {}))

    @property
    def model(self) -> str:
        return self.config.get("model", "linear")

    @property
    def family(self):
        """The run's family object (a Tweedie run's power included)."""
        from pipeline.families import get_family

        return get_family(self.model, power=self.config.get("power"))

    @property
    def solver(self) -> str:
        """The solver that ran (``auto`` resolved); stores from before ``auto`` name it in the config."""
        return self._attrs.get("solver") or self.config.get("solver", "?")

    @property
    def dataset(self) -> DatasetRef:
        meta = self._attrs.get("dataset", {})
        return DatasetRef(uri=meta.get("uri", "?"), fingerprint=meta.get("fingerprint", ""),
                          feature_names=list(meta.get("feature_names", [])), target=meta.get("target", ""),
                          n_rows=int(meta.get("n_rows", 0)), mean=meta.get("mean"), scale=meta.get("scale"),
                          weight=meta.get("weight"), offset=meta.get("offset"), snapshot=meta.get("snapshot"))

    @staticmethod
    def has_metadata(path: str | Path) -> bool:
        """Whether ``path`` holds a Zarr group's metadata at all (a store killed while created may not)."""
        fs, where = location.filesystem(path)
        fs.invalidate_cache()
        return bool(fs.isfile(f"{where.rstrip('/')}/zarr.json"))

    @property
    def converged(self) -> bool:
        """Whether the run met its tolerance (stores written before the attribute existed: by the status)."""
        return bool(self._attrs.get("converged", self.status == "converged"))

    @property
    def status(self) -> str:
        return self._attrs.get("status", "unknown")

    @property
    def message(self) -> str:
        return self._attrs.get("message", "")

    @property
    def warnings(self) -> list[str]:
        return list(self._attrs.get("warnings", []))

    @property
    def started(self) -> float:
        return float(self._attrs.get("started", 0.0))

    @property
    def resume_state(self) -> dict[str, Any]:
        return dict(self._attrs.get("resume", {}))

    @property
    def inference(self) -> dict[str, Any] | None:
        return self._attrs.get("inference")

    @property
    def metrics(self) -> dict[str, Any] | None:
        return self._attrs.get("metrics")

    @property
    def warm_start(self) -> str | None:
        return self._attrs.get("warm_start")

    def _update_attrs(self, **changes: Any) -> None:
        self._attrs.update(changes)
        self.group.attrs.put(json.loads(json.dumps(self._attrs)))  # one atomic write of zarr.json

    def set_status(self, status: str, message: str = "", **extra: Any) -> None:
        self._update_attrs(status=status, message=message, **extra)

    # ---- rows ------------------------------------------------------------------------------------
    def append(self, rows: list[dict[str, Any]], resume: dict[str, Any]) -> None:
        """Write rows ``committed+1 …`` (each a dict of array name → value), then commit them."""
        if not rows:
            return
        start = self.committed + 1
        stop = start + len(rows)
        for name in rows[0]:
            arr = self._array(name)
            if arr.shape[0] < stop:
                arr.resize((max(stop, 2 * arr.shape[0], 64), *arr.shape[1:]))  # grow geometrically
            arr[start:stop] = np.stack([np.asarray(r[name], dtype=np.float64) for r in rows])
        log, c = {}, min(self._array(name).chunks[0] for name in rows[0])
        if start == 0 or stop % c == 0 or (stop - 1) // c > (start - 1) // c:  # a chunk's last row, or its first
            log = {"resume_log": self._log_resume(stop - 1, resume)}
        self._update_attrs(committed=stop - 1, resume=resume, **log)

    def _log_resume(self, row: int, resume: dict[str, Any]) -> list[list[Any]]:
        """``resume_log`` plus row ``row``'s solver state, as what changed since the previous entry.

        Kept once a chunk (the background writer batches rows, so at the batch's last row after a chunk
        starts, or at a chunk's last row): where :meth:`rewind` lands when a later chunk is damaged, so
        a rewound run continues with the solver state of its row, not the committed row's (an L-BFGS pair
        count or an Adam step counter from later rows would send it elsewhere). Deltas keep it small: the
        preconditioner is stored once."""
        log = list(self._attrs.get("resume_log", []))
        return [*log, [row, _delta(self._logged_state(log, row), resume)]]

    @staticmethod
    def _logged_state(log: list[list[Any]], row: int) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for r, delta in log:
            if r <= row:
                state = _merge(state, delta)
        return state

    def finalize(self) -> None:
        """Trim arrays to the committed rows so plain Zarr readers see exact shapes."""
        n = self.committed + 1
        for name in self.array_names():
            arr = self._array(name)
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))

    def write_static(self, name: str, value: np.ndarray) -> None:
        """An array written once, before the first row is committed (a solver's fixed preconditioner)."""
        value = np.asarray(value, dtype=np.float64)
        arr = self.group.create_array(f"static/{name}", shape=value.shape, dtype="float64",
                                      compressors=[Crc32cCodec()])
        arr[...] = value

    def statics(self) -> dict[str, np.ndarray]:
        if "static" not in self.group:
            return {}
        try:
            arrays = dict(self.group["static"].arrays())
        except Exception as exc:  # noqa: BLE001 - as for the per-row arrays
            raise self._unreadable(exc) from None
        out = {}
        for n, a in arrays.items():
            try:
                out[n] = np.asarray(a[...])
            except Exception as exc:  # noqa: BLE001
                raise GradpipeError(f"run {self.run_id}: array static/{n} is corrupted ({_why(exc)}).") from None
        return out

    def array_names(self) -> list[str]:
        try:
            names = [n for n, _ in self.group.arrays()]
            if "state" in self.group:
                names += [f"state/{n}" for n, _ in self.group["state"].arrays()]
        except Exception as exc:  # noqa: BLE001 - one member's metadata does not parse
            raise self._unreadable(exc) from None
        return names

    def column(self, name: str) -> np.ndarray:
        return self._read(name, 0, self.committed + 1)

    def row(self, name: str, t: int) -> np.ndarray:
        if t < 0:
            t += self._array(name).shape[0]
        return self._read(name, t, t + 1)[0]

    def history(self) -> dict[str, np.ndarray]:
        return {name: self.column(name) for name in self.array_names()}

    def report_dir(self) -> str | Path:
        """``<store>/report``, a small Zarr group of its own for the files that describe the run (its loss
        curve). Not the store's top level: Zarr lists a group's directory to find its members, and a stray
        file there makes every listing warn "Object at … is not recognized as a component of a Zarr
        hierarchy" (an error under ``-W error``); a subgroup is a member it recognizes."""
        path = location.join(self.uri, REPORT_GROUP)
        if not self._isfile(REPORT_GROUP, "zarr.json"):
            zarr.open_group(zarr_store(path), mode="a", zarr_format=3, attributes={"gradpipe": {"kind": "report"}})
        return path if location.is_remote(path) else Path(path)

    @property
    def tuning(self) -> dict[str, Any] | None:
        """The record of the tune whose refit this run is (``gradpipe tune``), else None."""
        return self._attrs.get("tuning")

    def annotate(self, **values: Any) -> None:
        """Record extra facts about the run (warm start source, publish decision) in its attrs."""
        self._update_attrs(**values)

    # ---- integrity -------------------------------------------------------------------------------
    def damage(self, t: int, names: tuple[str, ...] | None = None) -> tuple[str, int] | None:
        """Why row ``t`` cannot be trusted, and the latest earlier row that might be; None if it is intact.

        Intact: every array's chunk holding row ``t`` exists (Zarr reads a missing one as the NaN fill),
        decodes with a valid checksum, and its row ``t`` is finite (a deleted chunk of an old store without
        checksums reads as NaN; no committed row holds NaN otherwise: a diverging step is never written).
        """
        for name in names or self.array_names():
            arr = self._array(name)
            c = arr.chunks[0]
            k, lo = t // c, (t // c) * c
            key = arr.metadata.encode_chunk_key((k, *(0,) * (arr.ndim - 1)))
            if not self._isfile(name, key):
                return f"{name} chunk {k}: its file {name}/{key} is missing", lo - 1
            try:
                values = np.asarray(arr[lo:t + 1])
            except Exception as exc:  # noqa: BLE001 - checksum mismatch, truncated file, bad bytes
                return f"{name} chunk {k}: {_why(exc)}", lo - 1
            finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
            if not finite[-1]:
                good = np.flatnonzero(finite)
                return f"{name} row {t}: non-finite values", lo + int(good[-1]) if good.size else lo - 1
        return None

    def last_intact_row(self) -> tuple[int, str | None]:
        """The latest committed row whose data verifies (-1: none), and what damaged the committed row."""
        t, first = self.committed, None
        logged = {int(r) for r, _ in self._attrs.get("resume_log", [])}  # none: a store from before the log
        while t >= 0:
            if t != self.committed and logged and t not in logged:  # no solver state for row t: go back
                t = max((r for r in logged if r < t), default=-1)
                continue
            bad = self.damage(t)
            if bad is None:
                break
            first = first or bad[0]
            t = bad[1]
        return t, first

    def rewind(self, row: int, why: str) -> None:
        """Forget rows after ``row`` (damaged ones): their chunk files go, then ``committed`` moves back.

        Zarr rewrites a partial chunk by reading it first, so a damaged chunk past ``row`` would fail the
        next append; a chunk that also holds ``row`` verified, so it stays. Deleting before the commit keeps
        a crash in between safe: the next resume finds the chunks missing and rewinds again.
        """
        for name in self.array_names():
            arr = self._array(name)
            c = arr.chunks[0]
            for k in range(row // c + 1, -(-arr.shape[0] // c)):
                chunk = self._file(name, arr.metadata.encode_chunk_key((k, *(0,) * (arr.ndim - 1))))
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(chunk)
            arr.resize((row + 1, *arr.shape[1:]))
        log = [e for e in self._attrs.get("resume_log", []) if e[0] <= row]
        resume = self._logged_state(log, row) if any(e[0] == row for e in log) else self.resume_state
        self._update_attrs(committed=row, resume=resume, resume_log=log, warnings=[*self.warnings, why])

    def require_model(self) -> int:
        """The committed row, refused if its model (``coef``, ``intercept``) is missing, corrupt or not finite:
        an export or a prediction must never carry NaN coefficients."""
        t = self.committed
        if t < 0:
            raise GradpipeError(f"run {self.path} has no committed iteration yet; there is no model to use.")
        bad = self.damage(t, ("coef", "intercept"))
        if bad is not None:
            raise GradpipeError(f"run {self.run_id}: the model at row {t} is damaged ({bad[0]}); refusing to use "
                                f"it. `gradpipe train --resume {self.run_id}` rewinds to the last intact row.")
        return t


def _delta(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What ``new`` changes in ``old`` (nested dicts compared key by key)."""
    out: dict[str, Any] = {}
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            if d := _delta(old[k], v):
                out[k] = d
        elif k not in old or old[k] != v:
            out[k] = v
    return out


def _merge(old: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """``old`` with ``delta`` applied: the inverse of :func:`_delta`."""
    out = dict(old)
    for k, v in delta.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _why(exc: BaseException) -> str:
    """An exception as one line: its type and message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
