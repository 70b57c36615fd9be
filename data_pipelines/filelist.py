"""A cache of the file list of a split, so that start-up does not list 1.28M files every time.

Listing ImageNet's train split on a shared filesystem takes minutes; reading the list back from
one text file takes about a second. The cache file is in DALI's ``file_list`` format, one
``wnid/name.JPEG label`` per line, relative to ``ROOT/split`` (usable as
``fn.readers.file(file_root=ROOT/split, file_list=...)``).

The cache key is the real path of the root, the split, the class order asked for, and the
modification time (ns) of ``ROOT/split`` and of every class folder in it: adding, removing or
renaming a file changes its folder's mtime, adding or removing a class changes the split's. That
costs one listing of the split folder and one ``stat`` per class (about 1,000), not one per image.
A file replaced in place under the same name does not change the list, so it needs no new key.

Timestamps are only as fine as the filesystem's (1 s or 2 s on some): a listing taken in the
same tick as a change could miss it while the mtimes still match. As git does for its index, a
listing is not cached while any of these folders changed in the last few seconds.
Delete the cache folder to force a new listing.

**One listing per job.** Without coordination every process of a job lists the tree at start-up:
on 8 nodes x 8 GPUs, 64 walks of 1.28M files on one shared filesystem. So one process lists and
writes the cache, and the others wait for the cache file and read it. The cache file is the
channel because a later run reads it anyway, it is written atomically (a temporary file renamed
over the name: a reader sees all of it or nothing), and it needs no process group: the listing
happens before DDP starts. Who lists comes from the launcher's environment
(:func:`data_pipelines.launch.launch_position`): the job's first process (global rank 0: every rank variable that
torchrun, srun or Lightning's launcher set is 0, or none is set) lists; the others poll for the
file.

A lister holds ``fcntl.flock`` on ``<split>-<id>.lock`` beside the cache, and looks for the cache
again once it has the lock. That serialises listers on one node (two jobs on the same tree, or an
environment that makes several processes rank 0): the second reads the first's list. It is not
relied on across nodes, where flock is unreliable (emulated with byte-range locks over NFS,
node-local or unsupported on Lustre), so the rank rule does that work.

The cache folder (``$XDG_CACHE_HOME/imagenet-trainer``) may be shared by every node (a shared
home) or be per node (a node-local home), and a process cannot tell which. Rank 0's file reaches
the other nodes only in the first case. So the first process of each other node (local rank 0)
waits up to ``grace`` (60 s) for the cache or for a lister's *note* (``<cache>.note``: host, pid,
state) to appear in its folder. A note from a live lister means the folder is shared: it waits
for the cache like the others. Neither within the grace period: the folder is its node's own, and
it lists for its node (under the lock). Shared folder: one listing per job; per-node folders: one
per node, those after rank 0's starting after the grace period, and later runs read their cache.
A rank 0 that starts later than that costs at worst one more listing of the same tree per node,
never a different list.

The note also tells waiters when there is nothing to wait for: the lister failed on the tree
(every waiter raises the same :class:`layout.DataLayoutError`: the error is a function of the
cache key, so an old note stays true), or the tree changed too recently to be cached (waiters then
list it themselves, under the lock; an old such note costs a listing, never a wrong list). A waiter gives up after ``timeout`` (30 min, as
torch.distributed's default) with an error that names the file it waited for. On NFS a file
written on another node can take up to the attribute-cache time (up to a minute) to be seen.

``data.filelist_cache=false`` bypasses all of this: every process scans the tree itself.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import warnings
from pathlib import Path

from . import files, layout
from .launch import LaunchPosition, launch_position  # noqa: F401  (re-exported: who lists)

log = logging.getLogger(__name__)

_FORMAT = "imagenet-trainer file list v1"
_RACY_SECONDS = 3.0
LISTING_TIMEOUT = 1800.0  # seconds a waiter waits for the list (torch.distributed's default timeout)
NODE_GRACE = 60.0  # seconds a node's first process looks for a lister sharing its cache folder


class ListingTimeout(TimeoutError):
    """A process waited too long for another one's file list; the message says which file."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/imagenet-trainer``, by default ``~/.cache/imagenet-trainer``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imagenet-trainer"


# -- who lists: the launch layer's LaunchPosition (first_in_job lists) ---------------------------
# -- the cache key ---------------------------------------------------------------------------
def _tree_state(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class folder names (sorted, as layout lists them) and the mtimes the key is made of."""
    classes = layout.list_classes(split_dir)
    stamps = [(".", split_dir.stat().st_mtime_ns)]
    stamps += [(c, (split_dir / c).stat().st_mtime_ns) for c in classes]
    return classes, stamps


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_path(
    root: str | os.PathLike,
    split: str,
    classes: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where the list of ``root/split`` as it is now would be cached (it may not exist yet)."""
    split_dir = Path(os.path.realpath(Path(root) / split))
    _, stamps = _tree_state(split_dir)
    return _cache_file(split_dir, classes, stamps, cache_dir)


def _cache_file(split_dir: Path, classes, stamps, cache_dir) -> Path:
    identity = _digest(_FORMAT, str(split_dir), classes)[:16]
    version = _digest(identity, stamps)[:16]
    return Path(cache_dir or default_cache_dir()) / f"{split_dir.name}-{identity}-{version}.txt"


def _lock_file(path: Path) -> Path:
    """One lock per tree (``<split>-<identity>.lock``), kept: removing a flock'ed file is racy."""
    return path.with_name(path.name.rsplit("-", 1)[0] + ".lock")


def _note_file(path: Path) -> Path:
    return path.with_suffix(".note")


# -- the list --------------------------------------------------------------------------------
def cached_split(
    root: str | os.PathLike,
    split: str,
    classes: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    launch: LaunchPosition = LaunchPosition(),
    timeout: float = LISTING_TIMEOUT,
    grace: float = NODE_GRACE,
) -> layout.Split:
    """The same :class:`layout.Split` as ``layout.scan_split(root, split, classes)``, read from
    the cache when the tree has not changed since it was written, else listed once per job and
    cached: by this process if ``launch`` makes it the lister, else by the lister it waits for
    (see the module's docstring). Raises :class:`ListingTimeout` after ``timeout`` seconds of
    waiting for a list or a lock."""
    split_dir = Path(root) / split
    found, stamps = _tree_state(split_dir)
    path = _cache_file(Path(os.path.realpath(split_dir)), classes, stamps, cache_dir)
    class_list = list(classes) if classes is not None else found
    listed = _read_cache(path, split_dir, class_list)
    if listed is not None:
        return listed
    if not _writable(path.parent):
        return layout.scan_split(root, split, classes)
    if not launch.first_in_job:
        listed = _await_list(
            path, split_dir, class_list, launch=launch, timeout=timeout,
            grace=grace if launch.first_on_node else None,
        )
        if listed is not None:
            return listed
    return _list_once(root, split, classes, path, stamps, class_list, timeout=timeout)


def _read_cache(path: Path, split_dir: Path, classes: list[str]) -> layout.Split | None:
    """The cached list at ``path``, or None when there is none or it is damaged (with a warning)."""
    if not path.is_file():
        return None
    try:
        return read_file_list(path, split_dir, classes)
    except FileNotFoundError:  # replaced or removed between the check and the read
        return None
    except (OSError, ValueError) as err:  # unreadable or damaged: list the tree again
        warnings.warn(f"ignoring the damaged file-list cache {path}: {err}", stacklevel=3)
        return None


def _writable(folder: Path) -> bool:
    """Whether the cache folder can be made and written; if not, warn: every process lists."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return True
    except OSError:
        pass
    # A read-only home directory must not stop training; it costs a listing per process.
    warnings.warn(
        f"cannot write the file-list cache folder {folder}: every process lists the tree itself; "
        f"set XDG_CACHE_HOME to a writable folder to list it once", stacklevel=3,
    )
    return False


def _list_once(root, split: str, classes, path: Path, stamps, class_list: list[str], *, timeout: float) -> layout.Split:
    """List the tree under the lock, unless the cache appeared while this process waited for it,
    and tell waiters the outcome through the note."""
    split_dir = Path(root) / split
    note = _note_file(path)
    with _locked(_lock_file(path), timeout=timeout, listing=split_dir):
        listed = _read_cache(path, split_dir, class_list)
        if listed is not None:
            return listed
        _write_note(note, "listing")
        try:
            result, cached = _scan_and_cache(root, split, classes, path, stamps)
        except layout.DataLayoutError as err:  # the same error for every waiter, now
            _write_note(note, "failed", str(err))
            raise
        except BaseException:
            note.unlink(missing_ok=True)  # a stale "listing" note would keep a node's lister waiting
            raise
        if cached:
            _remove_notes_of(path)
        else:  # waiters must not wait for a file that will not come
            _write_note(note, "uncached")
        return result


def _scan_and_cache(root, split: str, classes, path: Path, stamps) -> tuple[layout.Split, bool]:
    """Scan the tree; cache the list unless a folder changed within the timestamp tick (and
    return whether it was cached)."""
    scan_started = time.time()
    result = layout.scan_split(root, split, classes)
    newest = max(ns for _, ns in stamps) / 1e9
    if newest >= scan_started - _RACY_SECONDS:
        return result, False
    try:
        write_file_list(result, path)
    except OSError as err:  # a full disk must not stop training
        warnings.warn(f"cannot write the file-list cache {path}: {err}", stacklevel=4)
        return result, False
    return result, True


# -- waiting for another process's list --------------------------------------------------------
def _await_list(
    path: Path, split_dir: Path, classes: list[str], *, launch: LaunchPosition, timeout: float,
    grace: float | None,
) -> layout.Split | None:
    """Poll for the list another process writes to ``path``. Returns it, or None when this
    process should list the tree itself: the lister's note says it did not cache it, or (with a
    ``grace`` period: a node's first process) no lister showed up in this cache folder in time.
    Raises the lister's :class:`layout.DataLayoutError`, or :class:`ListingTimeout`."""
    lister_seen = grace is None  # a plain waiter relies on its node's or its job's lister
    damaged, note = None, None

    def check(waited: float):
        nonlocal lister_seen, damaged, note
        listed, damaged = _read_if_new(path, split_dir, classes, damaged)
        if listed is not None:
            return listed
        note = _read_note(_note_file(path))
        if note is not None:
            if note["state"] == "failed":
                raise layout.DataLayoutError(note.get("message", f"listing {split_dir} failed"))
            if note["state"] == "uncached":
                return None
            lister_seen = lister_seen or _is_live(note, timeout)
        if not lister_seen and waited >= grace:
            log.info("no process lists %s into %s: this node's first process lists it", split_dir, path.parent)
            return None
        return files.WAIT

    return files.wait_for(
        check, timeout=timeout, clock=time, on_timeout=lambda: ListingTimeout(_timeout_message(path, split_dir, launch, timeout, note)),
        log=log, waiting=f"{launch.described} waits for the file list of {split_dir} ({path})",
    )


def _read_if_new(path: Path, split_dir: Path, classes: list[str], damaged) -> tuple[layout.Split | None, object]:
    """The list at ``path`` if it is complete; a damaged file is read again only once it has
    been replaced (the lister rewrites it), so it is warned about once."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, damaged
    signature = (st.st_ino, st.st_mtime_ns, st.st_size)
    if signature == damaged:
        return None, damaged
    listed = _read_cache(path, split_dir, classes)
    return listed, (None if listed is not None else signature)


def _timeout_message(path: Path, split_dir: Path, launch: LaunchPosition, timeout: float, note: dict | None) -> str:
    lister = "the job's rank 0, or the first process of this node when the cache folder is per node"
    if note is not None:
        lister += f"; its note {_note_file(path)} says {note.get('state')} by pid {note.get('pid')} on {note.get('host')}"
    return (
        f"{launch.described} waited {timeout:.0f} s for the file list of {split_dir} at {path}, "
        f"which the process that lists it ({lister}) never wrote. Check that rank 0 is running and "
        f"sees the same cache folder {path.parent} as this process (XDG_CACHE_HOME: one folder that "
        f"every node shares, or one per node), or set data.filelist_cache=false to let every "
        f"process list the tree itself"
    )


# -- the note and the lock ---------------------------------------------------------------------
def _write_note(note: Path, state: str, message: str = "") -> None:
    """Atomically record what the lister is doing (``listing``, ``failed``, ``uncached``)."""
    files.write_marker(note, {"state": state, "message": message})


def _read_note(note: Path) -> dict | None:
    record = files.read_marker(note)
    return record if record is not None and "state" in record else None


def _is_live(note: dict, timeout: float) -> bool:
    """Whether a ``listing`` note comes from a lister still at work: recent, and on this host
    from a process that still runs (a process on another host cannot be checked: trusted)."""
    if note["state"] != "listing" or time.time() - float(note.get("time", 0)) > timeout:
        return False
    if note.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(note["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True
    return True


def _remove_notes_of(path: Path) -> None:
    """Remove the notes of every version of this tree (the list is written, nobody waits)."""
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*.note"):
        old.unlink(missing_ok=True)


def _locked(lock: Path, *, timeout: float, listing: Path):
    """Hold an exclusive ``flock`` on ``lock``, waiting up to ``timeout`` seconds; on a filesystem
    without locks, go on without one (with a warning)."""
    return files.exclusive_lock(
        lock, timeout=timeout, without="listing without one",
        on_timeout=lambda: ListingTimeout(
            f"waited {timeout:.0f} s for the lock {lock}, held by another process listing "
            f"{listing} into the same cache folder; if that process is stuck, stop it (its "
            f"lock goes with it), or set data.filelist_cache=false"),
    )


# -- the file format ---------------------------------------------------------------------------
def write_file_list(split: layout.Split, path: str | os.PathLike) -> None:
    """Write ``split`` in DALI's file_list format (paths relative to ``split.root``), atomically,
    removing older lists of the same tree."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = str(split.root) + os.sep
    lines = []
    for f, label in zip(split.files, split.labels):
        if not f.startswith(prefix):
            raise ValueError(f"{f} is not under {split.root}")
        lines.append(f"{f[len(prefix):]} {label}\n")
    # A reader in another process sees the whole old file or the whole new one, never a part.
    files.write_atomic(path, "".join(lines), fsync=False, unique=True)
    stem = path.name.rsplit("-", 1)[0]  # "<split>-<identity>": the same tree, older versions
    for old in path.parent.glob(f"{stem}-*.txt"):
        if old != path:
            old.unlink(missing_ok=True)


def read_file_list(path: str | os.PathLike, split_dir: str | os.PathLike, classes: list[str]) -> layout.Split:
    """Read a list written by :func:`write_file_list` back into a :class:`layout.Split`."""
    prefix = str(split_dir) + os.sep
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        raise ValueError("the last line is incomplete")
    files: list[str] = []
    labels: list[int] = []
    for line in text.splitlines():
        name, _, label = line.rpartition(" ")  # names may contain spaces, labels do not
        files.append(prefix + name)
        labels.append(int(label))
    if not files:
        raise ValueError("the list is empty")
    if not 0 <= min(labels) <= max(labels) < len(classes):
        raise ValueError(f"labels outside [0, {len(classes)})")
    return layout.Split(root=Path(split_dir), classes=list(classes), files=files, labels=labels)
