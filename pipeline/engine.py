"""The per-iteration work on the cluster: map a chunk kernel over co-located (X, y) chunks, tree-reduce.

Design (DESIGN.md §3), with one departure measured on this 2-core machine: a Dask task costs ~1 ms of
scheduler and worker time, so one task *per chunk* per iteration (64 chunks → ~70 ms) cannot meet a 10 ms
per-iteration budget. Instead each worker gets ONE task per iteration that runs the kernel over all the
chunks it holds. The reduction is still a fixed-shape tree over chunk indices (fan-in ``fan_in``, like
Spark's ``treeAggregate``): each worker sums the complete sub-trees it owns, the driver sums the rest, in a
fixed left-to-right order. Where an addition happens never changes its operands or order, so results are
bitwise identical on 1, 2 or 8 workers, after a worker dies, and after a resume.

Chunks are loaded once, X and y of a chunk by the same task (so they live on the same worker), contiguous
chunk ranges per worker. When the data does not fit in the cluster's memory the chunks are streamed from
Zarr by the same per-worker tasks instead, one chunk in memory at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from distributed import Client, Future, wait

Node = tuple[int, int]  # (level, index) in the reduction tree; leaves are (0, chunk position)
Kernel = Callable[..., np.ndarray]  # kernel(X, y, *args) -> array of sums
PERSIST_FRACTION = 0.5  # persist when the data takes at most this share of the workers' memory


def reduce_tree(nodes: dict[Node, np.ndarray], n_leaves: int, fan_in: int) -> dict[Node, np.ndarray]:
    """Sum every node of the fixed tree whose children are all present; return what is left.

    With all leaves present the result is ``{(depth, 0): total}``. The order of additions depends only on
    ``n_leaves`` and ``fan_in``, never on which process holds which leaves.
    """
    nodes = dict(nodes)
    size, level = n_leaves, 0
    while size > 1:
        parents = -(-size // fan_in)
        for p in range(parents):
            kids = [(level, k) for k in range(p * fan_in, min((p + 1) * fan_in, size))]
            if all(k in nodes for k in kids):
                acc = np.array(nodes.pop(kids[0]), dtype=np.float64, copy=True)
                for k in kids[1:]:
                    acc += nodes.pop(k)
                nodes[(level + 1, p)] = acc
        size, level = parents, level + 1
    return nodes


def _load_store_chunk(path: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return group["X"][start:stop], group["y"][start:stop]


def _pair(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(X), np.asarray(y)


def _run_group(kernel: Kernel, args: tuple, positions: list[int], n_leaves: int, fan_in: int,
               *chunks: tuple[np.ndarray, np.ndarray]) -> dict[Node, np.ndarray]:
    leaves = {(0, p): kernel(X, y, *args) for p, (X, y) in zip(positions, chunks, strict=True)}
    return reduce_tree(leaves, n_leaves, fan_in)


def _run_group_streamed(kernel: Kernel, args: tuple, positions: list[int], n_leaves: int, fan_in: int,
                        path: str, ranges: list[tuple[int, int]]) -> dict[Node, np.ndarray]:
    leaves = {}
    for p, (start, stop) in zip(positions, ranges, strict=True):
        X, y = _load_store_chunk(path, start, stop)  # one chunk in memory at a time
        leaves[(0, p)] = kernel(X, y, *args)
    return reduce_tree(leaves, n_leaves, fan_in)


@dataclass
class ChunkLayout:
    """Row ranges of the chunks: fixed by the data, never by the cluster."""

    bounds: list[tuple[int, int]]

    @classmethod
    def regular(cls, n_rows: int, chunk_rows: int) -> ChunkLayout:
        return cls([(s, min(s + chunk_rows, n_rows)) for s in range(0, n_rows, chunk_rows)])

    @classmethod
    def from_chunks(cls, row_chunks: tuple[int, ...]) -> ChunkLayout:
        edges = [0, *itertools.accumulate(row_chunks)]
        return cls(list(itertools.pairwise(edges)))

    def __len__(self) -> int:
        return len(self.bounds)


class ChunkEngine:
    """Chunks of one dataset on the cluster and the map-reduce every solver step is made of."""

    def __init__(self, client: Client, *, layout: ChunkLayout, n_features: int, itemsize: int,
                 store: str | None = None, arrays: tuple[Any, Any] | None = None, persist: str = "auto",
                 fan_in: int = 8):
        if fan_in < 2:
            raise ValueError("fan_in must be at least 2")
        self.client, self.layout, self.fan_in, self.store = client, layout, fan_in, store
        self.n_rows = layout.bounds[-1][1] if layout.bounds else 0
        self.nbytes = self.n_rows * (n_features + 1) * itemsize
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"].items())
        if not workers:
            raise RuntimeError("the Dask cluster has no workers")
        memory = sum(w.get("memory_limit") or 0 for _, w in workers)
        if persist == "auto":
            persist = "yes" if store is None or not memory or self.nbytes <= PERSIST_FRACTION * memory else "no"
        if persist == "no" and store is None:
            raise ValueError("in-memory arrays cannot be streamed; use persist='yes'")
        self.persisted = persist == "yes"
        self.workers = [addr for addr, _ in workers]
        self.chunks: list[Future] = []
        if self.persisted:
            self._persist(arrays)
        self._iteration = 0
        self._plan()

    def _owner(self, position: int) -> str:
        return self.workers[position * len(self.workers) // len(self.layout)]

    def _persist(self, arrays: tuple[Any, Any] | None) -> None:
        submit = self.client.submit
        if arrays is None:
            self.chunks = [submit(_load_store_chunk, self.store, a, b, workers=[self._owner(i)],
                                  allow_other_workers=True, pure=False)
                           for i, (a, b) in enumerate(self.layout.bounds)]
        else:
            X, y = arrays
            xs, ys = X.to_delayed().ravel(), y.to_delayed().ravel()
            self.chunks = [submit(_pair, self.client.compute(xb), self.client.compute(yb),
                                  workers=[self._owner(i)], allow_other_workers=True, pure=False)
                           for i, (xb, yb) in enumerate(zip(xs, ys, strict=True))]
        wait(self.chunks)
        for f in self.chunks:
            if f.status == "error":
                f.result()

    def _plan(self) -> None:
        """Group chunk positions by the worker that holds them (or will stream them)."""
        groups: dict[str, list[int]] = {}
        if self.persisted:
            who = self.client.who_has(self.chunks)
            for i, f in enumerate(self.chunks):
                holders = who.get(f.key) or [self._owner(i)]
                groups.setdefault(sorted(holders)[0], []).append(i)
        else:
            for i in range(len(self.layout)):
                groups.setdefault(self._owner(i), []).append(i)
        self.groups = sorted(groups.items(), key=lambda g: g[1][0])

    def map_reduce(self, kernel: Kernel, *args: Any, positions: list[int] | None = None) -> np.ndarray:
        """``sum(kernel(X_k, y_k, *args))`` over all chunks (or ``positions``), summed by the fixed tree."""
        self._iteration += 1
        if self._iteration % 50 == 0:
            self._plan()  # follow chunks that moved after a worker left or joined
        chosen = None if positions is None else sorted(set(positions))
        index = {p: i for i, p in enumerate(chosen)} if chosen is not None else None
        n_leaves = len(chosen) if chosen is not None else len(self.layout)
        futures = []
        for worker, group in self.groups:
            mine = group if index is None else [p for p in group if p in index]
            if not mine:
                continue
            leaf_ids = mine if index is None else [index[p] for p in mine]
            if self.persisted:
                fut = self.client.submit(_run_group, kernel, args, leaf_ids, n_leaves, self.fan_in,
                                         *[self.chunks[p] for p in mine], workers=[worker],
                                         allow_other_workers=True, pure=False)
            else:
                fut = self.client.submit(_run_group_streamed, kernel, args, leaf_ids, n_leaves, self.fan_in,
                                         self.store, [self.layout.bounds[p] for p in mine], workers=[worker],
                                         allow_other_workers=True, pure=False)
            futures.append(fut)
        nodes: dict[Node, np.ndarray] = {}
        for part in self.client.gather(futures):
            nodes.update(part)
        root = reduce_tree(nodes, n_leaves, self.fan_in)
        if len(root) != 1:
            raise RuntimeError(f"reduction incomplete: {sorted(root)}")
        return next(iter(root.values()))

    def close(self) -> None:
        for f in self.chunks:
            f.release()
        self.chunks = []
