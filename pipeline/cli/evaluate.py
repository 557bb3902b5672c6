"""``gradpipe evaluate``: score a run's final model on a dataset store, on the cluster."""

from __future__ import annotations

import argparse
import json

from pipeline.cli._common import add_runs_dir, positive_int


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evaluate", parents=[parent], help="metrics of a trained run on a dataset",
                       description="Compute metrics of RUN's final θ on DATASET with the Dask cluster: "
                                   "linear → n, mse, rmse, r2; logistic → n, log_loss, accuracy, roc_auc "
                                   "(from logit histograms, with a bound on its error).")
    p.add_argument("--run", required=True, help="run id (in --runs-dir) or path/URI of a .zarr run store")
    p.add_argument("--dataset", required=True, help="dataset store with the run's feature columns")
    add_runs_dir(p)
    p.add_argument("--scheduler", help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS or local)")
    p.add_argument("--workers", type=positive_int, help="workers of the local cluster (default: one per core)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster import dask_client
    from pipeline.evaluate import evaluate
    from pipeline.store.dataset import read_info
    from pipeline.store.runs import resolve_run

    path = resolve_run(args.run, args.runs_dir)
    read_info(args.dataset)  # a missing or wrong dataset fails before a cluster starts
    with dask_client(args.scheduler, args.workers, announce=not args.json) as client:
        metrics = evaluate(path, args.dataset, client)
    if args.json:
        # NaN is not JSON: an undefined metric (R² of a constant target, AUC of one class) becomes null
        print(json.dumps({k: None if isinstance(v, float) and v != v else v for k, v in metrics.items()}))
        return 0
    print(f"run {metrics['run']} (iteration {metrics['iteration']}, {metrics['model']}) on {metrics['dataset']}:")
    for key in ("n", "mse", "rmse", "r2", "log_loss", "accuracy", "roc_auc"):
        if key in metrics:
            value = metrics[key]
            text = str(value) if isinstance(value, int) else f"{value:.10g}"
            if key == "roc_auc":
                text += f"  (± {metrics['roc_auc_max_error']:.2g} at most, from binning)"
            print(f"  {key:>9} {text}")
    return 0
