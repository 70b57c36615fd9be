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
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from pathlib import Path

from . import layout

_FORMAT = "imagenet-trainer file list v1"
_RACY_SECONDS = 3.0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/imagenet-trainer``, by default ``~/.cache/imagenet-trainer``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imagenet-trainer"


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


def cached_split(
    root: str | os.PathLike,
    split: str,
    classes: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> layout.Split:
    """The same :class:`layout.Split` as ``layout.scan_split(root, split, classes)``, read from
    the cache when the tree has not changed since it was written, else scanned and cached."""
    split_dir = Path(root) / split
    real_dir = Path(os.path.realpath(split_dir))
    found, stamps = _tree_state(split_dir)
    path = _cache_file(real_dir, classes, stamps, cache_dir)
    class_list = list(classes) if classes is not None else found
    if path.is_file():
        try:
            return read_file_list(path, split_dir, class_list)
        except (OSError, ValueError) as err:  # unreadable or damaged: list the tree again
            warnings.warn(f"ignoring the damaged file-list cache {path}: {err}", stacklevel=2)
    scan_started = time.time()
    result = layout.scan_split(root, split, classes)
    newest = max(ns for _, ns in stamps) / 1e9
    if newest < scan_started - _RACY_SECONDS:
        try:
            write_file_list(result, path)
        except OSError as err:  # a read-only home directory must not stop training
            warnings.warn(f"cannot write the file-list cache {path}: {err}", stacklevel=2)
    return result


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
