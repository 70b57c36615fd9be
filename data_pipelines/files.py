"""Small file-system primitives the data modules share: a waiting ``flock``, a non-waiting one, a
folder fsync, a file's sha256."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

# flock errors that mean "no locks on this filesystem" (Lustre without -o flock, some NFS mounts).
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@contextlib.contextmanager
def exclusive_lock(lock: Path, *, timeout: float, on_timeout: Callable[[], Exception], without: str,
                   stacklevel: int = 3) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created if needed), waiting up to ``timeout``
    seconds, then raising ``on_timeout()``. On a filesystem without locks, go on without one,
    warning ``no file locks on the filesystem of LOCK (why): <without>``."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline, delay = time.monotonic() + timeout, 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise on_timeout() from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except OSError as err:
                if err.errno not in NO_FLOCK:
                    raise
                warnings.warn(f"no file locks on the filesystem of {lock} ({err.strerror}): {without}",
                              stacklevel=stacklevel + 2)
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def try_exclusive_lock(fd: int) -> bool | None:
    """Take an exclusive ``flock`` on the open file ``fd`` without waiting: True if taken (held
    until every descriptor of that open file is closed, at the latest when its process dies),
    False if another open file holds it, None on a filesystem without locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in NO_FLOCK:
            raise
        return None
    return True


def fsync_dir(folder: Path) -> None:
    """Make renames and new names in ``folder`` durable (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_of(path: Path, chunk: int = 8 << 20) -> str:
    """The hex sha256 of the file ``path``, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
