"""First-order solvers: full-batch gradient descent (FISTA with an L1 penalty), momentum, Nesterov, Adam, and
mini-batch SGD.

``--lr auto`` takes a Jacobi-preconditioned step from the spectrum of a curvature bound (one Gram pass at
start, see :func:`curvature`); a fixed ``--lr`` is the plain method. Each step is one value+gradient pass
(gd: plus rejected line-search trials and FISTA's momentum point). Only gd handles an L1 penalty or a family
without a curvature bound under ``--lr auto``.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeline import optim
from pipeline.errors import GradpipeError
from pipeline.solvers.base import EPS, Row, Solver, StopOptions, armijo_ok


@dataclass(frozen=True)
class Curvature:
    L: float  # largest eigenvalue of P^½ H P^½
    mu: float  # smallest (≥ 0)
    P: np.ndarray  # per-coordinate step scale: the step is -η·P⊙∇L


def curvature(H: np.ndarray, precondition: bool = True) -> Curvature:
    """Extreme eigenvalues of the curvature bound ``H``, after a Jacobi preconditioner ``P = 1/diag(H)``.

    Why the preconditioner: the L2 penalty acts on original-space weights, so a feature of scale s adds λ/s²
    to its diagonal of H. One global step must then follow the stiffest coordinate while the others crawl
    (measured: ridge λ=0.1 with a feature of scale 6e-3 was still at loss 8.5e8 after 3000 iterations, the
    optimum being 0.84). With P every diagonal entry of the scaled H is 1, so a step from its spectrum needs
    no tuning whatever the penalty and the feature scales. Coordinates with no curvature keep P = 1.
    """
    diag = np.diag(H)
    P = np.where(diag > 0, 1.0 / np.where(diag > 0, diag, 1.0), 1.0) if precondition else np.ones(len(diag))
    r = np.sqrt(P)
    eig = np.linalg.eigvalsh(H * np.outer(r, r))
    return Curvature(float(eig[-1]), max(float(eig[0]), 0.0), P)


@dataclass(frozen=True)
class StepOptions(StopOptions):
    lr: float | str = "auto"


@dataclass(frozen=True)
class MomentumOptions(StepOptions):
    beta: float = 0.9


class Preconditioned(Solver):
    """A solver that may scale its step per coordinate (the ``--lr auto`` preconditioner P)."""

    def __init__(self, options: Any, problem, objective):
        super().__init__(options, problem, objective)
        self.P = np.ones(self.n_params)  # ones: plain steps

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        saved = resume.get("precond")
        self.P = np.ones(self.n_params) if saved is None else np.asarray(saved, dtype=np.float64)

    def resume_state(self) -> dict[str, Any]:
        return {"precond": self.P.tolist()}


def no_bound_message(problem) -> str:
    """Why ``--lr auto`` has no step for a momentum-type solver on a family without a curvature bound."""
    return (f"--lr auto needs a bound on the curvature, which the {problem.family.name} family does not have; "
            f"give --lr, or use --solver gd (line search), lbfgs or newton.")


class GradientDescent(Preconditioned):
    """Full-batch GD, and proximal gradient (FISTA) when the penalty has an L1 part.

    ``lr='auto'`` with a curvature bound: the preconditioned step 2/(L+μ) when the Hessian is constant (then H
    is exact), 1/L for a bound, kept safe by an Armijo test on the loss that the next gradient's pass computes
    anyway — a rejected step costs one extra pass, which ``passes`` reports. Without a bound (log-link
    families): a backtracking line search whose step doubles after a step accepted at once, so a step halved
    in a stiff region grows back where the curvature is lower.

    L1 (``λ₁ > 0``): FISTA (Beck & Teboulle) on smooth part f = loss + λ₂ term and the L1 part, with adaptive
    restart (O'Donoghue & Candès): the momentum is dropped when F increases — the step is then redone from θ_k
    as a plain proximal step, so rows' F never increases — or when (y_k − θ_{k+1})ᵀ(θ_{k+1} − θ_k) > 0. The
    metric is diagonal (P): min_u ∇f(y)ᵀu + Σ(u_j − y_j)²/(2ηP_j) + Σ a_j|u_j| separates by coordinate, so the
    prox is the soft-threshold at ηP_j·a_j of y − ηP⊙∇f(y): exact zeros. Each iteration is one pass at θ_{k+1}
    (its F for the restart test and the sufficient-decrease test of f) plus one at y_{k+1} when the momentum is
    not zero (the next gradient). The momentum point y, ∇f(y) and F(y) live in the rows (``state/y``,
    ``state/y_grad``), t, η and F(y) in ``resume_state``.
    """

    name = "gd"
    Options = StepOptions

    @property
    def _proximal(self) -> bool:
        return not self.problem.penalty.smooth

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"y": (self.n_params,), "y_grad": (self.n_params,)} if self._proximal else {}

    def start(self, theta0: np.ndarray) -> Row:
        self.search = False  # backtracking with regrowth (no curvature bound)
        if self.opt.lr == "auto" and self.problem.family.curvature_bound is None:
            # No Gram pass: with standardized columns the loss's Jacobi diagonal is ~1 per coordinate times an
            # unknown factor the line search finds; the λ₂/s² of the penalty is known exactly.
            self.P = 1.0 / (1.0 + self.problem.penalty.hess_diag(self.problem.scale))
            self.eta, self.search = 1.0, True
        elif self.opt.lr == "auto":
            cv = curvature(self.obj.hessian_bound())
            self.P = cv.P
            constant = self.problem.family.constant_hessian and not self._proximal
            self.eta = 2.0 / (cv.L + cv.mu) if constant else 1.0 / cv.L
        else:
            self.eta = float(self.opt.lr)
        row = super().start(theta0)
        if self._proximal:
            self.t, self.y_loss, self.restarts = 1.0, row.loss, 0
            row.state = {"y": row.theta.copy(), "y_grad": row.grad.copy()}
        return row

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        self.eta = float(resume["eta"])
        self.search = bool(resume.get("search", False))
        if self._proximal:
            self.t, self.y_loss = float(resume["t"]), float(resume["y_loss"])
            self.restarts = int(resume["restarts"])

    def resume_state(self) -> dict[str, Any]:
        out = {**super().resume_state(), "eta": self.eta, "search": self.search}
        if self._proximal:
            out.update(t=self.t, y_loss=self.y_loss, restarts=self.restarts)
        return out

    def _shrink(self) -> None:
        self.eta /= 2.0  # rejected: retry from the same point with half the step
        if self.eta < 1e-20:
            raise GradpipeError("the line search could not decrease the loss; the data may hold "
                                "extreme values (check `gradpipe runs show`).")

    def step(self) -> Row:
        return self._fista() if self._proximal else self._gradient()

    def _gradient(self) -> Row:
        cur = self.row
        direction = self.P * cur.grad
        gg = float(cur.grad @ direction)
        first = True
        while True:
            theta = cur.theta - self.eta * direction
            loss, grad = self.obj.value_grad(theta)
            if self.opt.lr != "auto" or not math.isfinite(cur.loss) or armijo_ok(loss, cur.loss, -gg, self.eta):
                break
            self._shrink()
            first = False
        self.row = Row(theta, loss, grad, self.eta, {})
        if self.search and first:
            self.eta *= 2.0  # accepted at once: try a longer step next time
        return self.row

    def _fista(self) -> Row:
        cur, pen, scale = self.row, self.problem.penalty, self.problem.scale
        l1 = type(pen)(pen.l1, 0.0)  # the λ₂ part is in f (its gradient is in every row's grad)
        y, gy, Fy = cur.state["y"], cur.state["y_grad"], self.y_loss
        momentum = not np.array_equal(y, cur.theta)
        first = True
        while True:
            step = self.eta * self.P
            theta = l1.prox(y - step * gy, step, scale)
            loss, grad = self.obj.value_grad(theta)
            if self.opt.lr == "auto" and math.isfinite(Fy):
                # f(θ⁺) ≤ f(y) + ∇f(y)ᵀΔ + ‖Δ‖²_{(ηP)⁻¹}/2: the step is within the local curvature.
                delta = theta - y
                f_new, f_y = loss - l1.l1_value(theta, scale), Fy - l1.l1_value(y, scale)
                bound = f_y + float(gy @ delta) + 0.5 * float(delta @ (delta / step))
                if not (math.isfinite(loss) and f_new <= bound + 8 * EPS * max(abs(f_y), abs(Fy))):
                    self._shrink()
                    first = False
                    continue
            if loss > cur.loss and momentum:
                # F went up: drop the momentum and redo the step from θ_k (its gradient is in the row).
                self.restarts += 1
                self.t, y, gy, Fy, momentum = 1.0, cur.theta, cur.grad, cur.loss, False
                continue
            break
        used = self.eta
        if self.search and first:
            self.eta *= 2.0
        if float((y - theta) @ (theta - cur.theta)) > 0:  # the momentum points away from the descent
            self.restarts += 1
            self.t = 1.0
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * self.t * self.t))
        beta = (self.t - 1.0) / t_next
        self.t = t_next
        if beta > 0:
            y_new = theta + beta * (theta - cur.theta)
            self.y_loss, gy_new = self.obj.value_grad(y_new)
        else:
            y_new, self.y_loss, gy_new = theta.copy(), loss, grad.copy()
        self.row = Row(theta, loss, grad, used, {"y": y_new, "y_grad": gy_new})
        return self.row


def smooth_only(cls: type, problem) -> str | None:
    """The momentum-type solvers and SGD take plain gradient steps, which an L1 term has none of."""
    if not problem.penalty.smooth:
        return (f"--solver {cls.name} takes plain gradient steps and cannot handle an L1 penalty (--l1 > 0); "
                f"use --solver gd (proximal gradient), lbfgs (OWL-QN) or newton.")
    return None


def auto_bound(solver: Solver, precondition: bool = True) -> Curvature:
    """The curvature bound's spectrum for ``--lr auto``, or a message naming the solvers that need none."""
    if solver.problem.family.curvature_bound is None:
        raise GradpipeError(no_bound_message(solver.problem))
    return curvature(solver.obj.hessian_bound(), precondition)


class _Optax(Preconditioned):
    """Full-batch gradients through an optax-style optimizer (``pipeline.optim``)."""

    state_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def unsupported(cls, problem) -> str | None:
        return smooth_only(cls, problem)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: (self.n_params,) for k in self.state_fields}

    def _initial_lr(self, grad0: np.ndarray) -> float:
        if self.opt.lr != "auto":
            return float(self.opt.lr)
        cv = auto_bound(self)  # momentum / Nesterov follow the preconditioned gradient
        self.P = cv.P
        return 1.0 / cv.L

    @abstractmethod
    def _build(self) -> optim.Optimizer:
        """The optimizer at the current step size."""

    def start(self, theta0: np.ndarray) -> Row:
        if self.opt.lr == "auto" and self.problem.family.curvature_bound is None:
            raise GradpipeError(no_bound_message(self.problem))  # before the first pass
        row = super().start(theta0)
        self.eta = self._initial_lr(row.grad)
        self.opt_state = self._build().init(theta0)
        row.state = self._state_arrays()
        return row

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in optim.state_to_arrays(self.opt_state).items() if k in self.state_fields}

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        self.eta = float(resume["eta"])
        arrays = {**row.state, "count": np.asarray(resume["count"], dtype=np.int64)}
        self.opt_state = optim.state_from_arrays(self._build(), arrays)

    def resume_state(self) -> dict[str, Any]:
        return {**super().resume_state(), "eta": self.eta, "count": int(self.opt_state.count)}

    def step(self) -> Row:
        cur = self.row
        updates, self.opt_state = self._build().update(self.P * cur.grad, self.opt_state, cur.theta)
        theta = optim.apply_updates(cur.theta, updates)
        loss, grad = self.obj.value_grad(theta)
        self.row = Row(theta, loss, grad, self.eta, self._state_arrays())
        return self.row


class Momentum(_Optax):
    name = "momentum"
    Options = MomentumOptions
    state_fields = ("velocity",)
    nesterov = False

    def _build(self) -> optim.Optimizer:
        return optim.momentum(optim.constant(self.eta), beta=self.opt.beta, nesterov=self.nesterov)


class Nesterov(Momentum):
    name = "nesterov"
    nesterov = True


class Adam(_Optax):
    name = "adam"
    Options = StepOptions
    state_fields = ("mu", "nu")

    def _initial_lr(self, grad0: np.ndarray) -> float:
        if self.opt.lr != "auto":
            return float(self.opt.lr)
        # Adam scales each coordinate itself (no preconditioner): start from the size of a safe GD step.
        L = auto_bound(self, precondition=False).L
        return max(float(np.max(np.abs(grad0))) / L, 1e-8)

    def _build(self) -> optim.Optimizer:
        return optim.adam(optim.constant(self.eta))


@dataclass(frozen=True)
class SGDOptions(StepOptions):
    batch_chunks: int = 1
    schedule: str = "adaptive"
    power_t: float = 0.25
    early_stopping: bool = False
    validation_fraction: float = 0.1
    n_iter_no_change: int = 5
    seed: int = 0


class MiniBatchSGD(Preconditioned):
    """Distributed mini-batch SGD: each step uses ``batch_chunks`` chunks drawn without replacement from
    a per-epoch permutation seeded by (seed, epoch); schedules constant | invscaling | adaptive; optional
    early stopping on held-out chunks. Row t holds θ_t and the mini-batch loss at θ_t."""

    name = "sgd"
    Options = SGDOptions

    @classmethod
    def unsupported(cls, problem) -> str | None:
        return smooth_only(cls, problem)

    def start(self, theta0: np.ndarray) -> Row:
        self._split()
        if self.opt.lr == "auto":
            cv = auto_bound(self)
            self.eta0, self.P = 1.0 / cv.L, cv.P
        else:
            self.eta0 = float(self.opt.lr)
        self.eta, self.epoch, self.cursor, self.t = self.eta0, 0, 0, 0
        self.best, self.no_change, self.epoch_loss, self.epoch_rows = math.inf, 0, 0.0, 0
        self.epoch_stop: str | None = None
        self.batch = self._next_batch()
        loss, grad = self.obj.subset(theta0, self.batch)
        self.row = Row(theta0, loss, grad, 0.0, {})
        return self.row

    def _split(self) -> None:
        """Held-out chunks for early stopping: fixed by the seed and the chunk count."""
        o, n = self.opt, self.obj.n_chunks
        held = math.ceil(o.validation_fraction * n) if o.early_stopping else 0
        if o.early_stopping and held >= n:
            raise GradpipeError(
                f"--early-stopping holds out {held} of the dataset's {n} chunks (--validation-fraction "
                f"{o.validation_fraction:g}), leaving none to train on. Lower --validation-fraction, "
                f"ingest with a smaller --chunk-mb for more chunks, or turn early stopping off.")
        order = np.random.default_rng([o.seed, 2**31]).permutation(n)
        self.valid = sorted(int(i) for i in order[:held])
        self.train = sorted(int(i) for i in order[held:])

    def _permutation(self) -> list[int]:
        rng = np.random.default_rng([self.opt.seed, self.epoch])
        return [self.train[i] for i in rng.permutation(len(self.train))]

    def _next_batch(self) -> list[int]:
        return self._permutation()[self.cursor:self.cursor + self.opt.batch_chunks]

    def resume_state(self) -> dict[str, Any]:
        return {**super().resume_state(), "eta": self.eta, "eta0": self.eta0, "epoch": self.epoch,
                "cursor": self.cursor, "t": self.t, "best": self.best if math.isfinite(self.best) else None,
                "no_change": self.no_change, "epoch_loss": self.epoch_loss, "epoch_rows": self.epoch_rows,
                "batch": self.batch, "stop_reason": self.epoch_stop}

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        for key in ("eta", "eta0", "epoch_loss"):
            setattr(self, key, float(resume[key]))
        for key in ("epoch", "cursor", "t", "no_change", "epoch_rows"):
            setattr(self, key, int(resume[key]))
        self.best = math.inf if resume["best"] is None else float(resume["best"])
        self._split()
        self.batch = resume["batch"]
        self.epoch_stop = resume["stop_reason"]

    def _lr(self) -> float:
        if self.opt.schedule == "invscaling":
            return self.eta0 / (self.t + 1) ** self.opt.power_t
        return self.eta

    def step(self) -> Row:
        cur = self.row
        eta = self._lr()
        theta = cur.theta - eta * (self.P * cur.grad)
        self.t += 1
        self.epoch_loss += cur.loss * len(self.batch)
        self.epoch_rows += len(self.batch)
        self.cursor += self.opt.batch_chunks
        if self.cursor >= len(self.train):
            self._end_epoch(theta)
        self.batch = self._next_batch()
        loss, grad = self.obj.subset(theta, self.batch)
        self.row = Row(theta, loss, grad, eta, {})
        return self.row

    def _end_epoch(self, theta: np.ndarray) -> None:
        """sklearn's rules: an epoch 'improves' if its score beats the best by ``tol``; after
        ``n_iter_no_change`` epochs without improvement, stop (or, with 'adaptive', divide lr by 5)."""
        o = self.opt
        if o.early_stopping:
            score, _ = self.obj.subset(theta, self.valid)
        else:
            score = self.epoch_loss / max(self.epoch_rows, 1)
        self.epoch, self.cursor, self.epoch_loss, self.epoch_rows = self.epoch + 1, 0, 0.0, 0
        margin = o.tol * max(abs(self.best), 1e-300) if math.isfinite(self.best) else 0.0
        improved = not math.isfinite(self.best) or score < self.best - margin
        self.no_change = 0 if improved else self.no_change + 1
        self.best = min(self.best, score)
        if self.no_change >= o.n_iter_no_change:
            if o.schedule == "adaptive" and self.eta > 1e-6 * self.eta0:
                self.eta /= 5.0
                self.no_change = 0
            else:
                self.epoch_stop = "early stopping" if o.early_stopping else \
                    f"no improvement in {o.n_iter_no_change} epochs"

    def stop_reason(self, prev_loss: float | None, row: Row) -> str | None:
        """The gradient rule on the mini-batch gradient, then the epoch rules (a mini-batch loss changes
        from batch to batch, so the relative-change rule does not apply)."""
        return self.gradient_small(row) or self.epoch_stop
