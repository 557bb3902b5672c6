"""Connecting to a Dask cluster: an existing scheduler, or an embedded LocalCluster on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None,
                dashboard_port: int = 8787, announce: bool = True) -> Iterator[Client]:
    """Yield a client for ``scheduler`` (or ``$DASK_SCHEDULER_ADDRESS``), else for a new LocalCluster."""
    with cluster_address(scheduler, workers, dashboard_port) as address, Client(address, timeout="30s") as client:
        _announce(client, announce)
        yield client


def _announce(client: Client, announce: bool) -> None:
    if announce:
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        print(f"dask: {client.scheduler.address} with {n} workers; dashboard {client.dashboard_link}",
              file=sys.stderr)


def _set_worker_interval(dask_worker, interval: float) -> None:
    dask_worker.batched_stream.interval = interval


def _set_scheduler_interval(dask_scheduler, interval: float) -> None:
    for comms in (dask_scheduler.stream_comms, dask_scheduler.client_comms):
        for comm in comms.values():
            comm.interval = interval


def tune_latency(client: Client, interval: float = 0.0005) -> None:
    """Shorten Dask's message batching (2–10 ms by default) for the training loop's tiny messages.

    An iteration is a handful of small messages in a row; with the default intervals each hop waits up to
    10 ms for company (measured: 10.6 ms per single-task round trip, 4.6 ms after this). Best effort: a
    cluster that refuses (older or newer Dask internals) keeps working at the default latency.
    """
    try:
        client.scheduler_comm.interval = interval
        client.run(_set_worker_interval, interval=interval)
        client.run_on_scheduler(_set_scheduler_interval, interval=interval)
    except Exception:  # noqa: BLE001 - an optimisation only
        logging.getLogger(__name__).debug("could not tune Dask batching intervals", exc_info=True)


@contextmanager
def cluster_address(scheduler: str | None = None, workers: int | None = None,
                    dashboard_port: int = 8787) -> Iterator[str]:
    """The address of ``scheduler`` (or ``$DASK_SCHEDULER_ADDRESS``), else of a new LocalCluster that lives as
    long as the ``with`` block: the flows start one cluster per flow run and hand its address to tasks.

    The embedded cluster runs worker *processes* with one thread each (the kernels hold the GIL outside
    BLAS, so processes scale and threads do not), listens on 127.0.0.1 only, and serves the dashboard on
    ``dashboard_port`` (Dask picks a free port if that one is taken).
    """
    address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        yield address
        return
    with _sigint_ignored():  # workers spawned now inherit SIG_IGN (see pipeline.worker_setup)
        cluster = LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=f"127.0.0.1:{dashboard_port}",
                               silence_logs=logging.CRITICAL, preload=["pipeline.worker_setup"])
    with cluster:
        logging.getLogger("distributed").setLevel(logging.WARNING)  # the in-process scheduler chats at INFO
        yield cluster.scheduler_address


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while the embedded cluster spawns its worker processes: a terminal's Ctrl-C reaches the
    whole process group, and only the driver should act on it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
