"""Solvers: how θ moves from one iteration to the next, given an objective evaluated on the cluster.

Each solver is a small state machine: ``start`` evaluates θ_0, ``step`` returns the next accepted
iterate's row. Everything a solver needs to continue is in its rows (θ, ∇L, optimizer state arrays) plus
``resume_state()`` (a few JSON numbers), so a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline import optim
from pipeline.errors import GradpipeError

ARMIJO_C = 1e-4
EPS = np.finfo(np.float64).eps


class Objective(Protocol):
    n_chunks: int
    passes: float

    def full(self, theta: np.ndarray) -> tuple[float, np.ndarray]: ...
    def subset(self, theta: np.ndarray, positions: list[int]) -> tuple[float, np.ndarray]: ...
    def hessian_bound(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Curvature:
    L: float  # largest eigenvalue of P^½ H P^½
    mu: float  # smallest (≥ 0)
    P: np.ndarray  # per-coordinate step scale: the step is -η·P⊙∇L


def curvature(H: np.ndarray, precondition: bool = True) -> Curvature:
    """Extreme eigenvalues of the Hessian bound ``H``, after a Jacobi preconditioner ``P = 1/diag(H)``.

    Why the preconditioner: the L2 penalty acts on original-space weights, so a feature of scale s adds λ/s²
    to its diagonal of H. One global step must then follow the stiffest coordinate while the others crawl
    (measured: ridge λ=0.1 with a feature of scale 6e-3 was still at loss 8.5e8 after 3000 iterations, the
    optimum being 0.84). With P every diagonal entry of the scaled H is 1, so a step from its spectrum needs
    no tuning whatever the penalty and the feature scales, standardized or not. Coordinates with no
    curvature (a constant feature, unpenalized) keep P = 1.
    """
    diag = np.diag(H)
    P = np.where(diag > 0, 1.0 / np.where(diag > 0, diag, 1.0), 1.0) if precondition else np.ones(len(diag))
    r = np.sqrt(P)
    eig = np.linalg.eigvalsh(H * np.outer(r, r))
    return Curvature(float(eig[-1]), max(float(eig[0]), 0.0), P)


@dataclass
class Row:
    theta: np.ndarray
    loss: float
    grad: np.ndarray
    lr: float
    state: dict[str, np.ndarray]


class Solver(ABC):
    name = "base"
    state_shapes: dict[str, tuple[int, ...]] = {}

    def __init__(self, config: Any, objective: Objective, n_params: int):
        self.cfg, self.obj, self.n_params = config, objective, n_params
        self.row: Row | None = None
        self.P = np.ones(n_params)  # the --lr auto preconditioner (see ``curvature``); ones: plain steps

    def start(self, theta0: np.ndarray) -> Row:
        loss, grad = self.obj.full(theta0)
        self.row = Row(theta0, loss, grad, 0.0, self.initial_state())
        return self.row

    def initial_state(self) -> dict[str, np.ndarray]:
        return {}

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        self.row = row
        saved = resume.get("precond")
        self.P = np.ones(self.n_params) if saved is None else np.asarray(saved, dtype=np.float64)

    def resume_state(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def step(self) -> Row:
        """Advance to the next accepted iterate and return its row."""

    def epoch_converged(self) -> str | None:
        """A stop reason decided by the solver itself (SGD's epoch rules), else None."""
        return None


class GradientDescent(Solver):
    """Full-batch GD. ``lr='auto'``: a Jacobi-preconditioned step from the exact spectrum of the Hessian
    bound (one Gram pass at start, see ``curvature``), kept safe by an Armijo test on the loss that the next
    gradient's pass computes anyway — a rejected step costs one extra pass, which ``passes`` reports.
    A fixed ``--lr`` is plain GD, θ ← θ − η∇L."""

    name = "gd"

    def start(self, theta0: np.ndarray) -> Row:
        if self.cfg.lr == "auto":
            cv = curvature(self.obj.hessian_bound())
            self.P = cv.P
            self.eta = 2.0 / (cv.L + cv.mu) if self.cfg.model == "linear" else 1.0 / cv.L
        else:
            self.eta = float(self.cfg.lr)
        return super().start(theta0)

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        self.eta = float(resume["eta"])

    def resume_state(self) -> dict[str, Any]:
        return {"eta": self.eta, "precond": self.P.tolist()}

    def step(self) -> Row:
        cur = self.row
        direction = self.P * cur.grad
        gg = float(cur.grad @ direction)
        while True:
            theta = cur.theta - self.eta * direction
            loss, grad = self.obj.full(theta)
            if self.cfg.lr != "auto" or not math.isfinite(cur.loss):
                break
            if loss <= cur.loss - ARMIJO_C * self.eta * gg + 8 * EPS * abs(cur.loss):
                break
            self.eta /= 2.0  # rejected: retry from the same point with half the step
            if self.eta < 1e-20:
                raise GradpipeError("the line search could not decrease the loss; the data may hold "
                                    "extreme values (check `gradpipe runs show`).")
        self.row = Row(theta, loss, grad, self.eta, {})
        return self.row


class FirstOrder(Solver):
    """Full-batch gradients with an optax-style optimizer (momentum, Nesterov, Adam)."""

    def __init__(self, config: Any, objective: Objective, n_params: int):
        super().__init__(config, objective, n_params)
        self.state_shapes = {"velocity": (n_params,)} if config.solver in ("momentum", "nesterov") else \
            {"mu": (n_params,), "nu": (n_params,)}

    def start(self, theta0: np.ndarray) -> Row:
        row = super().start(theta0)
        self.eta = self._initial_lr(row.grad)
        self._build()
        self.opt_state = self.opt.init(theta0)
        row.state = self.initial_state()
        return row

    def _initial_lr(self, grad0: np.ndarray) -> float:
        if self.cfg.lr != "auto":
            return float(self.cfg.lr)
        if self.cfg.solver == "adam":
            # Adam scales each coordinate itself (no preconditioner): start from the size of a safe GD step.
            L = curvature(self.obj.hessian_bound(), precondition=False).L
            return max(float(np.max(np.abs(grad0))) / L, 1e-8)
        cv = curvature(self.obj.hessian_bound())  # momentum / Nesterov follow the preconditioned gradient
        self.P = cv.P
        return 1.0 / cv.L

    def _build(self) -> None:
        if self.cfg.solver == "adam":
            self.opt = optim.adam(optim.constant(self.eta))
        else:
            self.opt = optim.momentum(optim.constant(self.eta), beta=self.cfg.beta,
                                      nesterov=self.cfg.solver == "nesterov")

    def initial_state(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "opt_state"):
            return {}
        return {k: v for k, v in optim.state_to_arrays(self.opt_state).items() if k in self.state_shapes}

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        self.eta = float(resume["eta"])
        self._build()
        arrays = {**row.state, "count": np.asarray(resume["count"], dtype=np.int64)}
        self.opt_state = optim.state_from_arrays(self.opt, arrays)

    def resume_state(self) -> dict[str, Any]:
        return {"eta": self.eta, "count": int(self.opt_state.count), "precond": self.P.tolist()}

    def step(self) -> Row:
        cur = self.row
        updates, self.opt_state = self.opt.update(self.P * cur.grad, self.opt_state, cur.theta)
        theta = optim.apply_updates(cur.theta, updates)
        loss, grad = self.obj.full(theta)
        self.row = Row(theta, loss, grad, self.eta, self.initial_state())
        return self.row


class MiniBatchSGD(Solver):
    """Distributed mini-batch SGD: each step uses ``batch_chunks`` chunks drawn without replacement from
    a per-epoch permutation seeded by (seed, epoch); schedules constant | invscaling | adaptive; optional
    early stopping on held-out chunks. Row t holds θ_t and the mini-batch loss at θ_t."""

    name = "sgd"

    def start(self, theta0: np.ndarray) -> Row:
        self._split()
        if self.cfg.lr == "auto":
            cv = curvature(self.obj.hessian_bound())
            self.eta0, self.P = 1.0 / cv.L, cv.P
        else:
            self.eta0 = float(self.cfg.lr)
        self.eta, self.epoch, self.cursor, self.t = self.eta0, 0, 0, 0
        self.best, self.no_change, self.epoch_loss, self.epoch_rows = math.inf, 0, 0.0, 0
        self.stop_reason: str | None = None
        self.batch = self._next_batch()
        loss, grad = self.obj.subset(theta0, self.batch)
        self.row = Row(theta0, loss, grad, 0.0, {})
        return self.row

    def _split(self) -> None:
        """Held-out chunks for early stopping: fixed by the seed and the chunk count."""
        n = self.obj.n_chunks
        held = math.ceil(self.cfg.validation_fraction * n) if self.cfg.early_stopping else 0
        if self.cfg.early_stopping and held >= n:
            raise GradpipeError(
                f"--early-stopping holds out {held} of the dataset's {n} chunks (--validation-fraction "
                f"{self.cfg.validation_fraction:g}), leaving none to train on. Lower --validation-fraction, "
                f"ingest with a smaller --chunk-mb for more chunks, or turn early stopping off.")
        order = np.random.default_rng([self.cfg.seed, 2**31]).permutation(n)
        self.valid = sorted(int(i) for i in order[:held])
        self.train = sorted(int(i) for i in order[held:])

    def _permutation(self) -> list[int]:
        rng = np.random.default_rng([self.cfg.seed, self.epoch])
        return [self.train[i] for i in rng.permutation(len(self.train))]

    def _next_batch(self) -> list[int]:
        return self._permutation()[self.cursor:self.cursor + self.cfg.batch_chunks]

    def resume_state(self) -> dict[str, Any]:
        return {"eta": self.eta, "eta0": self.eta0, "epoch": self.epoch, "cursor": self.cursor, "t": self.t,
                "best": self.best if math.isfinite(self.best) else None, "no_change": self.no_change,
                "epoch_loss": self.epoch_loss, "epoch_rows": self.epoch_rows, "batch": self.batch,
                "stop_reason": self.stop_reason, "precond": self.P.tolist()}

    def restore(self, row: Row, resume: dict[str, Any]) -> None:
        super().restore(row, resume)
        for key in ("eta", "eta0", "epoch_loss"):
            setattr(self, key, float(resume[key]))
        for key in ("epoch", "cursor", "t", "no_change", "epoch_rows"):
            setattr(self, key, int(resume[key]))
        self.best = math.inf if resume["best"] is None else float(resume["best"])
        self._split()
        self.batch = resume["batch"]
        self.stop_reason = resume["stop_reason"]

    def _lr(self) -> float:
        if self.cfg.schedule == "invscaling":
            return self.eta0 / (self.t + 1) ** self.cfg.power_t
        return self.eta

    def step(self) -> Row:
        cur = self.row
        eta = self._lr()
        theta = cur.theta - eta * (self.P * cur.grad)
        self.t += 1
        self.epoch_loss += cur.loss * len(self.batch)
        self.epoch_rows += len(self.batch)
        self.cursor += self.cfg.batch_chunks
        if self.cursor >= len(self.train):
            self._end_epoch(theta)
        self.batch = self._next_batch()
        loss, grad = self.obj.subset(theta, self.batch)
        self.row = Row(theta, loss, grad, eta, {})
        return self.row

    def _end_epoch(self, theta: np.ndarray) -> None:
        """sklearn's rules: an epoch 'improves' if its score beats the best by ``tol``; after
        ``n_iter_no_change`` epochs without improvement, stop (or, with 'adaptive', divide lr by 5)."""
        if self.cfg.early_stopping:
            score, _ = self.obj.subset(theta, self.valid)
        else:
            score = self.epoch_loss / max(self.epoch_rows, 1)
        self.epoch, self.cursor, self.epoch_loss, self.epoch_rows = self.epoch + 1, 0, 0.0, 0
        margin = self.cfg.effective_tol * max(abs(self.best), 1e-300) if math.isfinite(self.best) else 0.0
        improved = not math.isfinite(self.best) or score < self.best - margin
        if improved:
            self.no_change = 0
        else:
            self.no_change += 1
        self.best = min(self.best, score)
        if self.no_change >= self.cfg.n_iter_no_change:
            if self.cfg.schedule == "adaptive" and self.eta > 1e-6 * self.eta0:
                self.eta /= 5.0
                self.no_change = 0
            else:
                self.stop_reason = "early stopping" if self.cfg.early_stopping else \
                    f"no improvement in {self.cfg.n_iter_no_change} epochs"

    def epoch_converged(self) -> str | None:
        return self.stop_reason


def make_solver(config: Any, objective: Objective, n_params: int) -> Solver:
    if config.solver == "gd":
        return GradientDescent(config, objective, n_params)
    if config.solver == "sgd":
        return MiniBatchSGD(config, objective, n_params)
    return FirstOrder(config, objective, n_params)


SOLVERS = ("gd", "sgd", "momentum", "nesterov", "adam")
