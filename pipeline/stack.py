"""``gradpipe stack``: the docker-compose topology as local processes, for machines without Docker.

One Dask scheduler (dashboard included), N Dask workers with one thread each, a Prefect server and
``gradpipe serve`` (the scheduled deployment), all listening on 127.0.0.1. Each component runs in a process
group of its own (so a stop reaches its children: the Dask nanny's worker, Prefect's web server, a flow run),
logs to ``DIR/logs/NAME.log``, and is recorded in ``DIR/stack.json`` as soon as it is spawned, so ``down``
can stop a stack whose ``up`` was interrupted. A process is only ever signalled when its pid, process
group and start time all match the record: a recycled pid is left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.errors import GradpipeError

STATE_FILE = "stack.json"
HOST = "127.0.0.1"
FLOW_NAME = "gradpipe-pipeline"
PREFECT_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
LOG_TAIL_LINES = 40


@dataclass
class StackOptions:
    dir: Path = Path("data/stack")
    scheduler_port: int = 0  # 0: a free port
    dashboard_port: int = 0
    prefect_port: int = 0
    workers: int = 2
    worker_memory: str | None = None  # dask's --memory-limit (default: its own "auto")
    serve: bool = True
    deployment: str = "scheduled"
    cron: str | None = None  # serve's schedule: cron (default hourly) or an interval in seconds
    interval: float | None = None
    serve_settings: list[str] = field(default_factory=list)  # settings flags for `gradpipe serve`
    timeout: float = 180.0  # seconds each component gets to become ready
    tls: bool = False  # Dask comms over TLS with a throw-away CA in DIR/tls (see pipeline.tls)

    def schedule(self) -> str:
        return f"every {self.interval:g} s" if self.interval else f"cron '{self.cron or '0 * * * *'}'"

    def serve_argv(self) -> list[str]:
        when = ["--interval", f"{self.interval:g}"] if self.interval else ["--cron", self.cron or "0 * * * *"]
        return ["serve", "--deployment", self.deployment, *when, *self.serve_settings]


@dataclass
class Component:
    name: str
    argv: list[str]
    pid: int
    create_time: float  # psutil's: with pid and process group, identifies the process
    log: str
    spawned: float  # epoch seconds
    ready_s: float | None = None  # seconds from spawn to ready


@dataclass
class StackState:
    dir: str
    scheduler_address: str
    dashboard_url: str
    prefect_url: str
    prefect_api_url: str
    prefect_home: str
    deployment: str | None  # FLOW/NAME served by `gradpipe serve`, or None
    schedule: str | None
    started: float
    ready_s: float | None = None
    components: list[Component] = field(default_factory=list)
    tls: dict[str, str] | None = None  # GRADPIPE_TLS_CA/CERT/KEY → paths (never a key's contents)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StackState:
        data = dict(data)
        comps = [Component(**c) for c in data.pop("components", [])]
        return cls(**data, components=comps)

    def env(self) -> dict[str, str]:
        """What a client exports to use this stack."""
        return {"PREFECT_API_URL": self.prefect_api_url, "DASK_SCHEDULER_ADDRESS": self.scheduler_address,
                **(self.tls or {})}


class StartError(GradpipeError):
    def __init__(self, component: Component, reason: str):
        self.component = component
        cause = first_error(component.log)
        super().__init__(f"{component.name} failed to start: {reason}" + (f" — {cause}" if cause else "") +
                         f" (log: {component.log}); everything the stack had started was stopped.")


# ---------------------------------------------------------------------------------------------- processes


def _psutil():
    import psutil  # a dependency of distributed

    return psutil


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _exe(name: str) -> list[str]:
    """The ``name`` console script of this interpreter's environment, else the one on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return [str(here)]
    found = shutil.which(name)
    if found:
        return [found]
    if name == "gradpipe":
        return [sys.executable, "-m", "pipeline"]
    raise GradpipeError(f"`{name}` is not installed next to {sys.executable} nor on PATH.")


def _alive(proc) -> bool:
    psutil = _psutil()
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def members(comp: Component) -> list:
    """The live processes of a component's process group that started no earlier than its leader."""
    psutil = _psutil()
    out = []
    for proc in psutil.process_iter(["create_time"]):
        try:
            if os.getpgid(proc.pid) != comp.pid or proc.info["create_time"] < comp.create_time - 0.05:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        if _alive(proc):
            out.append(proc)
    return out


def leader_running(comp: Component) -> bool:
    psutil = _psutil()
    try:
        proc = psutil.Process(comp.pid)
        return abs(proc.create_time() - comp.create_time) < 0.05 and _alive(proc)
    except psutil.Error:
        return False


def _signal_group(comp: Component, sig: int) -> bool:
    procs = members(comp)
    for proc in procs:
        try:
            proc.send_signal(sig)
        except _psutil().Error:
            pass
    return bool(procs)


def _stage(comp: Component) -> int:
    """Stop order: serve first (its shutdown talks to the Prefect server), the scheduler last."""
    return {"serve": 0, "scheduler": 2}.get(comp.name, 1)


def stop_components(components: list[Component], timeout: float = 30.0) -> list[str]:
    """Stop the components in stages (serve; workers and Prefect server; scheduler): SIGTERM each stage's
    process groups, SIGKILL what is left of them after ``timeout``."""
    stopped = []
    for stage in sorted({_stage(c) for c in components}):
        batch = [c for c in reversed(components) if _stage(c) == stage]
        stopped += [c.name for c in batch if _signal_group(c, signal.SIGTERM)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(members(c) for c in batch):
            time.sleep(0.2)
        left = [c for c in batch if members(c)]
        for comp in left:
            print(f"stack: {comp.name} ignored SIGTERM for {timeout:g} s: SIGKILL", file=sys.stderr)
            _signal_group(comp, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(members(c) for c in left):
            time.sleep(0.1)
    return stopped


def first_error(path: str | Path) -> str | None:
    """The first ``SomethingError: message`` line of a log: in a chained traceback, the root cause."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        m = re.match(r"^([\w.]*(?:Error|Exception)): (.+)$", line.strip())
        if m:
            return f"{m.group(1)}: {m.group(2)}"[:300]
    return None


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


# --------------------------------------------------------------------------------------------------- state


def state_path(stack_dir: str | Path) -> Path:
    return Path(stack_dir) / STATE_FILE


def read_state(stack_dir: str | Path) -> StackState | None:
    path = state_path(stack_dir)
    if not path.exists():
        return None
    try:
        return StackState.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise GradpipeError(f"{path} is not a stack state file ({exc}); remove it by hand.") from None


def write_state(state: StackState) -> None:
    path = state_path(state.dir)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(state), fh, indent=2)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ up


class _Spawner:
    def __init__(self, state: StackState, logs: Path):
        self.state, self.logs, self.popen = state, logs, {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: str | Path) -> Component:
        import subprocess

        log = self.logs / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd, start_new_session=True)
        try:
            create_time = _psutil().Process(proc.pid).create_time()
        except _psutil().Error:  # died at once: the readiness check reports it with its log
            create_time = time.time()
        comp = Component(name, argv, proc.pid, create_time, str(log), time.time())
        self.popen[name] = proc
        self.state.components.append(comp)
        write_state(self.state)
        return comp

    def wait(self, comps: list[Component], ready: Callable[[], bool], deadline_s: float, what: str,
             blame: Component | None = None) -> None:
        """Poll ``ready`` until it holds; fail as soon as one of ``comps`` exits, or at the deadline (the
        error then names ``blame``, by default the first of ``comps``)."""
        deadline = time.monotonic() + deadline_s
        while True:
            for comp in comps:
                code = self.popen[comp.name].poll()
                if code is not None:
                    raise StartError(comp, f"it exited with code {code} before {what}")
            try:
                if ready():
                    break
            except Terminated:
                raise
            except Exception:  # noqa: BLE001 - not ready yet (refused, reset, a half-started server)
                pass
            if time.monotonic() > deadline:
                raise StartError(blame or comps[0], f"not {what} within {deadline_s:g} s")
            time.sleep(0.25)
        for comp in comps:
            comp.ready_s = round(time.time() - comp.spawned, 2)
        write_state(self.state)


class Terminated(GradpipeError):
    exit_code = 143


def _terminated(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM while starting; what was started was stopped.")


def _http_ok(url: str, timeout: float = 2.0) -> Any:
    import httpx

    r = httpx.get(url, timeout=timeout)
    return r.json() if r.status_code == 200 else None


def _scheduler_workers(dashboard_url: str) -> int:
    """Workers connected, from the scheduler's HTTP endpoint (an HTTP timeout cannot hang like a Dask
    handshake with a stranger on the port can)."""
    data = _http_ok(dashboard_url.removesuffix("/status") + "/json/counts.json")
    if not isinstance(data, dict):
        raise ConnectionError("no worker counts")
    return int(data["workers"])


def listening(comp: Component) -> set[int]:
    """TCP ports the component's processes listen on: proves *this* process holds a port, not a stranger."""
    psutil = _psutil()
    ports = set()
    for proc in members(comp):
        try:
            ports |= {c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return ports


def _served_since(api_url: str, deployment: str, since: float) -> bool:
    """The deployment exists and was (re)applied by this serve process, not left from an earlier stack."""
    data = _http_ok(f"{api_url}/deployments/name/{FLOW_NAME}/{deployment}")
    if not data:
        return False
    updated = datetime.fromisoformat(data["updated"].replace("Z", "+00:00")).timestamp()
    return updated >= since - 1.0


def dask_argv(state: StackState, stack_dir: Path, sp: int, dp: int, worker_memory: str | None,
              tls_files) -> tuple[list[str], list[str]]:
    """The ``dask scheduler`` and ``dask worker`` command lines (the worker's without ``--name``)."""
    secure = tls_files.dask_flags() if tls_files else []
    sched = [*_exe("dask"), "scheduler", "--host", HOST, "--port", str(sp), "--dashboard-address", f"{HOST}:{dp}",
             *secure]
    worker = [*_exe("dask"), "worker", state.scheduler_address, "--nthreads", "1", "--host", HOST,
              "--dashboard-address", f"{HOST}:0", "--local-directory", str(stack_dir / "dask-worker-space"), *secure]
    if worker_memory:
        worker += ["--memory-limit", worker_memory]
    return sched, worker


def up(opts: StackOptions, say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
       ) -> StackState:
    """Start the stack, wait until every component is ready, and return its state.

    On any failure (a component exits, misses its deadline, or Ctrl-C) everything already started is stopped
    and the error is raised; the component's log tail is in the ``StartError``'s log file.
    """
    if opts.workers < 1:
        raise GradpipeError(f"--workers must be ≥ 1, not {opts.workers}.")
    stack_dir = Path(opts.dir).absolute()
    old = read_state(stack_dir)
    if old is not None:
        running = [c.name for c in old.components if members(c)]
        if running:
            raise GradpipeError(f"a stack is already running from {stack_dir} ({', '.join(running)}): "
                                f"`gradpipe stack down --dir {opts.dir}` first.")
    logs = stack_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ports = {k: getattr(opts, k) or free_port() for k in ("scheduler_port", "dashboard_port", "prefect_port")}
    if len(set(ports.values())) < 3:
        raise GradpipeError(f"ports must differ: {ports}")
    sp, dp, pp = ports["scheduler_port"], ports["dashboard_port"], ports["prefect_port"]
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    prefect_home = base_env.get("PREFECT_HOME") or str(stack_dir / "prefect")
    tls_files = None
    if opts.tls:
        from pipeline import tls

        tls_files = tls.generate(stack_dir / "tls", hosts=(HOST, "localhost"))
    state = StackState(dir=str(stack_dir), scheduler_address=f"{'tls' if tls_files else 'tcp'}://{HOST}:{sp}",
                       dashboard_url=f"http://{HOST}:{dp}/status", prefect_url=f"http://{HOST}:{pp}",
                       prefect_api_url=f"http://{HOST}:{pp}/api", prefect_home=prefect_home,
                       deployment=f"{FLOW_NAME}/{opts.deployment}" if opts.serve else None,
                       schedule=opts.schedule() if opts.serve else None, started=time.time(),
                       tls=tls_files.env() if tls_files else None)
    write_state(state)
    prefect_env = {**base_env, **PREFECT_ENV, "PREFECT_HOME": prefect_home, "PREFECT_API_URL": state.prefect_api_url}
    dask_env = {k: v for k, v in base_env.items() if k != "DASK_SCHEDULER_ADDRESS"}
    sched_argv, worker_argv = dask_argv(state, stack_dir, sp, dp, opts.worker_memory, tls_files)
    s = _Spawner(state, logs)
    t0 = time.monotonic()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
    try:
        # Prefect's server is the slow one (5–25 s): start it first, the Dask side comes up meanwhile.
        say(f"starting prefect server on {state.prefect_url} (takes 5–25 s)…")
        prefect = s.spawn("prefect-server", [*_exe("prefect"), "server", "start", "--host", HOST, "--port", str(pp)],
                          prefect_env, stack_dir)
        say(f"starting dask scheduler on {state.scheduler_address}…")
        sched = s.spawn("scheduler", sched_argv, dask_env, stack_dir)
        s.wait([sched], lambda: {sp, dp} <= listening(sched), opts.timeout, f"listening on ports {sp} and {dp}")
        workers = [s.spawn(f"worker-{i + 1}", [*worker_argv, "--name", f"worker-{i + 1}"], dask_env, stack_dir)
                   for i in range(opts.workers)]
        say(f"waiting for {opts.workers} dask worker(s)…")
        s.wait([sched, *workers], lambda: _scheduler_workers(state.dashboard_url) >= opts.workers,
               opts.timeout, f"connected with {opts.workers} worker(s)", blame=workers[0] if workers else sched)
        s.wait([prefect], lambda: pp in listening(prefect) and _http_ok(f"{state.prefect_api_url}/health") is True,
               max(0.0, opts.timeout - (time.time() - prefect.spawned)), f"healthy at {state.prefect_api_url}/health")
        if opts.serve:
            say(f"starting gradpipe serve ({state.deployment}, {state.schedule})…")
            serve_env = {**prefect_env, "DASK_SCHEDULER_ADDRESS": state.scheduler_address, **(state.tls or {})}
            serve = s.spawn("serve", [*_exe("gradpipe"), *opts.serve_argv()], serve_env, os.getcwd())
            s.wait([serve], lambda: _served_since(state.prefect_api_url, opts.deployment, serve.spawned),
                   opts.timeout, f"serving {state.deployment}")
    except BaseException as exc:
        comp = exc.component if isinstance(exc, StartError) else None
        if comp is not None:
            say(f"--- last lines of {comp.log} ---\n{log_tail(comp.log)}\n---")
        say("stopping what was started…")
        stop_components(state.components, timeout=15)
        state_path(stack_dir).unlink(missing_ok=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    state.ready_s = round(time.monotonic() - t0, 2)
    write_state(state)
    return state


# ---------------------------------------------------------------------------------------------- down/status


def down(stack_dir: str | Path, timeout: float = 30.0) -> tuple[StackState | None, list[str]]:
    """Stop the stack in ``stack_dir`` (idempotent): its state and the names of the components that ran."""
    state = read_state(stack_dir)
    if state is None:
        return None, []
    stopped = stop_components(state.components, timeout)
    state_path(stack_dir).unlink(missing_ok=True)
    return state, stopped


def status(stack_dir: str | Path) -> dict[str, Any] | None:
    """The recorded state plus what runs now: per component ``running``; live checks of the services."""
    state = read_state(stack_dir)
    if state is None:
        return None
    out = asdict(state)
    for comp, rec in zip(state.components, out["components"], strict=True):
        rec["running"] = leader_running(comp)
    try:
        out["scheduler_workers"] = _scheduler_workers(state.dashboard_url)
    except Exception:  # noqa: BLE001 - unreachable
        out["scheduler_workers"] = None
    try:
        out["prefect_healthy"] = _http_ok(f"{state.prefect_api_url}/health") is True
    except Exception:  # noqa: BLE001
        out["prefect_healthy"] = False
    out["all_running"] = all(c["running"] for c in out["components"]) and bool(out["components"])
    return out
