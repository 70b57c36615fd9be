"""Where a split's images come from: an ImageNet folder tree or a pack of tar shards, behind one
small interface, :class:`Source`, so that the loaders (DALI, torchvision) read either without
asking which.

A source is a split of ``len(source)`` samples with ids ``0 .. len - 1``. It says

* what each sample is: its ``label``, its ``key`` (``<class folder>/<file stem>``, the pack's
  member name, so a tree's file and its packed copy have the same key) and, for messages, its
  ``describe`` (a file's path, a shard member's tar, name and position);
* which samples a rank feeds: ``train_ids`` (per epoch, the order rules of
  :mod:`sharding` for a tree, :mod:`shards` for a pack, which own them) and ``val_ids``;
* how torchvision reads sample ``i`` (``load``: the RGB image and its label, in the DataLoader's
  workers);
* how DALI reads a list of ids (``dali_reader()``: one loader's reader, which makes the reader
  operators of its pipelines), and what to say when DALI fails on one of them (``dali_failure``:
  the bad images named, found by decoding the batches in flight again).

:class:`FolderSource` is a tree's split (the files of :func:`layout.scan_split` or of the file-list
cache), :class:`PackSource` a pack's (:class:`shards.ShardSplit`, read at the offsets of its
indices: no tar library, no listing). The DataModule builds one per split; the loaders take one
(or, as a shorthand, image files and their labels: :func:`as_source`).
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from . import check, layout, pack_format, sharding, shards

if TYPE_CHECKING:
    import torch
    from PIL import Image

CHECK_DATA_HINT = "Run `imagenet-trainer check-data ROOT` to list every bad file"


@runtime_checkable
class Source(Protocol):
    """A split's samples, however they are stored (see the module docstring)."""

    @property
    def classes(self) -> list[str] | None:
        """Class names in label order (None for bare files, whose classes nobody named)."""

    def __len__(self) -> int: ...

    def label(self, i: int) -> int: ...

    def key(self, i: int) -> str:
        """``<class folder>/<file stem>`` (dots and whitespace made ``_``): the pack's sample key."""

    def describe(self, i: int) -> str:
        """Sample ``i`` named for a person: a file's path, or a shard's tar, member and position."""

    def train_ids(self, *, epoch: int, seed: int, shard_id: int, num_shards: int, batch_size: int,
                  start_step: int = 0, repeats: int = 1) -> np.ndarray:
        """The ids rank ``shard_id`` trains on in ``epoch``, from batch ``start_step`` on
        (``sharding.train_indices``'s contract)."""

    def val_ids(self, *, shard_id: int, num_shards: int) -> np.ndarray:
        """Rank ``shard_id``'s contiguous slice for validation; the ranks' slices hold every id once."""

    def load(self, i: int) -> tuple[Image.Image, int]:
        """Sample ``i`` decoded to RGB (EXIF orientation applied, as DALI does) and its label."""

    def dali_reader(self) -> DaliReader:
        """A reader for one DALI loader (its own: it may keep files for its pipelines)."""

    def dali_failure(self, message: str, in_flight: Sequence[int]) -> str:
        """The error to raise when DALI failed with ``message`` while the ids ``in_flight`` were
        being read: the bad images among them named, and what to do."""


class DaliReader(Protocol):
    """How one DALI loader reads a source."""

    def read(self, ids: np.ndarray) -> Callable[[bool], tuple]:
        """A function that, called inside a pipeline definition with ``use_mmap``, returns the
        reader's ``(encoded images, labels)`` nodes, reading ``ids`` in that order, one shard,
        no shuffle of its own (the order is the source's)."""

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels node's batch (a torch tensor) as class indices."""

    def close(self) -> None:
        """Remove what the reader keeps on disk (also done when it is collected)."""


def as_source(items, labels: Sequence[int] | None = None) -> Source:
    """``items`` when it is a :class:`Source`; else ``items`` are image files, with their ``labels``."""
    if isinstance(items, Source):
        if labels is not None:
            raise TypeError(f"labels were given with a {type(items).__name__}, which has its own")
        return items
    if labels is None:
        raise TypeError(f"{type(items).__name__} is not a Source: pass a sources.FolderSource or "
                        f"sources.PackSource, or image files with their labels")
    return FolderSource(items, labels)


def load_rgb(path, name: str | None = None, hint: str = CHECK_DATA_HINT) -> Image.Image:
    """Decode ``path`` (a file name or a binary file object, then called ``name``) to RGB,
    applying its EXIF orientation as DALI's decoder does."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any decoder failure is reported with the file
        raise RuntimeError(f"cannot decode image {name or path}: {err}. {hint}") from err


# -- a folder tree ---------------------------------------------------------------------------------
class FolderSource:
    """Image files, each with its label: a split of an ImageNet folder tree. Sample ``i`` is
    ``files[i]``; DALI reads them with its file reader."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], classes: Sequence[str] | None = None) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = [str(f) for f in files]
        self.labels = labels
        self.classes = None if classes is None else list(classes)
        self._labels = np.asarray(labels, dtype=np.int64)

    @classmethod
    def of(cls, split: layout.Split) -> FolderSource:
        return cls(split.files, split.labels, split.classes)

    def __len__(self) -> int:
        return len(self.files)

    def label(self, i: int) -> int:
        return int(self._labels[i])

    def key(self, i: int) -> str:
        return pack_format.sample_key(self.files[i])

    def describe(self, i: int) -> str:
        return self.files[i]

    def train_ids(self, **order) -> np.ndarray:
        return sharding.train_indices(len(self), **order)

    def val_ids(self, *, shard_id: int, num_shards: int) -> np.ndarray:
        return np.arange(len(self))[sharding.val_indices(len(self), shard_id=shard_id, num_shards=num_shards)]

    def load(self, i: int) -> tuple[Image.Image, int]:
        return load_rgb(self.files[i]), int(self.labels[i])

    def dali_reader(self) -> FileReader:
        return FileReader(self.files, self._labels)

    def dali_failure(self, message: str, in_flight: Sequence[int]) -> str:
        """Names the file(s) DALI failed on, taken from its error or found by decoding the files in
        flight again; always says how to find every bad file at once."""
        from .dali.errors import dali_reason, named_files

        in_flight = [self.files[i] for i in in_flight]
        reason = dali_reason(message)
        named = named_files(message) + [p for p in in_flight if p in message]
        # Decode a named file again for a reason that says more than DALI's "failed to decode".
        found = [(p, check.check_file(p) or f"DALI: {reason}") for p in dict.fromkeys(named)]
        if not found:
            found = check.check_files(list(dict.fromkeys(in_flight)), num_workers=0, progress=False)
        if found:
            listing = "\n".join(f"  {p}: {r}" for p, r in found)
            head = f"DALI could not read or decode {len(found)} image file(s):\n{listing}\n"
        else:
            head = (
                f"DALI failed and did not name the file; the {len(in_flight)} files of the batches in "
                f"flight all decode when read again, so the cause may be I/O or memory.\n"
            )
        return (
            f"{head}The run stopped: DALI cannot skip a sample, and nothing is skipped silently. "
            f"Run `imagenet-trainer check-data {_dataset_root(self.files)}` to list every bad file, then "
            f"replace or remove them. DALI said: {reason}"
        )


def _dataset_root(files: Sequence[str]) -> str:
    """The dataset root for the check-data hint: the folder above train/ or val/ when there is one."""
    if not files:
        return "ROOT"
    try:
        common = os.path.commonpath([files[0], files[-1]])
    except ValueError:
        return "ROOT"
    parts = common.split(os.sep)
    for split in ("train", "val"):
        if split in parts:
            return os.sep.join(parts[: len(parts) - 1 - parts[::-1].index(split)]) or os.sep
    return common


class FileReader:
    """DALI's file reader over image files and their labels."""

    def __init__(self, files: list[str], labels: np.ndarray) -> None:
        self.files, self._labels = files, labels

    def read(self, ids: np.ndarray) -> Callable[[bool], tuple]:
        files, labels = [self.files[i] for i in ids], self._labels[ids].tolist()

        def read(use_mmap: bool):
            from nvidia.dali import fn

            return fn.readers.file(
                files=files,
                labels=labels,
                random_shuffle=False,  # the order is sharding.py's
                num_shards=1,
                shard_id=0,
                pad_last_batch=True,
                dont_use_mmap=not use_mmap,
                name="Reader",
            )

        return read

    @staticmethod
    def labels(labels: torch.Tensor) -> torch.Tensor:
        return labels

    def close(self) -> None:
        pass


# -- a pack ------------------------------------------------------------------------------------------
class PackSource:
    """A pack's split (:class:`shards.ShardSplit`): sample ``i`` is the ``i``-th image of its shards
    in manifest order. Read at the offsets of its shard's index: torchvision with one ``pread`` per
    image (each worker process parses an index the first time it reads from that shard, a shard's
    index, not the split's: start-up reads none, and keeps its tars open); DALI with its webdataset
    reader (:class:`ShardReader`)."""

    def __init__(self, split: shards.ShardSplit) -> None:
        self.split = split
        self._offsets: dict[int, np.ndarray] = {}  # per shard: [[jpg offset, size, cls offset, size]]
        self._files: dict[int, object] = {}  # open tars
        self._lines: tuple[int, list[str]] | None = None  # the last shard's index lines read

    def __getstate__(self):  # to a worker process: without open files
        return {"split": self.split, "_offsets": {}, "_files": {}, "_lines": None}

    @property
    def classes(self) -> list[str]:
        return self.split.classes

    def __len__(self) -> int:
        return len(self.split)

    def _locate(self, i: int) -> tuple[int, int]:
        shard, position = self.split.locate(np.array([i]))
        return int(shard[0]), int(position[0])

    def _entry(self, i: int) -> tuple[int, int, pack_format.IndexEntry]:
        """(shard, position in its index, its index entry) of sample ``i``."""
        shard, position = self._locate(i)
        if self._lines is None or self._lines[0] != shard:
            self._lines = (shard, self.split.index_lines(shard))
        return shard, position, pack_format.parse_index_line(self._lines[1][position])

    def _fd(self, shard: int) -> int:
        if shard not in self._files:
            self._files[shard] = open(self.split.shards[shard].tar, "rb")  # noqa: SIM115 - kept open
        return self._files[shard].fileno()

    def _offsets_of(self, shard: int) -> np.ndarray:
        if shard not in self._offsets:
            entries = map(pack_format.parse_index_line, self.split.index_lines(shard))
            self._offsets[shard] = np.array([[e.jpg_offset, e.jpg_size, e.cls_offset, e.cls_size] for e in entries],
                                            np.int64)
        return self._offsets[shard]

    def label(self, i: int) -> int:
        shard, _, entry = self._entry(i)
        return pack_format.parse_cls(os.pread(self._fd(shard), entry.cls_size, entry.cls_offset))

    def key(self, i: int) -> str:
        return self._entry(i)[2].key

    def describe(self, i: int) -> str:
        shard, position, entry = self._entry(i)
        return f"{self.split.shards[shard].tar}: {entry.jpg_name} (image {position} of its index)"

    def image_bytes(self, i: int) -> bytes:
        """The encoded image of sample ``i``, as packed."""
        shard, _, entry = self._entry(i)
        return os.pread(self._fd(shard), entry.jpg_size, entry.jpg_offset)

    def train_ids(self, **order) -> np.ndarray:
        return shards.train_ids(self.split, **order)

    def val_ids(self, *, shard_id: int, num_shards: int) -> np.ndarray:
        return shards.val_ids(self.split, shard_id=shard_id, num_shards=num_shards)

    def load(self, i: int) -> tuple[Image.Image, int]:
        shard, position = self._locate(i)
        jpg_offset, jpg_size, cls_offset, cls_size = self._offsets_of(shard)[position].tolist()
        fd = self._fd(shard)
        name = f"{self.split.shards[shard].tar} (image {position} of its index)"
        label = os.pread(fd, cls_size, cls_offset)
        image = load_rgb(io.BytesIO(os.pread(fd, jpg_size, jpg_offset)), name=name,
                         hint=f"The shard is damaged or was not written by `imagenet-trainer pack`: "
                              f"`imagenet-trainer check-data {self.split.root}` checks every shard's sha256")
        return image, pack_format.parse_cls(label)

    def dali_reader(self) -> ShardReader:
        return ShardReader(self.split)

    def dali_failure(self, message: str, in_flight: Sequence[int]) -> str:
        """Names the image(s) among ``in_flight`` that do not decode when read again from their
        shards, as :meth:`FolderSource.dali_failure` names files."""
        from .dali.errors import dali_reason

        bad = []
        for sample in dict.fromkeys(np.asarray(in_flight, dtype=np.int64).tolist()):
            reason = check.check_bytes(self.image_bytes(sample))
            if reason:
                bad.append(f"  {self.describe(sample)}: {reason}")
        root = self.split.root
        head = (f"DALI could not decode {len(bad)} image(s) of the pack {root}:\n" + "\n".join(bad) + "\n"
                if bad else f"DALI failed on the pack {root}, and the images of the batches in flight "
                            f"all decode when read again, so the cause may be I/O or memory.\n")
        return (
            f"{head}The run stopped: DALI cannot skip a sample. `imagenet-trainer pack` decodes every image "
            f"before packing, so a shard that fails was damaged later or not written by it: "
            f"`imagenet-trainer check-data {root}` checks every shard against manifest.json's sha256 "
            f"(data.stage_to copies are checked at every job start); re-run `imagenet-trainer pack` to rewrite "
            f"damaged shards. DALI said: {dali_reason(message)}"
        )


class ShardReader:
    """DALI's webdataset reader over a pack's split, in the source's order: each pipeline gets index
    files that list exactly its samples, in order (:func:`shards.write_reader_indices`), written
    into a private folder removed with the reader (:func:`shards.index_folder`)."""

    LABEL_WIDTH = 8  # the ``.cls`` digits, padded: class indices up to 10**8 - 1

    def __init__(self, split: shards.ShardSplit) -> None:
        self.split = split
        self._folder = shards.index_folder(split.name)

    def read(self, ids: np.ndarray) -> Callable[[bool], tuple]:
        """The labels node is the ``.cls`` text padded with zeros to ``LABEL_WIDTH`` bytes
        (:meth:`labels` parses it): DALI reads components as bytes."""
        from pathlib import Path

        folder = Path(self._folder.name)
        for old in folder.iterdir():  # the previous pipeline's indices (read when it was built)
            old.unlink()
        paths, index_paths = shards.write_reader_indices(self.split, ids, folder)

        def read(use_mmap: bool):
            from nvidia.dali import fn

            jpegs, cls = fn.readers.webdataset(
                paths=paths,
                index_paths=index_paths,
                ext=[pack_format.IMAGE, pack_format.LABEL],
                missing_component_behavior="error",
                random_shuffle=False,  # the order is shards.py's, in the indices
                num_shards=1,
                shard_id=0,
                pad_last_batch=True,
                dont_use_mmap=not use_mmap,
                name="Reader",
            )
            return jpegs, fn.pad(cls, fill_value=0, shape=[self.LABEL_WIDTH], axes=[0])

        return read

    @staticmethod
    def labels(labels: torch.Tensor) -> torch.Tensor:
        return pack_format.ascii_labels(labels)

    def close(self) -> None:
        self._folder.cleanup()
