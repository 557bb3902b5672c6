"""Settings precedence (flags > env > TOML > defaults), absolute paths, and clear errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from pipeline.errors import GradpipeError
from pipeline.settings import Settings, load
from pipeline.store import location

REPO = Path(__file__).resolve().parents[1]


def test_precedence_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "s.toml"
    cfg.write_text('name = "file"\nraw = "in/*.csv"\n[train]\nmax_iter = 3\nsolver = "adam"\n')
    s = load(cfg, environ={})
    assert (s.name, s.train.max_iter, s.train.solver) == ("file", 3, "adam")
    assert s.raw == [str(tmp_path / "in/*.csv")] and s.data_dir == str(tmp_path / "data")
    s = load(cfg, environ={"GRADPIPE_NAME": "env", "GRADPIPE_TRAIN_MAX_ITER": "9", "DASK_SCHEDULER_ADDRESS": "tcp://x:1"})
    assert (s.name, s.train.max_iter, s.scheduler) == ("env", 9, "tcp://x:1")
    env = {"GRADPIPE_TRAIN_TOL": "1e-6", "GRADPIPE_TRAIN_TIME_BUDGET": "30", "GRADPIPE_TRAIN_LR": "0.5"}
    s = load(cfg, environ=env)
    assert (s.train.tol, s.train.time_budget, s.train.lr) == (1e-6, 30.0, 0.5)
    s = load(cfg, {"name": "flag", "max_iter": 11}, environ={"GRADPIPE_NAME": "env"})
    assert (s.name, s.train.max_iter) == ("flag", 11)
    assert s.dataset == str(tmp_path / "data" / "datasets" / "flag.zarr")


def test_scheduler_from_the_environment_beats_the_file(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('scheduler = "tcp://file:1"\n')
    assert load(cfg, environ={}).scheduler == "tcp://file:1"
    assert load(cfg, environ={"DASK_SCHEDULER_ADDRESS": "tcp://dask-env:2"}).scheduler == "tcp://dask-env:2"
    both = {"DASK_SCHEDULER_ADDRESS": "tcp://dask-env:2", "GRADPIPE_SCHEDULER": "tcp://ours:3"}
    assert load(cfg, environ=both).scheduler == "tcp://ours:3"  # our own variable is the more specific
    assert load(cfg, {"scheduler": "tcp://flag:4"}, environ=both).scheduler == "tcp://flag:4"


def test_example_file_loads():
    s = load(REPO / "gradpipe.example.toml", environ={})
    assert s.name == "demo" and s.train.model == "linear"


@pytest.mark.parametrize("text, message", [
    ('nmae = "x"\n', "unknown setting(s) ['nmae']"),
    ('[train]\nsolver = "bfgs"\n', "--solver: unknown solver 'bfgs'"),
    ('name = \n', "s.toml"),
])
def test_bad_settings_are_named(tmp_path, text, message):
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(GradpipeError, match=re.escape(message)):
        load(tmp_path / "s.toml", environ={})


def test_missing_config_file(tmp_path):
    with pytest.raises(GradpipeError, match="does not exist"):
        load(tmp_path / "nope.toml", environ={})


def test_tls_settings_from_file_and_environment(tmp_path, monkeypatch):
    from pipeline import tls

    monkeypatch.chdir(tmp_path)
    files = tls.generate(tmp_path / "certs")
    assert load(environ={}).tls_security() is None  # off unless asked: nothing changes for other users
    cfg = tmp_path / "s.toml"
    cfg.write_text('scheduler = "tls://10.0.0.5:8786"\ntls_ca = "certs/ca.pem"\ntls_cert = "certs/cert.pem"\n'
                   'tls_key = "certs/key.pem"\n')
    s = load(cfg, environ={})
    assert (s.tls_ca, s.tls_key) == (files.ca, files.key)  # relative paths resolved against the cwd
    sec = s.tls_security()
    assert sec.require_encryption and sec.tls_ca_file == files.ca and sec.tls_client_key == files.key
    assert load(environ={"GRADPIPE_TLS": "1"}).tls  # the embedded cluster then uses a throw-away certificate
    s = load(environ={"GRADPIPE_TLS_CA": files.ca, "GRADPIPE_TLS_CERT": files.cert})
    with pytest.raises(GradpipeError, match="GRADPIPE_TLS_KEY"):
        s.tls_security()


def test_a_uri_data_dir_makes_every_location_a_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = ["s3://bucket/raw/*.csv", "in"]
    for s in (load(None, {"data_dir": "s3://bucket/gradpipe/", "name": "n", "raw": raw}, environ={}),
              load(environ={"GRADPIPE_DATA_DIR": "s3://bucket/gradpipe", "GRADPIPE_NAME": "n",
                            "GRADPIPE_RAW": ",".join(raw)})):
        assert s.data_dir == "s3://bucket/gradpipe"  # not folded into s3:/ by Path, nor made "absolute"
        assert (s.dataset, s.runs_dir, s.tunes_dir, s.models_dir) == (
            "s3://bucket/gradpipe/datasets/n.zarr", "s3://bucket/gradpipe/runs", "s3://bucket/gradpipe/tunes",
            "s3://bucket/gradpipe/models/n")
        assert s.raw == ["s3://bucket/raw/*.csv", str(tmp_path / "in")]
        assert Settings.from_dict(s.to_dict()).runs_dir == s.runs_dir  # what a flow task sees
    toml = tmp_path / "g.toml"
    toml.write_text('data_dir = "gs://b/x"\n')
    assert load(toml, environ={}).models_dir == "gs://b/x/models/demo"


def test_a_local_data_dir_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load(None, {"data_dir": "d", "name": "n"}, environ={})
    data = tmp_path / "d"
    assert (s.dataset, s.runs_dir, s.tunes_dir, s.models_dir) == (
        str(data / "datasets" / "n.zarr"), str(data / "runs"), str(data / "tunes"), str(data / "models" / "n"))
    assert all(isinstance(p, str) for p in (s.dataset, s.runs_dir, s.tunes_dir, s.models_dir))


SECRET = "wJalrXUtnFEMI-not-a-real-secret"


@pytest.fixture
def options_env(monkeypatch):
    """GRADPIPE_STORAGE_OPTIONS restored after the test (load() sets it for the process)."""
    monkeypatch.setenv(location.OPTIONS_ENV, "")
    return monkeypatch


def test_storage_options_table_is_applied_to_the_process(tmp_path, options_env):
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'data_dir = "s3://b/gp"\n[storage_options]\nendpoint_url = "http://minio:9000"\n'
                   f'key = "gp"\nsecret = "{SECRET}"\n')
    s = load(cfg, environ={})
    assert s.storage_options == {"endpoint_url": "http://minio:9000", "key": "gp", "secret": SECRET}
    assert json.loads(os.environ[location.OPTIONS_ENV]) == s.storage_options  # workers inherit it from here
    assert location.storage_options("s3") == s.storage_options  # what filesystem() and Icechunk use
    fs, _ = location.filesystem("s3://b/gp")
    assert (fs.key, fs.secret, fs.client_kwargs.get("endpoint_url", fs.endpoint_url)) == (
        "gp", SECRET, "http://minio:9000")
    # the environment overrides the file key by key (the file may hold the endpoint, the env the secret)
    s = load(cfg, environ={location.OPTIONS_ENV: json.dumps({"secret": "other"})})
    assert s.storage_options == {"endpoint_url": "http://minio:9000", "key": "gp", "secret": "other"}
    assert location.storage_options("s3")["secret"] == "other"


def test_storage_option_values_are_never_shown(tmp_path, options_env, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[storage_options]\nkey = "gp"\nsecret = "{SECRET}"\n')
    s = load(cfg, environ={})
    shown = s.to_dict()  # Prefect flow and deployment parameters
    assert shown["storage_options"] == {"key": "***", "secret": "***"}
    print(s, repr(s), str(s))
    out = capsys.readouterr().out
    assert SECRET not in json.dumps(shown) and SECRET not in out and "'secret': '***'" in out
    assert "name='demo'" in out  # the rest of the settings is still shown
    # a flow rebuilding its settings from the redacted dict keeps the real options of the environment
    again = Settings.from_dict(shown)
    again.apply_storage_options()
    assert location.storage_options("s3")["secret"] == SECRET


@pytest.mark.parametrize("text, env, message", [
    ('storage_options = "x"\n', {}, "storage_options: a table"),
    ("", {"GRADPIPE_STORAGE_OPTIONS": "{nope"}, "GRADPIPE_STORAGE_OPTIONS must be a JSON object"),
    ("", {"GRADPIPE_STORAGE_OPTIONS": "[1]"}, "GRADPIPE_STORAGE_OPTIONS must be a JSON object"),
])
def test_bad_storage_options_are_named(tmp_path, options_env, text, env, message):
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(GradpipeError, match=re.escape(message)):
        load(tmp_path / "s.toml", environ=env)
