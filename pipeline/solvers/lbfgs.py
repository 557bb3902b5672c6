"""``--solver lbfgs``: limited-memory BFGS with a strong-Wolfe line search; any smooth family, any d.

The direction comes from the last ``history`` (s, y) pairs by the two-loop recursion (Nocedal & Wright,
Alg. 7.4); each line-search trial is one value+gradient pass, and the trial that satisfies the Wolfe
conditions (c₁ = 1e-4, c₂ = 0.9; Alg. 3.5/3.6 with cubic interpolation) becomes the next row. The pairs live
in ``state/s`` and ``state/y`` (newest last, zero rows before the memory fills), so a resumed run continues
with exactly the same memory.

The initial inverse Hessian is γ·B⁻¹, with γ = sᵀy / yᵀB⁻¹y from the newest pair. B is the family's curvature
bound (one Gram pass at the start, the one ``--lr auto`` uses: the Hessian itself for linear, XᵀX/4 for
logistic) when d ≤ 4,096 and the family has one: it carries the correlations of the features, which plain
L-BFGS must discover over many iterations (measured at ρ = 0.99: 37 passes to 1e-6 without, see the
README). Otherwise B = I, the classic method. B is stored once in the run store (``static/precond``).

With an L1 penalty the same memory drives OWL-QN (:meth:`LBFGS._owlqn`); λ₁ = 0 is the path above, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from pipeline.errors import GradpipeError
from pipeline.families import NEWTON_MAX_FEATURES
from pipeline.solvers.base import EPS, Row, Solver, Stalled, StopOptions

C1, C2 = 1e-4, 0.9
MAX_EVALS = 20  # line-search passes per iteration before giving up
FLAT = 1e-10  # relative change of the loss below which loss comparisons are rounding noise


@dataclass(frozen=True)
class LBFGSOptions(StopOptions):
    history: int = 10


def two_loop(grad: np.ndarray, S: np.ndarray, Y: np.ndarray, k: int, precond=None) -> np.ndarray:
    """−H_k ∇L from the newest ``k`` pairs (rows ``-k:`` of S and Y); ``precond(v)`` applies B⁻¹."""
    apply = precond or (lambda v: v)
    q = -np.array(grad, dtype=np.float64, copy=True)
    if k == 0:
        return apply(q)
    S, Y = S[-k:], Y[-k:]
    rho = 1.0 / np.einsum("ij,ij->i", S, Y)
    alpha = np.empty(k)
    for i in range(k - 1, -1, -1):
        alpha[i] = rho[i] * (S[i] @ q)
        q -= alpha[i] * Y[i]
    q = apply(q) * (float(S[-1] @ Y[-1]) / float(Y[-1] @ apply(Y[-1])))
    for i in range(k):
        beta = rho[i] * (Y[i] @ q)
        q += (alpha[i] - beta) * S[i]
    return q


def _cubic_min(a: float, fa: float, ga: float, b: float, fb: float, gb: float) -> float | None:
    """Minimizer of the cubic through (a, fa, ga), (b, fb, gb), or None when it has none."""
    d1 = ga + gb - 3 * (fa - fb) / (a - b)
    disc = d1 * d1 - ga * gb
    if disc < 0:
        return None
    d2 = math.copysign(math.sqrt(disc), b - a)
    denom = gb - ga + 2 * d2
    if denom == 0:
        return None
    return b - (b - a) * (gb + d2 - d1) / denom


class LBFGS(Solver):
    name = "lbfgs"
    Options = LBFGSOptions

    def __init__(self, options: Any, problem, objective):
        super().__init__(options, problem, objective)
        self.m = options.history

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"s": (self.m, self.n_params), "y": (self.m, self.n_params)}

    def start(self, theta0: np.ndarray) -> Row:
        self.B = None
        if self.problem.family.curvature_bound is not None and self.n_params <= NEWTON_MAX_FEATURES + 1:
            self.B = self.obj.hessian_bound()
        self._factor()
        row = super().start(theta0)
        self.k = 0  # pairs held
        row.state = {"s": np.zeros((self.m, self.n_params)), "y": np.zeros((self.m, self.n_params))}
        return row

    def _factor(self) -> None:
        self.chol = None
        if self.B is not None:
            try:
                self.chol = scipy.linalg.cho_factor(self.B)
            except np.linalg.LinAlgError:  # a singular bound (a constant, unpenalized column): no preconditioner
                self.chol = None

    def _precond(self, v: np.ndarray) -> np.ndarray:
        return scipy.linalg.cho_solve(self.chol, v)

    def static_arrays(self) -> dict[str, np.ndarray]:
        return {} if self.B is None else {"precond": self.B}

    def load_static(self, arrays: dict[str, np.ndarray]) -> None:
        self.B = arrays.get("precond")
        self._factor()

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        self.k = int(resume["pairs"])

    def resume_state(self) -> dict[str, Any]:
        return {"pairs": self.k}

    def _phi(self, theta: np.ndarray, direction: np.ndarray, alpha: float) -> tuple[float, float, np.ndarray,
                                                                                     np.ndarray]:
        self._tried += 1
        x = theta + alpha * direction
        f, g = self.obj.value_grad(x)
        return f, float(g @ direction), x, g

    def _line_search(self, cur: Row, direction: np.ndarray, alpha1: float) -> tuple[float, float, np.ndarray,
                                                                                    np.ndarray, float]:
        """A Wolfe point along ``direction``: (f, slope, θ, ∇L, α) of the accepted trial.

        Bracketing and zoom as in N&W Alg. 3.5/3.6 (cubic interpolation, bisection when unsafe). Near the
        optimum the loss changes by less than its rounding, and comparing losses says nothing: a trial is then
        also accepted on Hager and Zhang's approximate Wolfe conditions, which use the slope alone
        (c₂·φ'(0) ≤ φ'(α) ≤ (2c₁ − 1)·φ'(0), with the loss within ``slack`` of φ(0)), and the bracket is kept by
        the slope's sign — so L-BFGS still converges in θ where the loss has stopped moving.
        """
        f0, g0 = cur.loss, float(cur.grad @ direction)
        slack = FLAT * max(abs(f0), 1e-300)
        self._tried = 0

        def accept(f: float, s: float, a: float) -> bool:
            strong = f <= f0 + C1 * a * g0 and abs(s) <= -C2 * g0
            return strong or (f <= f0 + slack and C2 * g0 <= s <= (2 * C1 - 1) * g0)

        a_prev, f_prev, s_prev, alpha = 0.0, f0, g0, alpha1
        while True:
            f, s, x, g = self._phi(cur.theta, direction, alpha)
            if math.isfinite(f) and accept(f, s, alpha):
                return f, s, x, g, alpha
            if not math.isfinite(f) or f > f0 + C1 * alpha * g0 + slack or (a_prev > 0 and f > f_prev + slack):
                return self._zoom(cur, direction, a_prev, f_prev, s_prev, alpha, f, s, accept, f0, g0, slack)
            if s >= 0:
                return self._zoom(cur, direction, alpha, f, s, a_prev, f_prev, s_prev, accept, f0, g0, slack)
            if self._tried >= MAX_EVALS:
                return f, s, x, g, alpha  # still descending after many trials: take the decrease we have
            guess = _cubic_min(a_prev, f_prev, s_prev, alpha, f, s)
            nxt = min(max(guess if guess is not None else 4 * alpha, 2 * alpha), 16 * alpha)
            a_prev, f_prev, s_prev, alpha = alpha, f, s, nxt

    def _zoom(self, cur, direction, lo, f_lo, s_lo, hi, f_hi, s_hi, accept, f0, g0, slack):
        """Shrink [lo, hi] (lo: the best point so far, descending) until a trial is accepted."""
        best, lowest = None, math.inf
        while self._tried < MAX_EVALS:
            guess = _cubic_min(lo, f_lo, s_lo, hi, f_hi, s_hi) if math.isfinite(f_hi) else None
            width = abs(hi - lo)
            if guess is None or not (min(lo, hi) + 0.1 * width <= guess <= max(lo, hi) - 0.1 * width):
                guess = 0.5 * (lo + hi)  # bisect when interpolation is unsafe or lands at an end
            f, s, x, g = self._phi(cur.theta, direction, guess)
            lowest = min(lowest, f)
            if math.isfinite(f) and accept(f, s, guess):
                return f, s, x, g, guess
            if not math.isfinite(f) or f > f0 + C1 * guess * g0 + slack or f > f_lo + slack:
                hi, f_hi, s_hi = guess, f, s
            else:
                if f < f0:
                    best = (f, s, x, g, guess)
                if s * (hi - lo) >= 0:
                    hi, f_hi, s_hi = lo, f_lo, s_lo
                lo, f_lo, s_lo = guess, f, s
        if best is not None:
            return best  # sufficient decrease without the curvature condition: still a descent step
        if abs(lowest - f0) <= slack:
            raise Stalled("the loss is flat at rounding level along the L-BFGS direction")
        raise GradpipeError("the L-BFGS line search found no decrease; the data may hold extreme values "
                            "(check `gradpipe runs show`).")

    def stop_reason(self, prev_loss: float | None, row: Row) -> str | None:
        """The gradient rule; the relative loss change only for a ``tol`` above rounding level (``FLAT``):
        below it the loss is noise while θ still moves, and the slope-driven line search carries on until the
        gradient norm reaches ``gtol`` or no direction descends any more (``Stalled``)."""
        return self.gradient_small(row) or (self.loss_settled(prev_loss, row) if self.opt.tol > FLAT else None)

    def step(self) -> Row:
        return self._step() if self.problem.penalty.smooth else self._owlqn()

    def _owlqn(self) -> Row:
        """OWL-QN (Andrew & Gao 2007): the two-loop direction on the pseudo-gradient (the min-norm
        subgradient), its components that disagree in sign with −pseudo-gradient zeroed, a backtracking
        Armijo search whose trial points are projected onto the orthant of θ (signs of θ, or of −pseudo-gradient
        where θ_j = 0), and curvature pairs from the smooth gradient only (the L1 part is linear in an orthant).
        Projection makes exact zeros: a weight that would cross zero stops at 0.0."""
        cur = self.row
        S, Y = cur.state["s"], cur.state["y"]
        precond = self._precond if self.chol is not None else None
        pg = self.problem.min_norm_subgradient(cur.theta, cur.grad)
        direction = two_loop(pg, S, Y, self.k, precond)
        direction = np.where(direction * pg < 0, direction, 0.0)
        if not float(pg @ direction) < 0:  # all of it disagreed with −pg (rounding): restart from −pg
            self.k = 0
            direction = -pg
        orthant = np.where(cur.theta != 0, np.sign(cur.theta), -np.sign(pg))
        alpha = 1.0 if self.k or precond else min(1.0, 1.0 / max(float(np.linalg.norm(pg)), 1e-300))
        f0, slack = cur.loss, FLAT * max(abs(cur.loss), 1e-300)
        lowest = math.inf
        for _ in range(MAX_EVALS):
            trial = cur.theta + alpha * direction
            x = np.where(np.sign(trial) == orthant, trial, 0.0)
            f, g = self.obj.value_grad(x)
            lowest = min(lowest, f)
            if math.isfinite(f) and f <= f0 + C1 * float(pg @ (x - cur.theta)) + 8 * EPS * abs(f0):
                break
            alpha /= 2.0
        else:
            if abs(lowest - f0) <= slack:
                raise Stalled("the loss is flat at rounding level along the OWL-QN direction")
            raise GradpipeError("the OWL-QN line search found no decrease; the data may hold extreme values "
                                "(check `gradpipe runs show`).")
        return self._accept(cur, x, f, g, alpha)

    def _accept(self, cur: Row, x: np.ndarray, f: float, g: np.ndarray, alpha: float) -> Row:
        """The accepted iterate's row, with the new curvature pair when it keeps H positive definite."""
        S, Y = cur.state["s"], cur.state["y"]
        s, yv = x - cur.theta, g - cur.grad
        if float(s @ yv) > 1e-12 * float(np.linalg.norm(s) * np.linalg.norm(yv)):
            S, Y = np.vstack([S[1:], s]), np.vstack([Y[1:], yv])
            self.k = min(self.k + 1, self.m)
        self.row = Row(x, f, g, alpha, {"s": S, "y": Y})
        return self.row

    def _step(self) -> Row:
        cur = self.row
        S, Y = cur.state["s"], cur.state["y"]
        precond = self._precond if self.chol is not None else None
        direction = two_loop(cur.grad, S, Y, self.k, precond)
        if not float(cur.grad @ direction) < 0:  # lost descent (rounding): restart from the scaled gradient
            self.k = 0
            direction = two_loop(cur.grad, S, Y, 0, precond)
        alpha1 = 1.0 if self.k or precond else min(1.0, 1.0 / max(float(np.linalg.norm(cur.grad)), 1e-300))
        f, _, x, g, alpha = self._line_search(cur, direction, alpha1)
        return self._accept(cur, x, f, g, alpha)
