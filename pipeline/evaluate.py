"""Score a trained run on a dataset store, on the cluster: every metric is a sum over chunks.

The data never comes to the driver: each chunk returns additive sums (``losses.chunk_metrics`` plus, for
logistic models, two histograms of the logit), the engine adds them with its fixed tree, and the driver
turns the totals into metrics.

ROC AUC from histograms. Scores are binned on the logit z (monotone in the probability, and — unlike
p — not squashed against 0 and 1 for a confident model). With P_b positives and N_b negatives in bin b,
the trapezoid AUC is ``Σ_b N_b (P_{>b} + P_b / 2) / (P N)``. It is *exact* for every pair of rows in
different bins (bins are ordered like the scores) and counts every pair inside one bin as a tie (½), so

    |AUC_hist − AUC_exact| ≤ ½ · Σ_b P_b N_b / (P N)

which ``evaluate`` reports as ``roc_auc_max_error``. With 8192 bins of width 1/128 on z ∈ [−32, 32]
(p from 1.3e-14 to 1 − 1.3e-14; scores beyond are clipped into the end bins) the bound is typically
1e-4…1e-3, and the actual error far smaller: inside a bin of width h concordance departs from ½ only by
O(h · d/dz log(f_P/f_N)).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client

from pipeline import losses
from pipeline.engine import ChunkEngine
from pipeline.errors import GradpipeError
from pipeline.store.dataset import open_dataset
from pipeline.store.runs import RunStore

AUC_BINS = 8192
AUC_ZMAX = 32.0


# ---- kernels shipped to the workers (module level: pickled by reference) ---------------------------
def _metrics(X, y, model: str, theta, mean, scale, bins: int, zmax: float) -> np.ndarray:
    """``chunk_metrics`` sums; logistic adds [#non-0/1 targets, positives' histogram, negatives' histogram]."""
    base = losses.chunk_metrics(model, X, y, theta, mean, scale)
    if model != "logistic":
        return base
    y = np.asarray(y, dtype=np.float64)
    coef, intercept = losses.to_original(theta, mean, scale)  # the same z as chunk_metrics computes
    z = np.asarray(X, dtype=np.float64) @ coef + intercept
    bad = np.count_nonzero((y != 0) & (y != 1))
    z = np.clip(np.nan_to_num(z, nan=0.0), -zmax, zmax)  # NaN cannot be ranked (log_loss is NaN anyway)
    idx = np.minimum(((z + zmax) * (bins / (2 * zmax))).astype(np.int64), bins - 1)
    pos = np.bincount(idx[y == 1], minlength=bins)
    neg = np.bincount(idx[y == 0], minlength=bins)
    return np.concatenate([base, [bad], pos, neg]).astype(np.float64)


def _centered_ss(X, y, center: float) -> np.ndarray:
    """Σ(y − c) and Σ(y − c)² about a centre near the mean: R²'s denominator without cancellation."""
    r = np.asarray(y, dtype=np.float64) - center
    return np.array([r.sum(), r @ r])


# ---- run access ------------------------------------------------------------------------------------
def _final_row(store: RunStore, path: Path) -> int:
    t = store.committed
    if t < 0:
        raise GradpipeError(f"run {path} has no committed iteration yet; there is no model to use.")
    return t


def load_model(run: str | Path) -> dict[str, Any]:
    """The run's final model in the ORIGINAL feature space (what predict/export need; no cluster)."""
    path = Path(run)
    store = RunStore.open(path)
    t = _final_row(store, path)
    meta = store.attrs["dataset"]
    return {
        "model": store.attrs["config"]["model"],
        "coef": np.asarray(store.row("coef", t), dtype=np.float64),
        "intercept": float(store.row("intercept", t)),
        "feature_names": list(meta["feature_names"]),
        "target": meta["target"],
        "run_id": path.name.removesuffix(".zarr"),
        "status": store.attrs.get("status", "unknown"),
        "n_iter": t,
        "loss": float(store.row("loss", t)),
    }


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(trapezoid AUC, bound on its error vs the exact AUC) from per-bin class counts in score order."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan  # AUC is undefined with one class (sklearn raises)
    above = np.cumsum(pos[::-1])[::-1] - pos  # positives in strictly higher bins
    auc = float(neg @ (above + 0.5 * pos)) / (n_pos * n_neg)
    return auc, 0.5 * float(pos @ neg) / (n_pos * n_neg)


def evaluate(run: str | Path, dataset: str | Path, client: Client, *, bins: int = AUC_BINS,
             zmax: float = AUC_ZMAX, fan_in: int = 8) -> dict[str, Any]:
    """Metrics of the run's final θ on ``dataset``, computed on the cluster.

    linear → ``{n, mse, rmse, r2}``; logistic → ``{n, log_loss, accuracy, roc_auc, roc_auc_max_error}``
    (see the module docstring for the AUC bound). Class 1 iff p > 0.5, as in training's accuracy.
    """
    path = Path(run)
    store = RunStore.open(path)
    t = _final_row(store, path)
    meta = store.attrs["dataset"]
    model = store.attrs["config"]["model"]
    ds = open_dataset(dataset)
    if list(ds.feature_names) != list(meta["feature_names"]):
        raise GradpipeError(f"dataset {ds.path} has features {ds.feature_names}, but run {path.name} was "
                            f"trained on {meta['feature_names']}; evaluate on a dataset with the same columns "
                            f"in the same order.")
    if ds.n_rows == 0:
        raise GradpipeError(f"dataset {ds.path} has no rows to evaluate on.")
    theta = np.asarray(store.row("theta", t), dtype=np.float64)
    mean = None if meta.get("mean") is None else np.asarray(meta["mean"], dtype=np.float64)
    scale = None if meta.get("scale") is None else np.asarray(meta["scale"], dtype=np.float64)
    engine = ChunkEngine(client, store=ds.path, n_rows=ds.n_rows, chunk_rows=ds.chunk_rows, n_features=ds.n_features,
                       itemsize=np.dtype(ds.dtype).itemsize, persist="auto", fan_in=fan_in)
    try:
        sums = engine.map_reduce(_metrics, model, theta, mean, scale, bins, zmax)
        k = len(losses.MODELS[model].metric_names)
        n = float(sums[0])
        out: dict[str, Any] = {"run": path.name.removesuffix(".zarr"), "dataset": ds.path, "model": model,
                               "iteration": t, "n": int(n)}
        if model == "linear":
            sse, sum_y = float(sums[1]), float(sums[2])
            ss_c, ss2_c = engine.map_reduce(_centered_ss, sum_y / n)
            ss_tot = float(ss2_c - ss_c * ss_c / n)  # the correction is ~0 when centred on the mean
            out.update(mse=sse / n, rmse=math.sqrt(sse / n), r2=1.0 - sse / ss_tot if ss_tot > 0 else math.nan)
        else:
            if sums[k]:
                raise GradpipeError(f"target {ds.target!r} of {ds.path} holds {int(sums[k])} values other than "
                                    f"0/1; a logistic model can only be evaluated on a 0/1 target.")
            pos, neg = sums[k + 1:k + 1 + bins], sums[k + 1 + bins:]
            auc, err = auc_from_histograms(pos, neg)
            out.update(log_loss=float(sums[1]) / n, accuracy=float(sums[2]) / n, roc_auc=auc,
                       roc_auc_max_error=err)
        return out
    finally:
        engine.close()
