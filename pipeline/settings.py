"""Pipeline settings from a TOML file, environment variables and flags (flags win, then env, then file).

Paths are made absolute once, here: a relative store path given to a remote Dask worker would resolve in
that worker's own working directory and silently read fill values. ``data_dir`` may also be a URI
(``s3://bucket/gradpipe``): the dataset, runs, tunes and models locations are then URIs under it.

``storage_options`` (the ``[storage_options]`` table, ``GRADPIPE_STORAGE_OPTIONS``) hold credentials:
:func:`load` hands them to :mod:`pipeline.store.location` through the environment, which the driver's
LocalCluster workers inherit, and every printed or serialized form (``to_dict``: Prefect flow parameters,
deployments) carries the keys only, never the values.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig
from pipeline.errors import GradpipeError
from pipeline.store import location

ENV_PREFIX = "GRADPIPE_"
REDACTED = "***"  # what to_dict and repr show instead of a storage option's value


@dataclass(repr=False)
class Settings:
    name: str = "demo"
    raw: list[str] = field(default_factory=lambda: ["data/raw/demo"])
    target: str = "y"
    data_dir: str = "data"
    scheduler: str = ""  # empty: $DASK_SCHEDULER_ADDRESS, else an embedded LocalCluster
    workers: int = 0  # embedded cluster size; 0: one per core
    chunk_mb: float = 64.0
    dtype: str = "float64"
    on_invalid: str = "error"
    weight: str = ""  # ingest: the sample-weight column (empty: none)
    offset: str = ""  # ingest: the offset column, added to the linear predictor (empty: none)
    publish_tolerance: float = 0.0  # publish when new metric ≤ published metric × (1 + tolerance)
    allow_unconverged: bool = False  # publish a run that ended on max_iter/time_budget (normally refused)
    tls: bool = False  # Dask comms over TLS (see pipeline.tls); implied by the three files below
    tls_ca: str = ""  # PEM paths: the cluster's CA, this side's certificate and private key
    tls_cert: str = ""
    tls_key: str = ""
    tune: bool = False  # pipeline_flow: cross-validate the penalty (tune_flow), whose refit is the trained run
    tune_cv: int = 5  # folds
    tune_alphas: int = 100  # α values on the path
    tune_select: str = "min"  # min | 1se
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (secrets: never shown)
    train: TrainConfig = field(default_factory=TrainConfig)

    # Locations are str, not Path: Path("s3://b/k") folds the scheme into "s3:/b/k".
    @property
    def dataset(self) -> str:
        return location.join(self.data_dir, "datasets", f"{self.name}.zarr")

    @property
    def runs_dir(self) -> str:
        return location.join(self.data_dir, "runs")

    @property
    def tunes_dir(self) -> str:
        return location.join(self.data_dir, "tunes")

    @property
    def models_dir(self) -> str:
        return location.join(self.data_dir, "models", self.name)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data, storage option values redacted: this dict becomes Prefect flow and
        deployment parameters, stored by the server and shown in its UI. The values reach the flows through
        the environment instead (:meth:`apply_storage_options`)."""
        out = asdict(self)
        out["storage_options"] = redacted(self.storage_options)
        out["train"] = self.train.to_json()
        return out

    def __repr__(self) -> str:
        shown = {**asdict(self), "storage_options": redacted(self.storage_options), "train": self.train}
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def apply_storage_options(self) -> None:
        """Make the storage options this process's (and its future LocalCluster workers'). Redacted values
        (settings that went through :meth:`to_dict`) are skipped: the environment already holds the real
        ones."""
        real = {k: v for k, v in self.storage_options.items() if v != REDACTED}
        if real:
            location.set_storage_options(real)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        data = dict(data)
        train = TrainConfig.from_json(data.pop("train", {}) or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GradpipeError(f"unknown setting(s) {unknown}; known: {sorted(known)}.")
        raw = data.get("raw")
        if isinstance(raw, str):
            data["raw"] = [raw]
        if not isinstance(data.get("storage_options", {}), dict):
            raise GradpipeError(f"storage_options: a table of fsspec options (endpoint_url, key, secret, region, "
                                f"anon), not {type(data['storage_options']).__name__}.")
        settings = cls(**data, train=train)
        settings.train.validate()
        settings._validate_tune()
        return settings

    def _validate_tune(self) -> None:
        from pipeline.path import SELECT

        if self.tune_select not in SELECT:
            raise GradpipeError(f"tune_select: choose one of {', '.join(SELECT)}, not {self.tune_select!r}.")
        if self.tune_cv < 2:
            raise GradpipeError(f"tune_cv: needs at least 2 folds, not {self.tune_cv}.")
        if self.tune_alphas < 1:
            raise GradpipeError(f"tune_alphas: needs at least 1 value, not {self.tune_alphas}.")

    def absolute(self) -> Settings:
        """Resolve every local path against the current directory (see the module docstring); URIs stay."""
        self.data_dir = location.absolute(self.data_dir)
        self.raw = [location.absolute(r) for r in self.raw]
        for name in ("tls_ca", "tls_cert", "tls_key"):
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).absolute()))
        return self

    def tls_security(self):
        """distributed's ``Security`` for these settings, or None when TLS is off (``pipeline.tls``)."""
        from pipeline import tls

        return tls.resolve(self.tls, self.tls_ca, self.tls_cert, self.tls_key,
                           external=bool(self.scheduler), source="the settings")


def redacted(options: dict[str, Any]) -> dict[str, str]:
    """The option names with every value replaced: which options are set is useful, their values are secrets."""
    return {k: REDACTED for k in options}


def _json_object(value: str, name: str) -> dict[str, Any]:
    try:
        out = json.loads(value) if value.strip() else {}
    except ValueError as exc:
        raise GradpipeError(f"{name} must be a JSON object of storage options ({exc}).") from None
    if not isinstance(out, dict):
        raise GradpipeError(f"{name} must be a JSON object of storage options, not {type(out).__name__}.")
    return out


def _coerce(value: str, like: Any, name: str = "") -> Any:
    if isinstance(like, dict):
        return _json_object(value, name)
    if isinstance(like, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, list):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def load(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> Settings:
    """Defaults ← TOML file ← ``GRADPIPE_*`` environment ← ``overrides`` (flags); then the storage options
    become this process's (see the module docstring)."""
    environ = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise GradpipeError(f"config file {path} does not exist.")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise GradpipeError(f"config file {path}: {exc}") from None
    data.setdefault("train", {})
    base = Settings()
    defaults_train = TrainConfig().to_json()
    file_options = data.get("storage_options", {})
    for f in fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if f.name != "train" and key in environ:
            data[f.name] = _coerce(environ[key], getattr(base, f.name), key)
    if isinstance(file_options, dict) and isinstance(data.get("storage_options"), dict):
        # key by key: the file may give the endpoint, the environment the secret
        data["storage_options"] = {**file_options, **data["storage_options"]}
    for name, default in defaults_train.items():
        # GRADPIPE_TRAIN_<FIELD>, or the short GRADPIPE_<FIELD> (GRADPIPE_MODEL=poisson): no training field
        # shares a name with a top-level setting, and the long form wins when both are set
        key = next((k for k in (f"{ENV_PREFIX}TRAIN_{name.upper()}", f"{ENV_PREFIX}{name.upper()}") if k in environ),
                   None)
        if key is not None:
            # fields whose default is None (tol, time_budget) are numbers; lr may be "auto"
            like = default if default is not None else 0.0
            data["train"][name] = environ[key] if name == "lr" else _coerce(environ[key], like)
    if environ.get("DASK_SCHEDULER_ADDRESS") and f"{ENV_PREFIX}SCHEDULER" not in environ:
        data["scheduler"] = environ["DASK_SCHEDULER_ADDRESS"]  # Dask's own variable: the environment level
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in defaults_train and key not in {f.name for f in fields(Settings)}:
            data["train"][key] = value
        else:
            data[key] = value
    settings = Settings.from_dict(data).absolute()
    settings.apply_storage_options()
    return settings
