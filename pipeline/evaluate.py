"""Score a trained run on a dataset store, on the cluster: every metric is a sum over chunks.

The data never comes to the driver: a first pass sums y (the intercept-only model, which the deviance
explained and R² compare against, needs its mean), a second returns each chunk's additive metric sums from
the family (``Family.metric_sums``), and the driver finishes them (``Family.metrics``).

ROC AUC (logistic) from histograms. Scores are binned on the logit z (monotone in the probability, and —
unlike p — not squashed against 0 and 1 for a confident model). With P_b positives and N_b negatives in
bin b, the trapezoid AUC is ``Σ_b N_b (P_{>b} + P_b / 2) / (P N)``. It is *exact* for every pair of rows in
different bins (bins are ordered like the scores) and counts every pair inside one bin as a tie (½), so

    |AUC_hist − AUC_exact| ≤ ½ · Σ_b P_b N_b / (P N)

which ``evaluate`` reports as ``roc_auc_max_error``. With 8192 bins of width 1/128 on z ∈ [−32, 32]
(p from 1.3e-14 to 1 − 1.3e-14; scores beyond are clipped into the end bins) the bound is typically
1e-4…1e-3, and the actual error far smaller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client

from pipeline import losses
from pipeline.engine import ChunkEngine
from pipeline.errors import GradpipeError
from pipeline.families import Family
from pipeline.objective import invalid_targets
from pipeline.store import location
from pipeline.store.dataset import open_dataset
from pipeline.store.runs import RunStore


# ---- kernels shipped to the workers (module level: pickled by reference) ---------------------------
def _metrics(X, y, w, offset, family: Family, theta, mean, scale, center: float) -> np.ndarray:
    return losses.chunk_metrics(family, X, y, theta, mean, scale, center, w=w, offset=offset)


# ---- run access ------------------------------------------------------------------------------------
def _run_location(run: str | Path) -> str | Path:
    """A local run store as a ``Path`` (as messages have always named it), a URI as it is."""
    return str(run) if location.is_remote(run) else Path(run)


def _final_row(store: RunStore, path: str | Path) -> int:
    t = store.committed
    if t < 0:
        raise GradpipeError(f"run {path} has no committed iteration yet; there is no model to use.")
    return t


def load_model(run: str | Path) -> dict[str, Any]:
    """The run's final model in the ORIGINAL feature space (what predict/export need; no cluster)."""
    path = _run_location(run)
    store = RunStore.open(path)
    t = _final_row(store, path)
    meta = store.dataset
    return {
        "model": store.model,
        "solver": store.solver,
        "coef": np.asarray(store.row("coef", t), dtype=np.float64),
        "intercept": float(store.row("intercept", t)),
        "feature_names": meta.feature_names,
        "target": meta.target,
        "power": getattr(store.family, "power", None),  # the log-link families carry their variance power
        "offset": meta.offset,  # the offset column predictions add to z (None: none)
        "weight": meta.weight,
        "run_id": store.run_id,
        "status": store.status,
        "n_iter": t,
        "loss": float(store.row("loss", t)),
        "inference": store.inference,
        "warnings": store.warnings,
    }


def evaluate(run: str | Path, dataset: str | Path, client: Client, *, fan_in: int = 8) -> dict[str, Any]:
    """Metrics of the run's final θ on ``dataset``, computed on the cluster.

    linear → ``{n, mse, rmse, r2, deviance, null_deviance}``; logistic → ``{n, log_loss, accuracy, roc_auc,
    roc_auc_max_error, deviance, null_deviance}`` (see the module docstring for the AUC bound).
    """
    path = _run_location(run)
    store = RunStore.open(path)
    t = _final_row(store, path)
    meta = store.dataset
    family = store.family
    ds = open_dataset(dataset)
    if list(ds.feature_names) != list(meta.feature_names):
        raise GradpipeError(f"dataset {ds.path} has features {ds.feature_names}, but run {store.run_id} was "
                            f"trained on {meta.feature_names}; evaluate on a dataset with the same columns "
                            f"in the same order.")
    if ds.n_rows == 0:
        raise GradpipeError(f"dataset {ds.path} has no rows to evaluate on.")
    if meta.offset and not ds.has_offset:
        raise GradpipeError(f"run {store.run_id} was trained with the offset column {meta.offset!r}, which dataset "
                            f"{ds.path} lacks; ingest it with --offset {meta.offset}.")
    theta = np.asarray(store.row("theta", t), dtype=np.float64)
    mean, scale = meta.arrays()
    engine = ChunkEngine(client, store=ds.ref, n_rows=ds.n_rows, chunk_rows=ds.chunk_rows, n_features=ds.n_features,
                         itemsize=np.dtype(ds.dtype).itemsize, persist="auto", fan_in=fan_in)
    try:
        bad, n, sum_y = engine.map_reduce(invalid_targets, family)
        if bad:
            raise GradpipeError(f"target {ds.target!r} of {ds.path} holds {int(bad)} values outside "
                                f"{family.y_domain()}; a {family.name} model can only be evaluated on those.")
        sums = engine.map_reduce(_metrics, family, theta, mean, scale, sum_y / n)
        out: dict[str, Any] = {"run": store.run_id, "dataset": ds.path, "model": family.name,
                               "iteration": t, "n": int(n)}
        out.update(family.metrics(sums[1:], float(sums[0])))
        return out
    finally:
        engine.close()
