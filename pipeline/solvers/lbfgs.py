"""``--solver lbfgs``: limited-memory BFGS with a strong-Wolfe line search; any smooth family, any d.

The direction comes from the last ``history`` (s, y) pairs by the two-loop recursion, scaled by
γ = sᵀy / yᵀy (Nocedal & Wright, Alg. 7.4); each line-search trial is one value+gradient pass, and the
trial that satisfies the strong Wolfe conditions (c₁ = 1e-4, c₂ = 0.9; Alg. 3.5/3.6 with cubic
interpolation) becomes the next row. The pairs live in ``state/s`` and ``state/y`` (newest last, zero rows
before the memory fills), so a resumed run continues with exactly the same memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import GradpipeError
from pipeline.solvers.base import EPS, Row, Solver, Stalled, StopOptions

C1, C2 = 1e-4, 0.9
MAX_EVALS = 40  # line-search passes per iteration before giving up


@dataclass(frozen=True)
class LBFGSOptions(StopOptions):
    history: int = 10


def two_loop(grad: np.ndarray, S: np.ndarray, Y: np.ndarray, k: int) -> np.ndarray:
    """−H_k ∇L from the newest ``k`` pairs (rows ``-k:`` of S and Y)."""
    q = -np.array(grad, dtype=np.float64, copy=True)
    if k == 0:
        return q
    S, Y = S[-k:], Y[-k:]
    rho = 1.0 / np.einsum("ij,ij->i", S, Y)
    alpha = np.empty(k)
    for i in range(k - 1, -1, -1):
        alpha[i] = rho[i] * (S[i] @ q)
        q -= alpha[i] * Y[i]
    q *= float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1])
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
        row = super().start(theta0)
        self.k = 0  # pairs held
        row.state = {"s": np.zeros((self.m, self.n_params)), "y": np.zeros((self.m, self.n_params))}
        return row

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        self.k = int(resume["pairs"])

    def resume_state(self) -> dict[str, Any]:
        return {"pairs": self.k}

    def _phi(self, theta: np.ndarray, direction: np.ndarray, alpha: float) -> tuple[float, float, np.ndarray,
                                                                                     np.ndarray]:
        x = theta + alpha * direction
        f, g = self.obj.value_grad(x)
        return f, float(g @ direction), x, g

    def _line_search(self, cur: Row, direction: np.ndarray, alpha1: float) -> tuple[float, float, np.ndarray,
                                                                                    np.ndarray, float]:
        """Strong Wolfe (N&W Alg. 3.5 bracketing, 3.6 zoom); returns (f, slope, θ, ∇L, α) of the accepted trial."""
        f0, g0 = cur.loss, float(cur.grad @ direction)
        a_prev, f_prev, s_prev = 0.0, f0, g0
        alpha, evals = alpha1, 0
        while True:
            f, s, x, g = self._phi(cur.theta, direction, alpha)
            evals += 1
            if not math.isfinite(f) or f > f0 + C1 * alpha * g0 or (evals > 1 and f >= f_prev):
                return self._zoom(cur, direction, a_prev, f_prev, s_prev, alpha, f, s, f0, g0, evals)
            if abs(s) <= -C2 * g0:
                return f, s, x, g, alpha
            if s >= 0:
                return self._zoom(cur, direction, alpha, f, s, a_prev, f_prev, s_prev, f0, g0, evals)
            if evals >= MAX_EVALS:
                return f, s, x, g, alpha  # still descending: accept the sufficient decrease we have
            guess = _cubic_min(a_prev, f_prev, s_prev, alpha, f, s)
            nxt = min(max(guess if guess is not None else 4 * alpha, 2 * alpha), 16 * alpha)
            a_prev, f_prev, s_prev, alpha = alpha, f, s, nxt

    def _zoom(self, cur, direction, lo, f_lo, s_lo, hi, f_hi, s_hi, f0, g0, evals):
        best, lowest = None, math.inf
        while evals < MAX_EVALS:
            guess = _cubic_min(lo, f_lo, s_lo, hi, f_hi, s_hi) if math.isfinite(f_hi) else None
            width = abs(hi - lo)
            if guess is None or not (min(lo, hi) + 0.1 * width <= guess <= max(lo, hi) - 0.1 * width):
                guess = 0.5 * (lo + hi)  # bisect when interpolation is unsafe or lands at an end
            f, s, x, g = self._phi(cur.theta, direction, guess)
            evals += 1
            lowest = min(lowest, f)
            if not math.isfinite(f) or f > f0 + C1 * guess * g0 or f >= f_lo:
                hi, f_hi, s_hi = guess, f, s
            else:
                best = (f, s, x, g, guess)
                if abs(s) <= -C2 * g0:
                    return best
                if s * (hi - lo) >= 0:
                    hi, f_hi, s_hi = lo, f_lo, s_lo
                lo, f_lo, s_lo = guess, f, s
        if best is not None:
            return best  # sufficient decrease without the curvature condition: still a descent step
        if abs(lowest - f0) <= 16 * EPS * abs(f0):
            raise Stalled("the loss is flat at rounding level along the L-BFGS direction")
        raise GradpipeError("the L-BFGS line search found no decrease; the loss may be flat at rounding level "
                            "or the data hold extreme values (loosen --tol/--gtol, or check the data).")

    def step(self) -> Row:
        cur = self.row
        S, Y = cur.state["s"], cur.state["y"]
        direction = two_loop(cur.grad, S, Y, self.k)
        if not float(cur.grad @ direction) < 0:  # lost descent (rounding): restart from steepest descent
            self.k, direction = 0, -cur.grad
        alpha1 = 1.0 if self.k else min(1.0, 1.0 / max(float(np.linalg.norm(cur.grad)), 1e-300))
        f, _, x, g, alpha = self._line_search(cur, direction, alpha1)
        s, yv = x - cur.theta, g - cur.grad
        if float(s @ yv) > 1e-12 * float(np.linalg.norm(s) * np.linalg.norm(yv)):  # keep H positive definite
            S, Y = np.vstack([S[1:], s]), np.vstack([Y[1:], yv])
            self.k = min(self.k + 1, self.m)
        self.row = Row(x, f, g, alpha, {"s": S, "y": Y})
        return self.row
