"""The per-pass work on the cluster: map a chunk kernel over co-located (X, y) leaves, combine up a fixed tree.

Design (docs/design.md §3), with departures measured on this 2-core machine:

- **One task per worker per iteration.** A Dask task costs ~1 ms of scheduler and worker time, so one task
  per chunk (64 chunks → ~70–90 ms per iteration) cannot meet a 10 ms budget. Each worker gets ONE task that
  runs the kernel over all the leaves it holds, and data too small to be worth splitting
  (``MIN_BYTES_PER_WORKER``) stays on fewer workers: tiny data is one task per iteration.
- **Fixed reduction tree, pluggable combine.** The leaves are row ranges fixed by the dataset (each stored
  chunk split into parts of at most ``LEAF_BYTES``, so small datasets still spread evenly over workers).
  Their results are combined by a fixed-shape tree (fan-in ``fan_in``, like Spark's ``treeAggregate``):
  addition for sums, QR of stacked factors for TSQR (any deterministic function of the ordered children).
  Each worker combines the complete sub-trees it owns, the driver the rest, always in the same order and
  with one BLAS thread: results are bitwise identical on 1, 2 or 8 workers, after a worker dies, and after
  a resume.
- **Co-located, persisted, no dependencies per iteration.** X and y of a leaf are loaded by one task, so they
  live on one worker, which keeps them for the run (Dask owns that memory: it is freed when the driver goes
  away). Iteration tasks name the leaves by key and read them from the worker's memory instead of listing
  them as dependencies, which would cost the scheduler a dependency per leaf per iteration. A leaf that is
  not there (its worker died, or it was never persisted) is read from Zarr: results are the same.
- **Streaming.** When the data does not fit (``persist='no'``, or ``auto`` above half the workers' memory),
  each pass reads the leaves from Zarr, one in memory per worker at a time.
"""

from __future__ import annotations

import math
import pickle
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, Future, get_worker, wait

from pipeline.errors import GradpipeError
from pipeline.store.dataset import Leaf, read_rows
from pipeline.store.location import split_snapshot

Node = tuple[int, int]  # (level, index) in the reduction tree; leaves are (0, leaf position)
Kernel = Callable[..., np.ndarray]  # kernel(X, y, *args) -> array
Combine = Callable[[list[np.ndarray]], np.ndarray]  # ordered children -> parent
PERSIST_FRACTION = 0.5  # persist when the data takes at most this share of the workers' memory
LEAF_BYTES = 16 * 2**20  # at most this much X per leaf: ≥ 4 leaves per 64 MiB chunk, for balance
# A worker joins in only for this much data: a second task per iteration costs ~1.5 ms of round trip, and
# half a pass over 32 MiB saves ~2 ms (the fused kernel reads ~8 GB/s per core). Tiny data: one task.
MIN_BYTES_PER_WORKER = 32 * 2**20
# Leaf results this large (a Gram of ~1,000 features) are streamed: one task per block of the tree's first
# level, folded on the driver as they complete. Sent whole, a worker's unfolded boundary nodes and the
# driver's copies of them all were held at once: ~20 GB for a 10,000-feature Gram pass on 2 workers.
STREAM_BYTES = 8 * 2**20
STREAM_DEPTH = 2  # streamed tasks out per worker: one running, one queued behind it
# How often a pass in flight checks that the workers its tasks wait for still exist. Dask reschedules a task
# whose worker died only onto a worker its restriction names, so a task pinned to a dead worker would wait
# for ever; the check re-places it on the living workers. Completed passes return at once, not after a poll.
POLL_SECONDS = 1.0
WORKER_DEADLINE = 120.0  # with no worker left, wait this long for one to (re)join before giving up


def _wait_for_a_worker(client: Client, message: str) -> None:
    """Return once the cluster has a worker, waiting up to WORKER_DEADLINE; then fail with ``message``."""
    try:
        client.wait_for_workers(1, timeout=WORKER_DEADLINE)
    except TimeoutError:
        raise GradpipeError(message) from None


def add(parts: list[np.ndarray]) -> np.ndarray:
    """The combine of sums: left to right, so the order of additions is fixed by the tree alone."""
    acc = np.array(parts[0], dtype=np.float64, copy=True)
    for part in parts[1:]:
        acc += part
    return acc


def reduce_tree(nodes: dict[Node, np.ndarray], n_leaves: int, fan_in: int,
                combine: Combine = add) -> dict[Node, np.ndarray]:
    """Combine every node of the fixed tree whose children are all present; return what is left.

    With all leaves present the result is ``{(depth, 0): root}``. What is combined with what, in which order,
    depends only on ``n_leaves`` and ``fan_in``, never on which process holds which leaves.
    """
    nodes = dict(nodes)
    size, level = n_leaves, 0
    while size > 1:
        parents = -(-size // fan_in)
        for p in range(parents):
            kids = [(level, k) for k in range(p * fan_in, min((p + 1) * fan_in, size))]
            if all(k in nodes for k in kids):
                nodes[(level + 1, p)] = combine([nodes.pop(k) for k in kids])
        size, level = parents, level + 1
    return nodes


def _root(nodes: dict[Node, np.ndarray]) -> np.ndarray:
    """The tree's root as a fresh, aligned, C-ordered copy: a result unpickled from a worker can sit at any
    byte offset, and BLAS on the driver takes other (differently rounded) paths for misaligned data — a
    resumed run, reading the same values from Zarr, would not repeat the bits."""
    if len(nodes) != 1:
        raise RuntimeError(f"reduction incomplete: {sorted(nodes)}")
    # a copy only when needed: for a 10,000-feature Gram each one is 800 MB on the driver
    return np.require(next(iter(nodes.values())), dtype=np.float64, requirements=["C", "A", "O", "W"])


def _leaf(path: str, start: int, stop: int, key: str | None) -> Leaf:
    """The persisted leaf from this worker's memory when it is here, else straight from Zarr."""
    if key is not None:
        try:
            return get_worker().data[key]
        except (KeyError, ValueError):
            pass
    return read_rows(path, start, stop)


def apply(kernel: Kernel, leaf: Leaf, start: int, args: tuple) -> np.ndarray:
    """``kernel(X, y, w, offset, *args)``; a kernel marked ``with_start`` also gets the leaf's first dataset
    row after the leaf (cross-validation folds are a function of the row index)."""
    if getattr(kernel, "with_start", False):
        return kernel(*leaf, start, *args)
    return kernel(*leaf, *args)


_prepared = False


def _run_group(payload: bytes) -> dict[Node, np.ndarray]:
    """One worker's share of an iteration. The arguments travel pickled: as plain task arguments, Dask would
    walk every nested list of ranges and keys looking for dependencies (~0.7 ms of driver time per call)."""
    global _prepared
    if not _prepared:  # a worker that joined (or was restarted) after the engine set the others up
        _prepare_worker()
        _prepared = True
    kernel, args, combine, leaf_ids, n_leaves, fan_in, path, ranges, keys = pickle.loads(payload)
    # In leaf order, once each: the in-place fold needs a parent's children in order (a re-placed pass can
    # hand a worker the leaves of several lost ones).
    leaves = sorted(dict(zip(leaf_ids, zip(ranges, keys, strict=True), strict=True)).items())
    if combine is add:
        tree = _FoldingTree([i for i, _ in leaves], n_leaves, fan_in)
        for i, ((a, b), k) in leaves:
            tree.insert(0, i, apply(kernel, _leaf(path, a, b, k), a, args))
        return tree.nodes
    nodes: dict[Node, np.ndarray] = {}
    for i, ((a, b), k) in leaves:
        nodes[(0, i)] = apply(kernel, _leaf(path, a, b, k), a, args)
        nodes = reduce_tree(nodes, n_leaves, fan_in, combine)  # combine as the leaves come
    return nodes


class _FoldingTree:
    """The sums of the fixed tree, folded in place as nodes come (a worker's leaves; the driver's streamed
    task results).

    A parent whose children are all here (``leaf_ids``) is the running sum ``((c0 + c1) + c2) + …``, exactly
    what :func:`add` computes from the list, so the bits are the same; only one partial sum per parent is held
    instead of every leaf's result (a 5,000-feature Gram is 200 MB per leaf). A child that comes before an
    elder sibling waits for it. Children of a parent that other workers share are kept as they are, for the
    driver to combine.
    """

    def __init__(self, leaf_ids: list[int], n_leaves: int, fan_in: int):
        self.fan_in, self.nodes, self.partial = fan_in, {}, {}
        self.next: dict[Node, int] = {}  # per parent being summed: the child it needs next
        self.waiting: dict[Node, np.ndarray] = {}  # children that came before an elder sibling
        self.sizes, self.whole = [n_leaves], [set(leaf_ids)]  # per level: node count, nodes wholly ours
        while self.sizes[-1] > 1:
            size = -(-self.sizes[-1] // fan_in)
            kids = self.whole[-1]
            self.whole.append({p for p in range(size) if all(
                k in kids for k in range(p * fan_in, min((p + 1) * fan_in, self.sizes[-1])))})
            self.sizes.append(size)

    def insert(self, level: int, index: int, value: np.ndarray) -> None:
        parent = index // self.fan_in
        if level + 1 >= len(self.sizes) or parent not in self.whole[level + 1]:
            self.nodes[(level, index)] = value
            return
        key = (level + 1, parent)
        first, last = parent * self.fan_in, min((parent + 1) * self.fan_in, self.sizes[level]) - 1
        if index != self.next.get(key, first):  # an elder sibling is still to come: wait for it
            self.waiting[(level, index)] = value
            return
        while True:
            if index == first:
                self.partial[key] = np.array(value, dtype=np.float64, copy=True)
            else:
                self.partial[key] += value
            if index == last:
                self.next.pop(key, None)
                self.insert(level + 1, parent, self.partial.pop(key))
                return
            index += 1
            self.next[key] = index
            if (level, index) not in self.waiting:
                return
            value = self.waiting.pop((level, index))


def _prepare_worker() -> None:
    """One BLAS thread, and the kernels' modules loaded before the first timed pass.

    Dask's nanny already sets OPENBLAS/OMP threads to 1; workers started otherwise get it here (two BLAS
    threads per worker measured 3–19× slower, and thread count changes the bits of BLAS sums). Importing the
    kernels (and SciPy's LAPACK with them) costs ~0.1 s on a fresh worker: better at setup than in pass 1."""
    import pipeline.losses  # noqa: F401

    _keep_heap()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_MMAP_BYTES = 64 * 2**20  # kernel temporaries up to this size come from the heap, and are reused
HEAP_TRIM_BYTES = 256 * 2**20  # freed heap kept before it is given back to the OS


def _keep_heap() -> None:
    """Let a worker reuse the kernels' per-block temporaries instead of mapping fresh pages for each.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes glibc's mmap threshold
    at 128 KiB: every larger temporary (a tuning kernel's rows × models arrays are ~10 MB) is a new mmap whose
    pages fault in, and is unmapped on free. Measured: the tuning kernel ran 2.3× slower in a worker process
    than in a thread of the same process (4.3 s vs 1.9 s for 50,000 rows × 500 models); with these thresholds
    it runs at the thread's speed. A no-op where glibc's ``mallopt`` is absent."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_BYTES)
    except (OSError, AttributeError):
        pass


@dataclass
class ChunkLayout:
    """Row ranges of the leaves: fixed by the data, never by the cluster."""

    bounds: list[tuple[int, int]]

    @classmethod
    def regular(cls, n_rows: int, chunk_rows: int, n_features: int = 1, itemsize: int = 8,
                leaf_bytes: int = LEAF_BYTES) -> ChunkLayout:
        """Stored chunks of ``chunk_rows``, each split into equal parts of at most ``leaf_bytes`` of X."""
        parts = max(1, math.ceil(chunk_rows * n_features * itemsize / leaf_bytes))
        bounds = []
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            edges = np.linspace(start, stop, min(parts, stop - start) + 1).round().astype(int)
            bounds += [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        return cls(bounds)

    def __len__(self) -> int:
        return len(self.bounds)


class ChunkEngine:
    """Leaves of one dataset store on the cluster, and the map-reduce every solver step is made of."""

    def __init__(self, client: Client, *, store: str, n_rows: int, chunk_rows: int, n_features: int,
                 itemsize: int, persist: str = "auto", fan_in: int = 8):
        if fan_in < 2:
            raise ValueError("fan_in must be at least 2")
        self.client, self.store, self.fan_in = client, store, fan_in
        self.layout = ChunkLayout.regular(n_rows, chunk_rows, n_features, itemsize)
        self.n_rows = n_rows
        self.nbytes = n_rows * (n_features + 1) * itemsize
        # task names the dashboard shows: gradpipe-load-<dataset>, gradpipe-pass-<name> (the run id). The
        # engine's own token makes every key unique on a shared cluster: a key that another engine still
        # holds (another store of the same name, a run id used in another runs dir) would hand back its data.
        self.name = Path(split_snapshot(str(store))[0].rstrip("/")).name.removesuffix(".zarr")
        self._token = uuid.uuid4().hex[:12]
        # workers still starting, or restarting after a crash, are waited for as during a run
        _wait_for_a_worker(client, f"the Dask cluster at {client.scheduler.address} has no workers (waited "
                                   f"{WORKER_DEADLINE:.0f} s); start some (`dask worker {client.scheduler.address}`) "
                                   "or check that they reach the scheduler.")
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"].items())
        memory = sum(w.get("memory_limit") or 0 for _, w in workers)
        if persist == "auto":
            persist = "yes" if not memory or self.nbytes <= PERSIST_FRACTION * memory else "no"
        self.persisted = persist == "yes"
        self._wanted = max(1, self.nbytes // MIN_BYTES_PER_WORKER)
        self.workers = [addr for addr, _ in workers][:self._wanted]
        client.run(_prepare_worker)
        self.chunks: list[Future] = []
        self._calls = self._resubmits = 0
        if self.persisted:
            self.chunks = [self._load(i) for i in range(len(self.layout))]
            wait(self.chunks)
            for f in self.chunks:
                if f.status == "error":
                    f.result()
        self._plan()

    def _load(self, position: int) -> Future:
        a, b = self.layout.bounds[position]
        return self.client.submit(read_rows, self.store, a, b, workers=[self._owner(position)],
                                  allow_other_workers=True, pure=False,
                                  key=f"gradpipe-load-{self.name}-{self._token}-{position}-{self._resubmits}")

    def _owner(self, position: int) -> str:
        """Contiguous ranges of leaves per worker, balanced by rows (leaf sizes differ at chunk ends)."""
        start, stop = self.layout.bounds[position]
        return self.workers[min(len(self.workers) - 1, (start + stop) * len(self.workers) // (2 * self.n_rows))]

    def _plan(self) -> None:
        """Group leaves by the worker that holds them (or will stream them)."""
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

    def map_reduce(self, kernel: Kernel, *args: Any, positions: list[int] | None = None,
                   combine: Combine = add, result_bytes: int = 0) -> np.ndarray:
        """``kernel(X_k, y_k, *args)`` over all leaves (or ``positions``), combined up the fixed tree (one
        task per worker; ``combine`` must be a module-level function, it travels pickled by reference).

        ``result_bytes``, what one leaf's result takes, decides how: sums of at least ``STREAM_BYTES`` (a
        Gram of a thousand features) go one task per block of ``fan_in`` leaves, folded on the driver as they
        come (:meth:`_streamed`), so no process holds more than a few of them at once."""
        self._calls += 1
        if self._calls % 50 == 0:
            self._plan()  # follow leaves that moved after a worker left or joined
        index = None if positions is None else {p: i for i, p in enumerate(sorted(set(positions)))}
        n_leaves = len(self.layout) if index is None else len(index)
        spec = (kernel, args, combine, index, n_leaves)
        streamed = combine is add and result_bytes >= STREAM_BYTES
        planned: list[tuple[str, list[int]]] = []
        for worker, group in self.groups:
            mine = group if index is None else [p for p in group if p in index]
            blocks: dict[int, list[int]] = {}
            for p in mine:  # streamed: one task per block of the tree's first level; else one in all
                blocks.setdefault((p if index is None else index[p]) // self.fan_in if streamed else 0, []).append(p)
            planned += [(worker, block) for block in blocks.values()]
        if streamed:
            return self._streamed(spec, planned, n_leaves)
        jobs = [(self._submit(spec, w, block, g), w, block) for g, (w, block) in enumerate(planned)]
        nodes: dict[Node, np.ndarray] = {}
        while jobs:
            try:
                wait([f for f, _, _ in jobs], timeout=POLL_SECONDS)
            except TimeoutError:
                jobs = self._replace_lost(spec, jobs)
                continue
            for part in self.client.gather([f for f, _, _ in jobs], direct=True):
                nodes.update(part)
            jobs = []
        if combine is add:
            root = reduce_tree(nodes, n_leaves, self.fan_in)
        else:  # LAPACK on the driver: one thread, as on the workers, so the bits do not depend on where it ran
            from threadpoolctl import threadpool_limits

            with threadpool_limits(1):
                root = reduce_tree(nodes, n_leaves, self.fan_in, combine)
        return _root(root)

    def _streamed(self, spec: tuple, planned: list[tuple[str, list[int]]], n_leaves: int) -> np.ndarray:
        """Fold each task's nodes into the driver's tree as it completes, then let the task's result go.

        The same tree and the same left-to-right sums as :func:`reduce_tree`, so the same bits; a node that
        comes before its elder siblings waits for them. Each worker has at most ``STREAM_DEPTH`` tasks out at
        a time, its next one sent when one is folded: results never pile up on a worker faster than the
        driver folds them."""
        tree = _FoldingTree(list(range(n_leaves)), n_leaves, self.fan_in)
        queues: dict[str, list[tuple[int, list[int]]]] = {}
        for g, (worker, block) in enumerate(planned):
            queues.setdefault(worker, []).append((g, block))
        jobs: list[tuple[Future, str, list[int]]] = []

        def top_up() -> None:
            for worker, queue in queues.items():
                out = sum(w == worker for _, w, _ in jobs)  # re-placed tasks count for their new worker
                while queue and out < STREAM_DEPTH:
                    g, block = queue.pop(0)
                    where = worker if worker in self.workers else self._owner(block[0])  # its worker was lost
                    jobs.append((self._submit(spec, where, block, g), worker, block))
                    out += 1

        top_up()
        while jobs:
            try:
                done = wait([f for f, _, _ in jobs], timeout=POLL_SECONDS, return_when="FIRST_COMPLETED").done
            except TimeoutError:
                jobs[:] = self._replace_lost(spec, jobs)
                top_up()
                continue
            for job in [j for j in jobs if j[0] in done]:
                for (level, i), value in sorted(job[0].result().items()):
                    tree.insert(level, i, value)
                job[0].release()
                jobs.remove(job)
            top_up()
        return _root(tree.nodes)

    def _submit(self, spec: tuple, worker: str, mine: list[int], group: int) -> Future:
        kernel, args, combine, index, n_leaves = spec
        keys = [self.chunks[p].key if self.persisted else None for p in mine]
        payload = pickle.dumps((kernel, args, combine, mine if index is None else [index[p] for p in mine],
                                n_leaves, self.fan_in, self.store, [self.layout.bounds[p] for p in mine], keys),
                               protocol=pickle.HIGHEST_PROTOCOL)
        return self.client.submit(_run_group, payload, workers=[worker], allow_other_workers=True, pure=False,
                                  key=f"gradpipe-pass-{self.name}-{self._token}-{self._calls}-{group}-{self._resubmits}")

    def _replace_lost(self, spec: tuple, jobs: list[tuple[Future, str, list[int]]]
                      ) -> list[tuple[Future, str, list[int]]]:
        """Re-place the tasks of a pass whose worker is gone onto the workers that exist (waiting for one to
        join if none is left). Which leaves are combined with which does not change: neither do the bits."""
        alive = self._alive()
        lost = [(f, w, mine) for f, w, mine in jobs if w not in alive and not f.done()]
        if not lost:
            return jobs
        while not alive:  # nannies restart killed workers within seconds
            _wait_for_a_worker(self.client, f"every Dask worker is gone and none came back within "
                                            f"{WORKER_DEADLINE:g} s; the committed iterations are kept: start "
                                            "workers and resume the run.")
            alive = self._alive()
        self._resubmits += 1
        self.client.cancel([f for f, _, _ in lost])
        self.workers = alive[:self._wanted]
        if self.persisted:  # the gone workers' leaves: load them again on their new owners
            who = self.client.who_has(self.chunks)
            for i, f in enumerate(self.chunks):
                if not set(who.get(f.key) or ()) & set(alive):
                    f.release()
                    self.chunks[i] = self._load(i)
        kept = [job for job in jobs if job not in lost]
        regrouped: dict[str, list[int]] = {}
        for _, _, mine in lost:
            for p in mine:
                regrouped.setdefault(self._owner(p), []).append(p)
        for worker, mine in sorted(regrouped.items(), key=lambda g: g[1][0]):
            kept.append((self._submit(spec, worker, mine, len(kept)), worker, mine))
        self._plan()  # later passes go straight to the living workers
        return kept

    def _alive(self) -> list[str]:
        return sorted(self.client.scheduler_info(n_workers=-1)["workers"])

    def close(self) -> None:
        for f in self.chunks:
            f.release()
        self.chunks = []
