"""The bytes of a pack (``imagenet-trainer pack``'s output): file names, tar members, index lines and
the manifest, defined once for the writer (:mod:`data_pipelines.pack`) and every reader
(:mod:`shards` reads the manifest and the indices, :mod:`sources` the members, :mod:`staging`
copies the files). Nothing else writes or parses them.

The format (``FORMAT``, version ``VERSION``) is WebDataset's, with DALI's indices::

    OUT/manifest.json        what is in the shards (below); written last, so its presence means a
                             complete pack
    OUT/train-000000.tar     one ``KEY.jpg`` (the original file's bytes, whatever its format) and
    OUT/train-000000.idx     one ``KEY.cls`` (the class index in ASCII decimal) per image; the index
    ...                      in DALI's ``v1.2`` format (``fn.readers.webdataset(index_paths=)``):
    OUT/val-000000.tar       a ``v1.2 N`` line, then one line per image,
    OUT/val-000000.idx       ``jpg OFFSET SIZE KEY.jpg cls OFFSET SIZE KEY.cls``

``KEY`` is ``<class folder>/<file stem>``, with whitespace made ``_`` (an index line is split at
spaces) and dots in the stem too (a WebDataset key ends at its first dot). Tars are GNU format, so
names over 100 bytes work; OFFSET is always the member's data (DALI's ``wds2idx`` gives the
long-name header's offset for such names, which is why ``pack`` writes the indices itself). The
tars are deterministic (mtime 0, uid/gid 0, mode 0644, no owner names, the end padded to tar's
10240-byte record as tar and ``tarfile`` do), so a shard's size follows from its members' names
and sizes (:func:`tar_bytes`). ``manifest.json``::

    {"format": FORMAT, "version": 1, "classes": [wnid, ...],       # index order = the folder layout's
     "source_root": "/abs/path", "seed": 0, "shard_size": BYTES,
     "splits": {"train": {"images": N, "shards": [{"tar": "train-000000.tar",
                "index": "train-000000.idx", "images": n, "bytes": B, "sha256": HEX}, ...]},
                "val": {...}},
     "skipped": [{"path": ..., "reason": ...}, ...],               # bad files left out (--skip-bad)
     "names": ["tench, Tinca tinca", ...]}                         # optional: each class's words
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import layout

FORMAT = "imagenet-trainer shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
INDEX_VERSION = "v1.2"
# Changes whenever the bytes written for the same images change, so that the records of an older
# writer (pack.py's resume) do not match.
WRITER = "imagenet-trainer pack 1: GNU tar, mtime 0, uid/gid 0, mode 0644, record-padded"

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240
TAR_FORMAT = tarfile.GNU_FORMAT
ENCODING, ERRORS = "utf-8", "surrogateescape"
IMAGE, LABEL = "jpg", "cls"  # a sample's members, in this order: KEY.jpg, KEY.cls

# A shard's files in the pack's folder.
SHARD_FILE = re.compile(r"^(train|val)-(\d{6})\.(tar|idx)$")
SHARD_FIELDS = ("tar", "index", "images", "bytes", "sha256")  # a shard's entry in the manifest


class ShardError(layout.DataLayoutError):
    """A pack is incomplete, damaged or of another format; the message says what to do."""


# -- names ---------------------------------------------------------------------------------------
def sample_key(path: str | os.PathLike) -> str:
    """The WebDataset key of an image file: ``<class folder>/<file stem>``, with the stem's dots
    and whitespace made ``_`` (a key ends at its first dot, an index line is split at whitespace),
    and whitespace in the folder name too."""
    path = Path(path)
    return re.sub(r"\s", "_", path.parent.name) + "/" + re.sub(r"[\s.]", "_", path.stem)


def shard_name(split: str, number: int) -> str:
    """``train-000003``: the name of a split's shard ``number``, its tar and index without suffix."""
    return f"{split}-{number:06d}"


def member_name(key: str, ext: str) -> str:
    return f"{key}.{ext}"


# -- tar members ---------------------------------------------------------------------------------
def cls_bytes(label: int) -> bytes:
    """A ``.cls`` member: the class index in ASCII decimal."""
    return str(label).encode("ascii")


def parse_cls(data: bytes) -> int:
    return int(data)


def ascii_labels(codes):
    """Class indices from DALI's ``.cls`` outputs: ASCII decimal digits padded with zeros to a
    fixed width, ``[N, width]`` uint8 (torch) -> ``[N]`` int64 on the same device."""
    import torch

    codes = codes.reshape(codes.shape[0], -1).long()
    digits = (codes >= 48) & (codes <= 57)
    value = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
    for column in range(codes.shape[1]):
        value = torch.where(digits[:, column], value * 10 + codes[:, column] - 48, value)
    return value


def pad(n: int, to: int = BLOCK) -> int:
    return -(-n // to) * to


def header_size(name: str) -> int:
    """Bytes of a member's GNU tar header(s): one block, plus a ``././@LongLink`` header and its
    payload when the name is longer than 100 bytes (as ``tarfile`` writes them)."""
    n = len(name.encode(ENCODING, ERRORS))
    return BLOCK if n <= tarfile.LENGTH_NAME else 2 * BLOCK + pad(n + 1)


def member_bytes(name: str, size: int) -> int:
    """Tar bytes of one member: its header(s) and its data padded to a block."""
    return header_size(name) + pad(size)


def sample_bytes(key: str, size: int, label: int) -> int:
    """Tar bytes of one image of ``size`` bytes: its ``.jpg`` and ``.cls`` members."""
    return member_bytes(member_name(key, IMAGE), size) + member_bytes(member_name(key, LABEL), len(cls_bytes(label)))


def tar_bytes(members: int) -> int:
    """Bytes of a tar whose members take ``members`` bytes: two zero blocks end it, zeros pad it to
    a whole record."""
    return pad(members + 2 * BLOCK, RECORD)


def sample_members(key: str, image: bytes, label: int) -> list[tuple[str, str, bytes]]:
    """``(ext, member name, data)`` of one image's members, in tar order."""
    return [(IMAGE, member_name(key, IMAGE), image), (LABEL, member_name(key, LABEL), cls_bytes(label))]


def member_header(name: str, size: int) -> bytes:
    """The deterministic GNU header(s) of a member of ``size`` bytes (:func:`header_size` long)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(TAR_FORMAT, ENCODING, ERRORS)


# -- index lines ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexEntry:
    """One sample line of an index: the sample's key and where its members' data lie in the tar."""

    key: str
    jpg_offset: int
    jpg_size: int
    cls_offset: int
    cls_size: int

    @property
    def jpg_name(self) -> str:
        return member_name(self.key, IMAGE)


def index_line(members: Sequence[tuple[str, int, int, str]]) -> str:
    """A sample's index line from its members' ``(ext, data offset, size, name)``, in tar order."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)


def parse_index_line(line: str) -> IndexEntry:
    """``jpg OFFSET SIZE KEY.jpg cls OFFSET SIZE KEY.cls`` -> :class:`IndexEntry`."""
    fields = line.split()
    return IndexEntry(fields[3].rsplit(".", 1)[0], int(fields[1]), int(fields[2]), int(fields[5]), int(fields[6]))


def index_text(lines: Sequence[str]) -> str:
    """An index: the ``v1.2 N`` header, then the ``N`` sample lines, each ended by a newline."""
    return "\n".join([f"{INDEX_VERSION} {len(lines)}", *lines]) + "\n"


def sample_lines(text: str, *, path: Path, root: Path) -> list[str]:
    """The sample lines of the index ``text`` (of the file ``path``, in the pack ``root``), checked
    against its header: a :class:`ShardError` when the header does not announce exactly them."""
    lines = text.splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION or header[1] != str(len(lines) - 1):
        raise ShardError(f"{path} is not a complete {INDEX_VERSION} index ({len(lines) - 1} sample lines, "
                         f"header {lines[:1]}); re-run `imagenet-trainer pack` for {root}")
    return lines[1:]


# -- the manifest --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardRecord:
    """A shard's entry in the manifest: file names in the pack's folder, images, tar bytes, sha256."""

    tar: str
    index: str
    images: int
    bytes: int
    sha256: str


def manifest(*, classes: Sequence[str], source_root: str, seed: int, shard_size: int,
             splits: Mapping[str, Sequence[Mapping]], skipped: Sequence[Mapping],
             names: Sequence[str] | None = None) -> dict:
    """The manifest of the shards ``splits`` (per split, each shard's ``SHARD_FIELDS``, in order);
    ``names``, when known, the words of each class (aligned with ``classes``, "" where unknown)."""
    data = {
        "format": FORMAT,
        "version": VERSION,
        "classes": list(classes),
        "source_root": source_root,
        "seed": seed,
        "shard_size": shard_size,
        "splits": {
            name: {"images": sum(s["images"] for s in splits[name]),
                   "shards": [{key: s[key] for key in SHARD_FIELDS} for s in splits[name]]}
            for name in SPLITS
        },
        "skipped": list(skipped),
    }
    if names is not None:
        # Optional, so that version 1 packs written before names travelled still read.
        data["names"] = list(names)
    return data


def manifest_names(data: dict, path: Path) -> list[str] | None:
    """The manifest's class words (aligned with its classes), or None when it has none."""
    names = data.get("names")
    if names is None:
        return None
    if not isinstance(names, list) or len(names) != len(data["classes"]) or not all(isinstance(n, str) for n in names):
        raise ShardError(f"{path}: 'names' must be a list of {len(data['classes'])} strings, one per class; "
                         f"re-run `imagenet-trainer pack`")
    return names


def manifest_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()


def load_manifest(root: Path) -> dict:
    """``root/manifest.json`` as JSON (a :class:`ShardError` when it is missing or not JSON)."""
    path = root / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path} is missing: {root} is not a pack; make one with "
                         f"`imagenet-trainer pack IMAGENET_ROOT {root}`") from None
    except (OSError, ValueError) as err:
        raise ShardError(f"{path} cannot be read as JSON ({err}); re-run `imagenet-trainer pack`") from err


def parse_manifest(data, path: Path) -> tuple[list[str], dict[str, list[ShardRecord]]]:
    """The classes and each split's shards of the manifest ``data`` (read from ``path``), checked:
    format, version, every field, the image counts, plain and distinct file names."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ShardError(f"{path} is not an imagenet-trainer pack manifest (found {found!r}, expected format "
                         f"{FORMAT!r}); make one with `imagenet-trainer pack`")
    if data.get("version") != VERSION:
        raise ShardError(f"{path} has format version {data.get('version')!r}; this imagenet-trainer reads "
                         f"version {VERSION}: re-pack with `imagenet-trainer pack`, or install the version that wrote it")
    try:
        classes = [str(c) for c in data["classes"]]
        splits = {name: _split_records(data["splits"][name], name, path) for name in SPLITS}
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"{path} lacks or mangles the field {err}; re-run `imagenet-trainer pack`") from err
    if not splits["train"]:
        raise ShardError(f"{path} lists no train shards; re-run `imagenet-trainer pack`")
    names = [name for records in splits.values() for r in records for name in (r.tar, r.index)]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ShardError(f"{path} names {', '.join(twice)} more than once; re-run `imagenet-trainer pack`")
    manifest_names(data, path)
    return classes, splits


def _split_records(entry, name: str, path: Path) -> list[ShardRecord]:
    records = [ShardRecord(_file_name(path, s["tar"]), _file_name(path, s["index"]), int(s["images"]),
                           int(s["bytes"]), str(s["sha256"])) for s in entry["shards"]]
    images = sum(r.images for r in records)
    if images != int(entry["images"]):
        raise ShardError(f"{path}: the {name} shards hold {images} images, its "
                         f"'images' says {entry['images']}; re-run `imagenet-trainer pack`")
    return records


def _file_name(manifest: Path, name) -> str:
    """A file name of the manifest: a plain name inside the pack's folder, nothing else."""
    name = str(name)
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ShardError(f"{manifest} names the file {name!r}, which is not a plain file name in the pack's "
                         f"folder; re-run `imagenet-trainer pack`")
    return name
