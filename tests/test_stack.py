"""`gradpipe stack`: the compose topology as real processes, and the whole pipeline run through it.

One stack (scheduler, 2 workers, Prefect server, `gradpipe serve`) for the module, started and stopped with
the CLI in subprocesses. Its server is a real ``prefect server start`` (scheduler service included), so the
test that a schedule itself creates a run that completes uses it too, instead of starting a second server
(~25 s on 2 cores). Every wait has a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
NEVER = "0 0 1 1 *"  # the served deployment's schedule in tests: no scheduled run fires during the test
TIMINGS: dict[str, float] = {}


def gradpipe() -> list[str]:
    script = Path(sys.executable).parent / "gradpipe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def clean_env(**extra: str) -> dict[str, str]:
    drop = ("PREFECT_API_URL", "PREFECT_HOME", "DASK_SCHEDULER_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("GRADPIPE_")}
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **extra}


def cli(*args: str, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None, what: str = ""
        ) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    r = subprocess.run([*gradpipe(), *args], capture_output=True, text=True, timeout=timeout,
                       env=env or clean_env(), cwd=cwd)
    if what:
        TIMINGS[what] = round(time.monotonic() - t0, 1)
    return r


def gone(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) > 0.05 or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes_in(stack_dir: Path) -> list[psutil.Process]:
    """Processes that belong to a stack in ``stack_dir``: started there, or naming it on their command line."""
    out = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if p.status() == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            if (p.info["cwd"] and Path(p.info["cwd"]) == stack_dir) or any(
                    str(stack_dir) in a for a in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            continue
    return out


def api_call(method: str, url: str, deadline_s: float = 120, **kw) -> httpx.Response:
    """One Prefect API call; a 5xx (SQLite busy under load on 2 cores) is retried until the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            r = httpx.request(method, url, timeout=30, **kw)
        except httpx.TransportError as exc:
            err = repr(exc)
        else:
            if r.status_code < 500:
                return r
            err = f"{r.status_code}: {r.text[:2000]}"
        assert time.monotonic() < deadline, f"{method} {url}: no answer within {deadline_s} s (last: {err})"
        time.sleep(0.5)


def api_json(method: str, url: str, deadline_s: float = 120, **kw):
    r = api_call(method, url, deadline_s, **kw)
    assert r.is_success, f"{method} {url} -> {r.status_code}: {r.text[:2000]}"
    return r.json()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    r = cli("make-data", "--kind", "linear", "--rows", "3000", "--features", "4", "--files", "2", "--seed", "3",
            "--out", str(root / "raw"), timeout=120)
    assert r.returncode == 0, r.stderr
    stack_dir = root / "stack"
    # the server's scheduler service looks for due runs every 2 s, not 60: the scheduled-run test waits on it
    r = cli("stack", "up", "--dir", str(stack_dir), "--serve-cron", NEVER, "--name", "served",
            "--data-dir", str(root / "served"), "--raw", str(root / "raw"), "--max-iter", "20",
            timeout=400, cwd=root, what="stack up", env=clean_env(PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2"))
    try:
        assert r.returncode == 0, f"stack up failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-4000:]}"
        yield root, stack_dir, json.loads((stack_dir / "stack.json").read_text()), r.stdout
    finally:
        cli("stack", "down", "--dir", str(stack_dir), timeout=120)  # a safety net: down is idempotent
        print("stack test timings (s):", TIMINGS, file=sys.stderr)


def test_a_scheduled_run_happens_and_completes(stack, tmp_path):
    """A real ``prefect server start`` (the stack's) and a second ``gradpipe serve`` with a 5 s interval and its
    own deployment name: the server's scheduler itself creates a run, and it completes on the stack's workers.
    (Runs before the end-to-end test, which stops the stack; it leaves no deployment behind.)"""
    from tests.conftest import make_xy, write_csv

    _, _, state, _ = stack
    api = state["prefect_api_url"]
    (tmp_path / "raw").mkdir()
    write_csv(tmp_path / "raw" / "a.csv", *make_xy(2000, 3))
    env = clean_env(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_RUNNER_POLL_FREQUENCY="2")
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([*gradpipe(), "serve", "--interval", "5", "--name", "sched", "--deployment", "every-5s",
                              "--raw", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "data"),
                              "--scheduler", state["scheduler_address"], "--max-iter", "20"], cwd=ROOT, env=env,
                             stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    path = f"{api}/deployments/name/gradpipe-pipeline/every-5s"
    try:
        def deployment():
            assert serve.poll() is None, f"gradpipe serve exited {serve.returncode}:\n{log.read_text()[-3000:]}"
            r = httpx.get(path, timeout=30)
            return r.json() if r.status_code == 200 else None

        dep = wait_until(deployment, 120, "the deployment created by gradpipe serve", poll_s=0.5)
        assert dep["schedules"] and dep["schedules"][0]["schedule"]["interval"] == 5.0

        def completed_scheduled_run():
            assert serve.poll() is None, f"gradpipe serve exited {serve.returncode}:\n{log.read_text()[-3000:]}"
            runs = api_json("POST", f"{api}/flow_runs/filter",
                            json={"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}})
            return [r for r in runs if r["auto_scheduled"] and r["state_type"] == "COMPLETED"]

        t0 = time.monotonic()
        runs = wait_until(completed_scheduled_run, 300, "a scheduled flow run COMPLETED", poll_s=0.5)
        TIMINGS["scheduled run"] = round(time.monotonic() - t0, 1)
        assert runs[0]["deployment_id"] == dep["id"]
        assert list((tmp_path / "data" / "runs").glob("sched-*.zarr")), "the scheduled run wrote no run store"
        assert (tmp_path / "data" / "models" / "sched" / "latest.json").exists()
        assert api_call("DELETE", f"{api}/deployments/{dep['id']}").is_success
        assert api_call("GET", path).status_code == 404
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, 15)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, 9)
                serve.wait()


def test_the_pipeline_runs_end_to_end_through_the_stack(stack):
    root, stack_dir, state, up_out = stack
    api, sched = state["prefect_api_url"], state["scheduler_address"]
    names = [c["name"] for c in state["components"]]
    assert names == ["prefect-server", "scheduler", "worker-1", "worker-2", "serve"]
    for key in ("prefect_url", "dashboard_url", "scheduler_address"):
        assert state[key] in up_out
    assert f"export PREFECT_API_URL={api}" in up_out and f"export DASK_SCHEDULER_ADDRESS={sched}" in up_out
    for c in state["components"]:
        TIMINGS[f"ready {c['name']}"] = c["ready_s"]

    r = cli("stack", "status", "--dir", str(stack_dir), "--json", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    status = json.loads(r.stdout)
    assert status["scheduler_workers"] == 2 and status["prefect_healthy"] and status["all_running"]
    assert httpx.get(state["dashboard_url"], timeout=10).status_code == 200

    from distributed import Client

    def worker_transitions() -> dict[str, int]:
        with Client(sched, timeout="30s") as c:
            return c.run(lambda dask_worker: dask_worker.state.transition_counter)

    before = worker_transitions()
    assert len(before) == 2

    # the driver: `gradpipe run` against the stack's scheduler and Prefect server
    data = root / "data"
    env = clean_env(PREFECT_API_URL=api, PREFECT_HOME=str(root / "client-prefect"))
    r = cli("run", "--scheduler", sched, "--data-dir", str(data), "--raw", str(root / "raw"), "--name", "e2e",
            "--max-iter", "30", "--json", timeout=600, env=env, cwd=root, what="gradpipe run")
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    run_store = Path(result["train"]["run_uri"])
    latest = data / "models" / "e2e" / "latest.json"
    assert run_store.is_dir() and (run_store / "zarr.json").is_file()
    assert latest.is_file() and json.loads(latest.read_text())["run_id"] == result["train"]["run_id"]
    after = worker_transitions()
    assert sum(after.values()) > sum(before.values()), (before, after)  # the stack's workers did the work

    # what the workers wrote is what the CSVs hold, read back by the driver (this process)
    from tests.conftest import dataset_group

    group = dataset_group(result["ingest"]["dataset"])
    X, y = group["X"][:], group["y"][:]
    names = list(group.attrs["feature_names"])
    manifest = group.attrs["manifest"]
    assert sorted(Path(m["path"]).name for m in manifest) == ["part-00000.csv", "part-00001.csv"]
    assert X.shape == (3000, 4) and y.shape == (3000,)
    for m in manifest:
        with open(m["path"], newline="") as fh:
            rows = list(csv.DictReader(fh))
        want_X = np.array([[float(row[n]) for n in names] for row in rows])
        want_y = np.array([float(row["y"]) for row in rows])
        assert m["row_stop"] - m["row_start"] == len(rows)
        assert np.array_equal(X[m["row_start"]:m["row_stop"]], want_X), m["path"]
        assert np.array_equal(y[m["row_start"]:m["row_stop"]], want_y), m["path"]

    # the flow run is recorded in the stack's Prefect server, completed
    runs = api_json("POST", f"{api}/flow_runs/filter", json={
        "flows": {"name": {"any_": ["gradpipe-pipeline"]}},
        "flow_runs": {"deployment_id": {"is_null_": True}}})
    assert [fr["state_type"] for fr in runs] == ["COMPLETED"], runs

    # `gradpipe serve` serves the deployment, and a run of it executes on the stack
    dep = api_json("GET", f"{api}/deployments/name/gradpipe-pipeline/scheduled")
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == [NEVER]
    t0 = time.monotonic()
    fr = api_json("POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={})
    final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    def finished():
        got = api_json("GET", f"{api}/flow_runs/{fr['id']}")
        return got if got["state_type"] in final else None

    got = wait_until(finished, 300, "the served deployment's run", poll_s=0.5)
    TIMINGS["served run"] = round(time.monotonic() - t0, 1)
    assert got["state_type"] == "COMPLETED", (got["state"], Path(state["components"][-1]["log"]).read_text()[-3000:])
    assert (root / "served" / "models" / "served" / "latest.json").is_file()

    # prefect.yaml is a valid `prefect deploy` project (same flow, name and schedule as serve; a work pool)
    penv = {**env, "PWD": str(ROOT)}
    prefect = str(Path(sys.executable).parent / "prefect")
    for argv in (["work-pool", "create", "gradpipe", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        r = subprocess.run([prefect, *argv], capture_output=True, text=True, timeout=300, env=penv, cwd=ROOT)
        assert r.returncode == 0, (argv, r.stdout[-3000:], r.stderr[-3000:])
    dep = api_json("GET", f"{api}/deployments/name/gradpipe-pipeline/scheduled")
    assert dep["work_pool_name"] == "gradpipe" and dep["entrypoint"] == "flows/pipeline.py:pipeline_flow"
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 * * * *"]

    # down stops every process of every component (process groups included), and is idempotent
    from pipeline.stack import Component, members

    procs = [(p.pid, p.create_time()) for c in state["components"] for p in members(Component(**c))]
    assert {pid for pid, _ in procs} >= {c["pid"] for c in state["components"]}
    r = cli("stack", "down", "--dir", str(stack_dir), timeout=120, what="stack down")
    assert r.returncode == 0, r.stderr
    assert all(gone(pid, ct) for pid, ct in procs), [pid for pid, ct in procs if not gone(pid, ct)]
    assert not processes_in(stack_dir)
    assert not (stack_dir / "stack.json").exists()
    port = int(sched.rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    r = cli("stack", "down", "--dir", str(stack_dir), timeout=60)
    assert r.returncode == 0 and "nothing to stop" in r.stdout
    r = cli("stack", "status", "--dir", str(stack_dir), timeout=60)
    assert r.returncode == 1


def test_a_component_that_cannot_start_stops_the_stack(tmp_path):
    stack_dir = tmp_path / "stack"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("stack", "up", "--dir", str(stack_dir), "--no-serve", "--scheduler-port", str(port), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("gradpipe stack: error:")]
    assert len(errors) == 1 and "scheduler failed to start" in errors[0], r.stderr
    assert "Address already in use" in errors[0]
    assert "--- last lines of" in r.stderr  # the log tail
    assert not (stack_dir / "stack.json").exists()
    wait_until(lambda: not processes_in(stack_dir), 30, "the started components to be gone", poll_s=0.5)


def test_tls_stack_processes_speak_only_tls(tmp_path):
    """`stack up --tls`'s Dask half, from the very command lines `up` spawns (``dask_argv``): a throw-away CA
    with private keys, a tls:// scheduler and worker, a client with the exported variables works and a
    plain-TCP client is refused. (The Prefect half is unchanged by --tls; the module's stack covers it.)"""
    import stat

    from distributed import Client

    from pipeline import stack, tls

    files = tls.generate(tmp_path / "tls")
    assert all(stat.S_IMODE(os.stat(tmp_path / "tls" / k).st_mode) == 0o600 for k in ("key.pem", "ca-key.pem"))
    sp, dp = stack.free_port(), stack.free_port()
    state = stack.StackState(dir=str(tmp_path), scheduler_address=f"tls://127.0.0.1:{sp}",
                             dashboard_url=f"http://127.0.0.1:{dp}/status", prefect_url="", prefect_api_url="",
                             prefect_home="", deployment=None, schedule=None, started=time.time(), tls=files.env())
    assert state.env()["GRADPIPE_TLS_KEY"] == files.key  # `up` prints these: paths, never a key's contents
    sched_argv, worker_argv = stack.dask_argv(state, tmp_path, sp, dp, None, files)
    env = clean_env()
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True) for argv in (sched_argv, worker_argv)]
    try:
        def one_worker():
            try:
                return stack._scheduler_workers(state.dashboard_url) >= 1
            except Exception:  # noqa: BLE001 - not up yet
                return False

        wait_until(one_worker, 60, "a tls:// scheduler with 1 worker", poll_s=0.5)
        with Client(state.scheduler_address, security=tls.security(files), timeout="30s") as c:
            assert c.submit(sum, [2, 3]).result() == 5
        with pytest.raises((OSError, TimeoutError)):  # see test_tls.py for the 5 s
            Client(f"tcp://127.0.0.1:{sp}", timeout="5s")
    finally:
        for p in procs:
            os.killpg(p.pid, 15)
        for p in procs:
            p.wait(timeout=30)
