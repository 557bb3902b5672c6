"""The tuners of ``pipeline.tune``: one outer iteration per :meth:`step`, every fold and candidate in the same
passes (docs/design.md §3). Three tuners, chosen by the problem:

- **Linear** (:class:`LinearPath`): ONE pass returns the R factor of each fold's rows (``folds.chunk_fold_qr``).
  Least squares on the training rows of fold k is the QR of the other folds' factors, the held-out error of any θ
  is ‖R_k·[β; −1]‖², so the whole α path of every fold (coordinate descent on the driver, warm-started along the
  path, strong-rule screening, refined with gradients from R as ``--solver exact`` does) costs no further pass.
- **IRLS families** (:class:`NewtonPath`): proximal Newton for every (l1 ratio, α, fold) model at once. Each pass
  evaluates all active models' trial points (``folds.chunk_fold_newton``: one product for the linear predictors,
  one for all the weighted Grams), so the number of passes is that of the slowest model, not the sum over the grid.
  Every model starts at the intercept-only fit, where its first step is the path of the quadratic model solved
  along α with warm starts and strong rules; a model stops by the Newton solver's rules and then costs nothing.
- **Learning rates** (:class:`LearningRates`, ``--lr-grid``): gradient descent (proximal with an L1 term) at each
  candidate learning rate and fold, all θ in the same passes, for ``--max-iter`` steps; a candidate that diverges
  is out (deviance ∞).

Their state after each step is a dict of arrays: a row of the tune store, from which :meth:`restore` continues.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import folds, path
from pipeline.errors import GradpipeError
from pipeline.objective import ClusterObjective
from pipeline.penalty import ElasticNet
from pipeline.problem import Problem
from pipeline.solvers.base import EPS, armijo_ok
from pipeline.solvers.cd import l1_quadratic
from pipeline.solvers.exact import REFINE_ROUNDS, r_gram, r_loss_grad

if TYPE_CHECKING:
    from pipeline.tune import TuneConfig

MAX_HALVINGS = 40
ACTIVE, CONVERGED, FAILED, DIVERGED = 0.0, 1.0, 2.0, 3.0


class Tuner:
    """One outer iteration per :meth:`step` (a row of the tune store); ``done`` when nothing is left to do."""

    def __init__(self, cfg: TuneConfig, problem: Problem, obj: ClusterObjective):
        self.cfg, self.problem, self.obj = cfg, problem, obj
        self.K, self.p = cfg.cv, problem.n_params
        self.grid: np.ndarray | None = None
        self.done = False

    def penalized(self, alpha: float, l1_ratio: float) -> Problem:
        return dataclasses.replace(self.problem, penalty=ElasticNet(alpha * l1_ratio, alpha * (1.0 - l1_ratio)))

    def make_grid(self, full_grad: np.ndarray, n_rows: int) -> np.ndarray:
        """(R, L) α values: the given grid, or from α_max per l1 ratio."""
        if self.cfg.alpha_grid is not None:
            return np.tile(np.asarray(self.cfg.alpha_grid), (len(self.cfg.l1_ratios), 1))
        eps = self.cfg.eps if self.cfg.eps is not None else (1e-3 if n_rows > self.p - 1 else 1e-2)
        return np.stack([path.alpha_grid(path.alpha_max(full_grad, self.problem.scale, r), self.cfg.n_alphas, eps)
                         for r in self.cfg.l1_ratios])

    def _pass(self, thetas: np.ndarray, model_fold: np.ndarray, gram: bool, held_grad: bool = False) -> np.ndarray:
        self.obj.passes += 1
        return self.obj.engine.map_reduce(folds.chunk_fold_newton, self.problem.family, self.K, self.cfg.seed,
                                          thetas, model_fold, self.problem.mean, self.problem.scale, gram, held_grad,
                                          result_bytes=8 * len(thetas) * self.p * (self.p + 4))

    def restore(self, row: dict[str, np.ndarray], resume: dict[str, Any], grid: np.ndarray | None) -> None:
        self.state, self.grid = row, grid
        self.done = bool(resume.get("done"))

    def resume_state(self) -> dict[str, Any]:
        return {"done": self.done, "passes": self.obj.passes}


class LinearPath(Tuner):
    """Least squares: the per-fold R factors in one pass, then every fold's α path on the driver."""

    kind = "alpha"

    def start(self) -> dict[str, np.ndarray]:
        self.obj.passes += 1
        R = self.obj.engine.map_reduce(folds.chunk_fold_qr, self.K, self.cfg.seed, self.problem.mean,
                                       self.problem.scale, combine=folds.fold_qr_combine)
        check_folds([float(Rk[0, 0]) ** 2 for Rk in R], self.cfg)
        full = folds.qr_combine(list(R))
        n = float(full[0, 0]) ** 2  # the ones column: R₀₀² = Σw
        theta0 = np.zeros(self.p)
        theta0[-1] = float(full[0, -1] / full[0, 0])  # the intercept-only least-squares fit
        self.grid = self.make_grid(r_loss_grad(full, theta0)[1] / n, self.obj.n_rows)
        self.state = {"r_factors": R}
        return self.state

    def step(self) -> dict[str, np.ndarray]:
        R = self.state["r_factors"]
        thetas = np.empty((len(self.cfg.l1_ratios), self.grid.shape[1], self.K, self.p))
        dev = np.empty(thetas.shape[:3])
        for k in range(self.K):
            train = folds.qr_combine([R[f] for f in range(self.K) if f != k])
            n_tr, n_ho = float(train[0, 0]) ** 2, float(R[k][0, 0]) ** 2
            for i, ratio in enumerate(self.cfg.l1_ratios):
                thetas[i, :, k] = self._fold_path(train, n_tr, self.grid[i], ratio)
                for j in range(self.grid.shape[1]):
                    dev[i, j, k] = 2.0 * r_loss_grad(R[k], thetas[i, j, k])[0] / n_ho
        self.done = True
        self.state = {"theta": thetas, "deviance": dev}
        return self.state

    def _fold_path(self, R: np.ndarray, n: float, alphas: np.ndarray, ratio: float) -> np.ndarray:
        """θ along the α path of one fold's training rows (warm starts, strong rules, refinement from R)."""
        gram = r_gram(R)
        theta = np.zeros(self.p)
        theta[-1] = float(R[0, -1] / R[0, 0])
        out, a_prev = [], None
        for alpha in alphas:
            prob = self.penalized(alpha, ratio)
            H = prob.hessian(gram.copy(), n)
            a = prob.penalty.l1_weights(prob.scale)
            _, g = prob.finish(*r_loss_grad(R, theta), n, theta)
            discard = (np.zeros(self.p, bool) if a_prev is None else path.strong_discard(g, theta, a, a_prev))
            new = path.screened_solve(H, g, theta, a, theta, discard)
            for _ in range(REFINE_ROUNDS):  # the Gram squares R's condition: correct with R's exact gradient
                if np.array_equal(new, theta):
                    break
                theta = new
                _, g = prob.finish(*r_loss_grad(R, theta), n, theta)
                new = l1_quadratic(H, g, theta, a).theta
            theta, a_prev = new, a
            out.append(theta)
        return np.stack(out)

    def results(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.state["theta"], self.state["deviance"], np.full(self.state["deviance"].shape, CONVERGED)


class NewtonPath(Tuner):
    """Proximal Newton for every (l1 ratio, α, fold) model in the same passes."""

    kind = "alpha"

    def start(self) -> dict[str, np.ndarray]:
        self.obj.passes += 1  # the target's weighted mean: a read of y
        _, n, sum_y = self.obj.target_summary()
        theta0 = np.zeros(self.p)
        theta0[-1] = self.problem.family.null_predictor(sum_y / n)
        at = folds.fold_layout(self.p, gram=True)
        out = self._pass(np.tile(theta0, (self.K, 1)), np.arange(self.K), gram=True, held_grad=True)
        fold_n = np.stack([out[:, at["n"]][:, 0], out[:, at["ho_n"]][:, 0]], axis=1)
        check_folds(fold_n[:, 1], self.cfg)
        full_grad = (out[0, at["grad"]] + out[0, at["ho_grad"]]) / (fold_n[0].sum())
        self.grid = self.make_grid(full_grad, self.obj.n_rows)
        R, L, K, p = len(self.cfg.l1_ratios), self.grid.shape[1], self.K, self.p
        st = {"theta": np.tile(theta0, (R, L, K, 1)), "loss": np.empty((R, L, K)), "direction": np.empty((R, L, K, p)),
              "slope": np.empty((R, L, K)), "step": np.ones((R, L, K)), "status": np.full((R, L, K), ACTIVE),
              "halvings": np.zeros((R, L, K)), "last_step": np.full((R, L, K), np.inf),
              "deviance": np.empty((R, L, K)), "fold_n": fold_n}
        for k in range(K):
            loss_k, grad_k = out[k, at["loss"]][0], out[k, at["grad"]]
            gram_k = out[k, at["gram"]].reshape(p, p)
            st["deviance"][:, :, k] = 2.0 * out[k, at["ho_loss"]][0] / fold_n[k, 1]
            for i, ratio in enumerate(self.cfg.l1_ratios):
                prev, a_prev = theta0, None
                for j, alpha in enumerate(self.grid[i]):  # the first step's path: warm starts, strong rules
                    prob = self.penalized(alpha, ratio)
                    F, g = prob.finish(loss_k, grad_k, fold_n[k, 0], theta0)
                    H = prob.hessian(gram_k.copy(), fold_n[k, 0])
                    a = prob.penalty.l1_weights(prob.scale)
                    r = g + H @ (prev - theta0)
                    discard = np.zeros(p, bool) if a_prev is None else path.strong_discard(r, prev, a, a_prev)
                    target = path.screened_solve(H, g, theta0, a, prev, discard)
                    self._set(st, (i, j, k), prob, F, g, target - theta0, theta0)
                    prev, a_prev = target, a
        self.state = st
        return st

    @staticmethod
    def _set(st: dict[str, np.ndarray], idx: tuple[int, int, int], prob: Problem, F: float, g: np.ndarray,
             direction: np.ndarray, theta: np.ndarray) -> None:
        pen, scale = prob.penalty, prob.scale
        l1_change = pen.l1_value(theta + direction, scale) - pen.l1_value(theta, scale) if pen.l1 else 0.0
        st["loss"][idx], st["direction"][idx] = F, direction
        st["slope"][idx] = float(g @ direction) + l1_change

    def step(self) -> dict[str, np.ndarray]:
        st = {k: v.copy() for k, v in self.state.items()}
        active = np.argwhere(st["status"] == ACTIVE)
        trials = np.stack([st["theta"][tuple(i)] + st["step"][tuple(i)] * st["direction"][tuple(i)] for i in active])
        at = folds.fold_layout(self.p, gram=True)
        out = self._pass(trials, active[:, 2], gram=True)
        for row, idx, trial in zip(out, map(tuple, active), trials, strict=True):
            i, j, k = idx
            prob = self.penalized(self.grid[i, j], self.cfg.l1_ratios[i])
            n_tr = st["fold_n"][k, 0]
            F, g = prob.finish(row[at["loss"]][0], row[at["grad"]], n_tr, trial)
            step = st["step"][idx]
            if not math.isfinite(st["loss"][idx]) or armijo_ok(F, st["loss"][idx], st["slope"][idx], step):
                move = float(np.max(np.abs(trial - st["theta"][idx])))
                st["theta"][idx], st["deviance"][idx] = trial, 2.0 * row[at["ho_loss"]][0] / st["fold_n"][k, 1]
                H = prob.hessian(row[at["gram"]].reshape(self.p, self.p), n_tr)
                a = prob.penalty.l1_weights(prob.scale)
                direction = l1_quadratic(H, g, trial, a).theta - trial
                self._set(st, idx, prob, F, g, direction, trial)
                st["step"][idx], st["halvings"][idx], st["last_step"][idx] = 1.0, 0.0, move
                small = math.sqrt(self.cfg.tol) * max(1.0, float(np.max(np.abs(trial))))
                # Newton's rules: a full step below √tol, or a decrement at the loss's rounding level with a
                # pending step below √tol (a step the loss cannot resolve cannot be verified by a line search)
                if ((step == 1.0 and move <= small)
                        or (-0.5 * st["slope"][idx] <= 8 * EPS * max(abs(F), 1e-300)
                            and float(np.max(np.abs(direction))) <= small)):
                    st["status"][idx] = CONVERGED
            elif st["halvings"][idx] + 1 >= MAX_HALVINGS:
                flat = abs(F - st["loss"][idx]) <= 16 * EPS * abs(st["loss"][idx])
                st["status"][idx] = CONVERGED if flat else FAILED
            else:
                st["step"][idx] = step / 2.0
                st["halvings"][idx] += 1
        self.done = not (st["status"] == ACTIVE).any()
        self.state = st
        return st

    def results(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dev = np.where(self.state["status"] == FAILED, np.inf, self.state["deviance"])
        return self.state["theta"], dev, self.state["status"]


class LearningRates(Tuner):
    """Gradient descent at each candidate learning rate and fold, all θ in the same passes."""

    kind = "lr"

    def start(self) -> dict[str, np.ndarray]:
        G, K, p = len(self.cfg.lr_grid), self.K, self.p
        at = folds.fold_layout(p, gram=False)
        out = self._pass(np.zeros((K, p)), np.arange(K), gram=False)
        fold_n = np.stack([out[:, at["n"]][:, 0], out[:, at["ho_n"]][:, 0]], axis=1)
        check_folds(fold_n[:, 1], self.cfg)
        st = {"theta": np.zeros((G, K, p)), "loss": np.empty((G, K)), "grad": np.empty((G, K, p)),
              "status": np.full((G, K), ACTIVE), "deviance": np.empty((G, K)), "loss0": np.empty((G, K)),
              "fold_n": fold_n}
        for k in range(K):
            F, g = self.problem.finish(out[k, at["loss"]][0], out[k, at["grad"]], fold_n[k, 0], np.zeros(p))
            st["loss"][:, k], st["loss0"][:, k], st["grad"][:, k] = F, F, g
            st["deviance"][:, k] = 2.0 * out[k, at["ho_loss"]][0] / fold_n[k, 1]
        self.state = st
        return st

    def step(self) -> dict[str, np.ndarray]:
        st = {k: v.copy() for k, v in self.state.items()}
        active = np.argwhere(st["status"] == ACTIVE)
        # the gradient holds the smooth (λ₂) part; the prox only the L1 part, as --solver gd
        l1, scale = ElasticNet(self.problem.penalty.l1), self.problem.scale
        trials = np.stack([l1.prox(st["theta"][g, k] - self.cfg.lr_grid[g] * st["grad"][g, k],
                                   self.cfg.lr_grid[g], scale) for g, k in active])
        at = folds.fold_layout(self.p, gram=False)
        out = self._pass(trials, active[:, 1], gram=False)
        for row, (g, k), trial in zip(out, active, trials, strict=True):
            F, grad = self.problem.finish(row[at["loss"]][0], row[at["grad"]], st["fold_n"][k, 0], trial)
            if not math.isfinite(F) or F > 1e8 * max(abs(st["loss0"][g, k]), 1e-12):
                st["status"][g, k] = DIVERGED
                continue
            change = abs(st["loss"][g, k] - F)
            st["theta"][g, k], st["grad"][g, k], st["loss"][g, k] = trial, grad, F
            st["deviance"][g, k] = 2.0 * row[at["ho_loss"]][0] / st["fold_n"][k, 1]
            if change <= self.cfg.tol * max(abs(F), 1e-300):
                st["status"][g, k] = CONVERGED
        self.done = not (st["status"] == ACTIVE).any()
        self.state = st
        return st

    def results(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dev = np.where(self.state["status"] == DIVERGED, np.inf, self.state["deviance"])
        return self.state["theta"], dev, self.state["status"]


def check_folds(held_out: Any, cfg: TuneConfig) -> None:
    empty = [k for k, n in enumerate(held_out) if not n > 0]
    if empty:
        raise GradpipeError(f"--cv {cfg.cv}: fold {empty[0]} holds no rows (with weight > 0); use fewer folds.")


MAX_GRAM_BYTES = 2 * 2**30  # the Grams of one Newton tuning pass, summed on a worker and sent to the driver


def make_tuner(cfg: TuneConfig, problem: Problem, obj: ClusterObjective) -> Tuner:
    if cfg.lr_grid is not None:
        return LearningRates(cfg, problem, obj)
    if problem.family.supports_exact:
        return LinearPath(cfg, problem, obj)
    return NewtonPath(cfg, problem, obj)
