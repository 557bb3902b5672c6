"""Encrypted, authenticated Dask comms (opt-in): distributed's ``Security`` from files, flags or settings.

TLS is off unless asked for (``--tls``, ``GRADPIPE_TLS=1``, or a CA/cert/key given), so nothing changes for
other users. With it on, every Dask connection is ``tls://`` with ``require_encryption=True``, and a peer
must present a certificate signed by the CA: a plain-TCP client, or one without the CA's certificate, is
refused at the handshake. Private keys are written with mode 0600 and only their *paths* are ever printed
or recorded.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import GradpipeError

ENV_ON, ENV_CA, ENV_CERT, ENV_KEY = "GRADPIPE_TLS", "GRADPIPE_TLS_CA", "GRADPIPE_TLS_CERT", "GRADPIPE_TLS_KEY"
TRUE = ("1", "true", "yes", "on")

# Security objects of the clusters this process opened, by address: a later ``dask_client(address)`` (a flow's
# task, given only the address) connects with the same credentials.
_REGISTRY: dict[str, object] = {}


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the CA certificate peers are checked against, and this side's certificate and key."""

    ca: str
    cert: str
    key: str

    def env(self) -> dict[str, str]:
        return {ENV_CA: self.ca, ENV_CERT: self.cert, ENV_KEY: self.key}

    def dask_flags(self) -> list[str]:
        """The ``dask scheduler`` / ``dask worker`` options that load these files."""
        return ["--protocol", "tls", "--tls-ca-file", self.ca, "--tls-cert", self.cert, "--tls-key", self.key]


def files(ca: str | None, cert: str | None, key: str | None, source: str = "settings") -> TLSFiles | None:
    """The three files, checked readable; None when none is given. Some but not all is an error naming the
    missing ones (``source`` says where they came from: env variables, TOML keys)."""
    given = {"ca": ca or "", "cert": cert or "", "key": key or ""}
    if not any(given.values()):
        return None
    missing = [n for n, v in given.items() if not v]
    if missing:
        names = ", ".join(f"{ENV_CA if n == 'ca' else ENV_CERT if n == 'cert' else ENV_KEY} (tls_{n})"
                          for n in missing)
        raise GradpipeError(f"TLS needs a CA, a certificate and a key; {source} lack {names}.")
    for name, path in given.items():
        if not os.access(path, os.R_OK) or not Path(path).is_file():
            raise GradpipeError(f"TLS {name} file {path} ({source}) does not exist or is not readable.")
    return TLSFiles(**given)


def security(tls_files: TLSFiles | None):
    """A ``Security`` requiring encryption for every role; without files, a throw-away in-memory certificate
    (good for an embedded cluster only: an external scheduler would not trust it)."""
    from distributed import Security

    if tls_files is None:
        return Security.temporary()
    f = tls_files
    return Security(require_encryption=True, tls_ca_file=f.ca,
                    tls_client_cert=f.cert, tls_client_key=f.key,
                    tls_scheduler_cert=f.cert, tls_scheduler_key=f.key,
                    tls_worker_cert=f.cert, tls_worker_key=f.key)


def resolve(enabled: bool, ca: str | None, cert: str | None, key: str | None, external: bool,
            source: str = "settings"):
    """``Security`` or None (TLS off). Files imply TLS; ``enabled`` without files works for an embedded
    cluster (a throw-away certificate) and is an error for an ``external`` scheduler."""
    found = files(ca, cert, key, source)
    if found is None and not enabled:
        return None
    if found is None and external:
        raise GradpipeError(f"TLS to an external scheduler needs the cluster's CA, a certificate and a key: "
                            f"set {ENV_CA}, {ENV_CERT} and {ENV_KEY} (or tls_ca/tls_cert/tls_key in the "
                            f"settings file); `gradpipe stack up --tls` prints them.")
    return security(found)


def from_environ(external: bool, environ: Mapping[str, str] | None = None):
    env = os.environ if environ is None else environ
    return resolve(env.get(ENV_ON, "").strip().lower() in TRUE, env.get(ENV_CA), env.get(ENV_CERT),
                   env.get(ENV_KEY), external, source="the environment")


def register(address: str, sec) -> None:
    if sec is not None:
        _REGISTRY[address] = sec


def unregister(address: str) -> None:
    _REGISTRY.pop(address, None)


def registered(address: str):
    return _REGISTRY.get(address)


def check_address(address: str, sec) -> str:
    """A scheme-less address gets the one TLS implies; a mismatch is one clear message, not a handshake
    timeout 30 s later."""
    if "://" not in address:
        return f"tls://{address}" if sec is not None else address
    scheme = address.split("://", 1)[0]
    if sec is not None and scheme != "tls":
        raise GradpipeError(f"TLS is on but the scheduler address {address} is {scheme}://: use tls://… "
                            f"(or turn TLS off).")
    if sec is None and scheme == "tls":
        raise GradpipeError(f"scheduler {address} speaks TLS: pass --tls and set {ENV_CA}, {ENV_CERT}, "
                            f"{ENV_KEY} (or tls_ca/tls_cert/tls_key in the settings file).")
    return address


# ------------------------------------------------------------------------------------- throw-away CA


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the start (a key is never world-readable, not even briefly)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)  # umask cannot widen it, but may have narrowed a certificate's
    os.replace(tmp, path)


def generate(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
             days: int = 30) -> TLSFiles:
    """A throw-away CA and one certificate it signs, valid for ``hosts``, for every role of a cluster.

    Writes ``ca.pem`` (0644), ``cert.pem`` (0644), ``key.pem`` and ``ca-key.pem`` (0600) under ``directory``
    (0700). The CA key is kept only so more certificates can be signed by hand; nothing here reads it back.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # tolerate small clock skew
    until = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gradpipe throw-away CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gradpipe dask")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    private = {"encoding": pem, "format": serialization.PrivateFormat.PKCS8,
               "encryption_algorithm": serialization.NoEncryption()}
    _write(out / "ca-key.pem", ca_key.private_bytes(**private), 0o600)
    _write(out / "key.pem", key.private_bytes(**private), 0o600)
    _write(out / "ca.pem", ca_cert.public_bytes(pem), 0o644)
    _write(out / "cert.pem", cert.public_bytes(pem), 0o644)
    return TLSFiles(ca=str(out / "ca.pem"), cert=str(out / "cert.pem"), key=str(out / "key.pem"))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.tls DIR [HOST…]``: certificates for docker-compose.tls.yml or a cluster of your own."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("-"):
        print("usage: python -m pipeline.tls DIR [HOST ...]   (default hosts: 127.0.0.1 localhost scheduler)",
              file=sys.stderr)
        return 2
    out = generate(args[0], hosts=tuple(args[1:]) or ("127.0.0.1", "localhost", "scheduler"))
    for key, value in out.env().items():
        print(f"export {key}={Path(value).absolute()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
