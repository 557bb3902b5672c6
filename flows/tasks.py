"""Prefect tasks: thin wrappers that pass URIs and small dicts; the maths runs on the Dask cluster.

Every task takes the flow's ``Settings`` as a dict and the Dask scheduler address, and opens a client of its
own (clients don't pickle; addresses do). ``cache_policy=NO_CACHE``: inputs are small, but hashing them
is pointless, and results must never be reused across runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from pipeline.cluster import dask_client
from pipeline.evaluate import evaluate, load_model
from pipeline.ingest import ingest
from pipeline.problem import to_original
from pipeline.publish import decide, exclusive, latest_completed_run, publish, read_published
from pipeline.report import loss_curve_data_uri, markdown, write_loss_curve
from pipeline.settings import Settings
from pipeline.store import location
from pipeline.store.dataset import read_info
from pipeline.store.runs import RunStore
from pipeline.store.tunes import TuneStore
from pipeline.training import resume, train
from pipeline.tune import TuneConfig, resume_tune, tune
from pipeline.tune_report import tune_markdown, write_cv_curve

# Called as hook(attempt, iteration, record) after every training iteration: monitoring, or fault
# injection in tests (an exception fails the attempt; the retry resumes from the committed iteration).
ITERATION_HOOKS: list[Callable[[int, int, dict[str, Any]], None]] = []


def _exists(uri: str) -> bool:
    """Whether a store exists at a path or URI (the settings' locations may be either)."""
    fs, path = location.filesystem(uri)
    return fs.exists(path)


def _remove(uri: str) -> None:
    """Delete a store that never committed anything, wherever it lives; a missing one is fine."""
    fs, path = location.filesystem(uri)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


@task(cache_policy=NO_CACHE)
def ingest_task(settings: dict[str, Any], address: str) -> dict[str, Any]:
    s = Settings.from_dict(settings)
    log = get_run_logger()
    with dask_client(address, announce=False) as client:
        result = ingest(s.raw, s.dataset, s.target, client, chunk_mb=s.chunk_mb, dtype=s.dtype,
                        on_invalid=s.on_invalid, weight=s.weight or None, offset=s.offset or None)
    log.info("dataset %s: %d rows × %d features; %d new file(s), %d already ingested", result.dataset,
             result.n_rows, result.n_features, len(result.appended_files), len(result.skipped_files))
    return result.to_json()


@task(cache_policy=NO_CACHE)
def warm_start_task(settings: dict[str, Any]) -> dict[str, Any] | None:
    """The latest completed run on this dataset, when the dataset has grown since it ran."""
    s = Settings.from_dict(settings)
    info = read_info(s.dataset)
    prev = latest_completed_run(s.runs_dir, info.path, s.train.model)
    if prev is None or prev.dataset.fingerprint == info.fingerprint():
        return None
    coef, intercept = to_original(prev.row("theta", prev.committed), *prev.dataset.arrays())
    return {"run_id": prev.run_id, "coef": coef.tolist(), "intercept": intercept}


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def train_task(settings: dict[str, Any], address: str, run_id: str, warm: dict[str, Any] | None) -> dict[str, Any]:
    """Train, or — on a retry after a failure — resume the same run from its committed iteration."""
    s = Settings.from_dict(settings)
    log = get_run_logger()
    attempt = task_run.run_count
    path = location.join(s.runs_dir, f"{run_id}.zarr")

    def on_iteration(t: int, rec: dict[str, Any]) -> None:
        if t % 50 == 0:
            log.info("iter %d loss %.10g |g| %.3e lr %.3g %.2fs", t, rec["loss"], rec["grad_norm"], rec["lr"],
                     rec["elapsed"])
        for hook in ITERATION_HOOKS:
            hook(attempt, t, rec)

    with dask_client(address, announce=False) as client:
        log.info("Dask dashboard: %s; run store: %s", client.dashboard_link, path)
        if _exists(path) and RunStore.open(path).committed >= 0:
            log.info("attempt %d: resuming run %s from iteration %d", attempt, run_id, RunStore.open(path).committed)
            result = resume(run_id, runs_dir=s.runs_dir, client=client, on_iteration=on_iteration)
        else:
            _remove(path)  # a store that never committed an iteration holds nothing
            init = (warm["coef"], warm["intercept"]) if warm else None
            result = train(s.dataset, s.train, client=client, runs_dir=s.runs_dir, run_id=run_id, init=init,
                           on_iteration=on_iteration)
    if warm:  # also after a resumed retry: the run started from the warm point either way
        RunStore.open(path, mode="r+").annotate(warm_start=warm["run_id"])
    log.info("run %s: %s after %d iterations, loss %.10g (%s)", run_id, result.status, result.n_iter, result.loss,
             result.message)
    for w in result.warnings:  # NOT CONVERGED and the solvers' warnings, in the flow run's log
        log.warning("%s", w)
    return result.to_json()


def tune_config(s: Settings) -> TuneConfig:
    """The tune the settings ask for: the α path of the training model, ``tune_cv`` folds (seeded by the
    training ``seed``), ``tune_alphas`` values, rule ``tune_select``; the l1 ratio is the training one (lasso
    when it is unset)."""
    t = s.train
    return TuneConfig(model=t.model, power=t.power, cv=s.tune_cv, n_alphas=s.tune_alphas,
                      l1_ratios=[1.0 if t.l1_ratio is None else float(t.l1_ratio)], select=s.tune_select,
                      seed=t.seed, standardize=t.standardize, fan_in=t.fan_in, persist=t.persist, refit=True)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def tune_task(settings: dict[str, Any], address: str, tune_id: str) -> dict[str, Any]:
    """Cross-validate the penalty path on the settings' dataset, refit at the choice (a normal run in the runs
    dir: the flow's trained run), and leave a markdown artifact with the CV curve and table. On a retry after
    a failure, the same tune resumes from its last committed outer iteration (and its refit)."""
    s = Settings.from_dict(settings)
    log = get_run_logger()
    path = location.join(s.tunes_dir, f"{tune_id}.zarr")
    with dask_client(address, announce=False) as client:
        if _exists(path) and TuneStore.open(path).committed >= 0:
            log.info("attempt %d: resuming tune %s", task_run.run_count, tune_id)
            result = resume_tune(tune_id, tunes_dir=s.tunes_dir, runs_dir=s.runs_dir, client=client)
        else:
            _remove(path)  # a tune that never committed an iteration holds nothing
            result = tune(s.dataset, tune_config(s), client=client, runs_dir=s.runs_dir, tunes_dir=s.tunes_dir,
                          tune_id=tune_id)
    refit = result.refit
    chosen = f"lr {result.lr:.6g}" if result.kind == "lr" else f"alpha {result.alpha:.6g} l1_ratio {result.l1_ratio:g}"
    log.info("tune %s: %s by %s over %d folds, %g passes (%g with the refit); refit run %s %s", tune_id, chosen,
             result.select, result.n_folds, result.passes, result.total_passes, refit.run_id, refit.status)
    for w in [*result.warnings, *refit.warnings]:
        log.warning("%s", w)
    png = write_cv_curve(result)
    text = (tune_markdown(result)
            + f"\n\n## CV curve\n\n![CV curve]({loss_curve_data_uri(png)})\n\n(also saved as `{png}`)\n")
    create_markdown_artifact(key=f"gradpipe-tune-{_slug(s.name)}", markdown=text, description=f"tune {tune_id}")
    return {"tune_id": result.tune_id, "tune_uri": result.tune_uri, "kind": result.kind, "select": result.select,
            "cv": result.n_folds, "alpha": result.alpha, "l1_ratio": result.l1_ratio, "lr": result.lr,
            "mean_deviance": float(result.mean[tuple(result.best)]), "se": float(result.se[tuple(result.best)]),
            "passes": result.passes, "total_passes": result.total_passes, "run_id": refit.run_id,
            "run_uri": refit.run_uri, "png": str(png), "warnings": list(result.warnings), "refit": refit.to_json()}


@task(cache_policy=NO_CACHE)
def evaluate_task(settings: dict[str, Any], address: str, run_uri: str) -> dict[str, float]:
    s = Settings.from_dict(settings)
    with dask_client(address, announce=False) as client:
        metrics = evaluate(run_uri, s.dataset, client)
    get_run_logger().info("metrics of %s: %s", location.name(run_uri), metrics)
    return metrics


@task(cache_policy=NO_CACHE)
def publish_task(settings: dict[str, Any], address: str, run_uri: str, metrics: dict[str, float]) -> dict[str, Any]:
    """Quality gate: re-evaluate the published model on today's data; publish the new one if not worse."""
    s = Settings.from_dict(settings)
    log = get_run_logger()
    with exclusive(s.models_dir):
        published = read_published(s.models_dir)
        old_metrics, old_run = None, None
        if published is not None:
            old_run = published["run_id"]
            old_path = location.join(s.runs_dir, f"{old_run}.zarr")
            if _exists(old_path):
                with dask_client(address, announce=False) as client:
                    old_metrics = evaluate(old_path, s.dataset, client)
            else:
                old_metrics = published["metrics"]
        store = RunStore.open(run_uri, mode="r+")
        decision = decide(s.train.model, metrics, old_metrics, old_run, s.publish_tolerance,
                          converged=store.converged, allow_unconverged=s.allow_unconverged)
        (log.info if decision.publish else log.warning)("publish %s: %s", "yes" if decision.publish else "no",
                                                        decision.reason)
        store.annotate(metrics=metrics, publish=decision.to_json())
        if decision.publish:
            target = publish(s.models_dir, load_model(run_uri), metrics)
            log.info("published %s", target)
    return decision.to_json()


@task(cache_policy=NO_CACHE)
def report_task(settings: dict[str, Any], run_uri: str, metrics: dict[str, float],
                decision: dict[str, Any] | None) -> str:
    """A markdown artifact (metrics, sampled loss table, loss curve); the PNG is also kept in the run store.

    The curve is inlined as a ``data:image/png;base64`` URI, so the Prefect UI shows the picture wherever
    it runs (a local path means nothing to a browser on another machine); it is a few tens of KB.
    """
    s = Settings.from_dict(settings)
    store = RunStore.open(run_uri)
    run_id = location.name(run_uri).removesuffix(".zarr")
    png = write_loss_curve(run_uri)
    text = (markdown(store, run_id, metrics, decision)
            + f"\n\n## Loss curve\n\n![loss curve]({loss_curve_data_uri(png)})\n\n(also saved as `{png}`)\n")
    create_markdown_artifact(key=f"gradpipe-{_slug(s.name)}", markdown=text, description=f"run {run_id}")
    return str(png)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "run"
