"""The training loop: iterate a solver over the cluster, checkpoint every iteration, stop, resume.

Row t of a run is θ_t and L(θ_t). The loop writes row t to the run store, asks the solver whether it has
converged (stopping rules belong to the solver), checks the budgets and signals, then asks the solver for
θ_{t+1}. ``train`` and ``resume`` share one setup (:func:`_fit`); a resumed run restores θ, ∇L and the
solver state of the committed row and continues: its history equals an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from distributed import Client

from pipeline import __version__, inference
from pipeline.checkpoint import CheckpointWriter
from pipeline.config import TrainConfig
from pipeline.data_checks import check_magnitudes, check_target
from pipeline.engine import ChunkEngine
from pipeline.errors import GradpipeError, Interrupted
from pipeline.objective import ClusterObjective
from pipeline.problem import Problem
from pipeline.solvers import Row, Solver, Stalled, make_solver, resolve
from pipeline.store import location
from pipeline.store.dataset import open_dataset
from pipeline.store.runs import DatasetRef, RunStore, remove_store, run_lock, run_path, store_exists

log = logging.getLogger("gradpipe.train")
OnIteration = Callable[[int, dict[str, Any]], None]


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
    solver: str  # the solver that ran (``auto`` resolved)
    loss_history: np.ndarray = field(repr=False)
    warnings: list[str] = field(default_factory=list)
    inference: dict[str, Any] | None = None

    @property
    def converged(self) -> bool:
        """Whether the solver met its tolerance (a budget or a signal ended the run otherwise)."""
        return self.status == "converged"

    def to_json(self) -> dict[str, Any]:
        keys = ("run_id", "run_uri", "status", "message", "n_iter", "loss", "intercept", "feature_names",
                "seconds", "seconds_per_iter", "passes", "checkpoint_seconds", "checkpoint_write_seconds", "model",
                "solver", "warnings", "inference")
        return {**{k: getattr(self, k) for k in keys}, "coef": self.coef.tolist(), "converged": self.converged,
                "passes_per_iter": self.passes_per_iter}

    @property
    def passes_per_iter(self) -> float:
        """Passes over the data per iteration, the start-up passes (θ_0, the Gram matrix) included."""
        return self.passes / max(self.n_iter, 1)


@contextlib.contextmanager
def _stop_signals(run_id: str, runs_dir: str | Path) -> Iterator[dict[str, int]]:
    """The first SIGINT/SIGTERM sets a flag: the loop finishes the iteration in flight, checkpoints and stops.
    A second one raises :class:`Interrupted` at once; the committed rows stay resumable."""
    flag: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    again = f"gradpipe train --resume {run_id} --runs-dir {runs_dir}"

    def handler(signum, _frame):
        if "signal" in flag:
            raise Interrupted(f"run {run_id} interrupted by a second {signal.Signals(signum).name}; "
                              f"its committed iterations are kept; resume with: {again}")
        flag["signal"] = signum
        log.warning("%s: stopping after the iteration in flight (again to stop at once)",
                    signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def new_run_id(dataset: str) -> str:
    stem = Path(str(dataset).rstrip("/")).name.removesuffix(".zarr") or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def problem_for(config: TrainConfig, ds) -> Problem:
    """The problem a config poses on a dataset (the standardization from the ingest statistics)."""
    mean, scale = (ds.stats.mean, ds.stats.scale()) if config.standardize else (None, None)
    return Problem.of(config.family, ds.n_features, l1=config.l1, l2=config.l2, mean=mean, scale=scale,
                      feature_names=ds.feature_names)


INPROCESS = "inprocess"  # ``client=INPROCESS``: no cluster, the passes run in the calling process


def _engine(client: Client | str, ds, config: TrainConfig) -> ChunkEngine:
    if client == INPROCESS:  # same leaves, kernels and tree: the same bits as on a cluster
        from pipeline.inprocess import InProcessEngine

        return InProcessEngine(store=ds.ref, n_rows=ds.n_rows, chunk_rows=ds.chunk_rows,  # type: ignore[return-value]
                               n_features=ds.n_features, itemsize=np.dtype(ds.dtype).itemsize, fan_in=config.fan_in)
    from pipeline.cluster import tune_latency

    tune_latency(client)
    return ChunkEngine(client, store=ds.ref, n_rows=ds.n_rows, chunk_rows=ds.chunk_rows, n_features=ds.n_features,
                       itemsize=np.dtype(ds.dtype).itemsize, persist=config.persist, fan_in=config.fan_in)


@dataclass
class _Start:
    """How a fit begins: a new run (``theta0``) or the committed row of an existing store."""

    run_id: str
    path: str  # the run store's location (a path or a URI)
    theta0: np.ndarray | None = None
    store: RunStore | None = None


def _fit(client: Client, ds, config: TrainConfig, problem: Problem, begin: _Start,
         on_iteration: OnIteration | None) -> FitResult:
    """The setup train and resume share: engine, objective, solver; then the loop."""
    engine = _engine(client, ds, config)
    engine.name = begin.run_id  # the dashboard shows gradpipe-pass-<run id>-<pass>
    try:
        objective = ClusterObjective(engine, problem, weight_sum=ds.weight_sum, weighted_rows=ds.n_weighted_rows,
                                     weighted=ds.has_weights, has_offset=ds.has_offset)
        solver = make_solver(config.solver, config, problem, objective)
        store = begin.store
        if store is None:
            with run_lock(begin.path):  # two new runs with one id: the second is refused, not interleaved
                check_target(objective, ds)
                mean, scale = ((problem.mean.tolist(), problem.scale.tolist()) if config.standardize
                               else (None, None))
                ours = not store_exists(begin.path)  # never remove a store this call did not create
                try:
                    store = RunStore.create(begin.path, config=config.to_json(), solver=solver.name,
                                            dataset=DatasetRef(uri=ds.path, snapshot=ds.snapshot,
                                                               fingerprint=ds.fingerprint(),
                                                               feature_names=ds.feature_names, target=ds.target,
                                                               n_rows=ds.n_rows, mean=mean, scale=scale,
                                                               weight=ds.weight, offset=ds.offset),
                                            n_params=problem.n_params, state_shapes=solver.state_shapes(),
                                            version=__version__)
                    t0 = time.perf_counter()
                    row = solver.start(begin.theta0)
                    for name, value in solver.static_arrays().items():
                        store.write_static(name, value)
                except BaseException:  # a full disk, a bad setting or Ctrl-C before iteration 0: no run to keep
                    if ours:
                        with contextlib.suppress(OSError):
                            remove_store(begin.path)
                    raise
                return _loop(store, begin, solver, objective, config, row, 0, None, t0, 0.0, on_iteration)
        with run_lock(begin.path):  # held for the whole resume: a second --resume of this run is refused
            t = _rewind_to_intact(store)
            state = {k.removeprefix("state/"): store.row(k, t) for k in store.array_names() if k.startswith("state/")}
            row = Row(store.row("theta", t), float(store.row("loss", t)), store.row("grad", t),
                      float(store.row("lr", t)), state)
            solver.load_static(store.statics())
            solver.restore(row, store.resume_state["solver"])
            objective.passes = float(store.row("passes", t))
            prev = float(store.row("loss", t - 1)) if t > 0 else None
            store.set_status("running")
            return _loop(store, begin, solver, objective, config, row, t, prev, time.perf_counter(),
                         float(store.row("elapsed", t)), on_iteration, resumed=True)
    finally:
        engine.close()


def train(dataset: str | Path, config: TrainConfig | None = None, *, client: Client | str | None = None,
          runs_dir: str | Path = "data/runs", run_id: str | None = None,
          init: tuple[np.ndarray, float] | None = None, on_iteration: OnIteration | None = None) -> FitResult:
    """Train a model on a dataset store; every iteration is checkpointed to ``runs_dir/run_id.zarr``.

    ``client``: a Dask client to run the passes on; None starts one (``$DASK_SCHEDULER_ADDRESS`` or a
    LocalCluster); ``"inprocess"`` (:data:`INPROCESS`) runs them in this process, no cluster and no
    subprocess, holding the whole dataset in memory — for data that fits in it; the results are bitwise
    those of a cluster."""
    config = (config or TrainConfig()).validate()
    if run_id is not None:
        check_new_run_id(run_id, runs_dir)
    if client is None:
        from pipeline.cluster import dask_client

        with dask_client() as c:
            return train(dataset, config, client=c, runs_dir=runs_dir, run_id=run_id, init=init,
                         on_iteration=on_iteration)
    ds = open_dataset(dataset)
    check_magnitudes(ds)
    problem = problem_for(config, ds)
    resolve(config.solver, problem)  # a solver that cannot solve this problem fails before any pass
    run_id = run_id or new_run_id(ds.path)
    theta0 = np.zeros(problem.n_params) if init is None else problem.from_original(np.asarray(init[0]), init[1])
    begin = _Start(run_id, run_path(runs_dir, run_id), theta0=theta0)
    return _fit(client, ds, config, problem, begin, on_iteration)


def check_new_run_id(run_id: str, runs_dir: str | Path) -> None:
    """Refuse a run id whose store holds a run (checked before any cluster starts)."""
    path = run_path(runs_dir, run_id)
    if _taken(path):
        raise GradpipeError(f"run store {path} already exists; choose another --run-id or continue it with "
                            f"`gradpipe train --resume {run_id} --runs-dir {runs_dir}`.")


def _taken(path: str) -> bool:
    """Whether a run store holds a run. One killed before its row 0 holds nothing: it is removed, so that the
    run id can start again (``--resume`` has nothing to continue from in it)."""
    if not store_exists(path):
        return False
    try:
        empty = RunStore.open(path).committed < 0
    except Exception:  # noqa: BLE001 - killed while being created: not even its metadata is complete
        empty = not RunStore.has_metadata(path)
    if empty:
        log.warning("run store %s holds no iteration (killed before row 0): starting it again", path)
        remove_store(path)
    return not empty


def resume(run_id: str, *, runs_dir: str | Path = "data/runs", client: Client | str | None = None,
           max_iter: int | None = None, time_budget: float | None = None,
           on_iteration: OnIteration | None = None) -> FitResult:
    """Continue a run from its last committed iteration (after a crash, a stop or a budget); ``client`` as
    for :func:`train` (a run may resume in-process what a cluster started, and the reverse: same bits)."""
    store, ds = check_resumable(run_id, runs_dir)
    if client is None:
        from pipeline.cluster import dask_client

        with dask_client() as c:
            return resume(run_id, runs_dir=runs_dir, client=c, max_iter=max_iter, time_budget=time_budget,
                          on_iteration=on_iteration)
    config = TrainConfig.from_json(store.config)
    config.solver = store.solver  # the solver that ran, even if `auto` would pick another one today
    if max_iter is not None:
        config.max_iter = max_iter
    if time_budget is not None:
        config.time_budget = time_budget
    config.validate()
    mean, scale = store.dataset.arrays()  # the run's own standardization (None: the identity)
    problem = Problem.of(config.family, ds.n_features, l1=config.l1, l2=config.l2, mean=mean, scale=scale,
                         feature_names=ds.feature_names)
    begin = _Start(run_id, run_path(runs_dir, run_id), store=store)
    return _fit(client, ds, config, problem, begin, on_iteration)


def check_resumable(run_id: str, runs_dir: str | Path = "data/runs") -> tuple[RunStore, Any]:
    """The run store and its dataset, or the reason the run cannot continue (checked before any cluster)."""
    store = RunStore.open(run_path(runs_dir, run_id), mode="r+")
    meta = store.dataset
    if meta.snapshot:
        # The run reads exactly the version it started on, whatever was ingested or rolled back since.
        try:
            ds = open_dataset(f"{meta.uri}@{meta.snapshot}")
        except GradpipeError as exc:
            raise GradpipeError(f"run {run_id} trained on snapshot {meta.snapshot} of dataset {meta.uri}, which is "
                                f"not readable now ({exc}); restore it, or start a new run with `gradpipe train "
                                f"--dataset {meta.uri}`.") from None
    else:  # a run from before snapshots: the rows must be the ones it started on
        ds = open_dataset(meta.uri)
        if ds.fingerprint() != meta.fingerprint:
            raise GradpipeError(f"dataset {meta.uri} changed since run {run_id} started (rows were added or "
                                f"replaced); start a new run, e.g. with `gradpipe train --dataset {meta.uri}`.")
    from pipeline.store.runs import run_lock

    with run_lock(store.path):  # refused here, before a cluster starts, if another process trains it
        pass
    if store.committed < 0:
        raise GradpipeError(f"run {run_id} has no committed iteration to resume from (it was stopped before its "
                            f"row 0); start it again: gradpipe train --dataset {meta.uri} --run-id {run_id} "
                            f"--runs-dir {runs_dir}")
    _intact_row(store)
    return store, ds


def _intact_row(store: RunStore) -> tuple[int, str | None]:
    """The last committed row whose data verifies and what damaged the later ones; none is refused: a
    resume from a damaged row (a flipped bit, a deleted chunk read as NaN) silently continues another run."""
    row, why = store.last_intact_row()
    if row < 0:
        raise GradpipeError(f"run {store.run_id} cannot be resumed: no committed row is intact ({why}); start "
                            f"a new run with `gradpipe train --dataset {store.dataset.uri}`.")
    return row, why


def _rewind_to_intact(store: RunStore) -> int:
    """The row a resume restores: the committed one, or the last intact one (the store rewound to it, so
    that the resumed history is rewritten from there, with the solver state logged for that row)."""
    row, why = _intact_row(store)
    if row < store.committed:
        msg = f"run {store.run_id}: rows {row + 1}..{store.committed} are damaged ({why}); resuming from row {row}"
        log.warning("%s", msg)
        store.rewind(row, msg)
    return row


def _record(row: Row, elapsed: float, passes: float, problem: Problem) -> dict[str, Any]:
    coef, intercept = problem.to_original(row.theta)
    # with an L1 term the measure of optimality is the minimum-norm subgradient (‖∇L‖ stays large at a kink)
    grad_norm = float(np.linalg.norm(problem.min_norm_subgradient(row.theta, row.grad)))
    rec = {"theta": row.theta, "grad": row.grad, "coef": coef, "intercept": intercept, "loss": row.loss,
           "grad_norm": grad_norm, "lr": row.lr, "elapsed": elapsed, "passes": passes}
    rec.update({f"state/{k}": v for k, v in row.state.items()})
    return rec


def _inference(solver: Solver, objective: ClusterObjective, row: Row, status: str) -> dict[str, Any]:
    """Inference at the final row: from what the solver holds, else one pass of the family's kind."""
    problem = objective.problem
    if problem.penalty.active:
        return inference.unavailable(inference.NOT_PENALIZED)
    if status != "converged":
        return inference.unavailable(f"no p-values: the run did not converge ({status})")
    info = solver.information()
    if not problem.family.canonical:  # standard errors from the expected information, as statsmodels and glum
        info = objective.newton(row.theta, fisher=True)[3]
    if info is None or (problem.family.information == "qr") != ("R" in info):
        if problem.family.information == "qr":
            info = {"R": objective.r_factor()}
        else:
            _, _, _, info = objective.newton(row.theta)
    if "R" in info:  # the TSQR pass holds no counts: the dataset's
        info = {**info, "n": objective.weight_sum, "rows": objective.weighted_rows}
    info = {**info, "weighted": objective.weighted, "offset": objective.has_offset}
    return inference.summarize(problem, info, row.theta, row.loss, list(problem.feature_names))


def _loop(store: RunStore, begin: _Start, solver: Solver, objective: ClusterObjective, config: TrainConfig,
          row: Row, t: int, prev_loss: float | None, t0: float, elapsed0: float, on_iteration: OnIteration | None,
          resumed: bool = False) -> FitResult:
    problem = objective.problem
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

    status, message, final_state = "running", "", None
    with _stop_signals(begin.run_id, location.parent(begin.path)) as stop, contextlib.closing(writer):
        try:
            if not resumed:
                rec = _record(row, elapsed(), objective.passes, problem)
                pending.append(rec)
                flush()
                _report(on_iteration, 0, rec)
            while True:
                converged = solver.stop_reason(prev_loss, row)
                if "signal" in stop:
                    status = "stopped"
                    message = f"stopped by signal {signal.Signals(stop['signal']).name} after iteration {t}"
                elif converged:
                    status, message = "converged", converged
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
                try:
                    new = solver.step()
                except Stalled as done:  # nothing new: row t stays the last, with its own solver state
                    status, message, final_state = "converged", str(done), before
                    break
                except GradpipeError as failed:  # no step possible (a line search, a Hessian): as divergence
                    flush(before)
                    _diverged(store, writer,
                              f"training stopped at iteration {t + 1}: {failed} The last good θ (iteration {t}) "
                              f"is kept.{_separable_hint(row.loss, loss0, problem)}")
                if not math.isfinite(new.loss) or new.loss > config.diverge_ratio * max(abs(loss0), 1e-12):
                    flush(before)
                    _diverged(store, writer,
                              f"training diverged at iteration {t + 1} (loss {new.loss:g}, started at {loss0:g}); "
                              f"the last good θ (iteration {t}) is kept. "
                              + (f"Lower --lr (now {config.lr:g}) or use --lr auto." if config.lr != "auto" else
                                 "Check the data for extreme values, or try --solver gd."))
                prev_loss, row, t, steps = row.loss, new, t + 1, steps + 1
                rec = _record(row, elapsed(), objective.passes, problem)
                pending.append(rec)
                if len(pending) >= config.checkpoint_every:
                    flush()
                log.info("iter %d loss %.10g |g| %.3g lr %.3g %.3fs", t, row.loss, rec["grad_norm"], row.lr,
                         time.perf_counter() - it0)
                _report(on_iteration, t, rec)
            loop_seconds = time.perf_counter() - loop_t0 if steps else 0.0
            flush(final_state)
        except Interrupted as stop_now:  # the rows handed to the writer are still written (closing waits)
            writer.close()
            store.finalize()
            store.set_status("stopped", stop_now.message, converged=False)
            raise
    store.finalize()
    for w in solver.warnings:
        log.warning("%s", w)
    budget = [_unconverged_warning(status, message, row)] if status in ("max_iter", "time_budget") else []
    warnings = list(dict.fromkeys(store.warnings + solver.warnings + budget))
    stats = _inference(solver, objective, row, status)
    store.set_status(status, message, warnings=warnings, inference=stats, converged=status == "converged")
    seconds = elapsed() - elapsed0
    coef, intercept = problem.to_original(row.theta)
    return FitResult(
        run_id=begin.run_id, run_uri=location.absolute(begin.path), status=status, message=message, n_iter=t,
        loss=row.loss, coef=coef, intercept=intercept, feature_names=list(problem.feature_names), seconds=seconds,
        seconds_per_iter=loop_seconds / max(steps, 1), passes=objective.passes, checkpoint_seconds=ckpt_seconds,
        checkpoint_write_seconds=writer.busy_seconds, model=config.model, solver=solver.name,
        loss_history=store.column("loss"), warnings=warnings, inference=stats)


def _diverged(store: RunStore, writer: CheckpointWriter, message: str) -> NoReturn:
    """End a run that cannot go on (its last good row already handed to the writer): the status says why."""
    writer.close()
    store.finalize()
    store.set_status("diverged", message)
    raise GradpipeError(message)


def _separable_hint(loss: float, loss0: float, problem: Problem) -> str:
    """Why a line search fails with the loss near its floor of 0: a classifier whose classes separate."""
    if problem.penalty.active or loss > 1e-6 * abs(loss0):
        return ""
    return (f" The loss fell to {loss:.3g} from {loss0:.3g}: the classes are likely perfectly separable, so the "
            "unpenalized coefficients grow without bound; add a penalty (e.g. --l2 1e-4).")


def _unconverged_warning(status: str, message: str, row: Row) -> str:
    """The loud line for a run that ran out of budget before its tolerance: what was reached, what to change."""
    change = ("raise --max-iter (or max_iter)" if status == "max_iter" else "raise --time-budget (or time_budget)")
    return (f"NOT CONVERGED: {message} with ‖∇L‖ = {np.linalg.norm(row.grad):.3g} before the tolerance (--tol, "
            f"--gtol) was met; "
            f"{change}, or pick a faster solver (--solver auto/newton/lbfgs). The model is not the optimum; "
            "the quality gate will not publish it unless --allow-unconverged.")


def _report(callback: OnIteration | None, t: int, rec: dict[str, Any]) -> None:
    if callback is not None:
        callback(t, rec)
