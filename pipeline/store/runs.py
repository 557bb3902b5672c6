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
  step size, counters), ``status``, ``message``, ``warnings``, ``inference``, ``version``, and what the
  pipeline adds (``metrics``, ``publish``, ``warm_start``). Read them through the typed properties below:
  no other module knows these names.

One chunk per row: an iteration's write touches only new files, then one atomic rewrite of the group's
attrs commits it. A crash between the two leaves a row that ``committed`` does not count yet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import GradpipeError

FORMAT_VERSION = 1
SCALARS = ("loss", "grad_norm", "lr", "elapsed", "passes")


@dataclass(frozen=True)
class DatasetRef:
    """What a run records about the data it trained on."""

    uri: str
    fingerprint: str
    feature_names: list[str]
    target: str
    n_rows: int
    mean: list[float] | None  # the standardization, None without it
    scale: list[float] | None

    def arrays(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        return tuple(None if v is None else np.asarray(v, dtype=np.float64) for v in (self.mean, self.scale))


@contextmanager
def run_lock(path: str | Path) -> Iterator[None]:
    """Held for the life of a training or resume on the run store ``path``: a second writer is refused.

    The dataset lock's flock (a sibling ``.<run>.zarr.lock`` file): the OS drops it when its process
    dies, so a killed run never blocks the next resume.
    """
    from pipeline.store.atomic import locked

    path = Path(path)
    try:
        with locked(path):
            try:
                yield
            finally:
                if not path.exists():  # a run that failed to start leaves nothing behind, not even its lock
                    (path.parent / f".{path.name}.lock").unlink(missing_ok=True)
    except GradpipeError as exc:
        if "another gradpipe process" not in str(exc):
            raise
        raise GradpipeError(f"run {Path(path).name.removesuffix('.zarr')} is being trained or resumed by "
                            f"another gradpipe process; wait for it to finish.") from None


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
    def __init__(self, group: zarr.Group, path: Path):
        self.group, self.path = group, path
        self._attrs = group.attrs.asdict()
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        """Array handles are cached: re-opening one re-reads its metadata, every iteration."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    @property
    def run_id(self) -> str:
        return self.path.name.removesuffix(".zarr")

    # ---- create / open -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, config: dict, solver: str, dataset: DatasetRef, n_params: int,
               state_shapes: dict[str, tuple[int, ...]], version: str) -> RunStore:
        path = Path(path)
        if path.exists():
            raise GradpipeError(f"run store {path} already exists; choose another --run-id or --resume it.")
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        d = n_params - 1
        arrays = {"theta": (n_params,), "grad": (n_params,), "coef": (d,), "intercept": (),
                  **{s: () for s in SCALARS}}
        arrays.update({f"state/{k}": v for k, v in state_shapes.items()})
        for name, shape in arrays.items():
            group.create_array(name, shape=(0, *shape), chunks=(rows_per_chunk(shape), *shape),
                               dtype="float64", fill_value=np.nan, compressors=None)
        group.attrs.put({"gradpipe": {"kind": "run", "format_version": FORMAT_VERSION}, "config": config,
                         "solver": solver, "dataset": asdict(dataset), "committed": -1, "resume": {},
                         "status": "running", "message": "", "warnings": [], "version": version,
                         "started": time.time()})
        return cls(group, path)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> RunStore:
        path = Path(path)
        if not path.exists():
            raise GradpipeError(f"run {path} does not exist (see `gradpipe runs list`).")
        try:
            group = zarr.open_group(str(path), mode=mode)
        except Exception as exc:  # noqa: BLE001
            raise GradpipeError(f"{path} is not a gradpipe run store ({exc}).") from None
        if group.attrs.get("gradpipe", {}).get("kind") != "run":
            raise GradpipeError(f"{path} is not a gradpipe run store.")
        return cls(group, path)

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
    def solver(self) -> str:
        """The solver that ran (``auto`` resolved); stores from before ``auto`` name it in the config."""
        return self._attrs.get("solver") or self.config.get("solver", "?")

    @property
    def dataset(self) -> DatasetRef:
        meta = self._attrs.get("dataset", {})
        return DatasetRef(uri=meta.get("uri", "?"), fingerprint=meta.get("fingerprint", ""),
                          feature_names=list(meta.get("feature_names", [])), target=meta.get("target", ""),
                          n_rows=int(meta.get("n_rows", 0)), mean=meta.get("mean"), scale=meta.get("scale"))

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
        self._update_attrs(committed=stop - 1, resume=resume)

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
        arr = self.group.create_array(f"static/{name}", shape=value.shape, dtype="float64", compressors=None)
        arr[...] = value

    def statics(self) -> dict[str, np.ndarray]:
        if "static" not in self.group:
            return {}
        return {n: np.asarray(a[...]) for n, a in self.group["static"].arrays()}

    def array_names(self) -> list[str]:
        names = [n for n, _ in self.group.arrays()]
        if "state" in self.group:
            names += [f"state/{n}" for n, _ in self.group["state"].arrays()]
        return names

    def column(self, name: str) -> np.ndarray:
        return self._array(name)[: self.committed + 1]

    def row(self, name: str, t: int) -> np.ndarray:
        return np.asarray(self._array(name)[t])

    def history(self) -> dict[str, np.ndarray]:
        return {name: self.column(name) for name in self.array_names()}

    def annotate(self, **values: Any) -> None:
        """Record extra facts about the run (warm start source, publish decision) in its attrs."""
        self._update_attrs(**values)
