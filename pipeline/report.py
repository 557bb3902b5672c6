"""Human-facing summaries of a run: a sampled loss table (markdown) and a loss-curve PNG."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np

from pipeline.errors import GradpipeError
from pipeline.inference import table
from pipeline.store import location
from pipeline.store.runs import REPORT_GROUP, RunStore


def sampled_rows(n: int, k: int = 20) -> list[int]:
    """About ``k`` rows spread log-uniformly (early iterations move most), always with the last."""
    if n <= k:
        return list(range(n))
    picks = np.unique(np.round(np.geomspace(1, n, k)).astype(int) - 1)
    return sorted({0, *picks.tolist(), n - 1})


def markdown(store: RunStore, run_id: str, metrics: dict[str, float], decision: dict | None = None) -> str:
    loss, gnorm, lr, elapsed = (store.column(c) for c in ("loss", "grad_norm", "lr", "elapsed"))
    lines = [f"# gradpipe run `{run_id}`", "",
             f"**{store.model}** / **{store.solver}** on `{store.dataset.uri}` — status "
             f"**{store.status}** after {len(loss) - 1} iterations ({store.message}).", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if decision:
        lines += ["", f"Publish: **{'yes' if decision['publish'] else 'no'}** — {decision['reason']}"]
    lines += [f"\nWarning: {w}" for w in store.warnings]
    if store.inference is not None:
        lines += ["", "Inference:", "", "```", *table(store.inference), "```"]
    lines += ["", "| iteration | loss | ‖∇L‖ | step | seconds |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {t} | {loss[t]:.10g} | {gnorm[t]:.3e} | {lr[t]:.3g} | {elapsed[t]:.2f} |"
              for t in sampled_rows(len(loss))]
    return "\n".join(lines)


LOSS_CURVE_FILE = "loss_curve.png"
FIGSIZE, DPI = (6.0, 4.0), 90  # ~540×360 px, a few tens of KB: small enough to inline in a Prefect artifact


def _positive(values: np.ndarray) -> np.ndarray:
    """``values`` with every point a log axis cannot show (≤ 0, NaN, ±inf) replaced by NaN (a gap)."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values) & (values > 0), values, np.nan)


def loss_curve_series(store: RunStore) -> dict[str, np.ndarray | float | int]:
    """What the loss curve plots, per committed iteration t = 0 … T−1.

    ``gap`` is L_t − L_best with L_best = min_t L_t over the run (ignoring NaN). It is what shows a run
    that looks "flat" on a plain loss plot but is still orders of magnitude from the best value it reached.
    On a log axis the exact-best point (gap 0, and any later tie) cannot be drawn; rather than add an
    arbitrary ``tiny`` that would invent a floor (and flatten the tail's real slope), those points are
    dropped (NaN, a gap in the line) and the best iteration is marked with a vertical line instead.
    L_best is the run's own best, not the true optimum: the gap always dives at the best iteration (the
    last, for a descent method), so read the tail's level, and ‖∇L‖ below, for how far the run still is.
    Non-finite losses (a diverged run) are dropped the same way. ``grad_norm`` is ‖∇L(θ_t)‖ from the store,
    with zeros and non-finite values likewise dropped. ``L_best`` is NaN and ``best`` −1 when no loss is finite.
    """
    loss = np.asarray(store.column("loss"), dtype=np.float64)
    gnorm = np.asarray(store.column("grad_norm"), dtype=np.float64)
    finite = np.isfinite(loss)
    best = int(np.argmin(np.where(finite, loss, np.inf))) if finite.any() else -1
    l_best = float(loss[best]) if best >= 0 else float("nan")
    return {"iteration": np.arange(len(loss)), "gap": _positive(loss - l_best), "grad_norm": _positive(gnorm),
            "L_best": l_best, "best": best}


def loss_curve_title(store: RunStore) -> str:
    return f"{store.run_id} — {store.model}/{store.solver} — {store.status}"


def loss_curve_figure(store: RunStore):
    """The loss-curve figure: L_t − L_best (log) above ‖∇L_t‖ (log), sharing an integer iteration axis.

    A plain ``matplotlib.figure.Figure`` on an Agg canvas, never registered with pyplot: nothing global
    to leak or close, safe in worker threads, and no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, MaxNLocator

    s = loss_curve_series(store)
    t, n = s["iteration"], len(s["iteration"])
    style = {"lw": 1.5, "marker": "o" if n <= 60 else None, "ms": 3}
    fig = Figure(figsize=FIGSIZE, dpi=DPI)  # fixed margins: a layout engine triples the cost
    fig.subplots_adjust(left=0.14, right=0.97, top=0.89, bottom=0.12, hspace=0.25)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(t, s["gap"], color="C0", gid="gap", **style)
    bottom.plot(t, s["grad_norm"], color="C1", gid="grad_norm", **style)
    for ax, values, label in ((top, s["gap"], "L − L_best"), (bottom, s["grad_norm"], "‖∇L‖")):
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))  # every minor tick costs: 2 and 5 suffice
        ax.grid(alpha=0.3)
        if not np.isfinite(values).any():  # nothing a log axis can show: say so instead of an empty box
            ax.set_ylim(1e-1, 1e1)
            ax.text(0.5, 0.5, "no positive values to plot", transform=ax.transAxes, ha="center",
                    va="center", color="0.4")
    if s["best"] >= 0:
        top.axvline(s["best"], color="0.5", ls=":", lw=1, gid="best")
        top.text(0.99, 0.95, f"L_best = {s['L_best']:.10g} at iteration {s['best']} (dotted)", fontsize=8,
                 transform=top.transAxes, ha="right", va="top", color="0.3")
    bottom.set_xlabel("iteration")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    if n <= 2:  # one or two rows (the exact solver): a readable 0 … 1 axis, not autoscale's −0.05 … 1.05
        bottom.set_xlim(-0.5, 1.5)
    fig.suptitle(loss_curve_title(store), fontsize=10, y=0.975)
    return fig


def loss_curve_png(store: RunStore, out: str | Path) -> str | Path:
    """Write the loss-curve figure as a PNG at ``out`` (atomically: a temporary file renamed over it)."""
    return save_png(loss_curve_figure(store), out)


def save_png(fig, out: str | Path) -> str | Path:
    """Write a figure as a PNG at ``out`` atomically: locally a temporary file renamed over it; on an object
    store one PUT of the whole picture (an object is never seen half-written)."""
    if location.is_remote(out):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        fs, path = location.filesystem(out)
        try:
            fs.pipe_file(path, buf.getvalue())
        except OSError as exc:
            raise GradpipeError(f"cannot write {out}: {exc}.") from None
        return str(out)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def loss_curve_path(store_path: str | Path) -> str | Path:
    """Where a run's loss curve lives: ``<store>/report/loss_curve.png`` (a ``Path`` for a local store)."""
    if location.is_remote(store_path):
        return location.join(store_path, REPORT_GROUP, LOSS_CURVE_FILE)
    return Path(store_path) / REPORT_GROUP / LOSS_CURVE_FILE


def write_loss_curve(store_path: str | Path) -> str | Path:
    """Write the run's loss curve inside its store, at ``loss_curve_path`` (what ``gradpipe train`` calls):
    in the store's report group (:meth:`RunStore.report_dir`), so the arrays are untouched. Rewriting it
    after a resume replaces the old picture."""
    store = RunStore.open(store_path)
    report = store.report_dir()
    out = location.join(report, LOSS_CURVE_FILE) if location.is_remote(report) else Path(report) / LOSS_CURVE_FILE
    return loss_curve_png(store, out)


def loss_curve_data_uri(png_path: str | Path) -> str:
    """The PNG as a ``data:image/png;base64,…`` URI: a markdown ``![](…)`` the Prefect UI renders inline."""
    fs, path = location.filesystem(png_path)
    return "data:image/png;base64," + base64.b64encode(fs.cat_file(path)).decode("ascii")
