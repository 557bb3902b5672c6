"""Mergeable per-feature statistics (count, mean, M2, min, max).

Chunks are summarised independently on the workers and merged on the driver with the parallel-variance
formula (Chan, Golub & LeVeque), so statistics never need a second pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureStats:
    count: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def empty(cls, d: int) -> FeatureStats:
        return cls(0, np.zeros(d), np.zeros(d), np.full(d, np.inf), np.full(d, -np.inf))

    @classmethod
    def of(cls, X: np.ndarray) -> FeatureStats:
        """Statistics of one block of rows, (n, d)."""
        return cls.of_columns(np.asarray(X).T)

    @classmethod
    def of_columns(cls, XT: np.ndarray) -> FeatureStats:
        """Statistics of one block given feature-major, (d, n): fastest when each feature is contiguous.

        Two passes per feature (mean, then the sum of squared deviations), accumulated in float64.
        """
        XT = np.asarray(XT)
        d, n = XT.shape
        if n == 0:
            return cls.empty(d)
        mean = XT.sum(axis=1, dtype=np.float64) / n
        m2 = np.empty(d)
        for j in range(d):
            dev = np.subtract(XT[j], mean[j], dtype=np.float64)
            m2[j] = dev @ dev
        return cls(n, mean, m2, XT.min(axis=1).astype(np.float64), XT.max(axis=1).astype(np.float64))

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return FeatureStats(n, mean, m2, np.minimum(self.min, other.min), np.maximum(self.max, other.max))

    @property
    def variance(self) -> np.ndarray:
        """Population variance (ddof=0), the one standardization uses."""
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)

    def scale(self) -> np.ndarray:
        """Standard deviations with constant features mapped to 1, so standardizing never divides by 0."""
        s = self.std
        return np.where(s > 0, s, 1.0)

    def to_json(self) -> dict:
        return {
            "count": self.count,
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict) -> FeatureStats:
        return cls(
            int(data["count"]),
            *(np.asarray(data[k], dtype=np.float64) for k in ("mean", "m2", "min", "max")),
        )
