"""Atomic replacement of a directory store: build a staged copy, then swap it in with one syscall.

A dataset is never edited in place. An append hard-links the existing chunk files into a staging
directory (free), gives every file it will rewrite a private copy first (``unshare``: a write through a
link would change the live store too), writes new chunks and metadata there, and finally exchanges the two
directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``). A crash or SIGKILL at any moment leaves
the live store byte-for-byte as it was; a left-over staging directory is removed by the next ingest.
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
_STAGING_MARK = ".staging-"


def staging_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_STAGING_MARK}{uuid.uuid4().hex[:12]}")


def remove_stale_staging(path: Path) -> None:
    """Delete staging directories that a killed ingest left beside ``path`` (caller holds the lock)."""
    for stale in path.parent.glob(f".{path.name}{_STAGING_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)


def link_copy(src: Path, dst: Path) -> None:
    """Copy a directory tree, hard-linking chunk files and copying the small JSON metadata."""

    def copy(s: str, d: str) -> None:
        if s.endswith(".json"):
            shutil.copy2(s, d)
        else:
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)


def unshare(path: Path) -> None:
    """Replace a hard-linked file with a private copy, so writing it cannot touch the other links."""
    if path.exists() and path.stat().st_nlink > 1:
        tmp = path.with_name(f".{path.name}.unshare-{uuid.uuid4().hex[:8]}")
        shutil.copy2(path, tmp)
        os.replace(tmp, path)


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
