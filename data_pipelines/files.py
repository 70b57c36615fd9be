"""Small file-system primitives the data modules and the trainer share: a waiting ``flock``, a
non-waiting one, a folder fsync, a file's sha256, atomic writes (:func:`write_atomic`,
:func:`atomic_path`), and one process doing a piece of work while the others wait for its marker
(:func:`write_marker`, :func:`read_marker`, :func:`wait_for`)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

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


# -- atomic writes ---------------------------------------------------------------------------------
def temp_path(path: Path, *, unique: bool = False) -> Path:
    """The temporary name a new version of ``path`` is written to, beside it (the same filesystem:
    the rename is atomic): ``.NAME.tmp``, overwritten by the next try after a crash; or, with
    ``unique``, ``.NAME.HOST.PID.RANDOM.tmp``, for a name that several processes or nodes may
    write at once (a shared folder)."""
    path = Path(path)
    if unique:
        return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    return path.with_name(f".{path.name}.tmp")


def replace_atomic(tmp: Path, path: Path, *, fsync: bool = True) -> None:
    """Rename the written ``tmp`` over ``path``: a reader sees the old file or the whole new one.
    With ``fsync``, ``tmp``'s data reaches the disk before the rename (else the rename may reach it
    first: ext4, XFS) and the folder (the rename is an entry of it) after, so that after a crash of
    the node too ``path`` holds the old file or the whole new one, never an empty file."""
    if fsync:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True, unique: bool = False) -> Iterator[Path]:
    """A temporary path (:func:`temp_path`) for a writer that writes files itself (``torch.save``,
    a csv writer) to make the new version of ``path`` in; renamed over ``path``
    (:func:`replace_atomic`) when the block ends, removed when it raises. ``path``'s folder is made
    if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, unique=unique)
    try:
        yield tmp
        replace_atomic(tmp, path, fsync=fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str, *, fsync: bool = True, unique: bool = False) -> None:
    """``path`` holds ``data`` (``str``: as UTF-8) or what it held before, never a part: a
    temporary file beside it, renamed over it (see :func:`atomic_path`)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path, fsync=fsync, unique=unique) as tmp, open(tmp, "wb") as out:
        out.write(data)


# -- one process works, the others wait for its marker ----------------------------------------------
def write_marker(path: Path, record: dict, *, fsync: bool = False) -> None:
    """Atomically write the marker ``path``: the JSON ``record`` with this process's host, pid and
    the time, what a worker tells the processes waiting for it (its state: done, failed and why).
    The temporary name is unique: the workers of several nodes may share the folder."""
    record = {**record, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    write_atomic(path, json.dumps(record), fsync=fsync, unique=True)


def read_marker(path: Path) -> dict | None:
    """The record of the marker ``path``, or None when there is none (or it is not a record)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent (the usual case), or not ours
        return None
    return record if isinstance(record, dict) else None


WAIT = object()  # what a check of wait_for returns to go on waiting


def wait_for(check: Callable[[float], T], *, timeout: float, on_timeout: Callable[[], Exception],
             log: logging.Logger | None = None, waiting: str = "", clock=time) -> T:
    """Poll ``check(seconds waited)`` until it returns anything but :data:`WAIT`, and return that;
    what it raises (a worker's failure) goes through at once. Raises ``on_timeout()`` once
    ``timeout`` seconds have passed; logs ``waiting`` on ``log`` once after 5 s. Polls quickly
    at first (the marker may be about to appear), then every second (cheap when it is not).
    ``clock``: what has ``monotonic`` and ``sleep`` (the caller's ``time``, which a test may fake)."""
    start, delay, logged = clock.monotonic(), 0.02, False
    while True:
        waited = clock.monotonic() - start
        result = check(waited)
        if result is not WAIT:
            return result
        if waited >= timeout:
            raise on_timeout()
        if log is not None and waiting and not logged and waited > 5:
            log.info("%s", waiting)
            logged = True
        clock.sleep(min(delay, max(timeout - waited, 0.001)))
        delay = min(delay * 1.5, 1.0)
