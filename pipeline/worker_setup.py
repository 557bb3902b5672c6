"""Preloaded into every worker process of the embedded LocalCluster (``dask_setup`` is Dask's preload hook).

A terminal's Ctrl-C goes to the whole foreground process group: the driver *and* the worker processes it
spawned. Workers that die of it leave the driver waiting for results that never come. The driver alone
decides what Ctrl-C means (finish the iteration, checkpoint, stop), so its workers ignore SIGINT. Workers
spawned while the driver ignored SIGINT inherit that already; this hook covers the ones a nanny restarts
later. SIGTERM keeps its default: the cluster is still closed with it.
"""

from __future__ import annotations

import signal
import threading


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask's preload signature
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
