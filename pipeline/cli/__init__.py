"""The ``gradpipe`` command. Each sub-command lives in its own module with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from pipeline.cli._common import add_tls_option, apply_tls_option
from pipeline.errors import GradpipeError

COMMANDS = ["make_data", "ingest", "train", "evaluate", "predict", "export", "runs", "run", "stack"]


def common_options() -> argparse.ArgumentParser:
    """Options every sub-command accepts, after its name."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradpipe",
                                     description="Distributed gradient descent on Zarr + Dask.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = common_options()
    for name in COMMANDS:
        importlib.import_module(f"pipeline.cli.{name}").register(sub, parent)
    add_tls_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_tls_option(args)
    try:
        return int(args.func(args) or 0)
    except GradpipeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"gradpipe {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"gradpipe {args.command}: {getattr(exc, 'message', 'interrupted')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
