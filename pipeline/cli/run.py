"""``gradpipe run`` (the whole Prefect pipeline once) and ``gradpipe serve`` (its scheduled deployment)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.cli._common import positive_int
from pipeline.config import MODELS, SOLVERS


def _prefect_defaults() -> None:
    """Prefect's temporary server takes 15–25 s to start on a small machine: wait longer than its 20 s."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _settings_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML settings file (see gradpipe.example.toml)")
    p.add_argument("--name", help="pipeline name: dataset data/datasets/NAME.zarr, models data/models/NAME")
    p.add_argument("--raw", action="append", help="raw files, directories or globs (repeatable)")
    p.add_argument("--target", help="target column")
    p.add_argument("--data-dir", help="root of datasets/, runs/ and models/ (default data)")
    p.add_argument("--scheduler", help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS or local)")
    p.add_argument("--workers", type=positive_int, help="workers of the local cluster")
    p.add_argument("--model", choices=MODELS, help="linear or logistic (default: the settings' model, linear)")
    p.add_argument("--solver", choices=SOLVERS, help="training solver (default auto: see README, Solvers)")
    p.add_argument("--max-iter", type=int, help="most training iterations (default: the settings')")
    p.add_argument("--allow-unconverged", action="store_true", default=None,
                   help="let the quality gate publish a run that ended on its iteration or time budget "
                        "(refused by default)")


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[parent], help="run the Prefect pipeline once: ingest → train → evaluate → "
                                                     "publish", description="Runs pipeline_flow once. Without "
                       "PREFECT_API_URL, Prefect starts a temporary local server for the run.")
    _settings_options(p)
    p.add_argument("--json", action="store_true", help="print the flow's result as JSON")
    p.set_defaults(func=run)

    s = sub.add_parser("serve", parents=[parent], help="serve the scheduled pipeline deployment (needs a Prefect "
                                                       "server: PREFECT_API_URL)")
    _settings_options(s)
    when = s.add_mutually_exclusive_group()
    when.add_argument("--cron", help="cron schedule (default: hourly, '0 * * * *')")
    when.add_argument("--interval", type=float, help="run every this many seconds")
    s.add_argument("--deployment", default="scheduled", help="deployment name (default 'scheduled')")
    s.set_defaults(func=serve)


def _load(args: argparse.Namespace):
    from pipeline.settings import load

    overrides = {k: getattr(args, k) for k in ("name", "raw", "target", "data_dir", "scheduler", "workers", "model",
                                                 "solver", "max_iter", "allow_unconverged")}
    return load(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    settings = _load(args)
    _prefect_defaults()
    from flows.pipeline import pipeline_flow
    from pipeline.prefect_local import temporary_prefect_server

    with temporary_prefect_server():
        result = pipeline_flow(settings.to_dict())
    train = result["train"]
    if args.json:
        print(json.dumps(result, default=str))
    if train["status"] == "stopped":
        print(f"run {train['run_id']} {train['message']}; not evaluated or published. Resume with: gradpipe train "
              f"--resume {train['run_id']} --runs-dir {settings.runs_dir}", file=sys.stderr)
        return 130
    if args.json:
        return 0
    decision = result["publish"]
    print(f"ingest: {result['ingest']['n_rows']} rows × {result['ingest']['n_features']} features in "
          f"{result['ingest']['dataset']} ({len(result['ingest']['appended_files'])} new file(s))")
    warm = f", warm-started from {result['warm_start']}" if result["warm_start"] else ""
    print(f"train:  run {train['run_id']}: {train['solver']} {train['status']} after {train['n_iter']} "
          f"iterations{warm}; loss {train['loss']:.10g}; {train['passes']:g} passes, {train['seconds']:.2f} s")
    print("model:  intercept {:.6g}; ".format(train["intercept"]) +
          ", ".join(f"{n} {c:.4g}" for n, c in zip(train["feature_names"], train["coef"], strict=True)))
    print("eval:   " + ", ".join(f"{k} {v:.6g}" for k, v in result["metrics"].items() if isinstance(v, float)))
    print(f"publish: {'yes' if decision['publish'] else 'no'} — {decision['reason']}")
    print(f"run store: {train['run_uri']} (loss curve: {result['loss_curve']})")
    return 0


def serve(args: argparse.Namespace) -> int:
    from pipeline.errors import GradpipeError

    if not os.environ.get("PREFECT_API_URL"):
        raise GradpipeError("gradpipe serve needs a Prefect server: set PREFECT_API_URL (e.g. "
                            "http://127.0.0.1:4200/api). Prefect's temporary server never runs schedules.")
    settings = _load(args)
    _prefect_defaults()
    from flows.pipeline import pipeline_flow

    schedule = {"interval": args.interval} if args.interval else {"cron": args.cron or "0 * * * *"}
    print(f"serving deployment gradpipe-pipeline/{args.deployment} {schedule} against "
          f"{os.environ['PREFECT_API_URL']}", file=sys.stderr, flush=True)
    # limit=1: a run that overruns its interval delays the next one instead of racing it over the same
    # dataset (prefect.yaml says the same with concurrency_limit: 1)
    pipeline_flow.serve(name=args.deployment, parameters={"settings": settings.to_dict()}, limit=1, **schedule)
    return 0
