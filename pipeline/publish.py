"""Publishing a model behind a quality gate: ``<models_dir>/latest.json`` moves only to a model that is
not worse than the published one, both judged on the same (current) data."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.families import get_family
from pipeline.store import atomic
from pipeline.store.runs import RunStore


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


def exclusive(models_dir: Path) -> AbstractContextManager[None]:
    """One quality gate at a time per model: two overlapping runs must not both judge against the same old
    ``latest.json`` and let the slower writer win. Blocks until the other gate is done."""
    return atomic.locked(models_dir / "latest.json", wait=True)


def read_published(models_dir: Path) -> dict[str, Any] | None:
    path = models_dir / "latest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    os.replace(tmp, path)


def publish(models_dir: Path, model_json: dict[str, Any], metrics: dict[str, float]) -> Path:
    """Write the model as ``latest.json`` (and a copy named after its run), atomically."""
    payload = {**model_json, "metrics": metrics}
    write_json_atomic(models_dir / f"{model_json['run_id']}.json", payload)
    write_json_atomic(models_dir / "latest.json", payload)
    return models_dir / "latest.json"


def latest_completed_run(runs_dir: Path, dataset_uri: str, model: str) -> RunStore | None:
    """The newest run on ``dataset_uri`` with the same model that ended normally (for warm starts)."""
    best: tuple[float, RunStore] | None = None
    if not runs_dir.exists():
        return None
    for path in runs_dir.glob("*.zarr"):
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
