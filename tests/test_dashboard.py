"""The embedded cluster's Dask dashboard: on 127.0.0.1, announced, live during training (HTTP and websocket)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from pipeline.cluster import dask_client
from pipeline.config import TrainConfig
from pipeline.errors import GradpipeError
from pipeline.ingest import ingest
from pipeline.store.runs import RunStore
from pipeline.training import train
from tests.conftest import make_xy, write_csv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def committed(path) -> int:
    """The run's committed iteration, or -1 while its store is still being created."""
    try:
        return RunStore.open(path).committed
    except GradpipeError:  # no store yet, or its attributes are not written yet
        return -1


def test_dashboard_is_live_during_training(tmp_path, capsys):
    write_csv(tmp_path / "a.csv", *make_xy(4000, 3))
    port = free_port()
    with dask_client(workers=2, dashboard_port=port) as client:
        assert f"dashboard http://127.0.0.1:{port}/status" in capsys.readouterr().err
        ingest([str(tmp_path / "a.csv")], tmp_path / "ds.zarr", "y", client, chunk_mb=0.01)
        # unstandardized with a small fixed step (no preconditioner): still descending when the 8 s budget ends
        cfg = TrainConfig(solver="momentum", lr=1e-6, max_iter=10**6, tol=0, gtol=0, time_budget=8,
                          standardize=False)
        worker = threading.Thread(target=train, args=(tmp_path / "ds.zarr", cfg),
                                  kwargs={"client": client, "runs_dir": tmp_path / "runs", "run_id": "dash"})
        worker.start()
        try:
            deadline = time.monotonic() + 60
            while committed(tmp_path / "runs" / "dash.zarr") < 3:
                assert time.monotonic() < deadline and worker.is_alive(), "training did not start"
                time.sleep(0.05)
            base = f"http://127.0.0.1:{port}"
            for page in ("/status", "/individual-task-stream"):
                with urllib.request.urlopen(base + page, timeout=30) as resp:
                    body = resp.read()
                assert resp.status == 200 and b"bokeh" in body.lower(), page
            from bokeh.client import pull_session

            with pull_session(url=base + "/individual-task-stream") as session:  # the websocket, not just HTML
                assert len(session.document.roots) > 0
            assert worker.is_alive()  # all of the above happened while training ran
        finally:
            worker.join(timeout=120)
    assert RunStore.open(tmp_path / "runs" / "dash.zarr").attrs["status"] == "time_budget"


def test_a_taken_dashboard_port_falls_back_to_a_free_one(capsys, recwarn):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with dask_client(workers=1, dashboard_port=port) as client:
            link = client.dashboard_link
            assert link.startswith("http://127.0.0.1:") and f":{port}/" not in link
            assert f"dashboard {link}" in capsys.readouterr().err  # the URL printed is the one that works
            with urllib.request.urlopen(link, timeout=30) as resp:
                assert resp.status == 200
    assert not [w for w in recwarn if "already in use" in str(w.message)]  # quietly (issue 11, item 7)


def test_dashboard_binds_loopback_only():
    port = free_port()
    with dask_client(workers=1, dashboard_port=port, announce=False) as client:
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        addrs = {c.laddr.ip for c in __import__("psutil").net_connections("tcp")
                 if c.status == "LISTEN" and c.laddr.port == port}
        assert addrs == {"127.0.0.1"}
