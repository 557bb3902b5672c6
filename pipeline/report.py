"""Human-facing summaries of a run: a sampled loss table (markdown) and a loss-curve PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.inference import table
from pipeline.store.runs import RunStore


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


def loss_curve_png(store: RunStore, out: Path) -> Path:
    """Plot loss (log scale) against iteration; written next to the run's arrays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = store.column("loss")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(np.arange(len(loss)), loss, lw=1.5)
    if np.all(loss > 0):
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(f"{store.model} / {store.solver}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
