"""Writing checkpoints off the critical path: a background thread appends and commits rows in order.

The driver spends an iteration waiting for the cluster; storage writes (~10–25 ms for a row of 9 small
arrays plus the commit) can overlap with that wait instead of adding to it. Rows queued while a write is
in progress are written together by the next one, so a fast loop never falls behind by more than one batch.
A crash loses only rows not yet committed: ``committed`` is still written after the data of its rows.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from typing import Any

from pipeline.store.runs import RunStore

_STOP = object()


class CheckpointWriter:
    def __init__(self, store: RunStore, max_pending: int = 64):
        self.store = store
        self.busy_seconds = 0.0  # time spent writing, in the background
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gradpipe-checkpoint", daemon=True)
        self._thread.start()

    def submit(self, rows: list[dict[str, Any]], resume: dict[str, Any]) -> None:
        """Queue rows and the solver state after the last of them (blocks only if far behind)."""
        self._raise()
        self._queue.put((list(rows), copy.deepcopy(resume)))

    def close(self) -> None:
        """Write everything queued, stop the thread, and raise a write error if there was one."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                return
            rows, resume = item
            while True:  # batch whatever else is already waiting
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                rows += more[0]
                resume = more[1]
            t0 = time.perf_counter()
            try:
                self.store.append(rows, resume)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self._error = exc
                return
            self.busy_seconds += time.perf_counter() - t0
