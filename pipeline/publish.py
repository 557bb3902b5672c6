"""Publishing a model behind a quality gate: ``<models_dir>/latest.json`` moves only to a model that is
not worse than the published one, both judged on the same (current) data.

``models_dir`` may be a local directory or an object-store prefix (``s3://bucket/models/x``): a JSON file is
written locally to a temporary name renamed over the old one, on an object store with one PUT, so a reader
sees the old document or the whole new one either way."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import GradpipeError
from pipeline.families import get_family
from pipeline.store import location, locks
from pipeline.store.runs import RunStore, list_runs


@dataclass
class Decision:
    publish: bool
    metric: str
    new: float
    published: float | None
    published_run: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(model: str, new_metrics: dict[str, float], published_metrics: dict[str, float] | None,
           published_run: str | None, tolerance: float = 0.0, *, converged: bool = True,
           allow_unconverged: bool = False) -> Decision:
    """Publish when the new model is not worse than the published one, and only a converged one unless the
    user allows otherwise: a run cut short by its budget is not the model its settings describe."""
    metric = get_family(model).gate_metric  # lower is better
    new = float(new_metrics[metric])
    if not converged and not allow_unconverged:
        return Decision(False, metric, new, None if published_metrics is None else float(published_metrics[metric]),
                        published_run, "the run did not converge (it ended on its iteration or time budget); "
                        "raise max_iter / time_budget, or allow it with --allow-unconverged "
                        "(allow_unconverged = true in the settings)")
    if published_metrics is None:
        return Decision(True, metric, new, None, None, "no model published yet")
    old = float(published_metrics[metric])
    ok = new <= old * (1 + tolerance) + 1e-12 * abs(old)
    verdict = "not worse than" if ok else "worse than"
    return Decision(ok, metric, new, old, published_run,
                    f"{metric} {new:.6g} is {verdict} the published {old:.6g} (run {published_run})")


def _at(models_dir: str | Path, name: str) -> str | Path:
    """``models_dir/name``: a ``Path`` for a local directory (as callers have always had it), else a URI."""
    return location.join(models_dir, name) if location.is_remote(models_dir) else Path(models_dir) / name


def exclusive(models_dir: str | Path) -> AbstractContextManager[None]:
    """One quality gate at a time per model: two overlapping runs must not both judge against the same old
    ``latest.json`` and let the slower writer win. Blocks until the other gate is done."""
    return locks.locked(_at(models_dir, "latest.json"), wait=True)


def read_published(models_dir: str | Path) -> dict[str, Any] | None:
    fs, path = location.filesystem(_at(models_dir, "latest.json"))
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _encode(payload: dict[str, Any]) -> str:
    return json.dumps(payload, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    if location.is_remote(path):
        fs, where = location.filesystem(path)
        try:
            fs.pipe_file(where, _encode(payload).encode())  # one PUT: the whole document or none
        except OSError as exc:
            raise GradpipeError(f"cannot write {path}: {exc}.") from None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(_encode(payload))
    os.replace(tmp, path)


def publish(models_dir: str | Path, model_json: dict[str, Any], metrics: dict[str, float]) -> str | Path:
    """Write the model as ``latest.json`` (and a copy named after its run), atomically: the copy first, so
    ``latest.json`` never names a run whose own document is missing."""
    payload = {**model_json, "metrics": metrics}
    write_json_atomic(_at(models_dir, f"{model_json['run_id']}.json"), payload)
    write_json_atomic(_at(models_dir, "latest.json"), payload)
    return _at(models_dir, "latest.json")


def latest_completed_run(runs_dir: str | Path, dataset_uri: str, model: str) -> RunStore | None:
    """The newest run on ``dataset_uri`` with the same model that ended normally (for warm starts)."""
    best: tuple[float, RunStore] | None = None
    for path in list_runs(runs_dir) or []:
        try:
            store = RunStore.open(path)
        except Exception:  # noqa: BLE001 - skip anything that is not a readable run
            continue
        if (store.dataset.uri == dataset_uri and store.model == model
                and store.status in ("converged", "max_iter", "time_budget") and store.committed >= 0):
            started = store.started  # not a file time: annotating or resuming changes those
            if best is None or started > best[0]:
                best = (started, store)
    return None if best is None else best[1]
