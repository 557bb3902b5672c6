"""The chunk engine without a cluster: the same kernels over the same leaves, combined up the same tree.

For data that fits in the driver's memory (an estimator's ``fit`` on NumPy arrays, ``train(engine=
"inprocess")``), starting a LocalCluster costs seconds and needs worker processes (a ``__main__`` guard
under spawn). This engine reads each leaf of the Zarr store once and keeps it, runs every kernel on it with
one BLAS thread, as the workers do, and combines the results with :func:`pipeline.engine.reduce_tree` and
the same ``fan_in``: the tree fixes what is added to what, in which order, so the bits equal a cluster's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

import pipeline.losses  # noqa: F401  (the kernels' module, loaded before the first pass)
from pipeline.engine import ChunkLayout, Combine, Kernel, _FoldingTree, _root, add, apply, reduce_tree
from pipeline.store.dataset import read_rows


class InProcessEngine:
    """:class:`pipeline.engine.ChunkEngine`'s interface (``map_reduce``, ``close``, ``layout``, ``n_rows``,
    ``persisted``, ``fan_in``, ``name``) on the driver, with the leaves held in memory."""

    def __init__(self, *, store: str, n_rows: int, chunk_rows: int, n_features: int, itemsize: int,
                 fan_in: int = 8):
        if fan_in < 2:
            raise ValueError("fan_in must be at least 2")
        self.store, self.fan_in, self.n_rows = store, fan_in, n_rows
        self.layout = ChunkLayout.regular(n_rows, chunk_rows, n_features, itemsize)
        self.nbytes = n_rows * (n_features + 1) * itemsize
        self.name = Path(str(store).rstrip("/")).name.removesuffix(".zarr")
        self.persisted = True
        self._leaves = [read_rows(store, a, b) for a, b in self.layout.bounds]

    @classmethod
    def of_arrays(cls, X: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, offset: np.ndarray | None = None,
                  *, chunk_rows: int | None = None, fan_in: int = 8) -> InProcessEngine:
        """An engine over in-memory arrays, split into leaves of ``chunk_rows`` rows (default: one leaf):
        the objective's passes on data that never was a store (tests of solvers; small experiments)."""
        self = cls.__new__(cls)
        n, d = X.shape
        self.store, self.fan_in, self.n_rows, self.name, self.persisted = "<arrays>", fan_in, n, "arrays", True
        self.layout = ChunkLayout.regular(n, chunk_rows or max(n, 1), d, X.dtype.itemsize)
        self.nbytes = X.nbytes + y.nbytes

        def part(a, lo, hi):
            return None if a is None else np.ascontiguousarray(a[lo:hi], dtype=np.float64)
        self._leaves = [(np.ascontiguousarray(X[a:b]), np.ascontiguousarray(y[a:b]), part(w, a, b), part(offset, a, b))
                        for a, b in self.layout.bounds]
        return self

    def map_reduce(self, kernel: Kernel, *args: Any, positions: list[int] | None = None,
                   combine: Combine = add, result_bytes: int = 0) -> np.ndarray:
        """``kernel(X_k, y_k, *args)`` over all leaves (or ``positions``), combined up the fixed tree; sums are
        folded as the leaves come, as on a worker (``result_bytes`` is for the cluster engine's planning)."""
        chosen = range(len(self.layout)) if positions is None else sorted(set(positions))
        with threadpool_limits(1):  # as on the workers: thread count changes the bits of BLAS sums
            if combine is add:
                tree = _FoldingTree(list(range(len(chosen))), len(chosen), self.fan_in)
                for i, p in enumerate(chosen):
                    tree.insert(0, i, self._apply(kernel, p, args))
                return _root(tree.nodes)
            nodes = {(0, i): self._apply(kernel, p, args) for i, p in enumerate(chosen)}
            return _root(reduce_tree(nodes, len(nodes), self.fan_in, combine))

    def _apply(self, kernel: Kernel, position: int, args: tuple) -> np.ndarray:
        return apply(kernel, self._leaves[position], self.layout.bounds[position][0], args)

    def close(self) -> None:
        self._leaves = []
