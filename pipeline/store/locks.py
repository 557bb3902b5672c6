"""Writer locks: one writer per run store (and per published model), on a local disk or an object store.

A lock is a sibling of what it guards, ``<parent>/.<name>.lock``:

- local paths: an ``flock`` on that file. The OS drops it when its process dies, so a killed writer never
  blocks the next one.
- object stores (``s3://``): a *lease*, an object created only if absent (a conditional PUT,
  ``If-None-Match: *``) holding its owner (host, pid, a random token) and a heartbeat timestamp that a daemon
  thread rewrites every :data:`HEARTBEAT_S` seconds (``If-Match`` its own ETag, so it never overwrites a
  lease someone else took). Nothing drops a lease when its holder is SIGKILLed, so a lease whose heartbeat
  is older than :data:`STALE_S` is stale and may be taken over: a conditional delete of exactly that version
  (``If-Match`` its ETag), then a conditional create, so two takers cannot both win. Release deletes it.
  Staleness compares the taker's clock with the holder's: hosts whose clocks differ by a minute misjudge it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipeline.errors import GradpipeError
from pipeline.store import location

log = logging.getLogger("gradpipe.locks")

HEARTBEAT_S = 10.0  # how often a holder refreshes its lease
STALE_S = 60.0  # a lease not refreshed for this long belongs to a dead process
WAIT_POLL_S = 0.5  # how often a waiting writer looks again


def lock_path(path: str | Path) -> str:
    """Where the lock of ``path`` lives: ``<parent>/.<name>.lock``."""
    return location.join(location.parent(path), f".{location.name(path)}.lock")


def busy(path: str | Path) -> GradpipeError:
    """The error of a writer refused because another holds the lock (callers match "another gradpipe process")."""
    return GradpipeError(f"{path} is being written by another gradpipe process ({lock_path(path)}).")


@contextmanager
def locked(path: str | Path, wait: bool = False) -> Iterator[None]:
    """Exclusive lock for writers of ``path``: ``wait=False`` refuses at once when another process holds it,
    ``wait=True`` blocks until it is free."""
    if location.is_remote(path):
        with _leased(str(path), wait):
            yield
        return
    with _flocked(Path(path), wait):
        yield


def remove_lock(path: str | Path) -> None:
    """Delete the lock file of ``path`` (a local one; a lease is deleted by its release)."""
    if not location.is_remote(path):
        Path(lock_path(path)).unlink(missing_ok=True)


# ---- local: flock ----------------------------------------------------------------------------------
@contextmanager
def _flocked(path: Path, wait: bool) -> Iterator[None]:
    lock = Path(lock_path(path))
    with _open_lock(path, lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy(path) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_lock(path: Path, lock: Path) -> IO[str]:
    """Open (creating) the lock file; a directory that cannot hold it is the user's to fix, so say which.

    Every writer takes this lock before it writes anything, so this is where a read-only or misplaced store
    fails, with the store still as it was.
    """
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return open(lock, "a")
    except OSError as exc:
        blocker = next((p for p in [lock.parent, *lock.parent.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a directory" if blocker else (exc.strerror or str(exc))
        raise GradpipeError(f"cannot create the lock file {lock} ({why}): {lock.parent} must be a writable "
                            f"directory — make it one, or write {path.name} somewhere else.") from None


# ---- object stores: a lease ------------------------------------------------------------------------
class Lease:
    """A lease object on S3, through s3fs's client (the endpoint and credentials of every other access)."""

    def __init__(self, path: str):
        if location.protocol(path) not in ("s3", "s3a"):
            raise GradpipeError(f"{path}: writer locks on {location.protocol(path)}:// are not supported (they "
                                f"need conditional writes); keep run stores and models on s3:// or a local disk.")
        self.path, self.uri = path, lock_path(path)
        self.fs, key = location.filesystem(self.uri)
        self.bucket, _, self.key = key.partition("/")
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.etag: str | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def _s3(self, method: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except (FileExistsError, FileNotFoundError):
            raise
        except OSError as exc:
            if _precondition_failed(exc):
                raise _Conflict from None
            raise GradpipeError(f"cannot write the lock {self.uri} ({exc}).") from None

    def create(self) -> bool:
        """Create the lease if no one holds it; False if someone does."""
        try:
            self.etag = self._s3("put_object", Body=self._body(), IfNoneMatch="*")["ETag"]
            return True
        except (FileExistsError, _Conflict):
            return False

    def current(self) -> tuple[str, dict[str, Any]] | None:
        """The lease's ETag and content (None: no lease). The ETag is read first: the content is then at least
        as new as that version, so a stale content proves that version stale."""
        try:
            etag = self.fs.info(f"{self.bucket}/{self.key}", refresh=True)["ETag"]
            body = self.fs.cat_file(f"{self.bucket}/{self.key}")
        except FileNotFoundError:
            return None
        try:
            return etag, json.loads(body)
        except ValueError:
            return etag, {}  # a torn or foreign object: no heartbeat, so stale

    def take_over(self, etag: str) -> bool:
        """Delete exactly the stale version ``etag``, then create ours; False if another taker won."""
        with contextlib.suppress(FileNotFoundError, _Conflict):
            self._s3("delete_object", IfMatch=etag)
        return self.create()

    def refresh(self) -> bool:
        """Rewrite the heartbeat, only over our own version; False if the lease was lost (taken over)."""
        if self.etag is None:
            return False
        try:
            self.etag = self._s3("put_object", Body=self._body(), IfMatch=self.etag)["ETag"]
            return True
        except (FileNotFoundError, _Conflict):
            return False

    def release(self) -> None:
        if self.etag is None:
            return
        with contextlib.suppress(FileNotFoundError, _Conflict, GradpipeError):
            self._s3("delete_object", IfMatch=self.etag)


class _Conflict(Exception):
    """A conditional write or delete whose condition did not hold."""


def _precondition_failed(exc: OSError) -> bool:
    """Whether s3fs's error is a failed condition (412), or S3's 409 for two conditional writes racing."""
    cause = exc.__cause__ or exc.__context__
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or "pre-condition" in str(exc).lower()


def stale(content: dict[str, Any], now: float | None = None) -> bool:
    """Whether a lease's holder stopped refreshing it (a SIGKILLed or frozen process)."""
    beat = content.get("heartbeat")
    return not isinstance(beat, int | float) or (now or time.time()) - beat > STALE_S


def _acquire(lease: Lease, wait: bool) -> None:
    while True:
        if lease.create():
            return
        held = lease.current()
        if held is None:
            continue  # released between the two calls: try again
        etag, content = held
        if stale(content):
            log.warning("taking over the stale lock %s of %s pid %s (no heartbeat for %.0f s)", lease.uri,
                        content.get("host"), content.get("pid"), time.time() - float(content.get("heartbeat", 0)))
            if lease.take_over(etag):
                return
            continue
        if not wait:
            raise busy(lease.path)
        time.sleep(WAIT_POLL_S)


@contextmanager
def _leased(path: str, wait: bool) -> Iterator[None]:
    lease = Lease(path)
    _acquire(lease, wait)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                if not lease.refresh():
                    log.error("lost the lock %s: another process took it over; stop this writer", lease.uri)
                    return
            except Exception as exc:  # noqa: BLE001 - a transient error: the next beat tries again
                log.warning("could not refresh the lock %s (%s)", lease.uri, exc)

    thread = threading.Thread(target=beat, name="gradpipe-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        lease.release()
