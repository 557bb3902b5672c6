"""Penalties on the weights (pure NumPy): elastic net ``λ₁‖w‖₁ + (λ₂/2)‖w‖²`` (L2 and lasso as special cases).

Parameters θ live in the standardized space (``θ[:d]`` weights of ``(x − mean)/scale``, ``θ[d]`` the
intercept), but a penalty acts on the ORIGINAL-space weights ``w = θ[:d]/scale``, so the fitted model does
not depend on the internal standardization (it matches scikit-learn's Ridge/Lasso/ElasticNet and glum on raw
features). In θ coordinates the penalty is separable: ``a_j|θ_j| + (b_j/2)θ_j²`` with ``a_j = λ₁/|s_j|`` and
``b_j = λ₂/s_j²``. The intercept is never penalized.

The smooth part (λ₂) has a gradient and a diagonal Hessian, which solvers add to the loss's; the L1 part has
neither, so solvers that support it use :meth:`ElasticNet.prox` (proximal gradient), :meth:`l1_weights` (the
coordinate-descent and OWL-QN solvers) and, to stop, :meth:`min_norm_subgradient`: ‖∇L‖ never reaches 0 at
a kink, the shortest element of the subdifferential does.

glum's and scikit-learn's ``alpha·(R‖w‖₁ + (1−R)/2‖w‖²)`` is ``λ₁ = alpha·R``, ``λ₂ = alpha·(1−R)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ElasticNet:
    """λ₁‖w/scale‖₁ + (λ₂/2)‖w/scale‖² on the weights of θ (never the intercept)."""

    l1: float = 0.0
    l2: float = 0.0

    @property
    def active(self) -> bool:
        return self.l1 > 0 or self.l2 > 0

    @property
    def smooth(self) -> bool:
        """No L1 term: the objective is differentiable and plain gradient methods apply."""
        return self.l1 == 0

    def _weights(self, theta: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return np.asarray(theta[:-1], dtype=np.float64) / scale

    def value(self, theta: np.ndarray, scale: np.ndarray) -> float:
        w = self._weights(theta, scale)
        out = 0.5 * self.l2 * float(w @ w) if self.l2 else 0.0
        return out + self.l1 * float(np.abs(w).sum()) if self.l1 else out

    def grad(self, theta: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Gradient of the smooth (λ₂) part."""
        g = np.zeros(len(theta))
        if self.l2:
            g[:-1] = self.l2 * self._weights(theta, scale) / scale
        return g

    def hess_diag(self, scale: np.ndarray) -> np.ndarray:
        """The smooth part's Hessian is diagonal: λ₂/scale² on the weights, 0 on the intercept."""
        return np.append(self.l2 / scale**2, 0.0)

    def l1_weights(self, scale: np.ndarray) -> np.ndarray:
        """``a`` with L1 part = Σ a_j |θ_j|: λ₁/|scale| on the weights, 0 on the intercept."""
        return np.append(self.l1 / np.abs(scale), 0.0)

    def l1_value(self, theta: np.ndarray, scale: np.ndarray) -> float:
        return float(self.l1_weights(scale) @ np.abs(theta)) if self.l1 else 0.0

    def prox(self, theta: np.ndarray, step: np.ndarray | float, scale: np.ndarray) -> np.ndarray:
        """argmin_u ½‖u − θ‖²/step + penalty(u), coordinatewise: soft-threshold by step·a, shrink by 1+step·b.

        Coefficients the threshold zeroes are exactly 0.0 (``np.maximum(…, 0)`` times the sign)."""
        theta = np.asarray(theta, dtype=np.float64)
        t = np.broadcast_to(np.asarray(step, dtype=np.float64), theta.shape)
        a, b = self.l1_weights(scale), self.hess_diag(scale)
        return np.sign(theta) * np.maximum(np.abs(theta) - t * a, 0.0) / (1.0 + t * b)

    def min_norm_subgradient(self, theta: np.ndarray, grad: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The shortest element of ∂F(θ), for ``grad`` the gradient of the smooth part (loss + λ₂ term):
        ``g_j + a_j·sign(θ_j)`` where θ_j ≠ 0, and ``sign(g_j)·max(|g_j| − a_j, 0)`` at θ_j = 0."""
        if self.l1 == 0:
            return grad
        a = self.l1_weights(scale)
        at_zero = np.sign(grad) * np.maximum(np.abs(grad) - a, 0.0)
        return np.where(theta != 0, grad + a * np.sign(theta), at_zero)

    def describe(self) -> str:
        parts = [f"l1 {self.l1:g}"] * bool(self.l1) + [f"l2 {self.l2:g}"] * bool(self.l2)
        return ", ".join(parts) if parts else "unpenalized"
