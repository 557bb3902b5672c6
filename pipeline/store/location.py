"""Where stores and raw files live: a local path or an fsspec URI (``s3://bucket/key``, ``gs://…``, ``az://…``).

One place turns a location into what each library needs — an fsspec filesystem (raw files, run stores,
models), an Icechunk ``Storage`` (datasets) — with credentials and endpoints from the standard places:

- the AWS variables and config files (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_REGION``…) and
  ``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, Ceph, a local moto server);
- ``GRADPIPE_STORAGE_OPTIONS``, a JSON object of fsspec ``storage_options`` (``endpoint_url``, ``key``,
  ``secret``, ``region``, ``anon``), which the settings file's ``[storage_options]`` table sets for the run.

Nothing here is ever written into a store or a log line: stores record the URI alone.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
from pathlib import Path
from typing import Any

from pipeline.errors import GradpipeError

OPTIONS_ENV = "GRADPIPE_STORAGE_OPTIONS"
SNAPSHOT_MARK = "@"


def is_remote(uri: str | Path) -> bool:
    """A URI with a scheme other than ``file://`` (a local path never has ``://``)."""
    s = str(uri)
    return "://" in s and not s.startswith("file://")


def protocol(uri: str | Path) -> str:
    return str(uri).split("://", 1)[0] if is_remote(uri) else "file"


def absolute(uri: str | Path) -> str:
    """A local path made absolute (a remote worker resolves a relative one in its own directory); a URI
    unchanged, less a trailing slash."""
    s = str(uri)
    if is_remote(s):
        return s.rstrip("/")
    return str(Path(s.removeprefix("file://")).absolute())


def join(base: str | Path, *parts: str) -> str:
    """``base/part/…`` for a path or a URI (``Path`` would fold ``s3://`` into ``s3:/``)."""
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base).joinpath(*parts))


def name(uri: str | Path) -> str:
    """The last component of a path or URI."""
    return posixpath.basename(str(uri).rstrip("/")) if is_remote(uri) else Path(uri).name


def parent(uri: str | Path) -> str:
    return posixpath.dirname(str(uri).rstrip("/")) if is_remote(uri) else str(Path(uri).parent)


def split_snapshot(spec: str | Path) -> tuple[str, str | None]:
    """``D@SNAPSHOT`` → (D, SNAPSHOT); a plain ``D`` → (D, None). The mark counts only in the last component,
    so a directory with an ``@`` in its name is still a path."""
    s = str(spec)
    head, _, last = s.rpartition("/")
    if SNAPSHOT_MARK in last:
        base, _, snap = last.rpartition(SNAPSHOT_MARK)
        if base and snap:
            return (f"{head}/{base}" if head or s.startswith("/") else base), snap
    return s, None


def storage_options(proto: str | None = None) -> dict[str, Any]:
    """The user's fsspec storage options (``GRADPIPE_STORAGE_OPTIONS``), with ``AWS_ENDPOINT_URL`` as the
    default endpoint for ``s3``."""
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    try:
        opts = dict(json.loads(raw)) if raw else {}
    except (ValueError, TypeError) as exc:
        raise GradpipeError(f"{OPTIONS_ENV} must be a JSON object of storage options ({exc}).") from None
    if proto in (None, "s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL") and "endpoint_url" not in opts:
        opts["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return opts


def set_storage_options(opts: dict[str, Any]) -> None:
    """Make ``opts`` this process's storage options (and its LocalCluster workers', which inherit the
    environment)."""
    if opts:
        os.environ[OPTIONS_ENV] = json.dumps(opts)


ICECHUNK_ONLY = ("requests_per_object",)  # options for dataset reads alone, never passed to fsspec


def _fsspec_options(proto: str) -> dict[str, Any]:
    """Our option names as the fsspec implementation spells them (s3fs puts the region in client_kwargs)."""
    opts = storage_options(proto)
    for key in ICECHUNK_ONLY:
        opts.pop(key, None)
    if proto in ("s3", "s3a"):
        region = opts.pop("region", None)
        if region:
            opts.setdefault("client_kwargs", {})["region_name"] = region
    return opts


def fsspec_options(uri: str | Path) -> dict[str, Any]:
    """The fsspec ``storage_options`` for ``uri`` (what ``zarr.storage.FsspecStore.from_url`` takes)."""
    return _fsspec_options(protocol(uri)) if is_remote(uri) else {}


def filesystem(uri: str | Path):
    """``(fs, path)``: the fsspec filesystem and the path inside it (local paths: the local filesystem)."""
    import fsspec

    if not is_remote(uri):
        return fsspec.filesystem("file"), absolute(uri)
    proto = protocol(uri)
    try:
        fs = fsspec.filesystem(proto, **_fsspec_options(proto))
    except (ImportError, ValueError) as exc:
        raise GradpipeError(f"cannot open {uri}: no filesystem for {proto}:// ({exc}); install its fsspec "
                            f"package (s3fs for s3://, gcsfs for gs://, adlfs for az://).") from None
    return fs, fs._strip_protocol(str(uri))


@functools.cache
def _quiet_icechunk() -> None:
    """Icechunk warns on every local repository that its storage is not safe for concurrent commits; gradpipe
    serializes local writers with a lock (``pipeline.store.dataset.Transaction``), so the warning would only
    alarm users."""
    import icechunk

    icechunk.set_logs_filter("error")


def icechunk_config(uri: str | Path):
    """The Icechunk ``RepositoryConfig`` for reading a dataset at ``uri``: None (Icechunk's defaults) unless
    ``requests_per_object`` is set. Icechunk splits a large chunk object into concurrent ranged GETs, which
    is fastest against S3; a server that answers each ranged GET by reading the whole object (moto does)
    then does that work several times per chunk, and is fastest at 1."""
    import icechunk

    n = storage_options(protocol(uri)).get("requests_per_object") if is_remote(uri) else None
    if n is None:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise GradpipeError(f"storage option requests_per_object must be a whole number ≥ 1, not {n!r}.")
    return icechunk.RepositoryConfig(storage=icechunk.StorageSettings(
        concurrency=icechunk.StorageConcurrencySettings(max_concurrent_requests_for_object=n)))


def icechunk_storage(uri: str | Path):
    """The Icechunk ``Storage`` for a dataset at ``uri`` (a directory, or s3/gs/az)."""
    import icechunk

    _quiet_icechunk()
    if not is_remote(uri):
        return icechunk.local_filesystem_storage(absolute(uri))
    proto = protocol(uri)
    bucket, _, prefix = str(uri).split("://", 1)[1].partition("/")
    opts = storage_options(proto)
    if proto in ("s3", "s3a"):
        endpoint = opts.get("endpoint_url")
        creds = {"access_key_id": opts["key"], "secret_access_key": opts["secret"],
                 "session_token": opts.get("token")} if opts.get("key") else {"from_env": not opts.get("anon")}
        return icechunk.s3_storage(
            bucket=bucket, prefix=prefix.rstrip("/") or None,
            region=opts.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            endpoint_url=endpoint, allow_http=bool(endpoint and endpoint.startswith("http://")),
            force_path_style=bool(endpoint), anonymous=bool(opts.get("anon")) or None, **creds)
    if proto in ("gs", "gcs"):
        return icechunk.gcs_storage(bucket=bucket, prefix=prefix.rstrip("/") or None, from_env=True)
    if proto in ("az", "abfs"):
        account = opts.get("account_name") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME", "")
        return icechunk.azure_storage(account=account, container=bucket, prefix=prefix.rstrip("/"),
                                      from_env=True)
    raise GradpipeError(f"{uri}: datasets can live on a local disk, s3://, gs:// or az://, not {proto}://.")
