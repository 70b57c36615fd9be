"""Node-local staging of a pack (``data.stage_to``): copy the shards from the shared filesystem to
a node's own disk once, at start-up, and read the local copies.

A pack (:mod:`data_pipelines.shards`) usually lives on a shared filesystem that every node reads
at once. With ``data.stage_to=/local/nvme/dir`` (``$TMPDIR`` on many clusters) each node copies it
to ``STAGE_TO/imagenet-trainer-<id>/`` and training reads from there. ``<id>`` is the first 16 hex
digits of the sha256 of the source ``manifest.json``: two packs never share a folder, and a
re-packed pack (new shards, new sha256s in its manifest) gets a new one.

**Who copies.** One process per node: the node's first process (its local rank 0, from the
launcher's environment: srun's ``SLURM_LOCALID``, torchrun's and Lightning's ``LOCAL_RANK``; see
:func:`data_pipelines.launch.launch_position`). The others on the node wait for it. The copier
holds ``fcntl.flock`` on ``STAGE_TO/imagenet-trainer-<id>.lock`` (node-local disk: flock is
reliable there), which also serialises two jobs staging the same pack on one node. Under it:

1. free space first: the bytes still to copy (shards with no local copy of the manifest's size,
   and the indices) against ``shutil.disk_usage(STAGE_TO).free``; too few: an error saying how
   much is needed and free, and nothing is written;
2. every shard, several at once (``threads``): a local copy is kept only if its size and sha256
   match the manifest (it is hashed again: a later job trusts nothing it did not check); otherwise
   the source is copied to a temporary name beside it, hashed while copied, checked against the
   manifest (a mismatch means the *shared* copy is damaged: the error names it), fsync'ed and
   renamed over the final name (atomic: a reader, maybe another job's, sees the old file or the
   whole new one). A kept copy keeps its inode;
3. the indices (small: compared byte for byte with the source, copied when they differ), then
   ``manifest.json``, last and atomically: a local folder with a manifest is complete.

**The ready marker.** Then the copier writes ``STAGE_TO/imagenet-trainer-<id>.ready-<token>``
(atomically), ``<token>`` naming this launch of the job, and the node's other processes, which poll
for exactly that file, go on. So a waiter never takes an earlier job's folder for its own copier's
work. The token (:func:`data_pipelines.launch.launch_token`), the same in every process of one launch:

* ``$IMAGENET_TRAINER_STAGE_TOKEN`` when set (see the last point);
* under SLURM: ``slurm-<SLURM_JOB_ID>-<SLURM_RESTART_COUNT or 0>`` (a requeued job is a new
  launch), with ``-<SLURM_STEP_ID>`` when set (each srun of a job is one);
* under torchrun (``TORCHELASTIC_RUN_ID``): ``te-<run id>-<TORCHELASTIC_RESTART_COUNT or 0>``
  (each elastic restart is a new launch), appended to the SLURM part when both apply;
* otherwise the copier makes one up and puts it into ``os.environ[IMAGENET_TRAINER_STAGE_TOKEN]``,
  so that the processes it starts later inherit it (Lightning's launcher starts local ranks > 0 as
  children of rank 0). A waiter that finds no token at all (started before its copier set one)
  waits until the local ``manifest.json`` exists and no process holds the lock, with a warning.

A copier that fails (no space, a damaged source shard, an unreadable pack) writes
``...failed-<token>`` with its error message, and its waiters raise the same error at once. A
waiter gives up after ``timeout`` (30 min, like the file-list cache's) with an error that names the
marker it waited for. The copier of a second call in the same launch finds its ready marker and
returns at once.

``STAGE_TO`` must be node-local: on a shared folder the nodes' copiers would all verify the same
files (still correct, since files are only ever replaced atomically by verified copies, but slow).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import files, pack_format, shards
from .filelist import LISTING_TIMEOUT
from .launch import TOKEN_VAR, LaunchPosition, launch_position, launch_token, make_launch_token  # noqa: F401

log = logging.getLogger(__name__)

STAGE_TIMEOUT = LISTING_TIMEOUT  # seconds a waiter waits for its copier (and a copier for the lock)
THREADS = 8  # shards copied or verified at once
PREFIX = "imagenet-trainer-"
_CHUNK = 8 << 20
_OLD_MARKERS = 2 * 86400.0  # seconds after which other launches' markers are cleaned up


class StagingError(shards.ShardError):
    """Staging failed (no space, a damaged source shard, an unusable ``stage_to``); the message
    says what to do. Waiters of a failed copier raise it with the copier's message."""


class StagingTimeout(TimeoutError):
    """A process waited too long for its node's copier; the message names the marker file."""


@dataclass(frozen=True)
class StageStats:
    """What a copier did: shards copied and reused (after verification), bytes, seconds."""

    copied: int
    reused: int
    bytes_copied: int
    seconds: float


# -- names ---------------------------------------------------------------------------------------
def pack_id(manifest_bytes: bytes) -> str:
    """The local folder's id: the first 16 hex digits of the manifest's sha256."""
    return hashlib.sha256(manifest_bytes).hexdigest()[:16]


@dataclass(frozen=True)
class _Places:
    stage_to: Path
    folder: Path
    lock: Path

    @classmethod
    def of(cls, stage_to: Path, ident: str) -> _Places:
        return cls(stage_to, stage_to / f"{PREFIX}{ident}", stage_to / f"{PREFIX}{ident}.lock")

    def ready(self, token: str) -> Path:
        return self.folder.with_name(f"{self.folder.name}.ready-{token}")

    def failed(self, token: str) -> Path:
        return self.folder.with_name(f"{self.folder.name}.failed-{token}")


# -- the entry point -----------------------------------------------------------------------------
def staged_root(
    root: str | os.PathLike,
    stage_to: str | os.PathLike,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = STAGE_TIMEOUT,
    threads: int = THREADS,
) -> Path:
    """The node-local copy of the pack under ``root``: ``stage_to/imagenet-trainer-<id>``, a pack
    folder (``shards.read_manifest`` reads it and points at the local tars). This node's first
    process (per ``env``, by default ``os.environ``) makes or verifies it; the others wait for
    that, up to ``timeout`` seconds (:class:`StagingTimeout`). Raises :class:`StagingError` (also
    in the waiters, at once) when it cannot be staged."""
    env = os.environ if env is None else env
    root, stage_to = Path(root), Path(stage_to)
    if threads < 1:
        raise ValueError(f"threads={threads}: must be at least 1")
    manifest_path = root / pack_format.MANIFEST
    try:
        manifest_bytes = manifest_path.read_bytes()
    except FileNotFoundError:
        raise shards.ShardError(f"{manifest_path} is missing: {root} is not a pack; make one with "
                                f"`imagenet-trainer pack IMAGENET_ROOT {root}`") from None
    except OSError as err:
        raise shards.ShardError(f"cannot read {manifest_path}: {err.strerror or err}") from err
    places = _Places.of(stage_to, pack_id(manifest_bytes))
    if _same_file(root, places.folder):  # data.root already is the staged copy
        return places.folder
    _check_stage_dir(stage_to, root)
    launch = launch_position(env)
    token = launch_token(env)
    if launch.first_on_node:
        if token is None:
            token = make_launch_token()  # in os.environ: for the local ranks this process starts later
        _copier(root, manifest_bytes, places, token, timeout=timeout, threads=threads)
    elif token is None:
        _await_without_token(root, places, launch, timeout=timeout)
    else:
        _await_ready(root, places, token, launch, timeout=timeout)
    return places.folder


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_stage_dir(stage_to: Path, root: Path) -> None:
    """``stage_to`` exists (made if needed) and is writable, else a :class:`StagingError` naming it
    (raised by every process: a copier that cannot write there cannot leave a failure note)."""
    try:
        stage_to.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StagingError(
            f"cannot create data.stage_to={stage_to} ({err.strerror or err}): point data.stage_to at a "
            f"writable node-local folder (such as $TMPDIR), or unset it to read the pack from {root}"
        ) from err
    if not stage_to.is_dir() or not os.access(stage_to, os.W_OK | os.X_OK):
        raise StagingError(
            f"data.stage_to={stage_to} is not a writable folder: point data.stage_to at a writable "
            f"node-local folder (such as $TMPDIR), or unset it to read the pack from {root}"
        )


# -- the copier ----------------------------------------------------------------------------------
def _copier(root: Path, manifest_bytes: bytes, places: _Places, token: str, *, timeout: float, threads: int) -> None:
    ready, failed = places.ready(token), places.failed(token)
    local_manifest = places.folder / pack_format.MANIFEST
    if ready.is_file() and _read_bytes(local_manifest) == manifest_bytes:
        log.debug("%s is already staged for this launch (%s)", root, ready)
        return
    with _locked(places.lock, timeout=timeout, root=root):
        failed.unlink(missing_ok=True)
        try:
            stats = _stage(root, manifest_bytes, places, threads=threads)
        except Exception as err:
            message = str(err) if isinstance(err, shards.ShardError) else f"{type(err).__name__}: {err}"
            ready.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                _write_marker(failed, {"state": "failed", "message": message, "error": type(err).__name__})
            raise
        record = {"state": "ready", "copied": stats.copied, "reused": stats.reused,
                  "bytes_copied": stats.bytes_copied, "seconds": stats.seconds}
        _write_marker(ready, record)
    _remove_old_markers(places)


def _stage(root: Path, manifest_bytes: bytes, places: _Places, *, threads: int) -> StageStats:
    """Make ``places.folder`` a verified copy of the pack (the lock is held)."""
    started = time.monotonic()
    manifest = shards.read_manifest(root)
    if manifest.data != _loads(manifest_bytes):
        raise StagingError(f"{root / pack_format.MANIFEST} changed while it was read (a pack being rewritten?); "
                           f"start again once `imagenet-trainer pack` has finished")
    folder = places.folder
    jobs = [(shard, _local_name(manifest.root, shard.tar, root)) for shard in manifest.shards()]
    indices = [(shard.index, _local_name(manifest.root, shard.index, root)) for shard in manifest.shards()]

    (folder / pack_format.MANIFEST).unlink(missing_ok=True)  # from here on the folder is incomplete
    _remove_temporaries(folder)
    needed = sum(s.bytes for s, rel in jobs if _size(folder / rel) != s.bytes)
    needed += sum(_size(src) or 0 for src, rel in indices if _size(folder / rel) != _size(src))
    free = shutil.disk_usage(places.stage_to).free
    if needed > free:
        raise _no_space(places.stage_to, root, needed, free)

    stop = threading.Event()
    results: list[tuple[str, int]] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stage") as pool:
        futures = [pool.submit(_stage_shard, shard, folder / rel, root, places, stop) for shard, rel in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise
    for src, rel in indices:
        data = src.read_bytes()
        dst = folder / rel
        if _read_bytes(dst) != data:
            _write_atomically(dst, data)
    files.fsync_dir(folder)
    _write_atomically(folder / pack_format.MANIFEST, manifest_bytes)
    copied = [n for what, n in results if what == "copied"]
    stats = StageStats(len(copied), len(results) - len(copied), sum(copied), time.monotonic() - started)
    log.info(
        "staged %s into %s: %d shards copied (%.2f GB), %d local copies reused after checking their sha256, "
        "in %.1f s (%.0f MB/s)", root, folder, stats.copied, stats.bytes_copied / 1e9, stats.reused, stats.seconds,
        stats.bytes_copied / 1e6 / max(stats.seconds, 1e-9),
    )
    return stats


def _stage_shard(shard: shards.Shard, dst: Path, root: Path, places: _Places, stop: threading.Event) -> tuple[str, int]:
    """Keep ``dst`` if it is a good copy of ``shard``, else copy it: ("reused" | "copied", bytes)."""
    if stop.is_set():
        return "cancelled", 0
    if _size(dst) == shard.bytes:
        if _sha256_of(dst, stop) == shard.sha256:
            log.debug("reused %s", dst)
            return "reused", 0
        log.info("the local copy %s does not match its sha256 in the manifest: copying it again", dst)
    elif dst.exists():
        log.info("the local copy %s has %s bytes, the manifest says %d: copying it again", dst, _size(dst), shard.bytes)
    _copy_verified(shard, dst, root, places, stop)
    log.debug("copied %s", dst)
    return "copied", shard.bytes


def _copy_verified(shard: shards.Shard, dst: Path, root: Path, places: _Places, stop: threading.Event) -> None:
    digest, size, buf = hashlib.sha256(), 0, bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        # Host, pid and a random part in the temporary name: two copiers never write the same file.
        with files.atomic_path(dst, unique=True) as tmp:  # fsync'ed, renamed over dst; removed on failure
            try:
                src = open(shard.tar, "rb")
            except OSError as err:
                raise StagingError(f"cannot read the shard {shard.tar}: {err.strerror or err}; check the pack "
                                   f"under {root}, or re-run `imagenet-trainer pack`") from err
            with src, open(tmp, "wb") as out:
                while True:
                    if stop.is_set():
                        raise StagingError("cancelled: another shard failed")
                    try:
                        n = src.readinto(buf)
                    except OSError as err:
                        raise StagingError(f"cannot read the shard {shard.tar}: {err.strerror or err}") from err
                    if not n:
                        break
                    digest.update(view[:n])
                    out.write(view[:n])
                    size += n
            if size != shard.bytes or digest.hexdigest() != shard.sha256:
                raise StagingError(
                    f"the shard {shard.tar} on the shared copy is damaged: it has {size} bytes and sha256 "
                    f"{digest.hexdigest()}, the manifest {root / pack_format.MANIFEST} says {shard.bytes} bytes and "
                    f"sha256 {shard.sha256}. Re-run `imagenet-trainer pack` (or copy the pack again from a good "
                    f"copy), or unset data.stage_to to train without checking it"
                )
    except OSError as err:
        if err.errno == errno.ENOSPC:
            free = shutil.disk_usage(places.stage_to).free
            raise _no_space(places.stage_to, root, shard.bytes, free, during=True) from err
        raise


def _no_space(stage_to: Path, root: Path, needed: int, free: int, *, during: bool = False) -> StagingError:
    if during:
        what = f"the disk filled up while copying (a shard of {_gb(needed)} did not fit, {_gb(free)} free now)"
    else:
        what = f"{_gb(needed)} still to copy, {_gb(free)} free"
    return StagingError(
        f"not enough space in data.stage_to={stage_to} to stage {root}: {what}. Free space there, point "
        f"data.stage_to at a bigger node-local disk, or unset data.stage_to to read the pack from {root}"
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB ({n} bytes)"


def _local_name(pack_root: Path, path: Path, root: Path) -> Path:
    """``path``'s name inside the pack, refused if the manifest points outside it."""
    try:
        rel = path.relative_to(pack_root)
    except ValueError:
        rel = None
    if rel is None or rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise StagingError(f"{root / pack_format.MANIFEST} names the file {path}, which is not inside the pack: "
                           f"re-run `imagenet-trainer pack`")
    return rel


# -- waiting -------------------------------------------------------------------------------------
def _await_ready(root: Path, places: _Places, token: str, launch: LaunchPosition, *, timeout: float) -> None:
    ready, failed = places.ready(token), places.failed(token)

    def check(waited: float):
        if ready.is_file():
            return None
        note = files.read_marker(failed)
        if note is not None:
            raise StagingError(str(note.get("message") or f"staging {root} into {places.folder} failed ({failed})"))
        return files.WAIT

    files.wait_for(check, timeout=timeout, clock=time, log=log, waiting=f"{launch.described} waits for this node's copy of {root} ({ready})",
                   on_timeout=lambda: StagingTimeout(
        f"{launch.described} waited {timeout:.0f} s for {ready}, the marker this node's first "
        f"process (local rank 0: SLURM_LOCALID=0 or LOCAL_RANK=0) of the same launch (token "
        f"{token}) writes once it has staged {root} into {places.folder}; {_lock_state(places.lock)}. "
        f"Check that that process runs and has the same data.stage_to, or unset data.stage_to to "
        f"read the pack from {root}"))


def _await_without_token(root: Path, places: _Places, launch: LaunchPosition, *, timeout: float) -> None:
    warnings.warn(
        f"{launch.described} has no launch token (none of SLURM_JOB_ID, TORCHELASTIC_RUN_ID, {TOKEN_VAR}): "
        f"it takes {places.folder} once it has a manifest and nobody holds {places.lock}", stacklevel=3,
    )
    manifest = places.folder / pack_format.MANIFEST

    def check(waited: float):
        return None if manifest.is_file() and not _lock_held(places.lock) else files.WAIT

    files.wait_for(check, timeout=timeout, clock=time, on_timeout=lambda: StagingTimeout(
        f"{launch.described} waited {timeout:.0f} s for {manifest}, which this node's first process "
        f"(local rank 0) writes once it has staged {root}; {_lock_state(places.lock)}. Set "
        f"{TOKEN_VAR} to the same value in every process of the launch, or unset data.stage_to"))


def _lock_held(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _lock_state(lock: Path) -> str:
    if _lock_held(lock):
        return f"a process on this node holds the staging lock {lock}: a copy is under way (maybe another job's)"
    return f"nobody holds the staging lock {lock}: no copy is under way on this node"


# -- files ---------------------------------------------------------------------------------------
def _locked(lock: Path, *, timeout: float, root: Path):
    return files.exclusive_lock(
        lock, timeout=timeout, without="staging without one; data.stage_to should be a node-local disk",
        on_timeout=lambda: StagingTimeout(
            f"waited {timeout:.0f} s for the lock {lock}, held by another process staging {root} "
            f"on this node; if that process is stuck, stop it (its lock goes with it)"),
    )


def _sha256_of(path: Path, stop: threading.Event) -> str | None:
    digest, buf = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        with open(path, "rb") as f:
            while n := f.readinto(buf):
                if stop.is_set():
                    return None
                digest.update(view[:n])
    except OSError:
        return None
    return digest.hexdigest()


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _loads(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    """fsync'ed; the temporary name has host, pid and a random part (see _remove_temporaries)."""
    files.write_atomic(path, data, fsync=True, unique=True)


def _remove_temporaries(folder: Path) -> None:
    """Temporary files a killed copier left: this host's (no copier of it runs: the lock is held),
    and other hosts' (a stage_to shared by mistake) once they are a day old."""
    if not folder.is_dir():
        return
    host = f".{socket.gethostname()}."
    for tmp in folder.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            if host in tmp.name or time.time() - tmp.stat().st_mtime > 86400:
                tmp.unlink()


def _write_marker(path: Path, record: dict) -> None:
    files.write_marker(path, record, fsync=True)


def _remove_old_markers(places: _Places) -> None:
    """Other launches' markers, once old (no waiter waits that long)."""
    now = time.time()
    for marker in places.stage_to.glob(f"{places.folder.name}.*-*"):
        if marker.name.split(".", 1)[1].startswith(("ready-", "failed-")):
            with contextlib.suppress(OSError):
                if now - marker.stat().st_mtime > _OLD_MARKERS:
                    marker.unlink()
