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
        """Statistics of one block of rows (float64 accumulation)."""
        X = np.asarray(X, dtype=np.float64)
        if X.shape[0] == 0:
            return cls.empty(X.shape[1])
        mean = X.mean(axis=0)
        return cls(int(X.shape[0]), mean, ((X - mean) ** 2).sum(axis=0), X.min(axis=0), X.max(axis=0))

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
