"""The tune store: every outer iteration of a cross-validated tuning, appended, never rewritten.

Layout (a Zarr v3 group ``<tunes_dir>/<tune_id>.zarr``):

- ``state/<name>`` (T, …): the tuning state after outer iteration t, per fold and candidate (θ, the loss and
  gradient at θ, the pending direction and step, each model's status, its held-out deviance, and for a
  linear tune the per-fold R factors). Arrays are created with the first row (their shapes are set by the
  grid, which the first pass decides) and chunked one row per chunk, crc32c-checked.
- attrs: ``gradpipe`` (kind "tune", format), ``config`` (the tune settings), ``dataset`` (uri, fingerprint,
  rows), ``grid`` (α per l1 ratio), ``committed`` (the last complete row, written AFTER its data, so a
  SIGKILL between the two leaves a row nobody reads), ``resume`` (small counters for row ``committed``),
  ``status``, ``message``, ``result`` (the CV table and the choice), ``refit`` (the run id of the refit),
  ``version``, ``started``. Read them through the properties below.

Like a run store, a tune store lives on a local disk or an object store (``s3://bucket/tunes/<id>.zarr``),
with the same ordering guarantee (the data chunks are durable before ``committed`` names them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.errors import GradpipeError
from pipeline.store import location
from pipeline.store.runs import store_exists, zarr_store

FORMAT_VERSION = 1


class TuneStore:
    def __init__(self, group: zarr.Group, path: str | Path):
        self.group, self.uri = group, location.absolute(path)
        self._attrs = group.attrs.asdict()

    @property
    def path(self) -> str | Path:
        """The store's location: a ``Path`` on a local disk, else its URI (as :attr:`RunStore.path`)."""
        return self.uri if location.is_remote(self.uri) else Path(self.uri)

    @property
    def tune_id(self) -> str:
        return location.name(self.uri).removesuffix(".zarr")

    @classmethod
    def create(cls, path: str | Path, *, config: dict, dataset: dict, version: str) -> TuneStore:
        if store_exists(path):
            raise GradpipeError(f"tune store {path} already exists; choose another --tune-id or continue it "
                                f"with `gradpipe tune --resume {location.name(path).removesuffix('.zarr')}`.")
        group = zarr.open_group(zarr_store(str(path)), mode="w-", zarr_format=3)
        group.attrs.put({"gradpipe": {"kind": "tune", "format_version": FORMAT_VERSION}, "config": config,
                         "dataset": dataset, "committed": -1, "resume": {}, "grid": None, "status": "running",
                         "message": "", "result": None, "refit": None, "version": version,
                         "started": time.time()})
        return cls(group, path)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> TuneStore:
        if not store_exists(path):
            raise GradpipeError(f"tune {path} does not exist.")
        try:
            group = zarr.open_group(zarr_store(str(path), read_only=mode == "r"), mode=mode)
        except Exception as exc:  # noqa: BLE001 - garbage metadata
            raise GradpipeError(f"{path} is not a gradpipe tune store ({exc}).") from None
        if group.attrs.get("gradpipe", {}).get("kind") != "tune":
            raise GradpipeError(f"{path} is not a gradpipe tune store.")
        return cls(group, path)

    # ---- attributes ------------------------------------------------------------------------------
    def _update(self, **changes: Any) -> None:
        self._attrs.update(changes)
        self.group.attrs.put(json.loads(json.dumps(self._attrs)))  # one atomic write of zarr.json

    @property
    def committed(self) -> int:
        return int(self._attrs["committed"])

    @property
    def config(self) -> dict[str, Any]:
        return self._attrs["config"]

    @property
    def dataset(self) -> dict[str, Any]:
        return self._attrs["dataset"]

    @property
    def status(self) -> str:
        return self._attrs["status"]

    @property
    def message(self) -> str:
        return self._attrs["message"]

    @property
    def resume(self) -> dict[str, Any]:
        return self._attrs["resume"]

    @property
    def grid(self) -> list[list[float]] | None:
        return self._attrs["grid"]

    @property
    def result(self) -> dict[str, Any] | None:
        return self._attrs["result"]

    @property
    def refit(self) -> str | None:
        return self._attrs["refit"]

    def set_grid(self, grid: np.ndarray) -> None:
        self._update(grid=np.asarray(grid).tolist())

    def set_status(self, status: str, message: str = "", **extra: Any) -> None:
        self._update(status=status, message=message, **extra)

    # ---- rows ------------------------------------------------------------------------------------
    def append(self, row: dict[str, np.ndarray], resume: dict[str, Any]) -> None:
        """Write row ``committed+1`` (array name → value), then commit it."""
        t = self.committed + 1
        for name, value in row.items():
            value = np.asarray(value, dtype=np.float64)
            key = f"state/{name}"
            if key not in self.group:
                self.group.create_array(key, shape=(0, *value.shape), chunks=(1, *value.shape), dtype="float64",
                                        fill_value=np.nan, compressors=[Crc32cCodec()])
            arr = self.group[key]
            if arr.shape[1:] != value.shape:
                raise GradpipeError(f"tune {self.tune_id}: state {name} changed shape {arr.shape[1:]} → {value.shape}")
            if arr.shape[0] < t + 1:
                arr.resize((t + 1, *value.shape))
            arr[t] = value
        self._update(committed=t, resume=resume)

    def row(self, t: int) -> dict[str, np.ndarray]:
        """Row ``t`` of every state array (a damaged chunk is named, not read as NaN)."""
        out = {}
        state = self.group["state"]
        for name in sorted(state.array_keys()):
            if state[name].shape[0] <= t:  # written by earlier iterations only (a linear tune's R factors)
                continue
            try:
                out[name] = np.asarray(state[name][t])
            except Exception as exc:  # noqa: BLE001 - checksum mismatch, missing chunk
                raise GradpipeError(f"tune {self.tune_id}: state/{name} row {t} is corrupted ({exc}); start "
                                    f"the tune again.") from None
        return out
