"""Training settings: one validated, JSON-serialisable record (stored in every run store)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.errors import GradpipeError
from pipeline.families import FAMILIES
from pipeline.solvers import CHOICES as SOLVERS

MODELS = tuple(FAMILIES)
SCHEDULES = ("constant", "invscaling", "adaptive")
PERSIST = ("auto", "yes", "no")


@dataclass
class TrainConfig:
    model: str = "linear"
    solver: str = "auto"
    lr: float | str = "auto"
    l2: float = 0.0
    max_iter: int = 500
    tol: float | None = None  # None: 1e-12 (relative loss change per iteration); 1e-4 per epoch for sgd
    gtol: float = 1e-8
    time_budget: float | None = None
    standardize: bool = True
    batch_chunks: int = 1
    schedule: str = "adaptive"
    power_t: float = 0.25
    early_stopping: bool = False
    validation_fraction: float = 0.1
    n_iter_no_change: int = 5
    beta: float = 0.9
    history: int = 10
    seed: int = 0
    fan_in: int = 8
    persist: str = "auto"
    checkpoint_every: int = 1
    diverge_ratio: float = 1e8

    def validate(self) -> TrainConfig:
        """Raise one GradpipeError naming the flag to change."""
        def bad(flag: str, why: str) -> GradpipeError:
            return GradpipeError(f"--{flag}: {why}")

        if self.model not in MODELS:
            raise bad("model", f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}.")
        if self.solver not in SOLVERS:
            raise bad("solver", f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}.")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        if self.persist not in PERSIST:
            raise bad("persist", f"must be one of {', '.join(PERSIST)}, not {self.persist!r}.")
        if self.lr != "auto":
            try:
                self.lr = float(self.lr)
            except (TypeError, ValueError):
                raise bad("lr", f"must be a positive number or 'auto', not {self.lr!r}.") from None
            if not self.lr > 0 or self.lr == float("inf"):
                raise bad("lr", f"must be a positive number or 'auto', not {self.lr}.")
        checks = [
            ("l2", self.l2 >= 0, "must be ≥ 0"), ("max-iter", self.max_iter >= 0, "must be ≥ 0"),
            ("tol", self.tol is None or self.tol >= 0, "must be ≥ 0"), ("gtol", self.gtol >= 0, "must be ≥ 0"),
            ("time-budget", self.time_budget is None or self.time_budget > 0, "must be > 0 seconds"),
            ("batch-chunks", self.batch_chunks >= 1, "must be ≥ 1"),
            ("power-t", self.power_t > 0, "must be > 0"),
            ("validation-fraction", 0 < self.validation_fraction < 1, "must be between 0 and 1"),
            ("n-iter-no-change", self.n_iter_no_change >= 1, "must be ≥ 1"),
            ("beta", 0 <= self.beta < 1, "must be in [0, 1)"), ("fan-in", self.fan_in >= 2, "must be ≥ 2"),
            ("history", self.history >= 1, "must be ≥ 1"),
            ("checkpoint-every", self.checkpoint_every >= 1, "must be ≥ 1"),
            ("diverge-ratio", self.diverge_ratio > 1, "must be > 1"),
        ]
        for flag, ok, why in checks:
            if not ok:
                raise bad(flag, f"{why}, not {getattr(self, flag.replace('-', '_'))}.")
        return self

    @property
    def effective_tol(self) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-4 if self.solver == "sgd" else 1e-12

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
