"""Penalties on the weights (pure NumPy). L2 today; L1 and elastic net add a proximal operator here.

Parameters θ live in the standardized space (``θ[:d]`` weights of ``(x − mean)/scale``, ``θ[d]`` the
intercept), but a penalty acts on the ORIGINAL-space weights ``w/scale``, so the fitted model does not
depend on the internal standardization (it matches scikit-learn's Ridge on raw features). The intercept is
never penalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class L2:
    """(λ/2)·‖w/scale‖²."""

    lam: float = 0.0

    @property
    def active(self) -> bool:
        return self.lam > 0

    def _weights(self, theta: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return np.asarray(theta[:-1], dtype=np.float64) / scale

    def value(self, theta: np.ndarray, scale: np.ndarray) -> float:
        w = self._weights(theta, scale)
        return 0.5 * self.lam * float(w @ w)

    def grad(self, theta: np.ndarray, scale: np.ndarray) -> np.ndarray:
        g = np.zeros(len(theta))
        g[:-1] = self.lam * self._weights(theta, scale) / scale
        return g

    def hess_diag(self, scale: np.ndarray) -> np.ndarray:
        """The penalty's Hessian is diagonal: λ/scale² on the weights, 0 on the intercept."""
        return np.append(self.lam / scale**2, 0.0)

    def prox(self, theta: np.ndarray, step: np.ndarray | float, scale: np.ndarray) -> np.ndarray:
        """argmin_u ½‖u − θ‖²/step + penalty(u): for L2 a shrinkage of the weights."""
        out = np.array(theta, dtype=np.float64, copy=True)
        out[:-1] /= 1.0 + np.broadcast_to(step, out.shape)[:-1] * self.lam / scale**2
        return out

    def min_norm_subgradient(self, theta: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """The stopping rule's measure of optimality: L2 is smooth, so it is the gradient itself (an L1 term
        replaces it by the minimum-norm element of the subdifferential, which reaches 0 at a kink)."""
        return grad

    def describe(self) -> str:
        return f"l2 {self.lam:g}" if self.active else "unpenalized"
