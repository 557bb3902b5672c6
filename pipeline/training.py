"""The training loop: iterate a solver over the cluster, checkpoint every iteration, stop, resume.

Row t of a run is θ_t and L(θ_t). The loop evaluates θ_t (one pass), appends row t to the run store, checks
the stopping rules, then asks the solver for θ_{t+1}. A resumed run restores θ, ∇L and the solver state of
the committed row and continues: its history equals an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client

from pipeline import __version__, losses
from pipeline.checkpoint import CheckpointWriter
from pipeline.config import TrainConfig
from pipeline.engine import ChunkEngine
from pipeline.errors import GradpipeError
from pipeline.solvers import Row, make_solver
from pipeline.store.dataset import open_dataset
from pipeline.store.runs import RunStore

log = logging.getLogger("gradpipe.train")


# ---- kernels shipped to the workers (module level: pickled by reference) ---------------------------
def _sums(X, y, model, theta, mean, scale) -> np.ndarray:
    return losses.chunk_sums(model, X, y, theta, mean, scale)


def _gram(X, y, mean, scale) -> np.ndarray:
    return losses.chunk_gram(X, mean, scale)


def _non_binary(X, y) -> np.ndarray:
    return np.array([np.count_nonzero((y != 0) & (y != 1))], dtype=np.float64)


class ClusterObjective:
    """L(θ) = mean loss + penalty, evaluated by the engine; counts passes over the data."""

    def __init__(self, engine: ChunkEngine, model: str, mean, scale, l2: float):
        self.engine, self.model, self.mean, self.scale, self.l2 = engine, model, mean, scale, l2
        self.n_chunks = len(engine.layout)
        self.n_rows = engine.n_rows
        self.passes = 0.0
        self.hessian: np.ndarray | None = None

    def _finish(self, sums: np.ndarray, theta: np.ndarray) -> tuple[float, np.ndarray]:
        return losses.mean_loss_and_grad(self.model, sums, sums[-1], theta, self.l2, self.scale)

    def full(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        self.passes += 1
        return self._finish(self.engine.map_reduce(_sums, self.model, theta, self.mean, self.scale), theta)

    def subset(self, theta: np.ndarray, positions: list[int]) -> tuple[float, np.ndarray]:
        self.passes += len(positions) / self.n_chunks
        sums = self.engine.map_reduce(_sums, self.model, theta, self.mean, self.scale, positions=positions)
        return self._finish(sums, theta)

    def hessian_bound(self) -> np.ndarray:
        """H ⪰ ∇²L everywhere, from one Gram pass (cached): the Hessian itself for linear, G/4 for logistic,
        plus the penalty's λ/s² on the weights' diagonal."""
        if self.hessian is None:
            self.passes += 1
            gram = self.engine.map_reduce(_gram, self.mean, self.scale) / self.n_rows
            self.hessian = losses.hessian_bound(self.model, gram, self.l2, self.scale)
        return self.hessian


@dataclass
class RunContext:
    """What the loop needs besides the solver: where to write and how to report coefficients."""

    store: RunStore
    run_id: str
    path: Path
    feature_names: list[str]
    mean: np.ndarray | None
    scale: np.ndarray | None


@dataclass
class FitResult:
    run_id: str
    run_uri: str
    status: str
    message: str
    n_iter: int
    loss: float
    coef: np.ndarray
    intercept: float
    feature_names: list[str]
    seconds: float
    seconds_per_iter: float
    passes: float
    checkpoint_seconds: float  # what checkpointing cost the loop (rows are written in the background)
    checkpoint_write_seconds: float  # time the background writer spent writing
    model: str
    loss_history: np.ndarray = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        keys = ("run_id", "run_uri", "status", "message", "n_iter", "loss", "intercept", "feature_names",
                "seconds", "seconds_per_iter", "passes", "checkpoint_seconds", "checkpoint_write_seconds", "model")
        return {**{k: getattr(self, k) for k in keys}, "coef": self.coef.tolist(),
                "passes_per_iter": self.passes_per_iter}

    @property
    def passes_per_iter(self) -> float:
        """Passes over the data per iteration, the start-up passes (θ_0, the Gram matrix) included."""
        return self.passes / max(self.n_iter, 1)


@contextlib.contextmanager
def _stop_signals() -> Iterator[dict[str, int]]:
    """SIGINT/SIGTERM set a flag; the loop finishes the iteration in flight, checkpoints and stops."""
    flag: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def new_run_id(dataset: str) -> str:
    stem = Path(str(dataset).rstrip("/")).name.removesuffix(".zarr") or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _standardization(info, standardize: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not standardize:
        return None, None
    return info.stats.mean, info.stats.scale()


def _engine(client: Client, ds, config: TrainConfig) -> ChunkEngine:
    from pipeline.cluster import tune_latency

    tune_latency(client)
    return ChunkEngine(client, store=ds.path, n_rows=ds.n_rows, chunk_rows=ds.chunk_rows, n_features=ds.n_features,
                       itemsize=np.dtype(ds.dtype).itemsize, persist=config.persist,
                       fan_in=config.fan_in)


def _check_target(engine: ChunkEngine, model: str, ds) -> None:
    if model == "logistic":
        (bad,) = engine.map_reduce(_non_binary)  # counts are sums: they survive the tree
        if bad:
            example, row = _first_non_binary(ds)
            raise GradpipeError(f"--model logistic needs a 0/1 target; column {ds.target!r} holds {int(bad)} other "
                                f"values (e.g. {example:g} in row {row}). Use --model linear or recode the target.")


def _first_non_binary(ds) -> tuple[float, int]:
    """An example for the message, read on the driver chunk by chunk (error path only)."""
    for start in range(0, ds.n_rows, ds.chunk_rows):
        y = ds.y[start:start + ds.chunk_rows].compute(scheduler="sync")
        bad = np.flatnonzero((y != 0) & (y != 1))
        if bad.size:
            return float(y[bad[0]]), start + int(bad[0])
    raise AssertionError("the cluster counted non-0/1 targets that the driver cannot find")


def train(dataset: str | Path, config: TrainConfig | None = None, *, client: Client | None = None,
          runs_dir: str | Path = "data/runs", run_id: str | None = None,
          init: tuple[np.ndarray, float] | None = None,
          on_iteration: Callable[[int, dict[str, Any]], None] | None = None) -> FitResult:
    """Train a model on a dataset store; every iteration is checkpointed to ``runs_dir/run_id.zarr``."""
    config = (config or TrainConfig()).validate()
    if client is None:
        from pipeline.cluster import dask_client

        with dask_client() as c:
            return train(dataset, config, client=c, runs_dir=runs_dir, run_id=run_id, init=init,
                         on_iteration=on_iteration)
    ds = open_dataset(dataset)
    run_id = run_id or new_run_id(ds.path)
    path = Path(runs_dir) / f"{run_id}.zarr"
    mean, scale = _standardization(ds, config.standardize)
    engine = _engine(client, ds, config)
    try:
        _check_target(engine, config.model, ds)
        d = ds.n_features
        objective = ClusterObjective(engine, config.model, mean, scale, config.l2)
        solver = make_solver(config, objective, d + 1)
        theta0 = np.zeros(d + 1) if init is None else losses.from_original(np.asarray(init[0]), init[1],
                                                                           mean, scale)
        store = RunStore.create(path, config=config.to_json(), dataset={
            "uri": ds.path, "fingerprint": ds.fingerprint(), "feature_names": ds.feature_names,
            "target": ds.target, "n_rows": ds.n_rows,
            "mean": None if mean is None else mean.tolist(), "scale": None if scale is None else scale.tolist(),
        }, n_params=d + 1, state_shapes=getattr(solver, "state_shapes", {}), version=__version__)
        t0 = time.perf_counter()
        try:
            row = solver.start(theta0)
        except BaseException:  # a bad setting, an error or Ctrl-C before iteration 0: no run to keep
            shutil.rmtree(path, ignore_errors=True)
            raise
        ctx = RunContext(store, run_id, path, ds.feature_names, mean, scale)
        return _loop(ctx, solver, objective, config, row, 0, None, t0, 0.0, on_iteration)
    finally:
        engine.close()


def resume(run_id: str, *, runs_dir: str | Path = "data/runs", client: Client | None = None,
           max_iter: int | None = None, time_budget: float | None = None,
           on_iteration: Callable[[int, dict[str, Any]], None] | None = None) -> FitResult:
    """Continue a run from its last committed iteration (after a crash, a stop or a budget)."""
    path = Path(runs_dir) / f"{run_id}.zarr"
    store, ds = check_resumable(run_id, runs_dir)
    if client is None:
        from pipeline.cluster import dask_client

        with dask_client() as c:
            return resume(run_id, runs_dir=runs_dir, client=c, max_iter=max_iter, time_budget=time_budget,
                          on_iteration=on_iteration)
    config = TrainConfig.from_json(store.attrs["config"])
    if max_iter is not None:
        config.max_iter = max_iter
    if time_budget is not None:
        config.time_budget = time_budget
    config.validate()
    meta = store.attrs["dataset"]
    t = store.committed
    mean = None if meta["mean"] is None else np.asarray(meta["mean"])
    scale = None if meta["scale"] is None else np.asarray(meta["scale"])
    engine = _engine(client, ds, config)
    try:
        objective = ClusterObjective(engine, config.model, mean, scale, config.l2)
        solver = make_solver(config, objective, ds.n_features + 1)
        state = {k.removeprefix("state/"): store.row(k, t) for k in store.array_names() if k.startswith("state/")}
        row = Row(store.row("theta", t), float(store.row("loss", t)), store.row("grad", t),
                  float(store.row("lr", t)), state)
        resume_state = store.attrs["resume"]
        solver.restore(row, resume_state["solver"])
        objective.passes = float(store.row("passes", t))
        prev = float(store.row("loss", t - 1)) if t > 0 else None
        store.set_status("running")
        ctx = RunContext(store, run_id, path, ds.feature_names, mean, scale)
        return _loop(ctx, solver, objective, config, row, t, prev, time.perf_counter(),
                     float(store.row("elapsed", t)), on_iteration, resumed=True)
    finally:
        engine.close()


def check_resumable(run_id: str, runs_dir: str | Path = "data/runs") -> tuple[RunStore, Any]:
    """The run store and its dataset, or the reason the run cannot continue (checked before any cluster)."""
    store = RunStore.open(Path(runs_dir) / f"{run_id}.zarr", mode="r+")
    meta = store.attrs["dataset"]
    ds = open_dataset(meta["uri"])
    if ds.fingerprint() != meta["fingerprint"]:
        raise GradpipeError(f"dataset {meta['uri']} changed since run {run_id} started (rows were added or "
                            f"replaced); start a new run, e.g. with `gradpipe train --dataset {meta['uri']}`.")
    if store.committed < 0:
        raise GradpipeError(f"run {run_id} has no committed iteration to resume from; start a new run.")
    return store, ds


def _record(row: Row, elapsed: float, passes: float, mean, scale) -> dict[str, Any]:
    coef, intercept = losses.to_original(row.theta, mean, scale)
    rec = {"theta": row.theta, "grad": row.grad, "coef": coef, "intercept": intercept, "loss": row.loss,
           "grad_norm": float(np.linalg.norm(row.grad)), "lr": row.lr, "elapsed": elapsed, "passes": passes}
    rec.update({f"state/{k}": v for k, v in row.state.items()})
    return rec


def _loop(ctx: RunContext, solver, objective: ClusterObjective, config: TrainConfig, row: Row, t: int,
          prev_loss: float | None, t0: float, elapsed0: float, on_iteration, resumed: bool = False) -> FitResult:
    store, mean, scale = ctx.store, ctx.mean, ctx.scale
    pending: list[dict[str, Any]] = []
    steps = 0
    ckpt_seconds = 0.0  # time the loop itself spent handing rows to the checkpoint writer
    loss0 = row.loss if not resumed else float(store.row("loss", 0))
    writer = CheckpointWriter(store)

    def flush(solver_state: dict[str, Any] | None = None) -> None:
        nonlocal ckpt_seconds
        c0 = time.perf_counter()
        writer.submit(pending, {"solver": solver.resume_state() if solver_state is None else solver_state})
        pending.clear()
        ckpt_seconds += time.perf_counter() - c0

    def elapsed() -> float:
        return elapsed0 + time.perf_counter() - t0

    status, message = "running", ""
    with _stop_signals() as stop, contextlib.closing(writer):
        if not resumed:
            rec = _record(row, elapsed(), objective.passes, mean, scale)
            pending.append(rec)
            flush()
            _report(on_iteration, 0, rec)
        while True:
            if "signal" in stop:
                status = "stopped"
                message = f"stopped by signal {signal.Signals(stop['signal']).name} after iteration {t}"
            elif float(np.linalg.norm(row.grad)) <= config.gtol:
                status, message = "converged", f"gradient norm ≤ gtol ({config.gtol:g})"
            elif (prev_loss is not None and config.solver != "sgd"
                  and abs(prev_loss - row.loss) <= config.effective_tol * max(abs(row.loss), 1e-300)):
                status, message = "converged", f"relative loss change ≤ tol ({config.effective_tol:g})"
            elif solver.epoch_converged():
                status, message = "converged", solver.epoch_converged()
            elif t >= config.max_iter:
                status, message = "max_iter", f"reached --max-iter {config.max_iter}"
            elif config.time_budget is not None and elapsed() >= config.time_budget:
                status, message = "time_budget", f"reached --time-budget {config.time_budget:g} s"
            if status != "running":
                break
            it0 = time.perf_counter()
            if steps == 0:
                loop_t0 = it0
            before = solver.resume_state()  # the state of row t, kept if the step diverges
            new = solver.step()
            if not math.isfinite(new.loss) or new.loss > config.diverge_ratio * max(abs(loss0), 1e-12):
                flush(before)
                writer.close()
                store.finalize()
                msg = (f"training diverged at iteration {t + 1} (loss {new.loss:g}, started at {loss0:g}); "
                       f"the last good θ (iteration {t}) is kept. "
                       + (f"Lower --lr (now {config.lr:g}) or use --lr auto." if config.lr != "auto" else
                          "Check the data for extreme values, or try --solver gd."))
                store.set_status("diverged", msg)
                raise GradpipeError(msg)
            prev_loss, row, t, steps = row.loss, new, t + 1, steps + 1
            rec = _record(row, elapsed(), objective.passes, mean, scale)
            pending.append(rec)
            if len(pending) >= config.checkpoint_every:
                flush()
            log.info("iter %d loss %.10g |g| %.3g lr %.3g %.3fs", t, row.loss, rec["grad_norm"], row.lr,
                     time.perf_counter() - it0)
            _report(on_iteration, t, rec)
        loop_seconds = time.perf_counter() - loop_t0 if steps else 0.0
        flush()
    store.finalize()
    store.set_status(status, message)
    seconds = elapsed() - elapsed0
    coef, intercept = losses.to_original(row.theta, mean, scale)
    return FitResult(
        run_id=ctx.run_id, run_uri=str(ctx.path.absolute()), status=status, message=message, n_iter=t,
        loss=row.loss, coef=coef, intercept=intercept, feature_names=ctx.feature_names, seconds=seconds,
        seconds_per_iter=loop_seconds / max(steps, 1), passes=objective.passes, checkpoint_seconds=ckpt_seconds,
        checkpoint_write_seconds=writer.busy_seconds, model=config.model, loss_history=store.column("loss"))


def _report(callback, t: int, rec: dict[str, Any]) -> None:
    if callback is not None:
        callback(t, rec)
