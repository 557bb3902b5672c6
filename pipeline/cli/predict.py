"""``gradpipe predict``: add a run's predictions to a CSV/Parquet file (streamed, written atomically)."""

from __future__ import annotations

import argparse
import json

from pipeline.cli._common import add_runs_dir


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("predict", parents=[parent], help="predict with a trained run on a CSV/Parquet file",
                       description="Read INPUT (CSV or Parquet; it must have the run's feature columns) in "
                                   "batches and write its columns plus `prediction` (logistic: P(y=1) and a "
                                   "0/1 `label`) to OUT, whose extension picks the format.")
    p.add_argument("--run", required=True, help="run id (in --runs-dir) or path/URI of a .zarr run store")
    p.add_argument("--input", required=True, help="CSV or Parquet file (path or URI) with the run's feature columns")
    p.add_argument("--out", required=True, help="output file (path or URI): .csv or .parquet")
    add_runs_dir(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.predict import predict_file
    from pipeline.store.runs import resolve_run

    result = predict_file(resolve_run(args.run, args.runs_dir), args.input, args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {result['rows']} predictions of run {result['run_id']} ({result['model']}) to {result['out']}")
    return 0
