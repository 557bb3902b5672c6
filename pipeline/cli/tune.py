"""``gradpipe tune``: cross-validate the penalty path (or learning rates), then refit at the choice."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cli._common import positive_int
from pipeline.config import MODELS, PERSIST
from pipeline.store import location
from pipeline.store.runs import store_exists


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(sub, parent: argparse.ArgumentParser) -> None:
    from pipeline.tune import TuneConfig

    d = TuneConfig()
    p = sub.add_parser("tune", parents=[parent], help="choose the penalty (or learning rate) by K-fold CV",
                       description="Cross-validate a regularization path from α_max down (or a grid of learning "
                                   "rates), every fold and candidate in the same passes over the data; then refit "
                                   "on all data at the chosen setting (a normal run in RUNS_DIR). Every outer "
                                   "iteration is committed to TUNES_DIR/TUNE_ID.zarr; --resume continues it.")
    p.add_argument("--dataset", help="dataset store (from `gradpipe ingest`)")
    p.add_argument("--resume", metavar="TUNE_ID", help="continue this tune from its last committed iteration")
    p.add_argument("--tune-id", help="name of the new tune (default: <dataset>-tune-<time>-<random>)")
    p.add_argument("--tunes-dir", default="data/tunes", help="where tune stores live (default data/tunes)")
    p.add_argument("--runs-dir", default="data/runs", help="where the refit run goes (default data/runs)")
    p.add_argument("--model", choices=MODELS, default=d.model, help=f"GLM family (default {d.model})")
    p.add_argument("--power", type=float, default=d.power, help=f"Tweedie power (default {d.power})")
    p.add_argument("--cv", type=int, default=d.cv, help=f"folds (default {d.cv})")
    p.add_argument("--alphas", dest="n_alphas", type=positive_int, default=d.n_alphas,
                   help=f"α values on the path (default {d.n_alphas}), log-spaced from α_max to α_max·--eps")
    p.add_argument("--alpha-grid", type=_floats, help="explicit α values, comma-separated (instead of --alphas)")
    p.add_argument("--eps", type=float, help="α_min/α_max (default 1e-3 when rows > features, else 1e-2)")
    p.add_argument("--l1-ratio", dest="l1_ratios", type=_floats, default=d.l1_ratios,
                   help="elastic-net mixing r (1: lasso, 0: ridge), comma-separated to tune it too (default 1)")
    p.add_argument("--lr-grid", type=_floats, help="tune gradient descent's learning rate instead: comma-separated "
                                                   "candidates, at the penalty of --l1/--l2")
    p.add_argument("--l1", type=float, default=d.l1, help="--lr-grid: the L1 penalty of every candidate")
    p.add_argument("--l2", type=float, default=d.l2, help="--lr-grid: the L2 penalty of every candidate")
    p.add_argument("--select", choices=("min", "1se"), default=d.select,
                   help="min: the smallest mean held-out deviance; 1se: the largest α within one standard error")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the fold hash (default {d.seed})")
    p.add_argument("--max-iter", type=int, default=d.max_iter,
                   help=f"outer iterations (passes) of an IRLS or --lr-grid tune (default {d.max_iter})")
    p.add_argument("--tol", type=float, default=d.tol, help="Newton: a full step ≤ √tol relative ends a model; "
                                                            "--lr-grid: the relative loss change (default 1e-12)")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="do not standardize features inside the kernel (the fitted models do not change)")
    p.add_argument("--fan-in", type=int, default=d.fan_in, help=f"reduction tree fan-in (default {d.fan_in})")
    p.add_argument("--persist", choices=PERSIST, default=d.persist, help="keep chunks in worker memory or stream")
    p.add_argument("--no-refit", dest="refit", action="store_false", help="choose only; do not refit")
    p.add_argument("--scheduler", help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS or local)")
    p.add_argument("--workers", type=positive_int, help="workers of the local cluster (default: one per core)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from pipeline.tune import TuneConfig

    names = TuneConfig.__dataclass_fields__
    return TuneConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None}).validate()


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster import dask_client
    from pipeline.data_checks import check_magnitudes, check_target_domain
    from pipeline.errors import GradpipeError
    from pipeline.store.dataset import read_info
    from pipeline.tune import new_tune_id, resume_tune, tune

    if bool(args.resume) == bool(args.dataset):
        raise GradpipeError("give either --dataset (a new tune) or --resume TUNE_ID (continue a tune).")
    if args.dataset:
        config = _config(args)
        info = read_info(args.dataset)  # a wrong dataset or target fails before a cluster starts
        check_magnitudes(info)
        check_target_domain(info, config.train_config().family)
    tune_id = args.resume or args.tune_id or new_tune_id(args.dataset)
    try:
        with dask_client(args.scheduler, args.workers, announce=not args.json) as client:
            if args.resume:
                result = resume_tune(tune_id, tunes_dir=args.tunes_dir, runs_dir=args.runs_dir, client=client)
            else:
                result = tune(args.dataset, config, client=client, runs_dir=args.runs_dir,
                              tunes_dir=args.tunes_dir, tune_id=tune_id)
    except KeyboardInterrupt:
        if store_exists(location.join(args.tunes_dir, f"{tune_id}.zarr")):
            print(f"tune {tune_id} interrupted; its committed iterations are kept. Resume with: gradpipe tune "
                  f"--resume {tune_id} --tunes-dir {args.tunes_dir} --runs-dir {args.runs_dir}", file=sys.stderr)
        raise
    if args.json:
        from pipeline.cli._common import json_safe

        print(json.dumps(json_safe(result.to_json())))
        return 0
    print("\n".join(summary(result)))
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def summary(result) -> list[str]:
    """The chosen setting, the CV table around it, the passes and the refit."""
    rows = result.table()
    chosen = next(i for i, r in enumerate(rows) if r["chosen"])
    if result.kind == "lr":
        head = f"tune {result.tune_id}: learning rate {result.lr:g} chosen by {result.select}"
        show = range(len(rows))
    else:
        head = (f"tune {result.tune_id}: alpha {result.alpha:.6g}, l1_ratio {result.l1_ratio:g} "
                f"({result.select} rule, {result.n_folds} folds)")
        show = sorted({*range(0, len(rows), max(1, len(rows) // 10)), chosen, len(rows) - 1})
    lines = [head, f"  {'candidate':>28} {'mean deviance':>14} {'± se':>10}"]
    for i in show:
        r = rows[i]
        label = f"lr {r['lr']:g}" if result.kind == "lr" else f"alpha {r['alpha']:.4g} r {r['l1_ratio']:g}"
        lines.append(f"{'→' if r['chosen'] else ' '} {label:>28} {r['mean_deviance']:14.6g} {r['se']:10.3g}")
    lines.append(f"  passes: {result.passes:g} (tune) + {result.refit.passes if result.refit else 0:g} (refit) "
                 f"= {result.total_passes:g}; {result.seconds:.2f} s")
    lines.append(f"  tune store: {result.tune_uri}")
    if result.refit is not None:
        lines.append(f"  refit run {result.refit.run_id}: {result.refit.status}; {result.refit.run_uri}")
    return lines
