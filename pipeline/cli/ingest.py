"""``gradpipe ingest``: raw files → dataset store, parsed in parallel on the cluster."""

from __future__ import annotations

import argparse
import json

from pipeline.cli._common import positive_int
from pipeline.store.dataset import COMPRESSORS


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "ingest", parents=[parent], help="ingest CSV/Parquet/.npy files into a dataset store",
        description="Ingest raw files (local paths or URIs such as s3://bucket/raw/*.csv) into a dataset (a "
                    "directory or URI). Re-running with the same files is a no-op; new files are appended. Each "
                    "ingest is one atomic commit: `gradpipe datasets log` lists them.")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="file, directory or glob")
    p.add_argument("--target", required=True, help="target column (a column index for .npy)")
    p.add_argument("--dataset", required=True, help="dataset directory or URI, e.g. data/datasets/demo.zarr or "
                                                        "s3://bucket/datasets/demo")
    p.add_argument("--features", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   help="comma-separated feature columns (default: every column but the target)")
    p.add_argument("--weight", metavar="COL",
                   help="sample-weight column (finite, ≥ 0; stored as array w, not a feature; a column index "
                        "for .npy)")
    p.add_argument("--offset", metavar="COL",
                   help="offset column added to the linear predictor, e.g. log exposure (stored as array "
                        "offset, not a feature; a column index for .npy)")
    p.add_argument("--chunk-mb", type=float, default=64.0, help="MiB of X per row chunk (default 64)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="stored value type (default float64; float32 halves the store and memory)")
    p.add_argument("--on-invalid", choices=["error", "drop"], default="error",
                   help="what to do with rows holding empty cells, NaN or ±inf (default: error)")
    p.add_argument("--compressor", choices=COMPRESSORS, default="lz4", help="chunk compressor (default lz4)")
    p.add_argument("--replace", action="store_true", help="rebuild when an ingested file has changed")
    p.add_argument("--scheduler", help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS or a "
                                       "local cluster)")
    p.add_argument("--workers", type=positive_int, help="workers of the local cluster (default: one per core)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line (there is none on a pipe either)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.ingest import ingest
    from pipeline.progress import IngestProgress, wanted

    # The cluster starts only once the inputs are checked and there is something new to parse. The live
    # line (a terminal only; a pipe, --quiet and --json get just the result line) starts with the first piece.
    with IngestProgress(wanted(args.quiet or args.json)) as progress:
        result = ingest(args.sources, args.dataset, args.target, features=args.features, chunk_mb=args.chunk_mb,
                        dtype=args.dtype, on_invalid=args.on_invalid, replace=args.replace,
                        compressor=args.compressor, scheduler=args.scheduler, workers=args.workers,
                        announce=not (args.json or args.quiet), on_piece=progress, weight=args.weight,
                        offset=args.offset)
    if args.json:
        print(json.dumps(result.to_json()))
    elif not result.appended_files:
        print(f"{result.dataset}: nothing new to ingest ({len(result.skipped_files)} file(s) already in it); "
              f"{result.n_rows} rows × {result.n_features} features.")
    else:
        dropped = f", dropped {result.dropped_rows} invalid rows" if result.dropped_rows else ""
        print(f"{result.dataset}: ingested {len(result.appended_files)} file(s){dropped}; now "
              f"{result.n_rows} rows × {result.n_features} features ({result.seconds:.1f} s); snapshot "
              f"{result.snapshot}.")
    return 0
