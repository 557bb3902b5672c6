"""Shared entry point of the benchmark scripts: run, print the table, write the JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def main(parse_args: Callable, run: Callable, print_table: Callable, argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print_table(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0
