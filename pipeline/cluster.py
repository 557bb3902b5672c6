"""Connecting to a Dask cluster: an existing scheduler, or an embedded LocalCluster on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None,
                dashboard_port: int = 8787, announce: bool = True) -> Iterator[Client]:
    """Yield a client for ``scheduler`` (or ``$DASK_SCHEDULER_ADDRESS``), else for a new LocalCluster.

    The embedded cluster runs worker *processes* with one thread each (the chunk kernels release the GIL
    only in BLAS, so processes scale and threads do not), listens on 127.0.0.1 only, and serves the
    dashboard on ``dashboard_port`` (a free port if that one is taken).
    """
    address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        with Client(address, timeout="30s") as client:
            _announce(client, announce)
            yield client
        return
    with LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=f"127.0.0.1:{dashboard_port}",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        _announce(client, announce)
        yield client


def _announce(client: Client, announce: bool) -> None:
    if announce:
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        print(f"dask: {client.scheduler.address} with {n} workers; dashboard {client.dashboard_link}",
              file=sys.stderr)
