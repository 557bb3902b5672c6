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

from pipeline import tls

DASHBOARD_PORT = 8787


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None,
                dashboard_port: int = DASHBOARD_PORT, announce: bool = True, security=None) -> Iterator[Client]:
    """Yield a client for ``scheduler`` (or ``$DASK_SCHEDULER_ADDRESS``), else for a new LocalCluster; with
    ``security`` (or ``GRADPIPE_TLS*``, see ``pipeline.tls``) over TLS."""
    with cluster_address(scheduler, workers, dashboard_port, security) as address, \
            Client(address, timeout="30s", security=tls.registered(address)) as client:
        _announce(client, announce)
        yield client


def _announce(client: Client, announce: bool) -> None:
    if announce:
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        # the link names the port actually used (8787, or a free one when 8787 is taken: see _dashboard_port)
        print(f"dask: {client.scheduler.address} with {n} workers; dashboard {client.dashboard_link}",
              file=sys.stderr)


def _dashboard_port(preferred: int) -> int:
    """``preferred`` if it is free on 127.0.0.1, else 0 (an ephemeral port): asking Dask for a taken port
    makes it warn "Port 8787 is already in use" on every command."""
    if preferred <= 0:
        return 0
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


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
                    dashboard_port: int = DASHBOARD_PORT, security=None) -> Iterator[str]:
    """The address of ``scheduler`` (or ``$DASK_SCHEDULER_ADDRESS``), else of a new LocalCluster that lives as
    long as the ``with`` block: the flows start one cluster per flow run and hand its address to tasks.

    The embedded cluster runs worker *processes* with one thread each (the kernels hold the GIL outside
    BLAS, so processes scale and threads do not), listens on 127.0.0.1 only, and serves the dashboard on
    ``dashboard_port`` (an ephemeral one if that one is taken, quietly).

    TLS (``security``, else one this process registered for the address, else ``GRADPIPE_TLS*``): the
    embedded cluster listens on tls:// with that ``Security``; an external scheduler must be tls://.
    """
    address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    sec = security or (tls.registered(address) if address else None) or tls.from_environ(external=bool(address))
    if address:
        address = tls.check_address(address, sec)
        tls.register(address, sec)
        yield address
        return
    # the in-process scheduler chats at INFO (and hints at jupyter-server-proxy on import): quiet it first
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with _sigint_ignored():  # workers spawned now inherit SIG_IGN (see pipeline.worker_setup)
        cluster = LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=f"127.0.0.1:{_dashboard_port(dashboard_port)}",
                               silence_logs=logging.CRITICAL, preload=["pipeline.worker_setup"],
                               **({"protocol": "tls://", "security": sec} if sec is not None else {}))
    with cluster:
        tls.register(cluster.scheduler_address, sec)
        try:
            yield cluster.scheduler_address
        finally:
            tls.unregister(cluster.scheduler_address)


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
