"""``gradpipe stack up|down|status``: the docker-compose services as local processes (see ``pipeline.stack``)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline.config import MODELS, SOLVERS

DEFAULT_DIR = "data/stack"


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("stack", parents=[parent], help="run the docker-compose topology as local processes "
                                                       "(no Docker needed)",
                       description="Dask scheduler + workers, a Prefect server and `gradpipe serve`, all on "
                                   "127.0.0.1, as background processes recorded in DIR/stack.json.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    u = actions.add_parser("up", parents=[parent], help="start the stack and wait until every part is ready",
                           description="Starts `dask scheduler`, N `dask worker`s (one thread each), `prefect "
                           "server start` and `gradpipe serve`, waits for each (scheduler with N workers, "
                           "/api/health, the served deployment), then prints the URLs and the variables to "
                           "export. If a part fails, what was started is stopped, its log tail is printed, "
                           "and the exit code is 2.")
    _dir(u)
    u.add_argument("--scheduler-port", type=int, default=0, help="Dask scheduler port (default: a free one)")
    u.add_argument("--dashboard-port", type=int, default=0, help="Dask dashboard port (default: a free one)")
    u.add_argument("--prefect-port", type=int, default=0, help="Prefect server port (default: a free one)")
    u.add_argument("--workers", type=int, default=2, help="Dask workers, one thread each (default 2)")
    u.add_argument("--worker-memory", metavar="LIMIT", help="each worker's --memory-limit (default: Dask's auto)")
    u.add_argument("--timeout", type=float, default=180.0,
                   help="seconds each part may take to become ready (default 180)")
    u.add_argument("--tls", action="store_true",
                   help="encrypt and authenticate Dask traffic: a throw-away CA and certificate in DIR/tls "
                        "(keys mode 0600), tls:// addresses; prints the GRADPIPE_TLS_* variables to export")
    u.add_argument("--json", action="store_true", help="print the stack's state as JSON")
    g = u.add_argument_group("gradpipe serve", "the scheduled deployment the stack serves")
    g.add_argument("--no-serve", dest="serve", action="store_false", help="do not start `gradpipe serve`")
    when = g.add_mutually_exclusive_group()
    when.add_argument("--serve-cron", metavar="CRON", help="its cron schedule (default hourly, '0 * * * *')")
    when.add_argument("--serve-interval", type=float, metavar="SECONDS", help="run every this many seconds")
    g.add_argument("--deployment", default="scheduled", help="deployment name (default 'scheduled')")
    g.add_argument("--config", help="TOML settings file for the served pipeline")
    g.add_argument("--name", help="pipeline name")
    g.add_argument("--raw", action="append", help="raw files, directories or globs (repeatable)")
    g.add_argument("--target", help="target column")
    g.add_argument("--data-dir", help="root of datasets/, runs/ and models/")
    g.add_argument("--model", choices=MODELS)
    g.add_argument("--solver", choices=SOLVERS)
    g.add_argument("--max-iter", type=int)
    u.set_defaults(func=cmd_up)

    d = actions.add_parser("down", parents=[parent], help="stop the stack (SIGTERM, then SIGKILL); idempotent")
    _dir(d)
    d.add_argument("--timeout", type=float, default=30.0, help="seconds before SIGKILL (default 30)")
    d.set_defaults(func=cmd_down)

    s = actions.add_parser("status", parents=[parent], help="what runs; exit 0 only when all of it does")
    _dir(s)
    s.add_argument("--json", action="store_true", help="print the state and live checks as JSON")
    s.set_defaults(func=cmd_status)


def _dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"stack directory: state, logs, Prefect home "
                                                      f"(default {DEFAULT_DIR})")


def _serve_settings(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag in ("config", "name", "target", "data_dir", "model", "solver", "max_iter"):
        value = getattr(args, flag)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    for raw in args.raw or []:
        out += ["--raw", raw]
    return out


def cmd_up(args: argparse.Namespace) -> int:
    from pipeline.stack import StackOptions, up

    opts = StackOptions(dir=args.dir, scheduler_port=args.scheduler_port, dashboard_port=args.dashboard_port,
                        prefect_port=args.prefect_port, workers=args.workers, worker_memory=args.worker_memory,
                        serve=args.serve, deployment=args.deployment, cron=args.serve_cron,
                        interval=args.serve_interval, serve_settings=_serve_settings(args), timeout=args.timeout,
                        tls=args.tls)
    state = up(opts)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(state), indent=2))
        return 0
    ready = {c.name: c.ready_s for c in state.components}
    workers = [c for c in state.components if c.name.startswith("worker-")]
    print(f"stack up in {state.ready_s:.1f} s (state {state.dir}/stack.json, logs {state.dir}/logs/)")
    print(f"  dask scheduler  {state.scheduler_address}   ready in {ready['scheduler']:.1f} s")
    print(f"  dask workers    {len(workers)} × 1 thread            ready in "
          f"{max(c.ready_s or 0 for c in workers):.1f} s")
    print(f"  dashboard       {state.dashboard_url}")
    print(f"  prefect UI      {state.prefect_url}   ready in {ready['prefect-server']:.1f} s")
    if state.deployment:
        print(f"  serve           {state.deployment}, {state.schedule}   ready in {ready['serve']:.1f} s")
    print("use it from this shell:")
    for key, value in state.env().items():
        print(f"  export {key}={value}")
    print(f"stop it: gradpipe stack down --dir {args.dir}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from pipeline.stack import down

    state, stopped = down(args.dir, args.timeout)
    if state is None:
        print(f"no stack in {args.dir}: nothing to stop")
    else:
        print(f"stack in {args.dir} stopped" + (f" ({', '.join(stopped)})" if stopped else " (nothing was running)"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.stack import status

    info = status(args.dir)
    if info is None:
        print(f"no stack in {args.dir}", file=sys.stderr) if not args.json else print("null")
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info["all_running"] else 1
    age = time.time() - info["started"]
    print(f"stack in {info['dir']}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))} "
          f"({age / 60:.0f} min ago)")
    for c in info["components"]:
        print(f"  {c['name']:<15} pid {c['pid']:<8} {'running' if c['running'] else 'NOT RUNNING'}")
    workers = info["scheduler_workers"]
    print(f"  dask scheduler  {info['scheduler_address']}: "
          + (f"{workers} worker(s)" if workers is not None else "UNREACHABLE"))
    print(f"  dashboard       {info['dashboard_url']}")
    print(f"  prefect UI      {info['prefect_url']}: {'healthy' if info['prefect_healthy'] else 'NOT HEALTHY'}")
    if info["deployment"]:
        print(f"  serve           {info['deployment']}, {info['schedule']}")
    for key, value in {"PREFECT_API_URL": info["prefect_api_url"],
                       "DASK_SCHEDULER_ADDRESS": info["scheduler_address"], **(info.get("tls") or {})}.items():
        print(f"  export {key}={value}")
    return 0 if info["all_running"] else 1
