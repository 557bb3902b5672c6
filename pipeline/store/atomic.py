"""Local-disk atomicity: swapping in a directory with one syscall (``make-data`` output) and writer locks.

Datasets no longer use these swaps: they are Icechunk repositories, whose commits are atomic on local disk
and object stores alike (``pipeline.store.dataset.Transaction``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def commit(staged: Path, live: Path) -> None:
    """Make ``staged`` the content of ``live`` atomically and delete the old content."""
    if not live.exists():
        os.rename(staged, live)
        return
    if _exchange(staged, live):
        # The new content is live: failing to delete the old (a read-only directory in it) must not fail
        # the ingest; the left-over staging directory goes with the next one (remove_stale_staging).
        shutil.rmtree(staged, ignore_errors=True)
        return
    # No renameat2 (non-Linux): two renames; the window between them is tiny and the old copy is kept
    # under a recognisable name until the new one is in place.
    old = live.with_name(f".{live.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(live, old)
    os.rename(staged, live)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def locked(path: Path, wait: bool = False) -> Iterator[None]:
    """Exclusive advisory lock for writers of ``path`` (a sibling ``.lock`` file).

    ``wait=False`` refuses at once when another process holds it; ``wait=True`` blocks until it is free.
    """
    lock = path.with_name(f".{path.name}.lock")
    with _open_lock(path, lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from pipeline.errors import GradpipeError

            raise GradpipeError(f"{path} is being written by another gradpipe process ({lock}).") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_lock(path: Path, lock: Path) -> IO[str]:
    """Open (creating) the lock file; a directory that cannot hold it is the user's to fix, so say which.

    Every writer takes this lock before it writes anything, so this is where a read-only or misplaced store
    fails, with the store still as it was (an ingest fails even before its cluster starts).
    """
    from pipeline.errors import GradpipeError

    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return open(lock, "a")
    except OSError as exc:
        blocker = next((p for p in [lock.parent, *lock.parent.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a directory" if blocker else (exc.strerror or str(exc))
        raise GradpipeError(f"cannot create the lock file {lock} ({why}): {lock.parent} must be a writable "
                            f"directory — make it one, or write {path.name} somewhere else.") from None
