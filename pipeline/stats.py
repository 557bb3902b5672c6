"""Mergeable per-feature statistics (count, mean, M2, min, max; optionally sample-weighted), and a summary
of the target.

Chunks are summarised independently on the workers and merged on the driver with the parallel-variance
formula (Chan, Golub & LeVeque; with weight sums in place of counts when the dataset has sample weights),
so statistics never need a second pass over the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature count, mean, M2 (sum of squared deviations), min and max.

    With sample weights (``weight_sum`` set) the mean and M2 are the w-weighted ones, so standardization
    matches the weighted objective: a row with w = 0 moves neither, while ``count``, ``min`` and ``max``
    still cover every row (a zero-weight row is still data the model will be applied to). ``n_weighted``
    counts the rows with w > 0. Unweighted statistics leave both None and keep their original arithmetic
    and JSON bit for bit, so datasets without weights are unchanged.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray
    weight_sum: float | None = None
    n_weighted: int | None = None

    @property
    def weighted(self) -> bool:
        return self.weight_sum is not None

    @classmethod
    def empty(cls, d: int, weighted: bool = False) -> FeatureStats:
        return cls(0, np.zeros(d), np.zeros(d), np.full(d, np.inf), np.full(d, -np.inf),
                   *((0.0, 0) if weighted else (None, None)))

    @classmethod
    def of(cls, X: np.ndarray, w: np.ndarray | None = None) -> FeatureStats:
        """Statistics of one block of rows, (n, d), optionally weighted by ``w`` (n,)."""
        return cls.of_columns(np.asarray(X).T, w)

    @classmethod
    def of_columns(cls, XT: np.ndarray, w: np.ndarray | None = None) -> FeatureStats:
        """Statistics of one block given feature-major, (d, n): fastest when each feature is contiguous.

        Two passes per feature (mean, then the sum of squared deviations), accumulated in float64.
        """
        XT = np.asarray(XT)
        d, n = XT.shape
        if w is not None:
            return cls._weighted_columns(XT, np.asarray(w, dtype=np.float64))
        if n == 0:
            return cls.empty(d)
        mean = XT.sum(axis=1, dtype=np.float64) / n
        m2 = np.empty(d)
        with np.errstate(over="ignore"):  # beyond 1e154 M2 is inf: training refuses it with a clear message
            for j in range(d):
                dev = np.subtract(XT[j], mean[j], dtype=np.float64)
                m2[j] = dev @ dev
        return cls(n, mean, m2, XT.min(axis=1).astype(np.float64), XT.max(axis=1).astype(np.float64))

    @classmethod
    def _weighted_columns(cls, XT: np.ndarray, w: np.ndarray) -> FeatureStats:
        """Weighted two-pass statistics; a block whose weights are all 0 contributes only count/min/max."""
        d, n = XT.shape
        if n == 0:
            return cls.empty(d, weighted=True)
        total = float(w.sum())
        mean, m2 = np.zeros(d), np.zeros(d)
        if total > 0:
            for j in range(d):
                xj = XT[j].astype(np.float64, copy=False)
                mean[j] = (xj @ w) / total
                dev = xj - mean[j]
                dev *= dev  # in place: one temporary per feature, as in the unweighted path
                m2[j] = dev @ w
        return cls(n, mean, m2, XT.min(axis=1).astype(np.float64), XT.max(axis=1).astype(np.float64),
                   total, int(np.count_nonzero(w > 0)))

    def merge(self, other: FeatureStats) -> FeatureStats:
        if self.weighted != other.weighted:
            raise ValueError("cannot merge weighted with unweighted feature statistics")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        if self.weighted:
            return self._merge_weighted(other)
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        with np.errstate(over="ignore"):
            m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return FeatureStats(n, mean, m2, np.minimum(self.min, other.min), np.maximum(self.max, other.max))

    def _merge_weighted(self, other: FeatureStats) -> FeatureStats:
        """Chan et al.'s update with weight sums in place of counts (West 1979)."""
        wa, wb = float(self.weight_sum or 0.0), float(other.weight_sum or 0.0)
        total = wa + wb
        if wb == 0:
            mean, m2 = self.mean, self.m2
        elif wa == 0:
            mean, m2 = other.mean, other.m2
        else:
            delta = other.mean - self.mean
            mean = self.mean + delta * (wb / total)
            m2 = self.m2 + other.m2 + delta**2 * (wa * wb / total)
        return FeatureStats(self.count + other.count, mean, m2, np.minimum(self.min, other.min),
                            np.maximum(self.max, other.max), total,
                            int(self.n_weighted or 0) + int(other.n_weighted or 0))

    @property
    def variance(self) -> np.ndarray:
        """Population variance (ddof=0), the one standardization uses; weighted: M2 / Σw."""
        if self.weighted:
            return self.m2 / (self.weight_sum if self.weight_sum else 1.0)
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)

    def scale(self) -> np.ndarray:
        """Standard deviations with constant features mapped to 1, so standardizing never divides by 0."""
        s = self.std
        return np.where(s > 0, s, 1.0)

    def to_json(self) -> dict:
        """The weighted fields are written only when set: an unweighted dataset's attrs keep their keys.
        Non-finite values (a column whose squares overflow) are written as Zarr's strings "Infinity",
        "-Infinity", "NaN": attributes are strict JSON, and Icechunk refuses a bare Infinity."""
        return {
            "count": self.count,
            "mean": _json_floats(self.mean),
            "m2": _json_floats(self.m2),
            "min": _json_floats(self.min),
            "max": _json_floats(self.max),
            **({} if not self.weighted else {"weight_sum": self.weight_sum, "n_weighted": self.n_weighted}),
        }

    @classmethod
    def from_json(cls, data: dict) -> FeatureStats:
        weighted = data.get("weight_sum") is not None
        return cls(
            int(data["count"]),
            *(np.asarray([float(v) for v in data[k]], dtype=np.float64) for k in ("mean", "m2", "min", "max")),
            float(data["weight_sum"]) if weighted else None,
            int(data["n_weighted"]) if weighted else None,
        )


def _json_floats(values: np.ndarray) -> list:
    """Floats for JSON; ±inf and NaN as the strings ``float()`` reads back (Zarr's own convention)."""
    return [v if math.isfinite(v) else ("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity"))
            for v in values.tolist()]


@dataclass(frozen=True)
class TargetStats:
    """A mergeable summary of the target column: enough for ``gradpipe train`` to refuse a target outside
    the family's domain from the dataset attrs alone, before any cluster starts.

    ``n_not_binary`` counts values other than 0 and 1 (logistic regression's domain); ``min``/``max`` let a
    family with a bound (y ≥ 0, y > 0) decide too. ``example``/``example_row`` are the first value that is
    not 0/1 and its dataset row (0-based, after dropped rows), so the error message needs no read of ``y``.
    Pieces are summarised on the workers with piece-local rows and shifted on the driver (:meth:`shifted`),
    which merges them in row order: no second pass over the data.
    """

    count: int
    min: float
    max: float
    n_not_binary: int
    example: float | None = None
    example_row: int | None = None
    # the first y < 0 and the first y ≤ 0 as (value, row): a bounded family's message names the row without a
    # read of y (None: there is none, or a dataset summarised before they existed)
    first_negative: tuple[float, int] | None = None
    first_nonpositive: tuple[float, int] | None = None

    @classmethod
    def empty(cls) -> TargetStats:
        return cls(0, math.inf, -math.inf, 0)

    @classmethod
    def of(cls, y: np.ndarray) -> TargetStats:
        """Summary of one block of targets; rows are numbered from 0 within the block."""
        y = np.asarray(y)
        if y.size == 0:
            return cls.empty()
        bad = (y != 0) & (y != 1)  # a bool mask and argmax: no index array as long as y for a continuous target
        n_bad = int(np.count_nonzero(bad))
        first = int(bad.argmax()) if n_bad else None

        def first_where(mask: np.ndarray) -> tuple[float, int] | None:
            i = int(mask.argmax())
            return (float(y[i]), i) if mask[i] else None
        return cls(int(y.size), float(y.min()), float(y.max()), n_bad,
                   None if first is None else float(y[first]), first, first_where(y < 0), first_where(y <= 0))

    def shifted(self, offset: int) -> TargetStats:
        """The same summary for a block that starts at dataset row ``offset``."""
        if offset == 0:
            return self

        def move(first: tuple[float, int] | None) -> tuple[float, int] | None:
            return None if first is None else (first[0], first[1] + offset)
        return replace(self, example_row=None if self.example_row is None else self.example_row + offset,
                       first_negative=move(self.first_negative), first_nonpositive=move(self.first_nonpositive))

    def merge(self, other: TargetStats) -> TargetStats:
        """Combine two summaries (rows already global); the example kept is the one in the earlier row."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        with_example = [s for s in (self, other) if s.example_row is not None]
        first = min(with_example, key=lambda s: s.example_row or 0) if with_example else None
        def earliest(a: tuple[float, int] | None, b: tuple[float, int] | None) -> tuple[float, int] | None:
            return a if b is None or (a is not None and a[1] <= b[1]) else b
        return TargetStats(self.count + other.count, min(self.min, other.min), max(self.max, other.max),
                           self.n_not_binary + other.n_not_binary,
                           None if first is None else first.example, None if first is None else first.example_row,
                           earliest(self.first_negative, other.first_negative),
                           earliest(self.first_nonpositive, other.first_nonpositive))

    def to_json(self) -> dict:
        """JSON-safe: an empty summary's ±inf bounds are written as null (Zarr attrs are strict JSON)."""
        return {
            "count": self.count,
            "min": self.min if math.isfinite(self.min) else None,
            "max": self.max if math.isfinite(self.max) else None,
            "n_not_binary": self.n_not_binary,
            "example": self.example,
            "example_row": self.example_row,
            **{k: list(v) for k, v in (("first_negative", self.first_negative),
                                       ("first_nonpositive", self.first_nonpositive)) if v is not None},
        }

    @classmethod
    def from_json(cls, data: dict) -> TargetStats:
        return cls(
            int(data["count"]),
            math.inf if data.get("min") is None else float(data["min"]),
            -math.inf if data.get("max") is None else float(data["max"]),
            int(data["n_not_binary"]),
            None if data.get("example") is None else float(data["example"]),
            None if data.get("example_row") is None else int(data["example_row"]),
            *((None if data.get(k) is None else (float(data[k][0]), int(data[k][1])))
              for k in ("first_negative", "first_nonpositive")),
        )
