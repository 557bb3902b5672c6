"""``--solver newton``: Newton's method on the full objective (IRLS for a GLM), one pass per iteration.

Each pass at θ_t returns the loss, the gradient and the weighted Gram Σ ℓ''·a aᵀ; the driver solves
H Δ = −∇L by Cholesky (damped by a multiple of the identity until positive definite, e.g. for separable
or rank-deficient data) and keeps Δ_t in ``state/direction``. The next pass is the line search's trial
θ_t + αΔ_t (α = 1 first): its loss decides acceptance, and when accepted the same pass already holds the
next Hessian — so an iteration costs one pass unless the step is cut. For a constant Hessian (linear) the
first step is exact.

Stopping: after a full step of relative size ≤ √tol (Newton's quadratic convergence leaves θ_t within
~tol of the optimum), when the Newton decrement λ² = −∇Lᵀ Δ says the loss cannot fall by more than
rounding, or when ‖∇L‖ ≤ gtol.

With an L1 term (λ₁ > 0) this is proximal Newton (IRLS + coordinate descent, as glmnet and glum): Δ = θ̂ − θ
for θ̂ the minimizer of the smooth part's quadratic model plus the L1 term (``cd.l1_quadratic`` on the pass's
Hessian and gradient, on the driver). The line search is the composite Armijo condition
F(θ + αΔ) ≤ F(θ) + c·α·D with D = ∇Lᵀ Δ + ‖θ + Δ‖₁,a − ‖θ‖₁,a (F the full objective; D ≤ −ΔᵀHΔ < 0), the
decrement is −D, and ‖∇L‖ in the stopping rule is the minimum-norm subgradient's. A full step sets the
coordinates θ̂ zeroes to exactly 0.0 (θ_j + (0 − θ_j)). Without L1 nothing differs from plain Newton.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.linalg

from pipeline.errors import GradpipeError
from pipeline.solvers.base import EPS, Row, Solver, Stalled, StopOptions, armijo_ok
from pipeline.solvers.cd import l1_quadratic

MAX_HALVINGS = 40


def newton_direction(H: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Solve H Δ = −g by Cholesky; if H is not positive definite, add μI (μ from 1e-12·mean diag, ×10)."""
    scale = max(float(np.mean(np.abs(np.diag(H)))), 1e-300)
    mu = 0.0
    while True:
        try:
            direction = scipy.linalg.cho_solve(scipy.linalg.cho_factor(H + mu * np.eye(len(H)) if mu else H), -grad)
            if np.all(np.isfinite(direction)):
                return direction
        except np.linalg.LinAlgError:
            pass
        mu = 1e-12 * scale if mu == 0.0 else mu * 10.0
        if mu > 1e12 * scale:
            raise GradpipeError("the Hessian could not be made positive definite; the data may hold NaN or "
                                "extreme values.")


class Newton(Solver):
    name = "newton"
    Options = StopOptions

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"direction": (self.n_params,)}

    def _evaluate(self, theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, dict[str, Any]]:
        loss, grad, H, info = self.obj.newton(theta)
        if not math.isfinite(loss):
            direction = np.zeros_like(grad)
        elif self.problem.penalty.smooth:
            direction = newton_direction(H, grad)
        else:
            a = self.problem.penalty.l1_weights(self.problem.scale)
            direction = l1_quadratic(H, grad, theta, a).theta - theta
        return loss, grad, direction, info

    def _l1_change(self, theta: np.ndarray, direction: np.ndarray) -> float:
        """‖θ + Δ‖₁,a − ‖θ‖₁,a: what the L1 term adds to the model's slope (0 without L1)."""
        pen, scale = self.problem.penalty, self.problem.scale
        return pen.l1_value(theta + direction, scale) - pen.l1_value(theta, scale) if pen.l1 else 0.0

    def start(self, theta0: np.ndarray) -> Row:
        loss, grad, direction, self._info = self._evaluate(theta0)
        self.row = Row(theta0, loss, grad, 0.0, {"direction": direction})
        self.last_step = math.inf  # max |θ_t − θ_{t−1}|
        return self.row

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        self.last_step = math.inf if resume["last_step"] is None else float(resume["last_step"])
        self._info = None  # the Hessian at this row is not stored: inference makes a pass if it ends here

    def resume_state(self) -> dict[str, Any]:
        return {"last_step": self.last_step if math.isfinite(self.last_step) else None}

    def step(self) -> Row:
        cur = self.row
        direction = cur.state["direction"]
        slope = float(cur.grad @ direction)
        if not self.problem.penalty.smooth:
            slope += self._l1_change(cur.theta, direction)
        alpha = 1.0
        for _ in range(MAX_HALVINGS):
            theta = cur.theta + alpha * direction
            loss, grad, new_direction, info = self._evaluate(theta)
            if not math.isfinite(cur.loss) or armijo_ok(loss, cur.loss, slope, alpha):
                self.last_step, self._info = float(np.max(np.abs(theta - cur.theta))), info
                self.row = Row(theta, loss, grad, alpha, {"direction": new_direction})
                return self.row
            alpha /= 2.0
        if abs(loss - cur.loss) <= 16 * EPS * abs(cur.loss):
            raise Stalled("the loss is flat at rounding level along the Newton direction")
        raise GradpipeError("the Newton line search could not decrease the loss; the data may hold extreme "
                            "values (check `gradpipe runs show`).")

    def stop_reason(self, prev_loss: float | None, row: Row) -> str | None:
        if small := self.gradient_small(row):
            return small
        decrement = -float(row.grad @ row.state["direction"])
        if not self.problem.penalty.smooth:
            decrement -= self._l1_change(row.theta, row.state["direction"])
        # The loss cannot tell θ's last √eps apart: a pending step that is not itself at rounding level is
        # still taken (the line search accepts a change within rounding), and the step rule below ends the run.
        size = max(1.0, float(np.max(np.abs(row.theta))))
        if (0.5 * decrement <= 8 * EPS * max(abs(row.loss), 1e-300)
                and float(np.max(np.abs(row.state["direction"]))) <= 16 * EPS * size):
            return "Newton decrement at rounding level"
        if row.lr == 1.0 and self.last_step <= math.sqrt(self.opt.tol) * max(1.0, float(np.max(np.abs(row.theta)))):
            return f"full Newton step of relative size ≤ √tol ({math.sqrt(self.opt.tol):g})"
        return None

    def information(self) -> dict[str, Any] | None:
        return self._info
