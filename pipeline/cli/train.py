"""``gradpipe train``: fit a model on a dataset store, checkpointing every iteration; ``--resume`` a run."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import TYPE_CHECKING

from pipeline.cli._common import positive_int
from pipeline.config import MODELS, PERSIST, SCHEDULES, SOLVERS, TrainConfig

if TYPE_CHECKING:
    pass


def _lr(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither 'auto' nor a number") from None


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[parent], help="train a model on the cluster (exact, Newton, L-BFGS, GD…)",
                       description="Train on a dataset store. Every iteration's θ and loss go to "
                                   "RUNS_DIR/RUN_ID.zarr; Ctrl-C stops cleanly and prints the resume command.")
    p.add_argument("--dataset", help="dataset store (from `gradpipe ingest`)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue this run from its last committed iteration")
    p.add_argument("--run-id", help="name of the new run (default: <dataset>-<time>-<random>)")
    p.add_argument("--runs-dir", default="data/runs", help="where run stores live (default data/runs)")
    d = TrainConfig()
    p.add_argument("--model", choices=MODELS, default=d.model, help=f"GLM family (default {d.model})")
    p.add_argument("--solver", choices=SOLVERS, default=d.solver,
                   help="auto (default): exact (linear) or newton (logistic) up to 4,096 features, lbfgs above; "
                        "exact = one-pass TSQR least squares; newton = IRLS; lbfgs; first-order gd, sgd, momentum, "
                        "nesterov, adam")
    p.add_argument("--lr", type=_lr, default=d.lr, help="first-order step size, or 'auto' (default): from the "
                                                        "curvature bound, with a backtracking safeguard for gd")
    p.add_argument("--history", type=int, default=d.history, help=f"lbfgs memory (default {d.history} pairs)")
    p.add_argument("--l2", type=float, default=d.l2, help="L2 penalty λ: adds (λ/2)·‖w‖² on original-scale "
                                                          "weights (intercept unpenalized)")
    p.add_argument("--l1", type=float, default=d.l1, help="L1 penalty λ₁: adds λ₁·‖w‖₁ on original-scale weights "
                                                          "(lasso; with --l2: elastic net); exact zeros")
    p.add_argument("--alpha", type=float, default=None, help="elastic-net strength in glum/scikit-learn terms: "
                   "alpha·(R‖w‖₁ + (1−R)/2‖w‖²), i.e. --l1 alpha·R --l2 alpha·(1−R)")
    p.add_argument("--l1-ratio", type=float, default=None, help="R in --alpha's formula (default 0: ridge)")
    p.add_argument("--power", type=float, default=d.power, help=f"Tweedie power p, 1 < p < 2 (default {d.power})")
    p.add_argument("--max-iter", type=int, help=f"iterations (default {d.max_iter}; on --resume: the new total)")
    p.add_argument("--tol", type=float, default=d.tol, help="stop when the relative loss change falls below "
                                                            "(default 1e-12; sgd: 1e-4 per epoch; newton: when a "
                                                            "full step is ≤ √tol relative)")
    p.add_argument("--gtol", type=float, default=d.gtol, help=f"stop when ‖∇L‖ ≤ this (default {d.gtol:g})")
    p.add_argument("--time-budget", type=float, help="stop after this many seconds")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="do not standardize features inside the kernel")
    p.add_argument("--batch-chunks", type=int, default=d.batch_chunks, help="sgd: chunks per mini-batch")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="sgd learning-rate schedule")
    p.add_argument("--power-t", type=float, default=d.power_t, help="sgd invscaling exponent")
    p.add_argument("--early-stopping", action="store_true", help="sgd: stop on held-out chunks' loss")
    p.add_argument("--validation-fraction", type=float, default=d.validation_fraction,
                   help=f"share of chunks held out by --early-stopping (default {d.validation_fraction})")
    p.add_argument("--n-iter-no-change", type=int, default=d.n_iter_no_change,
                   help=f"--early-stopping: iterations without improvement (default {d.n_iter_no_change})")
    p.add_argument("--beta", type=float, default=d.beta, help="momentum coefficient")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of sgd's batch order and the validation split (default {d.seed})")
    p.add_argument("--fan-in", type=int, default=d.fan_in, help=f"reduction tree fan-in (default {d.fan_in})")
    p.add_argument("--persist", choices=PERSIST, default=d.persist,
                   help="keep chunks in worker memory (auto: when they fit in half of it) or stream from Zarr")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"commit a run-store row every K iterations (default {d.checkpoint_every}: every one)")
    p.add_argument("--scheduler", help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS or local)")
    p.add_argument("--workers", type=positive_int, help="workers of the local cluster (default: one per core)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line (there is none on a pipe either)")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> TrainConfig:
    names = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return TrainConfig(**values)


def _loss_curve(run_uri: str) -> str | None:
    """Every run gets its loss curve in its store. A picture that cannot be drawn (a full disk) is a warning:
    the training it shows is committed already."""
    from pipeline.report import write_loss_curve

    try:
        return str(write_loss_curve(run_uri))
    except Exception as exc:  # noqa: BLE001
        print(f"warning: the loss curve of {run_uri} was not written: {exc}", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster import dask_client
    from pipeline.data_checks import check_magnitudes, check_target_domain
    from pipeline.errors import GradpipeError
    from pipeline.progress import TrainProgress, wanted
    from pipeline.store.dataset import read_info
    from pipeline.training import check_new_run_id, check_resumable, resume, train

    if bool(args.resume) == bool(args.dataset):
        raise GradpipeError("give either --dataset (a new run) or --resume RUN_ID (continue a run).")
    if args.dataset:
        config = _config(args).validate()
        # a missing or wrong dataset fails before a cluster starts, and so do values too large for float64 and a
        # target outside --model's domain
        info = read_info(args.dataset)
        check_magnitudes(info)
        check_target_domain(info, config.family)
        if args.run_id:
            check_new_run_id(args.run_id, args.runs_dir)  # so does a run id that is taken
        max_iter = config.max_iter
    else:
        store, _ = check_resumable(args.resume, args.runs_dir)  # so does a run that cannot continue
        max_iter = args.max_iter or TrainConfig.from_json(store.config).max_iter
    # A live line on a terminal only; a pipe, --quiet and --json get just the result lines below. It ends
    # before the cluster shuts down, so nothing the shutdown logs lands inside it.
    with (dask_client(args.scheduler, args.workers, announce=not (args.json or args.quiet)) as client,
          TrainProgress(wanted(args.quiet or args.json), max_iter) as progress):
        if args.resume:
            result = resume(args.resume, runs_dir=args.runs_dir, client=client, max_iter=args.max_iter,
                            time_budget=args.time_budget, on_iteration=progress)
        else:
            result = train(args.dataset, config, client=client, runs_dir=args.runs_dir, run_id=args.run_id,
                           on_iteration=progress)
    curve = _loss_curve(result.run_uri)
    if args.json:
        from pipeline.cli._common import json_safe

        print(json.dumps(json_safe({**result.to_json(), "loss_curve": curve})))
    else:
        from pipeline.inference import table

        print(f"run {result.run_id}: {result.solver} {result.status} after {result.n_iter} iterations "
              f"({result.message}); loss {result.loss:.10g}; {result.seconds:.2f} s, "
              f"{result.seconds_per_iter * 1000:.1f} ms/iter, {result.passes:g} passes "
              f"({result.passes_per_iter:.2f} per iteration)")
        for w in result.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if result.inference and result.inference.get("available"):
            print("\n".join(table(result.inference)))
        else:
            print(f"  intercept {result.intercept:.6g}")
            for name, c in zip(result.feature_names, result.coef, strict=True):
                print(f"  {name:>20} {c: .6g}")
            if result.inference:
                print(f"  ({result.inference['reason']})")
        print(f"  run store: {result.run_uri}")
        if curve:
            print(f"  loss curve: {curve}")
    if result.status == "stopped":
        print(f"resume with: gradpipe train --resume {result.run_id} --runs-dir {args.runs_dir}", file=sys.stderr)
        return 128 + (signal.SIGTERM if "SIGTERM" in result.message else signal.SIGINT)
    return 0
