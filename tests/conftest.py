"""Shared fixtures: one real multi-process Dask cluster for the whole session, and small raw files."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Prefect must never touch the user's ~/.prefect or phone home; its temporary server takes 15–25 s to
# start here, beyond its default 20 s timeout. Set before any test module imports prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="gradpipe-prefect-")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.pop("PREFECT_API_URL", None)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The S3-compatible server (moto, started by the ``s3`` fixture) is reached exactly as AWS would be: through
# the standard variables. They are set here, before any cluster starts, so worker processes inherit them.
# Test modules import this file again as ``tests.conftest``: the port is chosen once per process, and a
# process that inherited another's choice (an xdist worker, from its controller) chooses its own.
def _session_port() -> int:
    pid, _, port = os.environ.get("GRADPIPE_TEST_S3_PORT", "").partition(":")
    if pid != str(os.getpid()):
        port = str(_free_port())
        os.environ["GRADPIPE_TEST_S3_PORT"] = f"{os.getpid()}:{port}"
    return int(port)


S3_PORT = _session_port()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"
os.environ["AWS_ACCESS_KEY_ID"] = "gradpipe-test"
os.environ["AWS_SECRET_ACCESS_KEY"] = "gradpipe-test-secret"
os.environ["AWS_DEFAULT_REGION"] = os.environ["AWS_REGION"] = "us-east-1"
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "GRADPIPE_STORAGE_OPTIONS"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's server mode) on 127.0.0.1 for the whole session."""
    import socket
    import time

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    deadline = time.monotonic() + 30
    while True:  # start() returns before the server listens
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the S3 server did not listen within 30 s"
            time.sleep(0.02)
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket for one test: ``s3://<name>``."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (real API + SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def cluster():
    """A LocalCluster with 2 worker *processes* on 127.0.0.1 (the real scheduler, workers and transport)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR) as lc:
        yield lc


@pytest.fixture(scope="session")
def client(cluster):
    from distributed import Client

    with Client(cluster) as c:
        yield c


@pytest.fixture(scope="session")
def clients_1_and_4():
    """Clusters of 1 and 4 worker processes, started once for the tests that compare histories across
    worker counts (each start costs seconds; idle, they cost nothing)."""
    from contextlib import ExitStack

    from distributed import Client, LocalCluster

    with ExitStack() as stack:
        clients = {}
        for n in (1, 4):
            lc = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                  host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                                  silence_logs=logging.CRITICAL))
            clients[n] = stack.enter_context(Client(lc))
        yield clients


@pytest.fixture
def scheduler(cluster) -> str:
    return cluster.scheduler_address


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: proves a store is byte-for-byte unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def dataset_state(path) -> tuple[str, list[str], list[str]]:
    """What readers of a dataset can see: main's tip, its ancestry, and the branches (a failed write leaves
    no private branch). Byte hashes of the directory no longer prove "unchanged": a failed write may leave
    unreferenced chunk objects, which no snapshot names."""
    import icechunk

    from pipeline.store import location

    repo = icechunk.Repository.open(location.icechunk_storage(str(path)))
    return (repo.lookup_branch("main"), [s.id for s in repo.ancestry(branch="main")],
            sorted(repo.list_branches()))


def dataset_group(path):
    """The dataset's Zarr group at main's tip, opened the way any Zarr reader does (through Icechunk)."""
    import icechunk
    import zarr

    from pipeline.store import location

    repo = icechunk.Repository.open(location.icechunk_storage(str(path)))
    return zarr.open_group(repo.readonly_session("main").store, mode="r")


def chunk_objects(path) -> list[Path]:
    """The chunk objects of a local dataset (Icechunk keeps them, content-addressed, under ``chunks/``)."""
    return sorted(p for p in (Path(path) / "chunks").iterdir() if p.is_file())


def chunk_object(ds: Path, array: str, k: int) -> Path:
    """The chunk object holding chunk ``k`` of ``array`` (Icechunk names objects by id, not coordinates): the
    one whose damage makes exactly that chunk unreadable."""
    from pipeline.errors import GradpipeError
    from pipeline.store.dataset import read_info, read_rows

    for obj in chunk_objects(ds):
        raw = obj.read_bytes()
        obj.write_bytes(b"x" * len(raw))
        try:
            info = read_info(ds)
            read_rows(str(ds), k * info.chunk_rows, min(info.n_rows, (k + 1) * info.chunk_rows))
            hit = False
        except GradpipeError as exc:
            hit = f"array {array} chunk {k}" in str(exc)
        finally:
            obj.write_bytes(raw)
        if hit:
            return obj
    raise AssertionError(f"no chunk object holds {array} chunk {k}")


def write_csv(path: Path, X: np.ndarray, y: np.ndarray, names: list[str] | None = None,
              target: str = "y") -> Path:
    """Plain-Python CSV writer (repr round-trips float64 exactly), independent of pyarrow."""
    names = names or [f"x{i}" for i in range(X.shape[1])]
    with open(path, "w") as fh:
        fh.write(",".join([*names, target]) + "\n")
        for row, t in zip(X.tolist(), y.tolist(), strict=True):
            fh.write(",".join(map(repr, [*row, t])) + "\n")
    return path


def make_xy(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.01, 100, size=d) + rng.uniform(-50, 50, size=d)
    y = X @ rng.normal(size=d) + rng.normal(size=n)
    return X, y


def wait_until(check, deadline_s: float, what: str, poll_s: float = 0.1):
    """``check()``'s first truthy value, polled until a deadline (never a fixed sleep that hopes)."""
    import time

    deadline = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {deadline_s} s"
        time.sleep(poll_s)
