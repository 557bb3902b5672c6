"""Training settings: one validated, JSON-serialisable record (stored in every run store)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.errors import GradpipeError
from pipeline.families import FAMILIES, Family, get_family
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
    l1: float = 0.0
    alpha: float | None = None  # glum/scikit-learn: l1 = alpha·l1_ratio, l2 = alpha·(1 − l1_ratio)
    l1_ratio: float | None = None
    power: float = 1.5  # the Tweedie power (1 < p < 2); other families ignore it
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
        self._resolve_alpha(bad)
        try:
            get_family(self.model, power=self.power)
        except ValueError as exc:
            raise bad("power", str(exc)) from None
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
            ("l2", self.l2 >= 0, "must be ≥ 0"), ("l1", self.l1 >= 0, "must be ≥ 0"),
            ("max-iter", self.max_iter >= 0, "must be ≥ 0"),
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

    def _resolve_alpha(self, bad) -> None:
        """``--alpha A --l1-ratio R`` sets l1 = A·R and l2 = A·(1 − R) (R defaults to 0, glum's default)."""
        if self.alpha is None:
            if self.l1_ratio is not None:
                raise bad("l1-ratio", "needs --alpha (the overall strength).")
            return
        ratio = 0.0 if self.l1_ratio is None else float(self.l1_ratio)
        if not (self.alpha >= 0 and 0.0 <= ratio <= 1.0):
            raise bad("alpha" if not self.alpha >= 0 else "l1-ratio",
                      f"needs alpha ≥ 0 and 0 ≤ l1-ratio ≤ 1, not {self.alpha} and {ratio}.")
        l1, l2 = self.alpha * ratio, self.alpha * (1.0 - ratio)
        if (self.l1, self.l2) not in ((0.0, 0.0), (l1, l2)):
            raise bad("alpha", "give either --alpha/--l1-ratio or --l1/--l2, not both.")
        self.l1, self.l2 = l1, l2

    @property
    def effective_tol(self) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-4 if self.solver == "sgd" else 1e-12

    @property
    def family(self) -> Family:
        return get_family(self.model, power=self.power)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
