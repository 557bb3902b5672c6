"""Cross-validated tuning of the penalty (and of a first-order learning rate) with passes shared by every fold
and candidate; then one refit on all the data, a normal run (README "Tune it", docs/design.md §3).

The tuners (linear: one pass of per-fold R factors; IRLS families: all models in the same Newton passes;
learning rates: θ columns of gradient descent) are in :mod:`pipeline.tuners`.

The held-out metric is the family's mean deviance (twice the mean loss: ℓ is half the unit deviance for every
family), per fold; ``path.select`` applies the ``min`` or ``1se`` rule. Each outer iteration's state is committed to
the tune store (:mod:`pipeline.store.tunes`) before the next pass, and every pass is bitwise reproducible (the
engine's fixed tree), so a SIGKILL + ``--resume`` ends with bit for bit the result of an uninterrupted tune.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client

from pipeline import __version__, path
from pipeline.config import MODELS, PERSIST, TrainConfig
from pipeline.data_checks import check_magnitudes, check_target
from pipeline.errors import GradpipeError
from pipeline.objective import ClusterObjective
from pipeline.problem import Problem
from pipeline.store import location
from pipeline.store.dataset import open_dataset
from pipeline.store.runs import RunStore, remove_store, run_path, store_exists
from pipeline.store.tunes import TuneStore
from pipeline.tuners import ACTIVE, FAILED, MAX_GRAM_BYTES, Tuner, make_tuner

log = logging.getLogger("gradpipe.tune")


@dataclass
class TuneConfig:
    model: str = "linear"
    power: float = 1.5
    cv: int = 5
    n_alphas: int = 100
    alpha_grid: list[float] | None = None  # explicit α values (sorted high to low); else from α_max
    eps: float | None = None  # α_min/α_max; None: 1e-3 when rows > features, else 1e-2 (glmnet)
    l1_ratios: list[float] = field(default_factory=lambda: [1.0])
    lr_grid: list[float] | None = None
    select: str = "min"
    seed: int = 0
    max_iter: int = 100  # outer iterations (passes) for the IRLS and learning-rate tuners
    tol: float = 1e-12
    l1: float = 0.0  # the penalty of a learning-rate tune (the α path has its own)
    l2: float = 0.0
    standardize: bool = True
    fan_in: int = 8
    persist: str = "auto"
    refit: bool = True

    def validate(self) -> TuneConfig:
        def bad(flag: str, why: str) -> GradpipeError:
            return GradpipeError(f"--{flag}: {why}")

        if self.model not in MODELS:
            raise bad("model", f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}.")
        if self.cv < 2:
            raise bad("cv", f"needs at least 2 folds, not {self.cv}.")
        if self.select not in path.SELECT:
            raise bad("select", f"choose one of {', '.join(path.SELECT)}, not {self.select!r}.")
        if self.n_alphas < 1:
            raise bad("alphas", f"needs at least 1 value, not {self.n_alphas}.")
        if self.alpha_grid is not None:
            self.alpha_grid = sorted((float(a) for a in self.alpha_grid), reverse=True)
            if not self.alpha_grid or min(self.alpha_grid) <= 0:
                raise bad("alpha-grid", "needs positive values.")
        if self.eps is not None and not 0 < self.eps < 1:
            raise bad("eps", f"must be in (0, 1), not {self.eps}.")
        self.l1_ratios = [float(r) for r in self.l1_ratios]
        if not self.l1_ratios or any(not 0 <= r <= 1 for r in self.l1_ratios):
            raise bad("l1-ratio", f"values must be in [0, 1], not {self.l1_ratios}.")
        if self.lr_grid is not None:
            self.lr_grid = [float(v) for v in self.lr_grid]
            if not self.lr_grid or any(not (v > 0 and math.isfinite(v)) for v in self.lr_grid):
                raise bad("lr-grid", f"needs positive learning rates, not {self.lr_grid}.")
            if self.select != "min":
                raise bad("select", "1se orders candidates by penalty strength; with --lr-grid use --select min.")
            if self.alpha_grid is not None:
                raise bad("lr-grid", "tunes the learning rate at one penalty (--l1/--l2); drop --alpha-grid.")
        if self.max_iter < 1:
            raise bad("max-iter", f"must be ≥ 1, not {self.max_iter}.")
        if self.l1 < 0 or self.l2 < 0:
            raise bad("l1" if self.l1 < 0 else "l2", "must be ≥ 0.")
        if self.persist not in PERSIST:
            raise bad("persist", f"must be one of {', '.join(PERSIST)}, not {self.persist!r}.")
        self.train_config()  # the family and power are checked where training checks them
        return self

    def train_config(self, **changes: Any) -> TrainConfig:
        """The settings a fit of this tune runs with (the refit, at the chosen candidate)."""
        base = TrainConfig(model=self.model, power=self.power, standardize=self.standardize, fan_in=self.fan_in,
                           persist=self.persist)
        return dataclasses.replace(base, **changes).validate()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TuneResult:
    tune_id: str
    tune_uri: str
    status: str
    message: str
    kind: str  # "alpha" (the penalty path) or "lr" (learning rates)
    model: str
    select: str  # the rule: min or 1se
    n_folds: int
    l1_ratios: list[float]
    alphas: np.ndarray  # (R, L): the α grid per l1 ratio (kind "alpha")
    lr_grid: list[float] | None
    deviance: np.ndarray  # (R, L, K) or (G, K): held-out mean deviance per candidate and fold
    mean: np.ndarray
    se: np.ndarray
    best: tuple[int, ...]  # index of the chosen candidate
    alpha: float | None
    l1_ratio: float | None
    lr: float | None
    coef_path: np.ndarray = field(repr=False)  # (..., K, d): the fold models in the original feature space
    intercept_path: np.ndarray = field(repr=False)
    feature_names: list[str] = field(default_factory=list)
    passes: float = 0.0  # the tune's passes over the data (the refit's are in ``refit``)
    seconds: float = 0.0
    refit: Any = None  # the FitResult of the refit run
    warnings: list[str] = field(default_factory=list)

    @property
    def total_passes(self) -> float:
        return self.passes + (self.refit.passes if self.refit is not None else 0.0)

    def table(self) -> list[dict[str, Any]]:
        """One row per candidate: the settings, the CV mean and its standard error."""
        rows = []
        for idx in np.ndindex(self.mean.shape):
            row = ({"lr": self.lr_grid[idx[0]]} if self.kind == "lr" else
                   {"l1_ratio": self.l1_ratios[idx[0]], "alpha": float(self.alphas[idx])})
            rows.append({**row, "mean_deviance": float(self.mean[idx]), "se": float(self.se[idx]),
                         "chosen": tuple(idx) == tuple(self.best)})
        return rows

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("tune_id", "tune_uri", "status", "message", "kind", "model", "select",
                                              "n_folds", "l1_ratios", "lr_grid", "alpha", "l1_ratio", "lr",
                                              "passes", "seconds", "warnings", "feature_names")}
        out.update(best=list(self.best), total_passes=self.total_passes, alphas=self.alphas.tolist(),
                   mean=self.mean.tolist(), se=self.se.tolist(), deviance=self.deviance.tolist(),
                   refit=None if self.refit is None else self.refit.to_json())
        return out


# ---- the API ----------------------------------------------------------------------------------------------
def new_tune_id(dataset: str) -> str:
    stem = Path(str(dataset).rstrip("/")).name.removesuffix(".zarr") or "tune"
    return f"{stem}-tune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def tune(dataset: str | Path, config: TuneConfig | None = None, *, client: Client | str | None = None,
         runs_dir: str | Path = "data/runs", tunes_dir: str | Path = "data/tunes",
         tune_id: str | None = None) -> TuneResult:
    """Cross-validate a penalty path (or learning rates) on a dataset store, then refit at the choice; every
    outer iteration is committed to ``tunes_dir/tune_id.zarr``. ``client`` as for ``pipeline.train``."""
    cfg = (config or TuneConfig()).validate()
    if client is None:
        from pipeline.cluster import dask_client

        with dask_client() as c:
            return tune(dataset, cfg, client=c, runs_dir=runs_dir, tunes_dir=tunes_dir, tune_id=tune_id)
    ds = open_dataset(dataset)
    _check_dataset(ds, cfg)
    tune_id = tune_id or new_tune_id(ds.path)
    target = location.join(tunes_dir, f"{tune_id}.zarr")
    if store_exists(target) and _empty(target):
        log.warning("tune store %s holds no iteration (killed before its first): starting it again", target)
        remove_store(target)
    store = TuneStore.create(target, config=cfg.to_json(), version=__version__,
                             dataset={"uri": ds.path, "snapshot": ds.snapshot, "fingerprint": ds.fingerprint(),
                                      "n_rows": ds.n_rows})
    return _run(client, ds, cfg, store, runs_dir, fresh=True)


def _empty(path: str) -> bool:
    try:
        return TuneStore.open(path).committed < 0
    except (GradpipeError, KeyError, ValueError):
        return not store_exists(location.join(path, "zarr.json"))  # killed while its metadata was written


def resume_tune(tune_id: str, *, tunes_dir: str | Path = "data/tunes", runs_dir: str | Path = "data/runs",
                client: Client | str | None = None) -> TuneResult:
    """Continue a tune from its last committed outer iteration (and its refit, if that had started)."""
    store = TuneStore.open(location.join(tunes_dir, f"{tune_id}.zarr"), mode="r+")
    snapshot = store.dataset.get("snapshot")
    ds = open_dataset(f"{store.dataset['uri']}@{snapshot}" if snapshot else store.dataset["uri"])
    if ds.fingerprint() != store.dataset["fingerprint"]:
        raise GradpipeError(f"dataset {store.dataset['uri']} changed since tune {tune_id} started; start a new "
                            f"tune with `gradpipe tune --dataset {store.dataset['uri']}`.")
    cfg = TuneConfig.from_json(store.config).validate()
    if client is None:
        from pipeline.cluster import dask_client

        with dask_client() as c:
            return resume_tune(tune_id, tunes_dir=tunes_dir, runs_dir=runs_dir, client=c)
    return _run(client, ds, cfg, store, runs_dir, fresh=store.committed < 0)


def _check_dataset(ds, cfg: TuneConfig) -> None:
    if ds.has_offset:
        raise GradpipeError("gradpipe tune does not support a dataset with an offset column yet; tune without "
                            "it, or train at chosen settings with `gradpipe train --alpha …`.")
    check_magnitudes(ds)
    family = cfg.train_config().family
    if cfg.lr_grid is None and not family.supports_exact:
        models = cfg.cv * len(cfg.l1_ratios) * (len(cfg.alpha_grid) if cfg.alpha_grid else cfg.n_alphas)
        need = 8 * models * (ds.n_features + 1) ** 2
        if need > MAX_GRAM_BYTES:
            raise GradpipeError(f"a {family.name} tune of {models} models (folds × l1 ratios × α) with "
                                f"{ds.n_features} features needs {need / 2**30:.1f} GiB of Grams per pass; use "
                                f"fewer --alphas, --l1-ratio values or folds (at most {MAX_GRAM_BYTES / 2**30:g} "
                                f"GiB).")


def _run(client, ds, cfg: TuneConfig, store: TuneStore, runs_dir: str | Path, fresh: bool) -> TuneResult:
    from pipeline.training import _engine, problem_for

    t0 = time.perf_counter()
    problem = problem_for(cfg.train_config(l1=cfg.l1, l2=cfg.l2), ds)
    engine = _engine(client, ds, cfg.train_config())
    engine.name = store.tune_id
    try:
        obj = ClusterObjective(engine, problem, weight_sum=ds.weight_sum, weighted_rows=ds.n_weighted_rows,
                               weighted=ds.has_weights, has_offset=ds.has_offset)
        tuner = make_tuner(cfg, problem, obj)
        if fresh:
            try:
                check_target(obj, ds)
                row = tuner.start()
            except BaseException:
                if store.committed < 0:  # nothing to keep: the tune id can start again
                    with contextlib.suppress(OSError):  # the original error is the one to report
                        remove_store(store.uri)
                raise
            if tuner.grid is not None:
                store.set_grid(tuner.grid)
            store.append(row, tuner.resume_state())
        else:
            grid = None if store.grid is None else np.asarray(store.grid)
            tuner.restore(store.row(store.committed), store.resume, grid)
            obj.passes = float(store.resume["passes"])
        while not tuner.done and store.committed < cfg.max_iter:
            row = tuner.step()
            store.append(row, tuner.resume_state())
            log.info("tune %s: outer iteration %d, %.0f passes", store.tune_id, store.committed, obj.passes)
    finally:
        engine.close()
    result = _result(tuner, cfg, store, problem, list(ds.feature_names), obj.passes)
    if cfg.refit:
        result.refit = _refit(ds, cfg, store, result, runs_dir, client)
    result.seconds = time.perf_counter() - t0
    return result


def _result(tuner: Tuner, cfg: TuneConfig, store: TuneStore, problem: Problem, names: list[str],
            passes: float) -> TuneResult:
    thetas, dev, status = tuner.results()
    mean, se = path.fold_summary(dev)
    warnings = []
    if (status == ACTIVE).any():
        warnings.append(f"{int((status == ACTIVE).sum())} of {status.size} fold models did not converge in "
                        f"--max-iter {cfg.max_iter} outer iterations; raise --max-iter.")
    if (status == FAILED).any():
        warnings.append(f"{int((status == FAILED).sum())} fold models could not decrease their loss (left out).")
    if tuner.kind == "lr":
        best = (int(np.argmin(np.where(np.isfinite(mean), mean, np.inf))),)
        if not np.isfinite(mean[best]):
            raise GradpipeError("every --lr-grid candidate diverged; try smaller learning rates.")
        alphas = np.empty((0, 0))
        alpha = l1_ratio = None
        lr = cfg.lr_grid[best[0]]
    else:
        alphas = tuner.grid
        best = path.select(mean, se, alphas, cfg.select)
        alpha, l1_ratio, lr = float(alphas[best]), cfg.l1_ratios[best[0]], None
    coefs = thetas[..., :-1] / problem.scale
    intercepts = thetas[..., -1] - coefs @ problem.mean
    status_word = "done" if not (status == ACTIVE).any() else "max_iter"
    result = TuneResult(tune_id=store.tune_id, tune_uri=store.uri, status=status_word,
                        message=f"{tuner.kind} chosen by {cfg.select}", kind=tuner.kind, model=cfg.model,
                        select=cfg.select, n_folds=cfg.cv, l1_ratios=cfg.l1_ratios, alphas=alphas,
                        lr_grid=cfg.lr_grid, deviance=dev, mean=mean, se=se,
                        best=best, alpha=alpha, l1_ratio=l1_ratio, lr=lr, coef_path=coefs, intercept_path=intercepts,
                        feature_names=names, passes=passes, warnings=warnings)
    store.set_status(status_word, result.message, result={k: v for k, v in result.to_json().items()
                                                          if k not in ("refit", "deviance")})
    return result


def _refit(ds, cfg: TuneConfig, store: TuneStore, result: TuneResult, runs_dir: str | Path, client):
    """The model at the chosen setting on all the data: a normal run, warm-started from the fold models'
    mean, with the tuning record attached."""
    from pipeline.training import check_resumable, resume, train

    if result.kind == "lr":
        config = cfg.train_config(solver="gd", lr=result.lr, l1=cfg.l1, l2=cfg.l2, max_iter=cfg.max_iter)
    else:
        config = cfg.train_config(alpha=result.alpha, l1_ratio=result.l1_ratio)
    run_id = f"{store.tune_id}-refit"
    where = run_path(runs_dir, run_id)
    record = {"tune_id": store.tune_id, "tune_uri": store.uri, "kind": result.kind,
              "select": cfg.select, "cv": cfg.cv, "seed": cfg.seed, "alpha": result.alpha,
              "l1_ratio": result.l1_ratio, "lr": result.lr, "mean_deviance": float(result.mean[result.best]),
              "se": float(result.se[result.best])}
    if store.refit == run_id and store_exists(where) and RunStore.open(where).committed >= 0:
        run = RunStore.open(where)
        if run.status in ("converged", "max_iter", "time_budget"):
            return _finished(run, run_id, ds)
        check_resumable(run_id, runs_dir)
        return resume(run_id, runs_dir=runs_dir, client=client)
    remove_store(where)  # a refit killed before its row 0 (none: nothing to do)
    store.set_status(store.status, store.message, refit=run_id)
    init = (result.coef_path[result.best].mean(axis=0), float(result.intercept_path[result.best].mean()))
    fit = train(ds.ref, config, client=client, runs_dir=runs_dir, run_id=run_id,
                init=None if result.kind == "lr" else init)
    RunStore.open(where, mode="r+").annotate(tuning=record)
    return fit


def _finished(run: RunStore, run_id: str, ds):
    """The FitResult of a refit that had already finished before the tune was resumed."""
    from pipeline.training import FitResult

    t = run.committed
    return FitResult(run_id=run_id, run_uri=location.absolute(run.uri), status=run.status, message=run.message,
                     n_iter=t, loss=float(run.row("loss", t)), coef=run.row("coef", t),
                     intercept=float(run.row("intercept", t)), feature_names=list(ds.feature_names), seconds=0.0,
                     seconds_per_iter=0.0, passes=float(run.row("passes", t)), checkpoint_seconds=0.0,
                     checkpoint_write_seconds=0.0, model=run.model, solver=run.solver,
                     loss_history=run.column("loss"), warnings=run.warnings, inference=run.inference)
