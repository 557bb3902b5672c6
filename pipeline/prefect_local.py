"""A temporary Prefect server for one `gradpipe run`, out of reach of the terminal's Ctrl-C.

Without ``PREFECT_API_URL`` Prefect starts its own temporary server as a child process in the caller's
process group. A terminal's Ctrl-C reaches that whole group: the server dies while the flow still reports
to it, and the client then retries for minutes. We start the same kind of server ourselves, in its own
session (so only we stop it), on 127.0.0.1 and a free port, and point this process at it for the run.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import GradpipeError

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def temporary_prefect_server() -> Iterator[str | None]:
    """Yield the API URL of a fresh local server, or None when ``PREFECT_API_URL`` already names one."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    url = f"http://{HOST}:{port}/api"
    exe = Path(sys.executable).with_name("prefect")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    deadline_s = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    with tempfile.TemporaryFile() as log:  # the server's output, shown only if it fails to start
        proc = subprocess.Popen([*argv, "server", "start", "--host", HOST, "--port", str(port)], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + deadline_s
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-1500:]
                    raise GradpipeError(f"the temporary Prefect server on {HOST}:{port} did not start within "
                                        f"{deadline_s:g} s (raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, "
                                        f"or point PREFECT_API_URL at a server):\n{tail}")
                time.sleep(0.2)  # a poll with a deadline: the server takes 5–25 s to start
        except BaseException:
            _stop(proc)
            raise
        # Stopped at interpreter exit, like Prefect's own temporary server: atexit runs last-in first-out, so
        # Prefect's event and log workers (registered during the flow run) flush to it before it goes.
        atexit.register(_stop, proc)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
