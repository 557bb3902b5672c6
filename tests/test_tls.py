"""TLS for the Dask comms (``pipeline.tls``): who is refused, and the pipeline end to end over tls://.

One TLS LocalCluster (1 worker process) for the module, started by ``pipeline.cluster.cluster_address`` with
certificates from ``pipeline.tls.generate``: the same code paths the CLI uses.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import tls
from pipeline.cli import main
from pipeline.errors import GradpipeError
from tests.conftest import make_xy, write_csv

N, D = 2000, 3


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tls.TLSFiles:
    return tls.generate(tmp_path_factory.mktemp("tls") / "certs")


@pytest.fixture(scope="module")
def tls_cluster(tls_files):
    from pipeline.cluster import cluster_address

    with cluster_address(workers=1, security=tls.security(tls_files)) as address:
        yield address


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tls_cluster, tls_files):
    """Ingested over TLS too: every byte the pipeline moves goes through the encrypted comms."""
    from distributed import Client

    from pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("tlsdata")
    X, y = make_xy(N, D, seed=5)
    write_csv(root / "a.csv", X, y)
    with Client(tls_cluster, security=tls.security(tls_files), timeout="30s") as c:
        ingest([str(root / "a.csv")], root / "ds.zarr", "y", c, chunk_mb=0.05)
    return root, X, y


def lstsq(X, y):
    A = np.column_stack([X, np.ones(len(X))])
    return np.linalg.lstsq(A, y, rcond=None)[0]


def test_generated_ca_signs_the_certificate_and_keys_are_private(tls_files):
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(Path(tls_files.ca).read_bytes())
    cert = x509.load_pem_x509_certificate(Path(tls_files.cert).read_bytes())
    cert.verify_directly_issued_by(ca)  # raises unless the CA's key signed it
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in ips.get_values_for_type(x509.IPAddress)}
    certs = Path(tls_files.ca).parent
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    for key in (tls_files.key, str(certs / "ca-key.pem")):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key


def test_plain_tcp_and_foreign_certificates_are_refused(tls_cluster, tls_files):
    from distributed import Client, Security

    assert tls_cluster.startswith("tls://127.0.0.1:")
    with Client(tls_cluster, security=tls.security(tls_files), timeout="30s") as good:  # positive control
        assert good.submit(sum, [1, 2]).result() == 3
    # A plain-TCP client at the TLS port: the TLS server drops its unencrypted handshake. 5 s is >10× the
    # good client's connect time here; the failure is a refusal, not a slow cluster.
    with pytest.raises((OSError, TimeoutError)):
        Client(tls_cluster.replace("tls://", "tcp://"), timeout="5s")
    # A TLS client with its own self-signed certificate (not issued by the cluster's CA): rejected both ways.
    with pytest.raises((OSError, TimeoutError)):
        Client(tls_cluster, security=Security.temporary(), timeout="5s")
    # The cluster's CA but no certificate of its own (a raw TLS socket: Dask's client will not even try):
    # the scheduler requires one (mutual TLS) and ends the connection before a byte of Dask is spoken.
    import ssl

    ctx = ssl.create_default_context(cafile=tls_files.ca)
    ctx.check_hostname = False
    host, port = tls_cluster.removeprefix("tls://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw) as conn:  # TLS 1.3: the server's alert arrives on the first read
                conn.sendall(b"x")
                if conn.recv(1) == b"":
                    raise ConnectionError("closed by the scheduler")


def test_train_end_to_end_over_tls_to_an_external_scheduler(dataset, tls_cluster, tls_files, tmp_path,
                                                            monkeypatch, capsys):
    root, X, y = dataset
    monkeypatch.setenv(tls.ENV_ON, "")  # restored afterwards: --tls sets it for the process
    for key, value in tls_files.env().items():
        monkeypatch.setenv(key, value)
    runs = tmp_path / "runs"
    assert main(["train", "--tls", "--dataset", str(root / "ds.zarr"), "--runs-dir", str(runs),
                 "--scheduler", tls_cluster, "--json", "--gtol", "1e-10"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    sol = lstsq(X, y)
    assert res["status"] == "converged"
    np.testing.assert_allclose(res["coef"], sol[:-1], rtol=1e-6)  # the bar test_train.py uses for lstsq
    key_pem = Path(tls_files.key).read_bytes()
    for f in (p for p in runs.rglob("*") if p.is_file()):
        data = f.read_bytes()
        assert b"PRIVATE KEY" not in data and key_pem not in data, f
    assert "PRIVATE KEY" not in out.out + out.err


def test_tls_misconfiguration_is_one_message(dataset, tls_cluster, tls_files, tmp_path, monkeypatch, capsys):
    root, _, _ = dataset
    for key in (tls.ENV_ON, tls.ENV_CA, tls.ENV_CERT, tls.ENV_KEY):
        monkeypatch.setenv(key, "")
    args = ["train", "--dataset", str(root / "ds.zarr"), "--runs-dir", str(tmp_path / "runs")]
    # the same scheduler by another name: this process registered credentials for `tls_cluster` (a flow's task
    # given only the address reuses them), not for this one
    tls_cluster = tls_cluster.replace("127.0.0.1", "localhost")
    assert main([*args, "--scheduler", tls_cluster]) == 2  # a tls:// scheduler, TLS not configured
    assert "speaks TLS" in capsys.readouterr().err
    assert main([*args, "--scheduler", tls_cluster, "--tls"]) == 2  # --tls, but no CA/cert/key
    assert tls.ENV_CA in capsys.readouterr().err
    monkeypatch.setenv(tls.ENV_CA, tls_files.ca)
    monkeypatch.setenv(tls.ENV_CERT, tls_files.cert)
    assert main([*args, "--scheduler", tls_cluster]) == 2  # two of the three files
    assert tls.ENV_KEY in capsys.readouterr().err
    monkeypatch.setenv(tls.ENV_KEY, str(tmp_path / "nope.pem"))
    assert main([*args, "--scheduler", tls_cluster.replace("tls://", "tcp://")]) == 2
    assert "nope.pem" in capsys.readouterr().err
    monkeypatch.setenv(tls.ENV_KEY, tls_files.key)
    assert main([*args, "--scheduler", tls_cluster.replace("tls://", "tcp://")]) == 2
    assert "use tls://" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resolve_is_off_unless_asked():
    assert tls.from_environ(external=True, environ={}) is None
    assert tls.from_environ(external=False, environ={"GRADPIPE_TLS": "0"}) is None
    assert tls.from_environ(external=False, environ={"GRADPIPE_TLS": "1"}).require_encryption
    with pytest.raises(GradpipeError, match="GRADPIPE_TLS_CA"):
        tls.from_environ(external=True, environ={"GRADPIPE_TLS": "1"})


def _hold_8787() -> socket.socket | None:
    """Occupy 127.0.0.1:8787 unless something already does (then it is taken anyway)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 8787))
        s.listen()
        return s
    except OSError:
        s.close()
        return None


def test_embedded_tls_cluster_with_8787_taken_is_quiet_and_names_the_port(dataset, tmp_path):
    """`gradpipe train --tls` on an embedded cluster, the default dashboard port busy: no Dask warning, no
    jupyter-server-proxy hint; the one "dask:" line's link names the port used, and the tls:// address.

    The command runs with the root logger at INFO, as under Prefect (`gradpipe run`, `serve`): that is where
    Dask's scheduler printed its INFO hint to install jupyter-server-proxy on start-up."""
    root, X, y = dataset
    holder = _hold_8787()
    try:
        with socket.create_connection(("127.0.0.1", 8787), timeout=2):
            pass  # 8787 is taken (by us or by someone else)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADPIPE_", "DASK_"))}
        argv = ["train", "--tls", "--workers", "1", "--dataset", str(root / "ds.zarr"),
                "--runs-dir", str(tmp_path / "runs"), "--gtol", "1e-10"]  # no --json: it hides the line
        code = ("import logging, sys\nlogging.basicConfig(level=logging.INFO)\nfrom pipeline.cli import main\n"
                f"if __name__ == '__main__':\n    sys.exit(main({argv!r}))\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env,
                           cwd=Path(__file__).resolve().parents[1])
    finally:
        if holder is not None:
            holder.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already in use" not in r.stderr and "jupyter-server-proxy" not in r.stderr, r.stderr
    m = re.search(r"^dask: tls://127\.0\.0\.1:\d+ with 1 workers; dashboard http://127\.0\.0\.1:(\d+)/status$",
                  r.stderr, re.M)
    assert m and m.group(1) != "8787", r.stderr
    assert re.search(r"^run \S+: \w+ converged", r.stdout, re.M), r.stdout

