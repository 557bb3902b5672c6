"""What a dataset must pass before a fit starts: values float64 can square and sum, a target in the family's
domain. Decided from the statistics ingest recorded where it can (no pass, no cluster), else by one pass."""

from __future__ import annotations

import numpy as np

from pipeline.errors import GradpipeError
from pipeline.objective import ClusterObjective
from pipeline.store.dataset import open_dataset

# Beyond this magnitude squares, cross-products and their sums over rows leave float64's range (≈1.8e308):
# the statistics, Grams and losses turn to inf. No real feature or target is this large in its own units.
MAX_ABS = 1e100


def check_magnitudes(info) -> None:
    """Refuse a feature or target too large for float64 arithmetic, from the ingest statistics (no pass)."""
    if not info.n_rows:
        return
    columns = list(zip(info.feature_names, np.maximum(np.abs(info.stats.min), np.abs(info.stats.max)),
                       strict=True))
    if info.target_stats is not None:
        columns.append((info.target, max(abs(info.target_stats.min), abs(info.target_stats.max))))
    for name, biggest in columns:
        if not biggest <= MAX_ABS:
            raise GradpipeError(f"column {name!r} holds values as large as {biggest:.3g} in magnitude: beyond "
                                f"{MAX_ABS:g} their squares and sums overflow float64 and no solver can fit them. "
                                "Rescale that column (other units, or a log) and ingest again.")


def check_target_domain(info, fam) -> bool:
    """Refuse a target outside the family's domain from the summary ingest recorded (no pass, no cluster).
    True when the summary settles it; False without one (an older dataset): then a pass must check."""
    summary = info.target_stats
    verdict = None if summary is None else fam.y_in_domain(summary)
    if verdict is None:
        return False
    if verdict:
        return True
    count = fam.y_outside_count(summary)
    if count is None:  # a bound that only min(y) decides: the summary's first such row (older ones: read it)
        example, row = fam.first_outside(summary) or _first_invalid(open_dataset(info.ref), fam)
        raise _outside_domain(fam, info.target, f"values outside it (e.g. {example:g} in row {row}; "
                                                f"min {summary.min:g})")
    example = "" if summary.example is None else f" (e.g. {summary.example:g} in row {summary.example_row})"
    raise _outside_domain(fam, info.target, f"{count} other values{example}")


def _outside_domain(fam, target: str, what: str) -> GradpipeError:
    return GradpipeError(f"--model {fam.name} needs {fam.y_domain()} in the target; column {target!r} holds "
                         f"{what}.{fam.y_advice()}")


def check_target(objective: ClusterObjective, ds) -> None:
    """The domain check for a dataset whose ingest recorded no target summary: one pass on the cluster."""
    fam = objective.problem.family
    if not fam.checks_y or check_target_domain(ds, fam):
        return
    bad, _, _ = objective.target_summary()  # counts are sums: they survive the tree
    if bad:
        example, row = _first_invalid(ds, fam)
        raise _outside_domain(fam, ds.target, f"{bad} other values (e.g. {example:g} in row {row})")


def _first_invalid(ds, fam) -> tuple[float, int]:
    """An example for the message, read on the driver chunk by chunk (error path only)."""
    for start in range(0, ds.n_rows, ds.chunk_rows):
        y = np.asarray(ds.y[start:start + ds.chunk_rows].compute(scheduler="sync"), dtype=np.float64)
        bad = np.flatnonzero(fam.invalid_y(y))
        if bad.size:
            return float(y[bad[0]]), start + int(bad[0])
    raise AssertionError("the cluster counted invalid targets that the driver cannot find")
