"""``gradpipe runs list|show``: what is in a runs directory, and one run's settings and history."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cli._common import add_runs_dir, fmt_time, json_safe


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("runs", help="list runs or show one run's history",
                       description="Inspect the run stores in a runs directory.")
    rsub = p.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    ls = rsub.add_parser("list", parents=[parent], help="one line per run, oldest first",
                         description="One line per run in --runs-dir, sorted by start time: run id, status, "
                                     "iterations, final loss, model/solver, dataset, start time.")
    add_runs_dir(ls)
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=run_list)
    show = rsub.add_parser("show", parents=[parent], help="a run's settings and loss history",
                           description="Config summary and the history table (t, loss, |g|, lr, elapsed).")
    show.add_argument("run", metavar="RUN", help="run id (in --runs-dir) or path/URI of a .zarr run store")
    add_runs_dir(show)
    show.add_argument("--every", type=int, metavar="K", help="show every K-th row plus the last (default: all)")
    show.add_argument("--json", action="store_true", help="print settings and history as JSON")
    show.set_defaults(func=run_show)


def _num(x: float) -> float | None:
    """JSON has no NaN: a missing value becomes null."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


def summary(path: str | Path) -> dict[str, Any]:
    """The one-line facts about a run store (no history arrays beyond the final row)."""
    from pipeline.store import location
    from pipeline.store.runs import RunStore

    store = RunStore.open(path)
    t = store.committed
    # committed = -1: killed between store creation and row 0 (a new run with its id reclaims it).
    status = "not started" if t < 0 and store.status == "running" else store.status
    return {
        "run_id": store.run_id, "status": status, "n_iter": max(t, 0),
        "loss": _num(store.row("loss", t)) if t >= 0 else None, "model": store.model,
        "solver": store.solver, "dataset": location.name(store.dataset.uri),
        "started": store.started, "path": str(path),
    }


def run_list(args: argparse.Namespace) -> int:
    from pipeline.errors import GradpipeError
    from pipeline.store.runs import list_runs

    root = args.runs_dir
    stores = list_runs(root)
    if stores is None:
        raise GradpipeError(f"runs directory {root} does not exist (train a model with `gradpipe train`).")
    rows = []
    for path in stores:
        try:
            rows.append(summary(path))
        except (GradpipeError, KeyError, OSError) as exc:  # one broken store must not hide the others
            print(f"gradpipe runs list: skipping {path}: {exc}", file=sys.stderr)
    rows.sort(key=lambda r: (r["started"], r["run_id"]))
    if args.json:
        print(json.dumps([{**r, "started": fmt_time(r["started"])} for r in rows]))
        return 0
    if not rows:
        print(f"no runs in {root}")
        return 0
    width = max(len("RUN"), *(len(r["run_id"]) for r in rows))
    print(f"{'RUN':<{width}}  {'STATUS':<11} {'ITER':>6}  {'LOSS':>16}  {'MODEL/SOLVER':<18} {'DATASET':<20} STARTED")
    for r in rows:
        loss = "-" if r["loss"] is None else f"{r['loss']:.10g}"
        print(f"{r['run_id']:<{width}}  {r['status']:<11} {r['n_iter']:>6}  {loss:>16}  "
              f"{r['model']}/{r['solver']:<{17 - len(str(r['model']))}} {r['dataset']:<20} {fmt_time(r['started'])}")
    return 0


def _history_rows(store, every: int | None) -> np.ndarray:
    """Row indices to show: all, or 0, K, 2K, … plus the last (the final state always matters)."""
    n = store.committed + 1
    if not every or every <= 1:
        return np.arange(n)
    idx = np.arange(0, n, every)
    return idx if n == 0 or idx[-1] == n - 1 else np.append(idx, n - 1)


def run_show(args: argparse.Namespace) -> int:
    from pipeline.errors import GradpipeError
    from pipeline.store.runs import RunStore, resolve_run

    if args.every is not None and args.every < 1:
        raise GradpipeError(f"--every must be ≥ 1, not {args.every}.")
    path = resolve_run(args.run, args.runs_dir)
    store = RunStore.open(path)
    info = summary(path)
    config, meta = store.config, store.dataset
    idx = _history_rows(store, args.every)
    cols = {name: store.column(name)[idx] if len(idx) else np.array([])
            for name in ("loss", "grad_norm", "lr", "elapsed")}
    t = store.committed
    damage = store.damage(t) if t >= 0 else None  # a missing chunk reads as NaN: say so, do not just show it
    coef = store.row("coef", t).tolist() if t >= 0 else None
    intercept = _num(store.row("intercept", t)) if t >= 0 else None
    if args.json:
        history = [{"t": int(i), **{k: _num(v[j]) for k, v in cols.items()}} for j, i in enumerate(idx)]
        print(json.dumps({**info, "started": fmt_time(info["started"]), "message": store.message,
                          "config": config, "dataset": {k: getattr(meta, k) for k in ("uri", "fingerprint", "target",
                                                                                       "n_rows", "feature_names")},
                          "coef": coef, "intercept": intercept, "warnings": store.warnings,
                          "damage": damage and damage[0], "tuning": store.tuning,
                          "inference": json_safe(store.inference), "history": history}))
        return 0
    print(f"run {info['run_id']}  ({path})")
    print(f"  status     {info['status']}" + (f": {store.message}" if store.message else ""))
    print(f"  started    {fmt_time(info['started'])}")
    print(f"  model      {config.get('model')}  solver {store.solver}  lr {config.get('lr')}  "
          f"l2 {config.get('l2')}  max_iter {config.get('max_iter')}  standardize {config.get('standardize')}")
    print(f"  dataset    {meta.uri}  ({meta.n_rows} rows, target {meta.target!r}, fingerprint {meta.fingerprint})")
    if store.tuning:
        tu = store.tuning
        chosen = (f"lr {tu['lr']:g}" if tu["kind"] == "lr" else f"alpha {tu['alpha']:.6g} l1_ratio {tu['l1_ratio']:g}")
        print(f"  tuned      by tune {tu['tune_id']} ({tu['cv']} folds, {tu['select']} rule): {chosen}, held-out "
              f"deviance {tu['mean_deviance']:.6g} ± {tu['se']:.3g}")
    for w in store.warnings:
        print(f"  warning    {w}")
    if damage:
        print(f"  DAMAGED    row {t}: {damage[0]} (`gradpipe train --resume` rewinds to the last intact row)")
    loss = "-" if info["loss"] is None else f"{info['loss']:.12g}"
    print(f"  iterations {info['n_iter']}  final loss {loss}")
    if store.inference is not None and store.inference.get("available"):
        from pipeline.inference import table

        print("\n".join(table(store.inference)))
    elif coef is not None:
        print(f"  intercept  {intercept:.10g}")
        for name, c in zip(meta.feature_names, coef, strict=False):
            print(f"  {name:>20} {c: .10g}")
        if store.inference is not None:
            print(f"  ({store.inference['reason']})")
    print(f"\n{'t':>7}  {'loss':>18}  {'|g|':>10}  {'lr':>10}  {'elapsed':>9}")
    for j, i in enumerate(idx):
        print(f"{int(i):>7}  {cols['loss'][j]:>18.12g}  {cols['grad_norm'][j]:>10.3e}  {cols['lr'][j]:>10.3g}  "
              f"{cols['elapsed'][j]:>8.3f}s")
    return 0
