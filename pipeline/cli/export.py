"""``gradpipe export``: a run's final model as a small, self-describing JSON file."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from pipeline.cli._common import add_runs_dir
from pipeline.errors import GradpipeError
from pipeline.store import location

FORMAT = "gradpipe.model/1"


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[parent], help="write a run's final model as JSON",
                       description="Write RUN's final model (original feature space: prediction = "
                                   "x·coef + intercept, through the sigmoid for logistic) with its provenance "
                                   f"to a JSON file (format {FORMAT!r}).")
    p.add_argument("run", metavar="RUN", help="run id (in --runs-dir) or path/URI of a .zarr run store")
    p.add_argument("--out", required=True, help="output JSON file or object URI (written atomically)")
    add_runs_dir(p)
    p.set_defaults(func=run)


def model_document(path: str | Path) -> dict[str, Any]:
    """The export document: everything needed to predict, plus where the model came from."""
    from pipeline.evaluate import load_model
    from pipeline.store.runs import RunStore

    store = RunStore.open(path)
    store.require_model()  # a missing or non-finite coefficient is refused, never exported as NaN
    model = load_model(path)
    meta = store.dataset
    return {
        "format": FORMAT, "model": model["model"], "solver": model["solver"], "feature_names": model["feature_names"],
        "target": model["target"], "coef": model["coef"].tolist(), "intercept": model["intercept"],
        # L1 sets coefficients to exactly 0.0: the features the model uses
        "selected_features": [f for f, c in zip(model["feature_names"], model["coef"], strict=True) if c != 0.0],
        "power": model["power"], "offset": model["offset"], "weight": model["weight"],
        "run_id": model["run_id"], "status": model["status"], "n_iter": model["n_iter"], "loss": model["loss"],
        "inference": model["inference"], "warnings": model["warnings"],
        "dataset": {"uri": meta.uri, "fingerprint": meta.fingerprint}, "config": store.config,
    }


def write_json_atomic(doc: dict[str, Any], out: str | Path) -> None:
    """Temp file beside ``out``, fsync, rename: readers see the old file or the whole new one. A path that
    cannot be written is a :class:`GradpipeError` naming it, and leaves no temporary file behind. An object
    URI (``s3://…``) is one PUT of the whole document, which is atomic in itself."""
    if location.is_remote(out):
        fs, where = location.filesystem(out)
        try:
            fs.pipe_file(where, (json.dumps(doc, indent=2, allow_nan=True) + "\n").encode())
        except OSError as exc:
            raise GradpipeError(f"cannot write {out}: {exc}.") from None
        return
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=2, allow_nan=True)  # repr-exact floats; NaN only for a NaN loss
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise GradpipeError(f"cannot write {out}: {exc.strerror or exc}.") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    from pipeline.store.runs import resolve_run

    path = resolve_run(args.run, args.runs_dir)
    doc = model_document(path)
    write_json_atomic(doc, args.out if location.is_remote(args.out) else Path(args.out))
    print(f"exported run {doc['run_id']} ({doc['model']}, {len(doc['selected_features'])} of {len(doc['coef'])} "
          f"features selected, iteration "
          f"{doc['n_iter']}, {doc['status']}) to {args.out}")
    return 0
