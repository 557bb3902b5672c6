"""Pipeline settings from a TOML file, environment variables and flags (flags win, then env, then file).

Paths are made absolute once, here: a relative store path given to a remote Dask worker would resolve in
that worker's own working directory and silently read fill values.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig
from pipeline.errors import GradpipeError

ENV_PREFIX = "GRADPIPE_"


@dataclass
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
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def dataset(self) -> Path:
        return Path(self.data_dir) / "datasets" / f"{self.name}.zarr"

    @property
    def runs_dir(self) -> Path:
        return Path(self.data_dir) / "runs"

    @property
    def tunes_dir(self) -> Path:
        return Path(self.data_dir) / "tunes"

    @property
    def models_dir(self) -> Path:
        return Path(self.data_dir) / "models" / self.name

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["train"] = self.train.to_json()
        return out

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
        """Resolve every path against the current directory (see the module docstring)."""
        self.data_dir = str(Path(self.data_dir).absolute())
        self.raw = [r if "://" in r else str(Path(r).absolute()) for r in self.raw]
        for name in ("tls_ca", "tls_cert", "tls_key"):
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).absolute()))
        return self

    def tls_security(self):
        """distributed's ``Security`` for these settings, or None when TLS is off (``pipeline.tls``)."""
        from pipeline import tls

        return tls.resolve(self.tls, self.tls_ca, self.tls_cert, self.tls_key,
                           external=bool(self.scheduler), source="the settings")


def _coerce(value: str, like: Any) -> Any:
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
    """Defaults ← TOML file ← ``GRADPIPE_*`` environment ← ``overrides`` (flags)."""
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
    for f in fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if f.name != "train" and key in environ:
            data[f.name] = _coerce(environ[key], getattr(base, f.name))
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
    return Settings.from_dict(data).absolute()
