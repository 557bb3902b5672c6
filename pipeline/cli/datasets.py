"""``gradpipe datasets log|rollback``: a dataset's versions (one per ingest) and making an older one current."""

from __future__ import annotations

import argparse
import json


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("datasets", help="list a dataset's versions or roll it back",
                       description="Every ingest is one commit (snapshot) of the dataset. Train on an older one "
                                   "with `gradpipe train --dataset D@SNAPSHOT`.")
    dsub = p.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    lg = dsub.add_parser("log", parents=[parent], help="the dataset's commits, newest first",
                         description="One line per commit of the dataset's main branch, newest first: snapshot "
                                     "id, time (UTC), rows and the files it added.")
    lg.add_argument("dataset", metavar="DATASET", help="dataset directory or URI (s3://bucket/datasets/demo)")
    lg.add_argument("--json", action="store_true", help="print a JSON list")
    lg.set_defaults(func=run_log)
    rb = dsub.add_parser("rollback", parents=[parent], help="make an older snapshot the current version",
                         description="Move the dataset's main branch back to SNAPSHOT. Nothing is deleted: "
                                     "runs trained on later snapshots still resume, and rolling back to the "
                                     "previous tip (printed) undoes the rollback.")
    rb.add_argument("dataset", metavar="DATASET", help="dataset directory or URI")
    rb.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id from `gradpipe datasets log`")
    rb.set_defaults(func=run_rollback)


def run_log(args: argparse.Namespace) -> int:
    from pipeline.store.dataset import log

    entries = log(args.dataset)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        rows = e["metadata"].get("n_rows")
        print(f"{e['snapshot']}  {e['written_at'][:19].replace('T', ' ')}  "
              f"{'' if rows is None else f'{rows:>12,} rows  '}{e['message']}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from pipeline.store.dataset import read_info, rollback

    previous = rollback(args.dataset, args.snapshot)
    info = read_info(args.dataset)
    print(f"{info.path} is now at snapshot {info.snapshot} ({info.n_rows:,} rows); it was at {previous}. "
          f"Undo with: gradpipe datasets rollback {args.dataset} {previous}")
    return 0
