"""The problem a solver solves: family + penalty + standardization (pure NumPy).

Solvers and kernels receive a :class:`Problem`, never the user's config: what the objective is and in which
coordinates θ lives. The objective is ``L(θ) = Σ wᵢ ℓ(zᵢ, yᵢ)/Σ wᵢ + penalty(θ)`` with
``z = [(x − mean)/scale, 1]·θ + offset`` (w = 1 and offset = 0 for a dataset without them); kernels return
sums, and :meth:`Problem.finish` turns reduced sums into the mean objective, the gradient of its smooth part
and (for Newton) its Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.families import Family, get_family
from pipeline.penalty import ElasticNet


def check_scaling(d: int, mean: np.ndarray | None, scale: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Return float64 (mean, scale), defaulting to the identity transform."""
    m = np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64)
    s = np.ones(d) if scale is None else np.asarray(scale, dtype=np.float64)
    if m.shape != (d,) or s.shape != (d,):
        raise ValueError(f"mean/scale must have shape ({d},), got {m.shape} and {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s == 0):
        raise ValueError("scale must be finite and non-zero (use 1 for constant features)")
    return m, s


def to_original(theta: np.ndarray, mean: np.ndarray | None, scale: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Map standardized θ to raw-feature ``(coef, intercept)``: the model users see."""
    theta = np.asarray(theta, dtype=np.float64)
    m, s = check_scaling(theta.shape[0] - 1, mean, scale)
    coef = theta[:-1] / s
    return coef, float(theta[-1] - m @ coef)


def from_original(coef: np.ndarray, intercept: float, mean: np.ndarray | None,
                  scale: np.ndarray | None) -> np.ndarray:
    """Inverse of :func:`to_original`, for warm-starting from a raw-space model."""
    coef = np.asarray(coef, dtype=np.float64)
    m, s = check_scaling(coef.shape[0], mean, scale)
    return np.append(coef * s, float(intercept) + float(m @ coef))


def original_jacobian(mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """T with ``[coef, intercept] = T θ``: maps a covariance of θ to one of the reported coefficients."""
    d = len(scale)
    T = np.zeros((d + 1, d + 1))
    T[np.arange(d), np.arange(d)] = 1.0 / scale
    T[d, :d] = -mean / scale
    T[d, d] = 1.0
    return T


@dataclass(frozen=True)
class Problem:
    family: Family
    penalty: ElasticNet
    mean: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    feature_names: tuple[str, ...] = ()  # for messages only

    @classmethod
    def of(cls, family: str | Family, n_features: int, *, l1: float = 0.0, l2: float = 0.0,
           power: float | None = None, mean: np.ndarray | None = None, scale: np.ndarray | None = None,
           feature_names: list[str] | tuple[str, ...] = ()) -> Problem:
        m, s = check_scaling(n_features, mean, scale)
        return cls(get_family(family, power=power), ElasticNet(float(l1), float(l2)), m, s, tuple(feature_names))

    @property
    def n_params(self) -> int:
        return len(self.scale) + 1

    def finish(self, loss_sum: float, grad_sum: np.ndarray, n: float, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Reduced sums → (mean loss + penalty, the gradient of the smooth part); ``n`` is Σw (the row count
        for an unweighted dataset)."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        theta = np.asarray(theta, dtype=np.float64)
        return (float(loss_sum / n) + self.penalty.value(theta, self.scale),
                grad_sum / n + self.penalty.grad(theta, self.scale))

    def hessian(self, gram_sum: np.ndarray, n: float) -> np.ndarray:
        """The objective's Hessian from the summed weighted Gram Σ ℓ''·a aᵀ."""
        H = gram_sum / n
        H[np.diag_indices_from(H)] += self.penalty.hess_diag(self.scale)
        return H

    def hessian_bound(self, gram_mean: np.ndarray) -> np.ndarray:
        """H ⪰ ∇²L(θ) for every θ, from the mean Gram of ``[(x-mean)/scale, 1]``, when the family's ℓ'' is
        bounded (linear: the Hessian itself; logistic: ℓ'' ≤ 1/4); else a ValueError naming the way out."""
        if self.family.curvature_bound is None:
            raise ValueError(f"--lr auto needs a bound on the curvature, which the {self.family.name} family "
                             f"does not have; give --lr, or use --solver gd (a line search), newton or lbfgs.")
        H = gram_mean * self.family.curvature_bound
        H[np.diag_indices_from(H)] += self.penalty.hess_diag(self.scale)
        return H

    def min_norm_subgradient(self, theta: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """What stopping rules measure: ``grad`` itself for a smooth penalty (see ``ElasticNet``)."""
        return self.penalty.min_norm_subgradient(theta, grad, self.scale)

    def to_original(self, theta: np.ndarray) -> tuple[np.ndarray, float]:
        return to_original(theta, self.mean, self.scale)

    def from_original(self, coef: np.ndarray, intercept: float) -> np.ndarray:
        return from_original(coef, intercept, self.mean, self.scale)
