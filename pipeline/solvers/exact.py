"""``--solver exact``: least squares (and ridge) in ONE pass, by TSQR.

The pass returns R, the upper-triangular factor of ``A = [1 | X_std | y]`` (each leaf's R by Householder
QR, combined up the fixed tree by QR of stacked factors). With ``R = [[R₁₁, r], [0, ρ]]``:

    ‖A₁β − y‖² = ‖R₁₁β − r‖² + ρ²        (A₁ = [1 | X_std], β = [intercept, w])

so the solution, the loss and the gradient at any θ come from R on the driver with no further pass, and at
lstsq's accuracy (the normal equations square the condition number and lose half the digits). Ridge
appends √(nλ)/sⱼ rows to R₁₁ (the penalty acts on original-scale weights). The small system is solved by
SVD with its columns scaled to unit norm, so the rank is judged per column whatever the features' scales.
Rank deficiency gives the minimum-norm solution in the standardized space (a constant feature gets
coefficient 0, as in scikit-learn; duplicated features share the weight), with a warning naming the
features.

With an L1 term (λ₁ > 0) the same pass suffices: the Gram is R₁₁ᵀR₁₁ (permuted to θ's order, divided by
Σw, plus the λ₂ diagonal) and coordinate descent (``cd.l1_quadratic``) solves the elastic net on the driver.
The Gram squares R's condition number, so the solve is refined: each round re-solves the quadratic model
around the last solution with the gradient computed from R (iterative refinement: for least squares the
model is exact, so only rounding is left to correct).

Row 0 is θ_0, row 1 the solution; R is kept in ``state/r_factor`` so a resumed run needs no second pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from pipeline.solvers.base import Row, Solver, StopOptions
from pipeline.solvers.cd import l1_quadratic

REFINE_ROUNDS = 3  # each gains the digits cond(R)²·eps leaves; the last changes θ by rounding only


def _perm(d: int) -> np.ndarray:
    """θ = [w, b] ↔ β = [b, w]: β = θ[perm], θ = β[argsort(perm)]."""
    return np.concatenate([[d], np.arange(d)])


def r_loss_grad(R: np.ndarray, theta: np.ndarray) -> tuple[float, np.ndarray]:
    """½‖A₁β − y‖² and its gradient in θ's order, from R of ``[1 | X_std | y]`` (no pass)."""
    d = len(theta) - 1
    p = _perm(d)
    e = R[:-1, :-1] @ theta[p] - R[:-1, -1]
    grad = np.empty(d + 1)
    grad[p] = R[:-1, :-1].T @ e
    return 0.5 * (float(e @ e) + float(R[-1, -1]) ** 2), grad


def r_gram(R: np.ndarray) -> np.ndarray:
    """The Gram AᵀA of ``[X_std, 1]`` in θ's order, from R (what coordinate descent needs)."""
    d = R.shape[0] - 2
    A = R[:-1, :-1][:, np.argsort(_perm(d))]  # A θ = R₁₁ β
    return A.T @ A


class Exact(Solver):
    name = "exact"
    Options = StopOptions

    @classmethod
    def unsupported(cls, problem) -> str | None:
        if not problem.family.supports_exact:
            return (f"exact solves least squares only; for --model {problem.family.name} use --solver newton, "
                    f"lbfgs or auto.")
        return None

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"r_factor": (self.n_params + 1, self.n_params + 1)}

    def start(self, theta0: np.ndarray) -> Row:
        self.R = self.obj.r_factor()
        loss, grad = self._value_grad(theta0)
        self.row = Row(theta0, loss, grad, 0.0, {"r_factor": self.R})
        return self.row

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        self.R = row.state["r_factor"]

    def _value_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        half_rss, grad = r_loss_grad(self.R, theta)
        return self.problem.finish(half_rss, grad, self.obj.weight_sum, theta)

    def solve(self) -> np.ndarray:
        """The (penalized) least-squares θ from R."""
        if not self.problem.penalty.smooth:
            return self._solve_l1()
        d = self.n_params - 1
        R11, r = self.R[:-1, :-1], self.R[:-1, -1]
        lam, scale = self.problem.penalty.l2, self.problem.scale
        if lam > 0:
            D = np.diag(np.concatenate([[0.0], np.sqrt(self.obj.weight_sum * lam) / scale]))
            R11, r = np.vstack([R11, D]), np.concatenate([r, np.zeros(d + 1)])
        # Columns scaled to unit norm first: the rank cut is then relative to each column, not to the largest
        # (unstandardized features of scale 1e30 would otherwise make every other column look dependent).
        norms = np.linalg.norm(R11, axis=0)
        norms[norms == 0] = 1.0
        scaled = R11 / norms
        beta, _, rank, _ = np.linalg.lstsq(scaled, r, rcond=None)
        beta /= norms
        if rank < d + 1:
            self.warnings.append(self._rank_warning(scaled, rank))
        theta = np.empty(d + 1)
        theta[_perm(d)] = beta
        return theta

    def _solve_l1(self) -> np.ndarray:
        """The elastic net by coordinate descent on the Gram R₁₁ᵀR₁₁, refined with gradients from R."""
        H = self.problem.hessian(r_gram(self.R), self.obj.weight_sum)
        a = self.problem.penalty.l1_weights(self.problem.scale)
        theta, grad = self.row.theta, self.row.grad
        for _ in range(REFINE_ROUNDS):
            new = l1_quadratic(H, grad, theta, a).theta
            if np.array_equal(new, theta):
                break
            theta = new
            _, grad = self._value_grad(theta)
        return theta

    def _rank_warning(self, R11: np.ndarray, rank: int) -> str:
        """Name the columns a pivoted QR leaves for last: those the others already span."""
        _, _, piv = scipy.linalg.qr(R11, mode="economic", pivoting=True)
        names = self.problem.feature_names or [f"x{j}" for j in range(R11.shape[1] - 1)]
        dependent = sorted(int(j) for j in piv[rank:])
        label = ", ".join("the intercept" if j == 0 else repr(names[j - 1]) for j in dependent)
        return (f"the features are linearly dependent (rank {rank} of {R11.shape[1]} columns with the "
                f"intercept): {label} {'is' if len(dependent) == 1 else 'are'} a combination of the others "
                f"(a constant or duplicated column?); the minimum-norm solution is reported.")

    def step(self) -> Row:
        theta = self.solve()
        loss, grad = self._value_grad(theta)
        self.row = Row(theta, loss, grad, 1.0, {"r_factor": self.R})
        return self.row

    def stop_reason(self, prev_loss: float | None, row: Row) -> str | None:
        if prev_loss is None:
            return None
        if not self.problem.penalty.smooth:
            return "exact elastic-net solution (TSQR, one pass; coordinate descent on the driver)"
        return "exact least-squares solution (TSQR, one pass)"

    def information(self) -> dict[str, Any]:
        return {"R": self.R}
