"""Human-facing summaries of a tune: the cross-validation curve (PNG) and a sampled CV table (markdown).

Pure matplotlib (an Agg canvas, never pyplot) and NumPy, no Prefect: ``flows.tasks.tune_task`` wraps them in
an artifact, and anything else holding a :class:`pipeline.tune.TuneResult` can call them too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.report import DPI, FIGSIZE, save_png

CV_CURVE_FILE = "cv_curve.png"
REPORT_GROUP = "report"  # as in the run store: a Zarr subgroup, so the file is not a stray member of the store


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def cv_curve_title(result: Any) -> str:
    chosen = (f"lr = {result.lr:.4g}" if result.kind == "lr"
              else f"α = {result.alpha:.4g}, l1_ratio = {result.l1_ratio:g}")
    return f"{result.model} — {result.n_folds}-fold CV — rule {result.select} — {chosen}"


def cv_curve_figure(result: Any):
    """Mean held-out deviance ± 1 SE per candidate: vs log10 α (one line per l1 ratio), or vs the learning rate
    (log axis) for a learning-rate tune; the chosen candidate is marked (dotted vertical line and a star)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    fig.subplots_adjust(left=0.14, right=0.97, top=0.89, bottom=0.13)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    mean, se = _finite(result.mean), _finite(result.se)
    best = tuple(result.best)
    if result.kind == "lr":
        x = np.asarray(result.lr_grid, dtype=np.float64)
        ax.errorbar(x, mean, yerr=se, color="C0", marker="o", ms=4, capsize=3, lw=1.5, gid="cv")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        out = ~np.isfinite(mean)
        if out.any():  # diverged candidates (deviance ∞): an × on the top edge, so the grid's extent shows
            from matplotlib.transforms import blended_transform_factory

            top = blended_transform_factory(ax.transData, ax.transAxes)
            ax.plot(x[out], np.full(out.sum(), 0.97), marker="x", ms=7, color="C3", ls="none", transform=top,
                    gid="diverged", clip_on=False)
            ax.text(0.99, 0.03, "× on top: diverged", transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                    color="C3")
        bx, by = float(x[best[0]]), float(mean[best])
    else:
        alphas = np.asarray(result.alphas, dtype=np.float64)
        many = alphas.shape[1] > 30
        for r, ratio in enumerate(result.l1_ratios):
            ax.errorbar(np.log10(alphas[r]), mean[r], yerr=se[r], color=f"C{r % 10}", lw=1.5,
                        marker=None if many else "o", ms=3, elinewidth=0.7, capsize=0 if many else 2,
                        label=f"l1_ratio = {ratio:g}", gid=f"cv-{r}")
        ax.set_xlabel("log10 α")
        bx, by = float(np.log10(alphas[best])), float(mean[best])
        if len(result.l1_ratios) > 1:
            ax.legend(fontsize=8, loc="best")
    ax.axvline(bx, color="0.4", ls=":", lw=1, gid="chosen")
    ax.plot([bx], [by], marker="*", ms=12, color="C3", ls="none", gid="chosen-point", zorder=5)
    ax.text(0.99, 0.91 if result.kind == "lr" else 0.97, f"chosen ({result.select}): mean deviance {by:.6g}",
            transform=ax.transAxes, ha="right", va="top", fontsize=8, color="0.3")
    ax.set_ylabel("held-out mean deviance (± 1 SE)")
    ax.grid(alpha=0.3)
    if not np.isfinite(mean).any():
        ax.text(0.5, 0.5, "no finite CV deviance to plot", transform=ax.transAxes, ha="center", va="center",
                color="0.4")
    fig.suptitle(cv_curve_title(result), fontsize=9, y=0.975)
    return fig


def cv_curve_path(tune_uri: str | Path) -> str | Path:
    """Where a tune's CV curve lives: ``<tune store>/report/cv_curve.png`` (the report subgroup is created);
    a ``Path`` on a local disk, else a URI."""
    import zarr

    from pipeline.store import location
    from pipeline.store.runs import store_exists, zarr_store

    path = location.join(tune_uri, REPORT_GROUP)
    if not store_exists(location.join(path, "zarr.json")):
        zarr.open_group(zarr_store(path), mode="a", zarr_format=3, attributes={"gradpipe": {"kind": "report"}})
    png = location.join(path, CV_CURVE_FILE)
    return png if location.is_remote(png) else Path(png)


def write_cv_curve(result: Any, out: str | Path | None = None) -> str | Path:
    """Write the CV curve PNG (atomically) at ``out``, by default inside the tune store (:func:`cv_curve_path`)."""
    return save_png(cv_curve_figure(result), out if out is not None else cv_curve_path(result.tune_uri))


def table_indices(n: int, chosen: int, best: int, every: int = 10) -> list[int]:
    """The candidate indices a readable table shows: all of them when ``n ≤ 2·every``, else every ``every``-th,
    the last, the chosen and the minimum."""
    if n <= 2 * every:
        return list(range(n))
    return sorted({*range(0, n, every), n - 1, chosen, best})


def _fmt(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else str(v)


def tune_markdown(result: Any) -> str:
    """A markdown summary: the choice, the passes, and the CV table (sampled for a long α path)."""
    rows = result.table()
    mean = np.where(np.isfinite(result.mean), result.mean, np.inf)
    minimum = tuple(int(i) for i in np.unravel_index(int(np.argmin(mean)), mean.shape))
    best = tuple(result.best)
    chosen = (f"learning rate **{result.lr:.6g}**" if result.kind == "lr"
              else f"α = **{result.alpha:.6g}**, l1_ratio = **{result.l1_ratio:g}**")
    refit = result.refit
    lines = [f"# gradpipe tune `{result.tune_id}`", "",
             f"**{result.model}**, {result.n_folds}-fold CV, rule **{result.select}**: {chosen} "
             f"(mean held-out deviance {_fmt(float(result.mean[best]))} ± {_fmt(float(result.se[best]))}).", "",
             f"Passes over the data: {result.passes:g} for the tune, {result.total_passes:g} with the refit.", ""]
    if refit is not None:
        lines += [f"Refit run `{refit.run_id}`: **{refit.status}** ({refit.message}).", ""]
    for w in result.warnings:
        lines += [f"Warning: {w}", ""]
    if result.kind == "lr":
        lines += ["| lr | mean deviance | SE | |", "|---:|---:|---:|---|"]
        for g, row in enumerate(rows):
            mark = " ".join(m for m, on in (("**chosen**", row["chosen"]), ("min", (g,) == minimum)) if on)
            lines.append(f"| {row['lr']:.6g} | {_fmt(row['mean_deviance'])} | {_fmt(row['se'])} | {mark} |")
        return "\n".join(lines)
    L = result.alphas.shape[1]
    lines += ["| l1_ratio | α | mean deviance | SE | |", "|---:|---:|---:|---:|---|"]
    for r in range(len(result.l1_ratios)):
        keep = table_indices(L, best[1] if best[0] == r else 0, minimum[1] if minimum[0] == r else 0)
        for j in keep:
            row = rows[r * L + j]
            mark = " ".join(m for m, on in (("**chosen**", row["chosen"]), ("min", (r, j) == minimum)) if on)
            lines.append(f"| {row['l1_ratio']:g} | {row['alpha']:.6g} | {_fmt(row['mean_deviance'])} | "
                         f"{_fmt(row['se'])} | {mark} |")
    if L > 20:
        lines += ["", f"(every 10th of {L} α values, plus the last, the chosen and the minimum; the full table is "
                      f"in the tune store's `result` attribute)"]
    return "\n".join(lines)
