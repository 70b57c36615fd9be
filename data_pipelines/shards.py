"""Reading a pack of tar shards (``imagenet-trainer pack``'s output): its manifest and indices,
checked, and the sample order every backend reads it in.

The pack's bytes (file names, members, index lines, the manifest) are defined in
:mod:`data_pipelines.pack_format`, for the writer and the readers alike; this module reads them as
:class:`Manifest` and :class:`ShardSplit` (what :class:`data_pipelines.sources.PackSource` reads
from), and writes the per-pipeline indices DALI's webdataset reader follows.

Sample order, the folder path's contract kept (:mod:`data_pipelines.sharding`), in terms of
shards so that ranks read distinct shards:

* training, each epoch: a seeded permutation of the train shards is laid end to end, each shard's
  images in a seeded order of their own (the shuffle buffer is one shard; ``pack`` already mixed
  the classes over the shards), and the stream is dealt to the ranks in contiguous spans of
  ``steps * batch_size`` images: every rank the same number of full batches, each reading about
  ``1 / world`` of the shards, the few images left over differing from epoch to epoch;
* validation: the shards in order, cut into contiguous slices that hold each image exactly once;
* resume: ``start_step`` skips exactly the batches fed, as for folders;
* repeated augmentation: the folder path's rule (:func:`sharding.deal_repeated`), an image's
  copies on different ranks, dealt within groups of ranks so that a rank still reads few shards.

A sample id is the image's position in its split: the shards in manifest order, images in index
order.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from . import pack_format
from .files import try_exclusive_lock
# The format's names, read here and by the pack's other users through this module too.
from .pack_format import (  # noqa: F401
    FORMAT, INDEX_VERSION, MANIFEST, SPLITS, VERSION, ShardError, ascii_labels,
)
from .sharding import deal_repeated, steps_per_epoch, val_indices


def is_sharded(root: str | os.PathLike | None) -> bool:
    """Whether ``root`` holds a pack (a ``manifest.json``) rather than an ImageNet folder tree."""
    return root is not None and (Path(root) / MANIFEST).is_file()


@dataclass(frozen=True)
class Shard:
    tar: Path
    index: Path
    images: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardSplit:
    """One split of a pack: its shards in manifest order."""

    root: Path
    name: str
    classes: list[str]
    shards: list[Shard] = field(repr=False)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @cached_property
    def starts(self) -> np.ndarray:
        """Sample id of each shard's first image; the last entry is the split's size."""
        return np.concatenate([[0], np.cumsum([s.images for s in self.shards])]).astype(np.int64)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, position in that shard's index) of each sample id."""
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        return shard, ids - self.starts[shard]

    def index_lines(self, shard: int) -> list[str]:
        """The index's sample lines of shard number ``shard``, in its order."""
        path = self.shards[shard].index
        try:
            text = path.read_text()
        except OSError as err:
            raise ShardError(f"cannot read the shard index {path}: {err.strerror or err}; re-run "
                             f"`imagenet-trainer pack` for {self.root}") from err
        lines = pack_format.sample_lines(text, path=path, root=self.root)
        if len(lines) != self.shards[shard].images:
            raise ShardError(f"{path} lists {len(lines)} images, the manifest {self.shards[shard].images}; "
                             f"the pack under {self.root} is damaged: re-run `imagenet-trainer pack`")
        return lines


@dataclass(frozen=True)
class Manifest:
    root: Path
    classes: list[str]
    splits: dict[str, ShardSplit]
    data: dict = field(repr=False)

    @property
    def train(self) -> ShardSplit:
        return self.splits["train"]

    @property
    def val(self) -> ShardSplit:
        return self.splits["val"]

    def shards(self) -> list[Shard]:
        return [s for name in SPLITS for s in self.splits[name].shards]

    @property
    def names(self) -> list[str] | None:
        """Each class's words ("tench, Tinca tinca"), aligned with ``classes``; None when unknown."""
        return pack_format.manifest_names(self.data, self.root / MANIFEST)


def read_manifest(root: str | os.PathLike) -> Manifest:
    """The pack under ``root``, checked: format, version, and each shard's files present with the
    manifest's sizes (contents are checked by sha256 only when staging, :mod:`staging`)."""
    root = Path(root)
    data = pack_format.load_manifest(root)
    classes, records = pack_format.parse_manifest(data, root / MANIFEST)
    splits = {name: ShardSplit(root, name, classes, [Shard(root / r.tar, root / r.index, r.images, r.bytes, r.sha256)
                                                     for r in records[name]])
              for name in SPLITS}
    manifest = Manifest(root, classes, splits, data)
    for shard in manifest.shards():
        check_present(shard)
    return manifest


def check_present(shard: Shard) -> None:
    """The shard's tar and index exist and the tar has the manifest's size."""
    for file in (shard.tar, shard.index):
        if not file.is_file():
            raise ShardError(f"{file} is missing; the pack under {file.parent} is incomplete: "
                             f"re-run `imagenet-trainer pack` (it keeps finished shards)")
    size = shard.tar.stat().st_size
    if size != shard.bytes:
        raise ShardError(f"{shard.tar} has {size} bytes, the manifest says {shard.bytes}: the copy is "
                         f"truncated or replaced; copy it again or re-run `imagenet-trainer pack`")


def verify(manifest: Manifest, workers: int = 4) -> list[tuple[str, str]]:
    """``(tar, reason)`` for every shard of ``manifest`` whose sha256 differs from the manifest's
    (``workers`` threads hash at once; hashlib releases the GIL). Sizes and presence were checked
    when the manifest was read."""
    from concurrent.futures import ThreadPoolExecutor

    from .files import sha256_of

    every = manifest.shards()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        sums = list(pool.map(lambda shard: sha256_of(shard.tar), every))
    return [(str(shard.tar), f"sha256 {got} differs from the manifest's {shard.sha256}: the shard is damaged")
            for shard, got in zip(every, sums) if got != shard.sha256]


# -- the sample order ----------------------------------------------------------------------------
def shard_stream(split: ShardSplit, *, epoch: int, seed: int) -> np.ndarray:
    """Every sample id of ``split`` in epoch ``epoch``'s training order: a seeded permutation of
    the shards, each shard's images in a seeded order of their own."""
    rng = np.random.default_rng([seed, epoch])
    parts = []
    for s in rng.permutation(len(split.shards)):
        start, stop = split.starts[s], split.starts[s + 1]
        inner = np.random.default_rng([seed, epoch, 1, int(s)]).permutation(stop - start)
        parts.append(start + inner)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def train_ids(
    split: ShardSplit,
    *,
    epoch: int,
    seed: int,
    shard_id: int,
    num_shards: int,
    batch_size: int,
    start_step: int = 0,
    repeats: int = 1,
) -> np.ndarray:
    """Sample ids rank ``shard_id`` feeds in ``epoch``, from batch ``start_step`` on: its
    contiguous span of :func:`shard_stream`. ``repeats`` > 1 (repeated augmentation): the
    stream's first images, each fed ``repeats`` times on different ranks, by the folder path's
    rule (:func:`sharding.deal_repeated`), a rank's ids still in stream order."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} is outside [0, num_shards={num_shards})")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be at least 1 (1: no repeated augmentation)")
    steps = steps_per_epoch(len(split), num_shards, batch_size)
    mine = deal_repeated(shard_stream(split, epoch=epoch, seed=seed), repeats=repeats, shard_id=shard_id,
                         num_shards=num_shards, span=steps * batch_size)
    return mine[start_step * batch_size :]


def val_ids(split: ShardSplit, *, shard_id: int, num_shards: int) -> np.ndarray:
    """Rank ``shard_id``'s contiguous slice of the split in manifest order (every image once)."""
    return np.arange(len(split))[val_indices(len(split), shard_id=shard_id, num_shards=num_shards)]


# -- reading an order with DALI -----------------------------------------------------------------
def runs(split: ShardSplit, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``ids`` as consecutive runs of one shard: [(shard number, positions in its index)]."""
    shard, pos = split.locate(np.asarray(ids, dtype=np.int64))
    if len(shard) == 0:
        return []
    cuts = np.flatnonzero(np.diff(shard)) + 1
    return [(int(s[0]), p) for s, p in zip(np.split(shard, cuts), np.split(pos, cuts))]


def write_reader_indices(split: ShardSplit, ids: np.ndarray, folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """DALI webdataset ``(paths, index_paths)`` that read exactly ``ids``, in that order.

    DALI's reader reads a shard's samples in the order of its index's lines and accepts the same
    tar more than once, so one index per run of ``ids`` in one shard (the lines of the shard's own
    index, reordered and cut) makes ``fn.readers.webdataset(random_shuffle=False)`` read our order,
    seeking within the tar. Written into ``folder``. A rank's ids follow the shard stream (repeated
augmentation too), so each shard is one run and its index is read once.
    """
    folder = Path(folder)
    paths, indices, lines_of = [], [], {}
    for n, (shard, positions) in enumerate(runs(split, ids)):
        if shard not in lines_of:
            lines_of = {shard: split.index_lines(shard)}  # only the current shard's lines in memory
        lines = lines_of[shard]
        index = folder / f"{n:06d}-{split.shards[shard].index.name}"
        index.write_text(pack_format.index_text([lines[p] for p in positions]))
        paths.append(str(split.shards[shard].tar))
        indices.append(str(index))
    return paths, indices


INDEX_FOLDER_PREFIX = "imagenet-trainer-indices-"
INDEX_FOLDER_LOCK = "lock"
# A folder without a lock (made before the lock existed, or where the filesystem has none) is
# removed only after this long untouched; a live rank rewrites its indices every epoch.
UNLOCKED_FOLDER_AGE = 7 * 24 * 3600


class IndexFolder:
    """A loader's private folder of reader indices, ``name``, removed with the object or by
    :meth:`cleanup`. On disk ``PARENT/imagenet-trainer-indices-PID-SPLIT-RANDOM/`` holds ``name``
    (``indices/``) and ``lock``, on which this object keeps an exclusive ``flock`` for the
    folder's whole life: the kernel releases it when the process dies, however (SIGKILL, the OOM
    killer), so a folder whose lock can be taken has no owner, whatever PID namespace made it."""

    def __init__(self, split: str, parent: str | os.PathLike | None = None) -> None:
        parent = Path(parent or tempfile.gettempdir())
        sweep_index_folders(parent)
        # Made under a hidden name and renamed once locked, so that no sweep sees it unlocked.
        staging = Path(tempfile.mkdtemp(prefix=f".{INDEX_FOLDER_PREFIX}{os.getpid()}-{split}-", dir=parent))
        fd = -1
        try:
            fd = os.open(staging / INDEX_FOLDER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try_exclusive_lock(fd)  # None: no locks here, the folder is swept by age (see the sweep)
            (staging / "indices").mkdir()
            root = staging.with_name(staging.name[1:])
            os.rename(staging, root)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.root = root
        self.name = str(root / "indices")
        self._finalizer = weakref.finalize(self, _remove_held, root, fd, os.getpid())

    def cleanup(self) -> None:
        """Remove the folder and release its lock (once; later calls do nothing)."""
        self._finalizer()


def _remove_held(root: Path, fd: int, owner: int) -> None:
    if os.getpid() != owner:  # a forked child exiting: the folder is its parent's
        return
    try:
        shutil.rmtree(root, ignore_errors=True)
    finally:
        os.close(fd)  # after the removal: no sweep takes the lock of a folder being removed


def index_folder(split: str, parent: str | os.PathLike | None = None) -> IndexFolder:
    """A private folder (in ``parent``, default the temp folder) for a loader's per-epoch reader
    indices, removed with the returned object (:class:`IndexFolder`). A process killed before it
    could clean up (SIGKILL, a node's OOM killer) leaves its folder behind, up to about 115 MB
    for one rank over ImageNet, so making a folder first removes those no live process holds
    (:func:`sweep_index_folders`)."""
    return IndexFolder(split, parent)


def sweep_index_folders(parent: Path) -> None:
    """Remove the reader index folders in ``parent`` that no process holds: those whose lock this
    call can take. A folder without a lock (from a version before it) or on a filesystem without
    locks goes only when untouched for ``UNLOCKED_FOLDER_AGE`` and its pid is not a live process
    here: the pid alone can be another PID namespace's live rank (containers sharing /tmp).
    Other users' folders, which cannot be opened, stay."""
    for old in parent.glob(f"{INDEX_FOLDER_PREFIX}*-*"):
        if not old.is_dir():
            continue
        try:
            fd = os.open(old / INDEX_FOLDER_LOCK, os.O_RDWR)
        except FileNotFoundError:
            if _unlocked_and_abandoned(old):
                shutil.rmtree(old, ignore_errors=True)
            continue
        except OSError:  # another user's, or going away
            continue
        try:
            free = try_exclusive_lock(fd)
            if free or (free is None and _unlocked_and_abandoned(old)):
                shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)


def _unlocked_and_abandoned(folder: Path) -> bool:
    """For a folder no lock speaks for: its pid is not a live process here and neither it nor its
    ``indices`` changed for ``UNLOCKED_FOLDER_AGE``."""
    pid = folder.name[len(INDEX_FOLDER_PREFIX):].split("-", 1)[0]
    if not pid.isdigit() or _alive(int(pid)):
        return False
    try:
        changed = max(p.stat().st_mtime for p in (folder, folder / "indices") if p.exists())
    except (OSError, ValueError):
        return False
    return time.time() - changed > UNLOCKED_FOLDER_AGE


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process in this PID namespace (says nothing of other namespaces)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
