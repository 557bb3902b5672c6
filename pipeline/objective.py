"""The objective on the cluster: the passes a solver can ask for, each one read of every leaf.

Kinds of pass (docs/design.md §3): value+gradient, value+gradient+weighted Gram (Newton), the TSQR R factor
(exact least squares), and the Gram of the standardized data (the curvature bound of ``--lr auto``).
Each is one ``map_reduce`` of a kernel from ``pipeline.losses`` with its combine; ``passes`` counts them, and
that count is what the run store's ``passes`` column and the benchmarks report.
"""

from __future__ import annotations

import numpy as np

from pipeline import losses
from pipeline.engine import ChunkEngine
from pipeline.families import Family
from pipeline.problem import Problem


# ---- kernels shipped to the workers (module level: pickled by reference) ---------------------------
# A leaf is (X, y, w, offset); w and offset are None for a dataset without them.
def _sums(X, y, w, offset, family: Family, theta, mean, scale) -> np.ndarray:
    return losses.chunk_sums(family, X, y, theta, mean, scale, w=w, offset=offset)


def _newton(X, y, w, offset, family: Family, theta, mean, scale, fisher: bool = False) -> np.ndarray:
    return losses.chunk_newton(family, X, y, theta, mean, scale, w=w, offset=offset, fisher=fisher)


def _qr(X, y, w, offset, mean, scale) -> np.ndarray:
    return losses.chunk_qr(X, y, mean, scale, w=w, offset=offset)


def _gram(X, y, w, offset, mean, scale) -> np.ndarray:
    return losses.chunk_gram(X, mean, scale, w=w)


def invalid_targets(X, y, w, offset, family: Family) -> np.ndarray:
    """``[#targets outside the family's domain, Σw, Σ wy]`` of a leaf (training's check, evaluate's too)."""
    return losses.chunk_invalid_y(family, y, w)


class ClusterObjective:
    """L(θ) = mean loss + penalty of ``problem``, evaluated by the engine; counts passes over the data."""

    def __init__(self, engine: ChunkEngine, problem: Problem, weight_sum: float | None = None,
                 weighted_rows: int | None = None, weighted: bool = False, has_offset: bool = False):
        self.engine, self.problem = engine, problem
        self.n_chunks = len(engine.layout)
        self.n_rows = engine.n_rows
        self.weight_sum = float(engine.n_rows if weight_sum is None else weight_sum)  # Σw: what means divide by
        self.weighted_rows = engine.n_rows if weighted_rows is None else weighted_rows  # rows with w > 0
        self.weighted = weighted  # the data carry sample weights (inference's likelihoods need to know)
        self.has_offset = has_offset  # and an offset (the null model is fitted with it)
        self.passes = 0.0
        self._bound: np.ndarray | None = None

    @property
    def _gram_bytes(self) -> int:
        """What one leaf's Gram takes: large ones are folded as they come (``map_reduce``)."""
        return 8 * self.problem.n_params ** 2

    @property
    def _args(self) -> tuple:
        p = self.problem
        return p.family, p.mean, p.scale

    def value_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        self.passes += 1
        fam, mean, scale = self._args
        sums = self.engine.map_reduce(_sums, fam, theta, mean, scale)
        return self.problem.finish(sums[-2], sums[:-2], sums[-1], theta)

    def subset(self, theta: np.ndarray, positions: list[int]) -> tuple[float, np.ndarray]:
        """Value and gradient over the leaves at ``positions`` (a mini-batch): a fraction of a pass."""
        self.passes += len(positions) / self.n_chunks
        fam, mean, scale = self._args
        sums = self.engine.map_reduce(_sums, fam, theta, mean, scale, positions=positions)
        return self.problem.finish(sums[-2], sums[:-2], sums[-1], theta)

    def newton(self, theta: np.ndarray, fisher: bool = False) -> tuple[float, np.ndarray, np.ndarray, dict[str, float]]:
        """Value, gradient, Hessian of L at θ, and the raw sums inference needs (``gram_sum``; ``n`` = Σw,
        ``rows`` with w > 0, ``sum_y`` = Σwy, ``pearson``, ``y_terms``: see ``losses.newton_layout``): one pass.
        ``fisher``: the Hessian of the expected information (inference for a non-canonical link)."""
        self.passes += 1
        fam, mean, scale = self._args
        flat = self.engine.map_reduce(_newton, fam, theta, mean, scale, fisher, result_bytes=self._gram_bytes)
        at = losses.newton_layout(self.problem.n_params, fam.n_y_terms)
        p, n = self.problem.n_params, float(flat[at["n"]][0])
        gram_sum = flat[at["gram"]].reshape(p, p)
        loss, grad = self.problem.finish(float(flat[at["loss"]][0]), flat[at["grad"]], n, theta)
        info = {"gram_sum": gram_sum, "n": n, "sum_y": float(flat[at["sum_y"]][0]),
                "rows": float(flat[at["rows"]][0]), "pearson": float(flat[at["pearson"]][0]),
                "y_terms": flat[at["y_terms"]].copy()}
        return loss, grad, self.problem.hessian(gram_sum, n), info

    def r_factor(self) -> np.ndarray:
        """R of ``[1 | X_std | y]`` over all rows: TSQR up the fixed tree, one pass."""
        self.passes += 1
        _, mean, scale = self._args
        return self.engine.map_reduce(_qr, mean, scale, combine=losses.qr_combine)

    def hessian_bound(self) -> np.ndarray:
        """H ⪰ ∇²L everywhere, from one Gram pass (cached)."""
        if self._bound is None:
            self.passes += 1
            _, mean, scale = self._args
            gram = self.engine.map_reduce(_gram, mean, scale, result_bytes=self._gram_bytes)
            gram /= self.weight_sum  # in place: the pass's result is ours, and d² floats can be a GB
            self._bound = self.problem.hessian_bound(gram)
        return self._bound

    def target_summary(self) -> tuple[int, float, float]:
        """(#targets outside the family's domain, Σw, Σ wy): a check, not a solver pass (not counted)."""
        bad, n, sum_y = self.engine.map_reduce(invalid_targets, self.problem.family)
        return int(bad), float(n), float(sum_y)
