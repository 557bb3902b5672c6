"""The ``gradpipe`` command. Each sub-command lives in its own module with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback

from pipeline.cli._common import add_tls_option, apply_tls_option
from pipeline.errors import GradpipeError

COMMANDS = ["make_data", "ingest", "datasets", "train", "tune", "evaluate", "predict", "export", "runs", "run",
            "stack"]


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
    except Exception as exc:  # noqa: BLE001 - OSError, or Icechunk's error around one
        os_error = exc if isinstance(exc, OSError) else _os_error_inside(exc)
        message = None if os_error is None else storage_error_message(args, os_error)
        if message is None:
            raise  # not a storage failure the user can fix: a bug, keep the traceback
        if args.debug:
            traceback.print_exc()
        print(f"gradpipe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"gradpipe {args.command}: {getattr(exc, 'message', 'interrupted')}", file=sys.stderr)
        return 130


def _os_error_inside(exc: BaseException) -> OSError | None:
    """The OS error an Icechunk (Rust) error reports as "(os error N)", as an OSError (a dataset write that
    hit a full disk or a file-size limit); None for any other error."""
    import re

    if "icechunk" not in type(exc).__module__.lower() and "Icechunk" not in type(exc).__name__:
        return None
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


# Failures of the disk or the file system, not of gradpipe: the user fixes them by freeing space, raising a
# limit or writing elsewhere, so they get one line and exit 2 like any other bad setting.
_STORAGE_HINTS = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space or raise the disk quota",
    errno.EFBIG: "raise the file-size limit (`ulimit -f`)",
    errno.EROFS: "remount it read-write",
    errno.EACCES: "fix its permissions",
    errno.EPERM: "fix its permissions",
    errno.EIO: "check the disk",
    errno.ENOTDIR: "fix the path (a part of it is a file, not a directory)",
    errno.EISDIR: "fix the path (it is a directory)",
    errno.ENAMETOOLONG: "use a shorter path",
}
# The option naming where each command writes: the setting to change after a storage failure.
_OUTPUT_OPTION = {"ingest": "dataset", "train": "runs_dir", "tune": "tunes_dir", "run": "runs_dir", "make_data": "out",
                  "predict": "out", "export": "out"}
_CONSEQUENCE = {
    "ingest": "nothing was committed (an existing dataset is unchanged)",
    "train": "the dataset is unchanged; the run keeps only the iterations checkpointed before the failure",
    "run": "the dataset is unchanged; the run keeps only the iterations checkpointed before the failure",
}


def storage_error_message(args: argparse.Namespace, exc: OSError) -> str | None:
    """One line for a disk/file-system failure (ENOSPC, EFBIG, EROFS, EACCES…), or None for other errors.

    It names where the write went (the failing file, or the command's output option when the error has no
    file name: Zarr's chunk writes and errors re-raised from Dask workers carry none), the errno, what to
    do, and what state the stores are in. Staging directories are an implementation detail: the dataset
    path is named instead.
    """
    hint = _STORAGE_HINTS.get(exc.errno)
    if hint is None:
        return None
    option = _OUTPUT_OPTION.get(args.command)
    output = getattr(args, option, None) if option else None
    filename = exc.filename
    if filename is not None and ".staging-" in os.fsdecode(filename):
        filename = None
    where = os.fsdecode(filename) if filename is not None else (str(output) if output else "a file")
    todo = f"{hint}, or choose another --{option.replace('_', '-')}" if output else hint
    what = exc.strerror or os.strerror(exc.errno)
    consequence = _CONSEQUENCE.get(args.command)
    return (f"{where}: {what} ({errno.errorcode.get(exc.errno, exc.errno)}) — {todo}"
            f"{'; ' + consequence if consequence else ''}.")


if __name__ == "__main__":
    sys.exit(main())
