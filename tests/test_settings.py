"""Settings precedence (flags > env > TOML > defaults), absolute paths, and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.errors import GradpipeError
from pipeline.settings import load

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
    assert s.dataset == tmp_path / "data" / "datasets" / "flag.zarr"


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
