"""A real ``prefect server start`` and ``gradpipe serve``: the schedule itself creates a run that completes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import make_xy, write_csv

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, payload: dict | None = None, method: str | None = None):
    """One API call; a busy server's 503 is retried for up to 60 s (SQLite under load answers so)."""
    data = None if payload is None else json.dumps(payload).encode()
    deadline = time.monotonic() + 60
    while True:
        req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                body = resp.read()
            return json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def wait_until(check, deadline_s: float, what: str, procs=()):
    deadline = time.monotonic() + deadline_s
    while True:
        for p in procs:
            assert p.poll() is None, f"{p.args[:4]} exited with {p.returncode} while waiting for {what}"
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {deadline_s} s"
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_scheduled_run_happens_and_completes(tmp_path, scheduler):
    (tmp_path / "raw").mkdir()
    write_csv(tmp_path / "raw" / "a.csv", *make_xy(2000, 3))
    port = free_port()
    base = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": base,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    logs = tmp_path / "server.log", tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=open(logs[0], "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    serve = None
    try:
        wait_until(lambda: api(base, "/health") is True, 180, "prefect server healthy", [server])
        serve = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--interval", "5", "--name", "sched",
                                  "--raw", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "data"),
                                  "--scheduler", scheduler, "--max-iter", "20"], cwd=REPO, env=env,
                                 stdout=open(logs[1], "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deployment = wait_until(lambda: _deployment(base), 120, "deployment created by gradpipe serve", [serve])

        def completed_scheduled_run():
            runs = api(base, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
            return [r for r in runs if r["auto_scheduled"] and r["state_type"] == "COMPLETED"]

        try:
            runs = wait_until(completed_scheduled_run, 300, "a scheduled flow run COMPLETED", [serve])
        except AssertionError:
            print(logs[1].read_text()[-4000:])
            raise
        assert runs[0]["deployment_id"] == deployment["id"]
        assert list((tmp_path / "data" / "runs").glob("sched-*.zarr")), "the scheduled run wrote no run store"
        assert (tmp_path / "data" / "models" / "sched" / "latest.json").exists()
        api(base, f"/deployments/{deployment['id']}", method="DELETE")
        assert _deployment(base) is None
    finally:
        if serve is not None:
            stop(serve)
        stop(server)


def _deployment(base: str):
    try:
        return api(base, "/deployments/name/gradpipe-pipeline/scheduled")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
