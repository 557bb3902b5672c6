"""What every solver shares: the row it produces, the objective it asks for passes, its stopping rules.

A solver is a small state machine over an objective evaluated on the cluster: ``start`` evaluates θ_0,
``step`` returns the next accepted iterate's row, ``stop_reason`` says whether the row just written ends
the run. Everything a solver needs to continue is in its rows (θ, ∇L, the arrays of ``state_shapes``) plus
``resume_state()`` (a few JSON values), so a resumed run repeats the uninterrupted one bit for bit.
Each solver takes its own typed options (``Options``), built from the user's flat config by field name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import numpy as np

from pipeline.problem import Problem

EPS = np.finfo(np.float64).eps


class Stalled(Exception):  # noqa: N818 - a stop, not an error
    """A step found the loss flat at rounding level: the solver cannot improve θ any further.

    The loop ends the run as converged with this message, keeping the last row (nothing new to write)."""


class Objective(Protocol):
    n_chunks: int
    n_rows: int
    weight_sum: float  # Σw (the row count without sample weights): what the mean loss divides by
    passes: float

    def value_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]: ...
    def subset(self, theta: np.ndarray, positions: list[int]) -> tuple[float, np.ndarray]: ...
    def newton(self, theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, dict[str, float]]: ...
    def r_factor(self) -> np.ndarray: ...
    def hessian_bound(self) -> np.ndarray: ...


@dataclass
class Row:
    theta: np.ndarray
    loss: float
    grad: np.ndarray
    lr: float
    state: dict[str, np.ndarray]


@dataclass(frozen=True)
class StopOptions:
    tol: float = 1e-12  # relative loss change per iteration
    gtol: float = 1e-8  # norm of the (minimum-norm sub)gradient


def options_from(cls: type, config: Any) -> Any:
    """A solver's typed options from the fields of the same name in ``config`` (``tol``: its effective one)."""
    values = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
    if "tol" in values:
        values["tol"] = config.effective_tol
    return cls(**values)


class Solver(ABC):
    name: ClassVar[str] = "base"
    Options: ClassVar[type] = StopOptions

    def __init__(self, options: Any, problem: Problem, objective: Objective):
        self.opt, self.problem, self.obj = options, problem, objective
        self.n_params = problem.n_params
        self.row: Row | None = None
        self.warnings: list[str] = []

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        """Why this solver cannot solve ``problem`` (a sentence naming the alternative), else None."""
        return None

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row optimizer state arrays (``state/<name>`` in the run store)."""
        return {}

    def start(self, theta0: np.ndarray) -> Row:
        loss, grad = self.obj.value_grad(theta0)
        self.row = Row(theta0, loss, grad, 0.0, {})
        return self.row

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        self.row = row

    def static_arrays(self) -> dict[str, np.ndarray]:
        """Arrays fixed for the whole run, computed by ``start`` (stored once, before row 0 is committed)."""
        return {}

    def load_static(self, arrays: dict[str, np.ndarray]) -> None:  # noqa: B027 - most solvers keep none
        """Take back :meth:`static_arrays` on resume (before :meth:`restore`)."""

    def resume_state(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def step(self) -> Row:
        """Advance to the next accepted iterate and return its row."""

    def stop_reason(self, prev_loss: float | None, row: Row) -> str | None:
        """Why the run has converged at ``row`` (``prev_loss``: the loss of the row before), else None."""
        return self.gradient_small(row) or self.loss_settled(prev_loss, row)

    def gradient_small(self, row: Row) -> str | None:
        """‖minimum-norm subgradient‖ ≤ gtol (the gradient itself for a smooth penalty)."""
        g = self.problem.min_norm_subgradient(row.theta, row.grad)
        if float(np.linalg.norm(g)) <= self.opt.gtol:
            return f"gradient norm ≤ gtol ({self.opt.gtol:g})"
        return None

    def loss_settled(self, prev_loss: float | None, row: Row) -> str | None:
        if prev_loss is not None and abs(prev_loss - row.loss) <= self.opt.tol * max(abs(row.loss), 1e-300):
            return f"relative loss change ≤ tol ({self.opt.tol:g})"
        return None

    def information(self) -> dict[str, Any] | None:
        """What the solver already knows at its last row for inference: ``{"R": …}`` (TSQR) or
        ``{"gram_sum": …, "n": …, "sum_y": …}`` (Newton); None when a pass is needed."""
        return None


def armijo_ok(new_loss: float, loss: float, slope: float, step: float, c: float = 1e-4) -> bool:
    """Sufficient decrease, with a few ulps of slack for losses that agree to rounding."""
    return math.isfinite(new_loss) and new_loss <= loss + c * step * slope + 8 * EPS * abs(loss)
