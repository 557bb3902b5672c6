"""The solver registry: a solver is one module and one line in :data:`SOLVERS`.

``auto`` is resolved per family and size (``Family.auto_solver``): exact TSQR for linear and Newton for
logistic up to 4,096 features, L-BFGS above.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import GradpipeError
from pipeline.problem import Problem
from pipeline.solvers.base import Objective, Row, Solver, Stalled, options_from
from pipeline.solvers.exact import Exact
from pipeline.solvers.first_order import Adam, GradientDescent, MiniBatchSGD, Momentum, Nesterov
from pipeline.solvers.lbfgs import LBFGS
from pipeline.solvers.newton import Newton

SOLVERS: dict[str, type[Solver]] = {s.name: s for s in (Exact, Newton, LBFGS, GradientDescent, MiniBatchSGD,
                                                         Momentum, Nesterov, Adam)}
CHOICES = ("auto", *SOLVERS)

__all__ = ["SOLVERS", "CHOICES", "Row", "Solver", "Stalled", "Objective", "resolve", "make_solver"]


def resolve(name: str, problem: Problem) -> str:
    """The solver that runs for ``--solver name`` on this problem (``auto`` picks by family and size)."""
    if name == "auto":
        name = problem.family.auto_solver(problem.n_params - 1)
    if name not in SOLVERS:
        raise GradpipeError(f"--solver: unknown solver {name!r}; choose one of {', '.join(CHOICES)}.")
    why = SOLVERS[name].unsupported(problem)
    if why:
        raise GradpipeError(f"--solver {name}: {why}")
    return name


def make_solver(name: str, config: Any, problem: Problem, objective: Objective) -> Solver:
    cls = SOLVERS[resolve(name, problem)]
    return cls(options_from(cls.Options, config), problem, objective)
