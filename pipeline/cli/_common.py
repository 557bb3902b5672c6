"""Helpers shared by the commands that read run stores (evaluate, predict, export, runs)."""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

DEFAULT_RUNS_DIR = "data/runs"


def positive_int(text: str) -> int:
    """argparse type for ``--workers``: 0 silently meant "the default" and -1 hung ingest, so refuse both."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (omit it for one worker per core), got {value}")
    return value


def add_runs_dir(p) -> None:
    p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR,
                   help=f"where run stores live (default {DEFAULT_RUNS_DIR})")


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: such a float anywhere in a nested record becomes null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def fmt_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def add_tls_option(parser) -> None:
    """``--tls`` on every sub-command that talks to a Dask cluster (those with ``--scheduler``)."""
    action = next(a for a in parser._actions if a.dest == "command")
    for sub in action.choices.values():
        if "--scheduler" in sub._option_string_actions and "--tls" not in sub._option_string_actions:
            sub.add_argument("--tls", action="store_true", default=None,
                             help="encrypt and authenticate Dask traffic (tls://): an embedded cluster uses a "
                                  "throw-away certificate; an external scheduler needs GRADPIPE_TLS_CA, "
                                  "GRADPIPE_TLS_CERT and GRADPIPE_TLS_KEY (see README, TLS)")


def apply_tls_option(args) -> None:
    """``--tls`` becomes ``GRADPIPE_TLS=1`` for this process and what it starts (flows, the settings, every
    ``dask_client``), so each command needs no TLS plumbing of its own."""
    if getattr(args, "tls", None):
        os.environ["GRADPIPE_TLS"] = "1"
