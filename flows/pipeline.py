"""The Prefect flows: ingest, train, tune, evaluate, and the whole pipeline with its quality gate."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.tasks import evaluate_task, ingest_task, publish_task, report_task, train_task, tune_task, warm_start_task
from pipeline.cluster import cluster_address
from pipeline.settings import Settings, load
from pipeline.training import new_run_id
from pipeline.tune import new_tune_id


def _settings(settings: dict[str, Any] | None) -> Settings:
    """The flow's settings: its parameter (storage option values redacted, unless a caller gave real ones,
    which then become this process's) or, without one, the file and environment."""
    if not settings:
        return load()
    s = Settings.from_dict(settings)
    s.apply_storage_options()
    return s


@flow(name="gradpipe-ingest", log_prints=True)
def ingest_flow(settings: dict[str, Any] | None = None) -> dict[str, Any]:
    s = _settings(settings)
    with cluster_address(s.scheduler, s.workers or None, security=s.tls_security()) as address:
        return ingest_task(s.to_dict(), address)


@flow(name="gradpipe-train", log_prints=True)
def train_flow(settings: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
    s = _settings(settings)
    with cluster_address(s.scheduler, s.workers or None, security=s.tls_security()) as address:
        return train_task(s.to_dict(), address, run_id or new_run_id(s.name), None)


@flow(name="gradpipe-tune", log_prints=True)
def tune_flow(settings: dict[str, Any] | None = None, tune_id: str | None = None) -> dict[str, Any]:
    """Ingest new raw files, then cross-validate the penalty on the dataset and refit at the choice (a normal
    run, not evaluated or published here: ``pipeline_flow`` with ``tune`` on does that)."""
    s = _settings(settings)
    with cluster_address(s.scheduler, s.workers or None, security=s.tls_security()) as address:
        ingested = ingest_task(s.to_dict(), address)
        return {"ingest": ingested, **tune_task(s.to_dict(), address, tune_id or new_tune_id(s.name))}


@flow(name="gradpipe-evaluate", log_prints=True)
def evaluate_flow(run_uri: str, settings: dict[str, Any] | None = None) -> dict[str, float]:
    s = _settings(settings)
    with cluster_address(s.scheduler, s.workers or None, security=s.tls_security()) as address:
        return evaluate_task(s.to_dict(), address, run_uri)


@flow(name="gradpipe-pipeline", log_prints=True)
def pipeline_flow(settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ingest new raw files → train (warm-started when the data grew) → evaluate → publish if not worse.

    With ``tune`` on (``GRADPIPE_TUNE=1``): ingest → tune, whose refit at the chosen penalty IS the trained
    run → evaluate → publish → report; the result gains a ``tune`` entry.
    """
    s = _settings(settings)
    log = get_run_logger()
    with cluster_address(s.scheduler, s.workers or None, security=s.tls_security()) as address:
        cfg = s.to_dict()
        ingested = ingest_task(cfg, address)
        tuned = None
        if s.tune:
            warm = None
            tuned = tune_task(cfg, address, new_tune_id(s.name))
            trained = tuned.pop("refit")
        else:
            warm = warm_start_task(cfg)
            if warm:
                log.info("dataset grew: warm start from run %s", warm["run_id"])
            trained = train_task(cfg, address, new_run_id(s.name), warm)
        extra = {"tune": tuned} if s.tune else {}
        if trained["status"] == "stopped":  # Ctrl-C or SIGTERM: the run is resumable, nothing else happens
            log.warning("run %s %s; not evaluated or published", trained["run_id"], trained["message"])
            return {"ingest": ingested, "train": trained, "metrics": None, "publish": None, "loss_curve": None,
                    "warm_start": warm["run_id"] if warm else None, **extra}
        metrics = evaluate_task(cfg, address, trained["run_uri"])
        decision = publish_task(cfg, address, trained["run_uri"], metrics)
        png = report_task(cfg, trained["run_uri"], metrics, decision)
    return {"ingest": ingested, "train": trained, "metrics": metrics, "publish": decision, "loss_curve": png,
            "warm_start": warm["run_id"] if warm else None, **extra}
